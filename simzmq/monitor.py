"""`simzmq monitor`: the broker pair, live.

Each broker publishes ``"state" | JSON`` on its state socket every
``peer_heartbeat_ms`` (docs/internal-protocol.md). The monitor subscribes to
both (as the ``ops`` bus role), keeps the latest state of each, and once per
interval prints either a compact text view or one JSON object per line.

:class:`PairView` (what is known, and what looks wrong) and :func:`render`
are pure; :func:`run` owns the sockets.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from typing import Callable, TextIO

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("simzmq.monitor")

# A broker whose state has not arrived for this long, or for four of its own
# publishing intervals if that is longer, is shown as silent.
SILENT_AFTER_S = 2.0
# Counters are shown as "what happened recently" over this window.
RECENT_WINDOW_S = 10.0
# Clocks further apart than this make logs of the two machines hard to line up.
CLOCK_SKEW_WARN_S = 2.0

# What the connection of a monitor SUB looks like, from its socket monitor.
_CONNECTION_EVENTS = {
    zmq.EVENT_CONNECTED: "connected",
    zmq.EVENT_CONNECT_DELAYED: "connecting",
    zmq.EVENT_CONNECT_RETRIED: "connecting (no answer)",
    zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_CLOSED: "disconnected",
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "connected",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused: the broker does not accept our ops key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed: wrong broker key, or CURVE on one side only",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed: wrong broker key, or CURVE on one side only",
}

_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                       zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

_RECENT_COUNTERS = ("worker_expiries_total", "request_timeouts_total", "requests_dropped_total",
                    "passive_drops_total", "malformed_total")


def _refused_total(status: dict) -> dict[str, int]:
    return dict((status.get("auth") or {}).get("refused") or {})


class _Broker:
    __slots__ = ("endpoint", "status", "heard_at", "connection", "failure", "history")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.status: dict | None = None
        self.heard_at: float | None = None
        self.connection = "connecting"
        # The last failed handshake, kept through the disconnect and retries
        # that follow it, until a handshake succeeds.
        self.failure: str | None = None
        self.history: deque = deque()  # (now, counters) for the recent window


class PairView:
    """What the monitor knows of the brokers it watches. Pure: ``now`` (a
    monotonic time) and ``wall`` (time.time()) come in."""

    def __init__(self, endpoints: list[str], started: float) -> None:
        self.brokers = [_Broker(ep) for ep in endpoints]
        self.by_endpoint = {b.endpoint: b for b in self.brokers}
        self.started = started
        self.malformed = 0

    def on_state(self, endpoint: str, frames: list[bytes], now: float) -> bool:
        """A message from ``endpoint``'s state socket; False if it was not a
        well-formed state message."""
        broker = self.by_endpoint[endpoint]
        status = None
        if len(frames) == 2 and frames[0] == b"state":
            try:
                status = json.loads(frames[1])
            except ValueError:
                status = None
        if not isinstance(status, dict) or not isinstance(status.get("state"), str):
            self.malformed += 1
            return False
        broker.status = status
        broker.heard_at = now
        broker.connection = "connected"
        counters = {name: status.get(name) or 0 for name in _RECENT_COUNTERS}
        counters["auth_refused"] = _refused_total(status)
        broker.history.append((now, counters))
        while len(broker.history) > 1 and now - broker.history[1][0] >= RECENT_WINDOW_S:
            broker.history.popleft()
        return True

    def on_connection(self, endpoint: str, event: int) -> None:
        """A socket-monitor event of the SUB connected to ``endpoint``."""
        text = _CONNECTION_EVENTS.get(event)
        if text is None:
            return
        broker = self.by_endpoint[endpoint]
        broker.connection = text
        if event in _HANDSHAKE_FAILURES:
            broker.failure = text
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            broker.failure = None

    def silent_after(self, broker: _Broker) -> float:
        if broker.status and isinstance(broker.status.get("peer_heartbeat_ms"), (int, float)):
            return max(SILENT_AFTER_S, 4 * broker.status["peer_heartbeat_ms"] / 1000)
        return SILENT_AFTER_S

    def all_heard(self) -> bool:
        return all(b.heard_at is not None for b in self.brokers)

    def settled(self, now: float) -> bool:
        """Worth a first update: every broker heard, or long enough waited."""
        return self.all_heard() or now - self.started >= SILENT_AFTER_S

    def recent(self, broker: _Broker) -> dict:
        """Counter increases over the last RECENT_WINDOW_S (or since first heard)."""
        if len(broker.history) < 2:
            return {}
        (_, old), (_, new) = broker.history[0], broker.history[-1]
        out = {}
        for name in _RECENT_COUNTERS:
            delta = new[name] - old[name]
            if delta > 0:
                out[name] = delta
        refused = {sock: n - old["auth_refused"].get(sock, 0) for sock, n in new["auth_refused"].items()}
        refused = {sock: n for sock, n in refused.items() if n > 0}
        if refused:
            out["auth_refused"] = refused
        return out

    def snapshot(self, now: float, wall: float) -> dict:
        """One update: every broker's latest state and what looks wrong."""
        brokers = []
        for b in self.brokers:
            heard_ago = None if b.heard_at is None else round(now - b.heard_at, 3)
            reachable = heard_ago is not None and heard_ago <= self.silent_after(b)
            brokers.append({
                "endpoint": b.endpoint,
                "reachable": reachable,
                "heard_ago": heard_ago,
                "connection": "connected" if reachable else (b.failure or b.connection),
                "recent": self.recent(b) if reachable else {},
                "status": b.status,
            })
        level, summary, problems = assess(brokers, wall)
        return {"time": round(wall, 3), "level": level, "summary": summary, "problems": problems,
                "brokers": brokers}


