"""Two regions, each with its own broker pair, worker and gate, sharing one
Postgres database and federated (simzmq/federation.py): a user in region a
and a user in region b talk, with pushes and read receipts both ways, and
no message or read mark is lost or doubled while the active broker of
either region is killed."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from simzmq import keys as keys_mod
from simzmq.client import Client
from simzmq.federation import exchange_keys
from simzmq.limits import LimitsConfig
from simzmq.wire import messages as m
from tests.chaos import active_broker
from tests.region import Region, until_available

pytestmark = pytest.mark.timeout(400)


def notify_outs(region: Region) -> list[str]:
    return [region.env[f"SIMZMQ_BROKER_{role}_NOTIFY_OUT"] for role in ("PRIMARY", "BACKUP")]


@pytest.fixture(scope="module")
def regions(tmp_path_factory, pg_cluster):
    dsn = pg_cluster.create_database()
    root = tmp_path_factory.mktemp("regions")
    # A loaded machine must not make a broker take a live worker for dead.
    slow = {"SIMZMQ_BROKER_HEARTBEAT_MS": "1000", "SIMZMQ_GATE_REQUEST_TIMEOUT_S": "20"}
    a = Region(root / "a", store=dsn, extra_env=dict(slow, SIMZMQ_REGION_NAME="a"))
    b = Region(root / "b", store=dsn, extra_env=dict(slow, SIMZMQ_REGION_NAME="b"))
    for r in (a, b):
        r.data_dir.mkdir(parents=True)
        keys_mod.ensure_bus_keys(r.data_dir)
    exchange_keys(a.data_dir, "a", b.data_dir, "b")
    for _ in range(3):
        # Each region is told the other's notify-out endpoints before it
        # starts; a start that found a port taken moved to new ones
        # (Region.start), which the other was not told: then both start again.
        planned = notify_outs(a) + notify_outs(b)
        a.env["SIMZMQ_REGION_PEERS"] = ",".join("b@" + ep for ep in notify_outs(b))
        b.env["SIMZMQ_REGION_PEERS"] = ",".join("a@" + ep for ep in notify_outs(a))
        a.start(timeout=120)
        try:
            b.start(timeout=120)
        except BaseException:
            a.stop()
            raise
        if notify_outs(a) + notify_outs(b) == planned:
            break
        b.stop()
        a.stop()
    else:
        pytest.fail("the regions kept moving to other ports")
    yield a, b
    b.stop()
    a.stop()


class Inbox:
    """Every push a client gets, kept in order."""

    def __init__(self, client: Client):
        self.client = client
        self.new: list[m.Msg] = []
        self.reads: list[m.ReadNotice] = []
        self.task = asyncio.ensure_future(self._collect())

    async def _collect(self):
        while True:
            ev = await self.client.events.get()
            if isinstance(ev, m.NewMsg):
                self.new.append(ev.msg)
            elif isinstance(ev, m.ReadNotice):
                self.reads.append(ev)

    async def until(self, predicate, timeout=60.0):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            assert loop.time() < deadline, "not delivered in time"
            await asyncio.sleep(0.05)

    def bodies_from(self, sender: str) -> list[bytes]:
        return [bytes(x.body) for x in self.new if x.sender == sender]


async def login(region: Region, name: str) -> Client:
    c = Client("127.0.0.1", region.gate_port, region.gate_pk, name, password="pw-" + name)
    await c.register()
    await c.login()
    return c


def test_users_in_two_regions_talk_with_pushes_and_receipts_both_ways(regions):
    a, b = regions
    tag = os.getpid()

    async def main():
        ann = await login(a, f"ann-{tag}")
        bob = await login(b, f"bob-{tag}")
        ann_in, bob_in = Inbox(ann), Inbox(bob)
        sent = await ann.send(bob.user, b"from a")
        await bob_in.until(lambda: bob_in.bodies_from(ann.user) == [b"from a"])
        await bob.read(ann.user, sent.msg_id)
        await ann_in.until(lambda: any(r.reader == bob.user and r.msg_id == sent.msg_id for r in ann_in.reads))
        reply = await bob.send(ann.user, b"from b")
        await ann_in.until(lambda: ann_in.bodies_from(bob.user) == [b"from b"])
        await ann.read(bob.user, reply.msg_id)
        await bob_in.until(lambda: any(r.reader == ann.user and r.msg_id == reply.msg_id for r in bob_in.reads))
        for c in (ann, bob):
            await c.close()
    asyncio.run(asyncio.wait_for(main(), 120))


def test_presence_and_typing_cross_regions(regions):
    """Presence notices and typing ride the users' topics, so federation
    carries them; the states live in the shared store."""
    a, b = regions
    tag = os.getpid()

    async def next_of(client: Client, want):
        while True:
            event = await asyncio.wait_for(client.events.get(), 60)
            if want(event):
                return event

    async def main():
        cat = await login(a, f"cat-{tag}")
        dan = await login(b, f"dan-{tag}")
        await dan.send(cat.user, b"hi")
        await cat.send(dan.user, b"hi")
        assert [p.state for p in await cat.watch([dan.user])] == [m.PresenceState.ONLINE]
        await dan.set_presence(m.PresenceState.AWAY)
        notice = await next_of(cat, lambda e: type(e) is m.PresenceNotice and e.state.user == dan.user)
        assert notice.state.state == m.PresenceState.AWAY
        await cat.typing(dan.user, True)
        typing = await next_of(dan, lambda e: type(e) is m.TypingNotice)
        assert typing == m.TypingNotice(user=cat.user, peer=dan.user, typing=True)
        await dan.close()
        notice = await next_of(cat, lambda e: type(e) is m.PresenceNotice and e.state.user == dan.user)
        assert notice.state.state == m.PresenceState.OFFLINE and notice.state.last_seen_ms > 0
        await cat.close()
    asyncio.run(asyncio.wait_for(main(), 120))


def test_typing_again_crosses_regions_each_time(regions):
    """start, stop, start: the second start is the same bytes as the first
    (a TypingNotice carries no time), and still crosses."""
    a, b = regions
    tag = os.getpid()
    # The gate passes on one notice per sender and peer a typing_peer_interval_s.
    interval = LimitsConfig().typing_peer_interval_s

    async def main():
        eve = await login(a, f"eve-{tag}")
        fay = await login(b, f"fay-{tag}")
        await fay.send(eve.user, b"hi")
        await eve.send(fay.user, b"hi")
        for typing in (True, False, True):
            await asyncio.sleep(interval + 0.1)
            await eve.typing(fay.user, typing)
            while True:
                event = await asyncio.wait_for(fay.events.get(), 60)
                if type(event) is m.TypingNotice:
                    break
            assert event == m.TypingNotice(user=eve.user, peer=fay.user, typing=typing)
        for c in (eve, fay):
            await c.close()
    asyncio.run(asyncio.wait_for(main(), 120))


def marks_heard(inbox: Inbox, reader: str) -> list[int]:
    """The read marks of ``reader`` that reached this client as ReadNotices, in order."""
    return [r.msg_id for r in inbox.reads if r.reader == reader]


@pytest.mark.parametrize("victim", ["a", "b"])
def test_messages_and_receipts_cross_while_a_broker_of_either_region_fails_over(regions, victim):
    """ann (region a) and bob (region b) write to each other and read what
    they get as it comes, while the active broker of one region is killed:
    every message arrives once and in order, every read mark is stored, and
    the ReadNotices that arrive are marks really set, each once, in order (one
    lost in the failover is not replayed: Convs shows the mark, which is
    checked), and the last one, set after the failover, arrives."""
    a, b = regions
    tag = f"{os.getpid()}{victim}"
    count = 60
    region = a if victim == "a" else b
    killed = active_broker(region)

    async def main():
        ann = await login(a, f"ann-{tag}")
        bob = await login(b, f"bob-{tag}")
        ann_in, bob_in = Inbox(ann), Inbox(bob)
        marks: dict[str, list[int]] = {ann.user: [], bob.user: []}

        async def stream(client: Client, to: str, prefix: bytes):
            for i in range(count):
                await client.send(to, b"%s%d" % (prefix, i))
                await asyncio.sleep(0.02)

        async def read_along(reader: Client, inbox: Inbox, peer: str):
            # Raise the read mark to the newest message from `peer` as they
            # arrive, all but the last (read once the failover is over).
            mine = marks[reader.user]
            while True:
                got = [x.msg_id for x in inbox.new if x.sender == peer]
                if len(got) >= count:
                    return
                if got and (not mine or max(got) > mine[-1]):
                    newest = max(got)
                    await until_available(lambda: reader.read(peer, newest))
                    mine.append(newest)
                await asyncio.sleep(0.1)

        both = asyncio.gather(stream(ann, bob.user, b"a"), stream(bob, ann.user, b"b"),
                              read_along(ann, ann_in, bob.user), read_along(bob, bob_in, ann.user))
        await asyncio.sleep(0.4)
        os.kill(region.pid("broker-" + killed), signal.SIGKILL)
        await asyncio.wait_for(both, 200)
        # Every message arrives (pushed, or caught up after a lost push),
        # each once, in the order sent.
        assert bob_in.bodies_from(ann.user) == [b"a%d" % i for i in range(count)]
        assert ann_in.bodies_from(bob.user) == [b"b%d" % i for i in range(count)]
        for c in (ann, bob):
            await c.sync()
            assert c.max_contiguous_seq == 2 * count == len(c.messages)
        # The last read of each, after the failover: its ReadNotice crosses.
        for reader, inbox, peer in ((ann, ann_in, bob.user), (bob, bob_in, ann.user)):
            last = max(x.msg_id for x in inbox.new if x.sender == peer)
            await until_available(lambda: reader.read(peer, last))
            marks[reader.user].append(last)
        await bob_in.until(lambda: marks_heard(bob_in, ann.user)[-1:] == marks[ann.user][-1:], 60)
        await ann_in.until(lambda: marks_heard(ann_in, bob.user)[-1:] == marks[bob.user][-1:], 60)
        for reader, inbox in ((ann, bob_in), (bob, ann_in)):
            heard = marks_heard(inbox, reader.user)
            assert heard == sorted(set(heard)), f"{reader.user}'s marks doubled or out of order: {heard}"
            assert set(heard) <= set(marks[reader.user]), (heard, marks[reader.user])
            assert all(r.peer == inbox.client.user for r in inbox.reads if r.reader == reader.user)
        # The store holds every mark: each side sees the other's last one,
        # and has nothing unread.
        for client, peer in ((ann, bob.user), (bob, ann.user)):
            conv = {x.peer: x for x in await until_available(client.convs)}[peer]
            assert conv.peer_read == marks[peer][-1] and conv.unread == 0, conv
        for c in (ann, bob):
            await c.close()
    asyncio.run(asyncio.wait_for(main(), 350))
    # It was a failover: the region's gate now uses the other broker.
    status, health = region.http_get("/v1/health")
    assert status == 200 and health["broker"] != killed and health.get("failovers", 0) >= 1, health
