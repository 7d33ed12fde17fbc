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
HS = json.loads((VECTORS / "handshake.json").read_text())


def hx(name: str) -> bytes:
    return bytes.fromhex(HS[name])


def build(cls, fields):
    """A message or struct from the vector's JSON fields (bytes as {"hex": ...})."""
    values = {}
    for spec in M.field_specs(cls):
        raw = fields[spec.name]
        if spec.kind == "list":
            values[spec.name] = [build(spec.struct, item) for item in raw]
        elif spec.kind == "struct":
            values[spec.name] = build(spec.struct, raw)
        elif spec.kind == "bytes":
            values[spec.name] = bytes.fromhex(raw["hex"])
        else:
            values[spec.name] = raw
    assert set(fields) == {s.name for s in M.field_specs(cls)}
    return cls(**values)


def test_vectors_cover_every_client_message():
    assert {m["type"] for m in CODEC_VECTORS["messages"]} == set(range(1, 20))


@pytest.mark.parametrize("vector", CODEC_VECTORS["messages"], ids=lambda v: v["name"])
@pytest.mark.parametrize("codec_name", ["bin", "msgpack"])
def test_message_vector(vector, codec_name):
    codec = BIN if codec_name == "bin" else MSGPACK
    cls = M.MESSAGES[vector["type"]]
    assert cls.__name__ == vector["name"]
    msg = build(cls, vector["fields"])
    expected = bytes.fromhex(vector[codec_name])
    assert codec.encode(msg, vector["ref"]) == expected
    assert codec.decode(expected) == (vector["ref"], msg)


@pytest.mark.parametrize("vector", CODEC_VECTORS["malformed"], ids=lambda v: v["why"])
def test_malformed_vector(vector):
    codec = CODECS[1 if vector["codec"] == "bin" else 2]
    payload = bytes.fromhex(vector["payload"])
    with pytest.raises(ProtocolError) as info:
        codec.decode(payload)
    assert info.value.code == 1
    assert info.value.ref == int.from_bytes(payload[1:5], "big")


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
