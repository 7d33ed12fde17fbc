"""The `im` service's frames inside MDP and the notifications' frames. Pure.

Every ZeroMQ frame costs a send and a receive on each hop, so what travels
together is packed into one frame (docs/internal-protocol.md):

    request body:   key | corr(8) origin_len(1) origin payload
                    (payload = type(1) budget_ms(4) body: the bin header's ref
                    carries the gate's remaining time budget, 0 for none)
    reply body:     corr(8) payload
    notification:   topic | origin_len(1) origin payload           (worker → broker)
                    topic | epoch(8) seq(8) | origin_len(1) origin payload   (broker → gate)
    packed notifications, one message per (commit, topic group):
                    group | (user_len(1) user origin_len(1) origin payload_len(4) payload)…

`key` stays a frame of its own: it is what the broker routes by.
"""

from __future__ import annotations

CORR_SIZE = 8
MAX_ORIGIN = 255
STAMP_SIZE = 16


class EnvelopeError(ValueError):
    """A frame that does not have the layout above."""


BIN_HEADER = 5  # type(1) ref(4), the bin codec's header
MAX_BUDGET_MS = 0xFFFFFFFF


def pack_request(corr: bytes, origin: bytes, payload: bytes, budget_ms: int = 0) -> bytes:
    """The request envelope; `budget_ms` (> 0) goes into the ref of the
    payload's bin header, which requests to the im service never used: how
    long the gate still waits for the reply (docs/internal-protocol.md)."""
    if budget_ms and len(payload) >= BIN_HEADER:
        budget = min(MAX_BUDGET_MS, max(1, int(budget_ms))).to_bytes(4, "big")
        return b"".join((corr, bytes((len(origin),)), origin, payload[:1], budget, payload[BIN_HEADER:]))
    return corr + bytes((len(origin),)) + origin + payload


def request_budget_ms(payload: bytes) -> int:
    """The budget a request's payload carries, in milliseconds; 0: none
    (an older gate, or a request that came from no client)."""
    if len(payload) < BIN_HEADER:
        return 0
    return int.from_bytes(payload[1:BIN_HEADER], "big")


def unpack_request(frame: bytes) -> tuple[bytes, bytes, bytes]:
    """(corr, origin, payload)."""
    if len(frame) < CORR_SIZE + 1:
        raise EnvelopeError(f"request envelope of {len(frame)} bytes")
    start = CORR_SIZE + 1 + frame[CORR_SIZE]
    if start > len(frame):
        raise EnvelopeError("request origin runs past the frame")
    return frame[:CORR_SIZE], frame[CORR_SIZE + 1:start], frame[start:]


def pack_reply(corr: bytes, payload: bytes) -> bytes:
    return corr + payload


def unpack_reply(frame: bytes) -> tuple[bytes, bytes]:
    """(corr, payload)."""
    if len(frame) < CORR_SIZE:
        raise EnvelopeError(f"reply of {len(frame)} bytes")
    return frame[:CORR_SIZE], frame[CORR_SIZE:]


def pack_notice(origin: bytes, payload: bytes) -> bytes:
    return bytes((len(origin),)) + origin + payload


def unpack_notice(frame: bytes) -> tuple[bytes, bytes]:
    """(origin, payload)."""
    if not frame:
        raise EnvelopeError("empty notification")
    start = 1 + frame[0]
    if start > len(frame):
        raise EnvelopeError("notification origin runs past the frame")
    return frame[1:start], frame[start:]


def pack_stamp(epoch: bytes, seq: int) -> bytes:
    return epoch + seq.to_bytes(8, "big")


def unpack_stamp(frame: bytes) -> tuple[bytes, int]:
    """(epoch, seq)."""
    if len(frame) != STAMP_SIZE:
        raise EnvelopeError(f"stamp of {len(frame)} bytes")
    return frame[:8], int.from_bytes(frame[8:], "big")


def pack_notices(entries) -> bytes:
    """One frame for many notifications, each ``(user, origin, payload)``
    (user and origin at most 255 bytes)."""
    parts = []
    for user, origin, payload in entries:
        parts.append(bytes((len(user),)))
        parts.append(user)
        parts.append(bytes((len(origin),)))
        parts.append(origin)
        parts.append(len(payload).to_bytes(4, "big"))
        parts.append(payload)
    return b"".join(parts)


def unpack_notices(frame: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """``[(user, origin, payload)]`` of a packed frame; all or nothing."""
    entries = []
    at, end = 0, len(frame)
    if not end:
        raise EnvelopeError("empty packed notifications")
    while at < end:
        user_end = at + 1 + frame[at]
        if user_end >= end:
            raise EnvelopeError("packed notification's user runs past the frame")
        origin_end = user_end + 1 + frame[user_end]
        if origin_end + 4 > end:
            raise EnvelopeError("packed notification's origin runs past the frame")
        payload_end = origin_end + 4 + int.from_bytes(frame[origin_end:origin_end + 4], "big")
        if payload_end > end:
            raise EnvelopeError("packed notification's payload runs past the frame")
        entries.append((frame[at + 1:user_end], frame[user_end + 1:origin_end], frame[origin_end + 4:payload_end]))
        at = payload_end
    return entries
