"""Start a real region (`simzmq up`) on free 127.0.0.1 ports for a test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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


class Region:
    """A running `simzmq up` with its own data directory and ports."""

    def __init__(self, data_dir: Path, workers: int = 1, gates: int = 1, extra_env: dict | None = None,
                 store: str | None = None):
        self.data_dir = Path(data_dir)
        ports = free_ports(16)
        self.gate_port, self.http_port = ports[0], ports[1]
        # Gates N>1 take port+N-1; keep those free by spacing: only one gate by default.
        env = dict(os.environ)
        env.pop("SIMZMQ_CONFIG", None)
        names = ["FRONTEND", "BACKEND", "NOTIFY_IN", "NOTIFY_OUT", "STATE"]
        for i, name in enumerate(names):
            env[f"SIMZMQ_BROKER_PRIMARY_{name}"] = f"tcp://127.0.0.1:{ports[2 + i]}"
            env[f"SIMZMQ_BROKER_BACKUP_{name}"] = f"tcp://127.0.0.1:{ports[7 + i]}"
        env["SIMZMQ_BROKER_PRIMARY_METRICS_PORT"] = str(ports[12])
        env["SIMZMQ_BROKER_BACKUP_METRICS_PORT"] = str(ports[13])
        # im-N serves metrics on this + N - 1; only one worker gets a port
        # known to be free, the others go without metrics in tests.
        self.im_metrics_port = ports[14] if workers == 1 else 0
        env["SIMZMQ_IM_METRICS_PORT"] = str(self.im_metrics_port)
        # push-1's metrics (used when a test turns the push service on).
        self.push_metrics_port = ports[15]
        env["SIMZMQ_PUSH_METRICS_PORT"] = str(ports[15])
        if store:
            env["SIMZMQ_IM_STORE"] = store
        env.update(extra_env or {})
        self.env = env
        self.argv = [sys.executable, "-m", "simzmq", "up", "--data", str(self.data_dir),
                     "--gate-port", str(self.gate_port), "--http-port", str(self.http_port),
                     "--workers", str(workers), "--gates", str(gates)]
        self.log_path = self.data_dir.parent / (self.data_dir.name + ".log")
        self.proc: subprocess.Popen | None = None
        # Run in the child before `simzmq up` starts (e.g. lower a resource limit).
        self.preexec = None

    def start(self, timeout: float = 30.0) -> "Region":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=str(ROOT), preexec_fn=self.preexec)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"simzmq up exited: {self.read_log()[-3000:]}")
            # `up` announces the region once every process is ready.
            if self.health() == 200 and "simzmq region up" in self.read_log():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"region did not become healthy: {self.read_log()[-3000:]}")

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
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
