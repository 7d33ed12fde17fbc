"""`simzmq monitor` against a real region: the healthy pair, a stalled
backup, a failover with the primary coming back passive, a stalled worker,
the text view, and an ops key the brokers do not know."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq

from simzmq import keys
from tests.region import ROOT, Region


class Monitor:
    """`simzmq monitor --json` running, its updates read as they come."""

    def __init__(self, region: Region, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simzmq", "monitor", "--data", str(region.data_dir), "--json", *args],
            env=region.env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.updates: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()
        self.last = None

    def _read(self):
        for line in self.proc.stdout:
            self.updates.put(json.loads(line))
        self.updates.put(None)

    def until(self, predicate, what: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                update = self.updates.get(timeout=0.5)
            except queue.Empty:
                continue
            if update is None:
                raise AssertionError(f"monitor exited: {self.proc.stderr.read()}")
            self.last = update
            if predicate(update):
                return update
        raise AssertionError(f"monitor never showed {what}; last update: {json.dumps(self.last, indent=1)}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def states(update) -> dict:
    return {b["status"]["role"]: b["status"]["state"] for b in update["brokers"] if b["reachable"]}


def broker(update, role) -> dict:
    return next(b["status"] for b in update["brokers"] if b["reachable"] and b["status"]["role"] == role)


def healthy(update) -> bool:
    return update["level"] == "ok" and states(update) == {"primary": "active", "backup": "passive"}


@pytest.mark.timeout(180)
def test_monitor_follows_a_stalled_backup_a_failover_and_a_stalled_worker(tmp_path):
    # A long idle timeout spaces the gates' presence reports (idle_timeout / 6)
    # beyond this test: the only request each gate sends is its snapshot at start.
    with Region(tmp_path / "data", extra_env={"SIMZMQ_GATE_IDLE_TIMEOUT_S": "3600"}) as region:
        mon = Monitor(region, "--interval", "0.2")
        try:
            update = mon.until(lambda u: healthy(u) and len(broker(u, "primary")["workers"]) == 1
                               and broker(u, "primary")["gates"] >= 1, "a healthy pair")
            primary = broker(update, "primary")
            assert update["summary"] == "OK: primary active, backup passive" and update["problems"] == []
            assert primary["curve"] is True and primary["failovers"] == 0
            assert primary["pid"] == region.pid("broker-primary")
            # The gate's probes are heard (it counts as a gate) but are not
            # requests; its presence snapshot at start is one (it may still be
            # on its way).
            assert primary["mmi_total"] > 0 and primary["requests_total"] <= region.gates
            assert primary["peer_heard_ago"] < 1 and broker(update, "backup")["peer_state"] == "active"

            # The backup stops answering: the pair has no standby.
            backup_pid = region.pid("broker-backup")
            os.kill(backup_pid, signal.SIGSTOP)
            try:
                update = mon.until(lambda u: u["summary"] == "DEGRADED: primary active, no standby",
                                   "the backup silent")
                assert update["level"] == "warn"
                assert [b["reachable"] for b in update["brokers"]] == [True, False]
            finally:
                os.kill(backup_pid, signal.SIGCONT)
            mon.until(healthy, "the backup back")

            # The primary stops answering: the gate fails over and the backup
            # takes over. Killed while stopped, the primary is restarted by
            # the supervisor and comes back passive.
            primary_pid = region.pid("broker-primary")
            os.kill(primary_pid, signal.SIGSTOP)
            update = mon.until(lambda u: u["summary"] == "DEGRADED: backup active, no standby",
                               "the backup taking over")
            assert broker(update, "backup")["failovers"] == 1
            os.kill(primary_pid, signal.SIGKILL)
            update = mon.until(lambda u: u["level"] == "ok" and states(u) == {"primary": "passive",
                                                                              "backup": "active"},
                               "the restarted primary passive")
            assert update["summary"] == "OK: backup active, primary passive"
            assert broker(update, "primary")["pid"] != primary_pid
            assert broker(update, "backup")["failovers"] == 1

            # The only worker stalls: the active broker expires it.
            worker_pid = region.pid("im-1")
            os.kill(worker_pid, signal.SIGSTOP)
            try:
                update = mon.until(lambda u: any("active with no im worker" in p for p in u["problems"]),
                                   "no workers")
                assert update["level"] == "critical"
                assert broker(update, "backup")["worker_expiries_total"] >= 1
                assert any("workers expired" in p for p in update["problems"])
            finally:
                os.kill(worker_pid, signal.SIGCONT)
            mon.until(lambda u: len(broker(u, "backup")["workers"]) == 1
                      and not any("no im worker" in p for p in u["problems"]), "the worker back")
        finally:
            mon.stop()
    log = region.read_log()
    assert "failover: backup broker is now active" in log


@pytest.mark.timeout(120)
def test_text_view_count_and_an_unknown_ops_key(tmp_path):
    with Region(tmp_path / "data") as region:
        env = region.env
        # Let the pair settle, then two text updates and out.
        Monitor(region, "--count", "1000", "--interval", "0.2").until(healthy, "a healthy pair")
        out = subprocess.run([sys.executable, "-m", "simzmq", "monitor", "--data", str(region.data_dir),
                              "--count", "2", "--interval", "0.1"],
                             env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("simzmq monitor ") == 2
        assert "[OK] OK: primary active, backup passive" in out.stdout
        rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("primary ", "backup "))]
        assert ["primary", "active", "passive"] in [r[:3] for r in rows]
        assert ["backup", "passive", "active"] in [r[:3] for r in rows]

        # Somebody else's ops key: the brokers refuse it and the monitor says so.
        other = tmp_path / "other"
        (other / "keys" / "bus").mkdir(parents=True)
        shutil.copy(region.data_dir / "keys" / "bus" / "broker.key", other / "keys" / "bus" / "broker.key")
        ops_pub, ops_sec = zmq.curve_keypair()
        (other / "keys" / "bus" / "ops.key_secret").write_text(keys.curve_cert_text("ops", ops_pub, ops_sec))
        endpoints = env["SIMZMQ_BROKER_PRIMARY_STATE"] + "," + env["SIMZMQ_BROKER_BACKUP_STATE"]
        out = subprocess.run([sys.executable, "-m", "simzmq", "monitor", "--data", str(other), "--json",
                              "--count", "1", "--endpoints", endpoints],
                             env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        (update,) = [json.loads(line) for line in out.stdout.splitlines()]
        assert update["level"] == "critical" and update["summary"] == "DOWN: no broker heard"
        assert [b["connection"] for b in update["brokers"]] == \
            ["refused: the broker does not accept our ops key"] * 2
        # Without the key files at all the monitor says what to do.
        out = subprocess.run([sys.executable, "-m", "simzmq", "monitor", "--data", str(tmp_path / "none"),
                              "--count", "1"], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "simzmq keys" in out.stderr
    assert "refused a CURVE client on state_pub from 127.0.0.1: unknown key" in region.read_log()
