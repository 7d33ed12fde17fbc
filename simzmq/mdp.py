"""Majordomo frames as the zguide brokers speak them (7/MDP: ``MDPC01`` /
``MDPW01``), built and parsed, with simzmq's announced extensions; and
Majordomo v0.2 (18/MDP: ``MDPC02`` / ``MDPW02``, replies in PARTIAL and
FINAL parts), which the broker speaks too, chosen per message by its header.

Pure: lists of ``bytes`` in, lists of ``bytes`` out, no sockets, no clock.
Frames are given *after* any ROUTER identity frame, i.e. starting with the
empty delimiter a DEALER peer sends first (18/MDP peers may leave it out, as
the spec writes its commands; majortomo sends it). Anything malformed raises
:class:`MDPError`, whose ``reason`` says which rule it broke; the caller logs
it and drops the message.

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

# 18/MDP (Majordomo v0.2): its own protocol frames and command numbers.
C_CLIENT_V2 = b"MDPC02"
W_WORKER_V2 = b"MDPW02"
C2_REQUEST = b"\x01"
C2_PARTIAL = b"\x02"
C2_FINAL = b"\x03"
W2_READY = b"\x01"
W2_REQUEST = b"\x02"
W2_PARTIAL = b"\x03"
W2_FINAL = b"\x04"
W2_HEARTBEAT = b"\x05"
W2_DISCONNECT = b"\x06"

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


# Why a message is malformed: one of these short phrases (``MDPError.reason``),
# so a log can say once per reason what it keeps dropping.
TOO_FEW_FRAMES = "too few frames"
NO_DELIMITER = "no empty first frame"
WRONG_HEADER = "wrong protocol header"
BAD_SERVICE = "bad service name"
UNKNOWN_COMMAND = "unknown command"
WRONG_FRAME_COUNT = "wrong number of frames for its command"
BAD_CREDIT = "bad credit"
BAD_ADDRESS = "bad client address"
BAD_BATCH = "bad batch"


class MDPError(ValueError):
    """A message that does not follow 7/MDP, 18/MDP or simzmq's extensions."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Framing(NamedTuple):
    """Which Majordomo a peer spoke in a message, and so how to answer it."""

    v2: bool = False         # 18/MDP (MDPC02/MDPW02), else 7/MDP
    delimited: bool = True   # starts with an empty frame (always, for 7/MDP)
    # An 18/MDP client numbering its commands as majortomo 0.2.0 does: with
    # the worker's numbers (REQUEST 0x02, PARTIAL 0x03, FINAL 0x04, where spec
    # 18 has 0x01, 0x02, 0x03 for a client) and replies without the service
    # frame, as majortomo's own broker sends them.
    majortomo: bool = False


MDP1 = Framing()
MDP2 = Framing(True, True)         # a DEALER's empty frame first, as majortomo sends it
MDP2_BARE = Framing(True, False)   # as spec 18 writes the commands


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
    framing: Framing = MDP1
    # REPLY: False for an 18/MDP PARTIAL (more parts follow), True for a
    # FINAL or a 7/MDP REPLY.
    final: bool = True


class ClientRequest(NamedTuple):
    """A client message as the broker receives it, in either Majordomo."""

    framing: Framing
    batched: bool       # a simzmq batch (MDPC01B): body is key, body pairs
    service: bytes
    body: list[bytes]


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
        raise MDPError(BAD_BATCH, "batch without entries")
    return batched, service, rest


def parse_client_to_broker(frames: Sequence[bytes]) -> ClientRequest:
    """A client's message to the broker, in the Majordomo its header names:
    ``"" | MDPC01 | service | body…``, a batch ``"" | MDPC01B | service |
    (key | body)…``, or 18/MDP's ``[""] | MDPC02 | 0x01 REQUEST | service |
    body…``."""
    framing, header = _header(frames)
    if header == C_CLIENT_V2:
        rest = frames[2:] if framing.delimited else frames[1:]
        if len(rest) < 2:
            raise MDPError(TOO_FEW_FRAMES, f"MDPC02 message has {len(frames)} frames, needs a command and a service")
        # A client never sends PARTIAL, so spec 18's 0x02 PARTIAL coming in
        # can only be majortomo's REQUEST.
        if rest[0] == W2_REQUEST:
            framing = framing._replace(majortomo=True)
        elif rest[0] != C2_REQUEST:
            raise MDPError(UNKNOWN_COMMAND, f"MDPC02 client sent command {bytes(rest[0])[:4]!r}, not REQUEST")
        service, body = _parse_client([b"", C_CLIENT, *rest[1:]])
        return ClientRequest(framing, False, service, body)
    if header not in (C_CLIENT, C_BATCH):
        raise MDPError(WRONG_HEADER, f"client message has protocol {bytes(header)[:16]!r}")
    batched, service, body = parse_client_message(frames)
    return ClientRequest(MDP1, batched, service, body)


