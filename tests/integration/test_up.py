"""`simzmq up` and `simzmq down` as a newcomer meets them: the region is
announced only when it is up; a process that cannot start stops the region
with one line; bad settings are refused before anything starts; two regions
side by side with --port-base; SIGHUP, a killed `up` and `simzmq down` leave
no process behind; a killed gate comes back at once."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path

import pytest

from simzmq import config
from simzmq.client import Connection
from simzmq.supervise import is_simzmq_process
from simzmq.wire import messages as m
from tests.integration.test_cli import wait_for
from tests.region import ROOT, Region

pytestmark = pytest.mark.timeout(180)

BANNER = "simzmq region up"


def clean_env(**extra: str) -> dict:
    """This environment without SIMZMQ_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMZMQ_")}
    env.update(extra)
    return env


def simzmq(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "simzmq", *args], capture_output=True, text=True,
                          timeout=timeout, env=env if env is not None else clean_env(), cwd=str(ROOT))


def bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_base(avoid: tuple[int, ...] = (), gates: int = 1) -> int:
    """A port_base whose region's ports (with `gates` gates) are all free now
    (below the range the system hands out for ephemeral ports, so a test
    client's port does not take one)."""
    for _ in range(200):
        base = random.randrange(12000, 30000)
        if any(abs(base - other) < 200 for other in avoid):
            continue
        cfg = config.load(env={}, overrides={"region": {"port_base": base}, "gate": {"gates": gates}})
        if all(bindable(lst.port) for lst in config.region_listeners(cfg)):
            return base
    raise AssertionError("no free port range")


def started_pids(text: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"started \S+ \(pid (\d+)\)", text)]


def health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2) as r:
            return r.status
    except OSError:
        return None


