"""A deliberately plain, blocking client for hostile-input tests: it can send
anything at any point of the protocol and read exactly what comes back."""

from __future__ import annotations

import socket
import struct
import time

from simzmq.wire.codec import CODECS
from simzmq.wire.frames import encode_frame
from simzmq.wire.handshake import ClientHandshake
from simzmq.wire.messages import Error, ErrorCode, Ok, Register


class Closed(Exception):
    pass


class RawClient:
    def __init__(self, port: int, gate_pk: bytes | None = None, codec: int = 1, handshake: bool = True,
                 timeout: float = 10.0, source: str | None = None):
        # `source` (127.0.0.2, ...) makes this client come from another address.
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.ref = 0
        self.ready = None
        if handshake:
            hs = ClientHandshake(gate_pk, codecs=(codec,))
            self.send_frame(hs.hello())
            hs.receive_welcome(self.read_frame())
            self.rx, self.tx = hs.receiver, hs.sender
            self.codec = CODECS[hs.codec_id]
            plaintext, _ = self.rx.open(self.read_frame())
            _, self.ready = self.codec.decode(plaintext)
            self.send_frame(self.tx.header)

    def close(self):
        self.sock.close()

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, payload: bytes) -> None:
        self.sock.sendall(encode_frame(payload))

    def send_plaintext(self, plaintext: bytes, final: bool = False) -> None:
        self.send_frame(self.tx.seal(plaintext, final))

    def send(self, msg) -> int:
        self.ref += 1
        self.send_plaintext(self.codec.encode(msg, self.ref))
        return self.ref

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise Closed()
            buf += chunk
        return buf

    def read_frame(self) -> bytes:
        (n,) = struct.unpack(">I", self._read(4))
        return self._read(n)

    def recv(self):
        """(ref, message, final) of the next frame from the gate."""
        plaintext, final = self.rx.open(self.read_frame())
        ref, msg = self.codec.decode(plaintext)
        return ref, msg, final

    def request(self, msg):
        """Send and return the reply with the same ref; what comes before it
        (pushes) goes to skipped()."""
        ref = self.send(msg)
        while True:
            got_ref, reply, _ = self.recv()
            if got_ref == ref:
                return reply
            self.skipped(reply)

    def served(self, msg, within: float = 60.0):
        """request(), asked again while the gate answers ``unavailable`` (the
        back end did not answer within the gate's request timeout, as happens
        on a loaded machine), for up to ``within`` seconds. For requests that
        may be repeated: Register with the same password, Login, Sync, a Send
        with the same cmid."""
        deadline = time.monotonic() + within
        while True:
            reply = self.request(msg)
            if not (type(reply) is Error and reply.code == ErrorCode.UNAVAILABLE) or time.monotonic() > deadline:
                return reply
            time.sleep(0.5)

    def registered(self, user: str, password: str) -> bool:
        """Register a new account; True once it exists. After an
        ``unavailable`` the Register is asked again (served()), and a retry of
        one that did take effect answers ``exists`` (protocol.md, Register: a
        client relies on neither answer): that counts as registered; the
        password Login that follows proves the account is the caller's."""
        msg = Register(user=user, password=password)
        reply = self.request(msg)
        if type(reply) is Error and reply.code == ErrorCode.UNAVAILABLE:
            reply = self.served(msg)
            return type(reply) is Ok or (type(reply) is Error and reply.code == ErrorCode.EXISTS)
        return type(reply) is Ok

    def skipped(self, msg) -> None:
        """A message request() read past; dropped unless a subclass keeps it."""

    def closed_without_data(self) -> bool:
        """True if the gate closes the connection without sending anything more."""
        try:
            data = self.sock.recv(1)
        except ConnectionResetError:
            return True
        return data == b""
