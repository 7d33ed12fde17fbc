"""The gate's HTTP side (Tornado): health, history, metrics, and the
WebSocket transport for clients that cannot speak raw TCP.

The routes are in ROUTES below, the one list of what the gate serves over
HTTP; make_app builds the Application from it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado import web, websocket

from simzmq import limits as lim
from simzmq.gate_session import (BACKPRESSURE, CLOSED, RATE_LIMITED, SlowConsumer, code_name, turn_used,
                                 inc)
from simzmq.web import web_routes
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN
from simzmq.wire.errors import ProtocolError
from simzmq.wire.handshake import MAX_HANDSHAKE_FRAME
from simzmq.wire.messages import ErrorCode
from simzmq.wire.rules import is_valid_group_id, is_valid_user_id


class HealthHandler(web.RequestHandler):
    def get(self):
        gate = self.application.settings["gate"]
        ok = gate.backend.reachable(time.monotonic())
        self.set_status(200 if ok else 503)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": "ok" if ok else "unavailable", "gate": gate.name,
                                "broker": gate.backend.broker_name, "failovers": gate.backend.failovers,
                                "connections": len(gate.connections),
                                "sessions": gate.fanout.count()}))


class HistoryHandler(web.RequestHandler):
    async def get(self, peer: str):
        gate = self.application.settings["gate"]
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
        if not (is_valid_user_id(peer) or is_valid_group_id(peer)):
            return self._json(400, {"error": "bad_request", "reason": "invalid peer"})
        try:
            before = int(self.get_query_argument("before", "0"))
            limit = int(self.get_query_argument("limit", "50"))
        except ValueError:
            return self._json(400, {"error": "bad_request", "reason": "before and limit are integers"})
        if not (0 <= before < 2**53) or not (1 <= limit <= 100):
            return self._json(400, {"error": "bad_request", "reason": "before ≥ 0, 1 ≤ limit ≤ 100"})
        fut = asyncio.get_running_loop().create_future()
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
            return self._json(status, {"error": code_name(reply.code), "reason": reply.reason})
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
    """Frames to and from one WebSocket client, the session's transport port.

    Tornado makes a Future for every write and keeps it until its bytes have
    reached the kernel, which for a peer that does not read is a few hundred
    bytes of bookkeeping per frame of a few dozen. So only one write is ever
    in flight: frames written meanwhile wait here and go out one by one as
    the previous completes."""

    def __init__(self, handler, gate: "Gate"):
        self.handler = handler
        self.gate = gate
        self.max_frame = MAX_HANDSHAKE_FRAME
        self.max_outbound = gate.cfg.max_outbound_bytes
        self.in_flight = None
        self.backlog: collections.deque = collections.deque()
        self.backlog_bytes = 0
        # Set when the session's `paused` ends; made only when first needed:
        # most connections never pause.
        self.unpaused: asyncio.Event | None = None

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
        """Wait until the write in flight has reached the kernel; False if
        there was none, or it failed."""
        return await _completed(self.in_flight)

    def pause_changed(self) -> None:
        if not self.handler.conn.paused and self.unpaused is not None:
            self.unpaused.set()

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
    turn_bytes = 0

    def check_origin(self, origin):
        # The channel is authenticated end to end by the handshake, not by cookies,
        # so a foreign origin gains nothing.
        return True

    def open(self):
        gate = self.application.settings["gate"]
        address = self.request.remote_ip or ""
        if not gate.admit(address):
            self.close()
            return
        self.address = address
        self.transport = WsTransport(self, gate)
        self.conn = gate.connection_started(self.transport, f"ws:{address}", address)

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
        await self._ready_to_read()
        self.turn += 1
        self.turn_bytes += len(message)
        if turn_used(self.turn, self.turn_bytes):
            self.turn = self.turn_bytes = 0
            await asyncio.sleep(0)

    async def _ready_to_read(self) -> None:
        """Wait while the session has max_pending_requests with the back end,
        or the client is more than pause_reading_bytes behind in reading
        what it was sent, or until the connection ends."""
        conn, transport = self.conn, self.transport
        limiter = conn.gate.limiter
        counted = False
        while conn.state != CLOSED:
            if conn.paused:
                if transport.unpaused is None:
                    transport.unpaused = asyncio.Event()
                transport.unpaused.clear()
                await transport.unpaused.wait()
            elif limiter.behind(transport.queued()):
                if not counted:  # once per pause, however many writes it waits for
                    counted = True
                    inc(BACKPRESSURE, "behind")
                if not await transport.flushed():
                    return
            else:
                return

    def on_close(self):
        if self.address is not None:
            self.application.settings["gate"].connection_ended(self.conn, self.address)
            self.address = None


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


def _log_http(handler) -> None:
    # Health probes and metric scrapes every few seconds would drown the log
    # (a 503 from /v1/health is the gate's state, not a failed request: `up`
    # polls it while the region starts); failures and history requests are
    # worth a line.
    status = handler.get_status()
    path = handler.request.path
    if path == "/v1/health":
        return
    if status >= 400 or path.startswith("/v1/history"):
        gate = handler.application.settings["gate"]
        gate.log_throttled("http:%d" % (status // 100), "http %d %s %s %.1fms", status, handler.request.method,
                           path[:200], 1000 * handler.request.request_time())


# Everything the gate serves over HTTP.
ROUTES = [
    (r"/v1/health", HealthHandler),
    (r"/v1/history/([^/]+)", HistoryHandler),
    (r"/metrics", MetricsHandler),
    (r"/ws", WebSocketHandler),
]


def make_app(gate) -> web.Application:
    # The web chat's page, its scripts and its config (simzmq/web) beside the API.
    return web.Application(ROUTES + web_routes(gate), gate=gate, websocket_max_message_size=gate.max_frame, log_function=_log_http)
