"""Several IM workers on one Postgres database, each running whole batches
(commit_batch) at the same time over the same few users: Sends in both
directions, Reads, Syncs, and the same cmid sent through two workers (a
retry after a failover). Every batch locks its users' rows in one order,
so the database never sees a deadlock; every inbox stays gapless; every
(sender, cmid) is stored once; seq order and msg_id order agree."""

from __future__ import annotations

import random
import threading

import psycopg
import pytest

from simzmq.im import BUSY_BATCHES, commit_batch
from simzmq.service import IMService, Request
from simzmq.store import open_store
from simzmq.wire import messages as m

T0 = 1_700_000_000_000
USERS = ["ann", "bob", "cat", "dan", "eve"]
WORKERS = 4
BATCHES = 40
PER_BATCH = 12


def _worker(url: str, index: int, seed: int, errors: list, acked: list) -> None:
    rng = random.Random(seed)
    store = open_store(url)
    service = IMService(store, 60_000, 1 << 20)
    try:
        for b in range(BATCHES):
            requests = []
            for k in range(PER_BATCH):
                sender = rng.choice(USERS)
                roll = rng.random()
                if roll < 0.35:
                    # The same Send (sender, cmid, content) through every
                    # worker, as a client retrying after a failover does.
                    same = random.Random(b * 1000 + k)
                    sender, to = same.choice(USERS), same.choice(USERS)
                    cmid = b"shared-%d-%d" % (b, k)
                    requests.append(Request(sender, b"", m.Send(to=to, cmid=cmid, kind=0, body=cmid)))
                elif roll < 0.7:
                    cmid = b"w%d-%d-%d" % (index, b, k)
                    requests.append(Request(sender, b"", m.Send(to=rng.choice(USERS), cmid=cmid, kind=0, body=cmid)))
                elif roll < 0.85:
                    requests.append(Request(sender, b"", m.Sync(since=rng.randrange(0, 50), limit=10)))
                else:
                    peer = rng.choice(USERS)
                    # A msg_id of this conversation or not: either way no write
                    # may deadlock with the others.
                    requests.append(Request(sender, b"", m.Read(peer=peer, msg_id=rng.randrange(1, 400))))
            outcomes, _ = commit_batch(store, service, requests, T0 + b)
            for req, outcome in zip(requests, outcomes):
                if isinstance(outcome.reply, m.SendOk):
                    acked.append((req.key, bytes(req.msg.cmid), outcome.reply.msg_id))
                elif isinstance(outcome.reply, m.Error) and type(req.msg) is m.Send:
                    errors.append((req, outcome.reply))
    except BaseException as exc:  # the main thread reports it
        errors.append(exc)
    finally:
        store.close()


@pytest.mark.timeout(240)
def test_workers_on_one_database_never_deadlock_and_keep_inboxes_gapless(pg_cluster):
    url = pg_cluster.create_database()
    setup = open_store(url)
    with setup.transaction():
        for user in USERS:
            setup.create_user(user, "hash", T0)
    errors: list = []
    acked: list = []
    busy_before = BUSY_BATCHES._value.get()
    threads = [threading.Thread(target=_worker, args=(url, i, 1000 + i, errors, acked)) for i in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(200)
    assert not errors
    # Not one batch had to be run again for a deadlock.
    assert BUSY_BATCHES._value.get() == busy_before
    try:
        # Each acknowledged (sender, cmid) has one msg_id, whichever worker answered.
        ids: dict = {}
        for sender, cmid, msg_id in acked:
            assert ids.setdefault((sender, cmid), msg_id) == msg_id
        stored = 0
        for user in USERS:
            msgs, more = setup.sync(user, 0, 500, 10**9)
            assert not more
            assert [x.seq for x in msgs] == list(range(1, len(msgs) + 1))
            assert [x.msg_id for x in msgs] == sorted(x.msg_id for x in msgs)
            assert setup.max_seq(user) == len(msgs)
            stored += len({x.msg_id for x in msgs})
        with psycopg.connect(url) as conn:
            (count,) = conn.execute("SELECT count(*) FROM messages").fetchone()
            (distinct,) = conn.execute("SELECT count(DISTINCT (sender, cmid)) FROM messages").fetchone()
            (deadlocks,) = conn.execute(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()
        assert count == distinct == len(ids)
        assert deadlocks == 0
    finally:
        setup.close()
