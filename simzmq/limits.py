"""What one client may cost a gate: token buckets, failure throttles and
counters, and the policy that combines them (docs/security.md).

Pure: no sockets, no clock. Every call that depends on time takes `now`, in
seconds from any fixed origin (the gate passes time.monotonic()). Tables that
are keyed by something a client chooses (a user id, an address) are bounded:
entries that carry no information any more are pruned, and a full table
forgets its least recently used entry.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Hashable, Iterable, Mapping

from simzmq.wire.rules import MAX_WATCH_CONNECTION, MAX_WATCH_REQUEST


class Verdict(IntEnum):
    ALLOW = 0
    LIMIT = 1  # refuse this one: Error{rate_limited}, the connection stays
    ABUSE = 2  # far over the limit: Kick{abuse}


# --- token buckets ---------------------------------------------------------------


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; each request takes
    `cost` of them (one, or its size for a budget of bytes).

    A request that finds too few tokens is refused and counts `cost` strikes.
    Strikes drain at the same `rate`, so a client that backs off is forgiven,
    while one that keeps going far over its rate piles them up: more than
    `abuse_after` strikes is abuse.
    """

    __slots__ = ("rate", "burst", "abuse_after", "tokens", "strikes", "stamp")

    # Refills are sums of float products: a request exactly on time may find
    # 0.9999999 tokens. This much short still counts as a whole token.
    EPSILON = 1e-9

    def __init__(self, rate: float, burst: float, now: float, abuse_after: float = math.inf):
        self.rate = rate
        self.burst = burst
        self.abuse_after = abuse_after
        self.tokens = float(burst)
        self.strikes = 0.0
        self.stamp = now

    def _refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            gain = elapsed * self.rate
            self.tokens = min(self.burst, self.tokens + gain)
            self.strikes = max(0.0, self.strikes - gain)
            self.stamp = now

    def check(self, now: float, cost: float = 1.0) -> Verdict:
        self._refill(now)
        if self.tokens >= cost - self.EPSILON:
            self.tokens = max(0.0, self.tokens - cost)
            return Verdict.ALLOW
        self.strikes += cost
        return Verdict.ABUSE if self.strikes > self.abuse_after else Verdict.LIMIT

    def retry_after(self, now: float, cost: float = 1.0) -> float:
        """Seconds until a request of `cost` would be allowed."""
        self._refill(now)
        if self.tokens >= cost - self.EPSILON:
            return 0.0
        return (cost - self.tokens) / self.rate if self.rate > 0 else math.inf

    def idle(self, now: float) -> bool:
        """Full and forgiven: forgetting this bucket changes nothing."""
        self._refill(now)
        return self.tokens >= self.burst - self.EPSILON and self.strikes == 0


class _Table:
    """A bounded dict that keeps its most recently used entries last."""

    def __init__(self, max_entries: int):
        self.max_entries = max(1, max_entries)
        self.entries: dict = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key) -> bool:
        return key in self.entries

    def _touch(self, key, make):
        entries = self.entries
        entry = entries.pop(key, None)
        if entry is None:
            if len(entries) >= self.max_entries:
                self.prune_now()
            while len(entries) >= self.max_entries:
                del entries[next(iter(entries))]  # least recently used
            entry = make()
        entries[key] = entry
        return entry

    def prune_now(self) -> None:  # pragma: no cover - overridden
        pass


class BucketTable(_Table):
    """One TokenBucket per key (a user id, an address), made full on first use."""

    def __init__(self, rate: float, burst: float, abuse_after: float = math.inf, max_entries: int = 100_000):
        super().__init__(max_entries)
        self.rate = rate
        self.burst = burst
        self.abuse_after = abuse_after
        self._now = 0.0

    def check(self, key: Hashable, now: float, cost: float = 1.0) -> Verdict:
        self._now = now
        bucket = self._touch(key, lambda: TokenBucket(self.rate, self.burst, now, self.abuse_after))
        return bucket.check(now, cost)

    def retry_after(self, key: Hashable, now: float, cost: float = 1.0) -> float:
        bucket = self.entries.get(key)
        return 0.0 if bucket is None else bucket.retry_after(now, cost)

    def prune(self, now: float) -> int:
        """Drop buckets that are full again; returns how many."""
        idle = [k for k, b in self.entries.items() if b.idle(now)]
        for k in idle:
            del self.entries[k]
        return len(idle)

    def prune_now(self) -> None:
        self.prune(self._now)


