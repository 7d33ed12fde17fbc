"""Handshake and channel, both sides joined in memory."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simzmq.wire.errors import ChannelError, HandshakeError, ProtocolError
from simzmq.wire.handshake import (
    MAX_HANDSHAKE_FRAME,
    ClientHandshake,
    GateHandshake,
    Receiver,
    Sender,
    public_key,
)

GATE_SK = bytes(range(1, 33))
GATE_PK = public_key(GATE_SK)


def joined(client_codecs=(1, 2), gate_codecs=(1, 2)):
    """(client, gate handshake, gate's receiver) after a complete handshake."""
    client = ClientHandshake(GATE_PK, codecs=client_codecs)
    gate = GateHandshake(GATE_SK, codecs=gate_codecs)
    welcome = gate.receive_hello(client.hello())
    client.receive_welcome(welcome)
    receiver = gate.receive_c2s_header(client.sender.header)
    return client, gate, receiver


def test_both_directions():
    client, gate, gate_receiver = joined()
    assert client.codec_id == gate.codec_id == 1
    for i in range(3):
        text = b"from gate %d" % i
        assert client.receiver.open(gate.sender.seal(text)) == (text, False)
        text = b"from client %d" % i
        assert gate_receiver.open(client.sender.seal(text)) == (text, False)
    assert client.receiver.open(gate.sender.seal(b"bye", final=True)) == (b"bye", True)
    with pytest.raises(ChannelError):
        gate.sender.seal(b"more")


def test_codec_choice_follows_client_preference():
    client, gate, _ = joined(client_codecs=(2, 1), gate_codecs=(1, 2))
    assert gate.codec_id == client.codec_id == 2
    client, gate, _ = joined(client_codecs=(7, 1), gate_codecs=(1, 2))
    assert gate.codec_id == 1


def test_no_common_codec():
    client = ClientHandshake(GATE_PK, codecs=(9,))
    with pytest.raises(HandshakeError):
        GateHandshake(GATE_SK).receive_hello(client.hello())


def test_wrong_gate_key_cannot_read_the_first_frame():
    impostor_sk = os.urandom(32)
    client = ClientHandshake(GATE_PK)
    impostor = GateHandshake(impostor_sk)
    client.receive_welcome(impostor.receive_hello(client.hello()))
    with pytest.raises(ChannelError):
        client.receiver.open(impostor.sender.seal(b"Ready"))


def test_tampered_welcome_codec_breaks_keys():
    client = ClientHandshake(GATE_PK)
    gate = GateHandshake(GATE_SK)
    welcome = bytearray(gate.receive_hello(client.hello()))
    welcome[5] = 2  # a man in the middle switches the codec
    client.receive_welcome(bytes(welcome))
    with pytest.raises(ChannelError):
        client.receiver.open(gate.sender.seal(b"Ready"))


def test_small_order_client_key_rejected():
    hello = b"SIMZ\x01\x01\x01" + bytes(32)
    with pytest.raises(HandshakeError, match="small-order"):
        GateHandshake(GATE_SK).receive_hello(hello)


def test_small_order_gate_ephemeral_rejected():
    client = ClientHandshake(GATE_PK)
    client.hello()
    with pytest.raises(HandshakeError, match="small-order"):
        client.receive_welcome(b"SIMZ\x01\x01" + bytes(32) + bytes(24))


def test_small_order_gate_static_rejected():
    client = ClientHandshake(bytes(32))
    gate = GateHandshake(GATE_SK)
    with pytest.raises(HandshakeError):
        client.receive_welcome(gate.receive_hello(client.hello()))


@pytest.mark.parametrize(
    "hello",
    [
        b"",
        b"SIMZ\x01\x00" + bytes(32),  # n = 0
        b"SIMZ\x01\x02\x01" + os.urandom(32),  # n says 2, one given
        b"SIMZ\x01\x01\x01" + os.urandom(33),  # one byte too many
        b"SIMY\x01\x01\x01" + os.urandom(32),
        b"SIMZ\x02\x01\x01" + os.urandom(32),
        b"SIMZ\x01\xff" + bytes(255) + os.urandom(33),
    ],
)
def test_bad_hello(hello):
    with pytest.raises(HandshakeError):
        GateHandshake(GATE_SK).receive_hello(hello)


def test_largest_hello_fits_the_handshake_limit():
    client = ClientHandshake(GATE_PK, codecs=tuple(range(255)))
    assert len(client.hello()) == MAX_HANDSHAKE_FRAME
    GateHandshake(GATE_SK).receive_hello(client.hello())


def test_bad_welcome():
    client = ClientHandshake(GATE_PK, codecs=(1,))
    good = GateHandshake(GATE_SK).receive_hello(client.hello())
    for bad in (good[:-1], good + b"\x00", b"XIMZ" + good[4:], good[:4] + b"\x02" + good[5:],
                good[:5] + b"\x02" + good[6:]):
        with pytest.raises(HandshakeError):
            ClientHandshake(GATE_PK, codecs=(1,)).receive_welcome(bad)


def test_bad_c2s_header():
    client = ClientHandshake(GATE_PK)
    gate = GateHandshake(GATE_SK)
    with pytest.raises(HandshakeError):
        gate.receive_c2s_header(bytes(24))  # before HELLO
    client.receive_welcome(gate.receive_hello(client.hello()))
    for header in (b"", bytes(23), bytes(25)):
        with pytest.raises(HandshakeError):
            gate.receive_c2s_header(header)


def test_second_hello_rejected():
    client = ClientHandshake(GATE_PK)
    gate = GateHandshake(GATE_SK)
    gate.receive_hello(client.hello())
    with pytest.raises(HandshakeError):
        gate.receive_hello(client.hello())


def test_fresh_ephemeral_keys_per_connection():
    assert ClientHandshake(GATE_PK).hello() != ClientHandshake(GATE_PK).hello()


def test_push_tag_rejected():
    from nacl import bindings as sodium

    key = os.urandom(32)
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    header = sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    frame = sodium.crypto_secretstream_xchacha20poly1305_push(
        state, b"x", None, sodium.crypto_secretstream_xchacha20poly1305_TAG_PUSH
    )
    with pytest.raises(ChannelError):
        Receiver(key, header).open(frame)


def test_reordered_frame_rejected():
    key = os.urandom(32)
    sender = Sender(key)
    first, second = sender.seal(b"1"), sender.seal(b"2")
    with pytest.raises(ChannelError):
        Receiver(key, sender.header).open(second)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_HANDSHAKE_FRAME + 5))
def test_random_hello_only_raises_protocol_error(data):
    try:
        GateHandshake(GATE_SK).receive_hello(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=80), st.binary(min_size=62, max_size=62).map(lambda b: b"SIMZ\x01\x01" + b[6:])))
def test_random_welcome_only_raises_protocol_error(data):
    client = ClientHandshake(GATE_PK)
    try:
        client.receive_welcome(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100))
def test_random_frames_only_raise_channel_error(data):
    client, gate, receiver = joined()
    with pytest.raises(ChannelError):
        receiver.open(data)
