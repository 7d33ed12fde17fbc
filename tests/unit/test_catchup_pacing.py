"""After a failover the gate catches every online user up from the store:
at most CATCHUPS_IN_FLIGHT Catchup requests unanswered at once, the rest in
turn (simzmq/gate_fanout.py)."""

from __future__ import annotations

from simzmq import gate_fanout
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN
from tests.unit.test_fuzz_gate import make_gate
from tests.unit.test_gate_session import logged_in
from tests.unit.test_presence import pending_of


def empty_batch():
    return BIN.encode(m.Batch(msgs=[], more=False), 0)


def test_a_failover_catches_users_up_a_few_at_a_time_each_once(monkeypatch):
    monkeypatch.setattr(gate_fanout, "CATCHUPS_IN_FLIGHT", 2)
    gate, _ = make_gate()
    clients = [logged_in(gate, i, user=f"user{i}") for i in range(1, 6)]
    pending_of(gate, m.Catchup)  # whatever the logins asked
    gate.fanout.resync(None)
    asked = pending_of(gate, m.Catchup)
    assert [key for key, *_ in asked] == ["user1", "user2"]
    gate.fanout.resync(None)  # again meanwhile: no one twice, no one more at once
    assert pending_of(gate, m.Catchup) == []
    clients[2].conn.close("test")  # user3 leaves before its turn: never asked
    order = [key for key, *_ in asked]
    while asked:
        assert len(asked) <= 2
        key, _, _, cb = asked.pop(0)
        cb(empty_batch() if key != "user2" else None)  # a timeout frees its place too
        new = pending_of(gate, m.Catchup)
        order += [k for k, *_ in new]
        asked += new
    # user1 was asked again (the second resync came while its first was under
    # way); user2's timed out, so it is asked again later (a timer); user4
    # and user5 in turn.
    assert sorted(order) == ["user1", "user1", "user2", "user4", "user5"]
    assert "user3" not in order
    assert gate.fanout.catching_up == {} and gate.fanout.catchups_waiting == {}
