"""shared/vectors, byte for byte."""

import json
from pathlib import Path

import pytest

from simzmq.wire import messages as M
from simzmq.wire.codec import BIN, CODECS, MSGPACK
from simzmq.wire.errors import ChannelError, ProtocolError
from simzmq.wire.handshake import (
    ClientHandshake,
    GateHandshake,
    Receiver,
    derive_keys,
    public_key,
)

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors"
CODEC_VECTORS = json.loads((VECTORS / "codec.json").read_text())
GROUP_VECTORS = json.loads((VECTORS / "codec-groups.json").read_text())
HS = json.loads((VECTORS / "handshake.json").read_text())
MESSAGE_VECTORS = CODEC_VECTORS["messages"] + GROUP_VECTORS["messages"]
MALFORMED_VECTORS = CODEC_VECTORS["malformed"] + GROUP_VECTORS["malformed"]


def hx(name: str) -> bytes:
    return bytes.fromhex(HS[name])


def value(spec, raw):
    """One field's value from the vector's JSON (bytes as {"hex": ...})."""
    if spec.kind == "list":
        return [value(spec.item, item) for item in raw]
    if spec.kind == "struct":
        return build(spec.struct, raw)
    if spec.kind == "bytes":
        return bytes.fromhex(raw["hex"])
    assert type(raw) is {"str": str, "bool": bool}.get(spec.kind, int)
    return raw


def build(cls, fields):
    """A message or struct from the vector's JSON fields."""
    assert set(fields) == {s.name for s in M.field_specs(cls)}
    return cls(**{spec.name: value(spec, fields[spec.name]) for spec in M.field_specs(cls)})


def test_vectors_cover_every_client_message():
    assert {m["type"] for m in CODEC_VECTORS["messages"]} == set(range(1, 20))
    assert {m["type"] for m in GROUP_VECTORS["messages"]} - {M.NewMsg.TYPE} == set(range(20, 32))
    assert set(range(20, 32)) == M.PROTOCOL_1_1_TYPES
    assert {t for t in M.MESSAGES if t < 128} == set(range(1, 32))


@pytest.mark.parametrize("vector", MESSAGE_VECTORS, ids=lambda v: f"{v['type']}-{v['name']}")
@pytest.mark.parametrize("codec_name", ["bin", "msgpack"])
def test_message_vector(vector, codec_name):
    codec = BIN if codec_name == "bin" else MSGPACK
    cls = M.MESSAGES[vector["type"]]
    assert cls.__name__ == vector["name"]
    msg = build(cls, vector["fields"])
    expected = bytes.fromhex(vector[codec_name])
    assert codec.encode(msg, vector["ref"]) == expected
    assert codec.decode(expected) == (vector["ref"], msg)


@pytest.mark.parametrize("vector", MALFORMED_VECTORS, ids=lambda v: v["why"])
def test_malformed_vector(vector):
    codec = CODECS[1 if vector["codec"] == "bin" else 2]
    payload = bytes.fromhex(vector["payload"])
    with pytest.raises(ProtocolError) as info:
        codec.decode(payload)
    assert info.value.code == 1
    assert info.value.ref == int.from_bytes(payload[1:5], "big")


@pytest.mark.parametrize("vector", GROUP_VECTORS["group_events"], ids=lambda v: v["why"])
def test_group_event_vector(vector):
    event = build(M.GroupEvent, vector["fields"])
    body = bytes.fromhex(vector["bin"])
    assert BIN.encode_struct(event) == body
    assert BIN.decode_struct(M.GroupEvent, body) == event
    assert event.op in set(M.GroupOp)


@pytest.mark.parametrize("vector", GROUP_VECTORS["group_events_malformed"], ids=lambda v: v["why"])
def test_malformed_group_event_vector(vector):
    with pytest.raises(ProtocolError) as info:
        BIN.decode_struct(M.GroupEvent, bytes.fromhex(vector["bin"]))
    assert info.value.code == 1


