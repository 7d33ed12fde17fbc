"""`simzmq up`: start a region's processes, say it is up only once it is, keep
it up, and stop it in order.

Start: brokers, then IM workers, push services (with a webhook) and gates. The
region is announced only when a broker reports itself active with every IM
worker registered (its state socket), and every gate answers /v1/health with
200 and accepts a TCP connection on its client port. A child that exits before
it has shown it runs (a broker publishing its state, the workers registered, a
gate answering) cannot start (a port taken, an address that is not this
machine's, a bad key): the region is stopped and `up` says which process,
which address and why, in one line. A child that dies after it ran is
restarted (at once the first time, then with a growing delay while it keeps
dying quickly), before and after the region is announced.

Stop (SIGTERM, SIGINT, SIGHUP): gates first (clients get Kick{shutdown}), then
push services, workers, brokers. Children run in their own process group, so a closed
terminal or a Ctrl-C reaches only `up`, which stops them in that order; and
each child asks the kernel to send it SIGTERM if `up` dies without stopping it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import zmq

from simzmq.config import Config, gate_ports
from simzmq.monitor import PairView

log = logging.getLogger("simzmq.up")

# The first death of a child that was ready restarts it at once (a gate must
# serve again quickly); each further death within HEALTHY_RUN_S of its start
# doubles the delay, from RESTART_DELAY_S up to RESTART_DELAY_MAX_S, so a
# crash loop does not spin the CPU.
RESTART_DELAY_S = 0.25
RESTART_DELAY_MAX_S = 5.0
HEALTHY_RUN_S = 10.0
STOP_GRACE_S = 5.0
# How long the region may take to become ready (processes on a loaded
# machine start slowly; a child that cannot start exits well before).
STARTUP_TIMEOUT_S = 60.0
POLL_S = 0.05
# Stop order: the federation (it feeds the brokers), gates, push services,
# workers, then brokers.
STOP_ORDER = ("federation", "gate-", "push-", "im-", "broker-")

PR_SET_PDEATHSIG = 1
# The service IM workers register under (simzmq/im.py SERVICE).
IM_SERVICE = "im"


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: SIGTERM this child when the process that started it dies."""
    def preexec() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            return  # not Linux: the process group and `simzmq down` remain
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def record_failure(run_dir: Path, name: str, reason: str) -> None:
    """What a process of a region writes, in one line, when it cannot run:
    `up` repeats it (DIR/run/NAME.reason; nothing when there is no DIR/run,
    i.e. the process was not started by `up`)."""
    if run_dir.is_dir():
        path = run_dir / f"{name}.reason"
        tmp = path.with_suffix(".reason-tmp")
        tmp.write_text(reason.replace("\n", " ") + "\n")
        os.replace(tmp, path)


class Child:
    """One supervised process. Its stderr is ours (so a slow `up` never holds
    a process back); why it stopped comes from the line it recorded with
    record_failure, else from its exit status."""

    def __init__(self, name: str, argv: list[str], env: dict, run_dir: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.pid_file = run_dir / f"{name}.pid"
        self.reason_file = run_dir / f"{name}.reason"
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.crashes = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        self.reason_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                     process_group=0, preexec_fn=_die_with_parent(os.getpid()))
        self.started = time.monotonic()
        self.restart_at = None
        write_pid_file(self.pid_file, self.proc.pid)
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def reason(self) -> str:
        """Why the child stopped."""
        try:
            said = self.reason_file.read_text().strip()
        except OSError:
            said = ""
        if said:
            return said[len(self.name) + 1:] if said.startswith(self.name + " ") else said
        code = self.proc.returncode if self.proc is not None else None
        if code is not None and code < 0:
            return f"killed by signal {-code}"
        return f"exited with code {code}"

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def restart_if_dead(self, now: float) -> None:
        """After the region is up: notice a death and schedule or perform the restart."""
        if self.proc is not None and self.proc.poll() is not None:
            ran = now - self.started
            if ran > HEALTHY_RUN_S:
                self.crashes = 0
            delay = 0.0 if self.crashes == 0 else min(RESTART_DELAY_S * 2 ** (self.crashes - 1), RESTART_DELAY_MAX_S)
            self.crashes += 1
            log.warning("%s (pid %d) %s after %.1f s; restarting %s", self.name, self.proc.pid, self.reason(), ran,
                        "at once" if delay == 0 else f"in {delay:.2f} s")
            self.proc = None
            self.restart_at = now + delay
        if self.proc is None and self.restart_at is not None and now >= self.restart_at:
            self.start()

    def terminate(self) -> None:
        self.restart_at = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, deadline: float) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", self.name)
                self.proc.kill()
                self.proc.wait()
        self.pid_file.unlink(missing_ok=True)
        self.reason_file.unlink(missing_ok=True)


