"""Presence and typing (protocol.md section 7): the pure rules of
simzmq/presence.py, and the IM service's side over a real in-memory SQLite
store, time passed in."""

from __future__ import annotations

import json

import pytest

from simzmq import presence as pr
from simzmq.presence import AWAY, NONE, OFFLINE, ONLINE, UNKNOWN, GatePresence, TypingLimiter
from simzmq.push.policy import Span
from simzmq.service import IMService, RegisterWork
from simzmq.store import open_store
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN
from simzmq.wire.messages import ErrorCode
from tests.unit.test_fuzz_gate import make_gate
from tests.unit.test_gate_session import logged_in, send

T0 = 1_764_000_000_000
TTL_MS = 7 * 24 * 3600 * 1000
LEASE_MS = 30_000


# -- the rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("states, user_state", [
    ((), OFFLINE),
    ((OFFLINE,), OFFLINE),
    ((AWAY,), AWAY),
    ((ONLINE,), ONLINE),
    ((OFFLINE, AWAY), AWAY),
    ((AWAY, ONLINE, OFFLINE), ONLINE),
    ((OFFLINE, OFFLINE), OFFLINE),
])
def test_combine(states, user_state):
    assert pr.combine(states) == user_state


def test_last_seen_advances_only_while_online_or_away():
    assert [pr.shown_last_seen(s, 5, 9) for s in (OFFLINE, ONLINE, AWAY, UNKNOWN)] == [5, 9, 9, 5]


def test_local_changes_of_a_partial_a_complete_and_a_spanning_report():
    current = {"a": ONLINE, "b": AWAY, "c": OFFLINE}
    assert pr.local_changes(current, {"a": ONLINE, "b": ONLINE}, None) == {"b": ONLINE}
    assert pr.local_changes(current, {"a": ONLINE, "d": AWAY}, Span()) == {"d": AWAY, "b": NONE, "c": NONE}
    # Complete from "b" up to "c" only: "c" is not its to drop.
    assert pr.local_changes(current, {"bb": AWAY}, Span("b", "c")) == {"bb": AWAY, "b": NONE}


def test_report_timing_tells_watchers_within_the_idle_timeout():
    interval, lease_ms = pr.report_timing(90, None)
    assert interval == 15 and lease_ms == 45_000
    assert lease_ms / 1000 + interval < 90
    assert pr.report_timing(90, 5.0) == (5.0, 15_000)  # the push service's interval, when shorter


# A session's transitions: (state before, event) -> (local state after, reported?)
SESSION_TABLE = [
    # one session
    ([], ("login", "s1"), ONLINE, True),
    ([("s1", ONLINE)], ("set", "s1", AWAY), AWAY, True),
    ([("s1", ONLINE)], ("set", "s1", ONLINE), ONLINE, False),
    ([("s1", AWAY)], ("set", "s1", OFFLINE), OFFLINE, True),
    ([("s1", OFFLINE)], ("end", "s1"), NONE, True),
    # two sessions: the best one counts
    ([("s1", ONLINE)], ("login", "s2"), ONLINE, False),
    ([("s1", ONLINE), ("s2", AWAY)], ("set", "s1", OFFLINE), AWAY, True),
    ([("s1", OFFLINE), ("s2", AWAY)], ("end", "s2"), OFFLINE, True),
    ([("s1", OFFLINE), ("s2", OFFLINE)], ("end", "s2"), OFFLINE, False),
    ([("s1", ONLINE), ("s2", ONLINE)], ("end", "s1"), ONLINE, False),
]


@pytest.mark.parametrize("sessions, event, local, reported", SESSION_TABLE)
def test_session_transitions(sessions, event, local, reported):
    gp = GatePresence(256, 1024)
    for conn, state in sessions:
        gp.set_session(conn, "u", state)
    state = {"login": ONLINE, "end": NONE}.get(event[0], event[-1])
    changed = gp.set_session(event[1], "u", state)
    assert gp.local("u") == local
    assert (changed is not None) == reported and (changed is None or changed == local)
    if local == NONE:
        assert "u" not in gp.states


