"""Many IM workers on one Postgres, writing the same inboxes at once, through
real gates: every acknowledged message is stored once, each inbox's seqs have
no gap, each sender's messages keep their order, and a worker killed
mid-traffic loses nothing (its requests, retried with the same cmid, are
answered by another worker from what the first committed).

Users are routed to workers by id, so many senders to one recipient means
several workers appending to that recipient's inbox in the same instant.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

from simzmq.client import Client, RequestError
from simzmq.wire.messages import ErrorCode
from tests.region import Region

pytestmark = pytest.mark.timeout(600)

WORKERS = 4
GATES = 2


@pytest.fixture(scope="module")
def region(tmp_path_factory, pg_cluster):
    # Four workers, two brokers, two gates and Postgres on a small shared
    # machine: a worker may be off the CPU for a while, so the broker takes
    # it for dead only after 3 s, and the gate waits longer for an answer.
    r = Region(tmp_path_factory.mktemp("contention") / "data", workers=WORKERS, gates=GATES,
               store=pg_cluster.create_database(),
               extra_env={"SIMZMQ_BROKER_HEARTBEAT_MS": "1000", "SIMZMQ_GATE_REQUEST_TIMEOUT_S": "20"})
    r.start(timeout=120)
    yield r
    r.stop()


async def clients(region, names: list[str]) -> list[Client]:
    """Registered and logged in, spread over the gates. Password work
    (Argon2id) for a hundred users at once can outlast the gate's request
    timeout on a busy machine: a few at a time, retried while the back end
    answers unavailable (exists: an earlier attempt did take effect)."""
    out = [Client("127.0.0.1", region.gate_port + i % GATES, region.gate_pk, name, password="pw-" + name)
           for i, name in enumerate(names)]
    gate = asyncio.Semaphore(8)

    async def retried(call):
        async with gate:
            for attempt in range(10):
                try:
                    await call()
                    return
                except RequestError as exc:
                    if exc.code == ErrorCode.EXISTS:
                        return
                    if exc.code != ErrorCode.UNAVAILABLE or attempt == 9:
                        raise
    await asyncio.gather(*(retried(c.register) for c in out))
    await asyncio.gather(*(retried(c.login) for c in out))
    return out


async def send_all(client: Client, to_bodies: list[tuple[str, bytes]]):
    """Pipelined sends (kept in order by the client); their SendOks."""
    return await asyncio.gather(*(client.send(to, body) for to, body in to_bodies))


def check_inbox(owner: Client, expected: dict[tuple[str, bytes], int]) -> None:
    """`owner`'s synced inbox holds exactly the acknowledged messages
    `expected` ((sender, body) -> msg_id), once each, seqs 1..n, and each
    sender's messages in the order they were sent (bodies end in their index)."""
    msgs = owner.messages
    assert sorted(msgs) == list(range(1, len(expected) + 1)), f"{owner.user}: seqs not gapless"
    stored = {(msg.sender, bytes(msg.body)): msg.msg_id for msg in msgs.values()}
    assert len(stored) == len(msgs), f"{owner.user}: a message stored twice"
    assert stored == expected
    last_index: dict[tuple[str, str], int] = {}
    for seq in sorted(msgs):
        msg = msgs[seq]
        index = int(bytes(msg.body).rsplit(b"#", 1)[1])
        pair = (msg.sender, msg.to)
        assert index > last_index.get(pair, -1), f"{pair}: out of order at seq {seq}"
        last_index[pair] = index


def test_fanin_of_100_senders_over_4_workers_with_a_worker_killed(region):
    senders, per_sender = 100, 5
    tag = os.getpid()
    sink_name = f"sink-{tag}"

    async def main():
        (sink,) = await clients(region, [sink_name])
        users = await clients(region, [f"fan{i}-{tag}" for i in range(senders)])
        jobs = [asyncio.ensure_future(send_all(c, [(sink_name, b"%s#%d" % (c.user.encode(), k))
                                                   for k in range(per_sender)]))
                for c in users]
        await asyncio.sleep(0.2)
        # A worker dies mid-traffic: the supervisor restarts it, its users go
        # to the others meanwhile, and their retried cmids must not double.
        os.kill(region.pid("im-2"), signal.SIGKILL)
        oks = await asyncio.wait_for(asyncio.gather(*jobs), 300)
        expected = {}
        for c, sent in zip(users, oks):
            assert [ok.seq for ok in sent] == list(range(1, per_sender + 1)), f"{c.user}: sender seqs"
            for k, ok in enumerate(sent):
                expected[(c.user, b"%s#%d" % (c.user.encode(), k))] = ok.msg_id
        await sink.sync()
        check_inbox(sink, expected)
        for c in users + [sink]:
            await c.close()
    asyncio.run(asyncio.wait_for(main(), 500))


def test_random_pairs_over_4_workers(region):
    count, per_user = 40, 10
    tag = os.getpid()
    rng = random.Random(tag)

    async def main():
        names = [f"pair{i}-{tag}" for i in range(count)]
        users = await clients(region, names)
        plans = [[(rng.choice([n for n in names if n != c.user]), b"%s#%d" % (c.user.encode(), k))
                  for k in range(per_user)] for c in users]
        oks = await asyncio.wait_for(asyncio.gather(*(send_all(c, plan) for c, plan in zip(users, plans))), 300)
        inbox: dict[str, dict] = {n: {} for n in names}
        for c, plan, sent in zip(users, plans, oks):
            for (to, body), ok in zip(plan, sent):
                inbox[c.user][(c.user, body)] = ok.msg_id
                inbox[to][(c.user, body)] = ok.msg_id
        for c in users:
            await c.sync()
            check_inbox(c, inbox[c.user])
        for c in users:
            await c.close()
    asyncio.run(asyncio.wait_for(main(), 500))
