import pytest

from simzmq import envelope as e


def test_request_round_trip_and_truncation():
    frame = e.pack_request(b"C" * 8, b"O" * 16, b"payload")
    assert e.unpack_request(frame) == (b"C" * 8, b"O" * 16, b"payload")
    assert e.unpack_request(e.pack_request(b"C" * 8, b"", b"")) == (b"C" * 8, b"", b"")
    for bad in (b"", b"C" * 8, b"C" * 8 + bytes([17]) + b"O" * 16):
        with pytest.raises(e.EnvelopeError):
            e.unpack_request(bad)


def test_reply_notice_and_stamp():
    assert e.unpack_reply(e.pack_reply(b"C" * 8, b"p")) == (b"C" * 8, b"p")
    with pytest.raises(e.EnvelopeError):
        e.unpack_reply(b"short")
    assert e.unpack_notice(e.pack_notice(b"O" * 16, b"p")) == (b"O" * 16, b"p")
    assert e.unpack_notice(e.pack_notice(b"", b"")) == (b"", b"")
    for bad in (b"", bytes([3]) + b"ab"):
        with pytest.raises(e.EnvelopeError):
            e.unpack_notice(bad)
    assert e.unpack_stamp(e.pack_stamp(b"E" * 8, 2**40)) == (b"E" * 8, 2**40)
    with pytest.raises(e.EnvelopeError):
        e.unpack_stamp(b"E" * 8)


def test_packed_notices_round_trip_and_refuse_truncation():
    from simzmq.envelope import pack_notices, unpack_notices
    entries = [(b"ann", b"", b"p1"), (b"bob", b"S" * 16, b""), (b"c" * 64, b"o", b"x" * 70000)]
    frame = pack_notices(entries)
    assert unpack_notices(frame) == entries
    for cut in (1, 4, 5, len(frame) - 1):
        with pytest.raises(e.EnvelopeError):
            unpack_notices(frame[:cut])
    with pytest.raises(e.EnvelopeError):
        unpack_notices(b"")


def test_a_request_budget_rides_in_the_payloads_ref():
    payload = bytes([7, 0, 0, 0, 0]) + b"body"
    frame = e.pack_request(b"C" * 8, b"O", payload, budget_ms=4321)
    corr, origin, sent = e.unpack_request(frame)
    assert (corr, origin) == (b"C" * 8, b"O") and e.request_budget_ms(sent) == 4321
    assert sent[:1] == payload[:1] and sent[5:] == b"body"
    # No budget (an older gate): the payload as it was, budget 0.
    assert e.request_budget_ms(e.unpack_request(e.pack_request(b"C" * 8, b"", payload))[2]) == 0
    assert e.request_budget_ms(b"\x01") == 0  # too short to carry one
    assert e.request_budget_ms(e.unpack_request(e.pack_request(b"C" * 8, b"", payload, 10**12))[2]) == 2**32 - 1
