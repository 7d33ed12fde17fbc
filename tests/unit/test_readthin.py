"""ReadThinner (simzmq/readthin.py): at most one group ReadNotice per
second per (member, group, reader), the latest, in order, none lost at the
end, and nothing kept for keys gone idle. Time is passed in."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from simzmq.gate_fanout import READS_THINNED
from simzmq.readthin import ReadThinner
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN
from tests.unit.test_fuzz_gate import make_gate
from tests.unit.test_gate_session import logged_in

KEY = ("bob", "#g1", "ann")


def test_the_first_goes_at_once():
    t = ReadThinner(1.0)
    assert t.offer(KEY, 5, "n5", 10.0) == ("n5", 0)
    assert t.next_due() == 11.0


def test_a_burst_is_thinned_to_its_latest_when_the_second_ends():
    t = ReadThinner(1.0)
    assert t.offer(KEY, 1, "n1", 10.0) == ("n1", 0)
    assert t.offer(KEY, 2, "n2", 10.1) == (None, 0)
    assert t.offer(KEY, 3, "n3", 10.2) == (None, 1)  # n2 will never go
    assert t.offer(KEY, 4, "n4", 10.9) == (None, 1)
    assert t.due(10.99) == []
    assert t.due(11.0) == [(KEY, "n4")]
    # The next second starts when n4 went: n5 waits for its end.
    assert t.offer(KEY, 5, "n5", 11.5) == (None, 0)
    assert t.due(11.9) == []
    assert t.due(12.0) == [(KEY, "n5")]


def test_due_at_next_due_sends_whatever_the_float_rounding():
    t = ReadThinner(1.0)
    for start in (0.1, 0.7, 1e6 + 0.3):
        t.offer(KEY, 1, "n1", start)
        t.offer(KEY, 2, "n2", start)
        assert t.due(t.next_due()) == [(KEY, "n2")]
        assert t.due(t.next_due()) == [] and t.next_due() is None


def test_a_lower_msg_id_after_a_higher_one_is_never_sent():
    t = ReadThinner(1.0)
    t.offer(KEY, 7, "n7", 10.0)
    assert t.offer(KEY, 6, "n6", 10.5) == (None, 1)
    assert t.offer(KEY, 7, "n7 again", 10.5) == (None, 1)
    assert t.offer(KEY, 9, "n9", 10.6) == (None, 0)
    assert t.offer(KEY, 8, "n8", 10.7) == (None, 1)  # below the held one
    assert t.due(11.0) == [(KEY, "n9")]
    assert t.offer(KEY, 8, "n8", 11.1) == (None, 1)  # below the one sent


def test_a_quiet_key_sends_at_once_again_and_is_then_forgotten():
    t = ReadThinner(1.0)
    t.offer(KEY, 1, "n1", 10.0)
    assert t.offer(KEY, 2, "n2", 11.0) == ("n2", 0)  # a second after: at once
    assert len(t) == 1
    assert t.due(11.5) == [] and len(t) == 1
    assert t.due(12.0) == [] and len(t) == 0 and t.next_due() is None
    # Forgotten, a key starts afresh: its first notice goes at once.
    assert t.offer(KEY, 3, "n3", 12.0) == ("n3", 0)


def test_when_due_runs_late_the_newer_goes_and_the_held_one_is_thinned():
    t = ReadThinner(1.0)
    t.offer(KEY, 1, "n1", 10.0)
    t.offer(KEY, 2, "n2", 10.5)
    assert t.offer(KEY, 3, "n3", 11.2) == ("n3", 1)
    assert t.due(11.5) == []
    assert t.offer(KEY, 4, "n4", 11.6) == (None, 0)
    assert t.due(12.2) == [(KEY, "n4")]


def test_keys_are_apart_members_groups_and_readers():
    t = ReadThinner(1.0)
    keys = [(member, group, reader) for member in ("bob", "cat") for group in ("#g1", "#g2")
            for reader in ("ann", "dan")]
    for k in keys:
        assert t.offer(k, 10, (k, 10), 10.0) == ((k, 10), 0)
    for k in keys:
        assert t.offer(k, 11, (k, 11), 10.2) == (None, 0)
    assert t.offer(keys[0], 12, (keys[0], 12), 10.4) == (None, 1)
    went = t.due(11.0)
    assert sorted(went) == sorted([(keys[0], (keys[0], 12))] + [(k, (k, 11)) for k in keys[1:]])
    assert t.due(12.0) == [] and len(t) == 0


def test_due_answers_in_the_order_intervals_end_and_next_due_follows():
    t = ReadThinner(1.0)
    a, b, c = ("m", "#g", "a"), ("m", "#g", "b"), ("m", "#g", "c")
    t.offer(a, 1, "a1", 10.0)
    t.offer(b, 1, "b1", 10.3)
    t.offer(c, 1, "c1", 10.6)
    t.offer(c, 2, "c2", 10.7)
    t.offer(a, 2, "a2", 10.8)
    assert t.next_due() == 11.0
    assert t.due(11.0) == [(a, "a2")]
    assert t.next_due() == 11.3
    assert t.due(11.3) == []  # b: nothing held, forgotten
    assert t.due(11.6) == [(c, "c2")] and t.next_due() == 12.0


def test_memory_is_bounded_by_the_last_seconds_notices():
    t = ReadThinner(1.0)
    now = 0.0
    for i in range(10_000):
        now = i * 0.01
        t.due(now)
        t.offer(("m", "#g", f"reader{i}"), 1, i, now)
        assert len(t) <= 101  # the keys of the last second, nothing older
    t.due(now + 1.0)
    assert len(t) == 0


KEYS = [KEY, ("cat", "#g1", "ann"), ("bob", "#g2", "dan")]
events = st.lists(st.tuples(st.floats(0, 0.6), st.sampled_from(KEYS), st.integers(1, 3), st.booleans()), max_size=80)


def bus_timeline(steps):
    """(time, key, msg_id) as the bus brings them: each key's marks rise
    (by 1-3), each published once, except that two of a key's notices
    within half a second may come swapped (two workers publishing)."""
    now, timeline, last_id, last_of = 0.0, [], {}, {}
    for dt, key, step, swap in steps:
        now += dt
        msg_id = last_id[key] = last_id.get(key, 0) + step
        prev = last_of.pop(key, None)
        if swap and prev is not None and now - timeline[prev][0] < 0.5:
            # Swapped with the one before; that pair is done (swaps are disjoint).
            timeline.append((now, key, timeline[prev][2]))
            timeline[prev] = (timeline[prev][0], key, msg_id)
            continue
        last_of[key] = len(timeline)
        timeline.append((now, key, msg_id))
    return timeline


@settings(max_examples=300, deadline=None)
@given(steps=events, seed=st.integers(0, 2 ** 32))
def test_whatever_comes_each_key_gets_its_latest_in_order_at_most_once_a_second(steps, seed):
    """Random arrivals and a timer that runs at random moments (maybe late)."""
    rng = random.Random(seed)
    t = ReadThinner(1.0)
    timeline = bus_timeline(steps)
    sent, thinned = [], 0
    for now, key, msg_id in timeline:
        if rng.random() < 0.5:  # the timer ran before this one came (maybe late)
            sent += [(now, k, n) for k, n in t.due(now)]
        notice, dropped = t.offer(key, msg_id, msg_id, now)
        thinned += dropped
        if notice is not None:
            sent.append((now, key, notice))
    end = (timeline[-1][0] if timeline else 0.0) + 5.0
    while t.next_due() is not None:
        now = max(end, t.next_due())
        sent += [(now, k, n) for k, n in t.due(now)]
    assert len(t) == 0
    for key in {k for _, k, _ in timeline}:
        offered = [n for _, k, n in timeline if k == key]
        mine = [(when, n) for when, k, n in sent if k == key]
        ids = [n for _, n in mine]
        # Rising, each a notice that came, the highest last: none is lost at the end.
        assert ids == sorted(set(ids)) and set(ids) <= set(offered)
        assert ids[-1] == max(offered)
        # The first goes at once.
        assert mine[0] == (timeline[[k for _, k, _ in timeline].index(key)][0], offered[0])
        # At most one a second.
        assert all(b[0] >= a[0] + 1.0 for a, b in zip(mine, mine[1:]))
    # Every notice either went or was counted thinned.
    assert len(sent) + thinned == len(timeline)


# -- the gate's shell (gate_fanout): a fake loop and clock, real sessions ------------------

def read_notices(c):
    c.read()
    return [x[1] for x in c.received if isinstance(x[1], m.ReadNotice)]


def test_the_gate_thins_group_notices_to_members_and_not_to_the_readers_sessions():
    gate, loop = make_gate()
    ann1 = logged_in(gate, 1, user="ann", device="phone")
    ann2 = logged_in(gate, 2, user="ann", device="laptop")
    bob = logged_in(gate, 3, user="bob")
    before = READS_THINNED._value.get()

    def read(msg_id, peer="#crew"):
        payload = BIN.encode(m.ReadNotice(reader="ann", peer=peer, msg_id=msg_id, ts_ms=msg_id), 0)
        gate.fanout.on_notification(b"bob\0", b"", payload)
        gate.fanout.on_notification(b"ann\0", ann1.conn.session, payload)

    for msg_id in range(10, 15):  # a burst within the second
        read(msg_id)
        loop.advance(0.1)
    assert [n.msg_id for n in read_notices(bob)] == [10]
    assert [n.msg_id for n in read_notices(ann2)] == [10, 11, 12, 13, 14]  # the reader's own: all
    assert read_notices(ann1) == []
    loop.advance(0.5)  # the second ends: the latest goes
    assert [n.msg_id for n in read_notices(bob)] == [10, 14]
    assert READS_THINNED._value.get() - before == 3
    read(13)  # below one pushed: never
    read(20, peer="ann")  # one-to-one: at once, never held
    assert [n.msg_id for n in read_notices(bob)] == [10, 14, 20]
    loop.advance(5.0)
    assert [n.msg_id for n in read_notices(bob)] == [10, 14, 20]
    # Idle: nothing tracked, no timer left.
    assert len(gate.fanout.read_thinner) == 0 and gate.fanout._read_timer is None
    read(21)  # the first of a new burst: at once
    assert [n.msg_id for n in read_notices(bob)][-1] == 21


def test_a_held_notice_for_a_member_who_left_goes_nowhere():
    gate, loop = make_gate()
    bob = logged_in(gate, 3, user="bob")
    for msg_id in (1, 2):
        payload = BIN.encode(m.ReadNotice(reader="ann", peer="#crew", msg_id=msg_id, ts_ms=1), 0)
        gate.fanout.on_notification(b"bob\0", b"", payload)
    gate.fanout.session_ended(bob.conn)
    loop.advance(2.0)
    loop.advance(2.0)
    assert [n.msg_id for n in read_notices(bob)] == [1]
    assert len(gate.fanout.read_thinner) == 0
