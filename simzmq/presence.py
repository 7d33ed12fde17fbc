"""Presence and typing (protocol section 7), pure: no sockets, no clock.

Who is online is known from sessions. Each gate knows its own sessions'
states and reports, per user, the state they add up to on that gate (its
*local* state) to the IM workers (a PresenceReport, simzmq/push/presence.py,
which the push service hears too). The workers keep the gates' local states
in the store, each gate's under a lease its reports renew; a user's state is
what the local states of the live gates add up to (`combine`). When it
changes, the worker publishes a `PresenceNotice` in the user's notification
topic, so every gate (of every federated region) with a watcher hears it.

The gate side here (`GatePresence`): its sessions' states, who watches whom
on this gate (and whether the watched user lets the watcher see it, a cache
of the store's contacts, learnt from the workers' answers and from the
one-to-one messages the gate pushes), and the typing limits.
docs/internal-protocol.md, "Presence and typing", has the whole design.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from simzmq.push.policy import SNAPSHOT_OPS, Span, outside, report_span
from simzmq.wire.messages import PresenceState

UNKNOWN, OFFLINE, ONLINE, AWAY = (int(s) for s in PresenceState)
# A gate's local state for a user without sessions there.
NONE = UNKNOWN


def combine(states: Iterable[int]) -> int:
    """What sessions' (or gates' local) states add up to: online while one is
    online, away while none is online and one is away, offline otherwise
    (appearing offline, or no session at all)."""
    best = OFFLINE
    for state in states:
        if state == ONLINE:
            return ONLINE
        if state == AWAY:
            best = AWAY
    return best


def seen(state: int) -> bool:
    """Whether a user in `state` is being seen now (last_seen_ms advances)."""
    return state == ONLINE or state == AWAY


def shown_last_seen(state: int, stored_ms: int, now_ms: int) -> int:
    """last_seen_ms as a client is told it: now while online or away, else
    the stored time it was last so."""
    return now_ms if seen(state) else stored_ms


def local_changes(current: Mapping[str, int], reported: Mapping[str, int], covered: Span | None) -> dict[str, int]:
    """The rows of one gate to change so the store holds what it reported:
    user -> new local state (NONE: the row goes). `covered`: the names
    `reported` is complete for (a snapshot part's span), so the gate's users
    there but not in it have none; None: only the users in it changed."""
    changes = {u: s for u, s in reported.items() if current.get(u, NONE) != s}
    if covered is not None:
        changes.update({u: NONE for u in current if u not in reported and covered.covers(u)})
    return changes


def report_timing(idle_timeout_s: float, push_interval_s: float | None) -> tuple[float, int]:
    """How often a gate reports all its users (seconds), and how long (ms) a
    report's lease holds. A gate that dies stops renewing; its users are
    offline once the lease runs out, and the next report any gate sends
    after that makes a worker tell the watchers: within lease + interval,
    which is two thirds of idle_timeout (section 7: "within idle_timeout")."""
    interval = idle_timeout_s / 6
    if push_interval_s is not None:
        interval = min(interval, push_interval_s)
    return interval, int(interval * 3 * 1000)


class TypingLimiter:
    """At most one notice per `peer_interval_s` per (sender, peer), and per
    sender a token bucket of `per_s` with `burst` over all its peers."""

    def __init__(self, peer_interval_s: float, per_s: float, burst: int):
        self.peer_interval_s = peer_interval_s
        self.per_s = per_s
        self.burst = burst
        self.last: dict[tuple[str, str], float] = {}       # (sender, peer) -> when the last went
        self.buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, when)

    def allow(self, sender: str, peer: str, now: float) -> str | None:
        """None if a notice may go now (and it is counted), else which limit
        holds it back ("typing_peer", "typing_sender")."""
        last = self.last.get((sender, peer))
        if last is not None and now - last < self.peer_interval_s:
            return "typing_peer"
        tokens, when = self.buckets.get(sender, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.per_s)
        if tokens < 1:
            self.buckets[sender] = (tokens, now)
            return "typing_sender"
        self.buckets[sender] = (tokens - 1, now)
        self.last[(sender, peer)] = now
        return None

    def prune(self, now: float) -> int:
        """Forget what no longer limits anyone; the entries left."""
        self.last = {k: t for k, t in self.last.items() if now - t < self.peer_interval_s}
        full = self.burst / self.per_s if self.per_s > 0 else float("inf")
        self.buckets = {s: b for s, b in self.buckets.items() if now - b[1] < full}
        return len(self.last) + len(self.buckets)


class GatePresence:
    """One gate's presence state. Connections are opaque keys here (the
    gate's ClientConnection objects), each with a user.

    Sessions: `session_state` per connection; `local(user)` is what the
    user's sessions on this gate add up to, which the gate reports whenever
    it changes. Watches: `watching[conn]` maps each id the connection watches
    to whether that user lets the connection's user see it (False also for
    ids not yet answered); `watchers[user]` is the other direction.
    """

    def __init__(self, max_per_request: int, max_per_connection: int):
        self.max_per_request = max_per_request
        self.max_per_connection = max_per_connection
        self.states: dict[str, dict[object, int]] = {}  # user -> conn -> session state
        self.watching: dict[object, dict[str, bool]] = {}
        self.watchers: dict[str, set] = {}

    # -- the gate's own sessions --------------------------------------------------

    def local(self, user: str) -> int:
        mine = self.states.get(user)
        return combine(mine.values()) if mine else NONE

    def session_state(self, conn, user: str) -> int:
        return self.states.get(user, {}).get(conn, NONE)

    def set_session(self, conn, user: str, state: int) -> int | None:
        """A session logs in (ONLINE), sets its state, or ends (NONE). The
        user's new local state when it changed, else None."""
        before = self.local(user)
        mine = self.states.setdefault(user, {})
        if state == NONE:
            mine.pop(conn, None)
            if not mine:
                del self.states[user]
        else:
            mine[conn] = state
        after = self.local(user)
        return after if after != before else None

    def local_states(self) -> dict[str, int]:
        return {user: combine(mine.values()) for user, mine in self.states.items()}

    # -- watches --------------------------------------------------------------------

    def over_limit(self, conn, users: Iterable[str]) -> str | None:
        """Why a Watch of `users` on `conn` is too large, else None."""
        new = set(users)
        if len(new) > self.max_per_request:
            return f"at most {self.max_per_request} ids in one Watch"
        total = len(new | set(self.watching.get(conn, ())))
        if total > self.max_per_connection:
            return f"at most {self.max_per_connection} ids watched per connection"
        return None

    def watch(self, conn, users: Iterable[str]) -> tuple[list[str], list[str]]:
        """Register `users` (not yet known visible) on `conn`. Returns those
        it did not watch before, in order (what to undo if the answer
        fails), and of them those no connection here watched before."""
        mine = self.watching.setdefault(conn, {})
        added, first = [], []
        for user in users:
            if user not in mine:
                mine[user] = False
                conns = self.watchers.get(user)
                if conns is None:
                    conns = self.watchers[user] = set()
                    first.append(user)
                conns.add(conn)
                added.append(user)
        if not mine:
            del self.watching[conn]
        return added, first

    def unwatch(self, conn, users: Iterable[str] | None = None) -> list[str]:
        """Stop watching `users` (None: all) on `conn`; returns the ids no
        connection here watches any more."""
        mine = self.watching.get(conn)
        if not mine:
            self.watching.pop(conn, None)
            return []
        gone = []
        for user in list(mine) if users is None else users:
            if mine.pop(user, None) is None:
                continue
            conns = self.watchers.get(user)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self.watchers[user]
                    gone.append(user)
        if not mine:
            del self.watching[conn]
        return gone

    def answered(self, conn, states) -> list:
        """A worker's answer (Presence structs) for `conn`: records who is
        visible (state 0 means not visible, or not a user) and returns the
        states of the ids `conn` still watches."""
        mine = self.watching.get(conn, {})
        kept = []
        for p in states:
            if p.user in mine:
                mine[p.user] = p.state != UNKNOWN
                kept.append(p)
        return kept

    def notice_targets(self, user: str) -> list:
        """The connections that watch `user` and may see it."""
        return [c for c in self.watchers.get(user, ()) if self.watching[c].get(user)]

    def hidden_from(self, conn) -> set[str]:
        """The ids `conn` watches that do not (yet) let it see them."""
        return {u for u, visible in self.watching.get(conn, {}).items() if not visible}

    def watched_by(self, conn) -> list[str]:
        return list(self.watching.get(conn, ()))

    def watchers_of(self, users: Iterable[str] | None) -> dict[object, list[str]]:
        """conn -> the ids of `users` (None: all) it watches."""
        if users is None:
            return {conn: list(mine) for conn, mine in self.watching.items()}
        found: dict[object, list[str]] = {}
        for user in users:
            for conn in self.watchers.get(user, ()):
                found.setdefault(conn, []).append(user)
        return found


