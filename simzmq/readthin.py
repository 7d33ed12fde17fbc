"""Thinning of group read receipts (protocol.md section 7, "Reading"), pure:
no sockets, no clock (time is passed in, seconds, never going back).

A `Read` in a group sends a `ReadNotice` to every member. A reader who
scrolls sends several Reads a second, and each one would reach every member:
members x reads pushes. "A gate may send a member at most one such notice
per reader per second (the latest)": the gate keys each notice by (member,
group, reader), the member being the user whose sessions it is for, and

* lets the first go at once;
* holds those that come within `interval_s` of the last one that went,
  keeping only the latest (highest msg_id), which goes when the interval
  ends (`due`), so the latest always arrives, at most `interval_s` late;
* never sends a msg_id at or below one already sent or held for the key
  while it tracks the key (read marks only rise; a lower one after a higher
  one is old news);
* forgets a key once an interval has passed with nothing held, so what it
  tracks is bounded by the notices sent in the last interval.

Which notices are thinned at all (group ones, to members other than the
reader) is the gate's choice: simzmq/gate_fanout.py.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

# "At most one such notice per reader per second."
READ_NOTICE_INTERVAL_S = 1.0


class _KeyState:
    __slots__ = ("sent_at", "sent_id", "held_id", "held")

    def __init__(self, sent_at: float, sent_id: int):
        self.sent_at = sent_at  # when the last notice went
        self.sent_id = sent_id  # and its msg_id
        self.held_id = 0
        self.held = None  # the notice to send when the interval ends, if any


class ReadThinner:
    """At most one notice per `interval_s` per key, the latest. A notice is
    opaque here (the gate passes the payload it will push) with its msg_id."""

    def __init__(self, interval_s: float = READ_NOTICE_INTERVAL_S):
        self.interval_s = interval_s
        # In the order their last notice went (so in the order their intervals
        # end): due() looks only at the front.
        self.keys: OrderedDict[Hashable, _KeyState] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def offer(self, key: Hashable, msg_id: int, notice, now: float) -> tuple[object | None, int]:
        """A notice for `key` came. Returns it if it goes now (else None: held,
        or dropped), and how many notices this made sure will never be sent
        (0 or 1: this one, being old news, or a held one it replaces)."""
        state = self.keys.get(key)
        if state is None:
            self.keys[key] = _KeyState(now, msg_id)
            return notice, 0
        if msg_id <= max(state.sent_id, state.held_id):
            return None, 1
        thinned = 0 if state.held is None else 1
        if now < state.sent_at + self.interval_s:
            state.held_id, state.held = msg_id, notice
            return None, thinned
        # The interval has ended (due() is late): this one goes, and it is
        # newer than anything held.
        self._sent(key, state, msg_id, now)
        return notice, thinned

    def due(self, now: float) -> list[tuple[Hashable, object]]:
        """The held notices whose interval has ended, to send now (each
        starts a new interval); keys idle for an interval are forgotten."""
        out = []
        while self.keys:
            key, state = next(iter(self.keys.items()))
            if now < state.sent_at + self.interval_s:  # as next_due() says, to the last bit
                break
            if state.held is None:
                del self.keys[key]
                continue
            out.append((key, state.held))
            self._sent(key, state, state.held_id, now)
        return out

    def next_due(self) -> float | None:
        """When due() next has something to do (None: nothing tracked)."""
        for state in self.keys.values():
            return state.sent_at + self.interval_s
        return None

    def _sent(self, key, state: _KeyState, msg_id: int, now: float) -> None:
        state.sent_at, state.sent_id = now, msg_id
        state.held_id, state.held = 0, None
        self.keys.move_to_end(key)
