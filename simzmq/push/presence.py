"""The gate's side of presence: it tells the IM workers (which keep who is
online where, for presence in section 7, simzmq/presence.py) and the push
service who is online.

A gate sends each report as an internal request (PresenceReport, keyed by
the gate's id, so one worker relays all of a gate's reports, in order) to
the `im` service; the IM worker answers Ok and publishes the report on
PRESENCE_TOPIC, which the push service subscribes to. So gates need no
socket or bus permission beyond the ones they have. Each report carries,
beside the sessions, the user's local state on this gate (the states of its
sessions added up; 0: no session here) and `ttl_ms`, how long the worker
keeps this gate's states without hearing from it again. Reports: one when a session starts or ends, a snapshot of all
the gate's online users every presence_interval_s (it also repairs reports
lost on the way, e.g. while the push service was starting; a big gate's in
parts, each complete within the span of names it states), one when a
session's SetPresence changed its user's local state ("state"), and "bye" when
the gate stops (simzmq/push/policy.py parse_report;
docs/internal-protocol.md).
"""

from __future__ import annotations

import json
import os

from simzmq.wire import messages as m
from simzmq.wire.codec import BIN

# Users per snapshot report: a big gate's snapshot goes out in parts ("snapshot"
# then "snapshot+"), each well under any frame limit.
SNAPSHOT_PART_USERS = 1000


class PresenceReporter:
    def __init__(self, gate_name: str, interval_s: float, request, ttl_ms: int,
                 part_users: int = SNAPSHOT_PART_USERS):
        """`request(key, origin, payload, callback)`: the gate link's;
        `part_users`: the most users in one part of a snapshot."""
        # A new id each start: what a gate that died had reported expires.
        self.gate_id = f"{gate_name}/{os.urandom(4).hex()}"
        self.interval_s = interval_s
        self.request = request
        self.ttl_ms = ttl_ms
        self.part_users = part_users
        self.number = 0

    def _send(self, report: dict) -> None:
        self.number += 1
        report["gate"] = self.gate_id
        report["n"] = self.number
        report["ttl_ms"] = self.ttl_ms
        payload = BIN.encode(m.PresenceReport(report=json.dumps(report, separators=(",", ":")).encode()), 0)
        # A lost one is repaired by the next snapshot: the answer is not needed.
        self.request(self.gate_id.encode(), b"", payload, lambda _reply: None)

    def session(self, op: str, user: str, session: bytes, state: int) -> None:
        """A session started or ended; `state`: the user's local state after."""
        self._send({"op": op, "user": user, "session": session.hex(), "state": state})

    def state(self, user: str, state: int) -> None:
        """A SetPresence changed the user's local state to `state`."""
        self._send({"op": "state", "user": user, "state": state})

    def snapshot(self, sessions: dict[str, dict[bytes, object]], states: dict[str, int]) -> None:
        """Report every user online here, in parts of at most part_users
        users in name order. Each part names its span (push/policy.py
        report_span): from its first user (the first part: from the lowest
        name) up to the next part's first user (the last part: with no
        end), so the parts cover every name once and each is complete
        within its span alone: a reader applying the first part does not
        take the users of the later ones offline."""
        users = sorted(sessions)
        for start in range(0, max(len(users), 1), self.part_users):
            part = users[start:start + self.part_users]
            report = {"op": "snapshot" if start == 0 else "snapshot+",
                      "users": {u: [s.hex() for s in sessions[u]] for u in part},
                      "states": {u: states.get(u, 1) for u in part}}
            if start > 0:
                report["from"] = part[0]
            if start + self.part_users < len(users):
                report["to"] = users[start + self.part_users]
            self._send(report)

    def close(self) -> None:
        self._send({"op": "bye"})