# -- the worker's side ------------------------------------------------------------------

class BadLocalReport(ValueError):
    pass


def _state_value(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in (NONE, OFFLINE, ONLINE, AWAY):
        raise BadLocalReport(f"not a local state: {value!r}")
    return value


def local_report(report: Mapping) -> tuple[dict[str, int], Span | None, int]:
    """What a gate's report (one that push.policy.parse_report accepted)
    says of its users' local states: (user -> state, the names that is
    complete for (report_span: a snapshot part's range, every name for
    "bye", which says the gate has none; None: only those users), the
    lease in ms)."""
    ttl = report.get("ttl_ms")
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise BadLocalReport("a presence report without its ttl_ms")
    op = report["op"]
    covered = report_span(report)
    if op == "bye":
        return {}, covered, ttl
    if op in SNAPSHOT_OPS:
        states = report.get("states")
        if not isinstance(states, dict):
            raise BadLocalReport("a snapshot without states")
        stray = outside(covered, states)
        if stray:
            raise BadLocalReport(f"a snapshot part with states outside its range: {stray[:3]!r}")
        return {u: _state_value(s) for u, s in states.items()}, covered, ttl
    user = report.get("user")
    if not isinstance(user, str):
        raise BadLocalReport(f"a {op} report without its user")
    return {user: _state_value(report.get("state"))}, covered, ttl


def changed_users(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """user -> (old, new) state, for the users whose state changed."""
    return {u: (before.get(u, OFFLINE), s) for u, s in after.items() if before.get(u, OFFLINE) != s}
