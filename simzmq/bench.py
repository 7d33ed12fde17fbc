"""`simzmq bench`: a load generator for a running region.

The generator runs in its own processes (``procs``), each with its own uvloop
event loop over its share of the users, speaking the client protocol through
``simzmq.client.Connection``. The parent process only coordinates: it starts
the children, moves them through the phases of a scenario together (a barrier
per phase), samples the region's processes from /proc at each barrier, draws
the progress bar, and merges what the children measured into one report.

Scenarios:

* ``pairs``   — users as sender→receiver pairs; each sender sends ``messages``
  100-byte messages, either keeping ``window`` Sends unacknowledged or paced at
  a total offered ``rate``. Delivered msgs/s counts the NewMsg pushes that
  receivers see; send→push latency is measured at the receiver from the send
  time carried in the body (one machine, one monotonic clock).
* ``fanin``   — every user but one sends to that one.
* ``backlog`` — senders fill an offline recipient's inbox with ``backlog``
  messages; the measured part is the recipient reconnecting (token login) and
  Syncing all of it.
* ``connect`` — ``connections`` connections handshake and log in with a resume
  token; before that, every user logs in once with its password (measured
  apart, since Argon2id dominates it). Reports logins/s, latencies and the
  region's memory per idle logged-in connection.

Every scenario that sends ends with a check through Sync: each receiver reads
its whole inbox and every acknowledged message must be there exactly once, in
the order its sender sent it.

Setup (registering the per-run users, whose Argon2id hashing takes tens of
milliseconds each, and the first password logins) happens before the measured
window and is reported apart.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import multiprocessing.connection
import os
import resource
import secrets
import signal
import struct
import sys
import time
import traceback
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path

from simzmq.wire import messages as m
from simzmq.wire.errors import ProtocolError
from simzmq.wire.messages import ErrorCode

SCENARIOS = ("pairs", "connect", "fanin", "backlog")
CODEC_IDS = {"bin": 1, "msgpack": 2}

BODY_SIZE = 100
# Body of every bench message: magic | u32 index within its sender | f64 send
# time (time.monotonic(), which is one clock for every process of a machine),
# zero-padded to BODY_SIZE bytes.
BODY_MAGIC = b"SZB1"
BODY_HEAD = struct.Struct(">4sId")
BODY_PAD = bytes(BODY_SIZE - BODY_HEAD.size)

# Requests that the gate or worker refuse for now; the sender repeats them with
# the same cmid (so a Send that did take effect is not stored twice).
RETRY_CODES = frozenset({int(ErrorCode.UNAVAILABLE), int(ErrorCode.RATE_LIMITED)})
RETRY_DELAY_S = 0.2
MAX_SETUP_RETRIES = 50
# Registrations and password logins in flight across all processes: Argon2id
# runs on a small thread pool per IM worker, so more only queue there (and a
# queue longer than the gate's request timeout turns into errors).
PASSWORD_IN_FLIGHT = 8
# A receiver that has not seen all it expects gives up after this long with no
# push (pushes may be lost; the Sync check still finds the messages).
QUIET_S = 5.0
SYNC_LIMIT = 500
CONNECT_SESSIONS_PER_USER = 16
PROGRESS_INTERVAL_S = 0.25

# Shared progress counters, one row per child.
F_SETUP, F_SENT, F_ACKED, F_DELIVERED, F_LOGINS, F_SYNCED, F_ERRORS = range(7)
N_FIELDS = 7


class BenchError(Exception):
    """A bench that cannot start or could not finish."""


@dataclass
class Options:
    scenario: str
    host: str
    port: int
    gate_pk: bytes
    data_dir: str | None = None
    users: int | None = None
    messages: int = 200
    window: int = 16
    rate: float | None = None
    procs: int = 1
    connections: int = 1000
    backlog: int = 10000
    concurrency: int = 64
    codec: str = "bin"
    settle_s: float = 2.0
    prefix: str = ""

    def resolved_users(self) -> int:
        if self.users is not None:
            return self.users
        # connect: at most CONNECT_SESSIONS_PER_USER connections per user, under
        # the gate's default cap on sessions per user (gate.limits.max_sessions_per_user).
        connect_users = min(self.connections, max(200, -(-self.connections // CONNECT_SESSIONS_PER_USER)))
        return {"pairs": 200, "fanin": 50, "backlog": 2, "connect": connect_users}[self.scenario]


# ---------------------------------------------------------------------------
# Who does what: users, pairs, and which process runs them.
# ---------------------------------------------------------------------------

@dataclass
class Flow:
    """One sender's part: ``count`` messages from ``sender`` to ``to``."""
    sender: str
    to: str
    count: int


@dataclass
class Plan:
    """One child's share of a scenario."""
    index: int
    flows: list[Flow] = field(default_factory=list)
    # receiver -> {sender: count} for the receivers this child runs
    receivers: dict[str, dict[str, int]] = field(default_factory=dict)
    users: list[str] = field(default_factory=list)  # users this child registers
    connections: list[tuple[int, str]] = field(default_factory=list)  # connect: (number, user)


def user_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i}"


def password_for(prefix: str) -> str:
    return prefix + "-pw"