class Up:
    """`simzmq up` with its output in a file."""

    def __init__(self, data: Path, *args: str, env=None, preexec=None):
        self.log_path = data.parent / (data.name + ".log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "simzmq", "up", "--data", str(data), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                     env=env if env is not None else clean_env(), preexec_fn=preexec)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_up(self) -> None:
        wait_for(lambda: BANNER in self.text() or self.proc.poll() is not None, 120.0)
        assert BANNER in self.text(), self.text()[-3000:]

    def finish(self, timeout=60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()


def test_a_taken_port_stops_the_region_with_one_line(tmp_path):
    base = free_port_base()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", base + 21))  # broker-primary's frontend
    squatter.listen()
    try:
        out = simzmq("up", "--data", str(tmp_path / "data"), "--port-base", str(base))
    finally:
        squatter.close()
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last == (f"simzmq up: broker-primary could not start: cannot listen on frontend 127.0.0.1:{base + 21}: "
                    "Address already in use; region stopped (another program holds that port, `ss -ltnp` shows "
                    "which; `--port-base` moves every port of the region, docs/running.md)"), out.stderr[-3000:]
    assert BANNER not in out.stderr
    assert list((tmp_path / "data" / "run").glob("*.pid")) == []
    pids = started_pids(out.stderr)
    assert pids and not any(is_simzmq_process(pid) for pid in pids)


def test_an_address_that_is_not_this_machines_stops_the_region_with_one_line(tmp_path):
    base = free_port_base()
    # 192.0.2.1 is TEST-NET-1: never an address of this machine. The port is
    # written as in conf/simzmq.toml and shifted by the port base like the rest.
    env = clean_env(SIMZMQ_BROKER_BACKUP_STATE="tcp://192.0.2.1:7735")
    out = simzmq("up", "--data", str(tmp_path / "data"), "--port-base", str(base), env=env)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"simzmq up: broker-backup could not start: cannot listen on state 192.0.2.1:{base + 35}: "
        "Cannot assign requested address; region stopped"), out.stderr[-3000:]
    assert BANNER not in out.stderr


def test_bad_settings_are_refused_before_anything_starts(tmp_path):
    data = tmp_path / "data"
    env = clean_env(SIMZMQ_GATE_PORT="99999", SIMZMQ_IM_STORE="mysql", SIMZMQ_GATE_PROT="7000",
                    SIMZMQ_IM_SQLITE_SYNCHRONOUS="SOMETIMES", SIMZMQ_BROKER_PRIMARY_FRONTEND="tcp://127.0.0.1")
    out = simzmq("up", "--data", str(data), "--workers", "0", "--gates", "-1", env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert sorted(lines) == sorted([
        "simzmq: unknown environment variable SIMZMQ_GATE_PROT (did you mean SIMZMQ_GATE_PORT?)",
        "simzmq: gate.port = 99999 (from SIMZMQ_GATE_PORT): must be a port 1-65535",
        "simzmq: im.store = 'mysql' (from SIMZMQ_IM_STORE): must be sqlite (im.sqlite_path in the data "
        "directory), sqlite:///PATH or postgresql://...",
        "simzmq: im.sqlite_synchronous = 'SOMETIMES' (from SIMZMQ_IM_SQLITE_SYNCHRONOUS): must be one of "
        "OFF, NORMAL, FULL, EXTRA",
        "simzmq: broker.primary.frontend = 'tcp://127.0.0.1' (from SIMZMQ_BROKER_PRIMARY_FRONTEND): must be "
        "tcp://HOST:PORT or ipc://PATH (the port must be 1-65535)",
        "simzmq: im.workers = 0 (from --workers): must be an integer 1-100",
        "simzmq: gate.gates = -1 (from --gates): must be an integer 1-100",
    ]), out.stderr
    assert not data.exists() and not (ROOT / "mysql").exists()
    # A file with a misspelt key, and ports the region would use twice: one line.
    site = tmp_path / "site.toml"
    site.write_text("[im]\nworker = 2\n")
    out = simzmq("--config", str(site), "up", "--data", str(data))
    assert out.returncode == 2 and out.stderr.strip() == (
        f"simzmq: {site}: unknown key im.worker (did you mean im.workers?)")
    out = simzmq("up", "--data", str(data), "--gates", "30")
    assert out.returncode == 2 and out.stderr.startswith(
        "simzmq: port 7721 is both broker-primary frontend and gate-22 client port, and ")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not data.exists()


def test_several_gates_on_the_default_layout_all_serve(tmp_path):
    base = free_port_base(gates=2)
    data = tmp_path / "data"
    up = Up(data, "--gates", "2", "--port-base", str(base))
    try:
        up.wait_up()
        assert f"Clients connect to 127.0.0.1:{base}, 127.0.0.1:{base + 1} " in up.text()
        assert health(base + 80) == 200 and health(base + 81) == 200
        pk = bytes.fromhex((data / "keys" / "gate.pub").read_text().strip())

        async def talk():
            # Registered through gate-1, logged in through gate-2: both reach the workers.
            first = await Connection.open("127.0.0.1", base, pk, ping_interval=None)
            try:
                await first.request(m.Register(user="ann", password="pw"))  # an Error would raise
            finally:
                first.close()
            second = await Connection.open("127.0.0.1", base + 1, pk, ping_interval=None)
            try:
                assert isinstance(await second.request(m.Login(user="ann", password="pw", device="d2")), m.LoginOk)
            finally:
                second.close()
        asyncio.run(asyncio.wait_for(talk(), 60))
    finally:
        down = simzmq("down", "--data", str(data))
        assert down.returncode == 0, down.stderr
        assert up.finish() == 0
    assert list((data / "run").glob("*.pid")) == []


def test_two_regions_side_by_side_with_port_base(tmp_path):
    first = free_port_base()
    second = free_port_base(avoid=(first,))
    regions = [(Up(tmp_path / "a", "--port-base", str(first), "--store", "sqlite:///" + str(tmp_path / "a.db")),
                first, tmp_path / "a"),
               (Up(tmp_path / "b", "--port-base", str(second)), second, tmp_path / "b")]
    try:
        for up, base, data in regions:
            up.wait_up()
            assert f"Clients connect to 127.0.0.1:{base} " in up.text()
            assert health(base + 80) == 200
            # The Watch line's command watches this region, not the one on the default ports.
            watch = re.search(r"Watch:  \S+ monitor (.*)", up.text()).group(1).split()
            seen = simzmq("monitor", *watch, "--json", "--count", "10")
            states = [(json.loads(line)["brokers"][0]["status"] or {}).get("state") for line in seen.stdout.splitlines()]
            assert "active" in states, seen

        async def register(base: int, data: Path, user: str):
            pk = bytes.fromhex((data / "keys" / "gate.pub").read_text().strip())
            conn = await Connection.open("127.0.0.1", base, pk, ping_interval=None)
            try:
                return await conn.request(m.Register(user=user, password="pw"))
            finally:
                conn.close()
        for up, base, data in regions:
            asyncio.run(asyncio.wait_for(register(base, data, "zoe"), 60))
        # --store chose the first region's store; the second uses its data directory's.
        assert (tmp_path / "a.db").exists() and not (tmp_path / "a" / "im.db").exists()
        assert (tmp_path / "b" / "im.db").exists()
    finally:
        for up, base, data in regions:
            down = simzmq("down", "--data", str(data))
            assert down.returncode == 0, down.stderr
            assert up.finish() == 0
    for up, _, data in regions:
        assert list((data / "run").glob("*.pid")) == []
        assert not any(is_simzmq_process(pid) for pid in started_pids(up.text()))


def child_pids(region: Region) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in (region.data_dir / "run").glob("*.pid") if p.stem != "up"}


def test_sighup_stops_the_whole_region_gates_then_workers_then_brokers(tmp_path):
    region = Region(tmp_path / "data", workers=2).start()
    pids = child_pids(region)
    assert set(pids) == {"broker-primary", "broker-backup", "im-1", "im-2", "gate-1"}
    region.proc.send_signal(signal.SIGHUP)
    assert region.proc.wait(60) == 0
    region.stop()
    assert not any(is_simzmq_process(pid) for pid in pids.values())
    assert list((region.data_dir / "run").glob("*.pid")) == []
    log = region.read_log()
    gate_stopped = log.index("gate gate-1 stopped")
    worker_stopped = max(log.index("im worker im-1 stopped"), log.index("im worker im-2 stopped"))
    broker_stopped = log.index("broker stopped")
    assert gate_stopped < worker_stopped < broker_stopped < log.index("region stopped")


def test_children_stop_when_up_is_killed(tmp_path):
    region = Region(tmp_path / "data").start()
    pids = child_pids(region)
    region.proc.kill()
    region.proc.wait(30)
    region.stop()
    wait_for(lambda: not any(is_simzmq_process(pid) for pid in pids.values()), 60.0)
    out = simzmq("down", "--data", str(region.data_dir))
    assert out.returncode == 0 and "no region is running" in out.stdout


def test_down_from_another_terminal_and_a_second_start_says_how(tmp_path):
    region = Region(tmp_path / "data").start()
    data = region.data_dir
    try:
        assert BANNER in region.read_log()
        again = simzmq("up", "--data", str(data))
        assert again.returncode == 2
        assert f"a region is already running in {data}" in again.stderr
        assert f"down --data {data}`" in again.stderr
        pids = child_pids(region)
        out = simzmq("down", "--data", str(data))
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"stopped the region in {data}: ")
        assert region.proc.wait(60) == 0
    finally:
        region.stop()
    assert not any(is_simzmq_process(pid) for pid in pids.values())
    assert list((data / "run").glob("*.pid")) == []


