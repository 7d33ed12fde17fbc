"""The pieces of `simzmq up` that need no region: stop order, pid files,
restart delays, the reason a child gives."""

import subprocess
import sys
import time

import pytest

from simzmq import supervise
from simzmq.supervise import Child


def test_stop_order_is_up_then_gates_then_workers_then_brokers():
    names = ["broker-backup", "im-2", "gate-1", "up", "broker-primary", "im-1", "gate-2", "other"]
    assert supervise.stop_order(names) == [
        ["up"], ["gate-1", "gate-2"], ["im-1", "im-2"], ["broker-backup", "broker-primary"], ["other"]]
    assert supervise.stop_order(["im-1"]) == [["im-1"]]


@pytest.fixture
def sleeper():
    """A live process whose command line names simzmq, and one that does not."""
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "simzmq"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield ours, other
    for proc in (ours, other):
        proc.kill()
        proc.wait()


def test_live_processes_keeps_only_pid_files_of_running_simzmq(tmp_path, sleeper):
    ours, other = sleeper
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    supervise.write_pid_file(tmp_path / "gate-1.pid", ours.pid)
    supervise.write_pid_file(tmp_path / "im-1.pid", other.pid)  # a reused pid: not ours
    supervise.write_pid_file(tmp_path / "broker-primary.pid", dead.pid)
    (tmp_path / "up.pid").write_text("garbage\n")
    assert supervise.live_processes(tmp_path) == {"gate-1": ours.pid}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate-1.pid"]


def run_child(tmp_path, code: str) -> Child:
    child = Child("im-1", [sys.executable, "-c", code], {}, tmp_path)
    child.start()
    child.proc.wait(30)
    return child


def test_a_child_says_why_it_stopped(tmp_path):
    recorded = run_child(tmp_path, "import sys; from pathlib import Path; from simzmq.supervise import record_failure; "
                                   f"record_failure(Path({str(tmp_path)!r}), 'im-1', "
                                   "'im-1 cannot listen on metrics a:1: busy'); sys.exit(1)")
    assert recorded.reason() == "cannot listen on metrics a:1: busy"
    recorded.start()  # a new start forgets the old reason
    recorded.proc.kill()
    recorded.proc.wait()
    assert recorded.reason() == "killed by signal 9"
    plain = run_child(tmp_path, "import sys; sys.exit(3)")
    assert plain.reason() == "exited with code 3"
    # Not started by `up` (no run directory): nothing is written.
    supervise.record_failure(tmp_path / "nowhere", "im-1", "x")
    assert not (tmp_path / "nowhere").exists()


def test_restart_at_once_then_with_a_growing_delay(tmp_path, monkeypatch):
    starts = []
    child = run_child(tmp_path, "pass")
    monkeypatch.setattr(Child, "start", lambda self: starts.append(1))
    now = child.started + 1.0  # died quickly after its start
    child.restart_if_dead(now)
    assert starts == [1] and child.crashes == 1  # the first death: at once
    delays = []
    for _ in range(7):
        child.proc = subprocess.Popen([sys.executable, "-c", "pass"])
        child.proc.wait()
        child.started = now
        child.restart_if_dead(now + 1.0)
        delays.append(round(child.restart_at - (now + 1.0), 3))
        now = child.restart_at
        child.restart_if_dead(now)
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    # A child that ran longer than HEALTHY_RUN_S before dying starts over: at once.
    child.proc = subprocess.Popen([sys.executable, "-c", "pass"])
    child.proc.wait()
    child.started = now
    child.restart_if_dead(now + supervise.HEALTHY_RUN_S + 1)
    assert child.restart_at == pytest.approx(now + supervise.HEALTHY_RUN_S + 1)


def test_a_child_stops_with_the_process_that_started_it(tmp_path):
    """PR_SET_PDEATHSIG: a child of a supervisor that is killed gets SIGTERM."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from simzmq.supervise import Child\n"
        f"c = Child('gate-1', [sys.executable, '-c', 'import time; time.sleep(60)'], {{}}, Path({str(tmp_path)!r}))\n"
        "c.start()\n"
        "print(c.proc.pid, flush=True)\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not gone(pid):
        time.sleep(0.05)
    assert gone(pid)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_stop_signal_before_the_start_starts_nothing_and_exits_with_128_plus_the_signal(tmp_path):
    import signal
    child = Child("im-1", [sys.executable, "-c", "pass"], {}, tmp_path)
    region = supervise.Supervisor([child], probe_factory=lambda: pytest.fail("no probe before a start"))
    region.on_signal(signal.SIGINT, None)
    with pytest.raises(supervise.StartFailed) as failed:
        region.start()
    assert str(failed.value) == "stopped by SIGINT before the region was up (nothing was started yet)"
    assert failed.value.exit_code == 130 and child.proc is None
    assert supervise.stopped_before_up(signal.SIGTERM, ["im-1", "gate-1"]).args == (
        "stopped by SIGTERM before the region was up (still starting: im-1, gate-1)",)
    assert supervise.stopped_before_up(signal.SIGHUP, []).exit_code == 129