# --- pid files ----------------------------------------------------------------------


def write_pid_file(path: Path, pid: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, path)


def is_simzmq_process(pid: int) -> bool:
    """Alive, not a zombie, and running simzmq (a pid file that outlived its
    process may name a pid the system gave to something else since)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, IndexError):
        return False
    return state != b"Z" and b"simzmq" in cmdline


def live_processes(run_dir: Path) -> dict[str, int]:
    """name -> pid for the pid files in run_dir whose process still runs
    simzmq; the other pid files are removed."""
    live = {}
    for path in sorted(run_dir.glob("*.pid")):
        try:
            pid = int(path.read_text().strip())
        except (ValueError, OSError):
            pid = 0
        if pid > 0 and is_simzmq_process(pid):
            live[path.stem] = pid
        else:
            path.unlink(missing_ok=True)
    return live


def stop_order(names) -> list[list[str]]:
    """Groups of process names in the order a region stops: up itself (which
    stops the rest), then the federation, gates, workers, brokers, then
    anything else."""
    names = sorted(names)
    groups = [[n for n in names if n == "up"]]
    groups += [[n for n in names if n.startswith(prefix)] for prefix in STOP_ORDER]
    placed = {n for g in groups for n in g}
    groups.append([n for n in names if n not in placed])
    return [g for g in groups if g]


# --- readiness ----------------------------------------------------------------------------


class ReadinessProbe:
    """Asks the region whether it is up: the brokers' state sockets (as the
    ops role, through `configure_socket`) and each gate's health and client
    ports."""

    def __init__(self, cfg: Config, configure_socket):
        g = cfg.gate
        state_endpoints = [cfg.broker.primary.state, cfg.broker.backup.state]
        self.workers = cfg.im.workers
        self.service = IM_SERVICE
        # (name, host, client port, http host, http port, https) of each gate
        self.gates = []
        for i in range(1, g.gates + 1):
            port, http_port = gate_ports(cfg, i)
            self.gates.append((f"gate-{i}", g.host, port, g.http_host, http_port, bool(g.tls_cert)))
        self.ctx = zmq.Context()
        self.view = PairView(state_endpoints, time.monotonic())
        self.status: dict[str, dict] = {}  # endpoint -> the broker's latest state
        self.subs: dict[zmq.Socket, str] = {}
        self.poller = zmq.Poller()
        for ep in state_endpoints:
            sock = self.ctx.socket(zmq.SUB)
            sock.linger = 0
            if configure_socket is not None:
                configure_socket(sock, "state_pub")
            sock.setsockopt(zmq.SUBSCRIBE, b"state")
            sock.connect(ep)
            self.subs[sock] = ep
            self.poller.register(sock, zmq.POLLIN)
        # Processes that have shown they run: a broker publishing its state, the
        # workers registered, a gate answering HTTP and accepting connections.
        self.ready: set[str] = set()

    def close(self) -> None:
        for sock in self.subs:
            sock.close(linger=0)
        self.ctx.term()

    def _read_states(self) -> None:
        for sock, _ in self.poller.poll(0):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.view.on_state(self.subs[sock], frames, time.monotonic())
        self.status = {b.endpoint: b.status for b in self.view.brokers if b.status is not None}

    def broker_waiting(self) -> str | None:
        """None once a broker is active with every worker; else what is missing."""
        self._read_states()
        for status in self.status.values():
            self.ready.add(f"broker-{status.get('role')}")
        if not self.status:
            return "no broker state heard yet"
        best = 0
        for status in self.status.values():
            services = status.get("services") or {}
            workers = (services.get(self.service) or {}).get("workers", 0)
            if status.get("state") == "active":
                if workers >= self.workers:
                    self.ready.update(f"im-{i}" for i in range(1, self.workers + 1))
                    return None
                best = max(best, workers)
        if not any(s.get("state") == "active" for s in self.status.values()):
            return "no broker active yet (" + ", ".join(
                f"{s.get('role')} {s.get('state')}" for s in self.status.values()) + ")"
        return f"{best} of {self.workers} IM workers registered with the active broker"

    def gate_waiting(self, name: str, host: str, port: int, http_host: str, http_port: int, https: bool) -> str | None:
        """None once the gate accepts clients and reports itself healthy. A gate
        that answers at all is running (ready to be restarted if it dies)."""
        scheme = "https" if https else "http"
        url = f"{scheme}://{_connect_host(http_host)}:{http_port}/v1/health"
        context = ssl._create_unverified_context() if https else None  # our own gate, by its address
        try:
            with urllib.request.urlopen(url, timeout=0.5, context=context) as r:
                status = r.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:
            return f"{url}: {getattr(exc, 'reason', exc)}"
        try:
            socket.create_connection((_connect_host(host), port), timeout=0.5).close()
        except OSError as exc:
            return f"client port {host}:{port}: {exc.strerror or exc}"
        self.ready.add(name)
        return None if status == 200 else f"{url} answered {status}"

    def waiting_for(self) -> list[str]:
        """What is not ready yet, one phrase each; empty when the region is up.
        Also notes in `ready` each process that has shown it runs."""
        out = []
        broker = self.broker_waiting()
        if broker:
            out.append("brokers: " + broker)
        for gate in self.gates:
            state = self.gate_waiting(*gate)
            if state:
                out.append(f"{gate[0]}: {state}")
        return out


def _connect_host(host: str) -> str:
    """Where to reach a listener bound to `host` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "*": "127.0.0.1"}.get(host, host)


