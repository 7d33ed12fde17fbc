"""Majordomo frames as the zguide brokers speak them (7/MDP: ``MDPC01`` /
``MDPW01``), built and parsed, with simzmq's announced extensions.

Pure: lists of ``bytes`` in, lists of ``bytes`` out, no sockets, no clock.
Frames are given *after* any ROUTER identity frame, i.e. starting with the
empty delimiter a DEALER peer sends first. Anything malformed raises
:class:`MDPError`; the caller logs it and drops the message.

Three backwards-compatible extensions (docs/internal-protocol.md):

* **Credit** — READY may carry one more frame, the ASCII decimal number of
  requests the worker wants to hold at once (default 1, as in plain MDP).
* **Routing key** — for keyed services the first body frame is a routing key;
  that is broker policy and lives in ``simzmq.broker``, not here.
* **Batches** — many requests (or replies) in one message, so a hop's cost is
  paid per batch. Only between peers that announced it: a worker by a
  ``batch`` word in READY's features frame, a client by asking ``mmi.batch``
  (answered ``200``). A plain MDP peer never sees a batch.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

C_CLIENT = b"MDPC01"
W_WORKER = b"MDPW01"
# The protocol frame of a client batch (both directions): a plain 7/MDP broker
# drops it as a foreign protocol, so nothing is misread if one gets it.
C_BATCH = b"MDPC01B"

READY = b"\x01"
REQUEST = b"\x02"
REPLY = b"\x03"
HEARTBEAT = b"\x04"
DISCONNECT = b"\x05"
# Batch commands, numbered away from both 7/MDP and 18/MDP's commands.
REQUEST_BATCH = b"\x12"
REPLY_BATCH = b"\x13"

COMMAND_NAMES = {
    READY: "READY",
    REQUEST: "REQUEST",
    REPLY: "REPLY",
    HEARTBEAT: "HEARTBEAT",
    DISCONNECT: "DISCONNECT",
    REQUEST_BATCH: "REQUEST_BATCH",
    REPLY_BATCH: "REPLY_BATCH",
}

MMI_PREFIX = b"mmi."
MMI_SERVICE = b"mmi.service"
# Asked by a client that would like to send batches; "200" means this broker
# takes them (and answers them packed), anything else that it does not.
MMI_BATCH = b"mmi.batch"
# The word in READY's features frame by which a worker announces batches.
FEATURE_BATCH = b"batch"
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
    """A message that does not follow 7/MDP (or its simzmq extensions)."""


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
    batches: bool = False  # READY: the worker takes REQUEST_BATCH
    # REQUEST_BATCH: [(client, [key, body])]; REPLY_BATCH: [(client, body)]
    entries: list = []


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


def build_client_batch(service: bytes, entries: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """A batch of requests for a keyed service, each ``(key, body)``:
    ``"" | MDPC01B | service | key₁ | body₁ | key₂ | body₂ …``."""
    return _flatten([b"", C_BATCH, service], entries)


def build_client_reply_batch(service: bytes, bodies: Sequence[bytes]) -> list[bytes]:
    """Replies to entries of batches, one frame each, without the ROUTER
    identity: ``"" | MDPC01B | service | body₁ | body₂ …``."""
    return [b"", C_BATCH, service, *bodies]


def parse_client_message(frames: Sequence[bytes]) -> tuple[bool, bytes, list[bytes]]:
    """``(batched, service, rest)`` of a client request (or a reply, as a
    client receives it). For a batch request ``rest`` holds key and body
    frames in pairs (the broker checks the pairing), for a batch reply one
    body frame per entry; otherwise it is the plain MDP body."""
    batched = len(frames) > 1 and frames[1] == C_BATCH
    service, rest = _parse_client(frames, C_BATCH if batched else C_CLIENT)
    if batched and not rest:
        raise MDPError("batch without entries")
    return batched, service, rest


def _parse_client(frames: Sequence[bytes], protocol: bytes = C_CLIENT) -> tuple[bytes, list[bytes]]:
    if len(frames) < 3:
        raise MDPError(f"client message has {len(frames)} frames, needs at least 3")
    if frames[0] != b"":
        raise MDPError("client message does not start with an empty frame")
    if frames[1] != protocol:
        raise MDPError(f"client message has protocol {bytes(frames[1])[:16]!r}")
    service = frames[2]
    if not service or len(service) > MAX_SERVICE_LEN:
        raise MDPError(f"client message has a service name of {len(service)} bytes")
    return service, list(frames[3:])


# --- worker side (worker ↔ broker) -----------------------------------------


def build_ready(service: bytes, credit: int | None = None, batches: bool = False) -> list[bytes]:
    """READY; the credit frame is sent only when given (plain MDP has none),
    the features frame only to announce batches (it needs the credit frame)."""
    frames = [b"", W_WORKER, READY, service]
    if credit is not None or batches:
        frames.append(str(int(credit or DEFAULT_CREDIT)).encode("ascii"))
    if batches:
        frames.append(FEATURE_BATCH)
    return frames


def build_request_batch(entries: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes]:
    """REQUEST_BATCH broker → worker: ``"" | MDPW01 | 0x12 | (client | key | body)…``."""
    return _flatten([b"", W_WORKER, REQUEST_BATCH], entries)


def build_reply_batch(entries: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """REPLY_BATCH worker → broker: ``"" | MDPW01 | 0x13 | (client | body)…``."""
    return _flatten([b"", W_WORKER, REPLY_BATCH], entries)


def _flatten(head: list[bytes], entries: Sequence[Sequence[bytes]]) -> list[bytes]:
    """A batch message: its head frames, then every entry's frames in turn."""
    for entry in entries:
        head.extend(entry)
    return head


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
    """A command a worker sent to the broker: READY, REPLY, REPLY_BATCH, HEARTBEAT or DISCONNECT."""
    command = _worker_header(frames)
    if command == READY:
        if len(frames) not in (4, 5, 6):
            raise MDPError(f"READY has {len(frames)} frames, needs 4 to 6")
        service = frames[3]
        if not service or len(service) > MAX_SERVICE_LEN:
            raise MDPError(f"READY has a service name of {len(service)} bytes")
        credit = DEFAULT_CREDIT
        if len(frames) >= 5:
            credit = parse_credit(frames[4])
        # Features: space-separated words; words we do not know are ignored,
        # so a newer worker can announce more without being refused.
        batches = len(frames) == 6 and FEATURE_BATCH in bytes(frames[5]).split()
        return WorkerCommand(READY, service=service, credit=credit, batches=batches)
    if command == REPLY:
        client, body = _envelope(frames, "REPLY")
        return WorkerCommand(REPLY, client=client, body=body)
    if command == REPLY_BATCH:
        return WorkerCommand(REPLY_BATCH, entries=_entries(frames, 2, "REPLY_BATCH"))
    if command == HEARTBEAT or command == DISCONNECT:
        if len(frames) != 3:
            raise MDPError(f"{COMMAND_NAMES[command]} has {len(frames)} frames, needs 3")
        return WorkerCommand(command)
    raise MDPError(f"worker sent command {bytes(command)[:4]!r}, not READY/REPLY/REPLY_BATCH/HEARTBEAT/DISCONNECT")


