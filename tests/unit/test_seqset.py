import pytest

from simzmq.seqset import SeqSet


def test_contiguous_run_and_above():
    s = SeqSet()
    assert s.add(1) and s.add(3) and not s.add(3)
    assert (s.max_contiguous, s.above, s.has_gap, s.max_seq) == (1, {3}, True, 3)
    assert s.add(2)
    assert (s.max_contiguous, s.above, s.has_gap) == (3, set(), False)


def test_raise_to_absorbs_what_follows():
    s = SeqSet()
    for seq in (4, 6, 9):
        s.add(seq)
    s.raise_to(5)
    assert s.max_contiguous == 6 and s.above == {9}
    s.raise_to(2)
    assert s.max_contiguous == 6


def test_seqs_start_at_one():
    with pytest.raises(ValueError):
        SeqSet().add(0)
