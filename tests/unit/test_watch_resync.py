"""Asking again for what every connection watches, paced: the pure pacer
(simzmq/watchresync.py) and the gate's fan-out driving it after a resync."""

from __future__ import annotations

import logging

from simzmq.watchresync import WatchResync
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN
from tests.unit.test_fuzz_gate import make_gate
from tests.unit.test_gate_session import logged_in
from tests.unit.test_presence import pending_of


def watching(table: dict):
    return lambda conn: table.get(conn, ())


def test_at_most_in_flight_go_and_each_answer_lets_the_next_go_in_order():
    pacer = WatchResync(in_flight=2)
    table = {f"c{i}": [f"u{i}"] for i in range(5)}
    assert pacer.add("c0", ["u0"]) is True
    for conn, users in list(table.items())[1:]:
        assert pacer.add(conn, users) is False  # the same resync
    first = pacer.take(256, watching(table))
    assert first == [("c0", ["u0"]), ("c1", ["u1"])]
    assert pacer.take(256, watching(table)) == []  # two unanswered
    pacer.done()
    assert pacer.take(256, watching(table)) == [("c2", ["u2"])]
    pacer.done()
    pacer.done()
    assert pacer.take(256, watching(table)) == [("c3", ["u3"]), ("c4", ["u4"])]
    assert not pacer.finished()  # two still unanswered
    pacer.done()
    pacer.done()
    assert pacer.finished() and not pacer.finished()
    assert (pacer.connections, pacer.requests, pacer.skipped) == (5, 5, 0)


def test_a_connections_users_go_per_request_in_order():
    pacer = WatchResync(in_flight=10)
    users = [f"u{i}" for i in range(7)]
    pacer.add("c", users)
    assert pacer.take(3, watching({"c": users})) == [("c", users[0:3]), ("c", users[3:6]), ("c", users[6:])]


def test_a_connection_closed_before_its_turn_is_skipped_and_unwatched_users_are_not_asked_for():
    pacer = WatchResync(in_flight=1)
    table = {"c0": ["a"], "c1": ["b"], "c2": ["c", "d"]}
    for conn, users in table.items():
        pacer.add(conn, users)
    assert pacer.take(256, watching(table)) == [("c0", ["a"])]
    del table["c1"]          # closed: watches nothing any more
    table["c2"] = ["d"]      # stopped watching c
    pacer.done()
    assert pacer.take(256, watching(table)) == [("c2", ["d"])]
    pacer.done()
    assert pacer.finished()
    assert (pacer.connections, pacer.requests, pacer.skipped) == (3, 2, 1)


def test_every_connection_closed_ends_the_resync_without_a_request():
    pacer = WatchResync()
    pacer.add("c0", ["a"])
    assert pacer.take(256, watching({})) == []
    assert pacer.finished()


def test_queued_again_before_its_turn_a_connection_keeps_its_place_and_gets_the_new_users():
    pacer = WatchResync(in_flight=1)
    table = {"c0": ["a"], "c1": ["b", "c"]}
    pacer.add("c0", ["a"])
    pacer.add("c1", ["b"])
    assert pacer.take(256, watching(table)) == [("c0", ["a"])]
    assert pacer.add("c1", ["c", "b"]) is False
    pacer.done()
    assert pacer.take(256, watching(table)) == [("c1", ["b", "c"])]
    pacer.done()
    assert pacer.finished()
    # A later one is a new resync, counted afresh.
    assert pacer.add("c0", ["a"]) is True and pacer.connections == 1



class CountedId(str):
    """A user id that counts how often it is hashed (each set or dict
    insertion and lookup of it): the pacer's work, without a clock."""

    hashed = 0

    def __hash__(self):
        CountedId.hashed += 1
        return str.__hash__(self)


def test_users_queued_one_resync_at_a_time_cost_each_the_same_not_the_queue_length():
    """A gap in a group's topic resyncs its members one by one
    (gatelink.py: on_resync(user) per member), and each adds that one user
    to every connection watching it while the connections wait their turn:
    adding one must not go over the users already queued."""
    pacer = WatchResync(in_flight=1)
    pacer.add("c0", ["x"])
    assert pacer.take(256, watching({"c0": ["x"]})) == [("c0", ["x"])]  # the one place taken
    users = [CountedId(f"u{i:04d}") for i in range(1000)]
    CountedId.hashed = 0
    for user in users:
        pacer.add("c1", [user])
        assert pacer.take(256, watching({})) == []  # still waiting its turn
    assert CountedId.hashed <= 10 * len(users)  # a few per user, not one per user queued
    pacer.done()
    table = {"c1": set(users)}
    asked = []
    for _ in range(4):  # 1000 users, 256 a request
        (conn, chunk), = pacer.take(256, watching(table))
        asked.extend(chunk)
        pacer.done()
    assert asked == users and pacer.finished()


# -- the gate -------------------------------------------------------------------------------


def watch_answered(gate, client, users):
    _, _, _, cb = client.forwarded(gate, m.Watch(users=users), ref=4)
    cb(BIN.encode(m.PresenceList(states=[m.Presence(user=u) for u in users]), 0))


def test_after_a_failover_the_gate_asks_again_a_few_connections_at_a_time(caplog):
    gate, _ = make_gate()
    gate.fanout.watch_resync.max_in_flight = 2
    clients = [logged_in(gate, i, user=f"user{i}") for i in range(1, 6)]
    for i, c in enumerate(clients):
        watch_answered(gate, c, [f"w{i}"])
    with caplog.at_level(logging.INFO, logger="simzmq.gate"):
        gate.fanout.resync(None)
        asked = pending_of(gate, m.Watch)
        assert [msg.users for _, _, msg, _ in asked] == [["w0"], ["w1"]]
        clients[2].conn.close("test")  # closed before its turn: skipped
        order = [msg.users for _, _, msg, _ in asked]
        while asked:
            assert len(asked) <= 2
            asked.pop(0)[3](None)  # a timeout frees a place as an answer does
            new = pending_of(gate, m.Watch)
            order += [msg.users for _, _, msg, _ in new]
            asked += new
    assert order == [["w0"], ["w1"], ["w3"], ["w4"]]
    lines = [r.getMessage() for r in caplog.records if "presence resync" in r.getMessage()]
    assert len(lines) == 2
    assert "5 connections" in lines[0]
    assert "4 Watch requests" in lines[1] and "1 connection" in lines[1]


def test_a_failing_answer_still_frees_its_place():
    gate, _ = make_gate()
    gate.fanout.watch_resync.max_in_flight = 1
    a, b = logged_in(gate, 1, user="ann"), logged_in(gate, 2, user="bob")
    watch_answered(gate, a, ["w0"])
    watch_answered(gate, b, ["w1"])
    gate.fanout.resync(None)
    ((_, _, msg, cb),) = pending_of(gate, m.Watch)
    assert msg.users == ["w0"]
    cb(b"\xff not a reply")  # undecodable: logged, and the next goes
    ((_, _, msg, _),) = pending_of(gate, m.Watch)
    assert msg.users == ["w1"]