def parse_broker_message(frames: Sequence[bytes]) -> WorkerCommand:
    """A command the broker sent to a worker: REQUEST, REQUEST_BATCH, HEARTBEAT or DISCONNECT."""
    command = _worker_header(frames)
    if command == REQUEST:
        client, body = _envelope(frames, "REQUEST")
        return WorkerCommand(REQUEST, client=client, body=body)
    if command == REQUEST_BATCH:
        entries = [(client, [key, body]) for client, key, body in _entries(frames, 3, "REQUEST_BATCH")]
        return WorkerCommand(REQUEST_BATCH, entries=entries)
    if command == HEARTBEAT or command == DISCONNECT:
        if len(frames) != 3:
            raise MDPError(f"{COMMAND_NAMES[command]} has {len(frames)} frames, needs 3")
        return WorkerCommand(command)
    raise MDPError(f"broker sent command {bytes(command)[:4]!r}, not REQUEST/REQUEST_BATCH/HEARTBEAT/DISCONNECT")


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


def _entries(frames: Sequence[bytes], width: int, name: str) -> list[tuple]:
    """The fixed-width entries after a batch command; each starts with a
    non-empty client address."""
    count, extra = divmod(len(frames) - 3, width)
    if count < 1 or extra:
        raise MDPError(f"{name} has {len(frames) - 3} entry frames, not a positive multiple of {width}")
    entries = [tuple(frames[i:i + width]) for i in range(3, len(frames), width)]
    for entry in entries:
        if not entry[0]:
            raise MDPError(f"{name} has an entry with an empty client address")
    return entries


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