def test_watch_limits_count_each_id_once():
    gp = GatePresence(3, 5)
    assert gp.over_limit("c", ["a", "a", "b", "c"]) is None
    assert "3 ids" in gp.over_limit("c", ["a", "b", "c", "d"])
    gp.watch("c", ["a", "b", "c"])
    assert gp.over_limit("c", ["a", "b", "d"]) is None
    gp.watch("c", ["d", "e"])
    assert "5 ids" in gp.over_limit("c", ["f"])
    assert gp.over_limit("c", ["a", "e"]) is None  # already watched: not counted again
    assert gp.over_limit("other", ["f"]) is None  # per connection


def test_watches_visibility_and_notice_targets():
    gp = GatePresence(256, 1024)
    added, first = gp.watch("c1", ["bob", "carol", "bob"])
    assert added == ["bob", "carol"] and first == ["bob", "carol"]
    added, first = gp.watch("c2", ["bob"])
    assert added == ["bob"] and first == []
    # Not answered yet: nobody sees anyone.
    assert gp.notice_targets("bob") == []
    kept = gp.answered("c1", [m.Presence(user="bob", state=ONLINE), m.Presence(user="carol"),
                              m.Presence(user="zed", state=ONLINE)])
    assert [p.user for p in kept] == ["bob", "carol"]  # zed is not watched by c1
    assert gp.notice_targets("bob") == ["c1"]
    assert gp.notice_targets("carol") == []
    assert gp.hidden_from("c1") == {"carol"}
    assert gp.watchers_of(["bob"]) == {"c1": ["bob"], "c2": ["bob"]}
    # Ending: the ids no connection here watches any more.
    assert gp.unwatch("c1", None) == ["carol"]
    assert gp.unwatch("c2", None) == ["bob"]
    assert gp.watching == {} and gp.watchers == {}
    assert gp.unwatch("c3", None) == []


def test_an_empty_watch_registers_nothing():
    gp = GatePresence(256, 1024)
    assert gp.watch("c", []) == ([], [])
    assert gp.watching == {}


def test_typing_limiter_one_per_peer_per_interval_and_a_sender_bucket():
    t = TypingLimiter(peer_interval_s=1.0, per_s=2.0, burst=3)
    assert t.allow("a", "b", 0.0) is None
    assert t.allow("a", "b", 0.5) == "typing_peer"
    assert t.allow("a", "b", 1.0) is None
    assert t.allow("x", "b", 1.0) is None  # another sender
    assert t.allow("a", "c", 1.0) is None
    assert t.allow("a", "d", 1.0) is None
    assert t.allow("a", "e", 1.0) == "typing_sender"  # the burst of three spent at once
    assert t.allow("a", "e", 1.5) is None  # one token back after half a second
    assert t.prune(100.0) == 0


# -- the worker's side ------------------------------------------------------------------------

@pytest.fixture
def svc():
    store = open_store("sqlite://:memory:")
    service = IMService(store, TTL_MS, 1 << 20)
    for user in ("alice", "bob", "carol", "dave"):
        call(service, user, m.Register(user=user, password="pw"), prepared=RegisterWork("$argon2id$x-" + user, False))
    # bob and carol have written to alice: alice may see them. alice wrote to bob.
    for sender, to in (("bob", "alice"), ("carol", "alice"), ("alice", "bob")):
        call(service, sender, m.Send(to=to, cmid=f"{sender}-{to}".encode(), kind=0, body=b"hi"))
    yield service
    store.close()


def call(service, key, msg, now=T0, origin=b"o" * 16, prepared=None):
    with service.store.transaction():
        return service.handle(key, origin, msg, now, prepared)


_numbers: dict[str, int] = {}


def report(service, gate, op, now=T0, **fields):
    n = _numbers[gate] = _numbers.get(gate, 0) + 1
    body = {"gate": gate, "n": n, "op": op, "ttl_ms": LEASE_MS, **fields}
    if op in ("start", "end"):
        body.setdefault("session", "00")
    if op in ("snapshot", "snapshot+"):
        body.setdefault("users", {u: ["00"] for u in body.get("states", {})})
    return call(service, gate, m.PresenceReport(report=json.dumps(body).encode()), now)


def noticed(outcome) -> dict[str, tuple[int, int]]:
    return {n.user: (n.msg.state.state, n.msg.state.last_seen_ms) for n in outcome.notices
            if type(n.msg) is m.PresenceNotice}


def watch(service, viewer, users, now=T0):
    return {p.user: (p.state, p.last_seen_ms) for p in call(service, viewer, m.Watch(users=users), now).reply.states}


