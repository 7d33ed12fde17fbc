"""CURVE on the internal ZeroMQ sockets, with an allow-list per role.

Every broker socket is a CURVE server with the brokers' key and a ZAP domain
named after the socket; gates, workers, the peer broker and ``simzmq monitor``
connect as CURVE clients with their role's key. The broker's ZAP handler asks
:class:`BusPolicy` whether the client's public key belongs to a role allowed
on that socket:

=============  ================  =========================================
socket         ZAP domain        roles allowed to connect
=============  ================  =========================================
frontend       ``frontend``      gate
backend        ``backend``       worker
notify in      ``notify_in``     worker
notify out     ``notify_out``    gate, worker (the push service)
state          ``state_pub``     broker (the peer), ops (``simzmq monitor``)
=============  ================  =========================================

A refused client never completes the handshake, so nothing it sends reaches
the broker and nothing the broker publishes reaches it. Keys live in
``DATA/keys/bus/`` (simzmq/keys.py); docs/operations.md says how to add,
move and revoke them.

:class:`BusPolicy` and :class:`RefusalLog` are pure (no sockets, no clock);
:class:`ZapHandler` is the thin ZeroMQ part.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

import zmq
from zmq.auth.thread import ThreadAuthenticator

from simzmq import keys as keys_mod

log = logging.getLogger("simzmq.bus")

ROLES = keys_mod.BUS_ROLES

# Which roles may connect to each broker socket; the socket's name is its ZAP
# domain. Nothing else is ever allowed: a ZAP request for another domain is
# refused.
SOCKET_ROLES: dict[str, frozenset[str]] = {
    "frontend": frozenset({"gate"}),
    "backend": frozenset({"worker"}),
    "notify_in": frozenset({"worker"}),
    # The push service (with the worker key: it reads the store anyway)
    # hears the workers' wake-ups and presence reports here (docs/push.md).
    "notify_out": frozenset({"gate", "worker"}),
    "state_pub": frozenset({"broker", "ops"}),
}
# The broker's one client socket: its SUB to the peer's state PUB.
PEER_STATE = "peer_state"

# A refused client reconnects every reconnect interval (100 ms by default) and
# is refused each time; one log line per client key, address and socket per
# this many seconds is enough to see it, the rest is counted.
REFUSAL_LOG_INTERVAL_S = 60.0
# Forget the oldest remembered (socket, key, address) beyond this many, so a
# flood of made-up keys cannot grow the table without bound.
REFUSAL_LOG_LIMIT = 10_000


class Decision(NamedTuple):
    allowed: bool
    role: str | None      # the role the key belongs to (even when refused), or None if unknown
    reason: str           # for the ZAP reply's status text and the log


class BusPolicy:
    """Pure allow-list policy: which public keys may connect to which socket.

    ``keys_by_role`` maps a role to the public keys (z85 bytes) of that role.
    One key may be listed under several roles; it is allowed wherever any of
    them is.
    """

    def __init__(self, keys_by_role: Mapping[str, Iterable[bytes]],
                 socket_roles: Mapping[str, Iterable[str]] = SOCKET_ROLES) -> None:
        unknown = set(keys_by_role) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown bus roles: {', '.join(sorted(unknown))}")
        self.socket_roles = {domain: frozenset(roles) for domain, roles in socket_roles.items()}
        self.roles_of: dict[bytes, frozenset[str]] = {}
        for role, keys in keys_by_role.items():
            for key in keys:
                key = bytes(key)
                self.roles_of[key] = self.roles_of.get(key, frozenset()) | {role}
        # Counts per domain, made up front so readers on another thread only
        # ever see values change, never the dicts' sizes.
        self.accepted = {domain: 0 for domain in self.socket_roles}
        self.refused = {domain: 0 for domain in self.socket_roles}
        self.refused_other_domain = 0

    def key_count(self, role: str) -> int:
        return sum(1 for roles in self.roles_of.values() if role in roles)

    def decide(self, domain: str, key: bytes) -> Decision:
        """May a CURVE client with public key ``key`` (z85) connect to the
        socket whose ZAP domain is ``domain``? Counts the answer."""
        key_roles = self.roles_of.get(bytes(key), frozenset())
        wanted = self.socket_roles.get(domain)
        role = min(key_roles) if key_roles else None
        if wanted is None:
            self.refused_other_domain += 1
            return Decision(False, role, f"no bus socket has ZAP domain {domain!r}")
        granted = key_roles & wanted
        if granted:
            self.accepted[domain] += 1
            return Decision(True, min(granted), "OK")
        self.refused[domain] += 1
        allowed = "/".join(sorted(wanted))
        if not key_roles:
            return Decision(False, None, f"unknown key; {domain} accepts {allowed} keys only")
        return Decision(False, role, f"a {'/'.join(sorted(key_roles))} key; {domain} accepts {allowed} keys only")


class RefusalLog:
    """Which refusals to log: the first per (domain, key, address), then one
    per ``interval`` carrying the count of those not logged. Pure: ``now``
    comes in."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL_S, limit: int = REFUSAL_LOG_LIMIT) -> None:
        self.interval = interval
        self.limit = limit
        self.seen: dict[tuple, list] = {}  # (domain, key, address) -> [last logged, suppressed since]

    def should_log(self, domain: str, key: bytes, address: str, now: float) -> int | None:
        """None: stay quiet. Otherwise log now, mentioning the returned number
        of refusals of this client that were not logged since the last line."""
        ident = (domain, key, address)
        entry = self.seen.get(ident)
        if entry is None:
            if len(self.seen) >= self.limit:
                self.seen.pop(next(iter(self.seen)))
            self.seen[ident] = [now, 0]
            return 0
        if now - entry[0] >= self.interval:
            suppressed = entry[1]
            entry[0], entry[1] = now, 0
            return suppressed
        entry[1] += 1
        return None


