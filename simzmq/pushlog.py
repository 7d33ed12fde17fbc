"""Which inbox seqs of one user a gate has already pushed. Pure.

Pushes of one user's inbox can arrive out of order (two workers commit seq 5
and 6 and publish in the other order) and twice (a worker that replays a Send
publishes it again; a catch-up after a failover re-reads what may already have
arrived). The gate pushes each seq once: it keeps a contiguous watermark and
the few seqs above it, and a hole above the watermark is how it notices a lost
push and catches the user up from the store.
"""

from __future__ import annotations

# A hole that is still open after this many newer pushes is treated as a lost
# push at once, without waiting for the hole timer.
MAX_ABOVE = 1024


class PushLog:
    __slots__ = ("watermark", "above", "hole_since")

    def __init__(self, watermark: int = 0):
        self.watermark = watermark
        self.above: set[int] = set()
        # When the current hole (a seq missing below a pushed one) was first
        # seen; None while there is no hole.
        self.hole_since: float | None = None

    def first_time(self, seq: int, now: float) -> bool:
        """Record a push of `seq`; False if it was pushed before."""
        if seq <= self.watermark or seq in self.above:
            return False
        if seq == self.watermark + 1:
            self.watermark = seq
            above = self.above
            while self.watermark + 1 in above:
                self.watermark += 1
                above.discard(self.watermark)
            if not above:
                self.hole_since = None
        else:
            self.above.add(seq)
            if self.hole_since is None:
                self.hole_since = now
        return True

    def raise_watermark(self, seq: int) -> None:
        """Everything up to `seq` is known to the client (LoginOk.max_seq)."""
        if seq <= self.watermark:
            return
        self.watermark = seq
        self.above = {s for s in self.above if s > seq}
        while self.watermark + 1 in self.above:
            self.watermark += 1
            self.above.discard(self.watermark)
        if not self.above:
            self.hole_since = None

    def hole_open_for(self, now: float) -> float:
        """How long a hole has been open (0 if none)."""
        if self.hole_since is None:
            return 0.0
        if len(self.above) > MAX_ABOVE:
            return float("inf")
        return now - self.hole_since
