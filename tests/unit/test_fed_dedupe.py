"""The federation's memory of recent frames (FederationCore): the copy of a
frame through the other broker of a peer pair is dropped, the same bytes
published again later (a second identical TypingNotice, which carries no
time) cross again. Time passed in."""

from __future__ import annotations

from simzmq.envelope import pack_notices, pack_stamp
from simzmq.federation import FederationCore, Link
from simzmq.notify import group_topic

EPOCH_P, EPOCH_B = b"P" * 8, b"B" * 8
# Links 0 and 1: the two brokers of region a; link 2: region c's.
LINKS = [Link("a", "tcp://127.0.0.1:1"), Link("a", "tcp://127.0.0.1:2"), Link("c", "tcp://127.0.0.1:3")]
WINDOW = 2.0


class Pair:
    """Region a's two brokers as seen from region b: each stamps its own seqs."""

    def __init__(self, core: FederationCore):
        self.core = core
        self.seqs = {0: 0, 1: 0, 2: 0}

    def arrive(self, link: int, payload: bytes, now: float) -> bool:
        """Whether the frame from `link` crossed into this region."""
        self.seqs[link] += 1
        epoch = EPOCH_B if link == 1 else EPOCH_P
        frames = [group_topic(b"dan"), pack_stamp(epoch, self.seqs[link]), pack_notices([(b"dan", b"", payload)])]
        return bool(self.core.on_notification(link, frames, now))


def pair(**kw) -> Pair:
    return Pair(FederationCore("b", LINKS, window_s=WINDOW, **kw))


START, STOP = b"typing-start", b"typing-stop"


def test_the_copy_through_the_other_broker_within_the_window_is_dropped():
    p = pair()
    assert p.arrive(0, START, 10.0)
    assert not p.arrive(1, START, 10.0 + WINDOW / 2)
    assert p.core.forwarded == 1 and p.core.duplicates == 1


def test_the_same_frame_published_again_after_the_window_crosses_again():
    p = pair()
    for t in (10.0, 10.0 + 2 * WINDOW):
        assert p.arrive(0, START, t)
        assert not p.arrive(1, START, t + 0.1)
    assert p.core.forwarded == 2 and p.core.duplicates == 2


def test_a_copy_later_than_the_window_crosses_twice():
    """The window is what tells a copy from a new frame when only the other
    broker brings it again; past it, a late copy is taken for a new one (the
    gates push each inbox seq once, so that costs a dropped push at most)."""
    p = pair()
    assert p.arrive(0, START, 10.0)
    assert p.arrive(1, START, 10.0 + WINDOW + 0.1)


def test_start_stop_start_within_the_window_each_cross_once():
    """The same broker never forwards one publication twice: the same bytes
    again from it are a new frame, at any time; its copy from the other
    broker is still dropped, in whatever order the copies come."""
    p = pair()
    crossed = [p.arrive(0, START, 10.0), p.arrive(0, STOP, 10.1), p.arrive(1, START, 10.15),
               p.arrive(0, START, 10.2), p.arrive(1, STOP, 10.25), p.arrive(1, START, 10.3)]
    assert crossed == [True, True, False, True, False, False]
    # One broker late by two frames: the copies still pair up.
    crossed = [p.arrive(1, STOP, 11.0), p.arrive(1, STOP, 11.1), p.arrive(0, STOP, 11.2), p.arrive(0, STOP, 11.3)]
    assert crossed == [True, True, False, False]


def test_the_same_bytes_from_another_region_are_not_a_copy():
    p = pair()
    assert p.arrive(0, START, 10.0)
    assert p.arrive(2, START, 10.0)


def test_memory_is_bounded_in_size_and_forgets_with_time():
    p = pair(remember=4)
    for i in range(10):
        assert p.arrive(0, b"n%d" % i, 10.0)
    assert p.core.remembered() == 4
    # The oldest is forgotten: a copy of it crosses again.
    assert p.arrive(1, b"n0", 10.1)
    assert not p.arrive(1, b"n9", 10.1)
    # Past the window everything is forgotten, whatever the traffic.
    p.arrive(0, b"later", 10.1 + WINDOW + 0.01)
    assert p.core.remembered() == 1
