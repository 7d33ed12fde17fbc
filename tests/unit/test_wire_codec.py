"""Codecs derived from the declarations: round trips, strictness, hostile bytes."""

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simzmq.wire import messages as M
from simzmq.wire.codec import BIN, CODECS, MSGPACK, peek_header
from simzmq.wire.errors import ProtocolError, ShortPayload
from tests.strategies import ANY_MESSAGE, SECTION_7_CLASSES, instances


@pytest.mark.parametrize("codec", [BIN, MSGPACK], ids=lambda c: c.name)
@settings(max_examples=300, deadline=None)
@given(msg=ANY_MESSAGE, ref=st.integers(0, 2**32 - 1))
def test_round_trip(codec, msg, ref):
    payload = codec.encode(msg, ref)
    assert peek_header(payload) == (msg.TYPE, ref)
    assert codec.decode(payload) == (ref, msg)


@pytest.mark.parametrize("cls", SECTION_7_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data(), ref=st.integers(0, 2**32 - 1))
def test_section_7_round_trips(cls, data, ref):
    msg = data.draw(instances(cls))
    for codec in CODECS.values():
        assert codec.decode(codec.encode(msg, ref)) == (ref, msg)


@pytest.mark.parametrize("cls", M.STRUCTS, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_struct_bodies_round_trip(cls, data):
    value = data.draw(instances(cls))
    for codec in CODECS.values():
        assert codec.decode_struct(cls, codec.encode_struct(value)) == value


@settings(max_examples=300, deadline=None)
@given(event=instances(M.GroupEvent), data=st.data())
def test_hostile_group_event_bodies_only_raise_protocol_error(event, data):
    """A kind-255 body from the store or a peer: a GroupEvent or bad_request, nothing else."""
    body = bytearray(BIN.encode_struct(event))
    if body:
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    body = bytes(body[:data.draw(st.integers(0, len(body)))]) + data.draw(st.binary(max_size=4))
    try:
        got = BIN.decode_struct(M.GroupEvent, body)
    except ProtocolError as exc:
        assert exc.code == 1
        return
    assert BIN.encode_struct(got) == body


def test_struct_bodies_refuse_what_is_not_a_struct():
    with pytest.raises(ProtocolError):
        BIN.encode_struct(M.Ok())
    with pytest.raises(ProtocolError):
        BIN.decode_struct(M.Ok, b"")
    with pytest.raises(ProtocolError):
        BIN.encode_struct(M.GroupEvent(users=[1]))
    with pytest.raises(ProtocolError):
        BIN.encode_struct(M.GroupEvent(users="ab"))


def test_list_of_str_in_bin_and_msgpack():
    msg = M.Watch(users=["bob", "", "é"])
    assert BIN.encode(msg, 1)[5:] == b"\x00\x00\x00\x03" + b"\x00\x00\x00\x03bob" + b"\x00" * 4 + b"\x00\x00\x00\x02\xc3\xa9"
    assert MSGPACK.encode(msg, 1)[5:] == msgpack.packb({"users": ["bob", "", "é"]})
    for bad in ({"users": ["bob", b"x"]}, {"users": ["bob", None]}, {"users": "bob"}, {"users": [["bob"]]}):
        with pytest.raises(ProtocolError):
            MSGPACK.decode(mp_payload(M.Watch.TYPE, msgpack.packb(bad, use_bin_type=True)))
    # Invalid UTF-8 in an item.
    with pytest.raises(ProtocolError):
        BIN.decode(b"\x1a\x00\x00\x00\x01" + b"\x00\x00\x00\x01" + b"\x00\x00\x00\x01\xff")


@pytest.mark.parametrize("cls", list(M.MESSAGES.values()), ids=lambda c: c.__name__)
def test_every_type_round_trips_with_defaults(cls):
    for codec in CODECS.values():
        assert codec.decode(codec.encode(cls(), 7)) == (7, cls())


@pytest.mark.parametrize("codec", [BIN, MSGPACK], ids=lambda c: c.name)
@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_only_raise_protocol_error(codec, data):
    try:
        codec.decode(data)
    except ProtocolError:
        pass


@pytest.mark.parametrize("codec", [BIN, MSGPACK], ids=lambda c: c.name)
@settings(max_examples=300, deadline=None)
@given(msg=ANY_MESSAGE, data=st.data())
def test_mutated_payloads_only_raise_protocol_error(codec, msg, data):
    payload = bytearray(codec.encode(msg, 1))
    position = data.draw(st.integers(0, len(payload) - 1))
    payload[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    try:
        codec.decode(bytes(payload[:cut]))
    except ProtocolError:
        pass


@pytest.mark.parametrize("codec", [BIN, MSGPACK], ids=lambda c: c.name)
def test_short_payload(codec):
    for n in range(5):
        with pytest.raises(ShortPayload):
            codec.decode(b"\x0c" * n)
    with pytest.raises(ShortPayload):
        peek_header(b"\x01\x00")


@pytest.mark.parametrize("codec", [BIN, MSGPACK], ids=lambda c: c.name)
@pytest.mark.parametrize("type_id", [0, 32, 63, 64, 127, 133, 255])
def test_unknown_type_is_bad_request_with_ref(codec, type_id):
    with pytest.raises(ProtocolError) as info:
        codec.decode(bytes([type_id]) + b"\x00\x00\x01\x02" + b"\x80")
    assert info.value.code == 1
    assert info.value.ref == 0x0102
    assert type(info.value) is ProtocolError


def test_empty_message_encodings():
    assert BIN.encode(M.Ok(), 1) == b"\x0a\x00\x00\x00\x01"
    assert MSGPACK.encode(M.Ok(), 1) == b"\x0a\x00\x00\x00\x01\x80"


def test_bin_rejects_trailing_and_short():
    good = BIN.encode(M.Ping(ts_ms=5), 3)
    for bad in (good + b"\x00", good[:-1]):
        with pytest.raises(ProtocolError) as info:
            BIN.decode(bad)
        assert info.value.ref == 3


def mp_payload(type_id: int, body: bytes, ref: int = 1) -> bytes:
    return struct.pack(">BI", type_id, ref) + body


def test_msgpack_accepts_any_key_order_and_ignores_unknown_keys():
    body = msgpack.packb({"extra": [1, 2.5, None], "msg_id": 9, "peer": "bob"})
    assert MSGPACK.decode(mp_payload(9, body)) == (1, M.Read(peer="bob", msg_id=9))


READ = 9
KICK = 18


@pytest.mark.parametrize(
    "why, type_id, body",
    [
        ("not a map", READ, msgpack.packb(["bob", 9])),
        ("bool for int", READ, msgpack.packb({"peer": "bob", "msg_id": True})),
        ("u16 out of range", KICK, msgpack.packb({"code": 70000, "reason": "x"})),
        ("bin for str", READ, msgpack.packb({"peer": b"bob", "msg_id": 1}, use_bin_type=True)),
        ("invalid utf-8", READ, b"\x82\xa4peer\xa3\xff\xfe\xfd\xa6msg_id\x01"),
        ("truncated", READ, msgpack.packb({"peer": "bob", "msg_id": 1})[:-1]),
        ("empty body", READ, b""),
        ("ext type", READ, msgpack.packb({"peer": "bob", "msg_id": msgpack.ExtType(1, b"x")})),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_msgpack_strictness(why, type_id, body):
    with pytest.raises(ProtocolError):
        MSGPACK.decode(mp_payload(type_id, body))


def test_msgpack_bool_must_be_bool():
    body = msgpack.packb({"msgs": [], "more": 1})
    with pytest.raises(ProtocolError):
        MSGPACK.decode(mp_payload(7, body))


def test_msgpack_nested_struct_checked():
    body = msgpack.packb({"msg": {"msg_id": 1}})
    with pytest.raises(ProtocolError, match="missing field"):
        MSGPACK.decode(mp_payload(8, body))


def test_msgpack_shortest_integer_forms():
    payload = MSGPACK.encode(M.Ping(ts_ms=0x7F), 0)
    assert payload[5:] == b"\x81\xa5ts_ms\x7f"
    payload = MSGPACK.encode(M.Ping(ts_ms=0x100), 0)
    assert payload[5:] == b"\x81\xa5ts_ms\xcd\x01\x00"


@pytest.mark.parametrize("codec", [BIN, MSGPACK], ids=lambda c: c.name)
@pytest.mark.parametrize(
    "msg",
    [
        M.Ping(ts_ms=-1),
        M.Ping(ts_ms=2**64),
        M.Ping(ts_ms="1"),
        M.Error(code=70000),
        M.Send(to=b"bob"),
        M.Send(cmid="abc"),
        M.Batch(more=1),
        M.Batch(msgs=[M.Conv()]),
        M.Batch(msgs="no"),
        M.NewMsg(msg=None),
        M.Read(peer="\ud800"),
    ],
)
def test_encode_rejects_values_outside_their_kinds(codec, msg):
    with pytest.raises(ProtocolError):
        codec.encode(msg, 1)


@pytest.mark.parametrize("codec", [BIN, MSGPACK], ids=lambda c: c.name)
def test_encode_rejects_non_messages(codec):
    with pytest.raises(ProtocolError):
        codec.encode(M.Msg(), 1)
    with pytest.raises(ProtocolError):
        codec.encode(object(), 1)


def test_int_enums_encode_as_ints():
    msg = M.Kick(code=M.KickCode.REPLACED, reason="x")
    for codec in CODECS.values():
        assert codec.decode(codec.encode(msg, 0))[1] == M.Kick(code=2, reason="x")


def test_codec_registry():
    assert CODECS[1] is BIN and BIN.name == "bin"
    assert CODECS[2] is MSGPACK and MSGPACK.name == "msgpack"


def test_bin_hostile_list_count_rejected_without_allocating():
    payload = struct.pack(">BII", 7, 1, 0xFFFFFFFF) + b"\x00" * 50
    with pytest.raises(ProtocolError, match="count past end"):
        BIN.decode(payload)


def test_bin_newmsg_seq_helpers_match_the_codec():
    from simzmq.wire.codec import BIN, bin_newmsg_seq, bin_newmsg_with_seq
    from simzmq.wire.errors import ProtocolError
    from simzmq.wire.messages import Msg, NewMsg, Ok

    msg = NewMsg(msg=Msg(msg_id=7, seq=3, sender="ann", to="bob", kind=0, ts_ms=5, cmid=b"c", body=b"hi"))
    payload = BIN.encode(msg, 0)
    assert bin_newmsg_seq(payload) == 3
    other = bin_newmsg_with_seq(payload, 2**40 + 9)
    assert BIN.decode(other) == (0, NewMsg(msg=Msg(msg_id=7, seq=2**40 + 9, sender="ann", to="bob", kind=0,
                                                   ts_ms=5, cmid=b"c", body=b"hi")))
    for bad in (b"", BIN.encode(Ok(), 0), payload[:20]):
        with pytest.raises(ProtocolError):
            bin_newmsg_seq(bad)
        with pytest.raises(ProtocolError):
            bin_newmsg_with_seq(bad, 1)
