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
import json
import logging
import secrets
import signal
import time

import uvloop
import zmq
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest
from tornado import web, websocket
from tornado.iostream import StreamClosedError, StreamBufferFullError
from tornado.tcpserver import TCPServer

from simzmq.gatelink import Backend, BrokerEndpoints
from simzmq.pushlog import PushLog
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN, CODECS, peek_header
from simzmq.wire.errors import ProtocolError, ShortPayload
from simzmq.wire.frames import FrameDecoder, encode_frame
from simzmq.wire.handshake import MAX_HANDSHAKE_FRAME, GateHandshake
from simzmq.wire.messages import CLIENT_REQUESTS, ErrorCode, KickCode
from simzmq.wire.rules import is_valid_user_id, validate_request

log = logging.getLogger("simzmq.gate")

SESSION_ID_BYTES = 16
READ_CHUNK = 65536

CONNECTIONS = Gauge("simzmq_gate_connections", "Open client connections")
SESSIONS = Gauge("simzmq_gate_sessions", "Logged-in client connections")
REQUESTS = Counter("simzmq_gate_requests_total", "Client requests by type and outcome", ["type", "outcome"])
PUSHES = Counter("simzmq_gate_pushes_total", "Notifications pushed to clients", ["type"])
KICKS = Counter("simzmq_gate_kicks_total", "Connections kicked, by reason", ["reason"])
CATCHUPS = Counter("simzmq_gate_catchups_total", "Catch-ups of an online user from the store")
HOLES = Counter("simzmq_gate_push_holes_total", "Lost pushes noticed by a hole in a user's seqs")
CLOSED_BAD = Counter("simzmq_gate_protocol_closes_total", "Connections closed for bad input", ["why"])

TYPE_NAMES = {t: cls.__name__ for t, cls in m.MESSAGES.items()}


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------
# One client connection, over TCP or WebSocket.
# ---------------------------------------------------------------------------

HANDSHAKE, WAIT_HEADER, OPEN, CLOSED = range(4)