def test_a_killed_gate_is_restarted_at_once_and_serves_again(tmp_path):
    with Region(tmp_path / "data") as region:
        old = region.pid("gate-1")
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: (data_pid := region.pid("gate-1")) != old and data_pid)
        wait_for(lambda: region.health() == 200, 60.0)
        assert re.search(rf"gate-1 \(pid {old}\) killed by signal 9 after [0-9.]+ s; restarting at once",
                         region.read_log())


def mute_postgres() -> tuple[socket.socket, str]:
    """A "Postgres" that accepts connections and never answers, and its URL:
    an IM worker using it stays starting, so a region cannot come up."""
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen()
    return mute, f"postgresql://u@127.0.0.1:{mute.getsockname()[1]}/db"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_before_the_region_is_up_says_so_and_fails(tmp_path, sig):
    mute, store = mute_postgres()
    base = free_port_base()
    data = tmp_path / "data"
    up = Up(data, "--port-base", str(base), "--store", store)
    try:
        wait_for(lambda: "started im-1" in up.text() or up.proc.poll() is not None, 120.0)
        up.proc.send_signal(sig)
        code = up.finish()
    finally:
        mute.close()
    text = up.text()
    assert code == 128 + sig, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(rf"simzmq up: stopped by {sig.name} before the region was up \(still starting: "
                        r"[a-z0-9-]+(, [a-z0-9-]+)*\); region stopped", last), last
    assert "im-1" in last.split("still starting: ")[1]
    assert BANNER not in text
    assert list((data / "run").glob("*.pid")) == []
    assert not any(is_simzmq_process(pid) for pid in started_pids(text))


