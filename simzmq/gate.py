"""The gate process: client connections in, MDP requests out, notifications
pushed down.

A thin shell. The protocol lives in simzmq.wire (framing, handshake, channel,
codecs, request rules); what a client may do and what the gate answers is
gate_session; who is online and what they are pushed is gate_fanout; the
transports are gate_tcp (asyncio protocol) and gate_http (Tornado: HTTP API
and WebSocket), on one event loop. The Gate here holds them together and
enforces the gate-wide limits. It keeps no durable state: losing a gate loses
connections, which clients resume with their token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import signal
import time

import uvloop
import zmq
from prometheus_client import Counter, Gauge, Histogram

from simzmq import gate_tcp
from simzmq.config import Config, GateConfig
from simzmq.gate_fanout import Fanout
from simzmq.gate_http import make_app
from simzmq.gate_session import CLOSED, RATE_LIMITED, ClientConnection
from simzmq.gatelink import Backend, BrokerEndpoints, broker_pair
from simzmq.limits import Limiter, LimitsConfig, LogThrottle, pick_slow_consumers
from simzmq.presence import GatePresence, TypingLimiter, report_timing
from simzmq.push.presence import PresenceReporter
from simzmq.wire.messages import KickCode

log = logging.getLogger("simzmq.gate")

# How often the gate sums what it queued towards clients (the gate-wide
# outbound budget) and forgets limiter entries that carry no information.
OUTBOUND_SWEEP_S = 1.0
PRUNE_EVERY_S = 10.0
# At most this often the gate counts every queue between sweeps (an O(n) walk).
MIN_SWEEP_GAP_S = 0.05

OUTBOUND = Gauge("simzmq_gate_outbound_bytes", "Bytes queued towards clients, all connections")
TRACKED = Gauge("simzmq_gate_limiter_entries", "Entries the gate tracks for a limit", ["table"])
LOOP_LAG = Histogram("simzmq_gate_loop_lag_seconds",
                     "How late a timer of the gate's event loop ran: how long the loop was busy",
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
LOG_SUPPRESSED = Counter("simzmq_gate_log_lines_suppressed_total",
                         "Log lines about limits, kicks and bad input left out by the log throttle", ["kind"])


# Descriptors a gate keeps beside its client connections: ZeroMQ sockets and
# their internal pipes, the HTTP listener, logs.
FD_RESERVE = 256
DEFAULT_MAX_CONNECTIONS = LimitsConfig().max_connections


def capped_by_descriptors(limits: LimitsConfig, soft_limit: int | None = None) -> LimitsConfig:
    """max_connections no higher than the descriptors allow (`soft_limit`,
    default the process's own, which `simzmq` raised to the hard limit at
    start): past that, accept() fails with EMFILE and the listener spins
    instead of refusing cleanly.

    The default max_connections is a ceiling that follows the machine: the
    gate's "listening" line says what it came to. A max_connections an
    operator chose and cannot have gets one warning with the fix."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = max(1, soft_limit - FD_RESERVE)
    if limits.max_connections <= cap or soft_limit == resource.RLIM_INFINITY:
        return limits
    if limits.max_connections != DEFAULT_MAX_CONNECTIONS:
        needed = limits.max_connections + FD_RESERVE
        log.warning("gate.limits.max_connections %d does not fit: the descriptor limit is %d and the gate keeps %d "
                    "for itself, so it holds at most %d connections; give it %d descriptors (LimitNOFILE=%d under "
                    "systemd, `ulimit -n %d` before starting it) or lower max_connections",
                    limits.max_connections, soft_limit, FD_RESERVE, cap, needed, needed, needed)
    return dataclasses.replace(limits, max_connections=cap)


def connection_ceiling(configured: LimitsConfig, effective: LimitsConfig) -> str:
    """How many connections the gate holds, for its "listening" line."""
    if effective.max_connections < configured.max_connections:
        limit = effective.max_connections + FD_RESERVE
        return f"up to {effective.max_connections} connections (what {limit} file descriptors allow)"
    return f"up to {effective.max_connections} connections"


