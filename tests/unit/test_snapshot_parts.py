"""A big gate's presence snapshot goes out in parts (PresenceReporter,
simzmq/push/presence.py), each complete only within the range of user names
it states (docs/internal-protocol.md, "Presence"): a user of a later part is
never taken offline by an earlier one, on the push service's side
(push/policy.py Presence) or the IM workers' (simzmq/presence.py, and
IMService over both stores); a user who left is dropped by the part whose
range covers them."""

from __future__ import annotations

import json
import random

import pytest

from simzmq import presence as pr
from simzmq.presence import NONE, OFFLINE, ONLINE
from simzmq.push.policy import BadReport, Presence, parse_report
from simzmq.push.presence import SNAPSHOT_PART_USERS, PresenceReporter
from simzmq.service import IMService
from simzmq.store import open_store
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN
from simzmq.wire.messages import ErrorCode
from tests.pg import fresh_store_url

T0 = 1_764_000_000_000
LEASE_MS = 30_000
BIG = 2500  # users on the big gate: three parts of SNAPSHOT_PART_USERS


class Gate:
    """A gate's PresenceReporter and the reports it sent."""

    def __init__(self, **kw):
        self.reporter = PresenceReporter("gate-1", 10.0, self._request, LEASE_MS, **kw)
        self.sent: list[m.PresenceReport] = []

    def _request(self, key, origin, payload, callback) -> None:
        self.sent.append(BIN.decode(payload)[1])

    def snapshot(self, users) -> list[m.PresenceReport]:
        """The parts of one snapshot of `users` (each with one session, online)."""
        users = list(users)
        random.Random(7).shuffle(users)  # the gate's dicts are in login order, not sorted
        self.reporter.snapshot({u: {bytes([1]): None} for u in users}, {u: ONLINE for u in users})
        parts, self.sent = self.sent, []
        return parts


def parsed(parts) -> list[dict]:
    return [parse_report(bytes(p.report)) for p in parts]


def names(count: int) -> list[str]:
    return [f"u{i:05d}" for i in range(count)]


def inside(report: dict, user: str) -> bool:
    """Whether `user` is in the range a snapshot part states it covers."""
    return report.get("from", "") <= user and ("to" not in report or user < report["to"])


# -- the gate's side --------------------------------------------------------------------------

def test_a_big_snapshot_is_sorted_parts_whose_ranges_cover_every_name_once():
    assert SNAPSHOT_PART_USERS == 1000
    users = names(BIG)
    parts = parsed(Gate().snapshot(users))
    assert [p["op"] for p in parts] == ["snapshot", "snapshot+", "snapshot+"]
    assert [len(p["users"]) for p in parts] == [1000, 1000, 500]
    assert [u for p in parts for u in p["users"]] == sorted(users)
    # Open below the first part, open above the last; each part ends where
    # the next begins, so every name (of a user or not) is in exactly one.
    assert "from" not in parts[0] and "to" not in parts[-1]
    assert [p["to"] for p in parts[:-1]] == [p["from"] for p in parts[1:]] == ["u01000", "u02000"]
    for p in parts:
        assert all(inside(p, u) for u in p["users"]) and set(p["states"]) == set(p["users"])
    for name in ["", "a", "u00999", "u00999z", "u01000", "u9", "v", "\U0010ffff"]:
        assert sum(inside(p, name) for p in parts) == 1


def test_a_small_snapshot_is_one_part_covering_everything():
    (part,) = parsed(Gate().snapshot(names(3)))
    assert part["op"] == "snapshot" and "from" not in part and "to" not in part
    (empty,) = parsed(Gate().snapshot([]))
    assert empty["op"] == "snapshot" and empty["users"] == {} and "from" not in empty and "to" not in empty


def test_the_part_size_is_a_parameter():
    parts = parsed(Gate(part_users=2).snapshot(["b", "a", "c", "e", "d"]))
    assert [list(p["users"]) for p in parts] == [["a", "b"], ["c", "d"], ["e"]]
    assert [(p.get("from"), p.get("to")) for p in parts] == [(None, "c"), ("c", "e"), ("e", None)]


# -- the push service's side ------------------------------------------------------------------

