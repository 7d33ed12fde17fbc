"""The gate's link to the broker pair, as pure logic: no sockets, no clock.

:class:`LinkCore` decides everything the link does, with ``now`` passed in;
simzmq/gatelink.py is the thin shell that owns the ZeroMQ sockets, runs the
callbacks and asks the core what to send.

* **Requests.** Each request gets an 8-byte ``corr`` and waits in ``pending``
  until its reply, its deadline or forever-after a failover resend. What one
  loop turn asked for goes out as one bus message: a batch
  (``MDPC01B``, docs/internal-protocol.md) once the broker answered
  ``mmi.batch`` with ``200``, plain 7/MDP requests before that.
* **Failover** (Lazy Pirate, one broker at a time): a broker silent for
  ``failover_after`` since it was first probed is left for the next one, and every pending request is
  sent again (requests are retry-safe). One late tick is excused — the gate
  itself was stalled and the broker's answers may be sitting unread — but
  only one: a gate whose loop stays busy still fails over.
* **Notifications.** Per topic the last ``(epoch, seq)``; a jump or a new
  epoch means notifications were lost, and the users concerned are re-synced.
  Group topics (simzmq/notify.py) carry packed notifications for many users;
  only entries for users subscribed here are delivered.

Callbacks are never called here: the core returns them, so one that raises
cannot leave the core half-updated (the shell calls each one guarded).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

from simzmq import mdp
from simzmq.envelope import EnvelopeError, pack_request, unpack_notice, unpack_notices, unpack_reply, unpack_stamp
from simzmq.notify import group_topic, is_group_topic

# The origin of a federation entry asking for a catch-up (federation.RESYNC).
FEDERATION_RESYNC = b"resync"

SERVICE = b"im"
PROBE = mdp.build_client_request(mdp.MMI_SERVICE, [SERVICE])
ASK_BATCH = mdp.build_client_request(mdp.MMI_BATCH, [])
# Entries per batch message: a turn that gathered more sends several, so one
# message stays a few hundred kilobytes at most.
MAX_BATCH = 512


class Pending:
    __slots__ = ("corr", "key", "origin", "payload", "callback", "deadline", "started")

    def __init__(self, corr, key, origin, payload, callback, deadline, started):
        self.corr = corr
        self.key = key
        self.origin = origin
        self.payload = payload
        self.callback = callback
        self.deadline = deadline
        self.started = started


class Answer(NamedTuple):
    """A reply (or, with payload None, a timeout) to hand to its callback."""
    callback: Callable
    payload: bytes | None
    waited: float  # seconds since the request was made


class Tick(NamedTuple):
    switched: bool            # the shell must reconnect to ``current`` and resubscribe
    answers: list[Answer]     # timed-out requests (payload None)
    resync_all: bool          # everyone online must be caught up (after a switch)


class Notices(NamedTuple):
    deliveries: list[tuple[bytes, bytes, bytes]]  # (user topic, origin, payload)
    resync: list[str]                              # users to catch up


def budget_ms(seconds: float) -> int:
    """A budget in whole milliseconds, at least 1 (0 would mean none)."""
    return max(1, math.ceil(seconds * 1000))


def user_topic(user: str) -> bytes:
    return user.encode() + b"\0"


class LinkCore:
    def __init__(self, brokers: int, request_timeout: float, probe_interval: float, failover_after: float,
                 now: float) -> None:
        self.brokers = brokers
        self.request_timeout = request_timeout
        self.probe_interval = probe_interval
        self.failover_after = failover_after
        self.current = 0
        self.pending: dict[bytes, Pending] = {}
        self.outbox: list[Pending] = []
        self.next_corr = 1
        # Switches made after some broker had answered: before that, trying
        # one broker after the other is finding one, not failing over.
        self.failovers = 0
        self.ever_heard = False
        # Reply entries too short to carry a corr (a broken or hostile peer).
        self.malformed_entries = 0
        self.topics: dict[bytes, int] = {}            # user topic -> subscriptions
        self.groups: dict[bytes, set[bytes]] = {}     # group topic -> user topics online here
        self.stamps: dict[bytes, tuple[bytes, int]] = {}
        self.tick_due = now
        self.excused = False
        self._connected(now)

    def _connected(self, now: float) -> None:
        # A broker just connected to gets a whole failover_after to answer,
        # counted from the first probe it was sent: a gate whose loop was busy
        # starting up must not leave a broker it has not even asked yet.
        self.connected_at = now
        self.probed = False
        self.last_heard: float | None = None
        self.last_probe = float("-inf")
        self.batches = False  # until this broker answers mmi.batch with 200
        self.batches_known = False  # it answered mmi.batch at all
        self.stamps.clear()

    # -- state -------------------------------------------------------------------

    def reachable(self, now: float) -> bool:
        return self.last_heard is not None and now - self.last_heard < self.failover_after

    def silent_for(self, now: float) -> float:
        return now - (self.connected_at if self.last_heard is None else max(self.last_heard, self.connected_at))

    # -- requests ----------------------------------------------------------------

    def request(self, key: bytes, origin: bytes, payload: bytes, callback: Callable, now: float) -> bool:
        """Queue one request for this turn's message; True if it is the first
        of the turn (the shell then schedules :meth:`outgoing`)."""
        corr = self.next_corr.to_bytes(8, "big")
        self.next_corr += 1
        pending = Pending(corr, key, origin, payload, callback, now + self.request_timeout, now)
        self.pending[corr] = pending
        self.outbox.append(pending)
        return len(self.outbox) == 1

    def outgoing(self, now: float) -> list[list[bytes]]:
        """The messages to send now for what was queued since the last call.
        Each request carries the time this gate still waits for its reply
        (its budget), as of now: a resend after a failover carries what is
        left, so a worker never computes what nobody waits for any more."""
        queued = [p for p in self.outbox if p.corr in self.pending]
        self.outbox = []
        if not queued:
            return []
        entries = [(p.key, pack_request(p.corr, p.origin, p.payload, budget_ms(p.deadline - now))) for p in queued]
        if not self.batches:
            return [mdp.build_client_request(SERVICE, list(entry)) for entry in entries]
        return [mdp.build_client_batch(SERVICE, entries[i:i + MAX_BATCH]) for i in range(0, len(entries), MAX_BATCH)]

    def on_reply(self, frames: list[bytes], now: float) -> list[Answer]:
        """A message from the broker on the DEALER; raises mdp.MDPError or
        EnvelopeError for a malformed one (after taking it as a sign of life)."""
        self.last_heard = now
        self.ever_heard = True
        batched, service, rest = mdp.parse_client_message(frames)
        if service != SERVICE:
            if service == mdp.MMI_BATCH:
                self.batches = rest == [mdp.MMI_FOUND]
                self.batches_known = True
            return []  # a probe's answer: hearing it was the point
        if not batched and len(rest) != 1:
            raise EnvelopeError(f"an im reply with {len(rest)} body frames")
        answers = []
        for body in rest:
            try:
                corr, payload = unpack_reply(body)
            except EnvelopeError:
                # Only this entry is lost (its request times out); the
                # answers beside it in the batch still count.
                self.malformed_entries += 1
                continue
            pending = self.pending.pop(corr, None)
            if pending is not None:  # else answered already (a late reply after a timeout, or a resend's twin)
                answers.append(Answer(pending.callback, payload, now - pending.started))
        return answers

    # -- time --------------------------------------------------------------------

    def tick(self, now: float) -> Tick:
        """Run every probe_interval / 2: failover, deadlines. The shell sends
        :meth:`probes` and :meth:`outgoing` after it."""
        stalled = now - self.tick_due > self.probe_interval
        excuse = stalled and not self.excused
        self.excused = stalled
        switched = False
        if self.brokers > 1 and self.probed and self.silent_for(now) > self.failover_after and not excuse:
            self.current = (self.current + 1) % self.brokers
            if self.ever_heard:
                self.failovers += 1
            self._connected(now)
            # Everything unanswered goes again, oldest first, to the new broker.
            self.outbox = list(self.pending.values())
            switched = True
        answers = []
        for corr in [c for c, p in self.pending.items() if p.deadline <= now]:
            pending = self.pending.pop(corr)
            answers.append(Answer(pending.callback, None, now - pending.started))
        self.tick_due = now + self.probe_interval / 2
        return Tick(switched, answers, switched)

    def probes(self, now: float) -> list[list[bytes]]:
        """Probe messages due now: mmi.service every probe_interval, with
        mmi.batch until the broker has answered it."""
        if now - self.last_probe < self.probe_interval:
            return []
        self.last_probe = now
        if not self.probed:
            self.probed = True
            self.connected_at = now
        return [PROBE] if self.batches_known else [PROBE, ASK_BATCH]

    # -- notifications -----------------------------------------------------------

    def subscribe(self, user: str) -> list[bytes]:
        """Topics to SUBSCRIBE to now for one more session of ``user``."""
        topic = user_topic(user)
        count = self.topics.get(topic, 0)
        self.topics[topic] = count + 1
        if count:
            return []
        group = group_topic(topic[:-1])
        members = self.groups.setdefault(group, set())
        members.add(topic)
        return [topic, group] if len(members) == 1 else [topic]

    def unsubscribe(self, user: str) -> list[bytes]:
        """Topics to UNSUBSCRIBE from now for one session fewer of ``user``."""
        topic = user_topic(user)
        count = self.topics.get(topic, 0)
        if count > 1:
            self.topics[topic] = count - 1
            return []
        if not count:
            return []
        del self.topics[topic]
        self.stamps.pop(topic, None)
        group = group_topic(topic[:-1])
        members = self.groups.get(group)
        members.discard(topic)
        if members:
            return [topic]
        del self.groups[group]
        self.stamps.pop(group, None)
        return [topic, group]

    def subscriptions(self) -> list[bytes]:
        """Every topic to subscribe to on a fresh connection."""
        return [*self.topics, *self.groups]

    def on_notification(self, frames: list[bytes]) -> Notices:
        """``topic | stamp | notice`` (or ``group | stamp | packed``) from the
        broker; raises EnvelopeError for a malformed one."""
        if len(frames) != 3:
            raise EnvelopeError(f"notification of {len(frames)} frames")
        topic = frames[0]
        epoch, seq = unpack_stamp(frames[1])
        if topic not in self.groups and topic not in self.topics:
            # Still on its way after we unsubscribed: neither delivered nor
            # remembered (a stale stamp would look like a gap later).
            return Notices([], [])
        catch_up_group = False
        if is_group_topic(topic):
            members = self.groups[topic]
            deliveries = []
            for user, origin, payload in unpack_notices(frames[2]):
                if not user:
                    # A federation entry (simzmq/federation.py): a mark, or a
                    # peer region's notifications may have been lost.
                    catch_up_group = catch_up_group or origin == FEDERATION_RESYNC
                    continue
                user_t = user + b"\0"
                if user_t in members:
                    deliveries.append((user_t, origin, payload))
            concerned = members
        else:
            origin, payload = unpack_notice(frames[2])
            deliveries = [(topic, origin, payload)]
            concerned = (topic,)
        last = self.stamps.get(topic)
        self.stamps[topic] = (epoch, seq)
        resync = []
        if catch_up_group or (last is not None and (last[0] != epoch or seq != last[1] + 1)):
            resync = [t[:-1].decode("utf-8", "replace") for t in concerned]
        return Notices(deliveries, resync)
