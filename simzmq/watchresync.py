"""Asking the workers again for what every connection watches, paced.

When notices may have been lost (the gate switched brokers, a gap in a
topic's seqs, a federation resync) the gate asks the workers again for the
presence states its connections watch (simzmq/gate_fanout.py, resync). After
a failover that is every watching connection at once: sent together, the
Watch requests of a gate with many connections would flood the broker it
has just switched to and its workers. So they queue here and go a few at a
time: at most ``in_flight`` unanswered (an answer or a timeout frees a
place), the connections in the order they were queued, each one's users in
order, ``per_request`` to a request. A connection queued again before its
turn keeps its place and gets the new users added; one that no longer
watches a user by its turn is not asked for it, one that watches nothing
any more (closed meanwhile) is skipped.

Pure: no sockets, no clock (it is paced by the answers, not by time); the
fan-out sends what take() returns, calls done() for each answer, then
takes again, and logs the end when finished() says so.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Collection, Hashable

# Resync Watch requests unanswered at a time, per gate: enough to keep a
# broker and its workers busy, few enough not to crowd out the clients'
# own requests after a failover.
IN_FLIGHT = 32


class WatchResync:
    def __init__(self, in_flight: int = IN_FLIGHT) -> None:
        self.max_in_flight = in_flight
        # connection -> users still to ask for, in order (a dict as an
        # ordered set: adding one user to a long queue costs one lookup). An
        # OrderedDict: its first entry is found at once, where a dict's is
        # found past every entry deleted before it (quadratic over a resync
        # of many connections).
        self.queue: OrderedDict[Hashable, dict[str, None]] = OrderedDict()
        self.in_flight = 0
        self.running = False  # a resync started and finished() has not said it ended
        # For the resync under way (from idle to idle):
        self.connections = 0  # connections queued
        self.requests = 0     # Watch requests sent
        self.skipped = 0      # connections that watched nothing any more by their turn

    def busy(self) -> bool:
        return bool(self.queue) or self.in_flight > 0

    def add(self, conn: Hashable, users: list[str]) -> bool:
        """Queue `users` of `conn`; True if this starts a resync (none was
        under way)."""
        if not users:
            return False
        started = not self.running
        if started:
            self.running = True
            self.connections = self.requests = self.skipped = 0
        queued = self.queue.get(conn)
        if queued is None:
            self.queue[conn] = dict.fromkeys(users)
            self.connections += 1
        else:
            queued.update(dict.fromkeys(users))  # the ones already queued keep their place
        return started

    def take(self, per_request: int,
             watched: Callable[[Hashable], Collection[str]]) -> list[tuple[Hashable, list[str]]]:
        """The requests that may go now, ``(conn, users)``, each counted in
        flight until done(). `watched(conn)`: the users `conn` watches now."""
        out = []
        while self.queue and self.in_flight < self.max_in_flight:
            conn, queued = next(iter(self.queue.items()))
            now_watched = watched(conn)
            if not now_watched:
                del self.queue[conn]
                self.skipped += 1
                continue
            users = list(queued)
            chunk, rest = users[:per_request], users[per_request:]
            if rest:
                self.queue[conn] = dict.fromkeys(rest)
            else:
                del self.queue[conn]
            chunk = [u for u in chunk if u in now_watched]
            if chunk:
                out.append((conn, chunk))
                self.in_flight += 1
                self.requests += 1
        return out

    def done(self) -> None:
        """One request answered (or timed out): its place is free."""
        self.in_flight -= 1

    def finished(self) -> bool:
        """True once per resync: when nothing is queued or in flight any
        more (every connection asked, answered or skipped)."""
        if self.running and not self.busy():
            self.running = False
            return True
        return False
