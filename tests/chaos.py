"""Load and checking harness for the chaos tests: a region under a steady load
from the client library, one process killed with SIGKILL, then a full audit.

What one run does (``run_chaos``):

1. Start a region (``tests.region.Region``: broker pair, ``workers`` IM
   workers, two gates).
2. Log in ``pairs`` sender→receiver pairs. Pair ``i``: the sender's phone on
   gate ``i % 2``, the receiver on the other gate, and a second device of the
   sender (its "laptop", which gets the sender's copy of every message as a
   push) on gate ``(i // 2) % 2``. So each gate holds senders, receivers and
   laptops.
3. Every sender sends continuously with ``Client.send`` (which resends
   unacknowledged Sends with the same cmid across reconnects), paced at
   ``rate`` per second with at most ``window`` Sends in flight. A body is
   ``sender|counter``, the counter being the send order.
4. After ``before_s`` seconds the victim is killed with SIGKILL (its pid from
   ``DATA/run/NAME.pid``); the supervisor restarts it. Sending goes on for
   ``after_s`` seconds, then stops, and every Send still in flight is given
   ``drain_s`` to be acknowledged.
5. Every user's whole inbox is read by a fresh connection (Login, Sync until
   ``more`` is false): that is the truth the rest is checked against.
6. The devices get ``settle_s`` to hold everything (pushes still on their way,
   the client library's own Syncs), then the audit runs (``audit``, pure).

Group traffic rides along (``groups`` groups, see ``plan_groups``): the pairs
are split into that many chunks, and each chunk's senders and receivers form
a group, owned by the chunk's first receiver (each member writes to the owner
once first, so the owner may put it in). While the load runs, every sender
also sends to its group (``group_rate`` a second, one Send in flight; body
``sender|group|counter``), and each owner changes its group every
``group_change_every_s``: a new title, removing one member (the "floater",
the chunk's last receiver), a new title, putting it back, and so on. The
group part of the audit (``audit_groups``, pure) takes the owner's inbox,
which holds every message and event of the group, as the group's history;
its events say who was a member when, and so which inboxes must hold each
entry:

* **group lost**: an acked group message missing from the history, or an
  entry missing from the inbox of someone who was a member then (events:
  also from whoever it removed);
* **group extra**: an entry of the group in the inbox of someone who was not
  a member then;
* **group doubled**: a msg_id twice in one inbox;
* **group order violation**: an inbox holding the group's entries in other
  than msg_id order (then not every member sees one order), or one sender's
  acked group messages not in send order;
* **group mismatched**: a copy whose sender, kind or body differs from the
  history's, or a sender's copy whose msg_id or seq differs from its SendOk;
* **group events mismatch**: the history's events after the creation are
  not exactly the acked changes, in order (checked when every change was
  acked), or versions that do not rise by one.

Definitions used by the audit (docs/failover.md repeats them):

* **acked**: a Send whose ``SendOk`` reached the sender.
* **lost**: an acked message missing from the recipient's or the sender's
  inbox, or present with another msg_id (or, in the sender's inbox, another
  seq) than its SendOk said.
* **doubled**: a body stored more than once in one inbox (acked or not).
* **order violation**: two acked messages of one sender whose seqs, in the
  recipient's or in the sender's inbox, are not in the order they were sent.
* **pushed**: a ``NewMsg`` push of that seq reached the device (counted when
  it arrives on the socket, whether or not the client library still needed
  it). **sync only**: the device holds the message but no push of it ever
  arrived, so it came from a Sync the client library made (after a gap, or
  after a reconnect). **missing**: the device does not hold it at the end.
* A device **stayed connected** if its client never reconnected
  (``Client.reconnects == 0``) and its connection is still open at the end.
  Devices checked for pushes are the receivers and the senders' laptops; the
  sending phone holds its own messages from their SendOk and is not pushed
  its own Sends.
* **outage** (per sender): the longest time between two consecutive SendOk
  arrivals of that sender while the load ran; the run's outage is the worst
  sender's. ``all_senders_gap_ms`` is the longest gap in the merged stream of
  every sender's SendOks. ``baseline_*`` are the same before the kill.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from simzmq import bus
from simzmq.client import Client, Connection, RequestError, group_event, new_group_id
from simzmq.wire import messages as m
from simzmq.wire.messages import GROUP_EVENT_KIND, ErrorCode, GroupOp
from tests.region import Region, until_available

SYNC_LIMIT = 500


# --- the devices ------------------------------------------------------------------


class RecordingClient(Client):
    """A Client that also records every NewMsg push as it arrives on a socket,
    with the number of the connection it came on (before the client library
    decides to apply, ignore or Sync)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.opened = 0
        self.raw_pushes: list[tuple[int, int, float]] = []  # (connection number, seq, monotonic time)

    async def _open(self) -> Connection:
        self.opened += 1
        number = self.opened
        return await Connection.open(
            self.host, self.port, self.gate_pk, self.codecs, self.max_frame,
            on_push=lambda push: self._pushed(number, push),
            on_close=self._on_close,
            ping_interval=self.ping_interval,
        )

    def _pushed(self, number: int, push: object) -> None:
        if type(push) is m.NewMsg:
            self.raw_pushes.append((number, push.msg.seq, time.monotonic()))
        self._on_push(push)

    async def request(self, msg: object) -> object:
        """A request that is safe to repeat as it is (a group change keeps
        its cmid), repeated on a new connection if this one drops."""
        return await self._call(msg)


