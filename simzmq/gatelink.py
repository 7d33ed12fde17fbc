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

All decisions (failover, pending requests, deadlines, resends, batching,
notification gaps) are made by the pure :class:`simzmq.linkcore.LinkCore`;
this module is the shell that owns the sockets and calls the callbacks, each
one guarded so a callback that raises cannot stop the link.

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
from simzmq.config import BrokerConfig, GateConfig
from simzmq.envelope import EnvelopeError
from simzmq.linkcore import LinkCore
from simzmq.zmqio import receiver, send_frames

log = logging.getLogger("simzmq.gate")

# Messages read per wake-up of one socket, so a flood of replies or
# notifications cannot keep the loop from its clients; the rest is read on
# the next turn of the loop.
DRAIN_BATCH = 256

BACKEND_LATENCY = Histogram("simzmq_gate_backend_seconds", "Time from forwarding a request to its reply",
                            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5))
BACKEND_TIMEOUTS = Counter("simzmq_gate_backend_timeouts_total", "Requests answered unavailable after request_timeout")
BACKEND_PENDING = Gauge("simzmq_gate_backend_pending", "Requests waiting for the back end")
FAILOVERS = Counter("simzmq_gate_failovers_total",
                    "Switches from one broker to the other after a broker had answered")
BROKER_SILENCE = Gauge("simzmq_gate_broker_silence_seconds", "Time since the current broker last answered")
NOTIFY_GAPS = Counter("simzmq_gate_notification_gaps_total", "Notification sequence gaps or epoch changes seen")
CALLBACK_ERRORS = Counter("simzmq_gate_backend_callback_errors_total",
                          "Reply, notification or resync callbacks that raised (logged; the link goes on)")


class BrokerEndpoints(NamedTuple):
    name: str
    frontend: str
    notify_out: str


def broker_pair(cfg: BrokerConfig) -> list[BrokerEndpoints]:
    """Where a gate reaches the region's brokers, primary first."""
    return [BrokerEndpoints(role, cfg.role(role).frontend, cfg.role(role).notify_out) for role in ("primary", "backup")]


