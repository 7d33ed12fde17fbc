"""A Majordomo (7/MDP) worker session, for a worker's own Poller loop.

A worker holds one :class:`WorkerSession` per broker (both brokers of a
Binary Star pair): a blocking DEALER that sends READY (with the Credit
extension), answers and sends heartbeats, and reconnects when the broker goes
silent or tells it to. The worker's loop polls the sessions' sockets next to
its own, hands received frames to :meth:`WorkerSession.handle_incoming`,
replies with :meth:`WorkerSession.reply` and calls :meth:`WorkerSession.tick`
at least once per heartbeat interval::

    group = WorkerGroup(["tcp://127.0.0.1:7722", "tcp://127.0.0.1:7732"], "im", credit=256)
    while running:
        for request in group.poll(timeout_ms):
            group.reply(request, [corr, payload])

The timing decisions live in :class:`WorkerProtocol`, which is pure.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Iterable, NamedTuple, Sequence

import zmq

from simzmq import mdp
from simzmq.zmqio import receiver, send_frames

log = logging.getLogger("simzmq.mdpworker")


class Request(NamedTuple):
    """One request from a broker. ``client`` is the opaque client address to
    echo in the reply; ``generation`` tells which connection it came on."""

    session: "WorkerSession"
    client: bytes
    body: list[bytes]
    generation: int


class WorkerProtocol:
    """Pure heartbeat and liveness bookkeeping of a worker's session."""

    def __init__(self, heartbeat_interval: float, liveness: int, now: float) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.broker_timeout = heartbeat_interval * liveness
        self.reset(now)

    def reset(self, now: float) -> None:
        """A fresh connection: the broker gets a full timeout to speak."""
        self.broker_expiry = now + self.broker_timeout
        self.last_sent = now
        self.reconnect_requested = False

    def heard(self, now: float) -> None:
        if not self.reconnect_requested:
            self.broker_expiry = now + self.broker_timeout

    def disconnected(self) -> None:
        """The broker said DISCONNECT: reconnect at the next tick."""
        self.reconnect_requested = True
        self.broker_expiry = float("-inf")

    def sent(self, now: float) -> None:
        self.last_sent = now

    def broker_silent(self, now: float) -> bool:
        return now >= self.broker_expiry

    def heartbeat_due(self, now: float) -> bool:
        # Heartbeat only when nothing else went out for an interval: replies
        # already tell the broker we are alive.
        return now - self.last_sent >= self.heartbeat_interval

    def next_deadline(self) -> float:
        """The latest time tick() should next run."""
        return min(self.broker_expiry, self.last_sent + self.heartbeat_interval)


