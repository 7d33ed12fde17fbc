"""The Majordomo broker: a pure routing core and a thin ZeroMQ shell.

:class:`BrokerCore` holds all the policy — workers, services, credit,
rendezvous routing with per-key stickiness, queues, heartbeats and expiry —
and never touches a socket or a clock: every method takes ``now`` and returns
the frames to send as ``(FRONTEND | BACKEND, [identity, …])`` pairs.

:class:`Broker` owns the sockets (ROUTER frontend for gates, ROUTER backend
for workers, XSUB→XPUB for notifications, PUB/SUB with the Binary Star peer)
and runs a blocking ``zmq.Poller`` loop around the core.

See docs/internal-protocol.md for what goes over the wire.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import struct
import threading
import time
from collections import deque
from typing import Callable, Iterable

import zmq

from simzmq import mdp
from simzmq.bus import RefusalLog
from simzmq.notify import NotifyStamper
from simzmq.zmqio import receiver, sender
from simzmq.bstar import BinaryStar, BStarError, State
from simzmq.config import BrokerConfig

log = logging.getLogger("simzmq.broker")

FRONTEND = 0
BACKEND = 1
Out = tuple  # (FRONTEND | BACKEND, list[bytes]) — first frame is the ROUTER identity

DEFAULT_HEARTBEAT_INTERVAL = 0.25
DEFAULT_LIVENESS = 3
# The gate gives up on a request after its own timeout and fails over; a
# request the broker could not hand to any worker for this long has been
# given up on already, so holding it longer only wastes memory.
DEFAULT_REQUEST_TIMEOUT = 5.0
# Bound on requests waiting for a worker, over all services, so a flood of
# requests for a service nobody serves cannot exhaust the broker's memory.
DEFAULT_MAX_QUEUED = 200_000
# The rendezvous winner of a key is cached until the set of workers changes;
# past this many keys the cache is simply dropped and rebuilt on demand.
WINNER_CACHE_LIMIT = 100_000
# A gate counts as connected if it sent a request this recently.
GATE_SEEN_WINDOW = 10.0
# Services counted apart in the metrics after they were forgotten; the
# requests of any more (made-up names) are counted under OTHER_SERVICES.
MAX_SERVICES_COUNTED = 64
OTHER_SERVICES = b"(other)"
# requests_per_s in the published state is averaged over about this long.
RATE_WINDOW_S = 2.0
# The state message lists at most this many gates (the count is exact).
MAX_GATES_LISTED = 100

# A peer that keeps sending what the broker drops gets one log line per
# reason per this many seconds; the next line counts the ones not logged.
DROP_LOG_INTERVAL_S = 10.0

_RID = struct.Struct(">Q")


class _Request:
    __slots__ = ("rid", "client", "service", "key", "body", "address", "deadline", "batched", "framing")

    def __init__(self, rid, client, service, key, body, deadline, batched=False, framing=mdp.MDP1):
        self.rid = rid
        self.client = client
        self.service = service
        self.key = key
        self.body = body
        # Came in a client batch: its reply goes back packed with its
        # neighbours' (the client announced it takes batches).
        self.batched = batched
        # The Majordomo the request came in: its replies go back in it.
        self.framing = framing
        # The client address the worker sees and echoes back in REPLY: the
        # client's ROUTER identity followed by the request id, so a reply is
        # matched to exactly one outstanding request even when one gate has
        # many requests at one worker. Opaque to workers, as Majordomo wants.
        self.address = client + _RID.pack(rid)
        self.deadline = deadline


class _Worker:
    __slots__ = ("identity", "service", "credit", "batches", "framing", "request_head", "heartbeat",
                 "in_flight", "backlog", "expiry", "last_sent", "since")

    def __init__(self, identity, service, credit, now, expiry, batches=False, framing=mdp.MDP1):
        self.identity = identity
        self.service = service
        self.credit = credit
        self.batches = batches  # announced in READY: takes REQUEST_BATCH
        # The Majordomo of its READY: everything it is sent is in it, and
        # anything it sends in another is dropped.
        self.framing = framing
        # Made once per worker; the heartbeat message is sent as it is (the
        # shell never changes a message it sends).
        self.request_head = [identity, *mdp.worker_command_head(framing, mdp.REQUEST)]
        self.heartbeat = [identity, *mdp.worker_command_head(framing, mdp.HEARTBEAT)]
        self.in_flight: dict[int, _Request] = {}  # rid -> request, in dispatch order
        self.backlog: deque[_Request] = deque()   # keyed requests bound here, beyond credit
        self.expiry = expiry
        self.last_sent = now
        self.since = now


class _Service:
    __slots__ = ("name", "keyed", "workers", "waiting", "bindings", "winners", "requests")

    def __init__(self, name: bytes, keyed: bool):
        self.name = name
        self.keyed = keyed
        self.workers: dict[bytes, _Worker] = {}
        # Requests no worker has been chosen for yet, oldest first: for keyed
        # services only while the service has no worker at all; for the
        # others whenever every worker is out of credit.
        self.waiting: deque[_Request] = deque()
        # key -> [worker, number of requests with that key in flight or in
        # that worker's backlog]. While the count is above zero the key stays
        # with that worker, which is what keeps one key's requests in order.
        self.bindings: dict[bytes, list] = {}
        self.winners: dict[bytes, _Worker] = {}
        self.requests = 0


def _framing_name(framing: mdp.Framing) -> str:
    if not framing.v2:
        return "7/MDP"
    return "18/MDP" + ("" if framing.delimited else " without the empty first frame")


def rendezvous_score(key: bytes, identity: bytes) -> bytes:
    """Highest-random-weight score of a worker for a key (highest wins)."""
    return hashlib.blake2b(key + b"|" + identity, digest_size=8).digest()


class BrokerCore:
    """Pure Majordomo routing: no sockets, no clock.

    All methods return a list of ``(FRONTEND | BACKEND, frames)`` where
    ``frames[0]`` is the ROUTER identity to send to.
    """

    def __init__(
        self,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        liveness: int = DEFAULT_LIVENESS,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        keyed_services: Iterable[str | bytes] = ("im",),
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.worker_timeout = heartbeat_interval * liveness
        self.request_timeout = request_timeout
        self.keyed_services = {s.encode() if isinstance(s, str) else bytes(s) for s in keyed_services}
        self.max_queued = max_queued
        self.workers: dict[bytes, _Worker] = {}
        self.services: dict[bytes, _Service] = {}
        self.gates: dict[bytes, float] = {}
        self._next_rid = 1
        self._queued = 0  # requests in services' waiting queues
        # Batches being filled during one call: (destination, identity[, service])
        # -> the frames of a message already placed in that call's output, so
        # entries join it in order and one message per peer goes out.
        self._packs: dict[tuple, list[bytes]] = {}
        # Counters the shell exports as metrics.
        self.requests_total = 0
        self.mmi_total = 0
        self.replies_total = 0
        self.worker_expiries_total = 0
        self.worker_disconnects_total = 0
        self.requests_timed_out_total = 0
        self.requests_dropped_total = 0
        self.requests_requeued_total = 0
        self.malformed_total = 0
        # Requests of services forgotten while idle, so that the per-service
        # totals only ever grow.
        self._forgotten_requests: dict[bytes, int] = {}
        self.drop_log = RefusalLog(DROP_LOG_INTERVAL_S)

    # --- input --------------------------------------------------------------

    def on_client(self, identity: bytes, frames: list[bytes], now: float) -> list[Out]:
        """A message from a client (gate) on the frontend, after its identity:
        one request, or a batch of them (split here, each entry a request of
        its own from then on: credit, key order, requeue and resend)."""
        try:
            framing, batched, service_name, body = mdp.parse_client_to_broker(frames)
            if batched:
                if service_name not in self.keyed_services:
                    raise mdp.MDPError(mdp.BAD_BATCH, f"batch for {service_name!r}, which is not a keyed service")
                if len(body) % 2:
                    raise mdp.MDPError(mdp.BAD_BATCH, f"batch with {len(body)} entry frames, not key and body pairs")
        except mdp.MDPError as exc:
            self.malformed_total += 1
            self.log_drop("client", identity, exc.reason, str(exc), now)
            return []
        self.gates[identity] = now
        out: list[Out] = []
        self._packs.clear()
        if batched:
            service = self.services.get(service_name) or self._service(service_name)
            for i in range(0, len(body), 2):
                self._accept(identity, service, body[i:i + 2], now, out, True, framing)
            return out
        if service_name.startswith(mdp.MMI_PREFIX):
            # The gates' reachability probes: counted apart, not as requests.
            self.mmi_total += 1
            self._mmi(identity, service_name, body, framing, now, out)
            return out
        service = self.services.get(service_name)
        if service is None:
            service = self._service(service_name)
        self._accept(identity, service, body, now, out, False, framing)
        return out

    def _accept(self, identity: bytes, service: _Service, body: list[bytes], now: float, out: list[Out],
                batched: bool, framing: mdp.Framing) -> None:
        """One request (or one entry of a batch) for ``service``."""
        self.requests_total += 1
        service.requests += 1
        service_name = service.name
        if service.keyed:
            if not body:
                self.malformed_total += 1
                self.log_drop("client", identity, "request for a keyed service without a routing key",
                              f"request for {service_name!r} has no body", now)
                return
            key = body[0]
        else:
            key = None
        rid = self._next_rid
        self._next_rid = rid + 1
        request = _Request(rid, identity, service_name, key, body, now + self.request_timeout, batched, framing)
        if service.keyed:
            self._route_keyed(service, request, now, out)
        else:
            self._enqueue(service, request)
            self._dispatch_unkeyed(service, now, out)

    def on_worker(self, identity: bytes, frames: list[bytes], now: float) -> list[Out]:
        """A message from a worker on the backend, after its identity."""
        try:
            cmd = mdp.parse_worker_message(frames)
        except mdp.MDPError as exc:
            self.malformed_total += 1
            self.log_drop("worker", identity, exc.reason, str(exc), now)
            return []
        out: list[Out] = []
        self._packs.clear()
        worker = self.workers.get(identity)
        command = cmd.command
        if worker is not None and cmd.framing != worker.framing and command != mdp.READY:
            self.malformed_total += 1
            self.log_drop("worker", identity, "a framing other than its READY's",
                          f"{_framing_name(cmd.framing)} command from a worker that sent READY in "
                          f"{_framing_name(worker.framing)}", now)
            return out
        # Majordomo: anything but READY from a worker we do not know gets
        # DISCONNECT, so a worker that outlived our memory of it (broker
        # restart, expiry) comes back with READY. Whatever is answered, is
        # answered in the framing of the message that asked for it.
        disconnect = [identity, *mdp.worker_command_head(cmd.framing, mdp.DISCONNECT)]
        if command == mdp.REPLY or command == mdp.REPLY_BATCH:
            if worker is None:
                out.append((BACKEND, disconnect))
                return out
            worker.expiry = now + self.worker_timeout
            if command == mdp.REPLY:
                self._on_reply(worker, cmd.client, cmd.body, now, out, cmd.final)
            else:
                # Any subset of what the worker holds may be answered; the
                # rest stays in flight (and is re-sent if the worker goes).
                for client, body in cmd.entries:
                    self._on_reply(worker, client, [body], now, out)
        elif command == mdp.HEARTBEAT:
            if worker is None:
                out.append((BACKEND, disconnect))
            else:
                worker.expiry = now + self.worker_timeout
        elif command == mdp.READY:
            if worker is not None:
                log.info("worker %s sent READY twice; disconnecting it", identity.hex())
                self._remove_worker(worker, now, out)
                out.append((BACKEND, disconnect))
            elif cmd.service.startswith(mdp.MMI_PREFIX):
                log.info("worker %s offered reserved service %r; disconnecting it", identity.hex(), cmd.service)
                out.append((BACKEND, disconnect))
            else:
                self._add_worker(identity, cmd.service, cmd.credit, now, out, cmd.batches, cmd.framing)
        else:  # DISCONNECT
            if worker is not None:
                self.worker_disconnects_total += 1
                log.info("worker %s (%s) disconnected", identity.hex(), worker.service.decode(errors="replace"))
                self._remove_worker(worker, now, out)
        return out

    def tick(self, now: float) -> list[Out]:
        """Heartbeats to workers, expiry of silent workers and stale requests.

        Call about once per heartbeat interval.
        """
        out: list[Out] = []
        self._packs.clear()
        expired = [w for w in self.workers.values() if w.expiry <= now]
        for worker in expired:
            self.worker_expiries_total += 1
            log.info("worker %s (%s) expired: silent for %.3fs with %d in flight",
                     worker.identity.hex(), worker.service.decode(errors="replace"),
                     self.worker_timeout, len(worker.in_flight))
            self._remove_worker(worker, now, out)
        # Heartbeat workers we have sent nothing to for half an interval, so
        # no worker goes more than 1.5 intervals without hearing from us.
        quiet_since = now - self.heartbeat_interval * 0.5
        for worker in self.workers.values():
            if worker.last_sent <= quiet_since:
                worker.last_sent = now
                out.append((BACKEND, worker.heartbeat))
        if self._queued:
            for service in self.services.values():
                waiting = service.waiting
                while waiting and waiting[0].deadline <= now:
                    request = waiting.popleft()
                    self._queued -= 1
                    self.requests_timed_out_total += 1
                    log.info("request for %r from %s timed out waiting for a worker",
                             request.service, request.client.hex())
        # Forget services nobody serves or waits for, so requests for made-up
        # service names do not grow the table forever.
        idle = [name for name, s in self.services.items() if not s.workers and not s.waiting]
        forgotten = self._forgotten_requests
        for name in idle:
            service = self.services.pop(name)
            key = name if name in forgotten or len(forgotten) < MAX_SERVICES_COUNTED else OTHER_SERVICES
            forgotten[key] = forgotten.get(key, 0) + service.requests
        if len(self.gates) > 64:
            stale = now - GATE_SEEN_WINDOW
            for identity in [g for g, seen in self.gates.items() if seen < stale]:
                del self.gates[identity]
        return out

    def disconnect_all(self) -> list[Out]:
        """DISCONNECT to every worker, for a clean shutdown."""
        return [(BACKEND, [identity, *mdp.worker_command_head(w.framing, mdp.DISCONNECT)])
                for identity, w in self.workers.items()]

    def log_drop(self, side: str, peer: bytes, reason: str, detail: str, now: float) -> None:
        """Log a message dropped for ``reason``: the first at once, then one
        line per reason per DROP_LOG_INTERVAL_S with the count of those not
        logged since, so a peer that keeps sending junk cannot flood the log.
        The caller counts it."""
        suppressed = self.drop_log.should_log(side, reason.encode(), "", now)
        if suppressed is not None:
            more = f" ({suppressed} more dropped for this reason since the last line)" if suppressed else ""
            log.warning("dropped a %s message%s: %s%s", side, f" from {peer.hex()}" if peer else "", detail, more)

    # --- read-only views for the shell, the monitor and the metrics ---------
    #
    # The metrics read these from the HTTP server's thread while the broker's
    # loop changes the tables: each walks a copy (list() of a dict is one step
    # under the GIL), never the live dict.

    def queue_depth(self) -> int:
        return self._queued + sum(len(w.backlog) for w in list(self.workers.values()))

    def in_flight(self) -> int:
        return sum(len(w.in_flight) for w in list(self.workers.values()))

    def gate_count(self, now: float) -> int:
        stale = now - GATE_SEEN_WINDOW
        return sum(1 for seen in list(self.gates.values()) if seen >= stale)

    def requests_by_service(self) -> dict[str, int]:
        """Requests received per service since the start, idle services
        forgotten since included."""
        counts = dict(self._forgotten_requests)
        for service in list(self.services.values()):
            counts[service.name] = counts.get(service.name, 0) + service.requests
        return {name.decode(errors="replace"): n for name, n in counts.items()}

    def workers_by_service(self) -> dict[str, int]:
        return {s.name.decode(errors="replace"): len(s.workers) for s in list(self.services.values())}

    def least_recently_heard(self, now: float) -> float:
        """Seconds since the live worker heard from longest ago spoke (0: none)."""
        oldest = min((w.expiry for w in list(self.workers.values())), default=None)
        return 0.0 if oldest is None else max(0.0, now - (oldest - self.worker_timeout))

    def snapshot(self, now: float) -> dict:
        return {
            "workers": [
                {
                    "identity": w.identity.hex(),
                    "service": w.service.decode(errors="replace"),
                    "credit": w.credit,
                    "in_flight": len(w.in_flight),
                    "backlog": len(w.backlog),
                    "heard_ago": round(max(0.0, now - (w.expiry - self.worker_timeout)), 3),
                    "up_for": round(now - w.since, 3),
                }
                for w in self.workers.values()
            ],
            "services": {
                s.name.decode(errors="replace"): {
                    "workers": len(s.workers),
                    "waiting": len(s.waiting),
                    "requests": s.requests,
                }
                for s in self.services.values()
            },
            "gates": self.gate_count(now),
            "queue_depth": self.queue_depth(),
            "in_flight": self.in_flight(),
            "requests_total": self.requests_total,
            "mmi_total": self.mmi_total,
            "replies_total": self.replies_total,
        }

    # --- internals --------------------------------------------------------

    def _service(self, name: bytes) -> _Service:
        service = _Service(name, name in self.keyed_services)
        self.services[name] = service
        return service

    def _mmi(self, client: bytes, service_name: bytes, body: list[bytes], framing: mdp.Framing, now: float,
             out: list[Out]) -> None:
        if service_name == mdp.MMI_SERVICE:
            if not body:
                self.malformed_total += 1
                self.log_drop("client", client, "mmi.service without a service name",
                              "mmi.service request has no body", now)
                return
            service = self.services.get(body[0])
            code = mdp.MMI_FOUND if service is not None and service.workers else mdp.MMI_NOT_FOUND
        elif service_name == mdp.MMI_BATCH:
            code = mdp.MMI_FOUND
        else:
            code = mdp.MMI_NOT_IMPLEMENTED
        out.append((FRONTEND, [client, *mdp.client_reply_head(framing, service_name), code]))

    def _enqueue(self, service: _Service, request: _Request) -> bool:
        if self._queued >= self.max_queued:
            self.requests_dropped_total += 1
            log.info("dropped request for %r from %s: %d requests already waiting",
                     request.service, request.client.hex(), self._queued)
            return False
        service.waiting.append(request)
        self._queued += 1
        return True

    def _send(self, worker: _Worker, request: _Request, now: float, out: list[Out]) -> None:
        worker.in_flight[request.rid] = request
        worker.last_sent = now
        body = request.body
        pack_id = (BACKEND, worker.identity)
        if worker.batches and len(body) == 2:
            pack = self._packs.get(pack_id)
            if pack is None:
                pack = self._packs[pack_id] = [worker.identity, b"", mdp.W_WORKER, mdp.REQUEST_BATCH]
                out.append((BACKEND, pack))
            pack += (request.address, body[0], body[1])
            return
        # Whatever goes to this worker after a plain message starts a new
        # batch behind it, so the worker sees everything in order.
        self._packs.pop(pack_id, None)
        out.append((BACKEND, [*worker.request_head, request.address, b"", *body]))

    def _winner(self, service: _Service, key: bytes) -> _Worker:
        worker = service.winners.get(key)
        if worker is None:
            best = None
            for candidate in service.workers.values():
                score = (rendezvous_score(key, candidate.identity), candidate.identity)
                if best is None or score > best:
                    best = score
                    worker = candidate
            if len(service.winners) >= WINNER_CACHE_LIMIT:
                service.winners.clear()
            service.winners[key] = worker
        return worker

    def _route_keyed(self, service: _Service, request: _Request, now: float, out: list[Out]) -> None:
        key = request.key
        binding = service.bindings.get(key)
        if binding is not None:
            worker = binding[0]
            binding[1] += 1
        elif service.workers:
            worker = self._winner(service, key)
            service.bindings[key] = [worker, 1]
        else:
            self._enqueue(service, request)
            return
        if not worker.backlog and len(worker.in_flight) < worker.credit:
            self._send(worker, request, now, out)
        else:
            worker.backlog.append(request)

    def _dispatch_unkeyed(self, service: _Service, now: float, out: list[Out]) -> None:
        waiting = service.waiting
        workers = service.workers
        while waiting:
            chosen = None
            for worker in workers.values():
                if len(worker.in_flight) < worker.credit:
                    chosen = worker
                    break
            if chosen is None:
                return
            # Move the chosen worker to the back so work spreads round-robin.
            del workers[chosen.identity]
            workers[chosen.identity] = chosen
            while waiting and len(chosen.in_flight) < chosen.credit:
                self._queued -= 1
                self._send(chosen, waiting.popleft(), now, out)

    def _on_reply(self, worker: _Worker, address: bytes, body: list[bytes], now: float, out: list[Out],
                  final: bool = True) -> None:
        """A reply (or, ``final`` false, an 18/MDP PARTIAL) from ``worker``."""
        request = None
        if len(address) > _RID.size:
            rid = _RID.unpack_from(address, len(address) - _RID.size)[0]
            request = worker.in_flight.pop(rid, None) if final else worker.in_flight.get(rid)
        if request is None:
            # Not malformed: a late answer to a request already re-sent
            # elsewhere (the worker was expired) is part of failing over.
            self.log_drop("worker", worker.identity, "a reply for a request the worker does not hold",
                          f"{'reply' if final else 'PARTIAL'} for a request the worker does not hold", now)
            return
        pack_id = (FRONTEND, request.client, request.service)
        if not final:
            # A part of the answer, for a client that can take parts; a 7/MDP
            # client waits for its one reply, the FINAL. The request stays
            # in flight, holding its credit and its key's binding.
            if request.framing.v2:
                self._packs.pop(pack_id, None)
                head = mdp.client_reply_head(request.framing, request.service, False)
                out.append((FRONTEND, [request.client, *head, *body]))
            return
        self.replies_total += 1
        if request.batched and len(body) == 1:
            pack = self._packs.get(pack_id)
            if pack is None:
                pack = self._packs[pack_id] = [request.client, b"", mdp.C_BATCH, request.service]
                out.append((FRONTEND, pack))
            pack.append(body[0])
        else:
            self._packs.pop(pack_id, None)
            out.append((FRONTEND, [request.client, *mdp.client_reply_head(request.framing, request.service),
                                   *body]))
        service = self.services[worker.service]
        if service.keyed:
            binding = service.bindings.get(request.key)
            if binding is not None:
                binding[1] -= 1
                if binding[1] <= 0:
                    del service.bindings[request.key]
            backlog = worker.backlog
            while backlog and len(worker.in_flight) < worker.credit:
                self._send(worker, backlog.popleft(), now, out)
        else:
            self._dispatch_unkeyed(service, now, out)

    def _add_worker(self, identity: bytes, service_name: bytes, credit: int, now: float, out: list[Out],
                    batches: bool = False, framing: mdp.Framing = mdp.MDP1) -> None:
        worker = _Worker(identity, service_name, credit, now, now + self.worker_timeout, batches, framing)
        self.workers[identity] = worker
        service = self.services.get(service_name) or self._service(service_name)
        service.workers[identity] = worker
        service.winners.clear()
        log.info("worker %s ready for %r in %s with credit %d%s (%d workers for it)",
                 identity.hex(), service_name, _framing_name(framing), credit, ", batches" if batches else "",
                 len(service.workers))
        self._drain(service, now, out)

    def _remove_worker(self, worker: _Worker, now: float, out: list[Out]) -> None:
        del self.workers[worker.identity]
        service = self.services[worker.service]
        del service.workers[worker.identity]
        service.winners.clear()
        # What the worker held, oldest first: in flight in dispatch order,
        # then its backlog. Re-routing them before anything newer keeps each
        # key's order; the keys' bindings to this worker go with it.
        held = list(worker.in_flight.values())
        held.extend(worker.backlog)
        worker.in_flight.clear()
        worker.backlog.clear()
        if not held:
            return
        self.requests_requeued_total += len(held)
        if service.keyed:
            for request in held:
                binding = service.bindings.get(request.key)
                if binding is not None and binding[0] is worker:
                    del service.bindings[request.key]
            if not service.workers:
                # Nobody left: they wait, ahead of anything newer.
                for request in held:
                    request.deadline = now + self.request_timeout
                service.waiting.extendleft(reversed(held))
                self._queued += len(held)
                return
            for request in held:
                self._route_keyed(service, request, now, out)
        else:
            for request in held:
                request.deadline = now + self.request_timeout
            service.waiting.extendleft(reversed(held))
            self._queued += len(held)
            self._dispatch_unkeyed(service, now, out)

    def _drain(self, service: _Service, now: float, out: list[Out]) -> None:
        """Hand requests that were waiting for a worker to the workers now there."""
        if not service.waiting:
            return
        if service.keyed:
            waiting = service.waiting
            service.waiting = deque()
            self._queued -= len(waiting)
            for request in waiting:
                self._route_keyed(service, request, now, out)
        else:
            self._dispatch_unkeyed(service, now, out)


# --- the shell --------------------------------------------------------------


class Broker:
    """A Majordomo broker process: sockets and a Poller loop around BrokerCore.

    `cfg` is the region's [broker] section; this broker binds the endpoints of
    its `role` and follows the other role's state endpoint as its Binary Star
    peer. An empty state endpoint means no such socket: a broker whose peer's
    is empty runs alone and is simply active (tests and embedding; a checked
    configuration always has both). `metrics_host` is where /metrics listens
    (region.metrics_host), on this role's metrics_port (0: none).
    ``configure_socket(socket, name)`` is called on every socket before it
    binds or connects (CURVE, for instance); ``name`` is one of frontend,
    backend, notify_in, notify_out, state_pub, peer_state.
    ``auth_counts()``, if given, returns the bus authentication counts
    (``{"accepted": {socket: n}, "refused": {socket: n}}``) for the state
    message and the metrics.
    """

    def __init__(self, cfg: BrokerConfig, role: str, metrics_host: str = "127.0.0.1", *,
                 context: zmq.Context | None = None,
                 configure_socket: Callable[[zmq.Socket, str], None] | None = None,
                 auth_counts: Callable[[], dict] | None = None,
                 max_queued: int = DEFAULT_MAX_QUEUED,
                 install_signal_handlers: bool = True) -> None:
        if role not in ("primary", "backup"):
            raise ValueError(f"role must be 'primary' or 'backup', not {role!r}")
        mine = cfg.role(role)
        peer = cfg.role("backup" if role == "primary" else "primary")
        self.endpoints = {
            "frontend": mine.frontend,
            "backend": mine.backend,
            "notify_in": mine.notify_in,
            "notify_out": mine.notify_out,
            "state_pub": mine.state or None,
            "peer_state": peer.state or None,
        }
        self.role = role
        self.heartbeat_interval = cfg.heartbeat_ms / 1000
        self.peer_heartbeat = cfg.peer_heartbeat_ms / 1000
        self.metrics_port = mine.metrics_port or None
        self.metrics_addr = metrics_host
        self.core = BrokerCore(self.heartbeat_interval, cfg.liveness, cfg.request_timeout_ms / 1000,
                               cfg.keyed_services, max_queued)
        self.bstar: BinaryStar | None = None
        self._context = context
        self._configure_socket = configure_socket
        self._install_signal_handlers = install_signal_handlers
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once every socket is bound
        self.fatal: BStarError | None = None
        self.state = State.ACTIVE
        self._dropped_passive = 0
        self._dropped_notifications = 0
        self.stamper = NotifyStamper()
        self._bound: dict[str, str] = {}
        self.liveness = cfg.liveness
        self.auth_counts = auth_counts
        # Times this broker went from passive to active (took over from its peer).
        self.failovers = 0
        self.notifications_total = 0
        self._started = time.monotonic()
        self._rate_samples: deque = deque()  # (now, requests_total), for requests_per_s

    def stop(self) -> None:
        """Ask the loop to end; safe from another thread or a signal handler."""
        self._stop.set()

    @property
    def bound(self) -> dict[str, str]:
        """The endpoints actually bound (tcp ports chosen by ``:*`` resolved)."""
        return dict(self._bound)

    def run(self) -> None:
        """Serve until stop(), SIGTERM or SIGINT. Raises BStarError on a fatal
        Binary Star condition (dual active/passive) after closing the sockets."""
        if self._install_signal_handlers and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self._stop.set())
        ctx = self._context or zmq.Context.instance()
        sockets: list[zmq.Socket] = []

        def make(kind: int, name: str) -> zmq.Socket:
            sock = ctx.socket(kind)
            sock.linger = 0
            sockets.append(sock)
            if self._configure_socket is not None:
                self._configure_socket(sock, name)
            return sock

        try:
            frontend = make(zmq.ROUTER, "frontend")
            backend = make(zmq.ROUTER, "backend")
            for sock in (frontend, backend):
                # A gate or worker that reconnects with the same identity
                # takes over its old slot instead of being refused.
                sock.router_handover = 1
                sock.sndhwm = 100_000
                sock.rcvhwm = 100_000
            notify_in = make(zmq.XSUB, "notify_in")
            notify_out = make(zmq.XPUB, "notify_out")
            notify_out.sndhwm = 100_000
            notify_in.rcvhwm = 100_000
            for name, sock in (("frontend", frontend), ("backend", backend),
                               ("notify_in", notify_in), ("notify_out", notify_out)):
                sock.bind(self.endpoints[name])
                self._bound[name] = sock.last_endpoint.decode()
            state_pub = peer_sub = None
            if self.endpoints["state_pub"]:
                state_pub = make(zmq.PUB, "state_pub")
                state_pub.bind(self.endpoints["state_pub"])
                self._bound["state_pub"] = state_pub.last_endpoint.decode()
            if self.endpoints["peer_state"]:
                peer_sub = make(zmq.SUB, "peer_state")
                peer_sub.setsockopt(zmq.SUBSCRIBE, b"")
                peer_sub.connect(self.endpoints["peer_state"])
            self._start_metrics()
            self._loop(frontend, backend, notify_in, notify_out, state_pub, peer_sub)
        finally:
            for sock in sockets:
                sock.close(linger=0)
            log.info("broker stopped")
        if self.fatal is not None:
            raise self.fatal

    # --- loop ---------------------------------------------------------------

    def _loop(self, frontend, backend, notify_in, notify_out, state_pub, peer_sub) -> None:
        core = self.core
        now = time.monotonic()
        if peer_sub is not None:
            self.bstar = BinaryStar(self.role == "primary", now, 2 * self.peer_heartbeat)
            self.state = self.bstar.state
        log.info("broker %s (%s) serving: frontend %s, backend %s, notify %s -> %s%s",
                 self.role, self.state.value, self._bound["frontend"], self._bound["backend"],
                 self._bound["notify_in"], self._bound["notify_out"],
                 f", state {self._bound['state_pub']}" if state_pub is not None else "")
        if peer_sub is not None:
            log.info("binary star peer state at %s", self.endpoints["peer_state"])
        self.ready.set()

        poller = zmq.Poller()
        poller.register(frontend, zmq.POLLIN)
        poller.register(backend, zmq.POLLIN)
        poller.register(notify_in, zmq.POLLIN)
        poller.register(notify_out, zmq.POLLIN)
        if peer_sub is not None:
            poller.register(peer_sub, zmq.POLLIN)
        batch = 512  # messages drained per socket per poll, so one busy socket cannot starve the rest
        next_tick = now + self.heartbeat_interval
        next_state = now
        stop = self._stop
        bstar = self.bstar
        stamper = self.stamper
        send_frontend = sender(frontend)
        send_backend = sender(backend)
        send_notify_out = sender(notify_out)
        recv_frontend = receiver(frontend)
        recv_backend = receiver(backend)
        recv_notify_in = receiver(notify_in)

        def send(outs):
            for dest, frames in outs:
                if dest == BACKEND:
                    send_backend(frames)
                else:
                    send_frontend(frames)

        while not stop.is_set():
            timeout = max(0.0, min(next_tick, next_state if state_pub is not None else next_tick) - now)
            ready = dict(poller.poll(timeout * 1000))
            now = time.monotonic()

            if backend in ready:
                for _ in range(batch):
                    frames = recv_backend()
                    if frames is None:
                        break
                    outs = core.on_worker(frames[0], frames[1:], now)
                    if outs:
                        send(outs)

            if frontend in ready:
                for _ in range(batch):
                    frames = recv_frontend()
                    if frames is None:
                        break
                    if bstar is not None and not bstar.accepting:
                        accepted = bstar.on_client_request(now)
                        self._state_changed()
                        if not accepted:
                            # A passive broker drops requests; the gate times
                            # out and fails over to the active one.
                            self._dropped_passive += 1
                            continue
                    outs = core.on_client(frames[0], frames[1:], now)
                    if outs:
                        send(outs)

            if notify_in in ready:
                for _ in range(batch):
                    frames = recv_notify_in()
                    if frames is None:
                        break
                    stamped = stamper.stamp(frames)
                    if stamped is None:
                        self._dropped_notifications += 1
                        core.log_drop("notification", b"", "malformed notification",
                                      f"malformed notification of {len(frames)} frames", now)
                        continue
                    send_notify_out(stamped)
                    self.notifications_total += 1

            if notify_out in ready:
                # Subscriptions flow upstream so workers' PUB sockets filter
                # at the source.
                for _ in range(batch):
                    try:
                        sub = notify_out.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    stamper.subscription(sub)
                    notify_in.send(sub)

            if peer_sub is not None and peer_sub in ready:
                for _ in range(batch):
                    try:
                        frames = peer_sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    peer = parse_state_message(frames)
                    if peer is None:
                        core.log_drop("peer state", b"", "malformed state message",
                                      f"malformed state message of {len(frames)} frames", now)
                        continue
                    try:
                        bstar.on_peer_state(peer, now)
                    except BStarError as exc:
                        log.error("fatal: %s; stopping", exc)
                        self.fatal = exc
                        stop.set()
                        break
                    self._state_changed()

            if now >= next_tick:
                outs = core.tick(now)
                if outs:
                    send(outs)
                next_tick = now + self.heartbeat_interval

            if state_pub is not None and now >= next_state:
                state_pub.send_multipart([b"state", json.dumps(self.status(now)).encode()])
                next_state = now + self.peer_heartbeat

        outs = core.disconnect_all()
        if outs and self.fatal is None:
            send(outs)

    def _state_changed(self) -> None:
        new = self.bstar.state
        if new is not self.state:
            peer = self.bstar.peer_state.value if self.bstar.peer_state else "unseen"
            log.info("binary star: %s -> %s (peer %s)", self.state.value, new.value, peer)
            if new is State.ACTIVE and self.state is State.PASSIVE:
                self.failovers += 1
                log.info("failover: %s broker is now active", self.role)
            self.state = new

    def status(self, now: float) -> dict:
        """What this broker publishes on its state socket (docs/internal-protocol.md)."""
        status = {
            "role": self.role,
            "state": self.state.value,
            "peer_state": None,
            "peer_heard_ago": None,
        }
        if self.bstar is not None:
            if self.bstar.peer_state is not None:
                status["peer_state"] = self.bstar.peer_state.value
            if self.bstar.peer_seen is not None:
                status["peer_heard_ago"] = round(now - self.bstar.peer_seen, 3)
        status.update(self.core.snapshot(now))
        core = self.core
        stale = now - GATE_SEEN_WINDOW
        gates = sorted(((now - seen, identity) for identity, seen in core.gates.items() if seen >= stale))
        status.update({
            "pid": os.getpid(),
            "up_for": round(now - self._started, 3),
            "wall_time": round(time.time(), 3),
            "endpoints": dict(self._bound),
            "heartbeat_ms": round(self.heartbeat_interval * 1000),
            "liveness": self.liveness,
            "peer_heartbeat_ms": round(self.peer_heartbeat * 1000),
            "requests_per_s": self._requests_per_s(now),
            "failovers": self.failovers,
            "gates_seen": [{"identity": identity.hex(), "heard_ago": round(ago, 3)}
                           for ago, identity in gates[:MAX_GATES_LISTED]],
            "notifications_total": self.notifications_total,
            "worker_expiries_total": core.worker_expiries_total,
            "worker_disconnects_total": core.worker_disconnects_total,
            "request_timeouts_total": core.requests_timed_out_total,
            "requests_dropped_total": core.requests_dropped_total,
            "requests_requeued_total": core.requests_requeued_total,
            "passive_drops_total": self._dropped_passive,
            "malformed_total": core.malformed_total + self._dropped_notifications,
            "curve": self.auth_counts is not None,
        })
        if self.auth_counts is not None:
            status["auth"] = self.auth_counts()
        return status

    def _requests_per_s(self, now: float) -> float:
        samples = self._rate_samples
        samples.append((now, self.core.requests_total))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()
        first_t, first_n = samples[0]
        if now - first_t <= 0:
            return 0.0
        return round((self.core.requests_total - first_n) / (now - first_t), 1)

    # --- metrics ------------------------------------------------------------

    def _start_metrics(self) -> None:
        if self.metrics_port is None:
            return
        import prometheus_client as prom

        registry = prom.CollectorRegistry()
        registry.register(BrokerCollector(self))
        prom.start_http_server(self.metrics_port, self.metrics_addr, registry=registry)
        log.info("metrics on http://%s:%d/metrics", self.metrics_addr, self.metrics_port)


class BrokerCollector:
    """The broker's /metrics, read from its counts when scraped: the loop
    counts with plain ints and never touches prometheus_client. collect() runs
    on the HTTP server's thread; the core's views walk copies of its tables."""

    def __init__(self, broker: Broker):
        self.broker = broker

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        broker, core, now = self.broker, self.broker.core, time.monotonic()
        requests = CounterMetricFamily("simzmq_broker_requests", "Client requests received, by service",
                                       labels=["service"])
        for service, n in core.requests_by_service().items():
            requests.add_metric([service], n)
        yield requests
        yield CounterMetricFamily("simzmq_broker_mmi_requests",
                                  "MMI requests (the gates' reachability probes), not counted as requests",
                                  value=core.mmi_total)
        yield CounterMetricFamily("simzmq_broker_replies", "Replies forwarded to clients", value=core.replies_total)
        yield CounterMetricFamily("simzmq_broker_worker_expiries", "Workers expired for silence",
                                  value=core.worker_expiries_total)
        yield CounterMetricFamily("simzmq_broker_worker_disconnects", "Workers that sent DISCONNECT",
                                  value=core.worker_disconnects_total)
        yield CounterMetricFamily("simzmq_broker_request_timeouts",
                                  "Requests dropped after waiting request_timeout for a worker",
                                  value=core.requests_timed_out_total)
        yield CounterMetricFamily("simzmq_broker_requests_requeued", "Requests re-sent after their worker went away",
                                  value=core.requests_requeued_total)
        yield CounterMetricFamily("simzmq_broker_requests_dropped",
                                  "Requests dropped because max_queued requests were already waiting",
                                  value=core.requests_dropped_total)
        yield CounterMetricFamily("simzmq_broker_malformed_messages", "Malformed messages dropped",
                                  value=core.malformed_total)
        yield CounterMetricFamily("simzmq_broker_malformed_notifications", "Malformed notifications dropped",
                                  value=broker._dropped_notifications)
        yield CounterMetricFamily("simzmq_broker_passive_drops", "Client requests dropped while passive",
                                  value=broker._dropped_passive)
        yield CounterMetricFamily("simzmq_broker_failovers", "Times this broker went from passive to active",
                                  value=broker.failovers)
        yield CounterMetricFamily("simzmq_broker_notifications", "Notifications forwarded from workers to gates",
                                  value=broker.notifications_total)
        workers = GaugeMetricFamily("simzmq_broker_workers", "Live workers, by service", labels=["service"])
        for service, n in core.workers_by_service().items():
            workers.add_metric([service], n)
        yield workers
        yield GaugeMetricFamily("simzmq_broker_queue_depth", "Requests waiting for a worker or its credit",
                                value=core.queue_depth())
        yield GaugeMetricFamily("simzmq_broker_in_flight", "Requests held by workers", value=core.in_flight())
        yield GaugeMetricFamily("simzmq_broker_gates", "Gates that sent a request in the last 10 s",
                                value=core.gate_count(now))
        yield GaugeMetricFamily("simzmq_broker_active", "1 if this broker serves clients (Binary Star active)",
                                value=1 if broker.state is State.ACTIVE else 0)
        bstar = broker.bstar
        peer_seen = bstar.peer_seen if bstar is not None else None
        yield GaugeMetricFamily("simzmq_broker_peer_heard_seconds",
                                "Seconds since the Binary Star peer's state was last heard (-1: never)",
                                value=-1 if peer_seen is None else now - peer_seen)
        yield GaugeMetricFamily("simzmq_broker_worker_heard_max_seconds",
                                "Seconds since the least recently heard live worker spoke",
                                value=core.least_recently_heard(now))
        if broker.auth_counts is not None:
            counts = broker.auth_counts()
            refused = CounterMetricFamily("simzmq_broker_auth_refusals",
                                          "Bus connections refused by the ZAP handler (unknown or wrong-role CURVE "
                                          "key), by socket", labels=["socket"])
            for socket_name, n in counts.get("refused", {}).items():
                refused.add_metric([socket_name], n)
            yield refused
            accepted = CounterMetricFamily("simzmq_broker_auth_accepts",
                                           "Bus connections accepted by the ZAP handler, by socket", labels=["socket"])
            for socket_name, n in counts.get("accepted", {}).items():
                accepted.add_metric([socket_name], n)
            yield accepted


def parse_state_message(frames: list[bytes]) -> State | None:
    """The peer's Binary Star state from a state message, or None if malformed."""
    if len(frames) != 2 or frames[0] != b"state":
        return None
    try:
        status = json.loads(frames[1])
        return State(status["state"])
    except (ValueError, KeyError, TypeError):
        return None
