"""Group requests on Postgres with two IM workers at once (two connections,
one thread each), at the points where their transactions meet: the lock
order of a batch against a group change, and a group request retried
through another worker while its first attempt is still open."""

from __future__ import annotations

import threading

import psycopg
import pytest

from simzmq.im import BUSY_BATCHES, commit_batch
from simzmq.service import IMService, RegisterWork, Request
from simzmq.store import open_store
from simzmq.wire import messages as m

T0 = 1_764_000_000_000
TTL_MS = 7 * 24 * 3600 * 1000
G = "#team"
ORIGIN = b"o" * 16
WAIT_S = 60  # only a bound on a wait that ends when a lock is taken, never asserted


class Worker:
    """One IM worker: its own connection and service."""

    def __init__(self, url: str):
        self.store = open_store(url)
        self.service = IMService(self.store, TTL_MS, 1 << 20)

    def batch(self, requests, now=T0):
        outcomes, _ = commit_batch(self.store, self.service, requests, now)
        return outcomes

    def one(self, key, msg, now=T0, prepared=None):
        return self.batch([Request(key, ORIGIN, msg, prepared)], now)[0]


class InThread:
    """A worker's batch run in a thread, its outcomes (or error) kept."""

    def __init__(self, worker: Worker, requests):
        self.outcomes = self.error = None
        self.thread = threading.Thread(target=self._run, args=(worker, requests))
        self.thread.start()

    def _run(self, worker, requests):
        try:
            self.outcomes = worker.batch(requests)
        except BaseException as exc:  # the test reports it
            self.error = exc

    def join(self):
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        assert self.error is None, self.error
        return self.outcomes


def wait_for_lock_waiters(url: str, count: int, threads=()) -> None:
    """Wait until `count` backends of this database wait for a lock (or a
    thread already ended, which the test then reports)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(WAIT_S * 100):
            (waiting,) = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'").fetchone()
            if waiting >= count or any(not t.thread.is_alive() for t in threads):
                return
            threading.Event().wait(0.01)
    raise AssertionError(f"{count} lock waiters never showed up")


def deadlocks(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return conn.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]


@pytest.fixture
def url(pg_cluster):
    url = pg_cluster.create_database()
    setup = Worker(url)
    for user in ("alice", "bob", "carol", "dave", "erin"):
        setup.one(user, m.Register(user=user, password="pw"), prepared=RegisterWork("$argon2id$x-" + user, False))
    # bob, carol, dave and erin have written to alice: alice is their contact.
    for user in ("bob", "carol", "dave", "erin"):
        assert isinstance(setup.one(user, m.Send(to="alice", cmid=b"hello", kind=0, body=b"hi")).reply, m.SendOk)
    assert setup.one("alice", m.GroupCreate(group=G, title="Team", members=["bob", "carol"])).reply.version == 1
    setup.store.close()
    return url


def test_a_batch_of_sends_and_a_group_change_lock_in_one_order(url):
    """A batch writing a one-to-one and a group message, and a group change
    adding a member, on two workers at once: whatever either locks first,
    one waits for the other; neither meets a deadlock."""
    one, two = Worker(url), Worker(url)
    busy_before = BUSY_BATCHES._value.get()
    deadlocks_before = deadlocks(url)
    # Hold alice's row (as a third transaction writing to alice would), so
    # the group change stops between the group's row and the members' rows.
    with psycopg.connect(url) as holder:
        holder.execute("SELECT 1 FROM users WHERE id = 'alice' FOR UPDATE")
        change = InThread(two, [Request("alice", ORIGIN, m.GroupAdd(group=G, users=["erin"], cmid=b"add"))])
        wait_for_lock_waiters(url, 1, [change])
        sends = InThread(one, [Request("bob", ORIGIN, m.Send(to="dave", cmid=b"b1", kind=0, body=b"1")),
                               Request("bob", ORIGIN, m.Send(to=G, cmid=b"b2", kind=0, body=b"2"))])
        wait_for_lock_waiters(url, 2, [change, sends])
        holder.commit()
    assert change.join()[0].reply == m.Ok()
    assert [type(o.reply) for o in sends.join()] == [m.SendOk, m.SendOk]
    assert BUSY_BATCHES._value.get() == busy_before
    assert deadlocks(url) == deadlocks_before
    for worker in (one, two):
        worker.store.close()
