"""The gate's link to the bus: MDP requests to the `im` service through the
active broker of the pair, and notifications from it.

Failover is Lazy Pirate: the gate talks to one broker at a time, probes it
with `mmi.service` every `probe_interval`, and when it has heard nothing for
`failover_after` it closes both sockets, connects to the other broker and
resends every request still waiting for its reply (Sends are idempotent by
cmid, so a request that did take effect is answered from the store, not done
twice). A passive broker does not answer, so a gate that switched too eagerly
switches back. After each switch the gate catches its online users up from the
store, because notifications published meanwhile went to the other broker.

Separate from simzmq/gate.py so the client-facing side and the bus side can be
read (and changed) apart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, NamedTuple

import zmq
from prometheus_client import Counter, Gauge, Histogram

from simzmq import mdp
from simzmq.envelope import EnvelopeError, pack_request, unpack_notice, unpack_reply, unpack_stamp
from simzmq.zmqio import receiver, send_frames

log = logging.getLogger("simzmq.gate")

SERVICE = b"im"
PROBE = [b"", mdp.C_CLIENT, mdp.MMI_SERVICE, SERVICE]
# Messages read per wake-up of one socket, so a flood of replies or
# notifications cannot keep the loop from its clients; the rest is read on
# the next turn of the loop.
DRAIN_BATCH = 256

BACKEND_LATENCY = Histogram("simzmq_gate_backend_seconds", "Time from forwarding a request to its reply",
                            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5))
BACKEND_TIMEOUTS = Counter("simzmq_gate_backend_timeouts_total", "Requests answered unavailable after request_timeout")
BACKEND_PENDING = Gauge("simzmq_gate_backend_pending", "Requests waiting for the back end")
FAILOVERS = Counter("simzmq_gate_failovers_total", "Switches from one broker to the other")
BROKER_SILENCE = Gauge("simzmq_gate_broker_silence_seconds", "Time since the current broker last answered")
NOTIFY_GAPS = Counter("simzmq_gate_notification_gaps_total", "Notification sequence gaps or epoch changes seen")


class BrokerEndpoints(NamedTuple):
    name: str
    frontend: str
    notify_out: str


class Pending:
    __slots__ = ("callback", "deadline", "frames", "started")

    def __init__(self, callback, deadline, frames, started):
        self.callback = callback
        self.deadline = deadline
        self.frames = frames
        self.started = started


class Backend:
    """Requests to the `im` service and notifications from it.

    ZeroMQ sockets are driven from the asyncio loop with add_reader on their
    file descriptor. That descriptor is edge-triggered, so every wake-up drains
    until EAGAIN, and after sending we check EVENTS in case input arrived
    meanwhile (otherwise that input would wait for the next edge).
    """

    def __init__(self, ctx: zmq.Context, brokers: list[BrokerEndpoints], request_timeout_s: float,
                 probe_interval_s: float, failover_after_s: float,
                 on_notification: Callable[[bytes, bytes, bytes], None],
                 on_resync: Callable[[str | None], None],
                 configure_socket: Callable[[zmq.Socket, str], None] | None = None):
        self.ctx = ctx
        self.brokers = brokers
        self.request_timeout_s = request_timeout_s
        self.probe_interval_s = probe_interval_s
        self.failover_after_s = failover_after_s
        self.on_notification = on_notification
        self.on_resync = on_resync
        self.configure_socket = configure_socket
        self.pending: dict[bytes, Pending] = {}
        self.next_corr = 1
        self.topics: dict[bytes, int] = {}
        # Per topic, the (epoch, seq) of the last notification: a jump in seq
        # or a new epoch means notifications were lost on the way.
        self.topic_seq: dict[bytes, tuple[bytes, int]] = {}
        self.loop = asyncio.get_event_loop()
        self.current = 0
        self.failovers = 0
        self.dealer = self.sub = None
        self._timer = None
        self._connect(time.monotonic())

    # -- connection to one broker ----------------------------------------------

    def _socket(self, kind, name):
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.DEALER:
            sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self.configure_socket is not None:
            self.configure_socket(sock, name)
        return sock

    def _connect(self, now: float) -> None:
        broker = self.brokers[self.current]
        self.dealer = self._socket(zmq.DEALER, "frontend")
        self.dealer.connect(broker.frontend)
        self.sub = self._socket(zmq.SUB, "notify_out")
        self.sub.connect(broker.notify_out)
        for topic in self.topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.topic_seq.clear()
        self._recv_dealer = receiver(self.dealer)
        self._recv_sub = receiver(self.sub)
        self.loop.add_reader(self.dealer.getsockopt(zmq.FD), self._drain_dealer)
        self.loop.add_reader(self.sub.getsockopt(zmq.FD), self._drain_sub)
        # A broker we just connected to gets a whole failover_after to answer
        # before we give up on it; it counts as reachable once it has answered.
        self.connected_at = now
        self.last_heard = 0.0
        self.last_probe = 0.0

    def _disconnect(self) -> None:
        for sock in (self.dealer, self.sub):
            if sock is not None:
                self.loop.remove_reader(sock.getsockopt(zmq.FD))
                sock.close(0)
        self.dealer = self.sub = None

    def _fail_over(self, now: float) -> None:
        old = self.brokers[self.current]
        self._disconnect()
        self.current = (self.current + 1) % len(self.brokers)
        self.failovers += 1
        FAILOVERS.inc()
        self._connect(now)
        log.warning("broker %s silent for %.2f s: switching to %s (%s), resending %d requests",
                    old.name, self.failover_after_s, self.brokers[self.current].name,
                    self.brokers[self.current].frontend, len(self.pending))
        for pending in self.pending.values():
            self._send(pending.frames)
        # Notifications published while we were away went to the other broker.
        self.on_resync(None)

    # -- requests ---------------------------------------------------------------

    def start(self) -> None:
        self._tick_due = time.monotonic()
        self._timer = self.loop.call_later(0, self._tick)

    def reachable(self, now: float) -> bool:
        return now - self.last_heard < self.failover_after_s

    @property
    def broker_name(self) -> str:
        return self.brokers[self.current].name

    def request(self, key: bytes, origin: bytes, payload: bytes, callback) -> None:
        """Forward one request; `callback(reply_payload or None)` runs once,
        with None after request_timeout_s."""
        corr = self.next_corr.to_bytes(8, "big")
        self.next_corr += 1
        frames = [b"", mdp.C_CLIENT, SERVICE, key, pack_request(corr, origin, payload)]
        now = time.monotonic()
        self.pending[corr] = Pending(callback, now + self.request_timeout_s, frames, now)
        self._send(frames)

    def _send(self, frames) -> None:
        try:
            send_frames(self.dealer, frames, nonblock=True)
        except zmq.Again:
            pass  # unlimited HWM, so only while disconnected: the timeout answers it
        if self.dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.loop.call_soon(self._drain_dealer)

    def _drain_dealer(self) -> None:
        sock = self.dealer
        if sock is None:
            return
        recv = self._recv_dealer
        for _ in range(DRAIN_BATCH):
            frames = recv()
            if frames is None:
                return
            self.last_heard = time.monotonic()
            # "" | MDPC01 | service | body…
            if len(frames) < 4 or frames[0] != b"" or frames[1] != mdp.C_CLIENT:
                log.info("dropping a malformed reply from the broker (%d frames)", len(frames))
                continue
            if frames[2] != SERVICE:
                continue  # a probe's answer: hearing it was the point
            if len(frames) != 4:
                log.info("dropping an im reply with %d frames", len(frames))
                continue
            try:
                corr, payload = unpack_reply(frames[3])
            except EnvelopeError as exc:
                log.info("dropping an im reply: %s", exc)
                continue
            pending = self.pending.pop(corr, None)
            if pending is None:
                continue  # answered already (a late reply after a timeout, or a resend's twin)
            BACKEND_LATENCY.observe(self.last_heard - pending.started)
            pending.callback(payload)
        # More may be waiting, and the descriptor will not signal it again.
        self.loop.call_soon(self._drain_dealer)

    # -- notifications ----------------------------------------------------------

    def _drain_sub(self) -> None:
        sock = self.sub
        if sock is None:
            return
        recv = self._recv_sub
        for _ in range(DRAIN_BATCH):
            frames = recv()
            if frames is None:
                return
            # topic | stamp | notice (docs/internal-protocol.md)
            if len(frames) != 3:
                log.info("dropping a malformed notification (%d frames)", len(frames))
                continue
            topic = frames[0]
            try:
                epoch, seq = unpack_stamp(frames[1])
                origin, payload = unpack_notice(frames[2])
            except EnvelopeError as exc:
                log.info("dropping a malformed notification: %s", exc)
                continue
            last = self.topic_seq.get(topic)
            self.topic_seq[topic] = (epoch, seq)
            if last is not None and (last[0] != epoch or seq != last[1] + 1):
                NOTIFY_GAPS.inc()
                log.info("notification gap for %r (epoch changed: %s, %d -> %d); catching up",
                         topic[:-1], last[0] != epoch, last[1], seq)
                self.on_resync(topic[:-1].decode("utf-8", "replace"))
            try:
                self.on_notification(topic, origin, payload)
            except Exception:
                log.exception("notification handling failed")
        self.loop.call_soon(self._drain_sub)

    def subscribe(self, user: str) -> None:
        topic = user.encode() + b"\0"
        count = self.topics.get(topic, 0)
        self.topics[topic] = count + 1
        if count == 0:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)

    def unsubscribe(self, user: str) -> None:
        topic = user.encode() + b"\0"
        count = self.topics.get(topic, 0)
        if count > 1:
            self.topics[topic] = count - 1
            return
        self.topics.pop(topic, None)
        self.topic_seq.pop(topic, None)
        if count == 1:
            self.sub.setsockopt(zmq.UNSUBSCRIBE, topic)

    # -- time -------------------------------------------------------------------

    def _tick(self) -> None:
        # Replies may be waiting unread when the loop is busy (the socket's
        # descriptor only signals edges): read them before judging the broker
        # silent, or a loaded gate would fail over from a healthy broker.
        self._drain_dealer()
        now = time.monotonic()
        silent_since = max(self.last_heard, self.connected_at)
        BROKER_SILENCE.set(now - silent_since)
        # A tick that itself ran late means this gate was stalled (a busy
        # loop, a paused process), not that the broker went quiet: give the
        # broker's answers one more tick to be read before judging it.
        stalled = now - self._tick_due > self.probe_interval_s
        if now - silent_since > self.failover_after_s and len(self.brokers) > 1 and not stalled:
            self._fail_over(now)
        expired = [corr for corr, p in self.pending.items() if p.deadline <= now]
        for corr in expired:
            BACKEND_TIMEOUTS.inc()
            self.pending.pop(corr).callback(None)
        BACKEND_PENDING.set(len(self.pending))
        if now - self.last_probe >= self.probe_interval_s:
            self.last_probe = now
            self._send(PROBE)
        self._tick_due = now + self.probe_interval_s / 2
        self._timer = self.loop.call_later(self.probe_interval_s / 2, self._tick)

    def close(self) -> None:
        if self._timer:
            self._timer.cancel()
        self._disconnect()