class WorkerSession:
    """One MDP worker session with one broker, on a blocking DEALER.

    ``context`` may be None for the process's shared context. ``credit`` None
    sends a plain READY without the credit frame. ``batches`` announces the
    batch extension: the broker may then send REQUEST_BATCH, and
    :meth:`reply_all` answers with one REPLY_BATCH.
    """

    def __init__(
        self,
        context: zmq.Context | None,
        endpoint: str,
        service: str | bytes,
        credit: int | None = 1,
        heartbeat_interval: float = 0.25,
        liveness: int = 3,
        identity: bytes | None = None,
        configure_socket: Callable[[zmq.Socket], None] | None = None,
        now: float | None = None,
        batches: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.batches = batches
        self.service = service.encode() if isinstance(service, str) else service
        # None sends a plain READY without the credit frame.
        self.credit = credit
        # One identity for the life of the session, kept across reconnects so
        # the broker's rendezvous hashing keeps giving this worker the same keys.
        self.identity = identity or os.urandom(8)
        self.context = context or zmq.Context.instance()
        self._configure_socket = configure_socket
        self.protocol = WorkerProtocol(heartbeat_interval, liveness, time.monotonic() if now is None else now)
        self.generation = 0
        self.socket: zmq.Socket | None = None
        self.connects = 0
        self.connect(self.protocol.last_sent)

    def connect(self, now: float) -> None:
        """(Re)open the DEALER and announce READY."""
        if self.socket is not None:
            self.socket.close(linger=0)
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.identity = self.identity
        sock.sndhwm = 100_000
        sock.rcvhwm = 100_000
        if self._configure_socket is not None:
            self._configure_socket(sock)
        sock.connect(self.endpoint)
        self.socket = sock
        self.generation += 1
        self.connects += 1
        self.protocol.reset(now)
        self._send(mdp.build_ready(self.service, self.credit, self.batches), now)

    def _send(self, frames: Sequence[bytes], now: float) -> None:
        try:
            send_frames(self.socket, frames, nonblock=True)
        except zmq.Again:
            # The broker is not reading (or not there); the request will be
            # re-sent elsewhere and our silence handling reconnects.
            log.info("dropped a message to %s: send queue full", self.endpoint)
        self.protocol.sent(now)

    def handle_incoming(self, frames: Sequence[bytes], now: float) -> list[Request]:
        """Frames received on ``self.socket``; returns the requests in them."""
        try:
            cmd = mdp.parse_broker_message(frames)
        except mdp.MDPError as exc:
            log.info("dropped malformed message from broker %s: %s", self.endpoint, exc)
            return []
        self.protocol.heard(now)
        if cmd.command == mdp.REQUEST:
            return [Request(self, cmd.client, cmd.body, self.generation)]
        if cmd.command == mdp.REQUEST_BATCH:
            generation = self.generation
            return [Request(self, client, body, generation) for client, body in cmd.entries]
        if cmd.command == mdp.DISCONNECT:
            # Reconnect in tick(), not here: the socket is only ever replaced
            # there, so a caller's poller needs re-registering in one place.
            log.info("broker %s disconnected us; reconnecting", self.endpoint)
            self.protocol.disconnected()
        return []

    def recv_requests(self, now: float, limit: int = 1024) -> list[Request]:
        """Drain what is waiting on the socket without blocking."""
        requests: list[Request] = []
        recv = receiver(self.socket)
        for _ in range(limit):
            frames = recv()
            if frames is None:
                break
            requests.extend(self.handle_incoming(frames, now))
            if self.protocol.reconnect_requested:
                break
        return requests

    def reply(self, request: Request, body: Sequence[bytes], now: float | None = None) -> bool:
        """Send the reply; False if the connection it came on is gone (the
        broker has given the request to another worker by then)."""
        if request.generation != self.generation:
            return False
        self._send(mdp.build_reply(request.client, body), time.monotonic() if now is None else now)
        return True

    def reply_all(self, answers: Sequence[tuple[Request, bytes]], now: float | None = None) -> int:
        """Answers to requests that came on this session, one body frame each:
        one REPLY_BATCH if batches were announced, else one REPLY per answer.
        Answers for an older connection are left out (the broker re-sent
        those requests elsewhere). Returns how many went."""
        generation = self.generation
        current = [(request.client, body) for request, body in answers if request.generation == generation]
        if not current:
            return 0
        now = time.monotonic() if now is None else now
        if self.batches:
            self._send(mdp.build_reply_batch(current), now)
        else:
            for client, body in current:
                self._send(mdp.build_reply(client, [body]), now)
        return len(current)

    def tick(self, now: float) -> bool:
        """Heartbeat and reconnect as due; True if ``self.socket`` was replaced."""
        if self.protocol.broker_silent(now):
            if not self.protocol.reconnect_requested:
                log.info("broker %s silent for %.3fs; reconnecting", self.endpoint, self.protocol.broker_timeout)
            self.connect(now)
            return True
        if self.protocol.heartbeat_due(now):
            self._send(mdp.build_heartbeat(), now)
        return False

    def close(self, disconnect: bool = True) -> None:
        if self.socket is None:
            return
        if disconnect:
            try:
                self.socket.send_multipart(mdp.build_disconnect(), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            # Give the DISCONNECT a moment to leave before the socket goes.
            self.socket.close(linger=100)
        else:
            self.socket.close(linger=0)
        self.socket = None


class WorkerGroup:
    """Sessions with several brokers for one service, polled together."""

    def __init__(
        self,
        endpoints: Iterable[str],
        service: str | bytes,
        credit: int | None = 1,
        heartbeat_interval: float = 0.25,
        liveness: int = 3,
        identity: bytes | None = None,
        context: zmq.Context | None = None,
        configure_socket: Callable[[zmq.Socket], None] | None = None,
    ) -> None:
        identity = identity or os.urandom(8)
        self.heartbeat_interval = heartbeat_interval
        self.sessions = [
            WorkerSession(context, e, service, credit, heartbeat_interval, liveness, identity, configure_socket)
            for e in endpoints
        ]
        self.poller = zmq.Poller()
        self._by_socket: dict[zmq.Socket, WorkerSession] = {}
        self._registered: dict[int, zmq.Socket] = {}
        for session in self.sessions:
            self._register(session)

    def _register(self, session: WorkerSession) -> None:
        self.poller.register(session.socket, zmq.POLLIN)
        self._by_socket[session.socket] = session
        self._registered[id(session)] = session.socket

    def _sync(self, session: WorkerSession) -> bool:
        old = self._registered.get(id(session))
        if old is session.socket:
            return False
        self.poller.unregister(old)
        del self._by_socket[old]
        self._register(session)
        return True

    def poll(self, timeout_ms: float | None = None) -> list[Request]:
        """Wait up to ``timeout_ms`` (capped at one heartbeat interval) for
        requests from any broker; heartbeats and reconnects happen here too."""
        cap = self.heartbeat_interval * 1000
        timeout = cap if timeout_ms is None else min(timeout_ms, cap)
        ready = self.poller.poll(timeout)
        now = time.monotonic()
        requests: list[Request] = []
        for sock, _ in ready:
            session = self._by_socket.get(sock)
            if session is not None:
                requests.extend(session.recv_requests(now))
        self.tick(now)
        return requests

    def tick(self, now: float) -> bool:
        replaced = False
        for session in self.sessions:
            session.tick(now)
            if self._sync(session):
                replaced = True
        return replaced

    def reply(self, request: Request, body: Sequence[bytes]) -> bool:
        return request.session.reply(request, body)

    def close(self, disconnect: bool = True) -> None:
        for session in self.sessions:
            session.close(disconnect)