@dataclass
class Device:
    user: str
    role: str  # "phone" (sends), "laptop" (the sender's second device), "receiver"
    gate: int  # 1-based gate number
    client: RecordingClient | None = None
    stayed: bool | None = None  # fixed when the run ends, before the clients close
    # Seqs of messages this device sent itself (a receiver's hello to its
    # group's owner): it holds them from their SendOk, and is not pushed them.
    sent: set[int] = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"{self.user}/{self.role}"

    @property
    def stayed_connected(self) -> bool:
        if self.stayed is not None:
            return self.stayed
        c = self.client
        return c.reconnects == 0 and c.conn is not None and not c.conn.closed


@dataclass
class SendRecord:
    counter: int
    body: bytes
    issued: float
    acked: float | None = None
    ok: m.SendOk | None = None
    error: str | None = None


@dataclass
class Pair:
    index: int
    sender: str
    receiver: str
    phone: Device
    laptop: Device
    inbox_device: Device
    sends: list[SendRecord] = field(default_factory=list)


@dataclass
class ChangeRecord:
    """A group change the owner made during the load."""
    op: GroupOp  # TITLE_CHANGED, REMOVED or ADDED
    detail: tuple  # the title, or the users
    msg: object
    acked: float | None = None
    error: str | None = None


@dataclass
class ChaosGroup:
    id: str
    owner: Device  # the owner's first device: it creates the group and changes it
    members: list[str]  # at its creation, in join order (the owner first)
    floater: str  # the member the owner removes and puts back
    senders: list[Pair]  # whose phones send to the group
    sends: dict[str, list[SendRecord]] = field(default_factory=dict)  # sender -> its group Sends
    changes: list[ChangeRecord] = field(default_factory=list)


def plan_groups(pairs: list[Pair], count: int) -> list[ChaosGroup]:
    """Split the pairs into ``count`` chunks; each chunk's senders and
    receivers are a group, owned by its first receiver."""
    size = len(pairs) // count if count else 0
    if count and size < 2:
        raise ValueError("each group needs at least two pairs")
    groups = []
    for g in range(count):
        chunk = pairs[g * size:(g + 1) * size]
        owner = chunk[0].inbox_device
        members = [owner.user] + [u for p in chunk for u in (p.sender, p.receiver) if u != owner.user]
        groups.append(ChaosGroup(new_group_id(), owner, members, chunk[-1].receiver, chunk,
                                 {p.sender: [] for p in chunk}))
    return groups


# --- brokers' Binary Star state ----------------------------------------------------


def broker_states(region: Region, timeout: float = 3.0) -> dict[str, dict]:
    """The latest state message of each broker (role -> JSON), read from their
    ``state`` PUB sockets; a broker that says nothing within ``timeout`` is
    left out."""
    endpoints = {
        "primary": region.env["SIMZMQ_BROKER_PRIMARY_STATE"],
        "backup": region.env["SIMZMQ_BROKER_BACKUP_STATE"],
    }
    ctx = zmq.Context.instance()
    found: dict[str, dict] = {}
    socks = []
    # The state sockets admit the ops role's CURVE key (simzmq/bus.py).
    curve = region.env.get("SIMZMQ_BUS_CURVE", "true").lower() not in ("0", "false", "no", "off")
    configure = bus.client_configurator(bus.load_keys(region.data_dir, "ops")) if curve else None
    try:
        for role, ep in endpoints.items():
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            if configure is not None:
                configure(sock, "state_pub")
            sock.setsockopt(zmq.SUBSCRIBE, b"state")
            sock.connect(ep)
            socks.append((role, sock))
        poller = zmq.Poller()
        for _, sock in socks:
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while len(found) < len(socks) and time.monotonic() < deadline:
            ready = dict(poller.poll(100))
            for role, sock in socks:
                if sock in ready:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if len(frames) == 2 and frames[0] == b"state":
                            try:
                                found[role] = json.loads(frames[1])
                            except ValueError:
                                pass
    finally:
        for _, sock in socks:
            sock.close(0)
    return found


