"""Progress of a phase on stderr."""

from __future__ import annotations

import sys
import time

class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.last_line = 0.0
        self.width = 0

    def show(self, label: str, done: int, total: int, started: float, base: int = 0) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and now - self.last_line < 2.0:
            return
        self.last_line = now
        elapsed = now - started
        frac = min(1.0, done / total) if total else 0.0
        bar = "#" * int(frac * 30)
        rate = (done - base) / elapsed if elapsed > 0 else 0.0
        line = f"{label:<9}[{bar:<30}] {done}/{total} {frac * 100:5.1f}% {rate:9.0f}/s {elapsed:6.1f}s"
        if self.tty:
            pad = max(0, self.width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.enabled and self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0