def test_presence_only_to_oneself_and_ones_contacts(svc):
    assert noticed(report(svc, "g1", "start", user="bob", state=ONLINE)) == {"bob": (ONLINE, T0)}
    assert watch(svc, "alice", ["bob", "alice", "carol", "dave", "nobody", "#team"]) == {
        "bob": (ONLINE, T0), "alice": (OFFLINE, 0), "carol": (OFFLINE, 0),
        "dave": (UNKNOWN, 0), "nobody": (UNKNOWN, 0), "#team": (UNKNOWN, 0)}
    # bob sees alice (she wrote to him), not carol.
    assert watch(svc, "bob", ["alice", "carol", "bob"]) == {"alice": (OFFLINE, 0), "carol": (UNKNOWN, 0),
                                                            "bob": (ONLINE, T0)}
    # A first message makes a contact: dave writes to alice, alice sees dave.
    call(svc, "dave", m.Send(to="alice", cmid=b"d", kind=0, body=b"hi"))
    assert watch(svc, "alice", ["dave"]) == {"dave": (OFFLINE, 0)}


def test_user_state_across_gates_and_last_seen(svc):
    report(svc, "g1", "start", user="bob", state=ONLINE)
    assert noticed(report(svc, "g2", "start", user="bob", state=ONLINE, now=T0 + 1)) == {}
    assert noticed(report(svc, "g1", "state", user="bob", state=OFFLINE, now=T0 + 2)) == {}
    assert noticed(report(svc, "g2", "state", user="bob", state=AWAY, now=T0 + 3)) == {"bob": (AWAY, T0 + 3)}
    assert noticed(report(svc, "g2", "end", user="bob", state=NONE, now=T0 + 4)) == {"bob": (OFFLINE, T0 + 4)}
    # Appearing offline does not advance last_seen.
    assert noticed(report(svc, "g1", "state", user="bob", state=OFFLINE, now=T0 + 5)) == {}
    assert watch(svc, "alice", ["bob"], now=T0 + 9) == {"bob": (OFFLINE, T0 + 4)}


def test_a_snapshot_repairs_a_gates_states(svc):
    report(svc, "g1", "start", user="bob", state=ONLINE)
    out = report(svc, "g1", "snapshot", states={"carol": AWAY}, now=T0 + 10)
    assert noticed(out) == {"bob": (OFFLINE, T0 + 10), "carol": (AWAY, T0 + 10)}
    assert noticed(report(svc, "g1", "snapshot+", states={"bob": ONLINE}, now=T0 + 11)) == {"bob": (ONLINE, T0 + 11)}
    assert watch(svc, "alice", ["bob", "carol"], now=T0 + 12) == {"bob": (ONLINE, T0 + 12),
                                                                   "carol": (AWAY, T0 + 12)}


def test_a_gate_whose_lease_runs_out_takes_its_users_offline(svc):
    report(svc, "g1", "start", user="bob", state=ONLINE)
    report(svc, "g2", "start", user="carol", state=ONLINE)
    later = T0 + LEASE_MS + 1
    # The lease of g1 ran out: answers say so at once...
    assert watch(svc, "alice", ["bob"], now=later) == {"bob": (OFFLINE, 0)}
    # ...and the next report of any gate tells the watchers.
    out = report(svc, "g2", "snapshot", states={"carol": ONLINE}, now=later)
    assert noticed(out) == {"bob": (OFFLINE, later)}
    assert svc.store.expired_presence_gates(later) == []


def test_bye_a_late_copy_and_a_bad_report(svc):
    report(svc, "g1", "start", user="bob", state=ONLINE)
    late = json.dumps({"gate": "g1", "n": 1, "op": "end", "user": "bob", "session": "00", "state": 0,
                       "ttl_ms": LEASE_MS}).encode()
    assert noticed(call(svc, "g1", m.PresenceReport(report=late))) == {}
    assert noticed(report(svc, "g1", "bye", now=T0 + 5)) == {"bob": (OFFLINE, T0 + 5)}
    for bad in (b"nope", b'{"gate": "g1", "n": 9, "op": "start", "user": "bob", "session": "00"}',
                b'{"gate": "g1", "n": 9, "op": "start", "user": "bob", "session": "00", "state": 7, "ttl_ms": 5}'):
        assert call(svc, "g1", m.PresenceReport(report=bad)).reply.code == ErrorCode.BAD_REQUEST