def client_reply_head(framing: Framing, service: bytes, final: bool = True) -> tuple[bytes, ...]:
    """The frames of a reply to a client before its body, in the framing its
    request came in: 7/MDP's one reply, or an 18/MDP PARTIAL (``final``
    false; a 7/MDP client gets no parts) or FINAL."""
    if not framing.v2:
        return (b"", C_CLIENT, service)
    if framing.majortomo:
        head: tuple[bytes, ...] = (C_CLIENT_V2, W2_FINAL if final else W2_PARTIAL)
    else:
        head = (C_CLIENT_V2, C2_FINAL if final else C2_PARTIAL, service)
    return (b"", *head) if framing.delimited else head


def _header(frames: Sequence[bytes]) -> tuple[Framing, bytes]:
    """The protocol frame and where it stood: after an empty first frame (7/MDP,
    and 18/MDP as majortomo sends it), or first (18/MDP as its spec writes it)."""
    if len(frames) < 2:
        raise MDPError(TOO_FEW_FRAMES, f"{len(frames)} frames")
    if frames[0] == b"":
        return (MDP2 if frames[1] in (C_CLIENT_V2, W_WORKER_V2) else MDP1), frames[1]
    if frames[0] in (C_CLIENT_V2, W_WORKER_V2):
        return MDP2_BARE, frames[0]
    if frames[0] in (C_CLIENT, C_BATCH, W_WORKER):
        raise MDPError(NO_DELIMITER, f"7/MDP needs an empty frame before {bytes(frames[0])!r}")
    if frames[1] in (C_CLIENT, C_BATCH, W_WORKER):
        raise MDPError(NO_DELIMITER, f"a frame of {len(frames[0])} bytes before {bytes(frames[1])!r}")
    raise MDPError(WRONG_HEADER, f"no Majordomo protocol frame in {bytes(frames[0])[:16]!r}")


def _parse_client(frames: Sequence[bytes], protocol: bytes = C_CLIENT) -> tuple[bytes, list[bytes]]:
    if len(frames) < 3:
        raise MDPError(TOO_FEW_FRAMES, f"client message has {len(frames)} frames, needs at least 3")
    if frames[0] != b"":
        raise MDPError(NO_DELIMITER, "client message does not start with an empty frame")
    if frames[1] != protocol:
        raise MDPError(WRONG_HEADER, f"client message has protocol {bytes(frames[1])[:16]!r}")
    service = frames[2]
    if not service or len(service) > MAX_SERVICE_LEN:
        raise MDPError(BAD_SERVICE, f"client message has a service name of {len(service)} bytes")
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
    """A command a worker sent to the broker, in the Majordomo its header
    names: 7/MDP's READY, REPLY, REPLY_BATCH, HEARTBEAT or DISCONNECT, or
    18/MDP's READY, PARTIAL, FINAL, HEARTBEAT or DISCONNECT (both given as
    REPLY, ``final`` telling them apart)."""
    framing, header = _header(frames)
    if header == W_WORKER_V2:
        return _parse_worker_v2(framing, frames[2:] if framing.delimited else frames[1:])
    command = _worker_header(frames)
    if command == READY:
        if len(frames) not in (4, 5, 6):
            raise MDPError(WRONG_FRAME_COUNT, f"READY has {len(frames)} frames, needs 4 to 6")
        service = frames[3]
        if not service or len(service) > MAX_SERVICE_LEN:
            raise MDPError(BAD_SERVICE, f"READY has a service name of {len(service)} bytes")
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
            raise MDPError(WRONG_FRAME_COUNT, f"{COMMAND_NAMES[command]} has {len(frames)} frames, needs 3")
        return WorkerCommand(command)
    raise MDPError(UNKNOWN_COMMAND,
                   f"worker sent command {bytes(command)[:4]!r}, not READY/REPLY/REPLY_BATCH/HEARTBEAT/DISCONNECT")


