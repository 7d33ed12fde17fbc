"""The federation's decisions (FederationCore, pure) and the gate's side of
them (LinkCore acting on a resync entry)."""

from __future__ import annotations

import pytest

from simzmq.envelope import EnvelopeError, pack_notices, pack_stamp, unpack_notices
from simzmq.federation import FORWARDED, RESYNC, FederationCore, Link, group_topics, parse_peers
from simzmq.linkcore import LinkCore
from simzmq.notify import GROUPS, group_topic

EPOCH_P, EPOCH_B = b"P" * 8, b"B" * 8
LINKS = [Link("a", "tcp://127.0.0.1:1"), Link("a", "tcp://127.0.0.1:2"), Link("c", "tcp://127.0.0.1:3")]


def frames(user: bytes, payload: bytes, epoch=EPOCH_P, seq=1, extra=()):
    return [group_topic(user), pack_stamp(epoch, seq), pack_notices([(user, b"s1", payload), *extra])]


def core():
    return FederationCore("b", LINKS, settle_s=1.0, remember=4)


def test_a_peer_notification_crosses_once_with_the_origin_marked():
    c = core()
    out = c.on_notification(0, frames(b"ann", b"n1"), 0.0)
    assert len(out) == 1
    topic, packed = out[0]
    assert topic == group_topic(b"ann")
    assert unpack_notices(packed) == [(b"ann", b"s1", b"n1"), (b"", FORWARDED, b"a")]


def test_the_same_frame_from_the_other_broker_of_the_pair_is_dropped():
    c = core()
    assert c.on_notification(0, frames(b"ann", b"n1"), 0.0)
    assert c.on_notification(1, frames(b"ann", b"n1", epoch=EPOCH_B, seq=7), 0.0) == []
    assert c.duplicates == 1


def test_a_marked_frame_is_never_forwarded_again():
    c = core()
    marked = frames(b"ann", b"n1", extra=[(b"", FORWARDED, b"c")])
    assert c.on_notification(0, marked, 0.0) == []
    # A resync request of another region is not forwarded either.
    asked = frames(b"ann", b"n2", seq=2, extra=[(b"", RESYNC, b"c")])
    assert c.on_notification(0, asked, 0.0) == []
    assert c.looped == 2


def test_forwarding_a_forwarded_frame_round_the_regions_ends_at_the_second_hop():
    a_to_b = FederationCore("b", [Link("a", "x")])
    b_to_a = FederationCore("a", [Link("b", "y")])
    (crossed,) = a_to_b.on_notification(0, frames(b"ann", b"n1"), 0.0)
    # b's broker stamps it and a's federation sees it on b's notify-out.
    assert b_to_a.on_notification(0, [crossed[0], pack_stamp(EPOCH_B, 1), crossed[1]], 0.0) == []


def test_memory_of_frames_is_bounded():
    c = core()
    for i in range(10):
        assert c.on_notification(0, frames(b"ann", b"n%d" % i, seq=i + 1), 0.0)
    assert c.remembered() == 4
    # The oldest is forgotten: a late copy of it would cross again (the
    # gates push each inbox seq once, so this costs a dropped push at most).
    assert c.on_notification(1, frames(b"ann", b"n0", epoch=EPOCH_B), 0.0)


def test_per_user_topics_do_not_cross():
    c = core()
    assert c.on_notification(0, [b"ann\0", pack_stamp(EPOCH_P, 1), b"x"], 0.0) == []


def test_malformed_frames_raise():
    c = core()
    with pytest.raises(EnvelopeError):
        c.on_notification(0, [group_topic(b"ann"), pack_stamp(EPOCH_P, 1)], 0.0)
    with pytest.raises(EnvelopeError):
        c.on_notification(0, [group_topic(b"ann"), pack_stamp(EPOCH_P, 1), b"\x05ab"], 0.0)


def test_a_link_that_comes_up_asks_every_group_to_catch_up_after_settling():
    c = core()
    c.on_link_up(2, 10.0)
    assert c.tick(10.5) == []
    assert c.next_due() == 11.0
    out = c.tick(11.0)
    assert [t for t, _ in out] == group_topics() and len(out) == GROUPS
    assert all(unpack_notices(p) == [(b"", RESYNC, b"c")] for _, p in out)
    assert c.tick(12.0) == [] and c.next_due() is None


def test_a_gap_in_a_links_stamps_asks_for_a_catch_up_at_once():
    c = core()
    c.on_notification(0, frames(b"ann", b"n1", seq=1), 0.0)
    c.on_notification(0, frames(b"ann", b"n2", seq=2), 0.0)
    assert c.tick(0.0) == []
    c.on_notification(0, frames(b"ann", b"n5", seq=5), 3.0)
    assert len(c.tick(3.0)) == GROUPS
    # A new epoch (the peer broker restarted) too.
    c.on_notification(0, frames(b"ann", b"n6", epoch=EPOCH_B, seq=1), 4.0)
    assert len(c.tick(4.0)) == GROUPS


def test_a_reconnected_link_starts_a_new_baseline():
    c = core()
    c.on_notification(0, frames(b"ann", b"n1", seq=1), 0.0)
    c.on_link_up(0, 1.0)
    c.tick(2.0)
    c.on_notification(0, frames(b"ann", b"n9", seq=9), 3.0)
    assert c.tick(3.0) == []


def test_parse_peers():
    assert parse_peers(["a@tcp://h:1", "a@tcp://h:2"]) == [Link("a", "tcp://h:1"), Link("a", "tcp://h:2")]
    for bad in ("tcp://h:1", "@tcp://h:1", "a@"):
        with pytest.raises(ValueError):
            parse_peers([bad])


def test_the_gate_catches_a_group_up_on_a_resync_entry_and_skips_marks():
    gate = LinkCore(2, 5.0, 1.0, 3.0, 0.0)
    gate.subscribe("ann")
    topic = group_topic(b"ann")
    marked = [topic, pack_stamp(EPOCH_P, 1), pack_notices([(b"ann", b"", b"n1"), (b"", FORWARDED, b"a")])]
    notices = gate.on_notification(marked)
    assert notices.deliveries == [(b"ann\0", b"", b"n1")] and notices.resync == []
    resync = [topic, pack_stamp(EPOCH_P, 2), pack_notices([(b"", RESYNC, b"a")])]
    notices = gate.on_notification(resync)
    assert notices.deliveries == [] and notices.resync == ["ann"]