def test_push_presence_keeps_later_parts_users_online_and_drops_who_left_in_their_part():
    gate = Gate()
    users = names(BIG)
    p = Presence(expire_s=15, warm_s=6, now=0)
    for report in parsed(gate.snapshot(users)):
        p.report(report, 1)
    assert all(p.online(u) for u in users) and p.count() == BIG
    left = "u01500"  # in the second part
    for rnd in range(2, 5):
        now_online = [u for u in users if u != left]
        for report in parsed(gate.snapshot(now_online)):
            before = dict(p.gates[report["gate"]])
            p.report(report, rnd)
            after = p.gates[report["gate"]]
            # Outside the part's range nothing changed.
            assert {u: s for u, s in after.items() if not inside(report, u)} == \
                   {u: s for u, s in before.items() if not inside(report, u)}
            # Nobody still on the gate is offline at any point, and the one
            # who left is gone once the part covering them is applied.
            assert all(p.online(u) for u in now_online)
            assert p.online(left) == (rnd == 2 and report["op"] == "snapshot")
        assert p.count() == BIG - 1


def test_push_presence_a_user_who_joined_or_left_at_the_range_edges():
    gate = Gate(part_users=2)
    p = Presence(expire_s=15, warm_s=6, now=0)
    for report in parsed(gate.snapshot(["b", "d", "f", "h"])):
        p.report(report, 1)
    # The parts now: [..c) [c..) with c, a newcomer, first in the second part.
    for report in parsed(gate.snapshot(["a", "b", "c", "h"])):
        p.report(report, 2)
    assert [u for u in "abcdefgh" if p.online(u)] == ["a", "b", "c", "h"]


# -- the IM workers' side, pure -----------------------------------------------------------------

def apply_to_rows(rows: dict[str, int], report: dict) -> dict[str, int]:
    """What a worker does with a gate's rows for one report: the changes."""
    states, covered, _ = pr.local_report(report)
    changes = pr.local_changes(dict(rows), states, covered)
    for user, state in changes.items():
        if state == NONE:
            rows.pop(user, None)
        else:
            rows[user] = state
    return changes


def test_worker_rows_change_only_for_who_left_in_the_part_covering_them():
    gate = Gate()
    users = names(BIG)
    rows: dict[str, int] = {}
    for report in parsed(gate.snapshot(users)):
        apply_to_rows(rows, report)
    assert rows == {u: ONLINE for u in users}
    left = "u02400"  # in the last part
    for rnd in range(3):
        seen_changes = {}
        for report in parsed(gate.snapshot([u for u in users if u != left])):
            changes = apply_to_rows(rows, report)
            assert all(inside(report, u) for u in changes)
            seen_changes.update(changes)
            if report["op"] == "snapshot":
                assert left in rows or rnd > 0  # not the first part's to drop
        assert seen_changes == ({left: NONE} if rnd == 0 else {})
        assert rows == {u: ONLINE for u in users if u != left}


def test_worker_reads_a_report_without_a_range_as_before():
    # A snapshot in one part (no range): complete for everyone; a
    # "snapshot+" without a range (a gate before ranges): only its users.
    rows = {"a": ONLINE, "b": ONLINE}
    base = {"gate": "g", "n": 1, "ttl_ms": LEASE_MS}
    assert apply_to_rows(dict(rows), {**base, "op": "snapshot+", "users": {}, "states": {"c": ONLINE}}) == \
        {"c": ONLINE}
    assert apply_to_rows(dict(rows), {**base, "op": "snapshot", "users": {}, "states": {"c": ONLINE}}) == \
        {"a": NONE, "b": NONE, "c": ONLINE}


# -- bad parts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, why", [
    ({"from": 5}, "from"),
    ({"to": ["b"]}, "to"),
    ({"from": "c", "to": "c"}, "empty"),
    ({"from": "d", "to": "c"}, "empty"),
    ({"from": "b"}, "outside"),       # "a" is below it
    ({"to": "a"}, "outside"),         # "a" is not below it
    ({"op": "start", "user": "a", "session": "00", "from": "a"}, "snapshot"),
])
def test_bad_ranges_are_refused_with_a_clear_error(fields, why):
    body = {"gate": "g", "n": 1, "op": "snapshot+", "users": {"a": ["00"]}, "states": {"a": 2}, **fields}
    with pytest.raises(BadReport, match=why):
        parse_report(json.dumps(body).encode())