class Gate:
    """`clock` (seconds, monotonic) and `loop` (call_later) default to the
    real ones; tests may pass their own."""

    def __init__(self, name: str, cfg: GateConfig, static_sk: bytes, brokers: list[BrokerEndpoints],
                 configure_socket=None, clock=None, loop=None, presence_interval_s: float | None = None):
        self.name = name
        self.cfg = cfg
        self.static_sk = static_sk
        self.max_frame = cfg.max_frame
        self.max_body = cfg.max_body
        self.brokers = brokers
        self.configure_socket = configure_socket
        self.connections: set[ClientConnection] = set()
        self.fanout = Fanout(self)
        self.ctx = zmq.Context.instance()
        self.backend: Backend | None = None
        self.tcp = None  # the client listener (asyncio Server)
        self.http = None
        self.clock = clock or time.monotonic
        self.loop = loop
        self.limiter = Limiter(capped_by_descriptors(cfg.limits))
        self.log_throttle = LogThrottle(self.limiter.cfg.log_lines_per_limit, self.limiter.cfg.log_interval_s)
        self._sweep_timer = None
        self._sweep_due = None
        self._last_prune = 0.0
        self._last_sweep = 0.0
        self.outbound_estimate = 0
        # Who is online here goes to the IM workers (presence, section 7) and
        # the push service: at least this often when the push service is on.
        self.presence_interval_s = presence_interval_s
        self.reporter: PresenceReporter | None = None  # once started
        self._presence_timer = None
        lim = self.limiter.cfg
        self.presence = GatePresence(lim.watch_per_request, lim.watch_per_connection)
        self.typing = TypingLimiter(lim.typing_peer_interval_s, lim.typing_per_s, lim.typing_burst)

    def now(self) -> float:
        return self.clock()

    def call_later(self, delay: float, callback, *args):
        loop = self.loop or asyncio.get_event_loop()
        return loop.call_later(delay, callback, *args)

    # -- limits -----------------------------------------------------------------

    def log_throttled(self, kind: str, fmt: str, *args, level: int = logging.INFO, exc_info=None) -> None:
        """One line per event, at most log_lines_per_limit of a kind per
        log_interval_s; the next line allowed says how many were left out.
        Everything a client (or a broken back end) can cause again and again
        is logged through here, so a flood cannot fill the disk."""
        ok, suppressed = self.log_throttle.allow(kind, self.now())
        if not ok:
            LOG_SUPPRESSED.labels(kind.split(":", 1)[0]).inc()
            return
        if suppressed:
            fmt += " (%d similar lines left out)"
            args = args + (suppressed,)
        log.log(level, fmt, *args, exc_info=exc_info)

    # -- connections (the transports call these) ---------------------------------

    def admit(self, address: str) -> bool:
        """Whether a new connection from `address` may stay (the connection
        limits and bans); if so, connection_ended() must follow."""
        refused = self.limiter.admit(address, self.now())
        if refused is None:
            return True
        RATE_LIMITED.labels(refused).inc()
        self.log_throttled("limit:" + refused, "refusing a connection from %s: %s limit", address, refused)
        return False

    def connection_started(self, transport, peer: str, address: str) -> ClientConnection:
        conn = ClientConnection(self, transport, peer, address)
        self.connections.add(conn)
        return conn

    def connection_ended(self, conn: ClientConnection | None, address: str) -> None:
        """An admitted connection from `address` is gone (`conn`: its session, if it got one)."""
        if conn is not None:
            conn.connection_lost()
            self.connections.discard(conn)
        self.limiter.release(address)

    def queued_write(self, n: int) -> None:
        """A connection queued `n` bytes behind others it has not sent yet.
        The estimate of what all connections hold grows by as much (what
        drains meanwhile is not subtracted); when it passes the gate-wide
        budget, the queues are counted exactly and the budget enforced now,
        not at the next sweep: a thousand connections fill up within one
        turn of the loop."""
        self.outbound_estimate += n
        if (self.outbound_estimate > self.limiter.cfg.max_outbound_total_bytes
                and self.now() - self._last_sweep >= MIN_SWEEP_GAP_S):
            self.sweep()

    def sweep(self) -> None:
        """Every second, and when the estimate says so: hold the bytes queued
        towards all clients under max_outbound_total_bytes (the biggest queues
        go first), and now and then forget limiter entries that no longer
        matter."""
        cfg = self.limiter.cfg
        self._last_sweep = self.now()
        queued = {}
        total = 0
        for conn in self.connections:
            n = conn.transport.queued()
            total += n
            if n and conn.state != CLOSED:  # closing ones are going anyway
                queued[conn] = n
        OUTBOUND.set(total)
        for conn in pick_slow_consumers(queued, cfg.max_outbound_total_bytes, cfg.slow_consumer_min_bytes):
            conn.slow_consumer("the gate's outbound budget is spent")
            total -= queued[conn]
        self.outbound_estimate = total
        now = self.now()
        if now - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = now
            for table, size in self.limiter.prune(now).items():
                TRACKED.labels(table).set(size)

    def _sweep_tick(self) -> None:
        now = self.now()
        if self._sweep_due is not None:
            LOOP_LAG.observe(max(0.0, now - self._sweep_due))
        try:
            self.sweep()
        finally:
            self._sweep_due = now + OUTBOUND_SWEEP_S
            self._sweep_timer = self.call_later(OUTBOUND_SWEEP_S, self._sweep_tick)

    # -- life cycle -------------------------------------------------------------

    async def start(self, host: str, port: int, http_host: str, http_port: int, ssl_options=None):
        """Listen for clients (TCP and HTTP), then connect to the brokers.
        ListenError if a port cannot be had: nothing else was started then."""
        self.loop = self.loop or asyncio.get_running_loop()
        cfg = self.cfg
        try:
            self.tcp = await gate_tcp.listen(self, host, port)
        except OSError as exc:
            raise ListenError(f"cannot listen for clients on tcp://{host}:{port}: {exc.strerror or exc}") from None
        try:
            self.http = make_app(self).listen(http_port, http_host, ssl_options=ssl_options,
                                              xheaders=cfg.behind_tls_proxy)
        except OSError as exc:
            self.tcp.close()
            raise ListenError(f"cannot listen for HTTP on {http_host}:{http_port}: {exc.strerror or exc}") from None
        self.backend = Backend(self.ctx, self.brokers, cfg, self.fanout.on_notification, self.fanout.resync,
                               self.configure_socket)
        self.backend.start()
        interval_s, ttl_ms = report_timing(cfg.idle_timeout_s, self.presence_interval_s)
        self.reporter = PresenceReporter(self.name, interval_s, self.backend.request, ttl_ms)
        self._presence_tick()
        self.fanout.check_holes()
        self._sweep_tick()
        log.info("gate %s listening: clients tcp://%s:%d, %s; http%s://%s:%d (health, history, metrics, ws); "
                 "brokers %s", self.name, host, port, connection_ceiling(self.cfg.limits, self.limiter.cfg),
                 "s" if ssl_options else "", http_host, http_port,
                 ", ".join(f"{b.name} {b.frontend} / {b.notify_out}" for b in self.brokers))

    def _presence_tick(self) -> None:
        self.reporter.snapshot(self.fanout.sessions, self.presence.local_states())
        TRACKED.labels("typing").set(self.typing.prune(self.now()))
        self._presence_timer = self.call_later(self.reporter.interval_s, self._presence_tick)

    async def shutdown(self):
        log.info("gate %s shutting down: kicking %d connections", self.name, len(self.connections))
        self.tcp.close()
        self.http.stop()
        self.fanout.stop()
        if self._sweep_timer:
            self._sweep_timer.cancel()
        for conn in list(self.connections):
            conn.kick(KickCode.SHUTDOWN, "server shutting down")
        if self.reporter is not None:
            self._presence_timer.cancel()
            self.reporter.close()  # goes out with the link's next flush, before it closes
        await asyncio.sleep(0.2)
        self.backend.close()