def describe_key(key: bytes) -> str:
    """A public key for a log line: z85, which is what the key files hold."""
    return key.decode("ascii", "replace")


class ZapHandler(ThreadAuthenticator):
    """The broker's ZAP handler: pyzmq's ThreadAuthenticator (a thread that
    answers ZAP requests on inproc://zeromq.zap.01 of the broker's context)
    asking a :class:`BusPolicy` about each CURVE client.

    A thread, because the broker is a blocking Poller loop, not asyncio; the
    handler only runs when a connection is made, never per message.
    ``reload()`` swaps in a new policy (the broker calls it on SIGHUP).
    """

    def __init__(self, context: zmq.Context, policy: BusPolicy, clock: Callable[[], float] | None = None) -> None:
        super().__init__(context=context, log=logging.getLogger("simzmq.bus.zap"))
        import time

        self.policy = policy
        self.refusals = RefusalLog()
        self._clock = clock or time.monotonic
        self._address = ""
        self._lock = threading.Lock()

    def start(self) -> None:
        super().start()
        for domain in self.policy.socket_roles:
            self.configure_curve_callback(domain, self)

    def reload(self, policy: BusPolicy) -> None:
        with self._lock:
            # Counts carry over so metrics do not go backwards.
            for domain in policy.socket_roles:
                policy.accepted[domain] = self.policy.accepted.get(domain, 0)
                policy.refused[domain] = self.policy.refused.get(domain, 0)
            policy.refused_other_domain = self.policy.refused_other_domain
            self.policy = policy

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # The peer's address is in the request (frame 3) but not passed to the
        # credentials callback; remember it for the log line.
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: ``key`` is z85."""
        with self._lock:
            decision = self.policy.decide(domain, key)
            if decision.allowed:
                log.debug("accepted a %s key from %s on %s", decision.role, self._address, domain)
                return True
            suppressed = self.refusals.should_log(domain, bytes(key), self._address, self._clock())
        if suppressed is not None:
            more = f" ({suppressed} more refusals of it since the last line)" if suppressed else ""
            log.warning("refused a CURVE client on %s from %s: %s; its public key %s%s",
                        domain, self._address, decision.reason, describe_key(key), more)
        return False

    def counts(self) -> dict:
        """Accepted and refused handshakes per socket, for status and metrics."""
        policy = self.policy
        return {"accepted": dict(policy.accepted), "refused": dict(policy.refused)}


# --- socket configuration -----------------------------------------------------


class BusKeys(NamedTuple):
    role: str
    public: bytes   # this process's key pair, z85
    secret: bytes
    server: bytes   # the brokers' public key, z85


def load_keys(data_dir: Path, role: str) -> BusKeys:
    """The key pair of ``role`` and the brokers' public key, from DATA/keys/bus/."""
    public, secret = keys_mod.load_bus_pair(data_dir, role)
    server = public if role == "broker" else keys_mod.load_bus_public(data_dir, "broker")
    return BusKeys(role, public, secret, server)


