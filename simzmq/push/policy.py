"""The push decisions, pure: no sockets, no clock, no randomness of its own.

A job is a message for a user, queued by the IM worker in the message's
transaction and due `delay_ms` (+ `coalesce_ms`) after it. When it is due,
the push service claims the user's queued jobs (simzmq/store/) and asks
`plan`: a job whose user is online anywhere in the region, or who has
fetched it already (the store's delivered mark), needs no call; the others
become calls, one per job in order, or with coalescing one call for the
jobs of one window carrying the newest. A call's outcome is classified by
`verdict`; `after_failure` says when to try again, or that it is dead.
`Presence` is the region's online users, from the gates' reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Mapping, NamedTuple, Sequence

from simzmq.store.base import PushJob

# How many characters of a text message (kind 0) the call carries.
PREVIEW_CHARS = 100


class Verdict(Enum):
    DONE = "done"    # 2xx: delivered
    RETRY = "retry"  # worth trying again: no answer, a timeout, 408, 429, 5xx
    DEAD = "dead"    # no use trying again: any other status (a 4xx says the call itself is wrong)


def verdict(status: int | None) -> Verdict:
    """The verdict on a call answered with `status` (None: no answer at all,
    a connection error or a timeout)."""
    if status is None:
        return Verdict.RETRY
    if 200 <= status < 300:
        return Verdict.DONE
    if status in (408, 429) or 500 <= status < 600:
        return Verdict.RETRY
    return Verdict.DEAD


def failure_kind(status: int | None, error: str | None) -> str:
    """A short name for a failure, for metrics labels and throttled logs."""
    if status is None:
        return "timeout" if error and "timeout" in error.lower() else "connection"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


@dataclass(frozen=True)
class PushTiming:
    max_age_ms: int         # a job older than this when it would retry goes to the dead letters
    backoff_min_ms: int     # the first retry's delay, before jitter
    backoff_max_ms: int     # no retry waits longer than this
    coalesce_ms: int = 0    # 0: one call per message


def backoff_ms(attempts: int, rand: float, timing: PushTiming) -> int:
    """The wait before attempt `attempts` + 1 (attempts >= 1 so far):
    doubling from backoff_min_ms up to backoff_max_ms, of which a random
    half (`rand` in [0, 1)) is jitter, so receivers that failed together
    do not all retry together."""
    cap = min(timing.backoff_max_ms, timing.backoff_min_ms * 2 ** min(max(attempts - 1, 0), 32))
    return int(cap / 2 + rand * cap / 2)


class Retry(NamedTuple):
    due_ms: int


class Dead(NamedTuple):
    reason: str


def after_failure(created_ms: int, attempts: int, status: int | None, error: str | None, now_ms: int,
                  rand: float, timing: PushTiming) -> Retry | Dead:
    """What becomes of a job whose `attempts`-th call failed."""
    what = f"status {status}" if status is not None else (error or "no answer")
    if verdict(status) is Verdict.DEAD:
        return Dead(what)
    due = now_ms + backoff_ms(attempts, rand, timing)
    if due - created_ms > timing.max_age_ms:
        return Dead(f"{what}; older than max_age")
    return Retry(due)


class Call(NamedTuple):
    """One webhook call: it carries `job`'s message and settles `covers`
    (msg_ids). `head` is the job whose attempts and age count for it."""
    job: PushJob
    covers: tuple[int, ...]
    head: PushJob


class Plan(NamedTuple):
    skipped: dict[int, str]  # msg_id -> why no call is needed ("online", "fetched")
    calls: list[Call]        # in order; once one fails, the rest wait


def plan(jobs: Sequence[PushJob], online: bool, now_ms: int, coalesce_ms: int = 0) -> Plan:
    """What to do now with one user's claimed jobs (msg_id order): the
    first is the user's oldest queued job. Jobs not yet due are left alone."""
    if not jobs:
        return Plan({}, [])
    if coalesce_ms > 0:
        # The window opens with the oldest job; the worker queued every job
        # coalesce_ms later than its delay, so by now the window's jobs are all in.
        window_end = jobs[0].created_ms + coalesce_ms
        due = [j for j in jobs if j.created_ms <= window_end] if jobs[0].due_ms <= now_ms else []
    else:
        due = []
        for j in jobs:
            if j.due_ms > now_ms:
                break  # the rest wait behind it
            due.append(j)
    skipped: dict[int, str] = {}
    wanted: list[PushJob] = []
    for j in due:
        if online:
            skipped[j.msg_id] = "online"
        elif j.delivered >= j.seq:
            skipped[j.msg_id] = "fetched"
        else:
            wanted.append(j)
    if coalesce_ms > 0 and wanted:
        calls = [Call(wanted[-1], tuple(j.msg_id for j in wanted), wanted[0])]
    else:
        calls = [Call(j, (j.msg_id,), j) for j in wanted]
    return Plan(skipped, calls)