# --- failed logins ------------------------------------------------------------------


class _Failures:
    __slots__ = ("count", "last")

    def __init__(self, now: float):
        self.count = 0
        self.last = now


class FailureThrottle(_Table):
    """Brute-force throttling with a growing delay, per key.

    The first `free` failures cost nothing. From then on, after each failure
    the next attempt must wait `base_delay_s × 2^(failures − free)` seconds,
    at most `max_delay_s`; an attempt during the wait is refused without
    being tried. One failure is forgotten per `forget_s` without a new one.
    """

    def __init__(self, free: int, base_delay_s: float, max_delay_s: float, forget_s: float,
                 max_entries: int = 100_000):
        super().__init__(max_entries)
        self.free = free
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.forget_s = forget_s
        self._now = 0.0

    def failures(self, key: Hashable, now: float) -> int:
        entry = self.entries.get(key)
        return 0 if entry is None else self._count(entry, now)

    def _count(self, entry: _Failures, now: float) -> int:
        if self.forget_s <= 0:
            return entry.count
        forgotten = int(max(0.0, now - entry.last) // self.forget_s)
        return max(0, entry.count - forgotten)

    def delay_after(self, failures: int) -> float:
        """The wait that `failures` recent failures impose after the last one."""
        if failures < self.free:
            return 0.0
        exponent = failures - self.free
        if exponent >= 64:
            return self.max_delay_s
        return min(self.max_delay_s, self.base_delay_s * (2 ** exponent))

    def wait(self, key: Hashable, now: float) -> float:
        """Seconds before an attempt for `key` may be tried (0: now)."""
        entry = self.entries.get(key)
        if entry is None:
            return 0.0
        return max(0.0, entry.last + self.delay_after(self._count(entry, now)) - now)

    def failed(self, key: Hashable, now: float) -> None:
        self._now = now
        entry = self._touch(key, lambda: _Failures(now))
        entry.count = self._count(entry, now) + 1
        entry.last = now

    def succeeded(self, key: Hashable) -> None:
        self.entries.pop(key, None)

    def prune(self, now: float) -> int:
        gone = [k for k, e in self.entries.items() if self._count(e, now) == 0]
        for k in gone:
            del self.entries[k]
        return len(gone)

    def prune_now(self) -> None:
        self.prune(self._now)


# --- counting, logging, memory ------------------------------------------------------------


class Counts:
    """How many of something each key holds (connections per address)."""

    def __init__(self):
        self.counts: dict = {}

    def get(self, key) -> int:
        return self.counts.get(key, 0)

    def add(self, key) -> int:
        n = self.counts.get(key, 0) + 1
        self.counts[key] = n
        return n

    def remove(self, key) -> None:
        n = self.counts.get(key, 0) - 1
        if n > 0:
            self.counts[key] = n
        else:
            self.counts.pop(key, None)

    def __len__(self) -> int:
        return len(self.counts)


class LogThrottle:
    """At most `lines` log lines per key per `interval_s`, so a flood cannot
    fill the disk; the first line of the next interval says how many were
    left out."""

    def __init__(self, lines: int, interval_s: float):
        self.lines = lines
        self.interval_s = interval_s
        self.windows: dict = {}  # key -> [window start, lines asked for]

    def allow(self, key: Hashable, now: float) -> tuple[bool, int]:
        """(log this line?, lines suppressed since the last one logged)."""
        window = self.windows.get(key)
        if window is None or now - window[0] >= self.interval_s:
            suppressed = max(0, window[1] - self.lines) if window is not None else 0
            self.windows[key] = [now, 1]
            return True, suppressed
        window[1] += 1
        return window[1] <= self.lines, 0


def pick_slow_consumers(queued: Mapping[Hashable, int], total_limit: int, min_bytes: int) -> list:
    """Which connections to drop so the bytes queued towards clients fall
    back under `total_limit`: the biggest queues first, never one holding
    less than `min_bytes` (a connection that keeps up holds next to nothing)."""
    total = sum(queued.values())
    if total <= total_limit:
        return []
    picked = []
    for key, size in sorted(queued.items(), key=lambda kv: kv[1], reverse=True):
        if total <= total_limit or size < min_bytes:
            break
        picked.append(key)
        total -= size
    return picked


# Answers about an address string remembered (least recently used
# forgotten): parsing one costs more than the rest of accepting a
# connection's limits together.
ADDRESS_MEMO = 4096


class AddressSet:
    """Addresses and networks (`"10.0.0.0/8"`, `"::1"`)."""

    def __init__(self, specs: Iterable[str]):
        self.networks = [ipaddress.ip_network(s.strip(), strict=False) for s in specs if s.strip()]
        self._contains = functools.lru_cache(maxsize=ADDRESS_MEMO)(self._match)

    def __contains__(self, address: str) -> bool:
        return self._contains(address)

    def _match(self, address: str) -> bool:
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


@functools.lru_cache(maxsize=ADDRESS_MEMO)
def address_key(address: str) -> str:
    """What the per-address limits count a client as: its IPv4 address
    (IPv4-mapped IPv6 ones too), or the /64 of its IPv6 address. One host
    commonly holds a whole /64 and could otherwise take a fresh address,
    and with it a fresh allowance, for every connection."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


# --- configuration and policy -------------------------------------------------------------------


@dataclass(frozen=True)
class LimitsConfig:
    """[gate.limits] of conf/simzmq.toml; the file documents each key."""

    requests_per_s: float = 50.0
    requests_burst: int = 200
    sends_per_s: float = 20.0
    sends_burst: int = 200
    send_bytes_per_user_per_s: float = 131072.0
    send_bytes_per_user_burst: int = 2097152
    send_bytes_per_connection_per_s: float = 65536.0
    send_bytes_per_connection_burst: int = 1048576
    group_writes_per_s: float = 2.0
    group_writes_burst: int = 50
    abuse_factor: float = 4.0
    registers_per_address_per_min: float = 6.0
    registers_per_address_burst: int = 10
    registers_per_user_per_min: float = 1.0
    registers_per_user_burst: int = 3
    login_free_failures_per_user: int = 5
    login_free_failures_per_address: int = 20
    login_delay_base_s: float = 1.0
    login_delay_max_s: float = 300.0
    login_forget_s: float = 300.0
    history_per_s: float = 5.0
    history_burst: int = 20
    max_connections: int = 20000
    max_connections_per_address: int = 100
    connects_per_address_per_s: float = 10.0
    connects_per_address_burst: int = 50
    abuse_ban_s: float = 10.0
    abuse_ban_max_s: float = 600.0
    max_sessions_per_user: int = 20
    max_pending_requests: int = 64
    pause_reading_bytes: int = 262144
    max_outbound_total_bytes: int = 268435456
    slow_consumer_min_bytes: int = 65536
    close_linger_s: float = 2.0
    trusted_addresses: tuple = ("127.0.0.1", "::1")
    max_tracked: int = 100000
    log_lines_per_limit: int = 10
    log_interval_s: float = 60.0
    watch_per_request: int = MAX_WATCH_REQUEST
    watch_per_connection: int = MAX_WATCH_CONNECTION
    typing_peer_interval_s: float = 1.0
    typing_per_s: float = 5.0
    typing_burst: int = 10
    # Checked by the IM workers, which read it from here too (protocol.md
    # section 7: a user is in at most max_groups_per_user groups).
    max_groups_per_user: int = 1000

    @classmethod
    def from_mapping(cls, values: Mapping | None) -> "LimitsConfig":
        """Only known keys; each of the type of its default (ints accepted for floats)."""
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"unknown gate.limits keys: {', '.join(sorted(unknown))}")
        out = {}
        for name, value in values.items():
            default = known[name].default
            if isinstance(default, tuple):
                if isinstance(value, str):
                    value = [v for v in value.split(",") if v.strip()]
                value = tuple(str(v) for v in value)
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"gate.limits.{name} must be a number")
                value = float(value)
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"gate.limits.{name} must be an integer")
            if not isinstance(value, tuple) and value < 0:
                raise ValueError(f"gate.limits.{name} must not be negative")
            out[name] = value
        cfg = cls(**out)
        AddressSet(cfg.trusted_addresses)  # fail at start on a bad address
        if not 1 <= cfg.watch_per_request <= min(cfg.watch_per_connection, MAX_WATCH_REQUEST):
            raise ValueError(f"gate.limits.watch_per_request must be 1 to {MAX_WATCH_REQUEST} and at most "
                             "watch_per_connection")
        if cfg.watch_per_connection > MAX_WATCH_CONNECTION:
            raise ValueError(f"gate.limits.watch_per_connection must be at most {MAX_WATCH_CONNECTION} (protocol "
                             "section 7)")
        if cfg.max_groups_per_user < 1:
            raise ValueError("gate.limits.max_groups_per_user must be at least 1")
        if cfg.abuse_ban_s and cfg.abuse_ban_max_s < cfg.abuse_ban_s:
            raise ValueError("gate.limits.abuse_ban_max_s must be at least abuse_ban_s "
                             "(abuse_ban_s = 0 turns bans off)")
        return cfg


# Names of the limits, as in the metric simzmq_gate_rate_limited_total{limit}.
REQUESTS = "requests"
SENDS = "sends"
REGISTER_ADDRESS = "register_address"
REGISTER_USER = "register_user"
LOGIN_ADDRESS = "login_address"
LOGIN_USER = "login_user"
SESSIONS = "sessions"
CONNECTIONS = "connections"
ADDRESS_CONNECTIONS = "address_connections"
ADDRESS_CONNECTS = "address_connects"
ADDRESS_BANNED = "address_banned"
HISTORY = "history"
SEND_BYTES_USER = "send_bytes_user"
SEND_BYTES_CONNECTION = "send_bytes_connection"
GROUP_WRITES = "group_writes"
LIMIT_NAMES = (REQUESTS, SENDS, SEND_BYTES_USER, SEND_BYTES_CONNECTION, GROUP_WRITES, REGISTER_ADDRESS, REGISTER_USER, LOGIN_ADDRESS, LOGIN_USER, SESSIONS,
               CONNECTIONS, ADDRESS_CONNECTIONS, ADDRESS_CONNECTS, ADDRESS_BANNED, HISTORY)


class Limiter:
    """Every limit of one gate, decided from what the gate knows and `now`."""

    def __init__(self, cfg: LimitsConfig):
        self.cfg = cfg
        self.trusted = AddressSet(cfg.trusted_addresses)
        n = cfg.max_tracked
        self.sends = BucketTable(cfg.sends_per_s, cfg.sends_burst, cfg.abuse_factor * cfg.sends_burst, n)
        # Bytes are only ever refused, never abuse: a client that sends big
        # bodies too fast is slowed down, and its count of Sends is limited
        # (and kicked for abuse) by `sends` already.
        self.send_bytes = BucketTable(cfg.send_bytes_per_user_per_s, cfg.send_bytes_per_user_burst, max_entries=n)
        # A group write stores one inbox entry per member (up to
        # max_group_members), where a one-to-one Send stores two: it has a
        # budget of its own, per request, since only the IM workers know a
        # group's size (docs/security.md, "Groups").
        self.group_writes = BucketTable(cfg.group_writes_per_s, cfg.group_writes_burst,
                                        cfg.abuse_factor * cfg.group_writes_burst, n)
        self.register_address = BucketTable(cfg.registers_per_address_per_min / 60,
                                            cfg.registers_per_address_burst, max_entries=n)
        self.register_user = BucketTable(cfg.registers_per_user_per_min / 60, cfg.registers_per_user_burst,
                                         max_entries=n)
        self.history_address = BucketTable(cfg.history_per_s, cfg.history_burst, max_entries=n)
        self.connects_address = BucketTable(cfg.connects_per_address_per_s, cfg.connects_per_address_burst,
                                            max_entries=n)
        # Kick{abuse} bans the address: abuse_ban_s, doubling with each
        # further kick; one kick is forgotten per abuse_ban_max_s.
        self.banned_address = FailureThrottle(1, cfg.abuse_ban_s, cfg.abuse_ban_max_s, cfg.abuse_ban_max_s, n)
        self.login_user = FailureThrottle(cfg.login_free_failures_per_user, cfg.login_delay_base_s,
                                          cfg.login_delay_max_s, cfg.login_forget_s, n)
        self.login_address = FailureThrottle(cfg.login_free_failures_per_address, cfg.login_delay_base_s,
                                             cfg.login_delay_max_s, cfg.login_forget_s, n)
        # Password checks forwarded and not yet answered, per ("user", id)
        # and ("address", key): see login_wait.
        self.password_checks = Counts()
        self.connections = 0
        self.per_address = Counts()

    def is_trusted(self, address: str) -> bool:
        return address in self.trusted

    # -- connections ----------------------------------------------------------

    def admit(self, address: str, now: float) -> str | None:
        """Count a new connection from `address`; or the name of the limit it hits.

        Refused here, a connection costs an accept and a close: no handshake,
        which is the most a client can make the gate compute unasked.
        """
        if self.connections >= self.cfg.max_connections:
            return CONNECTIONS
        key = address_key(address)
        if not self.is_trusted(address):
            if self.cfg.abuse_ban_s and self.banned_address.wait(key, now) > 0:
                return ADDRESS_BANNED
            if self.per_address.get(key) >= self.cfg.max_connections_per_address:
                return ADDRESS_CONNECTIONS
            if self.connects_address.check(key, now):
                return ADDRESS_CONNECTS
        self.connections += 1
        self.per_address.add(key)
        return None

    def abused(self, address: str, now: float) -> float:
        """A connection from `address` was kicked for abuse: refuse the
        address's new connections for a while (returned, in seconds; 0 for
        none). A client that goes far over its limits would otherwise only
        reconnect and start again."""
        if not self.cfg.abuse_ban_s or self.is_trusted(address):
            return 0.0
        key = address_key(address)
        self.banned_address.failed(key, now)
        return self.banned_address.wait(key, now)

    def release(self, address: str) -> None:
        self.connections = max(0, self.connections - 1)
        self.per_address.remove(address_key(address))

    def connection_bucket(self, now: float) -> TokenBucket:
        cfg = self.cfg
        return TokenBucket(cfg.requests_per_s, cfg.requests_burst, now, cfg.abuse_factor * cfg.requests_burst)

    def connection_byte_bucket(self, now: float) -> TokenBucket:
        cfg = self.cfg
        return TokenBucket(cfg.send_bytes_per_connection_per_s, cfg.send_bytes_per_connection_burst, now)

    def sessions_full(self, sessions: int) -> bool:
        return sessions >= self.cfg.max_sessions_per_user

    def reading_paused(self, pending: int) -> bool:
        return pending >= self.cfg.max_pending_requests

    def behind(self, queued_bytes: int) -> bool:
        """A client this far behind in reading gets no more of its requests
        read until it catches up: what it asks for could only pile up."""
        return queued_bytes > self.cfg.pause_reading_bytes

    # -- requests ----------------------------------------------------------

    def send(self, user: str, size: int, connection_bytes: TokenBucket, now: float) -> tuple[Verdict, str]:
        """May `user` send a Send of `size` bytes on the connection whose
        byte bucket is `connection_bytes`? (ALLOW, "") or (verdict, limit).

        A request larger than a byte burst costs a whole burst: it fits into
        a full bucket (the frame limits bound its size), and then nothing else
        does until the bucket has refilled.
        """
        verdict = self.sends.check(user, now)
        if verdict:
            return verdict, SENDS
        if connection_bytes.check(now, min(size, connection_bytes.burst)):
            return Verdict.LIMIT, SEND_BYTES_CONNECTION
        if self.send_bytes.check(user, now, min(size, self.send_bytes.burst)):
            return Verdict.LIMIT, SEND_BYTES_USER
        return Verdict.ALLOW, ""

    def send_retry_after(self, user: str, size: int, connection_bytes: TokenBucket, now: float) -> float:
        """Seconds until a Send of `size` bytes would pass the byte budgets."""
        return max(connection_bytes.retry_after(now, min(size, connection_bytes.burst)),
                   self.send_bytes.retry_after(user, now, min(size, self.send_bytes.burst)))

    def group_write(self, user: str, now: float) -> Verdict:
        """May `user` make one more request that writes to a group (a Send to
        it, GroupCreate, GroupAdd, GroupRemove, GroupTitle)?"""
        return self.group_writes.check(user, now)

    def register(self, user: str, address: str, now: float) -> tuple[Verdict, str]:
        if not self.is_trusted(address):
            verdict = self.register_address.check(address_key(address), now)
            if verdict:
                return verdict, REGISTER_ADDRESS
        return self.register_user.check(user, now), REGISTER_USER

    def login_wait(self, user: str, address: str, password: bool, now: float) -> tuple[float, str]:
        """(seconds to wait, the limit) before this Login may be tried.

        Only password Logins are throttled per user: a resume token is 32
        random bytes, nothing to guess, so an attacker failing as a victim
        cannot lock the victim's token resumes out.

        Password checks (Argon2id, the worker's dearest work) run one at a
        time per user, and per address as many at once as the address has
        free failures left (at least one): the next is refused, as if it had
        failed, until one is answered. Failures only count once answered, so
        a guesser on five connections would otherwise keep five checks
        going, and on a loaded machine, where the answers come after the
        gate stopped waiting, no failure would ever slow it down.
        """
        if not self.is_trusted(address):
            key = address_key(address)
            wait = self._login_wait(self.login_address, key, ("address", key), password, now, False)
            if wait > 0:
                return wait, LOGIN_ADDRESS
        if password:
            wait = self._login_wait(self.login_user, user, ("user", user), password, now, True)
            if wait > 0:
                return wait, LOGIN_USER
        return 0.0, ""

    def _login_wait(self, throttle: FailureThrottle, key: str, checking: tuple, password: bool,
                    now: float, one_at_a_time: bool) -> float:
        wait = throttle.wait(key, now)
        if wait > 0 or not password:
            return wait
        failures = throttle.failures(key, now)
        side_by_side = 1 if one_at_a_time else max(1, throttle.free - failures)
        if self.password_checks.get(checking) < side_by_side:
            return 0.0
        return max(1.0, throttle.delay_after(failures))

    def _password_check_keys(self, user: str, address: str) -> list:
        keys = [("user", user)]
        if not self.is_trusted(address):
            keys.append(("address", address_key(address)))
        return keys

    def login_started(self, user: str, address: str, password: bool) -> None:
        """A Login that passed login_wait is forwarded; login_ended when answered."""
        if password:
            for key in self._password_check_keys(user, address):
                self.password_checks.add(key)

    def login_ended(self, user: str, address: str, password: bool) -> None:
        if password:
            for key in self._password_check_keys(user, address):
                self.password_checks.remove(key)

    def login_failed(self, user: str, address: str, password: bool, now: float) -> None:
        if not self.is_trusted(address):
            self.login_address.failed(address_key(address), now)
        if password:
            self.login_user.failed(user, now)

    def login_succeeded(self, user: str) -> None:
        # The address keeps its count: one good account must not launder the
        # failures of an address that guesses at others.
        self.login_user.succeeded(user)

    def history(self, address: str, now: float) -> Verdict:
        if self.is_trusted(address):
            return Verdict.ALLOW
        return self.history_address.check(address_key(address), now)

    # -- housekeeping --------------------------------------------------------

    def prune(self, now: float) -> dict[str, int]:
        """Forget what no longer matters; returns the entries left per table."""
        tables = {"sends": self.sends, "send_bytes": self.send_bytes, "group_writes": self.group_writes,
                  "register_address": self.register_address,
                  "register_user": self.register_user, "history": self.history_address,
                  "connects_address": self.connects_address, "banned_address": self.banned_address,
                  "login_user": self.login_user, "login_address": self.login_address}
        for table in tables.values():
            table.prune(now)
        sizes = {name: len(t) for name, t in tables.items()}
        sizes["address_connections"] = len(self.per_address)
        return sizes
