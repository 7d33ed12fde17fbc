"""Handshake and encrypted channel (protocol.md section 2), without I/O.

``ClientHandshake`` and ``GateHandshake`` turn the handshake's plaintext
frames into keys; ``Sender`` and ``Receiver`` wrap libsodium's
crypto_secretstream_xchacha20poly1305 for the frames that follow.
"""

from __future__ import annotations

import hashlib
import os
import struct

import nacl.exceptions
from nacl import bindings as sodium

from .errors import ChannelError, HandshakeError

HELLO_MAGIC = b"SIMZ"
VERSION = 1
# The largest plaintext handshake frame: a HELLO offering 255 codecs.
MAX_HANDSHAKE_FRAME = 293
KEY_SIZE = 32
HEADER_SIZE = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES  # 24
OVERHEAD = sodium.crypto_secretstream_xchacha20poly1305_ABYTES  # 17
WELCOME_PREFIX_SIZE = 38  # magic, version, codec id, E_pk
WELCOME_SIZE = WELCOME_PREFIX_SIZE + HEADER_SIZE  # 62
HELLO_FIXED_SIZE = 38  # magic, version, n, C_pk (plus n codec ids)

TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL

_PERSON = b"simzmq-v1"
_ZERO_KEY = bytes(KEY_SIZE)
_VERSION_BYTE = struct.pack("B", VERSION)


def _check_key(name: str, key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
        raise HandshakeError(f"{name} must be {KEY_SIZE} bytes")
    return bytes(key)


def public_key(secret_key: bytes) -> bytes:
    """The X25519 public key of a 32-byte secret key."""
    return sodium.crypto_scalarmult_base(_check_key("secret key", secret_key))


def _x25519(secret_key: bytes, peer_pk: bytes) -> bytes:
    try:
        shared = sodium.crypto_scalarmult(secret_key, peer_pk)
    except nacl.exceptions.CryptoError as exc:  # libsodium refuses an all-zero result
        raise HandshakeError("small-order public key") from exc
    if shared == _ZERO_KEY:
        raise HandshakeError("small-order public key")
    return shared


def derive_keys(
    ee: bytes, es: bytes, gate_static_pk: bytes, hello: bytes, welcome_prefix: bytes
) -> tuple[bytes, bytes]:
    """``(c2s_key, s2c_key)`` from the shared secrets and the handshake transcript."""
    if ee == _ZERO_KEY or es == _ZERO_KEY:
        raise HandshakeError("small-order public key")
    okm = hashlib.blake2b(
        ee + es + gate_static_pk + hello + welcome_prefix, digest_size=64, person=_PERSON
    ).digest()
    return okm[:32], okm[32:]


class Sender:
    """One direction's encrypting half of the secretstream; ``header`` goes to the peer."""

    __slots__ = ("header", "_state", "_closed")

    def __init__(self, key: bytes) -> None:
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self.header: bytes = sodium.crypto_secretstream_xchacha20poly1305_init_push(
            self._state, _check_key("key", key)
        )
        self._closed = False

    def seal(self, plaintext: bytes, final: bool = False) -> bytes:
        """Encrypt one frame payload; ``final`` marks the last one before a clean close."""
        if self._closed:
            raise ChannelError("frame after TAG_FINAL")
        if final:
            self._closed = True
        return sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, plaintext, None, TAG_FINAL if final else TAG_MESSAGE
        )


class Receiver:
    """One direction's decrypting half; any failure leaves it permanently broken."""

    __slots__ = ("_state", "_done")

    def __init__(self, key: bytes, header: bytes) -> None:
        key = _check_key("key", key)
        if not isinstance(header, (bytes, bytearray)) or len(header) != HEADER_SIZE:
            raise HandshakeError(f"stream header must be {HEADER_SIZE} bytes")
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(
                self._state, bytes(header), key
            )
        except nacl.exceptions.CryptoError as exc:
            raise HandshakeError("bad stream header") from exc
        self._done: str | None = None  # why no more frames are accepted

    def open(self, ciphertext: bytes) -> tuple[bytes, bool]:
        """``(plaintext, final)`` of one frame payload, else ChannelError."""
        if self._done is not None:
            raise ChannelError(self._done)
        if len(ciphertext) < OVERHEAD:
            self._done = "channel broken by a short frame"
            raise ChannelError("frame shorter than the secretstream overhead")
        try:
            plaintext, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                self._state, bytes(ciphertext), None
            )
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            self._done = "channel broken by a frame that failed to decrypt"
            raise ChannelError("frame failed to decrypt") from exc
        if tag == TAG_FINAL:
            self._done = "frame after TAG_FINAL"
            return plaintext, True
        if tag != TAG_MESSAGE:
            self._done = f"channel broken by tag {tag}"
            raise ChannelError(f"unexpected secretstream tag {tag}")
        return plaintext, False