def test_group_event_as_it_arrives():
    """The NewMsg vector carries the 'created' event as the body of a kind-255 entry."""
    (vector,) = [v for v in GROUP_VECTORS["messages"] if v["name"] == "NewMsg"]
    for codec in (BIN, MSGPACK):
        _, push = codec.decode(bytes.fromhex(vector[codec.name]))
        assert push.msg.kind == M.GROUP_EVENT_KIND and push.msg.cmid == b"" and push.msg.to.startswith("#")
        event = BIN.decode_struct(M.GroupEvent, push.msg.body)
        assert event == build(M.GroupEvent, GROUP_VECTORS["group_events"][0]["fields"])
        assert event.actor == push.msg.sender


def test_public_keys_from_secrets():
    assert public_key(hx("client_eph_sk")) == hx("client_eph_pk")
    assert public_key(hx("gate_eph_sk")) == hx("gate_eph_pk")
    assert public_key(hx("gate_static_sk")) == hx("gate_static_pk")


def test_hello_and_welcome():
    client = ClientHandshake(hx("gate_static_pk"), codecs=(1, 2), eph_sk=hx("client_eph_sk"))
    assert client.hello() == hx("hello")
    gate = GateHandshake(hx("gate_static_sk"), codecs=(1, 2), eph_sk=hx("gate_eph_sk"))
    welcome = gate.receive_hello(hx("hello"))
    assert welcome[:38] == hx("welcome_prefix")
    assert len(welcome) == 62
    assert gate.codec_id == 1
    assert hx("welcome_prefix") + hx("s2c_header") == hx("welcome")


def test_key_derivation():
    assert derive_keys(
        hx("ee"), hx("es"), hx("gate_static_pk"), hx("hello"), hx("welcome_prefix")
    ) == (hx("c2s_key"), hx("s2c_key"))


def test_client_decrypts_gate_frames_from_vector_welcome():
    client = ClientHandshake(hx("gate_static_pk"), codecs=(1, 2), eph_sk=hx("client_eph_sk"))
    client.hello()
    client.receive_welcome(hx("welcome"))
    assert client.codec_id == 1
    for frame in HS["gate_frames"]:
        plaintext, final = client.receiver.open(bytes.fromhex(frame["ciphertext"]))
        assert plaintext.hex() == frame["plaintext"]
        assert final == (frame["tag"] == 3)
    # The gate's first frame is Ready, in bin.
    ref, ready = BIN.decode(bytes.fromhex(HS["gate_frames"][0]["plaintext"]))
    assert ref == 0 and isinstance(ready, M.Ready)


def test_gate_decrypts_client_frames():
    gate = GateHandshake(hx("gate_static_sk"), eph_sk=hx("gate_eph_sk"))
    gate.receive_hello(hx("hello"))
    receiver = gate.receive_c2s_header(hx("c2s_header"))
    for frame in HS["client_frames"]:
        plaintext, final = receiver.open(bytes.fromhex(frame["ciphertext"]))
        assert plaintext.hex() == frame["plaintext"]
        assert final == (frame["tag"] == 3)


def test_tampered_frame_rejected():
    receiver = Receiver(hx("s2c_key"), hx("s2c_header"))
    with pytest.raises(ChannelError):
        receiver.open(hx("tampered_gate_frame"))
    # The stream is dead afterwards, even for the genuine frame.
    with pytest.raises(ChannelError):
        receiver.open(bytes.fromhex(HS["gate_frames"][0]["ciphertext"]))


def test_frame_after_final_rejected():
    receiver = Receiver(hx("s2c_key"), hx("s2c_header"))
    for frame in HS["gate_frames"]:
        receiver.open(bytes.fromhex(frame["ciphertext"]))
    with pytest.raises(ChannelError):
        receiver.open(bytes.fromhex(HS["gate_frames"][0]["ciphertext"]))
