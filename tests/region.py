"""Start a real region (`simzmq up`) on free 127.0.0.1 ports for a test.

SIMZMQ_TEST_WORKERS and SIMZMQ_TEST_GATES raise the number of IM workers and
gates of every region a test starts to at least that many (a test asking for
more keeps its own): bin/test's Postgres pass runs the integration modules
that use the store on `simzmq up --store postgresql://… --workers 3
--gates 2` that way.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from simzmq import supervise
from tests.pg import region_store, regions_on_postgres

ROOT = Path(__file__).resolve().parent.parent


LEAST_WORKERS_ENV = "SIMZMQ_TEST_WORKERS"
LEAST_GATES_ENV = "SIMZMQ_TEST_GATES"


def at_least(asked: int, env_name: str) -> int:
    """``asked``, or the floor the environment sets for every region if higher."""
    floor = os.environ.get(env_name, "").strip()
    return max(asked, int(floor)) if floor else asked


def bindable(port: int) -> bool:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


# The ports quiet_ports handed out lately: regions a test creates before it
# starts any (federated ones name each other's ports) must not get the same.
_handed_out: deque[int] = deque(maxlen=4000)


def quiet_ports(widths: list[int]) -> list[int]:
    """For each width w a port p with p .. p + w - 1 free, none overlapping
    (gate-N listens on port + N - 1) nor handed out lately. Chosen below the
    kernel's ephemeral range, so that no outgoing connection of this busy
    machine can take one between the pick and the bind: while a killed gate
    is being restarted on it, or while the processes of a region started
    first connect (a region that then starts again on new ports leaves the
    peers given its old ones listening to nothing)."""
    found: list[range] = []
    rng = random.Random()
    while len(found) < len(widths):
        width = widths[len(found)]
        base = rng.randrange(20000, 32000 - width)
        span = range(base, base + width)
        if (all(bindable(p) for p in span) and not any(p in f for f in found for p in span)
                and not any(p in _handed_out for p in span)):
            found.append(span)
    for span in found:
        _handed_out.extend(span)
    return [span.start for span in found]


class RegionFailed(RuntimeError):
    """The region did not come up; ``log`` is what it logged meanwhile."""

    def __init__(self, message: str, log: str):
        super().__init__(message)
        self.log = log


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def parse_metrics(text: str) -> dict[str, float]:
    """A /metrics page as {"name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class Region:
    """A running `simzmq up` with its own data directory and ports."""

    def __init__(self, data_dir: Path, workers: int = 1, gates: int = 1, extra_env: dict | None = None,
                 store: str | None = None):
        self.data_dir = Path(data_dir)
        self.gates = at_least(gates, LEAST_GATES_ENV)
        env = dict(os.environ)
        env.pop("SIMZMQ_CONFIG", None)
        # The test's own knobs are no configuration of the region's (which
        # refuses SIMZMQ_ variables it does not know).
        for name in (LEAST_WORKERS_ENV, LEAST_GATES_ENV):
            env.pop(name, None)
        # im-N serves metrics on this + N - 1; only one worker gets a port
        # known to be free, the others go without metrics in tests.
        self.workers = at_least(workers, LEAST_WORKERS_ENV)
        if store is None and regions_on_postgres():
            store = region_store()
        self.store = store
        if store:
            # What `up --store` says, for the commands a test runs with this
            # environment too (`simzmq push dead`): they open the same store.
            env["SIMZMQ_IM_STORE"] = store
        self.extra_env = dict(extra_env or {})
        self.env = env
        self.argv = [sys.executable, "-m", "simzmq", "up", "--data", str(self.data_dir),
                     "--gate-port", "0", "--http-port", "0",
                     "--workers", str(self.workers), "--gates", str(self.gates)]
        if store:
            self.argv += ["--store", store]
        self._pick_ports()
        self.log_path = self.data_dir.parent / (self.data_dir.name + ".log")
        self.proc: subprocess.Popen | None = None
        # Run in the child before `simzmq up` starts (e.g. lower a resource limit).
        self.preexec = None

    def _pick_ports(self) -> None:
        # gate-N listens on the client and HTTP ports + N - 1: with more than
        # one gate, ports whose neighbours are free too.
        ports = quiet_ports([self.gates, self.gates] + [1] * 14)
        self.gate_port, self.http_port = ports[0], ports[1]
        env = self.env
        names = ["FRONTEND", "BACKEND", "NOTIFY_IN", "NOTIFY_OUT", "STATE"]
        for i, name in enumerate(names):
            env[f"SIMZMQ_BROKER_PRIMARY_{name}"] = f"tcp://127.0.0.1:{ports[2 + i]}"
            env[f"SIMZMQ_BROKER_BACKUP_{name}"] = f"tcp://127.0.0.1:{ports[7 + i]}"
        env["SIMZMQ_BROKER_PRIMARY_METRICS_PORT"] = str(ports[12])
        env["SIMZMQ_BROKER_BACKUP_METRICS_PORT"] = str(ports[13])
        self.im_metrics_port = ports[14] if self.workers == 1 else 0
        env["SIMZMQ_IM_METRICS_PORT"] = str(self.im_metrics_port)
        # push-1's metrics (used when a test turns the push service on).
        self.push_metrics_port = ports[15]
        env["SIMZMQ_PUSH_METRICS_PORT"] = str(ports[15])
        env.update(self.extra_env)
        argv = self.argv
        argv[argv.index("--gate-port") + 1] = str(self.gate_port)
        argv[argv.index("--http-port") + 1] = str(self.http_port)

    def start(self, timeout: float = 120.0) -> "Region":
        """Start and wait until the region is up. A start that fails is
        stopped with everything it started; one that failed because a port
        picked as free was taken meanwhile is tried again once on new ports."""
        try:
            return self._start_once(timeout)
        except RegionFailed as exc:
            if "Address already in use" not in exc.log:
                raise
        self._pick_ports()
        return self._start_once(timeout)

    def _start_once(self, timeout: float) -> "Region":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        since = self.log.tell()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=str(ROOT), preexec_fn=self.preexec)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                failure = "simzmq up exited"
                break
            # `up` announces the region once every process is ready.
            if self.health() == 200 and "simzmq region up" in self.read_log():
                return self
            time.sleep(0.1)
        else:
            failure = "region did not become healthy"
        self.stop()
        log = self.read_log()[since:]
        raise RegionFailed(f"{failure}: {log[-3000:]}", log)

    @property
    def gate_pk(self) -> bytes:
        return bytes.fromhex((self.data_dir / "keys" / "gate.pub").read_text().strip())

    def health(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v1/health", timeout=1) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def http_get(self, path: str, headers: dict | None = None) -> tuple[int, dict | str]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                body = r.read().decode()
                status = r.status
        except urllib.error.HTTPError as e:
            body, status = e.read().decode(), e.code
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def pid(self, name: str) -> int:
        return int((self.data_dir / "run" / f"{name}.pid").read_text())

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        # What `up` could not stop (it was killed): stop it here, so that no
        # process outlives its test.
        for name, pid in supervise.live_processes(self.data_dir / "run").items():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def region_fixture(tmp_name: str, name: str = "region", **kwargs):
    """A module-scoped pytest fixture called ``name``: a region (Region's
    arguments) in a temporary directory named after ``tmp_name``, started for
    the module's tests and stopped after them."""
    import pytest

    @pytest.fixture(scope="module", name=name)
    def running_region(tmp_path_factory):
        with Region(tmp_path_factory.mktemp(tmp_name) / "data", **kwargs) as region:
            yield region
    return running_region


async def until_available(request, within: float = 60.0):
    """``await request()``, again while the gate answers ``unavailable`` (the
    back end did not answer within the gate's request timeout, as happens on
    a loaded machine), for up to ``within`` seconds: the asyncio twin of
    ``RawClient.served``, for requests that may be repeated."""
    from simzmq.client import RequestError
    from simzmq.wire.messages import ErrorCode
    deadline = time.monotonic() + within
    while True:
        try:
            return await request()
        except RequestError as exc:
            if exc.code != ErrorCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)