def wait_broker_states(region: Region, want: dict[str, str], timeout: float) -> dict[str, str | None]:
    """Poll the brokers' states until they are ``want`` (role -> state) or the
    time is up; returns the last states seen."""
    deadline = time.monotonic() + timeout
    while True:
        states = {role: s.get("state") for role, s in broker_states(region, 1.0).items()}
        seen = {role: states.get(role) for role in want}
        if seen == want or time.monotonic() >= deadline:
            return seen
        time.sleep(0.2)


def active_broker(region: Region) -> str:
    """Which broker of the pair is active (by their own state messages),
    falling back to the broker the first gate uses."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for role, status in broker_states(region).items():
            if status.get("state") == "active":
                return role
        time.sleep(0.2)
    status, body = region.http_get("/v1/health")
    return body["broker"] if isinstance(body, dict) else "primary"


def gate_health(region: Region, gate: int) -> dict:
    import urllib.error
    import urllib.request
    url = f"http://127.0.0.1:{region.http_port + gate - 1}/v1/health"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read())
        except ValueError:
            return {"status": e.code}
    except (OSError, ValueError) as exc:
        return {"status": f"unreachable: {exc}"}


# --- the run ------------------------------------------------------------------------


@dataclass
class ChaosConfig:
    victim: str  # "broker" (the active one), "worker" (im-1) or "gate" (gate-1)
    workers: int = 2
    gates: int = 2
    pairs: int = 10
    # Sends per second per sender: under the gate's default per-user Send rate
    # limit (gate.limits.sends_per_s), so no Send is refused for its rate.
    rate: float = 15.0
    window: int = 3  # Sends in flight per sender
    before_s: float = 3.0
    after_s: float = 6.0
    drain_s: float = 25.0
    settle_s: float = 10.0
    groups: int = 2
    # Group Sends per second per sender, and how often each owner changes its
    # group: together under the gate's default group_writes limit.
    group_rate: float = 1.0
    group_change_every_s: float = 0.8


def _start_region(data_dir: Path, cfg: ChaosConfig) -> Region:
    # Every test user registers from 127.0.0.1: lift the per-address Register
    # limit, which is there against one address creating accounts in bulk,
    # and the per-user one, which would refuse the harness's retries of a
    # Register that timed out (_register).
    region = Region(data_dir, workers=cfg.workers, gates=cfg.gates,
                    extra_env={"SIMZMQ_GATE_LIMITS_REGISTERS_PER_ADDRESS_BURST": "1000",
                               "SIMZMQ_GATE_LIMITS_REGISTERS_PER_ADDRESS_PER_MIN": "1000",
                               "SIMZMQ_GATE_LIMITS_REGISTERS_PER_USER_BURST": "1000",
                               "SIMZMQ_GATE_LIMITS_REGISTERS_PER_USER_PER_MIN": "1000"})
    region.start()
    # Region.start waits for gate-1 only.
    deadline = time.monotonic() + 30
    while not all(gate_health(region, g).get("status") == "ok" for g in range(1, cfg.gates + 1)):
        if time.monotonic() > deadline:
            print("---- region log (tail) ----\n" + region.read_log()[-6000:])
            region.stop()
            raise RuntimeError("the gates did not all become healthy")
        time.sleep(0.1)
    return region


def run_chaos(data_dir: Path, cfg: ChaosConfig) -> dict:
    """Run one chaos scenario against a fresh region; returns the audit."""
    region = _start_region(data_dir, cfg)
    try:
        return _run_in_region(region, cfg)
    except BaseException:
        print("---- region log (tail) ----\n" + region.read_log()[-6000:])
        raise
    finally:
        region.stop()


def _run_in_region(region: Region, cfg: ChaosConfig) -> dict:
    if cfg.victim == "broker":
        victim = "broker-" + active_broker(region)
    elif cfg.victim == "worker":
        victim = "im-1"
    elif cfg.victim == "gate":
        victim = "gate-1"
    else:
        raise ValueError(f"unknown victim {cfg.victim!r}")
    run = asyncio.run(asyncio.wait_for(_load(region, cfg, victim), 240))
    after: dict = {"victim": victim, "victim_pid": run["victim_pid"]}
    # The supervisor restarts the victim: wait for its new pid file.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            new_pid = region.pid(victim)
        except (OSError, ValueError):
            new_pid = None
        if new_pid is not None and new_pid != run["victim_pid"]:
            break
        time.sleep(0.1)
    after["victim_new_pid"] = new_pid
    if cfg.victim == "broker":
        killed_role = victim.split("-", 1)[1]
        other = "backup" if killed_role == "primary" else "primary"
        after["broker_states"] = wait_broker_states(region, {other: "active", killed_role: "passive"}, 10)
        after["expected_broker_states"] = {other: "active", killed_role: "passive"}
    else:
        after["broker_states"] = {r: s.get("state") for r, s in broker_states(region).items()}
    after["gates"] = {f"gate-{g}": gate_health(region, g) for g in range(1, cfg.gates + 1)}
    result = audit(run["pairs"], run["inboxes"], run["kill_at"], run["load_started"], run["load_stopped"])
    result.update(audit_groups(run["groups"], run["inboxes"]))
    result.update(after)
    result.update({
        "victim_kind": cfg.victim,
        # As started (tests/region.py may have raised the counts asked for).
        "config": {"workers": region.workers, "gates": region.gates, "pairs": cfg.pairs, "rate_per_sender": cfg.rate,
                   "window": cfg.window, "before_s": cfg.before_s, "after_s": cfg.after_s, "groups": cfg.groups,
                   "group_rate_per_sender": cfg.group_rate, "group_change_every_s": cfg.group_change_every_s},
    })
    return result


async def _load(region: Region, cfg: ChaosConfig, victim: str) -> dict:
    tag = f"{os.getpid()}x{int(time.time() * 1000) % 100000}"
    pk = region.gate_pk

    def port_of(gate: int) -> int:
        return region.gate_port + gate - 1

    pairs: list[Pair] = []
    for i in range(cfg.pairs):
        s, r = f"s{i}-{tag}", f"r{i}-{tag}"
        phone = Device(s, "phone", 1 + i % cfg.gates)
        receiver = Device(r, "receiver", 1 + (i + 1) % cfg.gates)
        laptop = Device(s, "laptop", 1 + (i // 2) % cfg.gates)
        pairs.append(Pair(i, s, r, phone, laptop, receiver))
    devices = [d for p in pairs for d in (p.phone, p.laptop, p.inbox_device)]
    for d in devices:
        d.client = RecordingClient("127.0.0.1", port_of(d.gate), pk, d.user, password="pw-" + d.user,
                                   device=d.role)
    # Register each user once, then log every device in.
    await asyncio.gather(*(_register(d.client) for d in devices if d.role in ("phone", "receiver")))
    # Password Logins cost an Argon2id verification each: log the first
    # device of each user in with the password, the laptops with its token.
    await asyncio.gather(*(_login(d.client) for d in devices if d.role != "laptop"))
    for p in pairs:
        p.laptop.client.token = p.phone.client.token
    await asyncio.gather(*(_login(p.laptop.client) for p in pairs))
    groups = plan_groups(pairs, cfg.groups)
    first_device = {d.user: d for d in devices if d.role != "laptop"}
    await asyncio.gather(*(_create_group(g, first_device) for g in groups))

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    gave_up = asyncio.Event()

    async def stream(client: Client, to: str, label: str, records: list[SendRecord], rate: float,
                     window: int) -> None:
        """Sends to ``to`` at ``rate``, at most ``window`` in flight, until stopped."""
        slots = asyncio.Semaphore(window)
        period = 1.0 / rate
        next_at = loop.time()
        flying: set[asyncio.Task] = set()
        counter = 0

        async def one(rec: SendRecord) -> None:
            try:
                rec.ok = await client.send(to, rec.body)
                rec.acked = time.monotonic()
            except (RequestError, ConnectionError, OSError) as exc:
                # A final error is recorded (and fails the audit); a Send the
                # drain gave up on stays unacked.
                if not gave_up.is_set():
                    rec.error = f"{type(exc).__name__}: {exc}"
            finally:
                slots.release()

        while True:
            await slots.acquire()
            if stop.is_set():
                slots.release()
                break
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = max(next_at + period, loop.time())
            counter += 1
            rec = SendRecord(counter, f"{label}|{counter:06d}".encode(), time.monotonic())
            records.append(rec)
            task = asyncio.create_task(one(rec))
            flying.add(task)
            task.add_done_callback(flying.discard)
        if flying:
            await asyncio.wait(list(flying))

    async def changes(group: ChaosGroup) -> None:
        """The owner changes its group every group_change_every_s until stopped."""
        steps = itertools.cycle((GroupOp.TITLE_CHANGED, GroupOp.REMOVED, GroupOp.TITLE_CHANGED, GroupOp.ADDED))
        for n in itertools.count(1):
            try:
                await asyncio.wait_for(stop.wait(), cfg.group_change_every_s)
                return
            except TimeoutError:
                pass
            op = next(steps)
            cmid = os.urandom(16)
            if op == GroupOp.TITLE_CHANGED:
                msg = m.GroupTitle(group=group.id, title=f"title {n}", cmid=cmid)
                rec = ChangeRecord(op, (msg.title,), msg)
            else:
                change = m.GroupRemove if op == GroupOp.REMOVED else m.GroupAdd
                rec = ChangeRecord(op, (group.floater,), change(group=group.id, users=[group.floater], cmid=cmid))
            group.changes.append(rec)
            try:
                await until_available(lambda: group.owner.client.request(rec.msg), within=cfg.drain_s)
                rec.acked = time.monotonic()
            except (RequestError, ConnectionError, OSError) as exc:
                if not gave_up.is_set():
                    rec.error = f"{type(exc).__name__}: {exc}"

    load_started = time.monotonic()
    senders = [asyncio.create_task(stream(p.phone.client, p.receiver, p.sender, p.sends, cfg.rate, cfg.window))
               for p in pairs]
    for g in groups:
        senders += [asyncio.create_task(stream(p.phone.client, g.id, f"{p.sender}|{g.id}", g.sends[p.sender],
                                               cfg.group_rate, 1)) for p in g.senders]
        senders.append(asyncio.create_task(changes(g)))
    await asyncio.sleep(cfg.before_s)
    victim_pid = region.pid(victim)
    os.kill(victim_pid, signal.SIGKILL)
    kill_at = time.monotonic()
    await asyncio.sleep(cfg.after_s)
    stop.set()
    load_stopped = time.monotonic()
    _, pending = await asyncio.wait(senders, timeout=cfg.drain_s)
    if pending:
        gave_up.set()
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)

    # The truth: every user's inbox, read afresh.
    inboxes: dict[str, list[m.Msg]] = {}
    for d in [p.phone for p in pairs] + [p.inbox_device for p in pairs]:
        inboxes[d.user] = await read_inbox(region.gate_port, pk, d.user, d.client.token)

    # Give the devices time to hold everything (pushes on their way, syncs).
    deadline = time.monotonic() + cfg.settle_s
    while time.monotonic() < deadline:
        if all(_device_done(d, inboxes[d.user]) for d in devices if d.role != "phone"):
            break
        await asyncio.sleep(0.1)
    # A little longer, so a push that would arrive twice has the chance to.
    await asyncio.sleep(0.3)
    for d in devices:
        d.stayed = d.stayed_connected
        d.client.reconnect = False
    for d in devices:
        await d.client.close()
    return {"pairs": pairs, "groups": groups, "inboxes": inboxes, "kill_at": kill_at,
            "load_started": load_started, "load_stopped": load_stopped, "victim_pid": victim_pid}


async def _create_group(group: ChaosGroup, first_device: dict[str, Device]) -> None:
    """Each member writes to the owner (so the owner may put it in), then the
    owner creates the group (a retried create answers the current group)."""
    owner = group.owner
    hellos = [first_device[u] for u in group.members if u != owner.user]
    oks = await asyncio.gather(*(d.client.send(owner.user, f"hello|{d.user}|{group.id}".encode()) for d in hellos))
    for d, ok in zip(hellos, oks):
        d.sent.add(ok.seq)
    create = m.GroupCreate(group=group.id, title="chaos", members=group.members[1:])
    info = await until_available(lambda: owner.client.request(create))
    assert info.members == group.members, info


async def _register(client: Client) -> None:
    """Register, retried while unavailable (Argon2id hashing of many
    passwords at once on a busy 2-core machine can outlast the gate's request
    timeout; the region lifts the per-user Register limit for these retries). A retry of a Register that took effect
    answers ``Ok`` or ``exists`` (protocol.md, Register: a client must rely on
    neither; ``exists`` when the retry was checked while the first was still
    being committed); the password Login that follows proves the account is
    ours."""
    try:
        await until_available(client.register)
    except RequestError as exc:
        if exc.code != ErrorCode.EXISTS:
            raise
        print(f"register {client.user}: {exc}; the login decides")


async def _login(client: Client) -> None:
    await until_available(client.login)


def _device_done(d: Device, inbox: list[m.Msg]) -> bool:
    held = d.client.messages
    if any(msg.seq not in held for msg in inbox):
        return False
    if d.stayed_connected:
        pushed = {seq for _, seq, _ in d.client.raw_pushes} | d.sent
        return all(msg.seq in pushed for msg in inbox)
    return True


async def read_inbox(port: int, gate_pk: bytes, user: str, token: bytes) -> list[m.Msg]:
    """The user's whole inbox through a fresh connection (Login with a resume
    token, then Sync until ``more`` is false)."""
    conn = await Connection.open("127.0.0.1", port, gate_pk, ping_interval=None)
    try:
        for attempt in range(5):
            try:
                await conn.request(m.Login(user=user, password="", token=token, device=""), timeout=20)
                break
            except RequestError as exc:
                if exc.code != ErrorCode.UNAVAILABLE or attempt == 4:
                    raise
        msgs: list[m.Msg] = []
        since = 0
        while True:
            try:
                batch = await conn.request(m.Sync(since=since, limit=SYNC_LIMIT), timeout=20)
            except RequestError as exc:
                if exc.code != ErrorCode.UNAVAILABLE:
                    raise
                continue
            msgs.extend(batch.msgs)
            if batch.msgs:
                since = batch.msgs[-1].seq
            if not batch.more or not batch.msgs:
                return msgs
    finally:
        conn.close()


# --- the audit (pure) ------------------------------------------------------------------


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def longest_gap(times: list[float]) -> float:
    times = sorted(times)
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def audit(pairs: list[Pair], inboxes: dict[str, list[m.Msg]], kill_at: float, load_started: float,
          load_stopped: float) -> dict:
    acked = failed = unacked = stored_unacked = 0
    lost_recipient: list[str] = []
    lost_sender: list[str] = []
    mismatched: list[str] = []
    doubled: list[str] = []
    order: list[str] = []
    for user, inbox in inboxes.items():
        seen: dict[bytes, int] = {}
        for msg in inbox:
            seen[msg.body] = seen.get(msg.body, 0) + 1
        doubled += [f"{user}: {body.decode(errors='replace')} x{n}" for body, n in seen.items() if n > 1]
        seqs = [msg.seq for msg in inbox]
        if seqs != list(range(1, len(seqs) + 1)):
            mismatched.append(f"{user}: inbox seqs are not 1..{len(seqs)}")

    for pair in pairs:
        to_inbox = {msg.body: msg for msg in inboxes[pair.receiver] if msg.sender == pair.sender}
        from_inbox = {msg.body: msg for msg in inboxes[pair.sender] if msg.to == pair.receiver}
        acked_recs = []
        for rec in pair.sends:
            if rec.ok is None:
                if rec.error is not None:
                    failed += 1
                else:
                    unacked += 1
                if rec.body in to_inbox:
                    stored_unacked += 1
                continue
            acked += 1
            acked_recs.append(rec)
            label = rec.body.decode()
            got = to_inbox.get(rec.body)
            if got is None:
                lost_recipient.append(label)
            elif got.msg_id != rec.ok.msg_id:
                mismatched.append(f"{label}: recipient copy msg_id {got.msg_id} != SendOk {rec.ok.msg_id}")
            mine = from_inbox.get(rec.body)
            if mine is None:
                lost_sender.append(label)
            elif mine.msg_id != rec.ok.msg_id or mine.seq != rec.ok.seq:
                mismatched.append(f"{label}: sender copy (msg_id {mine.msg_id}, seq {mine.seq}) != SendOk "
                                  f"(msg_id {rec.ok.msg_id}, seq {rec.ok.seq})")
        for inbox_name, table in (("recipient", to_inbox), ("sender", from_inbox)):
            prev = None
            for rec in acked_recs:  # in send order
                msg = table.get(rec.body)
                if msg is None:
                    continue
                if prev is not None and msg.seq <= prev[1].seq:
                    order.append(f"{inbox_name} inbox of {pair.index}: {rec.body.decode()} (seq {msg.seq}) "
                                 f"after {prev[0].body.decode()} (seq {prev[1].seq})")
                prev = (rec, msg)

    # Outage: gaps between SendOks while the load ran.
    per_sender, per_sender_before = [], []
    worst_sender = None
    all_acks, all_before = [], []
    for pair in pairs:
        times = [r.acked for r in pair.sends if r.acked is not None]
        before = [t for t in times if t < kill_at]
        all_acks += times
        all_before += before
        gap = longest_gap(times)
        if worst_sender is None or gap > worst_sender[1]:
            worst_sender = (pair.sender, gap)
        per_sender.append(gap)
        per_sender_before.append(longest_gap(before))
    acks_after_kill = {pair.sender: sum(1 for r in pair.sends if r.acked is not None and r.acked > kill_at)
                       for pair in pairs}

    # Pushes to the devices that were online.
    devices = []
    for pair in pairs:
        for d in (pair.inbox_device, pair.laptop):
            devices.append(_device_stats(d, inboxes[d.user]))

    def total(rows, key):
        return sum(r[key] for r in rows)

    def group(rows):
        return {"devices": len(rows), "messages": total(rows, "messages"), "pushed": total(rows, "pushed"),
                "sync_only": total(rows, "sync_only"), "missing": total(rows, "missing"),
                "wrong": total(rows, "wrong"), "pushed_twice": total(rows, "pushed_twice")}

    stayed = [d for d in devices if d["stayed_connected"]]
    moved = [d for d in devices if not d["stayed_connected"]]
    return {
        "acked": acked,
        "failed": failed,
        "unacked": unacked,
        "stored_unacked": stored_unacked,
        "lost": len(lost_recipient) + len(lost_sender),
        "lost_recipient": lost_recipient[:20],
        "lost_sender": lost_sender[:20],
        "doubled": len(doubled),
        "doubled_examples": doubled[:20],
        "mismatched": len(mismatched),
        "mismatched_examples": mismatched[:20],
        "order_violations": len(order),
        "order_examples": order[:20],
        "outage_ms": _ms(max(per_sender, default=0.0)),
        "outage_sender": worst_sender[0] if worst_sender else None,
        "outage_median_sender_ms": _ms(statistics.median(per_sender)) if per_sender else 0,
        "all_senders_gap_ms": _ms(longest_gap(all_acks)),
        "baseline_outage_ms": _ms(max(per_sender_before, default=0.0)),
        "baseline_all_senders_gap_ms": _ms(longest_gap(all_before)),
        "acks_after_kill": acks_after_kill,
        "load_s": round(load_stopped - load_started, 2),
        "pushes_stayed": group(stayed),
        "pushes_reconnected": group(moved),
        "devices": devices,
    }


def group_history(group: str, owner_inbox: list[m.Msg]) -> tuple[list[m.Msg], dict[int, set[str]], list[str]]:
    """The group's entries as its owner's inbox holds them; who must hold
    each one (msg_id -> users), from the events before it; and what is wrong
    with the history itself (events out of msg_id order, version gaps)."""
    history = [msg for msg in owner_inbox if msg.to == group]
    holders: dict[int, set[str]] = {}
    members: set[str] = set()
    problems = []
    version = 0
    for prev, msg in zip([None] + history, history):
        if prev is not None and msg.msg_id <= prev.msg_id:
            problems.append(f"{group}: history entry {msg.msg_id} after {prev.msg_id}")
        event = group_event(msg)
        if event is None:
            holders[msg.msg_id] = set(members)
            continue
        if event.version != version + 1:
            problems.append(f"{group}: event version {event.version} after {version}")
        version = event.version
        before = set(members)
        if event.op == GroupOp.CREATED:
            members = set(event.users)
        elif event.op == GroupOp.ADDED:
            members |= set(event.users)
        elif event.op in (GroupOp.REMOVED, GroupOp.LEFT):
            members -= set(event.users)
        # An event reaches the members after it and whoever it removed.
        holders[msg.msg_id] = before | members
    return history, holders, problems


def audit_groups(groups: list[ChaosGroup], inboxes: dict[str, list[m.Msg]]) -> dict:
    acked = failed = unacked = 0
    lost: list[str] = []
    extra: list[str] = []
    doubled: list[str] = []
    order: list[str] = []
    mismatched: list[str] = []
    events: list[str] = []
    changes = {"acked": 0, "failed": 0, "unacked": 0}
    for group in groups:
        history, holders, problems = group_history(group.id, inboxes[group.owner.user])
        events += problems
        by_id = {msg.msg_id: msg for msg in history}
        # Every inbox against the history.
        for user, inbox in inboxes.items():
            mine = [msg for msg in inbox if msg.to == group.id]
            ids = [msg.msg_id for msg in mine]
            if len(set(ids)) != len(ids):
                doubled.append(f"{user} holds an entry of {group.id} twice")
            if any(b <= a for a, b in itertools.pairwise(ids)):
                order.append(f"{user} holds {group.id} out of msg_id order")
            for msg in mine:
                truth = by_id.get(msg.msg_id)
                if truth is None or user not in holders[msg.msg_id]:
                    extra.append(f"{user}: {msg.msg_id} of {group.id}")
                elif (msg.sender, msg.kind, msg.body) != (truth.sender, truth.kind, truth.body):
                    mismatched.append(f"{user}: {msg.msg_id} of {group.id} differs from the history")
            held = set(ids)
            lost += [f"{user}: {msg_id} of {group.id}" for msg_id, users in holders.items()
                     if user in users and msg_id not in held]
        # The acknowledged Sends: in the history, in send order, the sender's copy as its SendOk said.
        for sender, records in group.sends.items():
            by_body = {msg.body: msg for msg in history if msg.sender == sender and msg.kind != GROUP_EVENT_KIND}
            own = {msg.msg_id: msg for msg in inboxes[sender] if msg.to == group.id}
            prev = None
            for rec in records:
                if rec.ok is None:
                    if rec.error is not None:
                        failed += 1
                    else:
                        unacked += 1
                    continue
                acked += 1
                label = rec.body.decode()
                msg = by_body.get(rec.body)
                if msg is None:
                    lost.append(f"{label} (acked) is not in the group's history")
                    continue
                mine = own.get(rec.ok.msg_id)
                if msg.msg_id != rec.ok.msg_id or mine is None or mine.seq != rec.ok.seq:
                    mismatched.append(f"{label}: SendOk (msg_id {rec.ok.msg_id}, seq {rec.ok.seq}) is not "
                                      f"the sender's copy")
                if prev is not None and msg.msg_id <= prev:
                    order.append(f"{label} stored before an earlier Send of {sender}")
                prev = msg.msg_id
        # The changes: every one acked, and the history's events are exactly them.
        for rec in group.changes:
            key = "acked" if rec.acked is not None else "failed" if rec.error is not None else "unacked"
            changes[key] += 1
        seen = []
        for msg in history:
            event = group_event(msg)
            if event is not None and event.op != GroupOp.CREATED:
                seen.append((GroupOp(event.op), (event.title,) if event.op == GroupOp.TITLE_CHANGED
                             else tuple(event.users)))
        if all(rec.acked is not None for rec in group.changes):
            wanted = [(rec.op, rec.detail) for rec in group.changes]
            if seen != wanted:
                events.append(f"{group.id}: events {seen} are not the changes {wanted}")
    return {
        "group_acked": acked,
        "group_failed": failed,
        "group_unacked": unacked,
        "group_lost": len(lost),
        "group_extra": len(extra),
        "group_doubled": len(doubled),
        "group_order_violations": len(order),
        "group_mismatched": len(mismatched),
        "group_events_mismatch": len(events),
        "group_changes": changes,
        "group_examples": (lost + extra + doubled + order + mismatched + events)[:20],
    }


def _device_stats(d: Device, inbox: list[m.Msg]) -> dict:
    c = d.client
    pushed_seqs: set[int] = set()
    per_conn: dict[tuple[int, int], int] = {}
    for number, seq, _ in c.raw_pushes:
        pushed_seqs.add(seq)
        per_conn[(number, seq)] = per_conn.get((number, seq), 0) + 1
    # What the device should hold: its inbox but what it sent itself.
    expected = {msg.seq: msg for msg in inbox if msg.seq not in d.sent}
    held = c.messages
    wrong = sum(1 for seq, msg in expected.items() if seq in held and held[seq].msg_id != msg.msg_id)
    return {
        "device": d.name,
        "gate": d.gate,
        "stayed_connected": d.stayed_connected,
        "reconnects": c.reconnects,
        "messages": len(expected),
        "pushed": sum(1 for seq in expected if seq in pushed_seqs),
        "sync_only": sum(1 for seq in expected if seq in held and seq not in pushed_seqs),
        "missing": sum(1 for seq in expected if seq not in held),
        "wrong": wrong,
        "pushed_twice": sum(1 for n in per_conn.values() if n > 1),
    }


# --- reporting ------------------------------------------------------------------------


SUMMARY_KEYS = ("victim", "acked", "failed", "unacked", "lost", "doubled", "mismatched", "order_violations",
                "group_acked", "group_lost", "group_extra", "group_doubled", "group_order_violations",
                "group_mismatched", "group_events_mismatch", "group_changes",
                "outage_ms", "outage_median_sender_ms", "all_senders_gap_ms", "baseline_outage_ms",
                "pushes_stayed", "pushes_reconnected", "broker_states")


def report(name: str, result: dict) -> dict:
    """Print the run's numbers and, if SIMZMQ_CHAOS_RESULTS names a directory,
    write the whole result there as NAME.json."""
    summary = {k: result.get(k) for k in SUMMARY_KEYS}
    print(f"chaos {name}: " + json.dumps(summary, sort_keys=True))
    out = os.environ.get("SIMZMQ_CHAOS_RESULTS")
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{name}.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    return summary
