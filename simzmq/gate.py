"""The gate: client connections in, MDP requests out, notifications pushed down.

A thin I/O shell. The protocol itself lives in simzmq.wire (framing, handshake,
channel, codecs, request rules); the gate only decides, per decrypted request,
whether it can answer alone (Ping, a request before Login), must refuse it, or
forwards it to the `im` service through the broker. It keeps no durable state:
losing a gate loses connections, which clients resume with their token.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import json
import logging
import math
import resource
import secrets
import signal
import socket
import time

import uvloop
import zmq
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from tornado import web, websocket
from tornado.iostream import StreamClosedError, StreamBufferFullError
from tornado.tcpserver import TCPServer

from simzmq import limits as lim
from simzmq.gatelink import Backend, BrokerEndpoints
from simzmq.limits import Limiter, LimitsConfig, LogThrottle, Verdict, pick_slow_consumers
from simzmq.pushlog import PushLog
from simzmq.web import web_routes
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN, CODECS, bin_newmsg_seq, peek_header
from simzmq.wire.errors import ProtocolError, ShortPayload
from simzmq.wire.frames import FrameDecoder, encode_frame
from simzmq.wire.handshake import MAX_HANDSHAKE_FRAME, GateHandshake
from simzmq.wire.messages import CLIENT_REQUESTS, ErrorCode, KickCode
from simzmq.wire.rules import is_valid_user_id, validate_request

log = logging.getLogger("simzmq.gate")

SESSION_ID_BYTES = 16
# Bytes read from a client socket at once. It bounds what a connection holds
# between frames (twice this: the socket read and the frame decoder), which
# over many connections is most of a busy gate's memory; a large frame simply
# takes several reads.
READ_CHUNK = 16384
# How often the gate sums what it queued towards clients (the gate-wide
# outbound budget) and forgets limiter entries that carry no information.
OUTBOUND_SWEEP_S = 1.0
PRUNE_EVERY_S = 10.0
# Frames of one connection handled before the event loop serves the others.
# Small, so that a thousand busy clients still let the loop come round (the
# broker link, timers, HTTP) every few hundred milliseconds: a frame costs a
# few tens of microseconds.
FRAMES_PER_TURN = 8
# At most this often the gate counts every queue between sweeps (an O(n) walk).
MIN_SWEEP_GAP_S = 0.05

CONNECTIONS = Gauge("simzmq_gate_connections", "Open client connections")
SESSIONS = Gauge("simzmq_gate_sessions", "Logged-in client connections")
REQUESTS = Counter("simzmq_gate_requests_total", "Client requests by type and outcome", ["type", "outcome"])
PUSHES = Counter("simzmq_gate_pushes_total", "Notifications pushed to clients", ["type"])
KICKS = Counter("simzmq_gate_kicks_total", "Connections kicked, by reason", ["reason"])
CATCHUPS = Counter("simzmq_gate_catchups_total", "Catch-ups of an online user from the store")
HOLES = Counter("simzmq_gate_push_holes_total", "Lost pushes noticed by a hole in a user's seqs")
CLOSED_BAD = Counter("simzmq_gate_protocol_closes_total", "Connections closed for bad input", ["why"])
RATE_LIMITED = Counter("simzmq_gate_rate_limited_total",
                       "Requests refused with rate_limited and connections refused, by limit", ["limit"])
BACKPRESSURE = Counter("simzmq_gate_backpressure_total",
                       "Times a connection's reading paused: at max_pending_requests (pending), or more "
                       "than pause_reading_bytes behind in reading (behind)", ["why"])
OUTBOUND = Gauge("simzmq_gate_outbound_bytes", "Bytes queued towards clients, all connections")
TRACKED = Gauge("simzmq_gate_limiter_entries", "Entries the gate tracks for a limit", ["table"])
LOOP_LAG = Histogram("simzmq_gate_loop_lag_seconds",
                     "How late a timer of the gate's event loop ran: how long the loop was busy",
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
LOG_SUPPRESSED = Counter("simzmq_gate_log_lines_suppressed_total",
                         "Log lines about limits, kicks and bad input left out by the log throttle", ["kind"])

TYPE_NAMES = {t: cls.__name__ for t, cls in m.MESSAGES.items()}


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------
# One client connection, over TCP or WebSocket.
# ---------------------------------------------------------------------------

HANDSHAKE, WAIT_HEADER, OPEN, CLOSED = range(4)


class ClientConnection:
    """One client: handshake, then requests in and replies and pushes out.

    `transport` writes payloads and closes (TcpTransport, WsTransport, or a
    test's fake); `address` is the client's IP address, which per-address
    limits count. Timers and the clock come from the gate.
    """

    def __init__(self, gate: "Gate", transport, peer: str, address: str = ""):
        self.gate = gate
        self.transport = transport
        self.peer = peer
        self.address = address
        self.state = HANDSHAKE
        self.handshake = GateHandshake(gate.static_sk)
        self.sender = None
        self.receiver = None
        self.codec = None
        self.session = secrets.token_bytes(SESSION_ID_BYTES)
        self.user: str | None = None
        self.device = ""
        self.token = b""
        self.login_pending = False
        now = gate.now()
        self.last_rx = now
        self.bucket = gate.limiter.connection_bucket(now)
        # Requests forwarded and not yet answered; at max_pending_requests the
        # gate stops reading this connection (`paused`) until replies drain.
        # The Event that wakes the reader is made only when first needed:
        # most connections never pause, and an Event per connection is a
        # noticeable part of accepting one.
        self.pending = 0
        self.paused = False
        self._unpaused: asyncio.Event | None = None
        self._lost = False
        self.final_sent = False  # the frame with TAG_FINAL is sealed: nothing may follow
        self._handshake_timer = gate.call_later(gate.cfg["handshake_timeout_s"], self._handshake_expired)
        self._idle_timer = gate.call_later(gate.cfg["idle_timeout_s"], self._idle_check)
        CONNECTIONS.inc()

    # -- input --------------------------------------------------------------

    def payload_received(self, payload: bytes) -> None:
        """One frame's payload (TCP: already de-framed; WebSocket: one message)."""
        if self.state == CLOSED:
            return
        self.last_rx = self.gate.now()
        try:
            if self.state == OPEN:
                plaintext, final = self.receiver.open(payload)
                self.message_received(plaintext)
                if final and self.state != CLOSED:
                    self.close("peer sent its final frame")
            elif self.state == HANDSHAKE:
                welcome = self.handshake.receive_hello(payload)
                self.codec = CODECS[self.handshake.codec_id]
                self.sender = self.handshake.sender
                ready = m.Ready(server_ms=now_ms(), max_frame=self.gate.max_frame,
                                max_body=self.gate.max_body, idle_timeout_s=self.gate.cfg["idle_timeout_s"])
                self.transport.write_payloads([welcome, self.sender.seal(self.codec.encode(ready, 0))])
                self.state = WAIT_HEADER
            elif self.state == WAIT_HEADER:
                self.receiver = self.handshake.receive_c2s_header(payload)
                self.handshake = None
                self.state = OPEN
                self.transport.set_max_frame(self.gate.max_frame)
                self._handshake_timer.cancel()
        except ShortPayload:
            CLOSED_BAD.labels("short_payload").inc()
            self.kick(KickCode.PROTOCOL_VIOLATION, "payload shorter than 5 bytes")
        except ProtocolError as exc:
            # Handshake and channel failures: close at once, send nothing.
            self.bad_input(type(exc).__name__, str(exc))
        except SlowConsumer:
            self.slow_consumer("cannot take the handshake")

    def must_wait(self) -> bool:
        """Backpressure, asked before each frame is read: whether
        max_pending_requests are with the back end, or the client is more
        than pause_reading_bytes behind in reading what it was sent (a client
        that asks and never reads would otherwise make the back end produce
        replies only to pile them up here)."""
        return self.paused or self.gate.limiter.behind(self.transport.queued())

    async def ready_to_read(self) -> None:
        """Wait until must_wait() is over, or the connection is."""
        counted = False
        while self.state != CLOSED:
            if self.paused:
                if self._unpaused is None:
                    self._unpaused = asyncio.Event()
                self._unpaused.clear()
                await self._unpaused.wait()
            elif self.gate.limiter.behind(self.transport.queued()):
                if not counted:  # once per pause, however many writes it waits for
                    counted = True
                    _inc(BACKPRESSURE, "behind")
                if not await self.transport.flushed():
                    return
            else:
                return

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        if not paused and self._unpaused is not None:
            self._unpaused.set()

    def bad_input(self, why: str, detail: str) -> None:
        CLOSED_BAD.labels(why).inc()
        self.gate.log_throttled("bad_input", "closing %s: %s", self.peer, detail)
        self.close(detail)

    def message_received(self, plaintext: bytes) -> None:
        mtype, ref = peek_header(plaintext)
        # Every frame counts against the connection's rate, good or bad.
        verdict = self.bucket.check(self.gate.now())
        if verdict:
            self.limited(ref, lim.REQUESTS, verdict, "too many requests on this connection; slow down")
            return
        name = TYPE_NAMES.get(mtype, "unknown")
        if mtype not in CLIENT_REQUESTS:
            _inc(REQUESTS, "unknown", "bad_request")
            self.reply_error(ref, ErrorCode.BAD_REQUEST, f"not a client request type: {mtype}")
            return
        try:
            ref, msg = self.codec.decode(plaintext)
            validate_request(msg, self.gate.max_body)
        except ShortPayload:
            raise
        except ProtocolError as exc:
            _inc(REQUESTS, name, ErrorCode(exc.code).name.lower())
            self.reply_error(ref, exc.code, exc.reason)
            return
        handler = self._handlers[mtype]
        handler(self, ref, msg)

    def limited(self, ref: int, limit: str, verdict: Verdict, reason: str, request: str = "") -> None:
        """A request over `limit`: Error{rate_limited}, or Kick{abuse} when far over."""
        RATE_LIMITED.labels(limit).inc()
        if request:
            _inc(REQUESTS, request, "rate_limited")
        if verdict == Verdict.ABUSE:
            ban_s = self.gate.limiter.abused(self.address, self.gate.now())
            if ban_s:
                self.gate.log_throttled("ban", "banning %s for %.0f s: kicked for abuse", self.address, ban_s)
            self.kick(KickCode.ABUSE, f"far over the {limit} limit")
            return
        self.gate.log_throttled("limit:" + limit, "rate limited %s (%s): %s limit", self.peer, self.user, limit)
        self.reply_error(ref, ErrorCode.RATE_LIMITED, reason)

    def _ping(self, ref, msg: m.Ping):
        _inc(REQUESTS, "Ping", "ok")
        self.send_message(m.Pong(ts_ms=msg.ts_ms), ref)

    def _pong(self, ref, msg):
        _inc(REQUESTS, "Pong", "ok")

    def _register(self, ref, msg: m.Register):
        if not self.gate.cfg["allow_register"]:
            _inc(REQUESTS, "Register", "forbidden")
            self.reply_error(ref, ErrorCode.FORBIDDEN, "registration is closed")
            return
        verdict, limit = self.gate.limiter.register(msg.user, self.address, self.gate.now())
        if verdict:
            self.limited(ref, limit, verdict, "too many registrations; retry later", "Register")
            return
        self.forward(ref, msg.user, msg, "Register")

    def _login(self, ref, msg: m.Login):
        gate = self.gate
        if self.user is not None or self.login_pending:
            _inc(REQUESTS, "Login", "bad_request")
            self.reply_error(ref, ErrorCode.BAD_REQUEST, "already logged in")
            return
        password = bool(msg.password)
        wait, limit = gate.limiter.login_wait(msg.user, self.address, password, gate.now())
        if wait > 0:
            self.limited(ref, limit, Verdict.LIMIT,
                         f"too many failed logins; retry in {math.ceil(wait)} s", "Login")
            return
        if gate.sessions_full(msg.user, msg.device):
            self.limited(ref, lim.SESSIONS, Verdict.LIMIT,
                         f"too many sessions of this user on this gate (at most "
                         f"{gate.limiter.cfg.max_sessions_per_user}); log out elsewhere", "Login")
            return
        self.login_pending = True
        self.device = msg.device
        gate.login_started(msg.user)

        def logged_in(ref, reply):
            self.login_pending = False
            gate.login_ended(msg.user)
            if isinstance(reply, m.LoginOk):
                gate.limiter.login_succeeded(msg.user)
                if self.state == CLOSED:
                    return None
                self.user = reply.user
                self.token = reply.token
                gate.session_started(self, reply.max_seq)
            elif isinstance(reply, m.Error) and reply.code == ErrorCode.AUTH_FAILED:
                gate.limiter.login_failed(msg.user, self.address, password, gate.now())
            return reply
        self.forward(ref, msg.user, msg, "Login", logged_in)

    def _logout(self, ref, msg):
        if self.user is None:
            _inc(REQUESTS, "Logout", "ok")
            self.send_message(m.Ok(), ref, final=True)
            self.close("logged out")
            return
        self.forward(ref, self.user, m.Revoke(token=self.token), "Logout", self._logged_out)

    def _logged_out(self, ref, reply):
        if isinstance(reply, m.Ok):
            self.send_message(reply, ref, final=True)
            self.close("logged out")
            return None
        return reply

    def _session_request(self, ref, msg):
        name = type(msg).__name__
        if self.user is None:
            _inc(REQUESTS, name, "not_logged_in")
            self.reply_error(ref, ErrorCode.NOT_LOGGED_IN, "log in first")
            return
        if type(msg) is m.Send:
            verdict = self.gate.limiter.send(self.user, self.gate.now())
            if verdict:
                self.limited(ref, lim.SENDS, verdict, "too many messages from this user; retry later", "Send")
                return
        self.forward(ref, self.user, msg, name)

    _handlers = {
        m.Ping.TYPE: _ping,
        m.Pong.TYPE: _pong,
        m.Register.TYPE: _register,
        m.Login.TYPE: _login,
        m.Logout.TYPE: _logout,
        m.Send.TYPE: _session_request,
        m.Sync.TYPE: _session_request,
        m.Read.TYPE: _session_request,
        m.Convs.TYPE: _session_request,
    }

    # -- the back end -------------------------------------------------------

    def forward(self, ref, key: str, msg, name: str, on_reply=None):
        """Send `msg` to the im service; its reply (or an Error the gate makes
        when there is none) goes through `on_reply`, which may replace it or
        return None when it has answered itself, and then to the client."""
        payload = BIN.encode(msg, 0)
        self.pending += 1
        if not self.paused and self.gate.limiter.reading_paused(self.pending):
            _inc(BACKPRESSURE, "pending")
            self._set_paused(True)

        def done(reply_payload):
            self.pending -= 1
            if self.paused and not self.gate.limiter.reading_paused(self.pending):
                self._set_paused(False)
            if (on_reply is None and self.codec is BIN and reply_payload is not None
                    and reply_payload[:1] in PASS_THROUGH_REPLIES and self.state != CLOSED):
                # The usual case, a bin client and a success reply: the
                # worker's payload is already what the client reads, but for
                # the ref.
                _inc(REQUESTS, name, "ok")
                self.send_plaintext(reply_payload[:1] + ref.to_bytes(4, "big") + reply_payload[5:])
                return
            if reply_payload is None:
                reply = m.Error(code=int(ErrorCode.UNAVAILABLE), reason="the back end did not answer in time; retry")
            else:
                try:
                    _, reply = BIN.decode(reply_payload)
                except ProtocolError:
                    self.gate.log_throttled("backend", "undecodable reply from the im service for %s", name,
                                            level=logging.WARNING)
                    reply = m.Error(code=int(ErrorCode.INTERNAL), reason="bad reply from the back end")
            reply = _checked_reply(self.gate, reply, name)
            if on_reply is not None:
                reply = on_reply(ref, reply)
            if reply is None:
                _inc(REQUESTS, name, "ok")
                return
            if isinstance(reply, m.Error):
                _inc(REQUESTS, name, _code_name(reply.code))
            else:
                _inc(REQUESTS, name, "ok")
            if self.state != CLOSED:
                self.send_message(reply, ref)

        self.gate.backend.request(key.encode(), self.session, payload, done)

    # -- output -------------------------------------------------------------

    def send_message(self, msg, ref: int, final: bool = False) -> None:
        if self.state not in (OPEN, WAIT_HEADER):
            return
        self.send_plaintext(self.codec.encode(msg, ref), final)

    def send_plaintext(self, plaintext: bytes, final: bool = False) -> None:
        if self.state == CLOSED or self.final_sent:
            return
        # Checked before sealing: a sealed frame that is not sent would break
        # the stream, and the Kick after it could not be read. (A frame always
        # fits into an empty queue.)
        limit = self.gate.cfg["max_outbound_bytes"]
        queued = self.transport.queued()
        if queued and queued + len(plaintext) > limit:
            self.slow_consumer(f"more than {limit} bytes waiting to be read")
            return
        self.final_sent = final
        try:
            self.transport.write_payloads([self.sender.seal(plaintext, final)])
        except SlowConsumer:
            self.slow_consumer(f"more than {limit} bytes waiting to be read")
            return
        if queued:
            # Last: the gate may enforce its budget now and kick this very
            # connection, which must not be in the middle of a write then.
            self.gate.queued_write(len(plaintext))

    def slow_consumer(self, why: str) -> None:
        """Kick{slow_consumer} if it still fits, then close; what was queued
        goes when the connection closes (at the latest after close_linger_s)."""
        if self.state == CLOSED:
            return
        KICKS.labels("slow_consumer").inc()
        self.gate.log_throttled("kick:slow_consumer", "kicking %s (%s): slow consumer, %s", self.peer, self.user, why)
        if self.state == OPEN and not self.final_sent:
            self.final_sent = True
            try:
                self.transport.write_payloads([self.sender.seal(self.codec.encode(
                    m.Kick(code=int(KickCode.SLOW_CONSUMER), reason="slow consumer"), 0), final=True)])
            except SlowConsumer:
                pass
        self.close("slow consumer")

    def push(self, payload: bytes, msg_type: int, decoded) -> None:
        """A notification (bin payload, ref 0) for this session."""
        if self.state != OPEN:
            return
        _inc(PUSHES, TYPE_NAMES.get(msg_type, "unknown"))
        if self.codec is BIN:
            self.send_plaintext(payload)
            return
        try:
            msg = decoded()
        except ProtocolError as exc:
            self.gate.log_throttled("backend", "undecodable notification for %s: %s", self.user, exc,
                                    level=logging.WARNING)
            return
        self.send_plaintext(self.codec.encode(msg, 0))

    def reply_error(self, ref, code, reason: str) -> None:
        self.send_message(m.Error(code=int(code), reason=reason[:256]), ref)

    def kick(self, code: KickCode, reason: str) -> None:
        if self.state == CLOSED:
            return
        KICKS.labels(code.name.lower()).inc()
        self.gate.log_throttled("kick:" + code.name.lower(), "kicking %s (%s): %s", self.peer, self.user, reason)
        if self.state == OPEN or self.state == WAIT_HEADER:
            self.send_message(m.Kick(code=int(code), reason=reason[:256]), 0, final=True)
        self.close(reason)

    def close(self, why: str) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.transport.close()
        self.connection_lost()

    def connection_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        self.state = CLOSED
        self._set_paused(False)  # a reader paused for backpressure must see the end
        self._handshake_timer.cancel()
        self._idle_timer.cancel()
        CONNECTIONS.dec()
        if self.user is not None:
            self.gate.session_ended(self)

    # -- timers -------------------------------------------------------------

    def _handshake_expired(self):
        if self.state in (HANDSHAKE, WAIT_HEADER):
            CLOSED_BAD.labels("handshake_timeout").inc()
            self.gate.log_throttled("bad_input", "closing %s: no handshake within %ss", self.peer,
                                    self.gate.cfg["handshake_timeout_s"])
            self.close("handshake timeout")

    def _idle_check(self):
        if self.state == CLOSED:
            return
        idle = self.gate.cfg["idle_timeout_s"]
        left = self.last_rx + idle - self.gate.now()
        if left <= 0:
            if self.gate.limiter.behind(self.transport.queued()):
                # Not idle: paused, because it reads nothing of what it is sent.
                self.slow_consumer(f"read nothing for {idle} s")
            else:
                self.kick(KickCode.IDLE, f"nothing received for {idle} s")
        else:
            self._idle_timer = self.gate.call_later(left, self._idle_check)


# What the im service may answer a client's request with; anything else (an
# internal message, an error code this protocol does not have) is a bug or a
# newer worker, and the client gets Error{internal} instead.
CLIENT_REPLIES = frozenset({m.LoginOk, m.Error, m.SendOk, m.Batch, m.Ok, m.ConvList})
ERROR_CODES = frozenset(int(c) for c in ErrorCode)


# Reply types a bin client gets exactly as the worker encoded them (with its
# ref put in); an Error goes through _checked_reply first.
PASS_THROUGH_REPLIES = frozenset(bytes([cls.TYPE]) for cls in (m.SendOk, m.Batch, m.Ok, m.ConvList))


def _checked_reply(gate: "Gate", reply, name: str):
    if type(reply) not in CLIENT_REPLIES or (type(reply) is m.Error and reply.code not in ERROR_CODES):
        gate.log_throttled("backend", "the im service answered %s with %s; the client gets internal", name,
                           type(reply).__name__ if type(reply) is not m.Error else f"error code {reply.code}",
                           level=logging.WARNING)
        return m.Error(code=int(ErrorCode.INTERNAL), reason="bad reply from the back end")
    return reply


_metric_children: dict = {}


def _inc(metric, *labels) -> None:
    """metric.labels(*labels).inc(), keeping the children: labels() takes a
    lock and builds a key on every call, and the gate counts every request
    and push."""
    key = (metric, labels)
    child = _metric_children.get(key)
    if child is None:
        child = _metric_children[key] = metric.labels(*labels)
    child.inc()


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return str(code)


class SlowConsumer(Exception):
    pass


async def _completed(future) -> bool:
    """Whether `future` (a write) completed well; False at once for None.

    Either way it yields to the loop once after the write is done: the
    future's own callbacks (the transport's `_written`, which hands the
    backlog over or drops it) are queued, not yet run, and awaiting a future
    that is already done does not yield. A reader that looked again before
    them would see the same queue and wait on the same future, forever,
    with the loop blocked.
    """
    if future is None:
        return False
    try:
        await future
        ok = True
    except Exception:  # the stream closed: the read loop sees it next
        ok = False
    await asyncio.sleep(0)
    return ok


def _queued_bytes(stream) -> int:
    """Bytes a Tornado stream holds for the peer (0 once it is closed)."""
    buf = getattr(stream, "_write_buffer", None)
    return len(buf) if buf is not None else 0


class TcpTransport:
    """Frames to and from one TCP client.

    Tornado makes a Future for every write and keeps it until its bytes have
    reached the kernel, which for a peer that does not read is a few hundred
    bytes of bookkeeping per frame of a few dozen. So only one write is ever
    in flight: frames written meanwhile wait here, as plain bytes, and go out
    together when it completes.
    """

    def __init__(self, stream, gate: "Gate"):
        self.stream = stream
        self.gate = gate
        self.decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
        self.closing = False
        self.in_flight = None
        self.backlog = bytearray()

    def set_max_frame(self, n: int) -> None:
        self.decoder.max_frame = n

    def queued(self) -> int:
        return len(self.backlog) + _queued_bytes(self.stream)

    def write_payloads(self, payloads) -> None:
        if self.stream.closed():
            return
        data = b"".join(encode_frame(p) for p in payloads)
        if self.in_flight is not None or self.backlog:
            self.backlog += data
        else:
            self._hand_over(data)

    async def flushed(self) -> bool:
        """Wait until the write in flight has reached the kernel; False if
        there was none, or it failed."""
        return await _completed(self.in_flight)

    def _hand_over(self, data) -> None:
        try:
            fut = self.stream.write(data)
        except StreamBufferFullError:
            raise SlowConsumer() from None
        except StreamClosedError:
            return
        if not fut.done():
            self.in_flight = fut
            fut.add_done_callback(self._written)

    def _written(self, fut) -> None:
        self.in_flight = None
        if fut.cancelled() or fut.exception() is not None:
            # The stream is gone: what waited for it never leaves, and must
            # not be counted as queued (a reader paused behind would wait on
            # it forever).
            self.backlog = bytearray()
            return
        if not self.backlog:
            return
        data, self.backlog = bytes(self.backlog), bytearray()
        try:
            self._hand_over(data)
        except SlowConsumer:
            self.stream.close()  # the backstop; the connection checks long before

    def close(self) -> None:
        """A lingering close: what was written (a Kick, a final Ok) goes out
        first, then the write side shuts, so the peer reads it all and then
        EOF, while what the peer still sends is read and dropped (closing a
        socket with unread input would reset the connection and could destroy
        the Kick before the peer reads it). The socket closes when the peer
        closes its side, or after close_linger_s at the latest: a peer that
        does not read cannot keep its queue alive."""
        if self.closing:
            return
        self.closing = True
        stream = self.stream
        if stream.closed():
            return
        if self.queued() > self.gate.limiter.cfg.slow_consumer_min_bytes:
            # A peer this far behind is not reading: lingering would only
            # hold its queue. Closed at once, the memory goes now.
            self.backlog = bytearray()
            stream.close()
            return
        if self.backlog:
            data, self.backlog = bytes(self.backlog), bytearray()
            try:
                stream.write(data)
            except (StreamBufferFullError, StreamClosedError):
                stream.close()
                return
        self.gate.call_later(self.gate.limiter.cfg.close_linger_s, stream.close)
        if stream.writing():
            stream.write(b"").add_done_callback(lambda _f: self._shut_write())
        else:
            self._shut_write()

    def _shut_write(self) -> None:
        stream = self.stream
        try:
            stream.socket.shutdown(socket.SHUT_WR)
        except (OSError, AttributeError):
            stream.close()


# Descriptors a gate keeps beside its client connections: ZeroMQ sockets and
# their internal pipes, the HTTP listener, logs.
FD_RESERVE = 256


def capped_by_descriptors(limits: LimitsConfig, soft_limit: int | None = None) -> LimitsConfig:
    """max_connections no higher than the descriptors allow: past that, accept()
    fails with EMFILE and the listener spins instead of refusing cleanly."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = max(1, soft_limit - FD_RESERVE)
    if limits.max_connections <= cap:
        return limits
    log.warning("max_connections %d is more than %d file descriptors allow; holding at most %d connections "
                "(raise the descriptor limit to hold more)", limits.max_connections, soft_limit, cap)
    return dataclasses.replace(limits, max_connections=cap)


class GateTCPServer(TCPServer):
    def __init__(self, gate: "Gate", **kw):
        super().__init__(max_buffer_size=gate.max_frame + 8, **kw)
        self.gate = gate

    async def handle_stream(self, stream, address):
        gate = self.gate
        ip = address[0] if isinstance(address, tuple) else str(address)
        refused = gate.limiter.admit(ip, gate.now())
        if refused is not None:
            gate.connection_refused(refused, ip)
            stream.close()
            return
        try:
            await self._serve(stream, ip, f"{ip}:{address[1]}" if isinstance(address, tuple) else ip)
        finally:
            gate.limiter.release(ip)

    async def _serve(self, stream, ip: str, peer: str):
        gate = self.gate
        # The connection holds its queue under max_outbound_bytes itself; this
        # is the backstop (room for one more frame and the Kick).
        stream.max_write_buffer_size = gate.cfg["max_outbound_bytes"] + gate.max_frame + 1024
        stream.set_nodelay(True)
        stream.read_chunk_size = READ_CHUNK
        transport = TcpTransport(stream, gate)
        conn = ClientConnection(gate, transport, peer, ip)
        gate.connections.add(conn)
        decoder = transport.decoder
        try:
            while True:
                data = await stream.read_bytes(READ_CHUNK, partial=True)
                if conn.state == CLOSED:
                    continue  # a lingering close: dropped (TcpTransport.close)
                decoder.append(data)
                # One payload at a time: the frame limit rises when the
                # handshake completes, which may be in the middle of this chunk;
                # and at max_pending_requests the rest waits, unread.
                # A client whose bytes are always there would keep the loop to
                # itself: after FRAMES_PER_TURN frames the others have a turn.
                turn = 0
                try:
                    while conn.state != CLOSED:
                        if conn.must_wait():
                            await conn.ready_to_read()
                            if conn.must_wait() or stream.closed():
                                # No write to wait for, or the peer is gone
                                # (what it sent is not worth serving): the
                                # socket read below ends or resumes it.
                                break
                            continue
                        if turn >= FRAMES_PER_TURN:
                            turn = 0
                            await asyncio.sleep(0)
                            continue
                        payload = decoder.next_payload()
                        if payload is None:
                            break
                        turn += 1
                        conn.payload_received(payload)
                except ProtocolError as exc:
                    conn.bad_input(type(exc).__name__, str(exc))
                await asyncio.sleep(0)
        except StreamClosedError:
            pass
        except Exception:
            gate.log_throttled("internal", "connection %s failed", conn.peer, level=logging.ERROR, exc_info=True)
            conn.close("internal error")
        finally:
            conn.connection_lost()
            gate.connections.discard(conn)
            stream.close()


# ---------------------------------------------------------------------------
# HTTP: health, history, metrics, WebSocket transport.
# ---------------------------------------------------------------------------

class HealthHandler(web.RequestHandler):
    def get(self):
        gate: Gate = self.application.settings["gate"]
        ok = gate.backend.reachable(time.monotonic())
        self.set_status(200 if ok else 503)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": "ok" if ok else "unavailable", "gate": gate.name,
                                "broker": gate.backend.broker_name, "failovers": gate.backend.failovers,
                                "connections": len(gate.connections),
                                "sessions": sum(len(s) for s in gate.sessions.values())}))


class HistoryHandler(web.RequestHandler):
    async def get(self, peer: str):
        gate: Gate = self.application.settings["gate"]
        verdict = gate.limiter.history(self.request.remote_ip or "", gate.now())
        if verdict:
            RATE_LIMITED.labels(lim.HISTORY).inc()
            gate.log_throttled("limit:" + lim.HISTORY, "rate limited http %s: history limit", self.request.remote_ip)
            return self._json(429, {"error": "rate_limited", "reason": "too many history requests; retry later"})
        auth = self.request.headers.get("Authorization", "")
        token = None
        if auth.startswith("Bearer "):
            try:
                token = bytes.fromhex(auth[7:].strip())
            except ValueError:
                token = None
        if not token or len(token) > 64:
            return self._json(401, {"error": "auth_failed", "reason": "missing or malformed bearer token"})
        if not is_valid_user_id(peer):
            return self._json(400, {"error": "bad_request", "reason": "invalid peer"})
        try:
            before = int(self.get_query_argument("before", "0"))
            limit = int(self.get_query_argument("limit", "50"))
        except ValueError:
            return self._json(400, {"error": "bad_request", "reason": "before and limit are integers"})
        if not (0 <= before < 2**53) or not (1 <= limit <= 100):
            return self._json(400, {"error": "bad_request", "reason": "before ≥ 0, 1 ≤ limit ≤ 100"})
        fut = asyncio.get_event_loop().create_future()
        gate.backend.request(token.hex().encode(), b"",
                             BIN.encode(m.History(token=token, peer=peer, before=before, limit=limit), 0),
                             lambda reply: fut.done() or fut.set_result(reply))
        reply_payload = await fut
        if reply_payload is None:
            return self._json(503, {"error": "unavailable"})
        try:
            _, reply = BIN.decode(reply_payload)
        except ProtocolError:
            return self._json(500, {"error": "internal"})
        if isinstance(reply, m.Error):
            status = 401 if reply.code == ErrorCode.AUTH_FAILED else 400
            return self._json(status, {"error": _code_name(reply.code), "reason": reply.reason})
        if not isinstance(reply, m.HistoryPage):
            return self._json(500, {"error": "internal"})
        self._json(200, {"messages": [
            {"msg_id": x.msg_id, "sender": x.sender, "to": x.to, "kind": x.kind, "ts_ms": x.ts_ms,
             "body": base64.b64encode(x.body).decode()} for x in reply.msgs], "more": reply.more})

    def _json(self, status, obj):
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj))


class MetricsHandler(web.RequestHandler):
    def get(self):
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest())


class WsTransport:
    """Frames to and from one WebSocket client; like TcpTransport, one write
    in flight and the rest waiting here."""

    def __init__(self, handler, gate: "Gate"):
        self.handler = handler
        self.gate = gate
        self.max_frame = MAX_HANDSHAKE_FRAME
        self.max_outbound = gate.cfg["max_outbound_bytes"]
        self.in_flight = None
        self.backlog: collections.deque = collections.deque()
        self.backlog_bytes = 0

    def set_max_frame(self, n):
        self.max_frame = n

    def _stream(self):
        ws = self.handler.ws_connection
        return getattr(ws, "stream", None) if ws is not None else None

    def queued(self) -> int:
        stream = self._stream()
        return self.backlog_bytes + (_queued_bytes(stream) if stream is not None else 0)

    def write_payloads(self, payloads):
        if self.handler.ws_connection is None:
            return
        if self.queued() > self.max_outbound + self.gate.max_frame:
            raise SlowConsumer()  # the backstop; ClientConnection checks first
        for p in payloads:
            self.backlog.append(p)
            self.backlog_bytes += len(p)
        if self.in_flight is None:
            self._hand_over()

    async def flushed(self) -> bool:
        """As TcpTransport.flushed."""
        return await _completed(self.in_flight)

    def _hand_over(self):
        while self.backlog and self.in_flight is None:
            p = self.backlog.popleft()
            self.backlog_bytes -= len(p)
            try:
                fut = self.handler.write_message(p, binary=True)
            except websocket.WebSocketClosedError:
                self.backlog.clear()
                self.backlog_bytes = 0
                return
            if not fut.done():
                self.in_flight = fut
                fut.add_done_callback(self._written)

    def _written(self, fut):
        self.in_flight = None
        if fut.cancelled() or fut.exception() is not None:
            self.backlog.clear()
            self.backlog_bytes = 0
            return
        self._hand_over()

    def close(self):
        handler = self.handler
        if self.queued() > self.gate.limiter.cfg.slow_consumer_min_bytes:
            self.backlog.clear()
            self.backlog_bytes = 0
            self._abort()  # not reading: do not hold its queue
            return
        while self.backlog:  # the last frames (a Kick) go before the close
            try:
                handler.write_message(self.backlog.popleft(), binary=True)
            except websocket.WebSocketClosedError:
                break
        self.backlog_bytes = 0
        handler.close()
        # A peer that never reads never answers the close frame either.
        self.gate.call_later(self.gate.limiter.cfg.close_linger_s, self._abort)

    def _abort(self):
        ws = self.handler.ws_connection
        stream = getattr(ws, "stream", None) if ws is not None else None
        if stream is not None and not stream.closed():
            stream.close()


class WebSocketHandler(websocket.WebSocketHandler):
    conn = None
    address = None
    turn = 0

    def check_origin(self, origin):
        # The channel is authenticated end to end by the handshake, not by cookies,
        # so a foreign origin gains nothing.
        return True

    def open(self):
        gate: Gate = self.application.settings["gate"]
        address = self.request.remote_ip or ""
        refused = gate.limiter.admit(address, gate.now())
        if refused is not None:
            gate.connection_refused(refused, address)
            self.close()
            return
        self.address = address
        self.transport = WsTransport(self, gate)
        self.conn = ClientConnection(gate, self.transport, f"ws:{address}", address)
        gate.connections.add(self.conn)

    async def on_message(self, message):
        conn = self.conn
        if conn is None:
            return
        if isinstance(message, str) or len(message) > self.transport.max_frame:
            conn.bad_input("ws_frame", "text or oversized WebSocket message")
            return
        conn.payload_received(message)
        # Tornado reads the next message when this returns: backpressure, and
        # a turn for the other connections now and then.
        if conn.must_wait():
            await conn.ready_to_read()
        self.turn += 1
        if self.turn >= FRAMES_PER_TURN:
            self.turn = 0
            await asyncio.sleep(0)

    def on_close(self):
        gate: Gate = self.application.settings["gate"]
        if self.conn is not None:
            self.conn.connection_lost()
            gate.connections.discard(self.conn)
        if self.address is not None:
            gate.limiter.release(self.address)
            self.address = None


# ---------------------------------------------------------------------------
# The gate process.
# ---------------------------------------------------------------------------

class Gate:
    """`clock` (seconds, monotonic) and `loop` (call_later) default to the
    real ones; tests may pass their own."""

    def __init__(self, name: str, cfg: dict, static_sk: bytes, brokers: list[BrokerEndpoints],
                 configure_socket=None, clock=None, loop=None):
        self.name = name
        self.cfg = cfg
        self.static_sk = static_sk
        self.max_frame = cfg["max_frame"]
        self.max_body = cfg["max_body"]
        self.brokers = brokers
        self.configure_socket = configure_socket
        self.connections: set[ClientConnection] = set()
        self.sessions: dict[str, dict[bytes, ClientConnection]] = {}
        # Per online user: which inbox seqs were pushed (each goes out once),
        # and whether a catch-up from the store is under way.
        self.pushlogs: dict[str, PushLog] = {}
        self.catching_up: dict[str, bool] = {}
        self.ctx = zmq.Context.instance()
        self.backend: Backend | None = None
        self.tcp: GateTCPServer | None = None
        self.http = None
        self._hole_timer = None
        self.clock = clock or time.monotonic
        self.loop = loop
        self.limiter = Limiter(capped_by_descriptors(LimitsConfig.from_mapping(cfg.get("limits"))))
        self.log_throttle = LogThrottle(self.limiter.cfg.log_lines_per_limit, self.limiter.cfg.log_interval_s)
        # Logins under way per user: they count towards max_sessions_per_user.
        self.logins_pending: dict[str, int] = {}
        self._sweep_timer = None
        self._sweep_due = None
        self._last_prune = 0.0
        self._last_sweep = 0.0
        self.outbound_estimate = 0

    def now(self) -> float:
        return self.clock()

    def call_later(self, delay: float, callback):
        loop = self.loop or asyncio.get_event_loop()
        return loop.call_later(delay, callback)

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

    def connection_refused(self, limit: str, address: str) -> None:
        RATE_LIMITED.labels(limit).inc()
        self.log_throttled("limit:" + limit, "refusing a connection from %s: %s limit", address, limit)

    def sessions_full(self, user: str, device: str) -> bool:
        """Whether a Login for `user` would be one session too many here. A
        Login that replaces a session of the same device does not add one."""
        mine = self.sessions.get(user, {})
        if device and any(c.device == device for c in mine.values()):
            return False
        return self.limiter.sessions_full(len(mine) + self.logins_pending.get(user, 0))

    def login_started(self, user: str) -> None:
        self.logins_pending[user] = self.logins_pending.get(user, 0) + 1

    def login_ended(self, user: str) -> None:
        n = self.logins_pending.get(user, 0) - 1
        if n > 0:
            self.logins_pending[user] = n
        else:
            self.logins_pending.pop(user, None)

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

    def session_started(self, conn: ClientConnection, max_seq: int) -> None:
        mine = self.sessions.setdefault(conn.user, {})
        if not mine:
            self.backend.subscribe(conn.user)
            self.pushlogs[conn.user] = PushLog()
        # The client syncs up to max_seq itself; pushes start above it.
        self.pushlogs[conn.user].raise_watermark(max_seq)
        if conn.device:
            for other in list(mine.values()):
                if other.device == conn.device:
                    other.kick(KickCode.REPLACED, "logged in elsewhere with the same device")
        mine[conn.session] = conn
        SESSIONS.inc()

    def session_ended(self, conn: ClientConnection) -> None:
        mine = self.sessions.get(conn.user)
        if mine is None or mine.pop(conn.session, None) is None:
            return
        SESSIONS.dec()
        if not mine:
            del self.sessions[conn.user]
            self.pushlogs.pop(conn.user, None)
            self.backend.unsubscribe(conn.user)

    def on_notification(self, topic: bytes, origin: bytes, payload: bytes) -> None:
        user = topic[:-1].decode("utf-8", "replace")
        mine = self.sessions.get(user)
        if not mine or len(payload) < 5:
            return
        mtype = payload[0]
        if mtype == m.SessionStarted.TYPE:
            try:
                _, started = BIN.decode(payload)
            except ProtocolError as exc:
                self.log_throttled("backend", "undecodable notification for %s: %s", user, exc,
                                   level=logging.WARNING)
                return
            if started.device:
                for conn in list(mine.values()):
                    if conn.session != started.session and conn.device == started.device:
                        conn.kick(KickCode.REPLACED, "logged in elsewhere with the same device")
            return
        if mtype != m.NewMsg.TYPE and mtype != m.ReadNotice.TYPE:
            # Only these two are pushed: nothing internal reaches a client.
            self.log_throttled("backend", "not pushing a notification of type %d to %s", mtype, user,
                               level=logging.WARNING)
            return
        if mtype == m.NewMsg.TYPE:
            try:
                seq = bin_newmsg_seq(payload)  # read at its offset: bin clients get the payload as it is
            except ProtocolError as exc:
                self.log_throttled("backend", "undecodable notification for %s: %s", user, exc,
                                   level=logging.WARNING)
                return
            if not self.pushlogs[user].first_time(seq, time.monotonic()):
                return
        cache = []

        def decoded():
            """For clients of another codec: decoded once, on first need."""
            if not cache:
                cache.append(BIN.decode(payload)[1])
            return cache[0]
        for conn in list(mine.values()):
            if conn.session != origin:
                conn.push(payload, mtype, decoded)

    # -- catching up from the store --------------------------------------------

    def resync(self, user: str | None) -> None:
        """Catch `user` (None: every online user) up from the store: push
        every message above what this gate pushed to them."""
        for u in ([user] if user is not None else list(self.sessions)):
            if u in self.sessions:
                self._catch_up(u)

    def _catch_up(self, user: str) -> None:
        if user in self.catching_up:
            self.catching_up[user] = True  # go again when the one under way ends
            return
        self.catching_up[user] = False
        log_ = self.pushlogs[user]
        CATCHUPS.inc()

        def done(reply_payload):
            again = self.catching_up.pop(user, False)
            if user not in self.sessions:
                return
            batch = None
            if reply_payload is not None:
                _, batch = BIN.decode(reply_payload)
            if not isinstance(batch, m.Batch):
                again = True  # unavailable or refused: try once more, later
                self.loop.call_later(self.cfg["request_timeout_s"] / 5, self.resync, user)
                return
            now = time.monotonic()
            for msg in batch.msgs:
                if log_.first_time(msg.seq, now):
                    push = m.NewMsg(msg=msg)
                    payload = BIN.encode(push, 0)
                    for conn in list(self.sessions[user].values()):
                        conn.push(payload, m.NewMsg.TYPE, lambda: push)
            if batch.more or again:
                self._catch_up(user)

        self.backend.request(user.encode(), b"", BIN.encode(m.Catchup(since=log_.watermark, limit=0), 0), done)

    def _check_holes(self) -> None:
        """A hole in a user's pushes that stays open means a push was lost
        (its worker died between commit and publish, say): catch up."""
        now = time.monotonic()
        limit = self.cfg["push_hole_timeout_ms"] / 1000
        for user, log_ in self.pushlogs.items():
            if log_.hole_open_for(now) > limit and user not in self.catching_up:
                HOLES.inc()
                log_.hole_since = now  # once per timeout, not on every check
                self._catch_up(user)
        self._hole_timer = self.loop.call_later(limit / 2, self._check_holes)

    # -- life cycle -------------------------------------------------------------

    async def start(self, host: str, port: int, http_host: str, http_port: int, ssl_options=None):
        self.loop = self.loop or asyncio.get_running_loop()
        cfg = self.cfg
        self.backend = Backend(self.ctx, self.brokers, cfg["request_timeout_s"],
                               cfg["probe_interval_ms"] / 1000, cfg["failover_after_ms"] / 1000,
                               self.on_notification, self.resync, self.configure_socket)
        self.backend.start()
        self._check_holes()
        self._sweep_tick()
        self.tcp = GateTCPServer(self)
        self.tcp.listen(port, host)
        app = web.Application([
            (r"/v1/health", HealthHandler),
            (r"/v1/history/([^/]+)", HistoryHandler),
            (r"/metrics", MetricsHandler),
            (r"/ws", WebSocketHandler, {}),
            *web_routes(self),
        ], gate=self, websocket_max_message_size=self.max_frame, log_function=_log_http)
        self.http = app.listen(http_port, http_host, ssl_options=ssl_options, xheaders=cfg["behind_tls_proxy"])
        log.info("gate %s listening: clients tcp://%s:%d, http%s://%s:%d (health, history, metrics, ws); "
                 "brokers %s", self.name, host, port, "s" if ssl_options else "", http_host, http_port,
                 ", ".join(f"{b.name} {b.frontend} / {b.notify_out}" for b in self.brokers))

    async def shutdown(self):
        log.info("gate %s shutting down: kicking %d connections", self.name, len(self.connections))
        self.tcp.stop()
        self.http.stop()
        if self._hole_timer:
            self._hole_timer.cancel()
        if self._sweep_timer:
            self._sweep_timer.cancel()
        for conn in list(self.connections):
            conn.kick(KickCode.SHUTDOWN, "server shutting down")
        await asyncio.sleep(0.2)
        self.backend.close()


def _log_http(handler) -> None:
    # Health probes and metric scrapes every few seconds would drown the log;
    # failures and history requests are worth a line.
    status = handler.get_status()
    if status >= 400 or handler.request.path.startswith("/v1/history"):
        gate: Gate = handler.application.settings["gate"]
        gate.log_throttled("http:%d" % (status // 100), "http %d %s %s %.1fms", status, handler.request.method,
                           handler.request.path[:200], 1000 * handler.request.request_time())


def check_http_exposure(cfg: dict) -> dict | None:
    """TLS options for the HTTP API, or None for plain HTTP where that is
    allowed (protocol.md section 6: the bearer token never crosses a network
    in the clear)."""
    if cfg["tls_cert"] and cfg["tls_key"]:
        return {"certfile": cfg["tls_cert"], "keyfile": cfg["tls_key"]}
    host = cfg["http_host"]
    if host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.") or cfg["behind_tls_proxy"]:
        return None
    raise SystemExit(f"refusing plain HTTP on {host}: set gate.tls_cert and gate.tls_key, "
                     "or gate.behind_tls_proxy = true if a TLS-terminating proxy is in front")


def run(name: str, cfg: dict, static_sk: bytes, brokers: list[BrokerEndpoints],
        host: str, port: int, http_host: str, http_port: int, configure_socket=None) -> None:
    """Run a gate until SIGTERM/SIGINT."""
    ssl_options = check_http_exposure(cfg)

    async def main():
        gate = Gate(name, cfg, static_sk, brokers, configure_socket)
        await gate.start(host, port, http_host, http_port, ssl_options)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await gate.shutdown()
        log.info("gate %s stopped", name)

    uvloop.run(main())