class Backend:
    """Requests to the `im` service and notifications from it.

    ZeroMQ sockets are driven from the asyncio loop with add_reader on their
    file descriptor. That descriptor is edge-triggered, so every wake-up drains
    until EAGAIN, and after sending we check EVENTS in case input arrived
    meanwhile (otherwise that input would wait for the next edge).

    The gate's API: ``request(key, origin, payload, callback)``,
    ``subscribe(user)`` / ``unsubscribe(user)``, ``reachable(now)``,
    ``broker_name``, ``failovers``, and the ``on_notification(topic, origin,
    payload)`` / ``on_resync(user or None)`` callbacks it passes in.
    """

    def __init__(self, ctx: zmq.Context, brokers: list[BrokerEndpoints], cfg: GateConfig,
                 on_notification: Callable[[bytes, bytes, bytes], None],
                 on_resync: Callable[[str | None], None],
                 configure_socket: Callable[[zmq.Socket, str], None] | None = None):
        self.ctx = ctx
        self.brokers = brokers
        self.failover_after_s = cfg.failover_after_ms / 1000
        self.on_notification = on_notification
        self.on_resync = on_resync
        self.configure_socket = configure_socket
        self.core = LinkCore(len(brokers), cfg.request_timeout_s, cfg.probe_interval_ms / 1000, self.failover_after_s,
                             time.monotonic())
        self.loop = asyncio.get_event_loop()
        self.dealer = self.sub = None
        self._timer = None
        self._flush_scheduled = False
        self._connect()

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

    def _connect(self) -> None:
        broker = self.brokers[self.core.current]
        self.dealer = self._socket(zmq.DEALER, "frontend")
        self.dealer.connect(broker.frontend)
        self.sub = self._socket(zmq.SUB, "notify_out")
        self.sub.connect(broker.notify_out)
        for topic in self.core.subscriptions():
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._recv_dealer = receiver(self.dealer)
        self._recv_sub = receiver(self.sub)
        self.loop.add_reader(self.dealer.getsockopt(zmq.FD), self._drain_dealer)
        self.loop.add_reader(self.sub.getsockopt(zmq.FD), self._drain_sub)

    def _disconnect(self) -> None:
        for sock in (self.dealer, self.sub):
            if sock is not None:
                self.loop.remove_reader(sock.getsockopt(zmq.FD))
                sock.close(0)
        self.dealer = self.sub = None

    # -- state the gate reads ----------------------------------------------------

    def reachable(self, now: float) -> bool:
        return self.core.reachable(now)

    @property
    def broker_name(self) -> str:
        return self.brokers[self.core.current].name

    @property
    def failovers(self) -> int:
        return self.core.failovers

    @property
    def pending(self) -> dict:
        return self.core.pending

    # -- requests ---------------------------------------------------------------

    def start(self) -> None:
        self.core.tick_due = time.monotonic()
        self._timer = self.loop.call_later(0, self._tick)

    def request(self, key: bytes, origin: bytes, payload: bytes, callback) -> None:
        """Forward one request; `callback(reply_payload or None)` runs once,
        with None after request_timeout_s. Everything requested in one turn
        of the loop goes to the broker as one message."""
        if self.core.request(key, origin, payload, callback, time.monotonic()) and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._send_all(self.core.outgoing(time.monotonic()))

    def _send_all(self, messages) -> None:
        if not messages:
            return
        dealer = self.dealer
        for frames in messages:
            try:
                send_frames(dealer, frames, nonblock=True)
            except zmq.Again:
                pass  # unlimited HWM, so only while disconnected: the timeout answers it
        if dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.loop.call_soon(self._drain_dealer)

    def _answer(self, answers) -> None:
        for answer in answers:
            if answer.payload is not None:
                BACKEND_LATENCY.observe(answer.waited)
            else:
                BACKEND_TIMEOUTS.inc()
            self._guarded(answer.callback, answer.payload)

    def _guarded(self, callback, *args) -> None:
        try:
            callback(*args)
        except Exception:
            CALLBACK_ERRORS.inc()
            log.exception("a bus callback failed; the link goes on")

    def _drain_dealer(self) -> None:
        if self.dealer is None:
            return
        recv = self._recv_dealer
        core = self.core
        for _ in range(DRAIN_BATCH):
            frames = recv()
            if frames is None:
                return
            malformed = core.malformed_entries
            try:
                answers = core.on_reply(frames, time.monotonic())
            except (mdp.MDPError, EnvelopeError) as exc:
                log.info("dropping a malformed reply from the broker: %s", exc)
                continue
            if core.malformed_entries != malformed:
                log.info("dropped %d malformed entries of a reply batch from the broker",
                         core.malformed_entries - malformed)
            self._answer(answers)
        # More may be waiting, and the descriptor will not signal it again.
        self.loop.call_soon(self._drain_dealer)

    # -- notifications ----------------------------------------------------------

    def _drain_sub(self) -> None:
        if self.sub is None:
            return
        recv = self._recv_sub
        core = self.core
        for _ in range(DRAIN_BATCH):
            frames = recv()
            if frames is None:
                return
            try:
                notices = core.on_notification(frames)
            except EnvelopeError as exc:
                log.info("dropping a malformed notification: %s", exc)
                continue
            if notices.resync:
                NOTIFY_GAPS.inc()
                log.info("notification gap on %r; catching up %d users", bytes(frames[0][:-1]), len(notices.resync))
                for user in notices.resync:
                    self._guarded(self.on_resync, user)
            for topic, origin, payload in notices.deliveries:
                self._guarded(self.on_notification, topic, origin, payload)
        self.loop.call_soon(self._drain_sub)

    def subscribe(self, user: str) -> None:
        for topic in self.core.subscribe(user):
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)

    def unsubscribe(self, user: str) -> None:
        for topic in self.core.unsubscribe(user):
            self.sub.setsockopt(zmq.UNSUBSCRIBE, topic)

    # -- time -------------------------------------------------------------------

    def _tick(self) -> None:
        # Re-armed first, so nothing below (a callback that raises included)
        # can stop the link from ticking: no more failover, no more timeouts.
        self._timer = self.loop.call_later(self.core.probe_interval / 2, self._tick)
        # Replies may be waiting unread when the loop is busy (the socket's
        # descriptor only signals edges): read them before judging the broker
        # silent, or a loaded gate would fail over from a healthy broker.
        self._drain_dealer()
        core = self.core
        now = time.monotonic()
        BROKER_SILENCE.set(core.silent_for(now))
        old = self.brokers[core.current]
        tick = core.tick(now)
        if tick.switched:
            self._disconnect()
            self._connect()
            if core.ever_heard:
                FAILOVERS.inc()
            new = self.brokers[core.current]
            log.warning("broker %s silent for %.2f s: switching to %s (%s), resending %d requests",
                        old.name, self.failover_after_s, new.name, new.frontend, len(core.pending))
        self._send_all(core.probes(now) + core.outgoing(now))
        self._answer(tick.answers)
        BACKEND_PENDING.set(len(core.pending))
        if tick.resync_all:
            # Notifications published while we were away went to the other broker.
            self._guarded(self.on_resync, None)

    def close(self) -> None:
        if self._timer:
            self._timer.cancel()
        self._disconnect()