class GateHandshake:
    """The gate's side: HELLO in, WELCOME out, then the client's c2s_header."""

    def __init__(self, static_sk: bytes, codecs=(1, 2), eph_sk: bytes | None = None) -> None:
        self._static_sk = _check_key("static_sk", static_sk)
        self.static_pk = public_key(self._static_sk)
        self._codecs = tuple(codecs)
        self._eph_sk = _check_key("eph_sk", eph_sk) if eph_sk is not None else os.urandom(KEY_SIZE)
        self.codec_id: int | None = None
        self.sender: Sender | None = None
        self._c2s_key: bytes | None = None

    def receive_hello(self, hello: bytes) -> bytes:
        """Check HELLO and return the full WELCOME payload to send."""
        if self._c2s_key is not None:
            raise HandshakeError("second HELLO")
        hello = bytes(hello)
        if not HELLO_FIXED_SIZE < len(hello) <= MAX_HANDSHAKE_FRAME:
            raise HandshakeError(f"HELLO of {len(hello)} bytes")
        if hello[:4] != HELLO_MAGIC:
            raise HandshakeError("HELLO magic is not SIMZ")
        if hello[4] != VERSION:
            raise HandshakeError(f"unsupported version {hello[4]}")
        count = hello[5]
        if count == 0 or len(hello) != HELLO_FIXED_SIZE + count:
            raise HandshakeError("HELLO codec count does not match its length")
        offered = hello[6 : 6 + count]
        chosen = next((c for c in offered if c in self._codecs), None)
        if chosen is None:
            raise HandshakeError("no common codec")
        client_pk = hello[6 + count :]
        ee = _x25519(self._eph_sk, client_pk)
        es = _x25519(self._static_sk, client_pk)
        prefix = HELLO_MAGIC + _VERSION_BYTE + bytes((chosen,)) + public_key(self._eph_sk)
        c2s_key, s2c_key = derive_keys(ee, es, self.static_pk, hello, prefix)
        self.codec_id = chosen
        self.sender = Sender(s2c_key)
        self._c2s_key = c2s_key
        return prefix + self.sender.header

    def receive_c2s_header(self, header: bytes) -> Receiver:
        """The Receiver for the client's frames; the handshake is then complete."""
        if self._c2s_key is None:
            raise HandshakeError("c2s_header before HELLO")
        if len(header) != HEADER_SIZE:
            raise HandshakeError(f"c2s_header of {len(header)} bytes")
        return Receiver(self._c2s_key, header)


class ClientHandshake:
    """The client's side: HELLO out, WELCOME in; ``sender.header`` is the c2s_header."""

    def __init__(self, gate_static_pk: bytes, codecs=(1, 2), eph_sk: bytes | None = None) -> None:
        self._gate_pk = _check_key("gate_static_pk", gate_static_pk)
        codecs = tuple(codecs)
        if not 1 <= len(codecs) <= 255 or not all(
            isinstance(c, int) and 0 <= c <= 255 for c in codecs
        ):
            raise HandshakeError("codecs must be 1-255 ids of 0-255")
        self._codecs = codecs
        self._eph_sk = _check_key("eph_sk", eph_sk) if eph_sk is not None else os.urandom(KEY_SIZE)
        self._hello = (
            HELLO_MAGIC
            + _VERSION_BYTE
            + bytes((len(codecs),))
            + bytes(codecs)
            + public_key(self._eph_sk)
        )
        self.codec_id: int | None = None
        self.receiver: Receiver | None = None
        self.sender: Sender | None = None

    def hello(self) -> bytes:
        return self._hello

    def receive_welcome(self, welcome: bytes) -> None:
        if self.receiver is not None:
            raise HandshakeError("second WELCOME")
        welcome = bytes(welcome)
        if len(welcome) != WELCOME_SIZE:
            raise HandshakeError(f"WELCOME of {len(welcome)} bytes")
        if welcome[:4] != HELLO_MAGIC:
            raise HandshakeError("WELCOME magic is not SIMZ")
        if welcome[4] != VERSION:
            raise HandshakeError(f"unsupported version {welcome[4]}")
        if welcome[5] not in self._codecs:
            raise HandshakeError(f"gate chose codec {welcome[5]}, which was not offered")
        gate_eph_pk = welcome[6:WELCOME_PREFIX_SIZE]
        ee = _x25519(self._eph_sk, gate_eph_pk)
        es = _x25519(self._eph_sk, self._gate_pk)
        c2s_key, s2c_key = derive_keys(
            ee, es, self._gate_pk, self._hello, welcome[:WELCOME_PREFIX_SIZE]
        )
        self.receiver = Receiver(s2c_key, welcome[WELCOME_PREFIX_SIZE:])
        self.sender = Sender(c2s_key)
        self.codec_id = welcome[5]
