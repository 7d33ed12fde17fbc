"""Stamping notifications on their way through a broker. Pure.

Workers publish `topic | notice` (notice = origin and payload in one frame,
simzmq/envelope.py). The broker forwards `topic | stamp | notice`: the stamp is
`epoch` (8 random bytes chosen when the broker starts) and `seq`, the count of
that topic's notifications from 1 (u64, big-endian). A gate that sees a topic's seq jump, or its epoch change, knows
notifications were lost on the way and catches that user up from the store.
"""

from __future__ import annotations

import os
import zlib

from simzmq.envelope import pack_stamp

# Workers publish one message per (commit, topic group): the notifications of
# one commit for every user whose id hashes into that group. Few groups mean
# few messages per commit; a gate with a handful of users online still gets
# the group's other users' notifications and drops them with one dict lookup
# each. A gate with more than a few dozen users online subscribes to every
# group whatever their number, so more groups would cost messages and save
# nothing (docs/internal-protocol.md).
GROUPS = 16
# A group topic: "*" (never in a user id, [A-Za-z0-9_.-]), one hex digit,
# the zero byte. Per-user topics (user id + zero byte) stay valid.
GROUP_PREFIX = b"*"


def group_topic(user: bytes) -> bytes:
    """The topic of the group a user's notifications are published in."""
    return b"*%x\0" % (zlib.crc32(user) % GROUPS)


def is_group_topic(topic: bytes) -> bool:
    return topic[:1] == GROUP_PREFIX

# Topics are user ids (at most 64 bytes) plus a zero byte; anything longer did
# not come from a worker of ours.
MAX_TOPIC = 65


class NotifyStamper:
    def __init__(self, epoch: bytes | None = None):
        self.epoch = epoch or os.urandom(8)
        self.seqs: dict[bytes, int] = {}

    def stamp(self, frames: list[bytes]) -> list[bytes] | None:
        """The frames to forward, or None for a malformed notification."""
        if len(frames) != 2:
            return None
        topic = frames[0]
        if not topic or len(topic) > MAX_TOPIC or topic[-1] != 0:
            return None
        seq = self.seqs.get(topic, 0) + 1
        self.seqs[topic] = seq
        return [topic, pack_stamp(self.epoch, seq), frames[1]]

    def subscription(self, message: bytes) -> None:
        """An XPUB (un)subscription passing upstream: a topic nobody listens to
        any more needs no counter (a later subscriber starts a new count, which
        it takes as its baseline)."""
        if message[:1] == b"\x00":
            self.seqs.pop(message[1:], None)
