"""Majordomo Protocol v0.2 (rfc.zeromq.org spec 18) frames, built and parsed.

Pure: lists of ``bytes`` in, lists of ``bytes`` out, no sockets, no clock.
Frames are given *after* any ROUTER identity frame, i.e. starting with the
empty delimiter a DEALER peer sends first. Anything malformed raises
:class:`MDPError`; the caller logs it and drops the message.

Two backwards-compatible extensions (docs/internal-protocol.md):

* **Credit** — READY may carry one more frame, the ASCII decimal number of
  requests the worker wants to hold at once (default 1, as in plain MDP).
* **Routing key** — for keyed services the first body frame is a routing key;
  that is broker policy and lives in ``simzmq.broker``, not here.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

C_CLIENT = b"MDPC01"
W_WORKER = b"MDPW01"

READY = b"\x01"
REQUEST = b"\x02"
REPLY = b"\x03"
HEARTBEAT = b"\x04"
DISCONNECT = b"\x05"

COMMAND_NAMES = {
    READY: "READY",
    REQUEST: "REQUEST",
    REPLY: "REPLY",
    HEARTBEAT: "HEARTBEAT",
    DISCONNECT: "DISCONNECT",
}

MMI_PREFIX = b"mmi."
MMI_SERVICE = b"mmi.service"
MMI_FOUND = b"200"
MMI_NOT_FOUND = b"404"
MMI_NOT_IMPLEMENTED = b"501"

DEFAULT_CREDIT = 1
# A credit above this is almost certainly a mistake (or hostile): the broker
# would otherwise pile an unbounded number of requests onto one worker.
MAX_CREDIT = 65536
# ZeroMQ identities and service names are short; refusing long ones keeps a
# misbehaving peer from making the broker hold large keys in its tables.
MAX_SERVICE_LEN = 255


class MDPError(ValueError):
    """A message that does not follow 18/MDP (or its simzmq extensions)."""


class WorkerCommand(NamedTuple):
    """One parsed worker → broker or broker → worker command.

    ``service`` and ``credit`` are set for READY; ``client`` and ``body`` for
    REQUEST and REPLY; HEARTBEAT and DISCONNECT carry nothing.
    """

    command: bytes
    service: bytes = b""
    credit: int = DEFAULT_CREDIT
    client: bytes = b""
    body: list[bytes] = []


# --- client side (gate ↔ broker) -------------------------------------------


def build_client_request(service: bytes, body: Sequence[bytes]) -> list[bytes]:
    """Frames a DEALER client sends: ``"" | MDPC01 | service | body…``."""
    return [b"", C_CLIENT, service, *body]


def parse_client_request(frames: Sequence[bytes]) -> tuple[bytes, list[bytes]]:
    """``(service, body)`` of a client request as the broker receives it."""
    return _parse_client(frames)


def build_client_reply(service: bytes, body: Sequence[bytes]) -> list[bytes]:
    """Frames of a reply to a client, without the ROUTER identity."""
    return [b"", C_CLIENT, service, *body]


def parse_client_reply(frames: Sequence[bytes]) -> tuple[bytes, list[bytes]]:
    """``(service, body)`` of a reply as a DEALER client receives it."""
    return _parse_client(frames)


def _parse_client(frames: Sequence[bytes]) -> tuple[bytes, list[bytes]]:
    if len(frames) < 3:
        raise MDPError(f"client message has {len(frames)} frames, needs at least 3")
    if frames[0] != b"":
        raise MDPError("client message does not start with an empty frame")
    if frames[1] != C_CLIENT:
        raise MDPError(f"client message has protocol {bytes(frames[1])[:16]!r}")
    service = frames[2]
    if not service or len(service) > MAX_SERVICE_LEN:
        raise MDPError(f"client message has a service name of {len(service)} bytes")
    return service, list(frames[3:])


# --- worker side (worker ↔ broker) -----------------------------------------


def build_ready(service: bytes, credit: int | None = None) -> list[bytes]:
    """READY; the credit frame is sent only when given (plain MDP has none)."""
    frames = [b"", W_WORKER, READY, service]
    if credit is not None:
        frames.append(str(int(credit)).encode("ascii"))
    return frames


def build_request(client: bytes, body: Sequence[bytes]) -> list[bytes]:
    """REQUEST broker → worker, without the ROUTER identity."""
    return [b"", W_WORKER, REQUEST, client, b"", *body]


def build_reply(client: bytes, body: Sequence[bytes]) -> list[bytes]:
    """REPLY worker → broker."""
    return [b"", W_WORKER, REPLY, client, b"", *body]


def build_heartbeat() -> list[bytes]:
    return [b"", W_WORKER, HEARTBEAT]


def build_disconnect() -> list[bytes]:
    return [b"", W_WORKER, DISCONNECT]


def parse_worker_message(frames: Sequence[bytes]) -> WorkerCommand:
    """A command a worker sent to the broker: READY, REPLY, HEARTBEAT or DISCONNECT."""
    command = _worker_header(frames)
    if command == READY:
        if len(frames) not in (4, 5):
            raise MDPError(f"READY has {len(frames)} frames, needs 4 or 5")
        service = frames[3]
        if not service or len(service) > MAX_SERVICE_LEN:
            raise MDPError(f"READY has a service name of {len(service)} bytes")
        credit = DEFAULT_CREDIT
        if len(frames) == 5:
            credit = parse_credit(frames[4])
        return WorkerCommand(READY, service=service, credit=credit)
    if command == REPLY:
        client, body = _envelope(frames, "REPLY")
        return WorkerCommand(REPLY, client=client, body=body)
    if command == HEARTBEAT or command == DISCONNECT:
        if len(frames) != 3:
            raise MDPError(f"{COMMAND_NAMES[command]} has {len(frames)} frames, needs 3")
        return WorkerCommand(command)
    raise MDPError(f"worker sent command {bytes(command)[:4]!r}, not READY/REPLY/HEARTBEAT/DISCONNECT")


def parse_broker_message(frames: Sequence[bytes]) -> WorkerCommand:
    """A command the broker sent to a worker: REQUEST, HEARTBEAT or DISCONNECT."""
    command = _worker_header(frames)
    if command == REQUEST:
        client, body = _envelope(frames, "REQUEST")
        return WorkerCommand(REQUEST, client=client, body=body)
    if command == HEARTBEAT or command == DISCONNECT:
        if len(frames) != 3:
            raise MDPError(f"{COMMAND_NAMES[command]} has {len(frames)} frames, needs 3")
        return WorkerCommand(command)
    raise MDPError(f"broker sent command {bytes(command)[:4]!r}, not REQUEST/HEARTBEAT/DISCONNECT")


def parse_credit(frame: bytes) -> int:
    """The Credit extension's frame: ASCII decimal, 1 … MAX_CREDIT."""
    if not frame or len(frame) > 6 or not frame.isdigit():
        raise MDPError(f"READY credit {bytes(frame)[:8]!r} is not a decimal number")
    credit = int(frame)
    if not 1 <= credit <= MAX_CREDIT:
        raise MDPError(f"READY credit {credit} is outside 1..{MAX_CREDIT}")
    return credit


def _worker_header(frames: Sequence[bytes]) -> bytes:
    if len(frames) < 3:
        raise MDPError(f"worker message has {len(frames)} frames, needs at least 3")
    if frames[0] != b"":
        raise MDPError("worker message does not start with an empty frame")
    if frames[1] != W_WORKER:
        raise MDPError(f"worker message has protocol {bytes(frames[1])[:16]!r}")
    return frames[2]


def _envelope(frames: Sequence[bytes], name: str) -> tuple[bytes, list[bytes]]:
    # "" | MDPW01 | cmd | client | "" | body…  — one client address frame, as
    # every MDP implementation in the wild sends it.
    if len(frames) < 5:
        raise MDPError(f"{name} has {len(frames)} frames, needs at least 5")
    client = frames[3]
    if not client:
        raise MDPError(f"{name} has an empty client address")
    if frames[4] != b"":
        raise MDPError(f"{name} has no empty frame after the client address")
    return client, list(frames[5:])