def _name(entry: dict) -> str:
    status = entry["status"]
    return status.get("role", "?") if status else entry["endpoint"]


def assess(brokers: list[dict], wall: float) -> tuple[str, str, list[str]]:
    """(level ok|warn|critical, one-line summary, problems) of a pair. Pure."""
    problems: list[str] = []
    live = [b for b in brokers if b["reachable"]]
    for b in brokers:
        if not b["reachable"]:
            what = "never heard" if b["heard_ago"] is None else f"silent for {b['heard_ago']:.1f} s"
            problems.append(f"{_name(b)} ({b['endpoint']}): {what}; connection: {b['connection']}")
    active = [b for b in live if b["status"].get("state") == "active"]
    if not live:
        return "critical", "DOWN: no broker heard", problems
    level = "ok"
    if len(active) > 1:
        level = "critical"
        summary = "DUAL ACTIVE: both brokers serve (they stop themselves; see docs/operations.md)"
    elif not active:
        level = "critical"
        states = ", ".join(f"{_name(b)} {b['status'].get('state')}" for b in live)
        summary = f"NO ACTIVE BROKER ({states})"
        problems.append("no broker is active: a lone backup that never saw the primary active never serves, "
                        "and a starting broker goes active on the first client request once its peer is "
                        "silent — check that gates can reach it and that the primary is running")
    else:
        a = active[0]
        others = [b for b in brokers if b is not a]
        if all(b["reachable"] and b["status"].get("state") == "passive" for b in others):
            summary = f"OK: {_name(a)} active, " + ", ".join(f"{_name(b)} passive" for b in others)
        else:
            level = "warn"
            summary = f"DEGRADED: {_name(a)} active, no standby"
    for b in live:
        s = b["status"]
        name = _name(b)
        hb = s.get("peer_heartbeat_ms")
        if s.get("peer_state") is None and len(brokers) > 1:
            problems.append(f"{name}: has not heard its peer (peer state endpoint or broker key wrong, "
                            f"or the network between the brokers)")
            level = _worse(level, "warn")
        elif isinstance(hb, (int, float)) and s.get("peer_heard_ago") is not None \
                and s["peer_heard_ago"] > 2 * hb / 1000:
            problems.append(f"{name}: peer silent for {s['peer_heard_ago']:.1f} s (over 2 x peer_heartbeat_ms)")
            level = _worse(level, "warn")
        if s.get("state") == "active":
            im = (s.get("services") or {}).get("im") or {}
            if not im.get("workers"):
                problems.append(f"{name}: active with no im worker: requests wait broker.request_timeout_ms, "
                                f"then time out")
                level = _worse(level, "critical")
            if s.get("queue_depth"):
                problems.append(f"{name}: {s['queue_depth']} requests waiting for a worker or its credit")
        if s.get("curve") is False:
            problems.append(f"{name}: bus CURVE is off ([bus] curve = false): anyone reaching its ports "
                            f"joins the bus")
            level = _worse(level, "warn")
        recent = b["recent"]
        for sock, n in sorted((recent.get("auth_refused") or {}).items()):
            problems.append(f"{name}: refused {n} bus connections on {sock} in the last "
                            f"{RECENT_WINDOW_S:.0f} s (unknown or wrong-role keys; the broker log says which)")
            level = _worse(level, "warn")
        for counter, text in (("worker_expiries_total", "workers expired"),
                              ("request_timeouts_total", "requests timed out waiting for a worker"),
                              ("requests_dropped_total", "requests dropped (queue full)"),
                              ("malformed_total", "malformed messages dropped")):
            if recent.get(counter):
                problems.append(f"{name}: {recent[counter]} {text} in the last {RECENT_WINDOW_S:.0f} s")
                level = _worse(level, "warn")
        if isinstance(s.get("wall_time"), (int, float)) and abs(s["wall_time"] - wall) > CLOCK_SKEW_WARN_S:
            problems.append(f"{name}: its clock is {s['wall_time'] - wall:+.1f} s from this machine's "
                            f"(Binary Star does not care; log times will not line up)")
    if len(live) == 2:
        a, b = (x["status"] for x in live)
        settings = ("heartbeat_ms", "liveness", "peer_heartbeat_ms")
        differ = [k for k in settings if a.get(k) != b.get(k)]
        if differ:
            problems.append("the brokers' heartbeat settings differ: " + ", ".join(
                f"{k} {a.get('role')} {a.get(k)} / {b.get('role')} {b.get(k)}" for k in differ))
            level = _worse(level, "warn")
        wa = {w.get("identity") for w in a.get("workers") or []}
        wb = {w.get("identity") for w in b.get("workers") or []}
        if wa != wb:
            problems.append(f"the brokers see different workers ({a.get('role')} {len(wa)}, "
                            f"{b.get('role')} {len(wb)}): a worker cannot reach one of them, or is joining")
    return level, summary, problems