def preview(kind: int, body: bytes) -> str:
    """The first PREVIEW_CHARS characters of a text message, else ""."""
    if kind != 0:
        return ""
    return bytes(body).decode("utf-8", "replace")[:PREVIEW_CHARS]


def call_body(call: Call) -> dict:
    """The JSON object the webhook receives (docs/push.md); `group` is the
    group of a group message, "" for a one-to-one message."""
    j = call.job
    return {"user": j.user, "msg_id": j.msg_id, "seq": j.seq, "sender": j.sender, "kind": j.kind,
            "ts_ms": j.ts_ms, "preview": preview(j.kind, j.body), "unread": j.unread, "group": j.group}


def delivery_id(call: Call) -> str:
    """Stable across retries of the same call, so receivers drop repeats."""
    return f"{call.job.user}:{call.job.msg_id}"


# -- presence ------------------------------------------------------------------------------

# A gate's report (docs/internal-protocol.md, "Presence"): JSON with
#   gate: the gate's instance id (its name and a random part chosen at start)
#   n:    the report's number, rising by one from 1 per gate instance (the
#         push service hears each report once through each broker: the
#         second copy, or an older report arriving late, is ignored)
#   op:   "start" / "end" (one session of `user`, `session` its hex id),
#         "snapshot" (`users`: every user online there, each with its
#         sessions; a big gate's continues in "snapshot+" parts), "bye"
#         (the gate stops), "state" (a session's SetPresence changed the
#         user's local state; the push service has nothing to do with it).
#   from, to: a snapshot part's range of user names (below, Span): the part
#         is complete within it, so a user of the gate in the range but not
#         in the part is gone, and users outside it are left as they are
#         (they belong to another part). The gate sorts its users and cuts
#         them into parts; each part's `to` is the next one's `from`, the
#         first has no `from`, the last no `to`, so the parts cover every
#         name once and a snapshot in one part covers all. A "snapshot+"
#         with neither (from gates before ranges) covers only its users.
#   state, states, ttl_ms: the local states of the users reported and how
#         long they hold (simzmq/presence.py; the IM workers keep them).
OPS = ("start", "end", "snapshot", "snapshot+", "bye", "state")
SNAPSHOT_OPS = ("snapshot", "snapshot+")


@dataclass(frozen=True)
class Span:
    """The user names from `low` (included; None: from the lowest) up to
    `high` (excluded; None: with no end). Names compare as Python strings
    do, by code point, which is the byte order of their UTF-8: the order
    the gate sorts them in and the stores compare them in."""
    low: str | None = None
    high: str | None = None

    def covers(self, user: str) -> bool:
        return (self.low is None or self.low <= user) and (self.high is None or user < self.high)


EVERY_NAME = Span()


def report_span(report: Mapping) -> Span | None:
    """The names a report that parse_report accepted is complete for: what
    it does not list there is gone from the gate. A snapshot part's range
    (every name for a snapshot in one part), every name for "bye"; None for
    a report that speaks only of the users it names."""
    op = report["op"]
    if op == "bye":
        return EVERY_NAME
    if op not in SNAPSHOT_OPS or (op == "snapshot+" and report.get("from") is None and report.get("to") is None):
        return None
    return Span(report.get("from"), report.get("to"))


def outside(span: Span | None, users) -> list[str]:
    """Those of `users` that `span` (None: only they) does not cover."""
    return [] if span is None else [u for u in users if not span.covers(u)]


class BadReport(ValueError):
    pass


