"""What a bench run is asked to do (Options) and who does what: users, flows,
and which generator process runs them."""

from __future__ import annotations

from dataclasses import dataclass, field

SCENARIOS = ("pairs", "connect", "fanin", "backlog", "groups")
CODEC_IDS = {"bin": 1, "msgpack": 2}

CONNECT_SESSIONS_PER_USER = 16

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
    senders: int = 1  # groups: members that send
    # groups: the client ports of the region's gates, which the members are
    # spread over (empty: all on `port`)
    gate_ports: tuple[int, ...] = ()

    def resolved_users(self) -> int:
        if self.users is not None:
            return self.users
        # connect: at most CONNECT_SESSIONS_PER_USER connections per user, under
        # the gate's default cap on sessions per user (gate.limits.max_sessions_per_user).
        connect_users = min(self.connections, max(200, -(-self.connections // CONNECT_SESSIONS_PER_USER)))
        return {"pairs": 200, "fanin": 50, "backlog": 2, "connect": connect_users, "groups": 256}[self.scenario]


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
    ports: dict[str, int] = field(default_factory=dict)  # user -> gate port, where not the bench's port


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
    elif opts.scenario == "groups":
        from simzmq.bench.groups import plan_members
        plan_members(opts, plans)
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
    if opts.scenario == "groups" and n < 2:
        raise BenchError("groups needs at least 2 members (--users)")
    if opts.scenario == "groups" and not 1 <= opts.senders <= n:
        raise BenchError("--senders must be between 1 and the group's members (--users)")
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