_ORDER = {"ok": 0, "warn": 1, "critical": 2}


def _worse(a: str, b: str) -> str:
    return a if _ORDER[a] >= _ORDER[b] else b


def _ago(value) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}s"
    return _duration(value)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def render(snapshot: dict, width: int = 100) -> str:
    """The text view of one update. Pure."""
    lines = [f"simzmq monitor  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(snapshot['time']))}  "
             f"[{snapshot['level'].upper()}] {snapshot['summary']}", ""]
    header = (f"{'broker':<8} {'state':<8} {'peer':<8} {'peer hb':>8} {'workers':>7} {'gates':>5} "
              f"{'req/s':>8} {'queue':>6} {'flight':>6} {'failover':>8} {'refused':>7} {'up':>7}")
    lines.append(header)
    for b in snapshot["brokers"]:
        s = b["status"]
        if not b["reachable"] or s is None:
            lines.append(f"{_name(b):<8} {'SILENT':<8} {b['connection']}  ({b['endpoint']}, "
                         f"heard {_ago(b['heard_ago'])} ago)")
            continue
        refused = sum(_refused_total(s).values())
        lines.append(
            f"{s.get('role', '?'):<8} {s.get('state', '?'):<8} {str(s.get('peer_state') or '-'):<8} "
            f"{_ago(s.get('peer_heard_ago')):>8} {len(s.get('workers') or []):>7} {s.get('gates', 0):>5} "
            f"{s.get('requests_per_s', 0):>8} {s.get('queue_depth', 0):>6} {s.get('in_flight', 0):>6} "
            f"{s.get('failovers', 0):>8} {refused:>7} {_duration(s.get('up_for')):>7}")
    for b in snapshot["brokers"]:
        s = b["status"]
        if not b["reachable"] or s is None:
            continue
        lines.append("")
        lines.append(f"{s.get('role', '?')} (pid {s.get('pid', '?')}, {b['endpoint']}): "
                     f"{s.get('requests_total', 0)} requests, {s.get('replies_total', 0)} replies, "
                     f"{s.get('notifications_total', 0)} notifications")
        for w in (s.get("workers") or [])[:16]:
            lines.append(f"  worker {w.get('identity', '?')[:12]:<12} {w.get('service', '?'):<6} "
                         f"credit {w.get('credit', 0):>4}  in flight {w.get('in_flight', 0):>4}  "
                         f"backlog {w.get('backlog', 0):>4}  heard {_ago(w.get('heard_ago'))} ago  "
                         f"up {_duration(w.get('up_for'))}")
        extra = len(s.get("workers") or []) - 16
        if extra > 0:
            lines.append(f"  ... and {extra} more workers")
    if snapshot["problems"]:
        lines.append("")
        lines.extend(f"! {p}" for p in snapshot["problems"])
    return "\n".join(line[:width] if len(line) > width and not line.startswith("!") else line
                     for line in lines)


