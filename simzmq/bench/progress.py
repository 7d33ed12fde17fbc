"""Progress of each phase on stderr, drawn by click's progress bar."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import click


class Progress:
    """Opens one bar per phase; a disabled Progress draws nothing."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr

    @contextmanager
    def phase(self, label: str, total: int, done: int = 0):
        """A bar for ``total`` steps, of which ``done`` are already counted
        (the counters run across phases); yields a function that takes the new
        count."""
        if not self.enabled:
            yield lambda count: None
            return
        started = time.monotonic()
        drawn = done

        def rate(_item) -> str:
            elapsed = time.monotonic() - started
            return f"{(drawn - done) / elapsed:.0f}/s" if elapsed > 0 else ""

        with click.progressbar(length=max(1, total), label=f"{label:<8}", file=self.stream, show_pos=True,
                               show_eta=True, item_show_func=rate) as bar:
            def advance(count: int) -> None:
                nonlocal drawn
                step = min(count, done + total) - drawn
                if step > 0:
                    drawn += step
                    bar.update(step)
            yield advance