def make_plans(opts: Options) -> list[Plan]:
    """Split the scenario's users and work over ``opts.procs`` children."""
    procs = opts.procs
    n = opts.resolved_users()
    plans = [Plan(i) for i in range(procs)]
    name = lambda i: user_name(opts.prefix, i)
    if opts.scenario == "pairs":
        for p in range(n // 2):
            plan = plans[p % procs]
            sender, receiver = name(2 * p), name(2 * p + 1)
            plan.users += [sender, receiver]
            plan.flows.append(Flow(sender, receiver, opts.messages))
            plan.receivers[receiver] = {sender: opts.messages}
    elif opts.scenario in ("fanin", "backlog"):
        recipient = name(0)
        plans[0].users.append(recipient)
        senders = [name(i) for i in range(1, n)]
        per = [opts.messages] * len(senders)
        if opts.scenario == "backlog":
            base, extra = divmod(opts.backlog, len(senders))
            per = [base + (1 if i < extra else 0) for i in range(len(senders))]
        expected = {}
        for i, (sender, count) in enumerate(zip(senders, per)):
            plan = plans[i % procs]
            plan.users.append(sender)
            plan.flows.append(Flow(sender, recipient, count))
            expected[sender] = count
        plans[0].receivers[recipient] = expected
    elif opts.scenario == "connect":
        for i in range(n):
            plans[i % procs].users.append(name(i))
        for c in range(opts.connections):
            u = c % n
            plans[u % procs].connections.append((c, name(u)))
    return plans


def validate(opts: Options) -> None:
    if opts.scenario not in SCENARIOS:
        raise BenchError(f"unknown scenario {opts.scenario!r}")
    n = opts.resolved_users()
    if opts.procs < 1:
        raise BenchError("--procs must be at least 1")
    if opts.scenario == "pairs" and (n < 2 or n % 2):
        raise BenchError("pairs needs an even number of users, at least 2")
    if opts.scenario in ("fanin", "backlog") and n < 2:
        raise BenchError(f"{opts.scenario} needs at least 2 users (senders and one recipient)")
    if opts.scenario == "connect" and (n < 1 or opts.connections < 1):
        raise BenchError("connect needs at least one user and one connection")
    if opts.messages < 1 or opts.window < 1 or opts.concurrency < 1:
        raise BenchError("--messages, --window and --concurrency must be at least 1")
    if opts.scenario == "backlog" and opts.backlog < 1:
        raise BenchError("--backlog must be at least 1")
    if opts.rate is not None and opts.rate <= 0:
        raise BenchError("--rate must be positive")
    if opts.codec not in CODEC_IDS:
        raise BenchError(f"--codec must be one of {', '.join(CODEC_IDS)}")
    if opts.procs > 1:
        busy = [p for p in make_plans(opts) if p.users or p.connections]
        if len(busy) < opts.procs:
            raise BenchError(f"--procs {opts.procs} is more than this scenario has work for ({len(busy)})")


# ---------------------------------------------------------------------------
# Measuring the region's processes through /proc.
# ---------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read_pid_files(data_dir: str | Path | None) -> dict[str, int]:
    """``{name: pid}`` from ``DATA/run/*.pid`` (broker-primary, im-1, gate-1…)."""
    if data_dir is None:
        return {}
    pids = {}
    for path in sorted((Path(data_dir) / "run").glob("*.pid")):
        try:
            pids[path.stem] = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
    return pids


def proc_sample(pid: int) -> tuple[float, int] | None:
    """``(cpu_seconds, rss_bytes)`` of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    fields = stat.rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
            break
    return cpu, rss


MACHINE = ""  # the key of the whole machine's CPU sample in sample_all()


def machine_cpu() -> tuple[float, float] | None:
    """``(busy_cpu_seconds, all_cpu_seconds)`` of the whole machine since boot."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK


def sample_all(pids: dict[str, int]) -> dict[str, tuple | None]:
    out: dict[str, tuple | None] = {name: proc_sample(pid) for name, pid in pids.items()}
    out[MACHINE] = machine_cpu()
    return out


def machine_report(before: dict, after: dict, region_cpu_s: float, generator_cpu_s: float) -> dict | None:
    """How busy the machine was in the window, and how much of that was
    neither the region nor the generator (a shared machine's noise)."""
    b, a = before.get(MACHINE), after.get(MACHINE)
    if not b or not a or a[1] <= b[1]:
        return None
    busy, total = a[0] - b[0], a[1] - b[1]
    cpus = os.cpu_count() or 1
    wall = total / cpus
    return {"busy_pct_of_all_cpus": round(100 * busy / total, 1),
            "other_cpu_s": round(max(0.0, busy - region_cpu_s - generator_cpu_s), 2),
            "other_pct_of_one_cpu": round(100 * max(0.0, busy - region_cpu_s - generator_cpu_s) / wall, 1)}


def gate_port_from_pid(data_dir: str | Path | None) -> int | None:
    """The client port of gate-1 as `simzmq up` started it (its --port), if
    the region runs on this machine."""
    pid = read_pid_files(data_dir).get("gate-1")
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg == b"--port":
            try:
                return int(argv[i + 1])
            except ValueError:
                return None
    return None


def gate_http_ports(data_dir: str | Path | None) -> dict[str, int]:
    """``{gate name: HTTP port}`` from the gates' command lines (their --http-port)."""
    ports = {}
    for name, pid in read_pid_files(data_dir).items():
        if not name.startswith("gate-"):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg == b"--http-port":
                try:
                    ports[name] = int(argv[i + 1])
                except ValueError:
                    pass
    return ports


# Gate counters worth a look after a run: each one that moved means the run
# met failovers, lost pushes, timeouts or the gate's limits.
GATE_EVENTS = ("simzmq_gate_failovers_total", "simzmq_gate_catchups_total", "simzmq_gate_push_holes_total",
               "simzmq_gate_notification_gaps_total", "simzmq_gate_backend_timeouts_total",
               "simzmq_gate_rate_limited_total", "simzmq_gate_kicks_total", "simzmq_gate_backpressure_total")


def gate_events(host: str, ports: dict[str, int]) -> dict[str, float]:
    """The GATE_EVENTS counters, summed over labels and gates, from /metrics."""
    import urllib.request
    totals: dict[str, float] = {}
    for port in ports.values():
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as resp:
                text = resp.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            continue
        for line in text.splitlines():
            if not line.startswith("simzmq_gate_"):
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in GATE_EVENTS:
                try:
                    totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
                except ValueError:
                    continue
    return totals


def events_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    out = {}
    for name in GATE_EVENTS:
        if name in after:
            d = int(after[name] - before.get(name, 0.0))
            if d:
                out[name.removeprefix("simzmq_gate_").removesuffix("_total")] = d
    return out


# ---------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------

def percentiles(samples, points=(50, 95, 99)) -> dict:
    """Nearest-rank percentiles and the max, in milliseconds (samples in seconds)."""
    data = sorted(samples)
    if not data:
        return {"n": 0}
    out = {"n": len(data)}
    for p in points:
        rank = max(1, math.ceil(p / 100 * len(data)))
        out[f"p{p}"] = round(data[rank - 1] * 1000, 3)
    out["max"] = round(data[-1] * 1000, 3)
    out["mean"] = round(sum(data) / len(data) * 1000, 3)
    return out


def order_check(found: list[int], acked: set[int], retried: set[int] = frozenset()) -> dict:
    """How one sender's messages sit in one receiver's inbox. ``found`` is the
    sender's message indexes in inbox (seq) order; ``retried`` the ones the
    sender had to send again after a refusal (rate_limited, unavailable), which
    legitimately land after Sends that were accepted meanwhile."""
    seen: set[int] = set()
    doubled = reordered = late_retries = 0
    highest = -1
    for k in found:
        if k in seen:
            doubled += 1
            continue
        seen.add(k)
        if k < highest:
            if k in retried:
                late_retries += 1
            else:
                reordered += 1
        else:
            highest = k
    return {"lost": len(acked - seen), "doubled": doubled, "reordered": reordered, "late_retries": late_retries,
            "unconfirmed": len(seen - acked), "found": len(seen)}


# ---------------------------------------------------------------------------
# The child process: one event loop over its share of the users.
# ---------------------------------------------------------------------------

def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _child_entry(opts: Options, plan: Plan, ctl, counters) -> None:
    _raise_fd_limit()
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    try:
        runner(Worker(opts, plan, ctl, counters).main())
    except BaseException:
        try:
            ctl.send(("error", plan.index, traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(2)


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _error_name(exc: BaseException) -> str:
    from simzmq.client import RequestError
    if isinstance(exc, RequestError):
        try:
            return ErrorCode(exc.code).name.lower()
        except ValueError:
            return f"error_{exc.code}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        import errno
        return errno.errorcode.get(exc.errno, type(exc).__name__).lower()
    return type(exc).__name__


class Sender:
    """One user's Sends on one connection: a window of unacknowledged Sends, or
    one Send each time the pacer says so."""

    __slots__ = (
        "acked",
        "cmid_prefix",
        "conn",
        "done",
        "errors",
        "failed",
        "flow",
        "next_k",
        "retried",
        "retries",
        "sent_at",
        "to",
        "worker",
    )

    def __init__(self, worker: Worker, conn, flow: Flow):
        self.worker = worker
        self.conn = conn
        self.flow = flow
        self.to = flow.to
        self.next_k = 0
        self.acked = 0
        self.failed: list[int] = []
        self.retries = 0
        self.retried: set[int] = set()
        self.errors: dict[str, int] = {}
        # cmids unique per sender: 12 random bytes, then the message index.
        self.cmid_prefix = secrets.token_bytes(12)
        self.sent_at: dict[int, float] = {}
        self.done = flow.count == 0

    @property
    def finished(self) -> int:
        return self.acked + len(self.failed)

    def start_window(self, window: int) -> None:
        for _ in range(min(window, self.flow.count)):
            self.send_next()

    def send_next(self) -> None:
        k = self.next_k
        self.next_k += 1
        now = time.monotonic()
        self.sent_at[k] = now
        self._transmit(k, now)

    def _transmit(self, k: int, t_sent: float) -> None:
        body = BODY_HEAD.pack(BODY_MAGIC, k, t_sent) + BODY_PAD
        msg = m.Send(to=self.to, cmid=self.cmid_prefix + k.to_bytes(4, "big"), kind=0, body=body)
        try:
            fut = self.conn.request_nowait(msg)
        except (ConnectionError, OSError) as exc:
            self._fail(k, exc)
            return
        self.worker.counters[self.worker.row + F_SENT] += 1
        fut.add_done_callback(lambda f, k=k, t=t_sent: self._replied(f, k, t))

    def _replied(self, fut: asyncio.Future, k: int, t_sent: float) -> None:
        if fut.cancelled():
            self._fail(k, ConnectionError("cancelled"))
            return
        exc = fut.exception()
        w = self.worker
        if exc is None:
            self.acked += 1
            w.counters[w.row + F_ACKED] += 1
            if w.measuring:
                w.ack_latency.append(time.monotonic() - self.sent_at.pop(k))
            else:
                self.sent_at.pop(k, None)
            if w.window_mode and self.next_k < self.flow.count:
                self.send_next()
        elif getattr(exc, "code", None) in RETRY_CODES and not self.conn.closed:
            self.retries += 1
            self.retried.add(k)
            name = _error_name(exc)
            self.errors[name] = self.errors.get(name, 0) + 1
            w.loop.call_later(RETRY_DELAY_S, self._transmit, k, t_sent)
            return
        else:
            self._fail(k, exc)
            if isinstance(exc, ConnectionError):
                return
            if w.window_mode and self.next_k < self.flow.count:
                self.send_next()
        self._check_done()

    def _fail(self, k: int, exc: BaseException) -> None:
        name = _error_name(exc)
        self.errors[name] = self.errors.get(name, 0) + 1
        self.worker.counters[self.worker.row + F_ERRORS] += 1
        self.sent_at.pop(k, None)
        self.failed.append(k)
        if isinstance(exc, ConnectionError) or self.conn.closed:
            # Nothing more goes out on this connection: the rest fail too.
            while self.next_k < self.flow.count:
                self.failed.append(self.next_k)
                self.next_k += 1
        self._check_done()

    def _check_done(self) -> None:
        if not self.done and self.finished >= self.flow.count:
            self.done = True
            self.worker.flow_done()

    def result(self) -> dict:
        return {"sender": self.flow.sender, "to": self.to, "count": self.flow.count, "acked": self.acked,
                "failed": sorted(self.failed), "retries": self.retries, "retried": sorted(self.retried),
                "errors": self.errors}


class Receiver:
    """Counts one user's NewMsg pushes and their send→push latency, then
    checks its inbox through Sync."""

    __slots__ = (
        "check",
        "conn",
        "done",
        "dup_pushes",
        "expected",
        "last_push",
        "other_pushes",
        "pushes",
        "seen",
        "total",
        "user",
        "worker",
    )

    def __init__(self, worker: Worker, user: str, expected: dict[str, int]):
        self.worker = worker
        self.user = user
        self.expected = expected
        self.total = sum(expected.values())
        self.seen: set[int] = set()
        self.pushes = 0
        self.dup_pushes = 0
        self.other_pushes = 0
        self.last_push = 0.0
        self.done = self.total == 0
        self.conn = None
        self.check: dict | None = None

    def on_push(self, push) -> None:
        if type(push) is not m.NewMsg:
            self.other_pushes += 1
            return
        msg = push.msg
        now = time.monotonic()
        if msg.seq in self.seen:
            self.dup_pushes += 1
            return
        self.seen.add(msg.seq)
        body = msg.body
        if msg.sender not in self.expected or len(body) != BODY_SIZE or body[:4] != BODY_MAGIC:
            self.other_pushes += 1
            return
        w = self.worker
        self.pushes += 1
        self.last_push = now
        w.counters[w.row + F_DELIVERED] += 1
        if w.measuring:
            w.push_latency.append(now - BODY_HEAD.unpack_from(body)[2])
        if not self.done and self.pushes >= self.total:
            self.done = True
            w.receiver_done()

    async def sync_inbox(self, conn) -> dict:
        """Read the whole inbox; per expected sender, its message indexes in seq order."""
        found: dict[str, array] = {s: array("I") for s in self.expected}
        since = 0
        entries = gaps = other = requests = 0
        while True:
            batch = await conn.request(m.Sync(since=since, limit=SYNC_LIMIT))
            requests += 1
            for msg in batch.msgs:
                entries += 1
                if msg.seq != since + 1:
                    gaps += 1
                since = msg.seq
                ks = found.get(msg.sender)
                if ks is not None and len(msg.body) == BODY_SIZE and msg.body[:4] == BODY_MAGIC:
                    ks.append(BODY_HEAD.unpack_from(msg.body)[1])
                else:
                    other += 1
            self.worker.counters[self.worker.row + F_SYNCED] += len(batch.msgs)
            if not batch.more or not batch.msgs:
                break
        return {"user": self.user, "entries": entries, "inbox_gaps": gaps, "other": other,
                "sync_requests": requests, "found": {s: ks.tobytes() for s, ks in found.items()}}

    def result(self) -> dict:
        return {"user": self.user, "expected": self.total, "pushes": self.pushes, "dup_pushes": self.dup_pushes,
                "other_pushes": self.other_pushes, "check": self.check}


class Worker:
    """One child process's share of a scenario."""

    def __init__(self, opts: Options, plan: Plan, ctl, counters):
        self.opts = opts
        self.plan = plan
        self.ctl = ctl
        self.counters = counters
        self.row = plan.index * N_FIELDS
        self.codecs = (CODEC_IDS[opts.codec],)
        self.password = password_for(opts.prefix)
        self.window_mode = opts.rate is None
        self.measuring = False
        self.push_latency = array("d")
        self.ack_latency = array("d")
        self.errors: dict[str, int] = {}
        self._go: asyncio.Future | None = None
        self._all_done: asyncio.Event | None = None
        self._flows_left = 0
        self._receivers_left = 0

    # -- control channel with the parent ---------------------------------------

    def _on_ctl(self) -> None:
        while self.ctl.poll():
            try:
                msg = self.ctl.recv()
            except (EOFError, OSError):
                # The parent is gone: nobody will read what this process measures.
                os._exit(4)
            if msg[0] == "go" and self._go is not None and not self._go.done():
                self._go.set_result(msg[2])
            elif msg[0] == "abort":
                os._exit(3)

    async def barrier(self, name: str, info: dict | None = None) -> float:
        """Tell the parent this phase is done; wait for the go of the next one.
        Returns the start time (monotonic) the parent chose."""
        self._go = self.loop.create_future()
        self.ctl.send(("ready", self.plan.index, name, info or {}))
        t0 = await self._go
        delay = t0 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return t0

    def count_error(self, exc: BaseException) -> None:
        name = _error_name(exc)
        self.errors[name] = self.errors.get(name, 0) + 1
        self.counters[self.row + F_ERRORS] += 1

    # -- connections -----------------------------------------------------------------

    async def open(self, on_push=None):
        from simzmq.client import Connection
        return await Connection.open(self.opts.host, self.opts.port, self.opts.gate_pk, self.codecs,
                                     on_push=on_push)

    async def request_retrying(self, conn, msg):
        """A setup request, repeated while the region says unavailable."""
        from simzmq.client import RequestError
        for _ in range(MAX_SETUP_RETRIES):
            try:
                return await conn.request(msg)
            except RequestError as exc:
                if exc.code not in RETRY_CODES:
                    raise
            await asyncio.sleep(RETRY_DELAY_S)
        raise BenchError(f"{type(msg).__name__} kept failing with unavailable")

    async def register_all(self, names: list[str]) -> None:
        """Create the users on a few connections, a bounded number in flight."""
        from simzmq.client import RequestError
        if not names:
            return
        todo = list(reversed(names))
        lanes = max(1, min(len(names), PASSWORD_IN_FLIGHT // self.opts.procs))

        async def lane():
            conn = await self.open()
            try:
                while todo:
                    name = todo.pop()
                    try:
                        await self.request_retrying(conn, m.Register(user=name, password=self.password))
                    except RequestError as exc:
                        # `exists`: an earlier attempt that timed out at the gate did succeed.
                        if exc.code != ErrorCode.EXISTS:
                            raise BenchError(f"cannot register {name}: {exc}") from None
                    self.counters[self.row + F_SETUP] += 1
            finally:
                conn.close()
        await asyncio.gather(*(lane() for _ in range(lanes)))

    async def password_logins(self, names: list[str], keep: bool, on_push_for=None,
                              timings: list | None = None, counter: int = F_SETUP) -> dict[str, tuple]:
        """Log every user in with its password, a bounded number in flight.
        Returns {user: (conn or None, token)}."""
        sem = asyncio.Semaphore(max(1, PASSWORD_IN_FLIGHT // self.opts.procs))
        out: dict[str, tuple] = {}

        async def one(name):
            async with sem:
                t0 = time.monotonic()
                conn = await self.open(on_push_for(name) if on_push_for else None)
                t1 = time.monotonic()
                try:
                    ok = await self.request_retrying(conn, m.Login(user=name, password=self.password, device="bench"))
                except BaseException:
                    conn.close()
                    raise
                t2 = time.monotonic()
                if timings is not None:
                    timings.append((t1 - t0, t2 - t1, t2))
                self.counters[self.row + counter] += 1
                if not keep:
                    conn.close()
                    conn = None
                out[name] = (conn, ok.token)
        await asyncio.gather(*(one(n) for n in names))
        return out

    # -- the scenarios -----------------------------------------------------------------

    async def main(self) -> None:
        self.loop = asyncio.get_running_loop()
        fd = self.ctl.fileno()
        self.loop.add_reader(fd, self._on_ctl)
        # The event loop made the descriptor non-blocking; the control channel
        # sends whole messages (a large result would otherwise stop halfway
        # with EAGAIN), so put it back.
        os.set_blocking(fd, True)
        self._orphan_watch = asyncio.create_task(self._watch_parent(os.getppid()))
        scenario = getattr(self, "run_" + self.opts.scenario)
        result = await scenario()
        result["errors"] = {**result.get("errors", {}), **self.errors}
        self.ctl.send(("result", self.plan.index, result))
        # Wait for the parent's last word so results are read before exit.
        await self.barrier("exit")

    @staticmethod
    async def _watch_parent(parent: int) -> None:
        """Stop when the bench's main process is gone (killed: it cannot say so)."""
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != parent:
                os._exit(4)

    def flow_done(self) -> None:
        self._flows_left -= 1
        self._maybe_all_done()

    def receiver_done(self) -> None:
        self._receivers_left -= 1
        self._maybe_all_done()

    def _maybe_all_done(self) -> None:
        if self._flows_left <= 0 and self._receivers_left <= 0 and self._all_done is not None:
            self._all_done.set()

    async def _traffic(self) -> dict:
        """Senders send, receivers count pushes, until all is delivered (or
        pushes go quiet). Returns what the run phase measured."""
        opts, plan = self.opts, self.plan
        receivers = {name: Receiver(self, name, exp) for name, exp in plan.receivers.items()}
        t_setup = time.monotonic()
        await self.register_all(plan.users)
        sessions = await self.password_logins(
            plan.users, keep=True,
            on_push_for=lambda name: receivers[name].on_push if name in receivers else self._stray_push)
        for name, r in receivers.items():
            r.conn = sessions[name][0]
        senders = [Sender(self, sessions[f.sender][0], f) for f in plan.flows]
        setup_s = time.monotonic() - t_setup
        self._flows_left = sum(1 for s in senders if not s.done)
        self._receivers_left = sum(1 for r in receivers.values() if not r.done)
        self._all_done = asyncio.Event()

        t0 = await self.barrier("setup", {"setup_s": setup_s})
        cpu0 = _cpu_self()
        self.measuring = True
        pacer = None
        if self.window_mode:
            for s in senders:
                s.start_window(opts.window)
        else:
            pacer = asyncio.create_task(self._pace(senders, t0))
        self._maybe_all_done()
        lag = await self._wait_delivered(receivers, pacer)
        self.measuring = False
        cpu = _cpu_self() - cpu0
        t_last = max((r.last_push for r in receivers.values()), default=0.0)
        info = {"t_last_push": t_last, "cpu_s": cpu}
        await self.barrier("run", info)
        for r in receivers.values():
            r.check = await r.sync_inbox(r.conn)
        for conn, _ in sessions.values():
            conn.close()
        return {"senders": [s.result() for s in senders], "receivers": [r.result() for r in receivers.values()],
                "push_latency": self.push_latency.tobytes(), "ack_latency": self.ack_latency.tobytes(),
                "pace_lag": lag.tobytes(), "t_last_push": t_last, "cpu_s": cpu, "setup_s": setup_s}

    def _stray_push(self, push) -> None:
        if type(push) is m.NewMsg:
            self.errors["unexpected_push"] = self.errors.get("unexpected_push", 0) + 1

    async def _pace(self, senders: list[Sender], t0: float) -> array:
        """Open loop: this process's share of the offered rate, message j due at
        t0 + j / rate, round robin over its senders. Returns how late each Send
        left against its schedule (generator lag, seconds)."""
        share = sum(s.flow.count for s in senders) / max(1, self._total_messages())
        rate = self.opts.rate * share
        lag = array("d")
        queue = [s for s in senders if s.flow.count > 0]
        # Stagger processes so their Sends do not leave in lockstep.
        start = t0 + (self.plan.index / self.opts.procs) / rate
        j = pos = 0
        while queue:
            now = time.monotonic()
            due = start + j / rate
            if due > now:
                await asyncio.sleep(due - now)
                now = time.monotonic()
            # Everything due by now goes out (a late wake-up catches up).
            while queue and start + j / rate <= now:
                pos %= len(queue)
                sender = queue[pos]
                lag.append(now - (start + j / rate))
                sender.send_next()
                j += 1
                if sender.next_k >= sender.flow.count:
                    queue.pop(pos)
                else:
                    pos += 1
        return lag

    def _total_messages(self) -> int:
        opts = self.opts
        if opts.scenario == "pairs":
            return (opts.resolved_users() // 2) * opts.messages
        if opts.scenario == "fanin":
            return (opts.resolved_users() - 1) * opts.messages
        return opts.backlog

    async def _wait_delivered(self, receivers: dict[str, Receiver], pacer) -> array:
        """Until every flow is acknowledged and every receiver saw all it
        expects, or pushes went quiet after the last Send (a lost push is the
        Sync check's business, not a reason to wait forever)."""
        lag = await pacer if pacer is not None else array("d")
        quiet = QUIET_S
        if self.opts.rate:
            # At a low offered rate a receiver's pushes are far apart.
            quiet = max(QUIET_S, 5 * self.opts.resolved_users() / self.opts.rate)
        flows_done_at = None
        while not self._all_done.is_set():
            try:
                await asyncio.wait_for(self._all_done.wait(), 0.25)
            except TimeoutError:
                pass
            now = time.monotonic()
            if self._flows_left <= 0:
                if flows_done_at is None:
                    flows_done_at = now
                newest = max([flows_done_at] + [r.last_push for r in receivers.values()])
                if now - newest > quiet:
                    break
            if receivers and all(r.conn.closed for r in receivers.values()):
                break
        return lag

    async def run_pairs(self) -> dict:
        return await self._traffic()

    async def run_fanin(self) -> dict:
        return await self._traffic()

    async def run_backlog(self) -> dict:
        plan = self.plan
        receivers = {name: Receiver(self, name, exp) for name, exp in plan.receivers.items()}
        t_setup = time.monotonic()
        await self.register_all(plan.users)
        senders_names = [f.sender for f in plan.flows]
        recipient_tokens = await self.password_logins(list(receivers), keep=False)
        sessions = await self.password_logins(senders_names, keep=True, on_push_for=lambda name: self._stray_push)
        senders = [Sender(self, sessions[f.sender][0], f) for f in plan.flows]
        self._flows_left = sum(1 for s in senders if not s.done)
        self._receivers_left = 0
        self._all_done = asyncio.Event()
        # Fill the offline recipient's inbox (setup, measured apart).
        t_fill = time.monotonic()
        for s in senders:
            s.start_window(self.opts.window)
        self._maybe_all_done()
        await self._all_done.wait()
        fill_s = time.monotonic() - t_fill
        for conn, _ in sessions.values():
            conn.close()
        setup_s = time.monotonic() - t_setup
        await self.barrier("setup", {"setup_s": setup_s, "fill_s": fill_s, "fill_start": t_fill})

        cpu0 = _cpu_self()
        timing = {}
        for name, r in receivers.items():
            t0 = time.monotonic()
            conn = await self.open(r.on_push)
            t1 = time.monotonic()
            ok = await self.request_retrying(conn, m.Login(user=name, token=recipient_tokens[name][1],
                                                           device="bench"))
            t2 = time.monotonic()
            r.check = await r.sync_inbox(conn)
            t3 = time.monotonic()
            conn.close()
            timing = {"handshake_s": t1 - t0, "login_s": t2 - t1, "sync_s": t3 - t2, "total_s": t3 - t0,
                      "max_seq": ok.max_seq}
        cpu = _cpu_self() - cpu0
        await self.barrier("run", {"cpu_s": cpu})
        return {"senders": [s.result() for s in senders], "receivers": [r.result() for r in receivers.values()],
                "timing": timing, "cpu_s": cpu, "setup_s": setup_s, "fill_s": fill_s,
                "ack_latency": array("d").tobytes(), "push_latency": array("d").tobytes()}

    async def run_connect(self) -> dict:
        from simzmq.client import RequestError
        plan, opts = self.plan, self.opts
        t_setup = time.monotonic()
        await self.register_all(plan.users)
        setup_s = time.monotonic() - t_setup
        await self.barrier("setup", {"setup_s": setup_s})

        # Password logins: one per user.
        cpu0 = _cpu_self()
        pw_timings: list = []
        tokens = await self.password_logins(plan.users, keep=False, timings=pw_timings, counter=F_LOGINS)
        await self.barrier("password", {"cpu_s": _cpu_self() - cpu0})

        # Token logins: every connection, a bounded number in flight.
        cpu0 = _cpu_self()
        sem = asyncio.Semaphore(opts.concurrency)
        conns = []
        tk_timings: list = []

        async def one(number, user):
            async with sem:
                t0 = time.monotonic()
                try:
                    conn = await self.open()
                except (TimeoutError, OSError, ConnectionError, ProtocolError) as exc:
                    self.count_error(exc)
                    return
                t1 = time.monotonic()
                try:
                    await conn.request(m.Login(user=user, token=tokens[user][1], device=f"bench-{number}"))
                except (RequestError, ConnectionError) as exc:
                    self.count_error(exc)
                    conn.close()
                    return
                t2 = time.monotonic()
                conns.append(conn)
                tk_timings.append((t1 - t0, t2 - t1, t2))
                self.counters[self.row + F_LOGINS] += 1
        await asyncio.gather(*(one(c, u) for c, u in plan.connections))
        cpu = _cpu_self() - cpu0
        # The parent measures the region's memory with all of them idle, then
        # says go.
        await self.barrier("token", {"cpu_s": cpu})
        alive = sum(1 for c in conns if not c.closed)
        for c in conns:
            c.close()
        return {"password": pw_timings, "token": tk_timings, "setup_s": setup_s, "cpu_s": cpu,
                "alive_after_idle": alive, "opened": len(conns)}


# ---------------------------------------------------------------------------
# The parent: start children, drive the phases, measure, report.
# ---------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.last_line = 0.0
        self.width = 0

    def show(self, label: str, done: int, total: int, started: float, base: int = 0) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and now - self.last_line < 2.0:
            return
        self.last_line = now
        elapsed = now - started
        frac = min(1.0, done / total) if total else 0.0
        bar = "#" * int(frac * 30)
        rate = (done - base) / elapsed if elapsed > 0 else 0.0
        line = f"{label:<9}[{bar:<30}] {done}/{total} {frac * 100:5.1f}% {rate:9.0f}/s {elapsed:6.1f}s"
        if self.tty:
            pad = max(0, self.width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.enabled and self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


class Coordinator:
    def __init__(self, opts: Options, progress: Progress):
        self.opts = opts
        self.progress = progress
        self.plans = make_plans(opts)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.mp = multiprocessing.get_context(method)
        self.counters = self.mp.RawArray("q", N_FIELDS * len(self.plans))
        self.children = []
        self.pipes = []
        self.results: dict[int, dict] = {}

    def start(self) -> None:
        for plan in self.plans:
            parent_end, child_end = self.mp.Pipe()
            p = self.mp.Process(target=_child_entry, args=(self.opts, plan, child_end, self.counters),
                                name=f"simzmq-bench-{plan.index}", daemon=True)
            p.start()
            child_end.close()
            self.children.append(p)
            self.pipes.append(parent_end)

    def total(self, fields: tuple[int, ...]) -> int:
        c = self.counters
        return sum(c[i * N_FIELDS + f] for i in range(len(self.plans)) for f in fields)

    def wait_phase(self, name: str, label: str, counter: int | tuple[int, ...], total: int) -> dict[int, dict]:
        """Wait until every child reports `name` done; returns their infos."""
        infos: dict[int, dict] = {}
        started = time.monotonic()
        counter = counter if isinstance(counter, tuple) else (counter,)
        base = self.total(counter)
        while len(infos) < len(self.plans):
            ready = multiprocessing.connection.wait(self.pipes, timeout=PROGRESS_INTERVAL_S)
            for pipe in ready:
                try:
                    msg = pipe.recv()
                except EOFError:
                    continue
                self._handle(msg, name, infos)
            for p in self.children:
                if not p.is_alive() and p.exitcode not in (0, None) and len(infos) < len(self.plans):
                    self._drain_errors()
                    raise BenchError(f"bench process {p.name} exited with {p.exitcode}")
            self.progress.show(label, self.total(counter), total, started, base)
        self.progress.show(label, self.total(counter), total, started, base)
        return infos

    def _handle(self, msg, name, infos) -> None:
        kind = msg[0]
        if kind == "error":
            raise BenchError(f"bench process {msg[1]} failed:\n{msg[2]}")
        if kind == "result":
            self.results[msg[1]] = msg[2]
        elif kind == "ready":
            if msg[2] != name:
                raise BenchError(f"bench process {msg[1]} reached {msg[2]!r}, expected {name!r}")
            infos[msg[1]] = msg[3]

    def _drain_errors(self) -> None:
        for pipe in self.pipes:
            try:
                while pipe.poll():
                    msg = pipe.recv()
                    if msg[0] == "error":
                        raise BenchError(f"bench process {msg[1]} failed:\n{msg[2]}")
            except (EOFError, OSError):
                continue

    def go(self, name: str, lead_s: float = 0.05) -> float:
        t0 = time.monotonic() + lead_s
        for pipe in self.pipes:
            pipe.send(("go", name, t0))
        return t0

    def finish(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("go", "exit", 0.0))
            except OSError:
                pass
        for p in self.children:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)

    def abort(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("abort",))
            except OSError:
                pass
        for p in self.children:
            p.join(3)
            if p.is_alive():
                p.terminate()
                p.join(3)


def server_report(pids: dict[str, int], before: dict, after: dict, wall_s: float, per: int = 0) -> dict:
    """CPU seconds and RSS per region process over a window; with ``per``
    (messages, logins…), also CPU microseconds per item, which a busy machine
    disturbs far less than the rates."""
    rows = []
    total_cpu = total_rss = total_rss_before = 0.0
    for name in sorted(pids):
        b, a = before.get(name), after.get(name)
        if b is None or a is None:
            rows.append({"name": name, "pid": pids[name], "gone": True})
            continue
        cpu = a[0] - b[0]
        rows.append({"name": name, "pid": pids[name], "cpu_s": round(cpu, 3),
                     "cpu_pct": round(100 * cpu / wall_s, 1) if wall_s > 0 else None,
                     "cpu_us_per_item": round(1e6 * cpu / per, 1) if per else None,
                     "rss_before_kb": b[1] // 1024, "rss_after_kb": a[1] // 1024,
                     "rss_delta_kb": (a[1] - b[1]) // 1024})
        total_cpu += cpu
        total_rss += a[1]
        total_rss_before += b[1]
    return {"processes": rows,
            "total": {"cpu_s": round(total_cpu, 3),
                      "cpu_pct": round(100 * total_cpu / wall_s, 1) if wall_s > 0 else None,
                      "cpu_us_per_item": round(1e6 * total_cpu / per, 1) if per else None,
                      "rss_before_kb": int(total_rss_before // 1024), "rss_after_kb": int(total_rss // 1024)}}


def _merge_latency(results, key) -> array:
    out = array("d")
    for r in results:
        out.frombytes(r.get(key, b""))
    return out


def _merge_errors(results) -> dict:
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
        for s in r.get("senders", []):
            for k, v in s["errors"].items():
                errors[k] = errors.get(k, 0) + v
    return errors


def check_delivery(results) -> dict:
    """Merge the senders' acknowledgements with the receivers' inboxes."""
    acked: dict[str, set[int]] = {}
    retried: dict[str, set[int]] = {}
    for r in results:
        for s in r.get("senders", []):
            acked[s["sender"]] = set(range(s["count"])) - set(s["failed"])
            retried[s["sender"]] = set(s.get("retried", ()))
    totals = {"checked": 0, "lost": 0, "doubled": 0, "reordered": 0, "late_retries": 0, "unconfirmed": 0,
              "inbox_gaps": 0}
    for r in results:
        for rec in r.get("receivers", []):
            check = rec["check"]
            totals["inbox_gaps"] += check["inbox_gaps"]
            for sender, raw in check["found"].items():
                ks = array("I")
                ks.frombytes(raw)
                c = order_check(list(ks), acked.get(sender, set()), retried.get(sender, set()))
                totals["checked"] += c["found"]
                for key in ("lost", "doubled", "reordered", "late_retries", "unconfirmed"):
                    totals[key] += c[key]
    totals["ok"] = not (totals["lost"] or totals["doubled"] or totals["reordered"] or totals["inbox_gaps"])
    return totals


def run(opts: Options, progress: bool = True) -> dict:
    """Run one scenario against a running region; returns the report."""
    if not opts.prefix:
        opts.prefix = "b" + secrets.token_hex(4)
    validate(opts)
    _raise_fd_limit()
    pids = read_pid_files(opts.data_dir)
    bar = Progress(progress)
    coord = Coordinator(opts, bar)
    t_start = time.monotonic()
    coord.start()
    # A terminated bench stops its processes too (they would hold connections).
    old_term = signal.signal(signal.SIGTERM, _terminated)
    try:
        report = _drive(opts, coord, pids, bar)
    except BaseException:
        bar.end()
        coord.abort()
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
    coord.finish()
    bar.end()
    report["elapsed_s"] = round(time.monotonic() - t_start, 3)
    return report


def _terminated(signum, frame):
    raise BenchError("terminated")


def _params(opts: Options) -> dict:
    d = asdict(opts)
    d.pop("gate_pk")
    d["users"] = opts.resolved_users()
    d["gate_key"] = opts.gate_pk.hex()
    d["mode"] = "rate" if opts.rate is not None else "window"
    return d


def _drive(opts: Options, coord: Coordinator, pids: dict, bar: Progress) -> dict:
    sc = opts.scenario
    n_users = opts.resolved_users()
    plans = coord.plans
    report: dict = {"scenario": sc, "params": _params(opts), "server_pids": pids}
    # Setup steps: a registration and (but for connect) a password login per
    # user, and for backlog the Sends that fill the inbox.
    setup_total = n_users if sc == "connect" else 2 * n_users
    setup = coord.wait_phase("setup", "setup", (F_SETUP, F_ACKED) if sc == "backlog" else F_SETUP,
                             setup_total + (opts.backlog if sc == "backlog" else 0))
    report["setup_s"] = round(max(i["setup_s"] for i in setup.values()), 3)
    http_ports = gate_http_ports(opts.data_dir)
    events_before = gate_events(opts.host, http_ports)
    before = sample_all(pids)
    t0 = coord.go("run" if sc != "connect" else "password")

    if sc in ("pairs", "fanin"):
        total = sum(f.count for p in plans for f in p.flows)
        infos = coord.wait_phase("run", "run", F_DELIVERED, total)
        after = sample_all(pids)
        events_after = gate_events(opts.host, http_ports)
        load_before, load_after = before, after
        t_end = max(i["t_last_push"] for i in infos.values())
        window = max(1e-9, t_end - t0)
        wall = time.monotonic() - t0
        coord.go("check", 0.0)
        coord.wait_phase("exit", "check", F_SYNCED, total)
        results = [coord.results[i] for i in sorted(coord.results)]
        push = _merge_latency(results, "push_latency")
        ack = _merge_latency(results, "ack_latency")
        lag = _merge_latency(results, "pace_lag")
        sent = sum(s["count"] for r in results for s in r["senders"])
        acked = sum(s["acked"] for r in results for s in r["senders"])
        delivered = sum(rec["pushes"] for r in results for rec in r["receivers"])
        report.update({
            "window_s": round(window, 3),
            "counts": {"messages": sent, "acked": acked, "delivered_pushes": delivered,
                       "duplicate_pushes": sum(rec["dup_pushes"] for r in results for rec in r["receivers"]),
                       "pushes_missing": sum(rec["expected"] for r in results for rec in r["receivers"]) - delivered,
                       "retries": sum(s["retries"] for r in results for s in r["senders"])},
            "rates": {"delivered_per_s": round(delivered / window, 1), "acked_per_s": round(acked / window, 1),
                      "offered_per_s": opts.rate},
            "latency_ms": {"send_to_push": percentiles(push), "send_to_ack": percentiles(ack)},
            "check": check_delivery(results),
            "server": server_report(pids, before, after, wall, per=delivered),
            "generator": {"cpu_s": round(sum(r["cpu_s"] for r in results), 3), "procs": opts.procs,
                          "cpu_pct": round(100 * sum(r["cpu_s"] for r in results) / wall, 1)},
        })
        if lag:
            report["generator"]["pace_lag_ms"] = percentiles(lag)
    elif sc == "backlog":
        coord.wait_phase("run", "sync", F_SYNCED, opts.backlog)
        after = sample_all(pids)
        events_after = gate_events(opts.host, http_ports)
        load_before, load_after = before, after
        wall = time.monotonic() - t0
        coord.go("exit", 0.0)
        coord.wait_phase("exit", "finish", F_SYNCED, opts.backlog)
        results = [coord.results[i] for i in sorted(coord.results)]
        timing = results[0]["timing"]
        fill_s = max(r["fill_s"] for r in results)
        acked = sum(s["acked"] for r in results for s in r["senders"])
        check = check_delivery(results)
        report.update({
            "window_s": round(timing["total_s"], 3),
            "counts": {"backlog": opts.backlog, "acked": acked, "synced": results[0]["receivers"][0]["check"]["entries"],
                       "sync_requests": results[0]["receivers"][0]["check"]["sync_requests"],
                       "retries": sum(s["retries"] for r in results for s in r["senders"])},
            "timing_ms": {k: round(v * 1000, 3) for k, v in timing.items() if k.endswith("_s")},
            "rates": {"synced_per_s": round(opts.backlog / timing["sync_s"], 1) if timing["sync_s"] else None,
                      "fill_acked_per_s (setup)": round(acked / fill_s, 1) if fill_s else None},
            "check": check,
            "server": server_report(pids, before, after, wall, per=opts.backlog),
            "generator": {"cpu_s": round(sum(r["cpu_s"] for r in results), 3), "procs": opts.procs},
        })
    else:  # connect
        coord.wait_phase("password", "password", F_LOGINS, n_users)
        mid = sample_all(pids)
        wall_pw = time.monotonic() - t0
        t1 = coord.go("token")
        coord.wait_phase("token", "token", F_LOGINS, n_users + opts.connections)
        after = sample_all(pids)
        events_after = gate_events(opts.host, http_ports)
        load_before, load_after = mid, after
        wall_tk = time.monotonic() - t1
        time.sleep(opts.settle_s)
        idle = sample_all(pids)
        coord.go("idle", 0.0)
        coord.wait_phase("exit", "close", F_LOGINS, n_users + opts.connections)
        results = [coord.results[i] for i in sorted(coord.results)]
        pw = [t for r in results for t in r["password"]]
        tk = [t for r in results for t in r["token"]]
        pw_window = max((t[2] for t in pw), default=t0) - t0
        tk_window = max((t[2] for t in tk), default=t1) - t1
        opened = len(tk)
        rss_mid = sum(v[1] for k, v in mid.items() if v and k != MACHINE)
        rss_idle = sum(v[1] for k, v in idle.items() if v and mid.get(k) and k != MACHINE)
        per_proc = []
        for name in sorted(pids):
            if mid.get(name) and idle.get(name):
                per_proc.append({"name": name, "rss_before_kb": mid[name][1] // 1024,
                                 "rss_idle_kb": idle[name][1] // 1024,
                                 "bytes_per_conn": round((idle[name][1] - mid[name][1]) / opened) if opened else None})
        report.update({
            "window_s": round(tk_window, 3),
            "counts": {"users": n_users, "connections": opts.connections, "password_logins": len(pw),
                       "token_logins": opened,
                       "alive_after_idle": sum(r["alive_after_idle"] for r in results)},
            "rates": {"password_logins_per_s": round(len(pw) / pw_window, 1) if pw_window > 0 else None,
                      "token_logins_per_s": round(opened / tk_window, 1) if tk_window > 0 else None},
            "latency_ms": {"password_login": percentiles([t[1] for t in pw]),
                           "token_handshake": percentiles([t[0] for t in tk]),
                           "token_login": percentiles([t[1] for t in tk])},
            "memory": {"settle_s": opts.settle_s, "rss_before_kb": rss_mid // 1024, "rss_idle_kb": rss_idle // 1024,
                       "bytes_per_conn": round((rss_idle - rss_mid) / opened) if opened else None,
                       "processes": per_proc},
            "server": server_report(pids, mid, after, wall_tk, per=opened),
            "server_password_phase": server_report(pids, before, mid, wall_pw, per=len(pw)),
            "generator": {"cpu_s": round(sum(r["cpu_s"] for r in results), 3), "procs": opts.procs},
        })
    report["errors"] = _merge_errors(results)
    report["gate_events"] = events_delta(events_before, events_after)
    report["gate_metrics_from"] = sorted(http_ports) if events_before else []
    report["machine_load"] = machine_report(load_before, load_after, report["server"]["total"]["cpu_s"],
                                            report["generator"]["cpu_s"])
    report["ok"] = _ok(report)
    return report


def _ok(report: dict) -> bool:
    if "check" in report and not report["check"]["ok"]:
        return False
    if report["scenario"] == "connect":
        c = report["counts"]
        return c["token_logins"] == c["connections"] and c["password_logins"] == c["users"]
    if report["scenario"] in ("pairs", "fanin", "backlog"):
        return report["counts"]["acked"] == report["counts"].get("messages", report["counts"].get("backlog"))
    return True


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------

def _fmt_lat(d: dict) -> str:
    if not d.get("n"):
        return "-"
    return f"p50 {d['p50']:.3f}  p95 {d['p95']:.3f}  p99 {d['p99']:.3f}  max {d['max']:.3f}  (n={d['n']})"


def format_report(r: dict) -> str:
    p = r["params"]
    lines = []
    head = f"simzmq bench {r['scenario']}: users {p['users']}, procs {p['procs']}, codec {p['codec']}"
    if r["scenario"] in ("pairs", "fanin"):
        head += f", messages {p['messages']} per sender, " + (
            f"offered rate {p['rate']:g}/s" if p["rate"] else f"window {p['window']}")
    elif r["scenario"] == "backlog":
        head += f", backlog {p['backlog']}"
    else:
        head += f", connections {p['connections']}, concurrency {p['concurrency']} per process"
    lines.append(head)
    lines.append(f"  setup (registration, first logins{', inbox fill' if r['scenario'] == 'backlog' else ''}; "
                 f"not measured): {r['setup_s']:.2f} s")
    rows: list[tuple[str, str]] = []
    c = r["counts"]
    if r["scenario"] in ("pairs", "fanin"):
        rows += [("measured window", f"{r['window_s']:.3f} s (first Send to last push)"),
                 ("messages sent / acked", f"{c['messages']} / {c['acked']}  (retries {c['retries']})"),
                 ("delivered (NewMsg pushes)", (f"{c['delivered_pushes']}  (duplicates {c['duplicate_pushes']}, "
                                               f"not pushed {c['pushes_missing']})")),
                 ("delivered msgs/s", f"{r['rates']['delivered_per_s']:.0f}"),
                 ("send→push latency ms", _fmt_lat(r["latency_ms"]["send_to_push"])),
                 ("send→SendOk latency ms", _fmt_lat(r["latency_ms"]["send_to_ack"]))]
        if "pace_lag_ms" in r["generator"]:
            rows.append(("generator pacing lag ms", _fmt_lat(r["generator"]["pace_lag_ms"])))
    elif r["scenario"] == "backlog":
        t = r["timing_ms"]
        rows += [("backlog acked / synced", f"{c['acked']} / {c['synced']} in {c['sync_requests']} Syncs"),
                 ("reconnect: handshake", f"{t['handshake_s']:.1f} ms"),
                 ("reconnect: token login", f"{t['login_s']:.1f} ms"),
                 ("Sync of the whole backlog", f"{t['sync_s']:.1f} ms  ({r['rates']['synced_per_s']:.0f} msgs/s)"),
                 ("total, connect to synced", f"{t['total_s']:.1f} ms"),
                 ("fill rate (setup)", f"{r['rates']['fill_acked_per_s (setup)']:.0f} acked msgs/s")]
    else:
        mem = r["memory"]
        rows += [("password logins", (f"{c['password_logins']}  {r['rates']['password_logins_per_s']}/s  "
                                     f"latency {_fmt_lat(r['latency_ms']['password_login'])}")),
                 ("token logins", (f"{c['token_logins']} of {c['connections']}  "
                                  f"{r['rates']['token_logins_per_s']}/s  in {r['window_s']:.3f} s")),
                 ("  handshake ms", _fmt_lat(r["latency_ms"]["token_handshake"])),
                 ("  login ms", _fmt_lat(r["latency_ms"]["token_login"])),
                 ("still connected after idle", f"{c['alive_after_idle']}"),
                 ("memory per idle connection", (f"{mem['bytes_per_conn']} bytes (all region processes, "
                                               f"after {mem['settle_s']:g} s idle)"))]
        for proc in mem["processes"]:
            rows.append((f"  {proc['name']}", (f"{proc['bytes_per_conn']} bytes/conn  "
                                              f"(RSS {proc['rss_before_kb']} → {proc['rss_idle_kb']} KiB)")))
    if "check" in r:
        ch = r["check"]
        rows.append(("Sync check", (f"{'OK' if ch['ok'] else 'FAILED'}: {ch['checked']} checked, lost {ch['lost']}, "
                                   f"doubled {ch['doubled']}, reordered {ch['reordered']}, late retries {ch['late_retries']}, "
                                   f"inbox gaps {ch['inbox_gaps']}, unconfirmed {ch['unconfirmed']}")))
    if r.get("gate_events"):
        rows.append(("gate events in the window", ", ".join(f"{k} {v}" for k, v in sorted(r["gate_events"].items()))))
        if "failovers" in r["gate_events"]:
            rows.append(("", ("the gate switched brokers during the run: resent requests and catch-ups are in "
                             "these numbers")))
    if r["errors"]:
        rows.append(("errors", ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items()))))
        if "rate_limited" in r["errors"] or "abuse" in str(r["errors"]):
            rows.append(("", ("the gate's limits (gate.limits.*) refused part of this load: a run that "
                             "measures capacity raises them (docs/benchmarks.md)")))
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    srv = r["server"]
    if srv["processes"]:
        unit = {"pairs": "msg", "fanin": "msg", "backlog": "msg", "connect": "login"}[r["scenario"]]
        lines.append("  region processes (measured window):")
        lines.append(f"    {'process':<16} {'pid':>7} {'CPU s':>8} {'CPU %':>7} {'CPU µs/' + unit:>13} "
                     f"{'RSS before':>11} {'RSS after':>11}")
        for proc in srv["processes"]:
            if proc.get("gone"):
                lines.append(f"    {proc['name']:<16} {proc['pid']:>7}  (not running)")
                continue
            lines.append(f"    {proc['name']:<16} {proc['pid']:>7} {proc['cpu_s']:>8.2f} {proc['cpu_pct']:>7.1f} "
                         f"{proc['cpu_us_per_item'] or 0:>13.1f} "
                         f"{proc['rss_before_kb']:>8} KiB {proc['rss_after_kb']:>7} KiB")
        t = srv["total"]
        lines.append(f"    {'total':<16} {'':>7} {t['cpu_s']:>8.2f} {t['cpu_pct'] or 0:>7.1f} "
                     f"{t['cpu_us_per_item'] or 0:>13.1f} "
                     f"{t['rss_before_kb']:>8} KiB {t['rss_after_kb']:>7} KiB")
    else:
        lines.append("  region processes: no pid files (pass --data DIR of the region to measure CPU and RSS)")
    load = r.get("machine_load")
    if load:
        lines.append(f"  machine: {load['busy_pct_of_all_cpus']:.0f}% of all CPUs busy in the window; "
                     f"other processes used {load['other_cpu_s']:.2f} CPU s ({load['other_pct_of_one_cpu']:.0f}% of a CPU)")
    g = r["generator"]
    lines.append(f"  generator: {g['procs']} process(es), {g['cpu_s']:.2f} CPU s in the measured window"
                 + (f" ({g['cpu_pct']:.0f}% of a CPU)" if "cpu_pct" in g else ""))
    lines.append(f"  result: {'OK' if r['ok'] else 'FAILED'}")
    return "\n".join(lines)


def main(cfg, *, scenario: str, host: str | None, port: int | None, gate_key: str | None, as_json: bool,
         progress: bool, **options) -> int:
    """The `simzmq bench` command: resolve where the region is, run, print.
    Returns the exit status: 0 if the run was clean, 1 if the check failed or
    requests went unanswered."""
    import json

    from simzmq import keys as keys_mod
    data_dir = cfg.data_dir
    if gate_key:
        try:
            pk = bytes.fromhex(gate_key)
        except ValueError:
            raise BenchError("--gate-key must be 64 hex characters") from None
    else:
        try:
            pk = keys_mod.load_gate_public(data_dir)
        except keys_mod.KeyFileError as exc:
            raise BenchError(str(exc)) from None
    g = cfg["gate"]
    port = port or gate_port_from_pid(data_dir) or g["port"]
    opts = Options(scenario=scenario, host=host or g["host"], port=port, gate_pk=pk, data_dir=str(data_dir),
                   **options)
    report = run(opts, progress=progress)
    report["machine"] = machine_info()
    if as_json:
        print(json.dumps(report, indent=2, default=_json_default))
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1


def _json_default(obj):
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def machine_info() -> dict:
    """What the numbers were measured on."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
                    break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "mem_total_mb": mem_kb // 1024,
            "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}