def load_policy(data_dir: Path) -> BusPolicy:
    return BusPolicy({role: list(keys) for role, keys in keys_mod.allowed_bus_keys(data_dir).items()})


def client_configurator(keys: BusKeys) -> Callable[[zmq.Socket, str], None]:
    """``configure_socket(sock, name)`` for a process that connects to the
    brokers (gate, worker, monitor): a CURVE client with its role's key."""

    def configure(sock: zmq.Socket, name: str = "") -> None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_serverkey = keys.server

    return configure


def broker_configurator(keys: BusKeys) -> Callable[[zmq.Socket, str], None]:
    """``configure_socket(sock, name)`` for a broker: every socket it binds a
    CURVE server in the ZAP domain of its name; its SUB to the peer's state
    socket a CURVE client with the broker key."""
    if keys.role != "broker":
        raise ValueError("a broker needs the broker key")
    client = client_configurator(keys)

    def configure(sock: zmq.Socket, name: str) -> None:
        if name == PEER_STATE:
            client(sock, name)
            return
        if name not in SOCKET_ROLES:
            raise ValueError(f"no bus policy for broker socket {name!r}")
        sock.curve_server = True
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.zap_domain = name.encode()

    return configure


class BrokerBus(NamedTuple):
    configure_socket: Callable[[zmq.Socket, str], None]
    zap: ZapHandler


def start_broker_bus(context: zmq.Context, data_dir: Path) -> BrokerBus:
    """Load the broker key and the allow-lists, start the ZAP handler on
    ``context`` (before any socket of it binds) and return the broker's
    ``configure_socket``. Stop ``zap`` after the broker has closed its sockets."""
    keys = load_keys(data_dir, "broker")
    policy = load_policy(data_dir)
    zap = ZapHandler(context, policy)
    zap.start()
    log.info("bus CURVE on: server key %s; allowed keys: %s", describe_key(keys.public),
             ", ".join(f"{role} {policy.key_count(role)}" for role in ROLES))
    return BrokerBus(broker_configurator(keys), zap)


def reload_policy(zap: ZapHandler, data_dir: Path) -> None:
    """Re-read the allow-lists (DATA/keys/bus/) into a running ZAP handler.
    New connections are judged by the new lists; established ones stay."""
    try:
        policy = load_policy(data_dir)
    except keys_mod.KeyFileError as exc:
        log.error("bus keys not reloaded: %s", exc)
        return
    zap.reload(policy)
    log.info("bus allow-lists reloaded: %s", ", ".join(f"{role} {policy.key_count(role)}" for role in ROLES))


def curve_off_warning(process: str) -> None:
    log.warning("%s: bus CURVE is off ([bus] curve = false): any process that reaches the broker ports "
                "can join the bus; only for a trusted lab network", process)