def test_states_outside_the_range_are_refused_by_the_worker():
    report = parse_report(json.dumps({"gate": "g", "n": 1, "op": "snapshot+", "ttl_ms": LEASE_MS, "from": "b",
                                      "users": {"b": ["00"]}, "states": {"a": ONLINE, "b": ONLINE}}).encode())
    with pytest.raises(pr.BadLocalReport, match="outside"):
        pr.local_report(report)


# -- the IM workers' side, over both stores -------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgres", "postgres-icu"])
def service(request, tmp_path):
    url = fresh_store_url(request, tmp_path, "sqlite" if request.param == "sqlite" else "postgres")
    store = open_store(url)
    if request.param == "postgres-icu":
        natural_language_order(url)
    try:
        with store.transaction():
            for user in USERS:
                store.create_user(user, "hash", T0)
        yield IMService(store, LEASE_MS, 1 << 20)
    finally:
        store.close()


def natural_language_order(url: str) -> None:
    """Make the presence table's user ids sort as in a database created with
    a natural-language collation (ICU's root: "ab" before "Zed"), which a
    store's byte-order range must not depend on."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_collation WHERE collname = 'und-x-icu'").fetchone():
            pytest.skip("this PostgreSQL has no ICU collations")
        conn.execute('ALTER TABLE presence ALTER COLUMN user_id TYPE text COLLATE "und-x-icu"')
        # ...an order other than the bytes' (where "Zed" < "ab").
        assert conn.execute('SELECT \'ab\' < \'Zed\' COLLATE "und-x-icu"').fetchone() == (True,)


# Names whose order differs between byte order and natural-language collations
# (case, punctuation, accents, other scripts): the store must see the
# ranges as the gate sorted them.
USERS = ["Zed", "a-c", "ab", "abc", "ann", "b", "bob", "zoe", "émile", "Ærø", "日本", "ω"]


def handle(service, parts, now) -> list[dict]:
    """Each part's PresenceNotices as (user, state), one dict per part."""
    found = []
    for part in parts:
        with service.store.transaction():
            out = service.handle("gate-1", b"", part, now)
        assert type(out.reply) is m.Ok, out.reply
        found.append({n.user: n.msg.state.state for n in out.notices if type(n.msg) is m.PresenceNotice})
    return found


def states(service, now) -> dict[str, int]:
    return service._states(USERS, now)


def test_no_presence_notice_or_last_seen_change_for_users_of_later_parts(service):
    gate = Gate(part_users=3)
    now = T0
    first = handle(service, gate.snapshot(USERS), now)
    assert len(first) == 4
    assert {u: s for part in first for u, s in part.items()} == {u: ONLINE for u in USERS}
    for _ in range(2):
        now += 1000
        for part in gate.snapshot(USERS):
            assert handle(service, [part], now) == [{}]
            assert states(service, now) == {u: ONLINE for u in USERS}
    assert service.store.last_seen(USERS) == {u: 0 for u in USERS}
    # One user leaves: the part covering them (the third) says so, once.
    left = sorted(USERS)[7]
    now += 1000
    found = handle(service, gate.snapshot([u for u in USERS if u != left]), now)
    assert found == [{}, {}, {left: OFFLINE}, {}]
    assert service.store.last_seen(USERS) == {u: now if u == left else 0 for u in USERS}
    now += 1000
    assert handle(service, gate.snapshot([u for u in USERS if u != left]), now) == [{}] * 4
    # "Zed" is in the first part's span in byte order ("Z" < "a"), past it
    # in a natural-language one: the store reads the span in byte order.
    now += 1000
    found = handle(service, gate.snapshot([u for u in USERS if u not in (left, "Zed")]), now)
    assert found == [{"Zed": OFFLINE}, {}, {}, {}]


def test_a_bad_part_is_refused_and_changes_nothing(service):
    gate = Gate(part_users=3)
    handle(service, gate.snapshot(USERS), T0)
    rows = service.store.gate_presence(gate.reporter.gate_id)
    bad = json.loads(gate.snapshot(USERS)[1].report)
    bad["n"] += 100
    bad["states"]["!"] = ONLINE  # below the part's range
    bad["users"] = {}  # the push service would see nothing wrong; the worker must
    with service.store.transaction():
        out = service.handle("gate-1", b"", m.PresenceReport(report=json.dumps(bad).encode()), T0 + 5)
    assert out.reply.code == ErrorCode.BAD_REQUEST and "outside" in out.reply.reason
    assert out.notices == ()
    assert service.store.gate_presence(gate.reporter.gate_id) == rows
