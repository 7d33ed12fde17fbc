"""TCP framing (protocol.md section 1): ``u32 length (big-endian) | payload``."""

from __future__ import annotations

import struct

from .errors import FrameTooLarge

_LENGTH = struct.Struct(">I")
LENGTH_SIZE = _LENGTH.size


def encode_frame(payload: bytes) -> bytes:
    """The payload with its u32 length prefix."""
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into frame payloads.

    ``max_frame`` bounds every payload and may be changed between calls (the
    gate uses 293 until the handshake completes). A length above it raises
    ``FrameTooLarge`` without waiting for, or buffering, its payload; the
    decoder stays broken afterwards, because the stream can no longer be
    trusted.

    ``feed`` returns every complete payload. If frames before an oversized
    prefix completed in the same call, they are returned first and the error
    is raised by the next call, after the caller has had the chance to raise
    ``max_frame`` (the handshake's last plaintext frame may share a TCP segment
    with the first large encrypted one). So: after changing ``max_frame``, call
    ``feed(b"")`` to parse what is already buffered. ``append`` plus
    ``next_payload`` parse one frame at a time instead.
    """

    __slots__ = ("max_frame", "_buf", "_broken")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._broken: str | None = None  # the reason, once a frame was too large

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a payload."""
        return len(self._buf)

    def append(self, data: bytes) -> None:
        if self._broken is not None:
            raise FrameTooLarge(self._broken)
        self._buf += data

    def next_payload(self) -> bytes | None:
        """The next complete payload, or None if more bytes are needed."""
        if self._broken is not None:
            raise FrameTooLarge(self._broken)
        buf = self._buf
        if len(buf) < LENGTH_SIZE:
            return None
        (length,) = _LENGTH.unpack_from(buf, 0)
        if length > self.max_frame:
            self._fail(length)
        end = LENGTH_SIZE + length
        if len(buf) < end:
            return None
        payload = bytes(buf[LENGTH_SIZE:end])
        del buf[:end]
        return payload

    def feed(self, data: bytes) -> list[bytes]:
        if self._broken is not None:
            raise FrameTooLarge(self._broken)
        buf = self._buf
        buf += data
        payloads: list[bytes] = []
        off = 0
        size = len(buf)
        max_frame = self.max_frame
        unpack = _LENGTH.unpack_from
        while size - off >= LENGTH_SIZE:
            (length,) = unpack(buf, off)
            if length > max_frame:
                if payloads:
                    break  # hand these over first; the next call raises
                del buf[:off]
                self._fail(length)
            end = off + LENGTH_SIZE + length
            if end > size:
                break
            payloads.append(bytes(buf[off + LENGTH_SIZE : end]))
            off = end
        if off:
            del buf[:off]
        return payloads

    def _fail(self, length: int) -> None:
        self._buf = bytearray()
        self._broken = f"frame of {length} bytes over the limit of {self.max_frame}"
        raise FrameTooLarge(self._broken)