class ClientConnection:
    def __init__(self, gate: "Gate", transport, peer: str):
        self.gate = gate
        self.transport = transport
        self.peer = peer
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
        self.last_rx = time.monotonic()
        loop = asyncio.get_event_loop()
        self._handshake_timer = loop.call_later(gate.cfg["handshake_timeout_s"], self._handshake_expired)
        self._idle_timer = loop.call_later(gate.cfg["idle_timeout_s"], self._idle_check)
        CONNECTIONS.inc()

    # -- input --------------------------------------------------------------

    def payload_received(self, payload: bytes) -> None:
        """One frame's payload (TCP: already de-framed; WebSocket: one message)."""
        if self.state == CLOSED:
            return
        self.last_rx = time.monotonic()
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
            CLOSED_BAD.labels(type(exc).__name__).inc()
            log.info("closing %s: %s", self.peer, exc)
            self.close(str(exc))

    def message_received(self, plaintext: bytes) -> None:
        mtype, ref = peek_header(plaintext)
        name = TYPE_NAMES.get(mtype, "unknown")
        if mtype not in CLIENT_REQUESTS:
            REQUESTS.labels("unknown", "bad_request").inc()
            self.reply_error(ref, ErrorCode.BAD_REQUEST, f"not a client request type: {mtype}")
            return
        try:
            ref, msg = self.codec.decode(plaintext)
            validate_request(msg, self.gate.max_body)
        except ShortPayload:
            raise
        except ProtocolError as exc:
            REQUESTS.labels(name, ErrorCode(exc.code).name.lower()).inc()
            self.reply_error(ref, exc.code, exc.reason)
            return
        handler = self._handlers[mtype]
        handler(self, ref, msg)

    def _ping(self, ref, msg: m.Ping):
        REQUESTS.labels("Ping", "ok").inc()
        self.send_message(m.Pong(ts_ms=msg.ts_ms), ref)

    def _pong(self, ref, msg):
        REQUESTS.labels("Pong", "ok").inc()

    def _register(self, ref, msg: m.Register):
        if not self.gate.cfg["allow_register"]:
            REQUESTS.labels("Register", "forbidden").inc()
            self.reply_error(ref, ErrorCode.FORBIDDEN, "registration is closed")
            return
        self.forward(ref, msg.user, msg, "Register")

    def _login(self, ref, msg: m.Login):
        if self.user is not None or self.login_pending:
            REQUESTS.labels("Login", "bad_request").inc()
            self.reply_error(ref, ErrorCode.BAD_REQUEST, "already logged in")
            return
        self.login_pending = True
        self.device = msg.device
        self.forward(ref, msg.user, msg, "Login", self._logged_in)

    def _logged_in(self, ref, reply):
        self.login_pending = False
        if isinstance(reply, m.LoginOk):
            self.user = reply.user
            self.token = reply.token
            self.gate.session_started(self, reply.max_seq)
        return reply

    def _logout(self, ref, msg):
        if self.user is None:
            REQUESTS.labels("Logout", "ok").inc()
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
            REQUESTS.labels(name, "not_logged_in").inc()
            self.reply_error(ref, ErrorCode.NOT_LOGGED_IN, "log in first")
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
        payload = BIN.encode(msg, 0)

        def done(reply_payload):
            if self.state == CLOSED:
                return
            if reply_payload is None:
                REQUESTS.labels(name, "unavailable").inc()
                if on_reply is not None and name == "Login":
                    self.login_pending = False
                self.reply_error(ref, ErrorCode.UNAVAILABLE, "the back end did not answer in time; retry")
                return
            try:
                _, reply = BIN.decode(reply_payload)
            except ProtocolError:
                log.warning("undecodable reply from the im service for %s", name)
                REQUESTS.labels(name, "internal").inc()
                if name == "Login":
                    self.login_pending = False
                self.reply_error(ref, ErrorCode.INTERNAL, "bad reply from the back end")
                return
            if on_reply is not None:
                reply = on_reply(ref, reply)
                if reply is None:
                    REQUESTS.labels(name, "ok").inc()
                    return
            if isinstance(reply, m.Error):
                REQUESTS.labels(name, _code_name(reply.code)).inc()
            else:
                REQUESTS.labels(name, "ok").inc()
            self.send_message(reply, ref)

        self.gate.backend.request(key.encode(), self.session, payload, done)

    # -- output -------------------------------------------------------------

    def send_message(self, msg, ref: int, final: bool = False) -> None:
        if self.state not in (OPEN, WAIT_HEADER):
            return
        self.send_plaintext(self.codec.encode(msg, ref), final)

    def send_plaintext(self, plaintext: bytes, final: bool = False) -> None:
        try:
            self.transport.write_payloads([self.sender.seal(plaintext, final)])
        except SlowConsumer:
            KICKS.labels("slow_consumer").inc()
            log.info("closing %s: slow consumer (%s)", self.peer, self.user)
            self.close("slow consumer")

    def push(self, payload: bytes, msg_type: int, decoded) -> None:
        """A notification (bin payload, ref 0) for this session."""
        if self.state != OPEN:
            return
        PUSHES.labels(TYPE_NAMES.get(msg_type, "unknown")).inc()
        if self.codec is BIN:
            self.send_plaintext(payload)
        else:
            self.send_plaintext(self.codec.encode(decoded(), 0))

    def reply_error(self, ref, code, reason: str) -> None:
        self.send_message(m.Error(code=int(code), reason=reason[:256]), ref)

    def kick(self, code: KickCode, reason: str) -> None:
        KICKS.labels(code.name.lower()).inc()
        log.info("kicking %s (%s): %s", self.peer, self.user, reason)
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
        if getattr(self, "_lost", False):
            return
        self._lost = True
        self.state = CLOSED
        self._handshake_timer.cancel()
        self._idle_timer.cancel()
        CONNECTIONS.dec()
        if self.user is not None:
            self.gate.session_ended(self)

    # -- timers -------------------------------------------------------------

    def _handshake_expired(self):
        if self.state in (HANDSHAKE, WAIT_HEADER):
            CLOSED_BAD.labels("handshake_timeout").inc()
            log.info("closing %s: no handshake within %ss", self.peer, self.gate.cfg["handshake_timeout_s"])
            self.close("handshake timeout")

    def _idle_check(self):
        if self.state == CLOSED:
            return
        idle = self.gate.cfg["idle_timeout_s"]
        left = self.last_rx + idle - time.monotonic()
        if left <= 0:
            self.kick(KickCode.IDLE, f"nothing received for {idle} s")
        else:
            self._idle_timer = asyncio.get_event_loop().call_later(left, self._idle_check)


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return str(code)


class SlowConsumer(Exception):
    pass


class TcpTransport:
    def __init__(self, stream, max_outbound: int):
        self.stream = stream
        self.decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
        self.max_outbound = max_outbound

    def set_max_frame(self, n: int) -> None:
        self.decoder.max_frame = n

    def write_payloads(self, payloads) -> None:
        if self.stream.closed():
            return
        data = b"".join(encode_frame(p) for p in payloads)
        try:
            self.stream.write(data)
        except StreamBufferFullError:
            raise SlowConsumer() from None
        except StreamClosedError:
            pass

    def close(self) -> None:
        # Let what was written (a Kick, a final Ok) go out first.
        stream = self.stream
        if stream.closed():
            return
        if stream.writing():
            fut = stream.write(b"")
            fut.add_done_callback(lambda _f: stream.close())
        else:
            stream.close()


