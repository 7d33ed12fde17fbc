"""The generator process: one event loop over its share of the users."""

from __future__ import annotations

import asyncio
import os
import resource
import secrets
import struct
import time
import traceback
from array import array

from simzmq.bench.plan import (CODEC_IDS, F_ACKED, F_DELIVERED, F_ERRORS, F_LOGINS, F_SENT, F_SETUP, F_SYNCED,
                               N_FIELDS, BenchError, Flow, Options, Plan, password_for)
from simzmq.cli import raise_fd_limit
from simzmq.wire import messages as m
from simzmq.wire.errors import ProtocolError
from simzmq.wire.messages import ErrorCode

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
# How long a setup request (Register, Login, the groups' set-up) is repeated,
# with the client library's backoff, while the region says unavailable or
# rate_limited: on a busy machine the IM workers' password threads refuse
# checks they cannot finish in time, for as long as registrations queue.
SETUP_PATIENCE_S = 300.0
# Registrations and password logins in flight across all processes: Argon2id
# runs on a small thread pool per IM worker, so more only queue there (and a
# queue longer than the gate's request timeout turns into errors).
PASSWORD_IN_FLIGHT = 8
# A receiver that has not seen all it expects gives up after this long with no
# push (pushes may be lost; the Sync check still finds the messages).
QUIET_S = 5.0
SYNC_LIMIT = 500


def _child_entry(opts: Options, plan: Plan, ctl, counters) -> None:
    raise_fd_limit()
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
        self.counted(msg, now)
        if not self.done and self.pushes >= self.total:
            self.done = True
            w.receiver_done()

    def counted(self, msg: m.Msg, now: float) -> None:
        """A push of an expected message, just counted (a scenario's hook)."""

    def synced(self, msg: m.Msg, bench_message: bool) -> None:
        """An inbox entry read by the Sync check (a scenario's hook)."""

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
                bench_message = ks is not None and len(msg.body) == BODY_SIZE and msg.body[:4] == BODY_MAGIC
                if bench_message:
                    ks.append(BODY_HEAD.unpack_from(msg.body)[1])
                else:
                    other += 1
                self.synced(msg, bench_message)
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

    async def open(self, on_push=None, port: int | None = None):
        """A connection to the gate at ``port`` (default: the one the bench was given)."""
        from simzmq.client import Connection
        return await Connection.open(self.opts.host, port or self.opts.port, self.opts.gate_pk, self.codecs,
                                     on_push=on_push)

    async def request_retrying(self, conn, msg):
        """A setup request, repeated while the region says unavailable (or rate_limited)."""
        from simzmq.client import RequestError, backoff_delays
        deadline = time.monotonic() + SETUP_PATIENCE_S
        for delay in backoff_delays(first=RETRY_DELAY_S):
            try:
                return await conn.request(msg)
            except RequestError as exc:
                if exc.code not in RETRY_CODES:
                    raise
                if time.monotonic() + delay > deadline:
                    raise BenchError(f"{type(msg).__name__} kept failing with {_error_name(exc)} "
                                     f"for {SETUP_PATIENCE_S:.0f} s") from None
            await asyncio.sleep(delay)

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
                conn = await self.open(on_push_for(name) if on_push_for else None, self.plan.ports.get(name))
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

    async def traffic(self, make_receiver=Receiver, prepare=None) -> dict:
        """Senders send, receivers count pushes, until all is delivered (or
        pushes go quiet). Returns what the run phase measured.
        ``make_receiver(worker, user, expected)`` makes each receiver;
        ``prepare(sessions)``, if given, runs once everyone is logged in,
        before the setup barrier."""
        opts, plan = self.opts, self.plan
        receivers = {name: make_receiver(self, name, exp) for name, exp in plan.receivers.items()}
        t_setup = time.monotonic()
        await self.register_all(plan.users)
        sessions = await self.password_logins(
            plan.users, keep=True,
            on_push_for=lambda name: receivers[name].on_push if name in receivers else self._stray_push)
        for name, r in receivers.items():
            r.conn = sessions[name][0]
        if prepare is not None:
            await prepare(sessions)
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
        if opts.scenario == "groups":
            return opts.senders * opts.messages
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
        return await self.traffic()

    async def run_fanin(self) -> dict:
        return await self.traffic()

    async def run_groups(self) -> dict:
        from simzmq.bench import groups
        return await groups.run_members(self)

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