def test_typing_reaches_only_who_lets_the_sender_in(svc):
    def typed(sender, peer):
        out = call(svc, sender, m.Typing(peer=peer, typing=True))
        assert out.reply == m.Ok()
        return [(n.user, n.msg) for n in out.notices]
    # A peer hears the sender's typing if it has written to the sender.
    assert typed("alice", "bob") == [("bob", m.TypingNotice(user="alice", peer="bob", typing=True))]
    assert typed("bob", "alice") == [("alice", m.TypingNotice(user="bob", peer="alice", typing=True))]
    assert typed("carol", "alice") == []  # alice never wrote to carol
    assert typed("dave", "alice") == []
    assert typed("alice", "alice") == []  # never to the sender's own sessions
    assert typed("alice", "nobody") == []


def test_typing_in_a_group_reaches_the_other_members(svc):
    # bob and carol wrote to alice, so alice may put them in.
    assert type(call(svc, "alice", m.GroupCreate(group="#g", title="G", members=["bob", "carol"])).reply) \
        is m.GroupInfo
    out = call(svc, "bob", m.Typing(peer="#g", typing=False))
    notice = m.TypingNotice(user="bob", peer="#g", typing=False)
    assert out.reply == m.Ok() and sorted(n.user for n in out.notices) == ["alice", "carol"]
    assert all(n.msg == notice and n.origin == b"" for n in out.notices)
    # Not a member, or no such group: nothing, and the same Ok.
    assert call(svc, "dave", m.Typing(peer="#g", typing=True)) == call(svc, "dave", m.Typing(peer="#x", typing=True))
    assert call(svc, "dave", m.Typing(peer="#g", typing=True)).notices == ()


# -- the gate's side, driven directly (fake transport, back end and clock) ----------------------


def pending_of(gate, kind):
    found = [p for p in gate.backend.pending if type(p[2]) is kind]
    for p in found:
        gate.backend.pending.remove(p)
    return found


def test_set_presence_is_answered_by_the_gate():
    gate, _ = make_gate()
    c = logged_in(gate)
    assert send(c, m.SetPresence(state=AWAY), 2)[1] == m.Ok()
    assert gate.presence.session_state(c.conn, "alice") == AWAY
    assert send(c, m.SetPresence(state=0), 3)[1].code == ErrorCode.BAD_REQUEST
    assert gate.presence.session_state(c.conn, "alice") == AWAY
    assert not gate.backend.pending


def test_watch_is_answered_by_a_worker_then_notices_go_to_those_who_may_see():
    gate, _ = make_gate()
    a = logged_in(gate, 1, user="alice")
    b = logged_in(gate, 2, user="bob")
    key, origin, msg, cb = a.forwarded(gate, m.Watch(users=["carol", "dave"]), ref=4)
    assert (key, origin, msg.users) == ("alice", a.conn.session, ["carol", "dave"])
    assert gate.backend.subscribed == {"alice": 1, "bob": 1, "carol": 1, "dave": 1}
    answer = m.PresenceList(states=[m.Presence(user="carol", state=ONLINE, last_seen_ms=5), m.Presence(user="dave")])
    cb(BIN.encode(answer, 0))
    a.read()
    assert a.received[-1][:2] == (4, answer)
    # bob watches carol too, and cannot see her.
    _, _, _, cb = b.forwarded(gate, m.Watch(users=["carol"]), ref=5)
    cb(BIN.encode(m.PresenceList(states=[m.Presence(user="carol")]), 0))
    b.read()
    notice = m.PresenceNotice(state=m.Presence(user="carol", state=AWAY, last_seen_ms=9))
    gate.fanout.on_notification(b"carol\0", b"", BIN.encode(notice, 0))
    gate.fanout.on_notification(b"dave\0", b"", BIN.encode(m.PresenceNotice(state=m.Presence(user="dave")), 0))
    a.read()
    b.read()
    assert a.received[-1] == (0, notice, False)
    assert [x for x in b.received if isinstance(x[1], m.PresenceNotice)] == []
    # Watch{[]} stops it all (and the subscriptions).
    assert send(a, m.Watch(users=[]), 6)[1] == m.PresenceList()
    assert gate.backend.subscribed == {"alice": 1, "bob": 1, "carol": 1}


