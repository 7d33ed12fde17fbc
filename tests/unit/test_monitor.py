"""The monitor's view of a broker pair, from made-up state messages."""

from __future__ import annotations

import json

import pytest
import zmq

from simzmq.monitor import PairView, RECENT_WINDOW_S, SILENT_AFTER_S, render

P, B = "tcp://10.0.0.11:7705", "tcp://10.0.0.12:7705"
WALL = 1_800_000_000.0


def state(role, state, peer_state, workers=1, **extra):
    status = {
        "role": role, "state": state, "peer_state": peer_state, "peer_heard_ago": 0.1,
        "workers": [{"identity": f"{i:016x}", "service": "im", "credit": 256, "in_flight": 0, "backlog": 0,
                     "heard_ago": 0.1, "up_for": 5.0} for i in range(workers)],
        "services": {"im": {"workers": workers, "waiting": 0, "requests": 0}} if workers else {},
        "gates": 1, "queue_depth": 0, "in_flight": 0, "requests_total": 10, "replies_total": 10,
        "pid": 42, "up_for": 3700.0, "wall_time": WALL, "heartbeat_ms": 250, "liveness": 3,
        "peer_heartbeat_ms": 250, "requests_per_s": 12.5, "failovers": 0, "gates_seen": [],
        "notifications_total": 0, "worker_expiries_total": 0, "request_timeouts_total": 0,
        "requests_dropped_total": 0, "requests_requeued_total": 0, "passive_drops_total": 0,
        "malformed_total": 0, "curve": True,
        "auth": {"accepted": {"backend": 1}, "refused": {"backend": 0, "frontend": 0}},
    }
    status.update(extra)
    return [b"state", json.dumps(status).encode()]


def view_with(primary, backup, now=100.0):
    view = PairView([P, B], started=now - 1)
    if primary is not None:
        assert view.on_state(P, primary, now)
    if backup is not None:
        assert view.on_state(B, backup, now)
    return view


def test_a_healthy_pair():
    snap = view_with(state("primary", "active", "passive"), state("backup", "passive", "active")).snapshot(100.5, WALL)
    assert snap["level"] == "ok" and snap["problems"] == []
    assert snap["summary"] == "OK: primary active, backup passive"
    assert [b["reachable"] for b in snap["brokers"]] == [True, True]
    assert snap["brokers"][0]["status"]["requests_per_s"] == 12.5
    json.dumps(snap)  # one JSON object per update
    text = render(snap)
    assert "[OK] OK: primary active, backup passive" in text
    row = next(line for line in text.splitlines() if line.startswith("primary "))
    assert row.split()[:3] == ["primary", "active", "passive"] and "1h01m" in row
    assert "worker 000000000000" in text


def test_the_primary_silent_after_a_failover():
    view = view_with(state("primary", "active", "passive"),
                     state("backup", "active", "primary", failovers=1, peer_heard_ago=None), now=100.0)
    view.on_state(B, state("backup", "active", None, failovers=1, peer_heard_ago=None), 103.0)
    view.on_connection(P, zmq.EVENT_CONNECT_RETRIED)
    snap = view.snapshot(103.0, WALL)
    assert snap["level"] == "warn" and snap["summary"] == "DEGRADED: backup active, no standby"
    assert [b["reachable"] for b in snap["brokers"]] == [False, True]
    assert any("primary" in p and "silent for 3.0 s" in p and "no answer" in p for p in snap["problems"])
    assert any("backup: has not heard its peer" in p for p in snap["problems"])
    text = render(snap)
    assert "SILENT" in text and "DEGRADED" in text