# --- the I/O shell ------------------------------------------------------------

CLEAR = "\x1b[H\x1b[2J"


def run(endpoints: list[str], configure_socket: Callable[[zmq.Socket, str], None] | None = None,
        interval: float = 1.0, count: int | None = None, as_json: bool = False, out: TextIO | None = None,
        context: zmq.Context | None = None, should_stop: Callable[[], bool] | None = None) -> int:
    """Watch the brokers' state sockets; print an update every ``interval``
    seconds, ``count`` times (None: until interrupted). Returns the number of
    updates printed."""
    out = out or sys.stdout
    ctx = context or zmq.Context()
    own_context = context is None
    view = PairView(endpoints, time.monotonic())
    subs: dict[zmq.Socket, str] = {}
    monitors: dict[zmq.Socket, str] = {}
    poller = zmq.Poller()
    printed = 0
    clear = not as_json and out.isatty()
    try:
        for ep in endpoints:
            sock = ctx.socket(zmq.SUB)
            sock.linger = 0
            if configure_socket is not None:
                configure_socket(sock, "state_pub")
            sock.setsockopt(zmq.SUBSCRIBE, b"state")
            mon = sock.get_monitor_socket()
            sock.connect(ep)
            subs[sock] = ep
            monitors[mon] = ep
            poller.register(sock, zmq.POLLIN)
            poller.register(mon, zmq.POLLIN)
        next_update = None
        while count is None or printed < count:
            if should_stop is not None and should_stop():
                break
            now = time.monotonic()
            if next_update is None and view.settled(now):
                next_update = now
            if next_update is not None and now >= next_update:
                snap = view.snapshot(now, time.time())
                if as_json:
                    out.write(json.dumps(snap, sort_keys=True) + "\n")
                else:
                    out.write((CLEAR if clear else "") + render(snap) + "\n" + ("" if clear else "\n"))
                out.flush()
                printed += 1
                next_update = now + interval
                continue
            wait = (next_update - now) if next_update is not None else 0.05
            for sock, _ in poller.poll(max(0.0, min(wait, 0.25)) * 1000):
                if sock in subs:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if not view.on_state(subs[sock], frames, time.monotonic()):
                            log.info("ignored a malformed state message from %s", subs[sock])
                else:
                    while True:
                        try:
                            event = recv_monitor_message(sock, zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        view.on_connection(monitors[sock], int(event["event"]))
    finally:
        for sock in list(subs) + list(monitors):
            sock.close(linger=0)
        if own_context:
            ctx.term()
    return printed