class ListenError(Exception):
    """A port the gate was told to listen on cannot be had (taken, not allowed)."""


def check_http_exposure(cfg: GateConfig) -> dict | None:
    """TLS options for the HTTP API, or None for plain HTTP where that is
    allowed (protocol.md section 6: the bearer token never crosses a network
    in the clear)."""
    if cfg.tls_cert and cfg.tls_key:
        return {"certfile": cfg.tls_cert, "keyfile": cfg.tls_key}
    host = cfg.http_host
    if host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.") or cfg.behind_tls_proxy:
        return None
    raise SystemExit(f"refusing plain HTTP on {host}: set gate.tls_cert and gate.tls_key, "
                     "or gate.behind_tls_proxy = true if a TLS-terminating proxy is in front")


def run(name: str, cfg: Config, static_sk: bytes, port: int, http_port: int, configure_socket=None) -> None:
    """Run a gate (its client and HTTP ports: `port`, `http_port`) until SIGTERM/SIGINT."""
    g = cfg.gate
    ssl_options = check_http_exposure(g)
    # With the push service on, the gate reports who is online to it.
    presence_interval_s = cfg.push.presence_interval_s if cfg.push.enabled else None

    async def main():
        gate = Gate(name, g, static_sk, broker_pair(cfg.broker), configure_socket,
                    presence_interval_s=presence_interval_s)
        try:
            await gate.start(g.host, port, g.http_host, http_port, ssl_options)
        except ListenError as exc:
            log.error("gate %s cannot start: %s", name, exc)
            raise SystemExit(1) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await gate.shutdown()
        log.info("gate %s stopped", name)

    uvloop.run(main())
