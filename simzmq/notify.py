"""Stamping notifications on their way through a broker. Pure.

Workers publish `topic | origin | payload`. The broker forwards
`topic | epoch | seq | origin | payload`: `epoch` is 8 random bytes chosen when
the broker starts, `seq` counts the notifications of that topic from 1 (u64,
big-endian). A gate that sees a topic's seq jump, or its epoch change, knows
notifications were lost on the way and catches that user up from the store.
"""

from __future__ import annotations

import os

# Topics are user ids (at most 64 bytes) plus a zero byte; anything longer did
# not come from a worker of ours.
MAX_TOPIC = 65


class NotifyStamper:
    def __init__(self, epoch: bytes | None = None):
        self.epoch = epoch or os.urandom(8)
        self.seqs: dict[bytes, int] = {}

    def stamp(self, frames: list[bytes]) -> list[bytes] | None:
        """The frames to forward, or None for a malformed notification."""
        if len(frames) != 3:
            return None
        topic = frames[0]
        if not topic or len(topic) > MAX_TOPIC or topic[-1] != 0:
            return None
        seq = self.seqs.get(topic, 0) + 1
        self.seqs[topic] = seq
        return [topic, self.epoch, seq.to_bytes(8, "big"), frames[1], frames[2]]

    def subscription(self, message: bytes) -> None:
        """An XPUB (un)subscription passing upstream: a topic nobody listens to
        any more needs no counter (a later subscriber starts a new count, which
        it takes as its baseline)."""
        if message[:1] == b"\x00":
            self.seqs.pop(message[1:], None)
