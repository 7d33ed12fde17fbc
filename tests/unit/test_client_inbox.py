"""The client's pure parts: inbox seq tracking and reconnect backoff."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simzmq.client import InboxTracker, backoff_delays


def test_next_seq_applies_held_is_ignored_jump_is_a_gap():
    inbox = InboxTracker()
    assert inbox.classify(1) == InboxTracker.APPLY
    assert inbox.add(1)
    assert inbox.classify(1) == InboxTracker.IGNORE
    assert inbox.classify(3) == InboxTracker.GAP
    assert inbox.max_contiguous == 1 and not inbox.has_gap


def test_own_sendok_above_the_run_fills_in_later():
    inbox = InboxTracker()
    inbox.add(1)
    inbox.add(3)  # our SendOk; seq 2 (someone's message) not seen yet
    assert inbox.has_gap and inbox.max_contiguous == 1 and inbox.max_seq == 3
    assert inbox.classify(3) == InboxTracker.IGNORE
    assert inbox.classify(2) == InboxTracker.APPLY
    inbox.add(2)
    assert inbox.max_contiguous == 3 and not inbox.has_gap
    assert inbox.classify(4) == InboxTracker.APPLY


def test_add_reports_duplicates():
    inbox = InboxTracker()
    assert inbox.add(2)
    assert not inbox.add(2)
    assert inbox.add(1)
    assert not inbox.add(1)
    assert inbox.max_contiguous == 2


def test_behind_server():
    inbox = InboxTracker()
    assert not inbox.behind(0)
    assert inbox.behind(1)
    inbox.add(1)
    assert not inbox.behind(1)
    inbox.add(3)
    assert inbox.behind(3)


@pytest.mark.parametrize("seq", [0, -1])
def test_seqs_start_at_one(seq):
    with pytest.raises(ValueError):
        InboxTracker().add(seq)


@given(st.permutations(list(range(1, 30))), st.integers(0, 29))
def test_any_arrival_order(order, prefix):
    inbox = InboxTracker()
    arrived = order[:prefix]
    for seq in arrived:
        inbox.add(seq)
    expected = 0
    while expected + 1 in arrived:
        expected += 1
    assert inbox.max_contiguous == expected
    assert inbox.has_gap == (len(arrived) > expected)
    for seq in range(1, 31):
        assert inbox.holds(seq) == (seq in arrived)


def test_backoff_grows_to_cap_with_jitter_bounds():
    delays = list(itertools.islice(backoff_delays(0.1, 1.0, 2.0, jitter=lambda: 1.0), 6))
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    low = list(itertools.islice(backoff_delays(0.1, 1.0, 2.0, jitter=lambda: 0.0), 3))
    assert low == [0.05, 0.1, 0.2]