def test_both_brokers_down_and_never_heard():
    view = PairView([P, B], started=100.0)
    assert not view.settled(100.5)
    assert view.settled(100.0 + SILENT_AFTER_S)
    view.on_connection(P, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    # The disconnect and retries after a refusal do not hide it.
    view.on_connection(P, zmq.EVENT_DISCONNECTED)
    view.on_connection(P, zmq.EVENT_CONNECT_RETRIED)
    view.on_connection(B, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    view.on_connection(B, zmq.EVENT_HANDSHAKE_SUCCEEDED)
    view.on_connection(B, zmq.EVENT_DISCONNECTED)
    snap = view.snapshot(103.0, WALL)
    assert snap["level"] == "critical" and snap["summary"].startswith("DOWN")
    assert any("never heard" in p and "does not accept our ops key" in p for p in snap["problems"])
    assert [b["connection"] for b in snap["brokers"]] == ["refused: the broker does not accept our ops key",
                                                          "disconnected"]
    render(snap)


def test_dual_active_and_no_active():
    snap = view_with(state("primary", "active", "active"), state("backup", "active", "active")).snapshot(100, WALL)
    assert snap["level"] == "critical" and snap["summary"].startswith("DUAL ACTIVE")
    snap = view_with(state("primary", "primary", None), state("backup", "backup", None)).snapshot(100, WALL)
    assert snap["level"] == "critical" and snap["summary"] == "NO ACTIVE BROKER (primary primary, backup backup)"


def test_no_workers_and_a_queue():
    snap = view_with(state("primary", "active", "passive", workers=0, queue_depth=7),
                     state("backup", "passive", "active", workers=0)).snapshot(100, WALL)
    assert snap["level"] == "critical"
    assert any("active with no im worker" in p for p in snap["problems"])
    assert any("7 requests waiting" in p for p in snap["problems"])


def test_misconfiguration_shows():
    snap = view_with(state("primary", "active", "passive", peer_heartbeat_ms=1000, wall_time=WALL + 30),
                     state("backup", "passive", "active", workers=2, curve=False)).snapshot(100, WALL)
    problems = "\n".join(snap["problems"])
    assert "heartbeat settings differ: peer_heartbeat_ms primary 1000 / backup 250" in problems
    assert "primary: its clock is +30.0 s" in problems
    assert "backup: bus CURVE is off" in problems
    assert "the brokers see different workers (primary 1, backup 2)" in problems
    assert snap["level"] == "warn"


def test_recent_refusals_and_expiries_come_and_go():
    view = view_with(state("primary", "active", "passive"), state("backup", "passive", "active"), now=100.0)
    view.on_state(P, state("primary", "active", "passive", worker_expiries_total=2,
                           auth={"accepted": {}, "refused": {"backend": 5, "frontend": 0}}), 105.0)
    snap = view.snapshot(105.0, WALL)
    assert snap["brokers"][0]["recent"] == {"worker_expiries_total": 2, "auth_refused": {"backend": 5}}
    assert any("refused 5 bus connections on backend" in p for p in snap["problems"])
    assert any("2 workers expired" in p for p in snap["problems"])
    assert snap["level"] == "warn"
    row = next(line for line in render(snap).splitlines() if line.startswith("primary "))
    assert row.split()[10] == "5"  # the refused column counts since the broker started
    # Nothing new for a whole window: the problems go away, the totals stay.
    view.on_state(B, state("backup", "passive", "active"), 105.0 + RECENT_WINDOW_S + 1)
    view.on_state(P, state("primary", "active", "passive", worker_expiries_total=2,
                           auth={"accepted": {}, "refused": {"backend": 5}}), 105.0 + RECENT_WINDOW_S)
    view.on_state(P, state("primary", "active", "passive", worker_expiries_total=2,
                           auth={"accepted": {}, "refused": {"backend": 5}}), 105.0 + RECENT_WINDOW_S + 1)
    snap = view.snapshot(105.0 + RECENT_WINDOW_S + 1, WALL)
    assert snap["level"] == "ok" and snap["problems"] == []


@pytest.mark.parametrize("frames", [
    [b"state"], [b"nope", b"{}"], [b"state", b"not json"], [b"state", b"[1, 2]"], [b"state", b'{"role": "x"}'],
])
def test_malformed_state_messages_are_ignored(frames):
    view = PairView([P, B], started=0.0)
    assert view.on_state(P, frames, 1.0) is False
    assert view.malformed == 1 and view.brokers[0].status is None
