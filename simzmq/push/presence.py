"""The gate's side of presence: it tells the push service who is online.

A gate publishes a report on PRESENCE_TOPIC to every broker's notify_in
(a PUB connected to both, so whichever broker the push service listens to
forwards it): one when a session starts or ends, a snapshot of all its
online users every presence_interval_s (it also repairs reports lost while
a broker was away or the push service was starting), and "bye" when it
stops. Nothing is written to the store. Reports are JSON
(simzmq/push/policy.py parse_report; docs/internal-protocol.md).
"""

from __future__ import annotations

import json
import logging
import os

import zmq

from simzmq.push import PRESENCE_TOPIC

log = logging.getLogger("simzmq.gate")


class PresenceReporter:
    def __init__(self, ctx: zmq.Context, gate_name: str, endpoints: list[str], interval_s: float,
                 configure_socket=None):
        # A new id each start: what a gate that died had reported expires.
        self.gate_id = f"{gate_name}/{os.urandom(4).hex()}"
        self.interval_s = interval_s
        self.number = 0
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 500)
        if configure_socket is not None:
            configure_socket(self.pub, "notify_in")
        for ep in endpoints:
            self.pub.connect(ep)
        self.endpoints = endpoints

    def _send(self, report: dict) -> None:
        self.number += 1
        report["gate"] = self.gate_id
        report["n"] = self.number
        try:
            self.pub.send_multipart([PRESENCE_TOPIC, json.dumps(report, separators=(",", ":")).encode()],
                                    zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # a PUB drops what it cannot send; the next snapshot repairs it

    def session(self, op: str, user: str, session: bytes) -> None:
        self._send({"op": op, "user": user, "session": session.hex()})

    def snapshot(self, sessions: dict[str, dict[bytes, object]]) -> None:
        self._send({"op": "snapshot", "users": {u: [s.hex() for s in mine] for u, mine in sessions.items()}})

    def close(self) -> None:
        self._send({"op": "bye"})
        self.pub.close()