def test_a_failed_watch_takes_back_what_it_added():
    gate, _ = make_gate()
    a = logged_in(gate)
    _, _, _, cb = a.forwarded(gate, m.Watch(users=["carol"]), ref=4)
    cb(None)  # no answer in time
    a.read()
    assert a.received[-1][1].code == ErrorCode.UNAVAILABLE
    assert gate.presence.watching == {} and "carol" not in gate.backend.subscribed


def test_watch_over_the_connections_limit_is_too_large():
    gate, _ = make_gate()
    gate.presence.max_per_connection = 3
    a = logged_in(gate)
    a.forwarded(gate, m.Watch(users=["u1", "u2"]), ref=4)
    assert send(a, m.Watch(users=["u3", "u4"]), 5)[1].code == ErrorCode.TOO_LARGE
    a.forwarded(gate, m.Watch(users=["u1", "u3"]), ref=6)  # u1 counted once


def test_a_first_message_from_a_hidden_watched_user_asks_again():
    gate, _ = make_gate()
    a = logged_in(gate)
    _, _, _, cb = a.forwarded(gate, m.Watch(users=["carol"]), ref=4)
    cb(BIN.encode(m.PresenceList(states=[m.Presence(user="carol")]), 0))
    new = m.NewMsg(msg=m.Msg(msg_id=1, seq=4, sender="carol", to="alice", body=b"hi"))
    gate.fanout.on_notification(b"alice\0", b"", BIN.encode(new, 0))
    ((key, _, msg, cb),) = pending_of(gate, m.Watch)
    assert (key, msg.users) == ("alice", ["carol"])
    cb(BIN.encode(m.PresenceList(states=[m.Presence(user="carol", state=ONLINE, last_seen_ms=7)]), 0))
    a.read()
    assert a.received[-1] == (0, m.PresenceNotice(state=m.Presence(user="carol", state=ONLINE, last_seen_ms=7)),
                              False)
    assert gate.presence.notice_targets("carol") == [a.conn]


def test_a_resync_asks_again_for_every_watched_state():
    gate, _ = make_gate()
    a = logged_in(gate)
    _, _, _, cb = a.forwarded(gate, m.Watch(users=["carol", "dave"]), ref=4)
    cb(BIN.encode(m.PresenceList(states=[m.Presence(user="carol"), m.Presence(user="dave")]), 0))
    gate.fanout.resync(None)
    ((key, _, msg, _),) = pending_of(gate, m.Watch)
    assert (key, sorted(msg.users)) == ("alice", ["carol", "dave"])


def test_typing_answered_here_passed_on_once_a_second_never_from_appearing_offline():
    gate, loop = make_gate()
    a = logged_in(gate)
    assert send(a, m.Typing(peer="bob", typing=True), 2)[1] == m.Ok()
    ((key, origin, msg, _),) = pending_of(gate, m.Typing)
    assert (key, origin, msg) == ("alice", a.conn.session, m.Typing(peer="bob", typing=True))
    assert send(a, m.Typing(peer="bob", typing=False), 3)[1] == m.Ok()
    assert pending_of(gate, m.Typing) == []  # within the second
    assert send(a, m.Typing(peer="#g", typing=True), 4)[1] == m.Ok()
    assert len(pending_of(gate, m.Typing)) == 1  # another peer
    loop.advance(1.0)
    send(a, m.Typing(peer="bob", typing=False), 5)
    assert len(pending_of(gate, m.Typing)) == 1
    send(a, m.SetPresence(state=OFFLINE), 6)
    loop.advance(1.0)
    assert send(a, m.Typing(peer="bob", typing=True), 7)[1] == m.Ok()
    assert pending_of(gate, m.Typing) == []


def test_typing_notices_reach_all_the_users_sessions():
    gate, _ = make_gate()
    a1 = logged_in(gate, 1, device="phone")
    a2 = logged_in(gate, 2, device="laptop")
    notice = m.TypingNotice(user="bob", peer="alice", typing=True)
    gate.fanout.on_notification(b"alice\0", b"", BIN.encode(notice, 0))
    for c in (a1, a2):
        c.read()
        assert c.received[-1] == (0, notice, False)


def test_a_session_that_ends_stops_its_watches():
    gate, _ = make_gate()
    a = logged_in(gate)
    a.forwarded(gate, m.Watch(users=["carol"]), ref=4)
    a.conn.close("test")
    assert gate.presence.watching == {} and gate.backend.subscribed == {}
    assert gate.presence.states == {}