class GateTCPServer(TCPServer):
    def __init__(self, gate: "Gate", **kw):
        super().__init__(max_buffer_size=gate.max_frame + 8, **kw)
        self.gate = gate

    async def handle_stream(self, stream, address):
        stream.max_write_buffer_size = self.gate.cfg["max_outbound_bytes"]
        stream.set_nodelay(True)
        transport = TcpTransport(stream, self.gate.cfg["max_outbound_bytes"])
        conn = ClientConnection(self.gate, transport, f"{address[0]}:{address[1]}")
        self.gate.connections.add(conn)
        try:
            while conn.state != CLOSED:
                data = await stream.read_bytes(READ_CHUNK, partial=True)
                decoder = transport.decoder
                decoder.append(data)
                # One payload at a time: the frame limit rises when the
                # handshake completes, which may be in the middle of this chunk.
                try:
                    while conn.state != CLOSED:
                        payload = decoder.next_payload()
                        if payload is None:
                            break
                        conn.payload_received(payload)
                except ProtocolError as exc:
                    CLOSED_BAD.labels(type(exc).__name__).inc()
                    log.info("closing %s: %s", conn.peer, exc)
                    conn.close(str(exc))
                    break
        except StreamClosedError:
            pass
        except Exception:
            log.exception("connection %s failed", conn.peer)
            conn.close("internal error")
        finally:
            conn.connection_lost()
            self.gate.connections.discard(conn)


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
        _, reply = BIN.decode(reply_payload)
        if isinstance(reply, m.Error):
            status = 401 if reply.code == ErrorCode.AUTH_FAILED else 400
            return self._json(status, {"error": _code_name(reply.code), "reason": reply.reason})
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
    def __init__(self, handler):
        self.handler = handler
        self.max_frame = MAX_HANDSHAKE_FRAME
        self.max_outbound = handler.application.settings["gate"].cfg["max_outbound_bytes"]

    def set_max_frame(self, n):
        self.max_frame = n

    def write_payloads(self, payloads):
        if self.handler.ws_connection is None:
            return
        for p in payloads:
            try:
                self.handler.write_message(p, binary=True)
            except websocket.WebSocketClosedError:
                return
        stream = getattr(self.handler.ws_connection, "stream", None)
        if stream is not None and len(stream._write_buffer) > self.max_outbound:
            raise SlowConsumer()

    def close(self):
        self.handler.close()


class WebSocketHandler(websocket.WebSocketHandler):
    def check_origin(self, origin):
        # The channel is authenticated end to end by the handshake, not by cookies,
        # so a foreign origin gains nothing.
        return True

    def open(self):
        gate: Gate = self.application.settings["gate"]
        self.transport = WsTransport(self)
        self.conn = ClientConnection(gate, self.transport, f"ws:{self.request.remote_ip}")
        gate.connections.add(self.conn)

    def on_message(self, message):
        if isinstance(message, str) or len(message) > self.transport.max_frame:
            CLOSED_BAD.labels("ws_frame").inc()
            self.conn.close("text or oversized WebSocket message")
            return
        self.conn.payload_received(message)

    def on_close(self):
        gate: Gate = self.application.settings["gate"]
        self.conn.connection_lost()
        gate.connections.discard(self.conn)


# ---------------------------------------------------------------------------
# The gate process.
# ---------------------------------------------------------------------------

class Gate:
    def __init__(self, name: str, cfg: dict, static_sk: bytes, brokers: list[BrokerEndpoints],
                 configure_socket=None):
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
            _, started = BIN.decode(payload)
            if started.device:
                for conn in list(mine.values()):
                    if conn.session != started.session and conn.device == started.device:
                        conn.kick(KickCode.REPLACED, "logged in elsewhere with the same device")
            return
        cache = []

        def decoded():
            if not cache:
                cache.append(BIN.decode(payload)[1])
            return cache[0]
        if mtype == m.NewMsg.TYPE:
            if not self.pushlogs[user].first_time(decoded().msg.seq, time.monotonic()):
                return
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
        self.loop = asyncio.get_running_loop()
        cfg = self.cfg
        self.backend = Backend(self.ctx, self.brokers, cfg["request_timeout_s"],
                               cfg["probe_interval_ms"] / 1000, cfg["failover_after_ms"] / 1000,
                               self.on_notification, self.resync, self.configure_socket)
        self.backend.start()
        self._check_holes()
        self.tcp = GateTCPServer(self)
        self.tcp.listen(port, host)
        app = web.Application([
            (r"/v1/health", HealthHandler),
            (r"/v1/history/([^/]+)", HistoryHandler),
            (r"/metrics", MetricsHandler),
            (r"/ws", WebSocketHandler, {}),
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
        for conn in list(self.connections):
            conn.kick(KickCode.SHUTDOWN, "server shutting down")
        await asyncio.sleep(0.2)
        self.backend.close()


def _log_http(handler) -> None:
    # Health probes and metric scrapes every few seconds would drown the log;
    # failures and history requests are worth a line.
    status = handler.get_status()
    if status >= 400 or handler.request.path.startswith("/v1/history"):
        log.info("http %d %s %s %.1fms", status, handler.request.method, handler.request.path,
                 1000 * handler.request.request_time())


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
