"""Presence across IM workers on one store: two workers apply, at the same
moment, reports of two gates about the same users (commit_batch, the
worker's path, each on its own store connection). Each change of a
user's state is published exactly once, by one of them; none is missed,
none repeated, and the two never deadlock. On SQLite the write transactions take turns anyway; on
Postgres the store locks the user's presence (lock_presence) for that."""

from __future__ import annotations

import json
import threading

import pytest

from simzmq.im import BUSY_BATCHES, commit_batch
from simzmq.presence import NONE, OFFLINE, ONLINE
from simzmq.service import IMService, Request
from simzmq.store import open_store
from simzmq.wire import messages as m
from tests.pg import fresh_store_url

T0 = 1_764_000_000_000
LEASE_MS = 30_000
ROUNDS = 60
USERS = [f"u{i}" for i in range(6)]


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    return fresh_store_url(request, tmp_path, request.param)


class Gate:
    """Numbered reports of one gate."""

    def __init__(self, name: str):
        self.name = name
        self.n = 0

    def report(self, states: dict[str, int], ttl_ms: int = LEASE_MS) -> Request:
        """A "snapshot+": these users' local states on this gate (NONE: gone)."""
        self.n += 1
        body = {"gate": self.name, "n": self.n, "op": "snapshot+", "ttl_ms": ttl_ms, "states": states,
                "users": {u: ["00"] for u, s in states.items() if s != NONE}}
        return Request(self.name, b"", m.PresenceReport(report=json.dumps(body).encode()))


def notices(outcomes) -> list[tuple[str, int]]:
    found = []
    for outcome in outcomes:
        assert type(outcome.reply) is m.Ok, outcome.reply
        found += [(n.user, n.msg.state.state) for n in outcome.notices if type(n.msg) is m.PresenceNotice]
    return found


def at_once(workers, batches, now_ms: int) -> list[tuple[str, int]]:
    """Each worker (store, service) commits its batch, all starting together;
    every PresenceNotice they would publish."""
    start = threading.Barrier(len(workers))
    results: list = [None] * len(workers)

    def run(i):
        store, service = workers[i]
        try:
            start.wait(10)
            results[i] = commit_batch(store, service, batches[i], now_ms)[0]
        except BaseException as exc:  # the test thread reports it
            results[i] = exc

    busy_before = BUSY_BATCHES._value.get()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    found = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        found += notices(result)
    # They waited for each other, never in a cycle (no batch ran again).
    assert BUSY_BATCHES._value.get() == busy_before
    return sorted(found)


@pytest.fixture
def workers(store_url):
    """Two workers' (store connection, IMService) on one store holding USERS."""
    pairs = [(store, IMService(store, 60_000, 1 << 20)) for store in (open_store(store_url) for _ in range(2))]
    try:
        with pairs[0][0].transaction():
            for user in USERS:
                pairs[0][0].create_user(user, "hash", T0)
        yield pairs
    finally:
        for store, _ in pairs:
            store.close()


@pytest.mark.timeout(240)
def test_reports_of_two_gates_about_the_same_users_at_once_notify_each_change_once(workers):
    a, b = Gate("gate-a"), Gate("gate-b")
    now = T0
    for _ in range(ROUNDS):
        # Both gates' first sessions of the users at once: online, once.
        now += 1
        came = {u: ONLINE for u in USERS}
        assert at_once(workers, [[a.report(came)], [b.report(came)]], now) == [(u, ONLINE) for u in USERS]
        # Both gates' last sessions end at once: offline, once.
        now += 1
        went = {u: NONE for u in USERS}
        assert at_once(workers, [[a.report(went)], [b.report(went)]], now) == [(u, OFFLINE) for u in USERS]


@pytest.mark.timeout(240)
def test_two_workers_dropping_the_same_lapsed_gate_notify_its_users_once(workers):
    (store, service), _ = workers
    dead, a, b = Gate("gate-dead"), Gate("gate-a"), Gate("gate-b")
    now = T0
    for _ in range(ROUNDS // 2):
        # A gate with the users online dies (its lease is 1 ms); the next
        # reports of the two live gates, at once, each find it lapsed.
        now += 10
        came = commit_batch(store, service, [dead.report({u: ONLINE for u in USERS}, ttl_ms=1)], now)[0]
        assert notices(came) == [(u, ONLINE) for u in USERS]
        now += 10
        assert at_once(workers, [[a.report({})], [b.report({})]], now) == [(u, OFFLINE) for u in USERS]


def test_dropping_lapsed_gates_spares_one_renewed_meanwhile(store_url):
    store = open_store(store_url)
    try:
        with store.transaction():
            assert store.renew_presence_gate("g1", 1, T0 + 10)
            assert store.renew_presence_gate("g2", 1, T0 + 10)
            store.save_presence("g1", {"ann": ONLINE})
            store.save_presence("g2", {"bob": ONLINE})
        assert store.expired_presence_gates(T0 + 10) == ["g1", "g2"]
        # g1 reported again after another worker found both lapsed.
        with store.transaction():
            assert store.renew_presence_gate("g1", 2, T0 + 100)
        with store.transaction():
            store.drop_presence_gates(["g1", "g2"], expired_at=T0 + 10)
        assert store.gate_presence("g1") == {"ann": ONLINE}
        assert store.gate_presence("g2") == {}
        assert store.expired_presence_gates(T0 + 10) == []
        # Without expired_at (a gate's "bye"): dropped whatever its lease.
        with store.transaction():
            store.drop_presence_gates(["g1"])
        assert store.presence_of(["ann"], None) == {}
    finally:
        store.close()
