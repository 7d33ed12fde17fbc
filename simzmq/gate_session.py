"""The gate's session rules: one client connection from HELLO to close.

What a connection may do in which state (handshake, then requests before and
after Login), which limit says no, what the gate answers itself and what it
forwards to the `im` service, what a client is pushed. A `ClientConnection`
touches no socket and reads no clock: frame payloads come in through
payload_received(), replies from the back end through the callbacks it hands
to `gate.backend.request`, and everything it says goes out through its
`transport` port:

    write_payloads(payloads)  frame payloads, in order (may raise SlowConsumer)
    queued() -> int           bytes written and not yet taken by the client
    close()                   end the connection (after what was written)
    set_max_frame(n)          the frame limit, raised when the handshake ends
    pause_changed()           `paused` flipped: stop or resume reading

Its `gate` host gives the time (now(), call_later), the limiter, the
back end, the fan-out (sessions per user) and the throttled log. The TCP and
WebSocket transports (gate_tcp, gate_http) and the tests' fake all drive it
the same way.
"""

from __future__ import annotations

import logging
import math
import secrets
import time

from prometheus_client import Counter, Gauge

from simzmq import limits as lim
from simzmq.limits import Verdict
from simzmq.presence import OFFLINE
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN, CODECS, peek_header
from simzmq.wire.errors import ProtocolError, ShortPayload
from simzmq.wire.handshake import GateHandshake
from simzmq.wire.messages import CLIENT_REQUESTS, ErrorCode, KickCode
from simzmq.wire.rules import validate_request

SESSION_ID_BYTES = 16
# Frames of one connection served before the event loop serves the others
# (both transports). Small, so that a thousand busy clients still let the
# loop come round (the broker link, timers, HTTP) every few hundred
# milliseconds: a frame costs a few tens of microseconds.
FRAMES_PER_TURN = 8
# And at most this many bytes of frames (at least one frame): a client
# sending 60 KB bodies gets as many bytes served per turn as one sending
# small ones, not eight times 60 KB while the others wait.
BYTES_PER_TURN = 65536


def turn_used(frames: int, nbytes: int) -> bool:
    """Has a connection had its share of this turn of the event loop?"""
    return frames >= FRAMES_PER_TURN or nbytes >= BYTES_PER_TURN

CONNECTIONS = Gauge("simzmq_gate_connections", "Open client connections")
REQUESTS = Counter("simzmq_gate_requests_total", "Client requests by type and outcome", ["type", "outcome"])
PUSHES = Counter("simzmq_gate_pushes_total", "Notifications pushed to clients", ["type"])
KICKS = Counter("simzmq_gate_kicks_total", "Connections kicked, by reason", ["reason"])
CLOSED_BAD = Counter("simzmq_gate_protocol_closes_total", "Connections closed for bad input", ["why"])
RATE_LIMITED = Counter("simzmq_gate_rate_limited_total",
                       "Requests refused with rate_limited and connections refused, by limit", ["limit"])
BACKPRESSURE = Counter("simzmq_gate_backpressure_total",
                       "Times a connection's reading paused: at max_pending_requests (pending), or more "
                       "than pause_reading_bytes behind in reading (behind)", ["why"])

SEND_BYTES = Counter("simzmq_gate_send_bytes_total",
                     "Bytes of Send requests let through the byte budgets (send_bytes_*)")
SEND_TYPE = m.Send.TYPE
# Requests whose reply may fill a frame (a page of the inbox, the list of
# conversations) are served one at a time per connection: reading pauses
# until the reply is in. A client that asks for its inbox again and again and
# reads nothing would otherwise have the worker read, the broker carry and
# the gate encrypt max_pending_requests pages before the first one shows
# that it is not reading; this way the socket's buffers fill after a few.
ONE_AT_A_TIME = frozenset({m.Sync.TYPE, m.Convs.TYPE})
GROUP_WRITES = Counter("simzmq_gate_group_writes_total",
                       "Requests that write to every member of a group (Sends to groups, GroupCreate, "
                       "GroupAdd, GroupRemove, GroupTitle) let through the group_writes limit")

TYPE_NAMES = {t: cls.__name__ for t, cls in m.MESSAGES.items()}
TYPING_DROPPED = Counter("simzmq_gate_typing_dropped_total",
                         "Typing requests answered Ok and passed on to no one, by why: typing_peer (more than one "
                         "a typing_peer_interval_s per sender and peer), typing_sender (past the sender's "
                         "typing_per_s), offline (the session appears offline)", ["why"])