def test_a_webhook_secret_without_a_webhook_is_refused(tmp_path):
    data = tmp_path / "data"
    out = simzmq("up", "--data", str(data), "--webhook-secret", "s3")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "simzmq: push.secret is set (from --webhook-secret) but push.webhook is not, and the push service runs "
        "only with a webhook to call: add --webhook URL (push.webhook, SIMZMQ_PUSH_WEBHOOK), or drop the secret")
    site = tmp_path / "site.toml"
    site.write_text('[push]\nsecret = "s3"\n')
    for args, env in [(("--config", str(site)), clean_env()), ((), clean_env(SIMZMQ_PUSH_SECRET="s3"))]:
        out = simzmq(*args, "up", "--data", str(data), env=env)
        origin = str(site) if args else "SIMZMQ_PUSH_SECRET"
        assert out.returncode == 2 and out.stderr.startswith(
            f"simzmq: push.secret is set (from {origin}) but push.webhook is not"), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    assert not data.exists()


def test_the_descriptor_limit_is_raised_at_start_and_a_max_connections_that_cannot_fit_is_one_warning(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"needs a finite hard descriptor limit above 1024 (it is {hard})")
    # Started from a shell with the common soft limit of 1024; max_connections
    # more than even the hard limit allows.
    wanted = hard + 1000
    base = free_port_base(gates=2)
    data = tmp_path / "data"
    up = Up(data, "--port-base", str(base), "--gates", "2",
            env=clean_env(SIMZMQ_GATE_LIMITS_MAX_CONNECTIONS=str(wanted)),
            preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)))
    try:
        up.wait_up()
    finally:
        simzmq("down", "--data", str(data))
        assert up.finish() == 0
    text = up.text()
    cap = hard - 256
    warnings = [line for line in text.splitlines() if " WARNING " in line and "max_connections" in line]
    assert len(warnings) == 2, warnings  # one per gate, each once
    for line in warnings:
        assert (f"gate.limits.max_connections {wanted} does not fit: the descriptor limit is {hard} and the gate "
                f"keeps 256 for itself, so it holds at most {cap} connections; give it {wanted + 256} descriptors "
                f"(LimitNOFILE={wanted + 256} under systemd") in line, line
    listening = [line for line in text.splitlines() if "listening: clients" in line]
    assert len(listening) == 2 and all(f"up to {cap} connections (what {hard} file descriptors allow)" in line
                                       for line in listening), listening


def test_a_data_directory_it_cannot_use_is_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    data = tmp_path / "file" / "data"
    out = simzmq("up", "--data", str(data))
    assert out.returncode == 2
    assert out.stderr.strip() == (f"simzmq: cannot use the data directory {data}: cannot make {data / 'run'}: "
                                  "Not a directory"), out.stderr


def test_a_terminal_closed_before_the_region_is_up_stops_it_with_129(tmp_path):
    """`up` in a terminal window that is closed: the kernel's SIGHUP, and no
    terminal left to write to."""
    mute, store = mute_postgres()
    master, slave = pty.openpty()

    def in_the_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    proc = subprocess.Popen([sys.executable, "-m", "simzmq", "up", "--data", str(tmp_path / "data"),
                             "--port-base", str(free_port_base()), "--store", store],
                            stdin=slave, stdout=slave, stderr=slave, cwd=str(ROOT), env=clean_env(),
                            preexec_fn=in_the_terminal)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 120
        while b"started im-1" not in seen and time.monotonic() < deadline:
            seen += os.read(master, 65536)
    finally:
        os.close(master)  # the window closes
        mute.close()
    assert proc.wait(60) == 128 + signal.SIGHUP
    assert list((tmp_path / "data" / "run").glob("*.pid")) == []
    assert not any(is_simzmq_process(pid) for pid in started_pids(seen.decode(errors="replace")))