# --- the region ------------------------------------------------------------------------------


class StartFailed(Exception):
    """The region could not start; the message is the one line `up` prints,
    `exit_code` what it exits with."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def stopped_before_up(signum: int, starting: list[str] | None) -> StartFailed:
    """A stop signal before the region was up (`starting`: the processes not
    ready yet; None: none was started): the shell's 128 + signal number (130
    for Ctrl-C), as for any command a signal ended."""
    what = "nothing was started yet" if starting is None else "still starting: " + ", ".join(starting)
    return StartFailed(f"stopped by {signal.Signals(signum).name} before the region was up ({what})", 128 + signum)


class Supervisor:
    def __init__(self, children: list[Child], probe_factory: Callable[[], ReadinessProbe]):
        self.children = children
        self.probe_factory = probe_factory
        self.stopping: list[int] = []

    def on_signal(self, signum, _frame) -> None:
        self.stopping.append(signum)

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Start every child and wait until the region is ready. StartFailed if
        a child could not start, the region was not ready in time, or a stop
        signal came first."""
        if self.stopping:
            raise stopped_before_up(self.stopping[0], None)
        brokers = [c for c in self.children if c.name.startswith("broker-")]
        for child in brokers:
            child.start()
        for child in self.children:
            if child not in brokers:
                child.start()
        probe = self.probe_factory()
        deadline = time.monotonic() + timeout
        try:
            while not self.stopping:
                for child in self.children:
                    if child.name in probe.ready:
                        child.restart_if_dead(time.monotonic())  # it ran: a crash, not a failure to start
                    elif child.exited() is not None:
                        raise StartFailed(f"{child.name} could not start: {child.reason()}")
                waiting = probe.waiting_for()
                if not waiting:
                    return
                if time.monotonic() > deadline:
                    raise StartFailed(f"the region was not ready after {timeout:.0f} s: " + "; ".join(waiting))
                time.sleep(POLL_S * 4)
            raise stopped_before_up(self.stopping[0], [c.name for c in self.children if c.name not in probe.ready])
        finally:
            probe.close()

    def supervise(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            for child in self.children:
                child.restart_if_dead(now)
            time.sleep(POLL_S)

    def stop(self) -> None:
        for prefix in STOP_ORDER:
            members = [c for c in self.children if c.name.startswith(prefix)]
            for c in members:
                c.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            for c in members:
                c.wait(deadline)