# The gate serves protocol 1.1 (section 7) whole: groups (forwarded like
# Send, keyed by the actor), what 1.1 changes in Send and Read (group ids,
# kinds 250-255 refused), presence and typing (simzmq/presence.py). So the
# SetPresence probe answers Ok.

# Group changes store an event in every member's inbox, as a Send to a group
# stores the message (the group_writes limit).
GROUP_CHANGES = (m.GroupCreate, m.GroupAdd, m.GroupRemove, m.GroupTitle)


def writes_to_group(msg) -> bool:
    return type(msg) in GROUP_CHANGES or (type(msg) is m.Send and msg.to.startswith("#"))


def now_ms() -> int:
    return int(time.time() * 1000)


class SlowConsumer(Exception):
    """A transport's backstop: more is queued towards the client than it may hold."""


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
        self.send_bytes = gate.limiter.connection_byte_bucket(now)
        # Requests forwarded and not yet answered; at max_pending_requests,
        # and while a request of ONE_AT_A_TIME is answered, the transport
        # stops reading this connection (`paused`) until replies drain: it
        # is told through transport.pause_changed().
        self.pending = 0
        self.large_replies_pending = 0  # requests of ONE_AT_A_TIME being answered
        self.paused = False
        self._lost = False
        self.final_sent = False  # the frame with TAG_FINAL is sealed: nothing may follow
        self._handshake_timer = gate.call_later(gate.cfg.handshake_timeout_s, self._handshake_expired)
        self._idle_timer = gate.call_later(gate.cfg.idle_timeout_s, self._idle_check)
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
                                max_body=self.gate.max_body, idle_timeout_s=self.gate.cfg.idle_timeout_s)
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

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.transport.pause_changed()

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
        if mtype == SEND_TYPE and self.user is not None and not self.send_allowed(ref, len(plaintext)):
            return
        name = TYPE_NAMES.get(mtype, "unknown")
        if mtype not in CLIENT_REQUESTS:
            inc(REQUESTS, "unknown", "bad_request")
            self.reply_error(ref, ErrorCode.BAD_REQUEST, f"not a client request type: {mtype}")
            return
        try:
            ref, msg = self.codec.decode(plaintext)
            validate_request(msg, self.gate.max_body, protocol_1_1=True,
                             max_group_members=self.gate.cfg.max_group_members)
        except ShortPayload:
            raise
        except ProtocolError as exc:
            inc(REQUESTS, name, ErrorCode(exc.code).name.lower())
            self.reply_error(ref, exc.code, exc.reason)
            return
        handler = self._handlers[mtype]
        handler(self, ref, msg)

    def send_allowed(self, ref: int, size: int) -> bool:
        """The Send limits (count per user; bytes per connection and per
        user), checked on the frame's header and size alone: a Send that will
        be refused costs no decoding and never reaches the bus."""
        gate = self.gate
        now = gate.now()
        verdict, limit = gate.limiter.send(self.user, size, self.send_bytes, now)
        if not verdict:
            SEND_BYTES.inc(size)
            return True
        if limit == lim.SENDS:
            reason = "too many messages from this user; retry later"
        else:
            wait = gate.limiter.send_retry_after(self.user, size, self.send_bytes, now)
            reason = f"too many bytes sent; retry in {max(1, math.ceil(wait))} s"
        self.limited(ref, limit, verdict, reason, "Send")
        return False

    def limited(self, ref: int, limit: str, verdict: Verdict, reason: str, request: str = "") -> None:
        """A request over `limit`: Error{rate_limited}, or Kick{abuse} when far over."""
        RATE_LIMITED.labels(limit).inc()
        if request:
            inc(REQUESTS, request, "rate_limited")
        if verdict == Verdict.ABUSE:
            ban_s = self.gate.limiter.abused(self.address, self.gate.now())
            if ban_s:
                self.gate.log_throttled("ban", "banning %s for %.0f s: kicked for abuse", self.address, ban_s)
            self.kick(KickCode.ABUSE, f"far over the {limit} limit")
            return
        self.gate.log_throttled("limit:" + limit, "rate limited %s (%s): %s limit", self.peer, self.user, limit)
        self.reply_error(ref, ErrorCode.RATE_LIMITED, reason)

    def _ping(self, ref, msg: m.Ping):
        inc(REQUESTS, "Ping", "ok")
        self.send_message(m.Pong(ts_ms=msg.ts_ms), ref)

    def _pong(self, ref, msg):
        inc(REQUESTS, "Pong", "ok")

    def _register(self, ref, msg: m.Register):
        if not self.gate.cfg.allow_register:
            inc(REQUESTS, "Register", "forbidden")
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
            inc(REQUESTS, "Login", "bad_request")
            self.reply_error(ref, ErrorCode.BAD_REQUEST, "already logged in")
            return
        password = bool(msg.password)
        wait, limit = gate.limiter.login_wait(msg.user, self.address, password, gate.now())
        if wait > 0:
            self.limited(ref, limit, Verdict.LIMIT,
                         f"too many failed logins; retry in {math.ceil(wait)} s", "Login")
            return
        if gate.fanout.sessions_full(msg.user, msg.device):
            self.limited(ref, lim.SESSIONS, Verdict.LIMIT,
                         f"too many sessions of this user on this gate (at most "
                         f"{gate.limiter.cfg.max_sessions_per_user}); log out elsewhere", "Login")
            return
        self.login_pending = True
        self.device = msg.device
        gate.fanout.login_started(msg.user)
        gate.limiter.login_started(msg.user, self.address, password)

        def logged_in(ref, reply):
            self.login_pending = False
            gate.fanout.login_ended(msg.user)
            gate.limiter.login_ended(msg.user, self.address, password)
            if isinstance(reply, m.LoginOk):
                gate.limiter.login_succeeded(msg.user)
                if self.state == CLOSED:
                    return None
                self.user = reply.user
                self.token = reply.token
                gate.fanout.session_started(self, reply.max_seq)
            elif isinstance(reply, m.Error) and reply.code == ErrorCode.AUTH_FAILED:
                gate.limiter.login_failed(msg.user, self.address, password, gate.now())
            return reply
        self.forward(ref, msg.user, msg, "Login", logged_in)

    def _logout(self, ref, msg):
        if self.user is None:
            inc(REQUESTS, "Logout", "ok")
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
        if not self._logged_in(ref, msg):
            return
        name = type(msg).__name__
        if writes_to_group(msg) and not self.group_write_allowed(ref, name):
            return
        self.forward(ref, self.user, msg, name)

    def _logged_in(self, ref, msg) -> bool:
        """Whether the connection has a session; if not, it is told so."""
        if self.user is not None:
            return True
        inc(REQUESTS, type(msg).__name__, "not_logged_in")
        self.reply_error(ref, ErrorCode.NOT_LOGGED_IN, "log in first")
        return False

    # -- presence and typing (simzmq/presence.py) ------------------------------

    def _set_presence(self, ref, msg: m.SetPresence):
        if self._logged_in(ref, msg):
            self.gate.fanout.set_presence(self, msg.state)
            inc(REQUESTS, "SetPresence", "ok")
            self.send_message(m.Ok(), ref)

    def _watch(self, ref, msg: m.Watch):
        if not self._logged_in(ref, msg):
            return
        fanout = self.gate.fanout
        if not msg.users:
            fanout.unwatch(self, None)
            inc(REQUESTS, "Watch", "ok")
            self.send_message(m.PresenceList(), ref)
            return
        too_large = self.gate.presence.over_limit(self, msg.users)
        if too_large:
            inc(REQUESTS, "Watch", "too_large")
            self.reply_error(ref, ErrorCode.TOO_LARGE, too_large)
            return
        # Registered now, so Watches in flight count towards the limit; an
        # answer that is not a PresenceList takes back what this one added.
        added = fanout.watch(self, msg.users)

        def answered(ref, reply):
            if not isinstance(reply, m.PresenceList):
                fanout.unwatch(self, added)
                return reply
            fanout.presence_answered(self, reply.states)
            return reply
        self.forward(ref, self.user, msg, "Watch", answered)

    def _typing(self, ref, msg: m.Typing):
        if not self._logged_in(ref, msg):
            return
        inc(REQUESTS, "Typing", "ok")
        self.send_message(m.Ok(), ref)
        gate = self.gate
        if gate.presence.session_state(self, self.user) == OFFLINE:
            inc(TYPING_DROPPED, "offline")
            return
        held = gate.typing.allow(self.user, msg.peer, gate.now())
        if held:
            inc(TYPING_DROPPED, held)
            return
        # The worker checks contacts or membership and publishes the
        # notices; nothing comes back that the client needs.
        gate.backend.request(self.user.encode(), self.session, BIN.encode(msg, 0), _ignore)

    def group_write_allowed(self, ref: int, name: str) -> bool:
        verdict = self.gate.limiter.group_write(self.user, self.gate.now())
        if not verdict:
            GROUP_WRITES.inc()
            return True
        self.limited(ref, lim.GROUP_WRITES, verdict, "too many group messages and changes; retry later", name)
        return False

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
        m.GroupCreate.TYPE: _session_request,
        m.GroupAdd.TYPE: _session_request,
        m.GroupRemove.TYPE: _session_request,
        m.GroupGet.TYPE: _session_request,
        m.GroupTitle.TYPE: _session_request,
        m.Watch.TYPE: _watch,
        m.SetPresence.TYPE: _set_presence,
        m.Typing.TYPE: _typing,
    }

    # -- the back end -------------------------------------------------------

    def forward(self, ref, key: str, msg, name: str, on_reply=None):
        """Send `msg` to the im service; its reply (or an Error the gate makes
        when there is none) goes through `on_reply`, which may replace it or
        return None when it has answered itself, and then to the client."""
        payload = BIN.encode(msg, 0)
        self.pending += 1
        one_at_a_time = msg.TYPE in ONE_AT_A_TIME
        self.large_replies_pending += one_at_a_time
        if not self.paused and self._must_pause():
            if self.gate.limiter.reading_paused(self.pending):
                inc(BACKPRESSURE, "pending")
            self._set_paused(True)

        def done(reply_payload):
            self.pending -= 1
            self.large_replies_pending -= one_at_a_time
            if self.paused and not self._must_pause():
                self._set_paused(False)
            if on_reply is None and self.state == CLOSED:
                # Nobody left to read it: not even decoded (a never-reader's
                # pages of inbox, arriving after it was kicked).
                inc(REQUESTS, name, "closed")
                return
            if (on_reply is None and self.codec is BIN and reply_payload is not None
                    and reply_payload[:1] in PASS_THROUGH_REPLIES and self.state != CLOSED):
                # The usual case, a bin client and a success reply: the
                # worker's payload is already what the client reads, but for
                # the ref.
                inc(REQUESTS, name, "ok")
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
                inc(REQUESTS, name, "ok")
                return
            if isinstance(reply, m.Error):
                inc(REQUESTS, name, code_name(reply.code))
            else:
                inc(REQUESTS, name, "ok")
            if self.state != CLOSED:
                self.send_message(reply, ref)

        self.gate.backend.request(key.encode(), self.session, payload, done)

    def _must_pause(self) -> bool:
        return self.large_replies_pending > 0 or self.gate.limiter.reading_paused(self.pending)

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
        limit = self.gate.cfg.max_outbound_bytes
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
        inc(PUSHES, TYPE_NAMES.get(msg_type, "unknown"))
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
            self.gate.fanout.session_ended(self)

    # -- timers -------------------------------------------------------------

    def _handshake_expired(self):
        if self.state in (HANDSHAKE, WAIT_HEADER):
            CLOSED_BAD.labels("handshake_timeout").inc()
            self.gate.log_throttled("bad_input", "closing %s: no handshake within %ss", self.peer,
                                    self.gate.cfg.handshake_timeout_s)
            self.close("handshake timeout")

    def _idle_check(self):
        if self.state == CLOSED:
            return
        idle = self.gate.cfg.idle_timeout_s
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
CLIENT_REPLIES = frozenset({m.LoginOk, m.Error, m.SendOk, m.Batch, m.Ok, m.ConvList, m.GroupInfo, m.PresenceList})
ERROR_CODES = frozenset(int(c) for c in ErrorCode)


# Reply types a bin client gets exactly as the worker encoded them (with its
# ref put in); an Error goes through _checked_reply first.
PASS_THROUGH_REPLIES = frozenset(bytes([cls.TYPE]) for cls in (m.SendOk, m.Batch, m.Ok, m.ConvList, m.GroupInfo))


def _checked_reply(gate: "Gate", reply, name: str):
    if type(reply) not in CLIENT_REPLIES or (type(reply) is m.Error and reply.code not in ERROR_CODES):
        gate.log_throttled("backend", "the im service answered %s with %s; the client gets internal", name,
                           type(reply).__name__ if type(reply) is not m.Error else f"error code {reply.code}",
                           level=logging.WARNING)
        return m.Error(code=int(ErrorCode.INTERNAL), reason="bad reply from the back end")
    return reply


def _ignore(_reply_payload) -> None:
    pass


_metric_children: dict = {}


def inc(metric, *labels) -> None:
    """metric.labels(*labels).inc(), keeping the children: labels() takes a
    lock and builds a key on every call, and the gate counts every request
    and push."""
    key = (metric, labels)
    child = _metric_children.get(key)
    if child is None:
        child = _metric_children[key] = metric.labels(*labels)
    child.inc()


def code_name(code: int) -> str:
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return str(code)
