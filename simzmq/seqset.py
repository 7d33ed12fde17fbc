"""A set of inbox seqs, kept as its highest contiguous seq plus the few held
above it. Pure.

Clients use it for the seqs they hold (protocol.md section 5), gates for the
seqs they pushed to a user: in both, seqs arrive out of order and twice, and a
seq held above the contiguous run means one below it is missing.
"""

from __future__ import annotations


class SeqSet:
    __slots__ = ("max_contiguous", "above")

    def __init__(self, max_contiguous: int = 0) -> None:
        self.max_contiguous = max_contiguous
        self.above: set[int] = set()

    def holds(self, seq: int) -> bool:
        return seq <= self.max_contiguous or seq in self.above

    def add(self, seq: int) -> bool:
        """Record a seq as held; False if it already was."""
        if seq < 1:
            raise ValueError(f"inbox seqs start at 1, not {seq}")
        if self.holds(seq):
            return False
        if seq == self.max_contiguous + 1:
            self.max_contiguous = seq
            self._absorb()
        else:
            self.above.add(seq)
        return True

    def raise_to(self, seq: int) -> None:
        """Everything up to `seq` is held."""
        if seq <= self.max_contiguous:
            return
        self.max_contiguous = seq
        self.above = {s for s in self.above if s > seq}
        self._absorb()

    def _absorb(self) -> None:
        above = self.above
        while self.max_contiguous + 1 in above:
            self.max_contiguous += 1
            above.discard(self.max_contiguous)

    @property
    def has_gap(self) -> bool:
        """True while some seq above the contiguous run is held (one is missing)."""
        return bool(self.above)

    @property
    def max_seq(self) -> int:
        """The highest seq held."""
        return max(self.above, default=self.max_contiguous)
