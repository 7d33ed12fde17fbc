"""TCP framing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simzmq.wire.errors import FrameTooLarge, ProtocolError
from simzmq.wire.frames import FrameDecoder, encode_frame


def test_encode_frame():
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


def test_several_frames_in_one_feed():
    decoder = FrameDecoder(100)
    data = encode_frame(b"one") + encode_frame(b"") + encode_frame(b"three")
    assert decoder.feed(data) == [b"one", b"", b"three"]
    assert decoder.buffered == 0


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=10),
    cuts=st.lists(st.integers(0, 4000), max_size=20),
)
def test_any_split_yields_the_same_payloads(payloads, cuts):
    stream = b"".join(encode_frame(p) for p in payloads)
    points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    decoder = FrameDecoder(1000)
    received = []
    for start, end in zip(points, points[1:]):
        received += decoder.feed(stream[start:end])
    assert received == payloads
    assert decoder.buffered == 0


def test_oversized_prefix_raises_without_waiting_for_the_payload():
    decoder = FrameDecoder(293)
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\x00\x00\x01\x26")  # 294
    assert decoder.buffered == 0
    # Broken for good.
    with pytest.raises(FrameTooLarge):
        decoder.feed(encode_frame(b"x"))


def test_exact_limit_is_accepted():
    decoder = FrameDecoder(293)
    assert decoder.feed(encode_frame(b"x" * 293)) == [b"x" * 293]


def test_frames_before_an_oversized_one_are_returned_first():
    decoder = FrameDecoder(293)
    big = encode_frame(b"y" * 500)
    assert decoder.feed(encode_frame(b"header") + big[:10]) == [b"header"]
    decoder.max_frame = 1 << 20  # the handshake completed
    assert decoder.feed(big[10:]) == [b"y" * 500]


def test_oversized_after_a_frame_raises_on_next_call_if_limit_unchanged():
    decoder = FrameDecoder(10)
    assert decoder.feed(encode_frame(b"ok") + encode_frame(b"z" * 11)) == [b"ok"]
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"")


def test_raising_max_frame_then_feed_empty_drains_buffer():
    decoder = FrameDecoder(10)
    assert decoder.feed(encode_frame(b"ok") + encode_frame(b"z" * 11)) == [b"ok"]
    decoder.max_frame = 100
    assert decoder.feed(b"") == [b"z" * 11]


def test_next_payload_one_at_a_time():
    decoder = FrameDecoder(10)
    decoder.append(encode_frame(b"a") + encode_frame(b"b" * 20))
    assert decoder.next_payload() == b"a"
    decoder.max_frame = 100
    assert decoder.next_payload() == b"b" * 20
    assert decoder.next_payload() is None


def test_large_frame_fed_in_small_chunks():
    payload = bytes(range(256)) * 4096  # 1 MiB
    stream = encode_frame(payload)
    decoder = FrameDecoder(1 << 20)
    out = []
    for i in range(0, len(stream), 1000):
        out += decoder.feed(stream[i : i + 1000])
    assert out == [payload]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=50), max_size=10))
def test_random_bytes_only_raise_protocol_error(chunks):
    decoder = FrameDecoder(293)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
    except ProtocolError:
        pass
