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
from simzmq.store import StoreBusy, open_store
from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode

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


class Alone(InThread):
    """A request handled alone (IMService.handle) in a worker's own transaction."""

    def __init__(self, worker: Worker, key, msg):
        super().__init__(worker, [Request(key, ORIGIN, msg)])

    def _run(self, worker, requests):
        (req,) = requests
        try:
            with worker.store.transaction():
                self.outcomes = worker.service.handle(req.key, req.origin, req.msg, T0)
        except BaseException as exc:  # the test reports it
            self.error = exc


@pytest.mark.parametrize("msg", [
    m.GroupAdd(group=G, users=["dave"], cmid=b"add"),
    m.GroupRemove(group=G, users=["bob"], cmid=b"rm"),
    m.GroupTitle(group=G, title="New", cmid=b"title"),
    m.Send(to=G, cmid=b"msg", kind=0, body=b"hello all"),
])
def test_a_group_request_retried_while_its_first_attempt_is_open_gets_the_first_answer(url, msg):
    """The retry (same cmid) through another worker waits for the first
    attempt's commit, then finds it: the same answer, nothing stored twice."""
    one, two = Worker(url), Worker(url)
    with one.store.transaction():
        first = one.service.handle("alice", ORIGIN, msg, T0)
        retry = Alone(two, "alice", msg)
        wait_for_lock_waiters(url, 1, [retry])
    again = retry.join()
    assert again.reply == first.reply
    if type(msg) is m.Send:
        assert len(first.notices) == 3 and sorted(again.notices) == sorted(first.notices)  # published again
    info = one.one("alice", m.GroupGet(group=G)).reply
    assert info.version == (1 if type(msg) is m.Send else 2)
    msgs, _ = one.store.sync("carol", 0, 100, 1 << 20)
    assert len([x for x in msgs if x.to == G]) == 2  # the group's creation, then the change or message once
    for worker in (one, two):
        worker.store.close()


def test_two_users_creating_one_new_group_at_once_make_one_group(url):
    """Two creates of the same new id on two workers, with no user in
    common: the later one finds the group made and gets Error{exists}."""
    one, two = Worker(url), Worker(url)
    with one.store.transaction():
        first = one.service.handle("bob", ORIGIN, m.GroupCreate(group="#new", title="Bob's", members=[]), T0)
        second = InThread(two, [Request("carol", ORIGIN, m.GroupCreate(group="#new", title="Carol's", members=[]))])
        wait_for_lock_waiters(url, 1, [second])
    assert first.reply.owner == "bob"
    assert second.join()[0].reply.code == ErrorCode.EXISTS
    assert one.one("bob", m.GroupGet(group="#new")).reply == m.GroupInfo(
        group="#new", title="Bob's", owner="bob", members=["bob"], version=1)
    for worker in (one, two):
        worker.store.close()


def test_a_unique_violation_of_an_idempotency_key_is_busy(url):
    """Two transactions recording the same (actor, cmid): the later one is
    told to run again (StoreBusy), as for a deadlock, not an internal error."""
    one, two = Worker(url), Worker(url)
    with one.store.transaction():
        one.store.record_group_op("alice", b"k", "digest")
        result = {}

        def record():
            try:
                with two.store.transaction():
                    two.store.record_group_op("alice", b"k", "digest")
            except BaseException as exc:
                result["error"] = exc
        thread = threading.Thread(target=record)
        thread.start()
        wait_for_lock_waiters(url, 1)
    thread.join(WAIT_S)
    assert type(result.get("error")) is StoreBusy
    for worker in (one, two):
        worker.store.close()
