"""A presence report against the row locks of a batch on Postgres, with two
IM workers at once (two connections, one thread each): a batch that writes
to bob (so holds bob's user row from its start) and then applies a report
about bob, crossing another worker's report that takes bob offline (so
holds bob's presence lock and writes his last_seen). One waits for the
other; neither meets a deadlock."""

from __future__ import annotations

import psycopg
import pytest

from simzmq.im import BUSY_BATCHES
from simzmq.presence import NONE, OFFLINE, ONLINE
from simzmq.service import Request
from simzmq.wire import messages as m
from tests.unit.test_group_locks import ORIGIN, T0, InThread, Worker, deadlocks, wait_for_lock_waiters
from tests.unit.test_presence_workers import Gate, notices


@pytest.fixture
def url(pg_cluster):
    url = pg_cluster.create_database()
    setup = Worker(url)
    with setup.store.transaction():
        for user in ("alice", "bob"):
            setup.store.create_user(user, "hash", T0)
    setup.store.close()
    return url


def test_a_batch_writing_to_bob_and_a_report_taking_him_offline_never_deadlock(url):
    one, two = Worker(url), Worker(url)
    gate_a, gate_b = Gate("gate-a"), Gate("gate-b")
    # gate-a has reported (its lease row exists); bob is online on gate-b.
    assert notices(one.batch([gate_a.report({}), gate_b.report({"bob": ONLINE})])) == [("bob", ONLINE)]
    busy_before = BUSY_BATCHES._value.get()
    deadlocks_before = deadlocks(url)
    # Hold gate-a's lease row, so worker one's batch stops in its report,
    # after it has locked bob's row for its Send and before it locks bob's
    # presence.
    with psycopg.connect(url) as holder:
        holder.execute("SELECT 1 FROM presence_gates WHERE gate = 'gate-a' FOR UPDATE")
        both = InThread(one, [Request("alice", ORIGIN, m.Send(to="bob", cmid=b"c1", kind=0, body=b"hi")),
                              gate_a.report({"bob": ONLINE})])
        wait_for_lock_waiters(url, 1, [both])
        # Worker two's report takes bob's presence lock and sets his
        # last_seen: it must not wait for bob's row, which worker one holds.
        offline = InThread(two, [gate_b.report({"bob": NONE})])
        wait_for_lock_waiters(url, 2, [both, offline])
        holder.commit()
    went, (sent, came) = offline.join(), both.join()
    assert deadlocks(url) == deadlocks_before
    assert BUSY_BATCHES._value.get() == busy_before  # no batch ran again
    # Worker two committed first, then worker one saw bob come back.
    assert notices(went) == [("bob", OFFLINE)]
    assert type(sent.reply) is m.SendOk
    assert notices([came]) == [("bob", ONLINE)]
    assert one.store.last_seen(["bob", "alice", "nobody"]) == {"bob": T0, "alice": 0}
    for worker in (one, two):
        worker.store.close()
