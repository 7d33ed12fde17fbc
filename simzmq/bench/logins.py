"""`simzmq bench logins`: a burst of password Logins, all at once, each
client retrying `unavailable` and `rate_limited` with the client library's
backoff, as the protocol tells clients to. It measures how many Logins a
second the region completes and sets that against what its password threads
can do at most: threads ÷ the time of one Argon2id check, measured here, on
the same machine, just before.

Setup (not measured): open one connection per user and register the users,
a few at a time (retried the same way). Then every connection sends its
Login at once; the window runs from then to the last LoginOk.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from simzmq.client import Connection, RequestError, backoff_delays
from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode

DEFAULT_USERS = 500
RETRY_CODES = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED})
# Connections opening at once during setup.
OPEN_CONCURRENCY = 64
# Registers under way at once in the setup: a few per password thread, so
# that they are neither refused (nor, retried, rate limited per user id) nor
# leave the threads idle.
REGISTER_CONCURRENCY = 8
# Argon2id checks timed for the capacity (the fastest counts: a busy machine
# only ever makes a timing slower).
CHECK_REPEATS = 5


@dataclass
class Burst:
    """What one burst of requests took."""
    requests: int = 0
    done: int = 0
    attempts: int = 0
    retried: dict = field(default_factory=dict)  # error code name -> replies that made a client retry
    failed: list = field(default_factory=list)   # (user, error) of requests that finally failed
    elapsed_s: float = 0.0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "done": self.done, "attempts": self.attempts,
                "retried": dict(self.retried), "failed": [f"{u}: {e}" for u, e in self.failed],
                "elapsed_s": round(self.elapsed_s, 3)}


async def open_connections(host: str, port: int, gate_pk: bytes, n: int) -> list[Connection]:
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one():
        async with gate:
            return await Connection.open(host, port, gate_pk)
    return list(await asyncio.gather(*(one() for _ in range(n))))


async def _until_answered(conn: Connection, msg, done_codes: frozenset, burst: Burst) -> object:
    delays = backoff_delays()
    while True:
        burst.attempts += 1
        try:
            return await conn.request(msg)
        except RequestError as exc:
            if exc.code in done_codes:
                return exc
            if exc.code not in RETRY_CODES:
                raise
            name = ErrorCode(exc.code).name.lower()
            burst.retried[name] = burst.retried.get(name, 0) + 1
        await asyncio.sleep(next(delays))


async def burst(conns: list[Connection], msgs: list, done_codes: frozenset = frozenset(),
                concurrency: int | None = None) -> Burst:
    """Send msgs[i] on conns[i], all at once (or `concurrency` at a time);
    retry each until it is answered with anything but `unavailable` /
    `rate_limited` (an Error whose code is in `done_codes` counts as done)."""
    result = Burst(requests=len(msgs))
    gate = asyncio.Semaphore(concurrency or max(1, len(msgs)))

    async def one(conn, msg):
        async with gate:
            try:
                await _until_answered(conn, msg, done_codes, result)
                result.done += 1
            except (RequestError, ConnectionError) as exc:
                result.failed.append((getattr(msg, "user", "?"), str(exc)))

    started = time.monotonic()
    await asyncio.gather(*(one(c, msg) for c, msg in zip(conns, msgs)))
    result.elapsed_s = time.monotonic() - started
    return result


def users_for(prefix: str, n: int) -> list[tuple[str, str]]:
    return [(f"{prefix}{i}", f"pw-{prefix}-{i}") for i in range(n)]


async def register_and_login(host: str, port: int, gate_pk: bytes, users: list[tuple[str, str]]) -> tuple[Burst, Burst]:
    """Register `users` (setup), then log them all in at once; the two bursts."""
    conns = await open_connections(host, port, gate_pk, len(users))
    try:
        registered = await burst(conns, [m.Register(user=u, password=p) for u, p in users],
                                 frozenset({ErrorCode.EXISTS}), REGISTER_CONCURRENCY)
        if registered.failed:
            return registered, Burst(requests=len(users))
        logins = await burst(conns, [m.Login(user=u, password=p, token=b"", device="bench") for u, p in users])
        return registered, logins
    finally:
        for conn in conns:
            conn.close()


def check_seconds(strength: str) -> float:
    """The time of one Argon2id hash at `strength`, on this machine now."""
    from simzmq.im import hash_password
    timings = []
    for _ in range(CHECK_REPEATS):
        started = time.perf_counter()
        hash_password("calibration", strength)
        timings.append(time.perf_counter() - started)
    return min(timings)


def worker_check_seconds(metrics_urls: list[str]) -> float | None:
    """The time of one check as the workers measured it in their password
    threads (simzmq_im_password_check_seconds, the mean over workers), or
    None. On a busy machine it is longer than the bench's own timing: the
    threads run at a lower priority (im.pwhash_nice) than everything else."""
    import urllib.request
    seen = []
    for url in metrics_urls:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("simzmq_im_password_check_seconds "):
                seen.append(float(line.split()[1]))
    return sum(seen) / len(seen) if seen else None


def run(host: str, port: int, gate_pk: bytes, users: int, threads: int, strength: str,
        metrics_urls: list[str] = ()) -> dict:
    """The `logins` scenario's report: logins/s against the password threads' capacity."""
    check_s = check_seconds(strength)
    capacity = threads / check_s
    registered, logins = asyncio.run(register_and_login(host, port, gate_pk, users_for(
        "l" + secrets.token_hex(3) + "u", users)))
    rate = logins.done / logins.elapsed_s if logins.elapsed_s > 0 else 0.0
    in_worker = worker_check_seconds(list(metrics_urls))
    return {
        "worker_check_ms": round(in_worker * 1000, 1) if in_worker else None,
        "of_worker_capacity": round(rate * in_worker / threads, 3) if in_worker else None,
        "scenario": "logins",
        "ok": not registered.failed and not logins.failed and logins.done == users,
        "params": {"users": users, "password_threads": threads, "pwhash_strength": strength},
        "check_ms": round(check_s * 1000, 1),
        "capacity_per_s": round(capacity, 2),
        "setup": registered.as_dict(),
        "logins": logins.as_dict(),
        "logins_per_s": round(rate, 2),
        "of_capacity": round(rate / capacity, 3) if capacity else 0.0,
    }


def format_report(r: dict) -> str:
    p, lg = r["params"], r["logins"]
    retried = ", ".join(f"{k} {v}" for k, v in sorted(lg["retried"].items())) or "none"
    lines = [
        f"simzmq bench logins: users {p['users']}, password threads {p['password_threads']} "
        f"({p['pwhash_strength']})",
        f"  one Argon2id check here: {r['check_ms']:.1f} ms; capacity {r['capacity_per_s']:.1f} logins/s",
        f"  setup (registration, not measured): {r['setup']['elapsed_s']:.2f} s",
        f"  logins done: {lg['done']} / {lg['requests']} in {lg['elapsed_s']:.2f} s "
        f"({lg['attempts']} attempts; retried after: {retried})",
        f"  logins/s: {r['logins_per_s']:.1f} = {100 * r['of_capacity']:.0f} % of capacity",
    ]
    if r.get("worker_check_ms"):
        lines.append(f"  one check as the workers' password threads measured it: {r['worker_check_ms']:.1f} ms; "
                     f"logins/s = {100 * r['of_worker_capacity']:.0f} % of that capacity")
    for failure in lg["failed"][:10]:
        lines.append(f"  FAILED {failure}")
    if "machine" in r:
        lines.append(f"  machine: {r['machine']}")
    return "\n".join(lines)
