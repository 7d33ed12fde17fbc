"""Which inbox seqs of one user a gate has already pushed. Pure.

Pushes of one user's inbox can arrive out of order (two workers commit seq 5
and 6 and publish in the other order) and twice (a worker that replays a Send
publishes it again; a catch-up after a failover re-reads what may already have
arrived). The gate pushes each seq once, and a hole above the contiguous run
that stays open is how it notices a lost push and catches the user up from
the store.
"""

from __future__ import annotations

from simzmq.seqset import SeqSet

# A hole that is still open after this many newer pushes is treated as a lost
# push at once, without waiting for the hole timer.
MAX_ABOVE = 1024


class PushLog(SeqSet):
    __slots__ = ("hole_since",)

    def __init__(self, watermark: int = 0):
        super().__init__(watermark)
        # When the current hole (a seq missing below a pushed one) was first
        # seen; None while there is no hole.
        self.hole_since: float | None = None

    @property
    def watermark(self) -> int:
        return self.max_contiguous

    def first_time(self, seq: int, now: float) -> bool:
        """Record a push of `seq`; False if it was pushed before."""
        if not self.add(seq):
            return False
        self._track_hole(now)
        return True

    def raise_watermark(self, seq: int) -> None:
        """Everything up to `seq` is known to the client (LoginOk.max_seq)."""
        self.raise_to(seq)
        self._track_hole(None)

    def _track_hole(self, now: float | None) -> None:
        if not self.above:
            self.hole_since = None
        elif self.hole_since is None and now is not None:
            self.hole_since = now

    def hole_open_for(self, now: float) -> float:
        """How long a hole has been open (0 if none)."""
        if self.hole_since is None:
            return 0.0
        if len(self.above) > MAX_ABOVE:
            return float("inf")
        return now - self.hole_since