def parse_report(payload: bytes) -> dict:
    try:
        report = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadReport(f"not JSON: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("gate"), str) or report.get("op") not in OPS:
        raise BadReport("not a presence report")
    n = report.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BadReport("a presence report without its number")
    op = report["op"]
    if op in ("start", "end") and not (isinstance(report.get("user"), str)
                                       and isinstance(report.get("session"), str)):
        raise BadReport(f"a {op} report without user and session")
    if op in SNAPSHOT_OPS:
        users = report.get("users")
        if not isinstance(users, dict) or not all(
                isinstance(s, list) and all(isinstance(x, str) for x in s) for s in users.values()):
            raise BadReport("a snapshot without users")
        low, high = report.get("from"), report.get("to")
        for key, bound in (("from", low), ("to", high)):
            if bound is not None and not isinstance(bound, str):
                raise BadReport(f"a snapshot part whose {key} is not a user name: {bound!r}")
        if low is not None and high is not None and low >= high:
            raise BadReport(f"a snapshot part with an empty range: from {low!r} to {high!r}")
        stray = outside(report_span(report), users)
        if stray:
            raise BadReport(f"a snapshot part with users outside its range: {stray[:3]!r}")
    elif report.get("from") is not None or report.get("to") is not None:
        raise BadReport(f"a {op} report with a range (only a snapshot part has one)")
    return report


class Presence:
    """Who is logged in where, from the gates' reports. A snapshot part
    sets the gate's users within its span (report_span), start and end
    edit them. A gate heard from neither by report nor snapshot for
    `expire_s` is taken for dead: its users are no longer online through it."""

    def __init__(self, expire_s: float, warm_s: float, now: float):
        self.expire_s = expire_s
        self.warm_s = warm_s
        self.started = now
        self.gates: dict[str, dict[str, set[str]]] = {}  # gate -> user -> sessions
        self.heard: dict[str, float] = {}                 # gate -> when last heard
        self.numbers: dict[str, int] = {}                 # gate -> number of the last report applied

    def report(self, report: Mapping, now: float) -> None:
        """Apply a report that parse_report accepted."""
        gate, op, n = report["gate"], report["op"], report["n"]
        if n <= self.numbers.get(gate, 0):
            return  # a copy through the other broker, or overtaken
        self.numbers[gate] = n
        if op == "state":
            return
        if op == "bye":
            self.gates.pop(gate, None)
            self.heard.pop(gate, None)
            return
        users = self.gates.setdefault(gate, {})
        self.heard[gate] = now
        if op in SNAPSHOT_OPS:
            # Complete within its span only: the users of the gate's other
            # parts stay online while this one is applied.
            fresh = {u: set(s) for u, s in report["users"].items() if s}
            span = report_span(report)
            if span is not None:
                for user in [u for u in users if u not in fresh and span.covers(u)]:
                    del users[user]
            users.update(fresh)
        elif op == "start":
            users.setdefault(report["user"], set()).add(report["session"])
        else:
            sessions = users.get(report["user"])
            if sessions is not None:
                sessions.discard(report["session"])
                if not sessions:
                    del users[report["user"]]

    def expire(self, now: float) -> list[str]:
        """Forget the gates not heard from for expire_s; returns them."""
        gone = [g for g, t in self.heard.items() if now - t > self.expire_s]
        for g in gone:
            del self.gates[g]
            del self.heard[g]
        # A gate's id is new each start: the numbers of those gone for a
        # while are not needed (a copy still arriving is older than expire_s).
        for g in [g for g in self.numbers if g not in self.heard]:
            if g not in gone:
                del self.numbers[g]
        return gone

    def online(self, user: str) -> bool:
        return any(user in users for users in self.gates.values())

    def warm(self, now: float) -> bool:
        """Whether it has listened long enough (warm_s, a little more than
        the gates' snapshot interval) to have heard every live gate's
        snapshot: until then, a user it has not heard of may be online."""
        return now - self.started >= self.warm_s

    def count(self) -> int:
        return len({u for users in self.gates.values() for u in users})


class Heard:
    """When each peer region's presence was last heard (any report of its
    gates), so that the service says once when one has been silent for
    `silent_s` (its users then count as offline here, even those online
    there) and once when it is heard again. A region never heard counts as
    heard at the start."""

    def __init__(self, regions, silent_s: float, now: float):
        self.silent_s = silent_s
        self.last = {region: now for region in regions}
        self.silent: set[str] = set()

    def hear(self, region: str, now: float) -> bool:
        """A report came from `region`; True if it had been silent."""
        self.last[region] = now
        if region in self.silent:
            self.silent.discard(region)
            return True
        return False

    def fallen_silent(self, now: float) -> list[str]:
        """The regions silent for silent_s since the last call said so."""
        fallen = [r for r, t in self.last.items() if r not in self.silent and now - t > self.silent_s]
        self.silent.update(fallen)
        return fallen