def _parse_worker_v2(framing: Framing, rest: Sequence[bytes]) -> WorkerCommand:
    """An 18/MDP worker command, ``rest`` starting at its command frame. Its
    READY may carry simzmq's credit frame after the service (an extension,
    as for 7/MDP); batches are 7/MDP only."""
    command = rest[0] if rest else b""
    if command == W2_READY:
        if len(rest) not in (2, 3):
            raise MDPError(WRONG_FRAME_COUNT, f"MDPW02 READY has {len(rest) + 1} frames, needs 3 or 4")
        service = rest[1]
        if not service or len(service) > MAX_SERVICE_LEN:
            raise MDPError(BAD_SERVICE, f"READY has a service name of {len(service)} bytes")
        credit = parse_credit(rest[2]) if len(rest) == 3 else DEFAULT_CREDIT
        return WorkerCommand(READY, service=service, credit=credit, framing=framing)
    if command == W2_PARTIAL or command == W2_FINAL:
        name = "FINAL" if command == W2_FINAL else "PARTIAL"
        client, body = _envelope([b"", W_WORKER_V2, command, *rest[1:]], name)
        return WorkerCommand(REPLY, client=client, body=body, framing=framing, final=command == W2_FINAL)
    if command == W2_HEARTBEAT or command == W2_DISCONNECT:
        if len(rest) != 1:
            raise MDPError(WRONG_FRAME_COUNT, f"MDPW02 {'HEARTBEAT' if command == W2_HEARTBEAT else 'DISCONNECT'} "
                                              f"has {len(rest) + 1} frames, needs 2")
        return WorkerCommand(HEARTBEAT if command == W2_HEARTBEAT else DISCONNECT, framing=framing)
    raise MDPError(UNKNOWN_COMMAND,
                   f"MDPW02 worker sent command {bytes(command)[:4]!r}, not READY/PARTIAL/FINAL/HEARTBEAT/DISCONNECT")


# What the broker sends a worker, before the command's own frames, by framing.
_W2_COMMANDS = {REQUEST: W2_REQUEST, HEARTBEAT: W2_HEARTBEAT, DISCONNECT: W2_DISCONNECT}


def worker_command_head(framing: Framing, command: bytes) -> tuple[bytes, ...]:
    """The frames of a broker → worker command up to its command frame, in
    the worker's framing; ``command`` is REQUEST, HEARTBEAT or DISCONNECT."""
    if not framing.v2:
        return (b"", W_WORKER, command)
    head = (W_WORKER_V2, _W2_COMMANDS[command])
    return (b"", *head) if framing.delimited else head


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
            raise MDPError(WRONG_FRAME_COUNT, f"{COMMAND_NAMES[command]} has {len(frames)} frames, needs 3")
        return WorkerCommand(command)
    raise MDPError(UNKNOWN_COMMAND,
                   f"broker sent command {bytes(command)[:4]!r}, not REQUEST/REQUEST_BATCH/HEARTBEAT/DISCONNECT")


def parse_credit(frame: bytes) -> int:
    """The Credit extension's frame: ASCII decimal, 1 … MAX_CREDIT."""
    if not frame or len(frame) > 6 or not frame.isdigit():
        raise MDPError(BAD_CREDIT, f"READY credit {bytes(frame)[:8]!r} is not a decimal number")
    credit = int(frame)
    if not 1 <= credit <= MAX_CREDIT:
        raise MDPError(BAD_CREDIT, f"READY credit {credit} is outside 1..{MAX_CREDIT}")
    return credit


def _worker_header(frames: Sequence[bytes]) -> bytes:
    if len(frames) < 3:
        raise MDPError(TOO_FEW_FRAMES, f"worker message has {len(frames)} frames, needs at least 3")
    if frames[0] != b"":
        raise MDPError(NO_DELIMITER, "worker message does not start with an empty frame")
    if frames[1] != W_WORKER:
        raise MDPError(WRONG_HEADER, f"worker message has protocol {bytes(frames[1])[:16]!r}")
    return frames[2]


def _entries(frames: Sequence[bytes], width: int, name: str) -> list[tuple]:
    """The fixed-width entries after a batch command; each starts with a
    non-empty client address."""
    count, extra = divmod(len(frames) - 3, width)
    if count < 1 or extra:
        raise MDPError(BAD_BATCH, f"{name} has {len(frames) - 3} entry frames, not a positive multiple of {width}")
    entries = [tuple(frames[i:i + width]) for i in range(3, len(frames), width)]
    for entry in entries:
        if not entry[0]:
            raise MDPError(BAD_BATCH, f"{name} has an entry with an empty client address")
    return entries


def _envelope(frames: Sequence[bytes], name: str) -> tuple[bytes, list[bytes]]:
    # "" | MDPW01 | cmd | client | "" | body…  — one client address frame, as
    # every MDP implementation in the wild sends it.
    if len(frames) < 5:
        raise MDPError(TOO_FEW_FRAMES, f"{name} has {len(frames)} frames, needs at least 5")
    client = frames[3]
    if not client:
        raise MDPError(BAD_ADDRESS, f"{name} has an empty client address")
    if frames[4] != b"":
        raise MDPError(BAD_ADDRESS, f"{name} has no empty frame after the client address")
    return client, list(frames[5:])
