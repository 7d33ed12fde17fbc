"""The message catalog of shared/protocol.md sections 3 and 7, declared once.

Each message and struct is a slotted dataclass whose fields are annotated with
the wire kinds below (``U8``, ``U16``, ``U32``, ``U64``, ``Str``, ``Bytes``,
``Bool``, a struct class, or ``List[...]`` of a struct or of a scalar kind).
The codecs in ``codec.py`` are derived from these declarations; adding a
message means adding a class here and nothing else. Field order is wire order.
Defaults are the zero value of each kind so that callers can name only the
fields they need.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Annotated, ClassVar

# --- wire kinds --------------------------------------------------------------

U8 = Annotated[int, "u8"]
U16 = Annotated[int, "u16"]
U32 = Annotated[int, "u32"]
U64 = Annotated[int, "u64"]
Str = Annotated[str, "str"]
Bytes = Annotated[bytes, "bytes"]
Bool = Annotated[bool, "bool"]

SCALAR_KINDS = frozenset({"u8", "u16", "u32", "u64", "str", "bytes", "bool"})


class List:
    """``List[Msg]``, ``List[Str]``: a wire list of a struct or of a scalar
    kind (``u32 count`` + the items in bin)."""

    def __class_getitem__(cls, item: type) -> object:
        return Annotated[list[item], "list"]


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One declared field (or, as ``item``, a list's items): its name, wire
    kind, the struct class of a struct, and the spec of a list's items."""

    name: str
    kind: str  # one of SCALAR_KINDS, "list" or "struct"
    struct: type | None = None
    item: FieldSpec | None = None


_SPEC_CACHE: dict[type, tuple[FieldSpec, ...]] = {}


def _spec(where: str, name: str, hint: object) -> FieldSpec:
    """The FieldSpec of one annotation; `where` names it in errors."""
    if typing.get_origin(hint) is Annotated:
        base, kind = typing.get_args(hint)[:2]
        if kind == "list":
            (item_hint,) = typing.get_args(base)
            item = _spec(f"{where}[]", name, item_hint)
            if item.kind == "list":
                raise TypeError(f"{where}: a List cannot hold a List")
            return FieldSpec(name, "list", item=item)
        if kind in SCALAR_KINDS:
            return FieldSpec(name, kind)
        raise TypeError(f"{where}: unknown wire kind {kind!r}")
    if dataclasses.is_dataclass(hint):
        return FieldSpec(name, "struct", hint)
    raise TypeError(f"{where}: not a wire kind: {hint!r}")


def field_specs(cls: type) -> tuple[FieldSpec, ...]:
    """The wire fields of a message or struct class, in declared order."""
    cached = _SPEC_CACHE.get(cls)
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls, include_extras=True)
    result = tuple(_spec(f"{cls.__name__}.{f.name}", f.name, hints[f.name]) for f in dataclasses.fields(cls))
    _SPEC_CACHE[cls] = result
    return result


MESSAGES: dict[int, type] = {}
STRUCTS: list[type] = []


def _struct(cls: type) -> type:
    """Make ``cls`` a slotted dataclass and register it as a struct."""
    cls = dataclass(slots=True)(cls)
    STRUCTS.append(cls)
    field_specs(cls)  # fail at import on a bad declaration
    return cls


def _message(cls: type) -> type:
    """Make ``cls`` a slotted dataclass and register it under its TYPE."""
    cls = dataclass(slots=True)(cls)
    if cls.TYPE in MESSAGES:
        raise TypeError(f"message type {cls.TYPE} declared twice")
    MESSAGES[cls.TYPE] = cls
    field_specs(cls)  # fail at import on a bad declaration
    return cls


# --- codes -------------------------------------------------------------------


class ErrorCode(IntEnum):
    BAD_REQUEST = 1
    AUTH_FAILED = 2
    NOT_LOGGED_IN = 3
    NO_SUCH_USER = 4
    RATE_LIMITED = 5
    TOO_LARGE = 6
    UNAVAILABLE = 7
    INTERNAL = 8
    FORBIDDEN = 9
    EXISTS = 10


class KickCode(IntEnum):
    SHUTDOWN = 0
    PROTOCOL_VIOLATION = 1
    REPLACED = 2
    IDLE = 3
    SLOW_CONSUMER = 4
    ABUSE = 5


class GroupOp(IntEnum):
    """``GroupEvent.op`` (section 7, "Group events")."""

    CREATED = 1
    ADDED = 2
    REMOVED = 3
    LEFT = 4
    TITLE_CHANGED = 5
    OWNER_CHANGED = 6


class PresenceState(IntEnum):
    """``Presence.state`` and ``SetPresence.state`` (section 7, "Presence")."""

    UNKNOWN = 0
    OFFLINE = 1
    ONLINE = 2
    AWAY = 3


# Msg.kind values that belong to the protocol from 1.1 on (a Send with one is
# bad_request); a group event is an inbox entry of kind GROUP_EVENT_KIND whose
# body is the bin encoding of a GroupEvent.
PROTOCOL_KINDS = range(250, 256)
GROUP_EVENT_KIND = 255


# --- structs -----------------------------------------------------------------


@_struct
class Msg:
    msg_id: U64 = 0
    seq: U64 = 0
    sender: Str = ""
    to: Str = ""
    kind: U8 = 0
    ts_ms: U64 = 0
    cmid: Bytes = b""
    body: Bytes = b""


@_struct
class Conv:
    peer: Str = ""
    last_msg_id: U64 = 0
    unread: U32 = 0
    peer_read: U64 = 0


@_struct
class Presence:
    user: Str = ""
    state: U8 = 0
    last_seen_ms: U64 = 0


@_struct
class GroupEvent:
    """Never a message of its own: the bin-encoded body of a kind-255 inbox entry."""

    op: U8 = 0
    actor: Str = ""
    users: List[Str] = field(default_factory=list)
    title: Str = ""
    version: U64 = 0


# --- client protocol messages (protocol.md section 3) ------------------------


@_message
class Login:
    TYPE: ClassVar[int] = 1
    user: Str = ""
    password: Str = ""
    token: Bytes = b""
    device: Str = ""


@_message
class LoginOk:
    TYPE: ClassVar[int] = 2
    user: Str = ""
    session: Bytes = b""
    token: Bytes = b""
    max_seq: U64 = 0
    server_ms: U64 = 0


@_message
class Error:
    TYPE: ClassVar[int] = 3
    code: U16 = 0
    reason: Str = ""


@_message
class Send:
    TYPE: ClassVar[int] = 4
    to: Str = ""
    cmid: Bytes = b""
    kind: U8 = 0
    body: Bytes = b""


@_message
class SendOk:
    TYPE: ClassVar[int] = 5
    msg_id: U64 = 0
    seq: U64 = 0
    ts_ms: U64 = 0


@_message
class Sync:
    TYPE: ClassVar[int] = 6
    since: U64 = 0
    limit: U32 = 0


@_message
class Batch:
    TYPE: ClassVar[int] = 7
    msgs: List[Msg] = field(default_factory=list)
    more: Bool = False


@_message
class NewMsg:
    TYPE: ClassVar[int] = 8
    msg: Msg = field(default_factory=Msg)


@_message
class Read:
    TYPE: ClassVar[int] = 9
    peer: Str = ""
    msg_id: U64 = 0


@_message
class Ok:
    TYPE: ClassVar[int] = 10


@_message
class ReadNotice:
    TYPE: ClassVar[int] = 11
    reader: Str = ""
    peer: Str = ""
    msg_id: U64 = 0
    ts_ms: U64 = 0


@_message
class Ping:
    TYPE: ClassVar[int] = 12
    ts_ms: U64 = 0


@_message
class Pong:
    TYPE: ClassVar[int] = 13
    ts_ms: U64 = 0


@_message
class Logout:
    TYPE: ClassVar[int] = 14


@_message
class Register:
    TYPE: ClassVar[int] = 15
    user: Str = ""
    password: Str = ""


@_message
class Convs:
    TYPE: ClassVar[int] = 16


@_message
class ConvList:
    TYPE: ClassVar[int] = 17
    convs: List[Conv] = field(default_factory=list)


@_message
class Kick:
    TYPE: ClassVar[int] = 18
    code: U16 = 0
    reason: Str = ""


@_message
class Ready:
    TYPE: ClassVar[int] = 19
    server_ms: U64 = 0
    max_frame: U32 = 0
    max_body: U32 = 0
    idle_timeout_s: U32 = 0


# --- groups, presence and typing (protocol.md section 7, protocol 1.1) ---------


@_message
class GroupCreate:
    TYPE: ClassVar[int] = 20
    group: Str = ""
    title: Str = ""
    members: List[Str] = field(default_factory=list)


@_message
class GroupInfo:
    TYPE: ClassVar[int] = 21
    group: Str = ""
    title: Str = ""
    owner: Str = ""
    members: List[Str] = field(default_factory=list)
    version: U64 = 0


@_message
class GroupAdd:
    TYPE: ClassVar[int] = 22
    group: Str = ""
    users: List[Str] = field(default_factory=list)
    cmid: Bytes = b""


@_message
class GroupRemove:
    TYPE: ClassVar[int] = 23
    group: Str = ""
    users: List[Str] = field(default_factory=list)
    cmid: Bytes = b""


@_message
class GroupGet:
    TYPE: ClassVar[int] = 24
    group: Str = ""


@_message
class GroupTitle:
    TYPE: ClassVar[int] = 25
    group: Str = ""
    title: Str = ""
    cmid: Bytes = b""


@_message
class Watch:
    TYPE: ClassVar[int] = 26
    users: List[Str] = field(default_factory=list)


@_message
class PresenceList:
    TYPE: ClassVar[int] = 27
    states: List[Presence] = field(default_factory=list)


@_message
class PresenceNotice:
    TYPE: ClassVar[int] = 28
    state: Presence = field(default_factory=Presence)


@_message
class SetPresence:
    TYPE: ClassVar[int] = 29
    state: U8 = 0


@_message
class Typing:
    TYPE: ClassVar[int] = 30
    peer: Str = ""
    typing: Bool = False


@_message
class TypingNotice:
    TYPE: ClassVar[int] = 31
    user: Str = ""
    peer: Str = ""
    typing: Bool = False


# --- internal messages (docs/internal-protocol.md), never from a client -------


@_message
class Revoke:
    TYPE: ClassVar[int] = 128
    token: Bytes = b""


@_message
class History:
    TYPE: ClassVar[int] = 129
    token: Bytes = b""
    peer: Str = ""
    before: U64 = 0
    limit: U32 = 0


@_message
class HistoryPage:
    TYPE: ClassVar[int] = 130
    msgs: List[Msg] = field(default_factory=list)
    more: Bool = False


@_message
class SessionStarted:
    TYPE: ClassVar[int] = 131
    user: Str = ""
    device: Str = ""
    session: Bytes = b""


@_message
class Catchup:
    """A gate fetching what its online user may have missed as pushes (after a
    broker failover or a notification gap). Answered with a Batch, like Sync,
    but it leaves the delivered mark alone: the client has not asked."""

    TYPE: ClassVar[int] = 132
    since: U64 = 0
    limit: U32 = 0


@_message
class PresenceReport:
    """A gate's presence report (docs/internal-protocol.md, "Push service"
    and "Presence and typing"): JSON, which the IM worker applies to the
    store's presence tables and publishes on the "!presence" topic for the
    push service."""

    TYPE: ClassVar[int] = 133
    report: Bytes = b""


# The types a client may send; anything else from a client is bad_request.
CLIENT_REQUESTS: frozenset[int] = frozenset(
    cls.TYPE
    for cls in (
        Login, Send, Sync, Read, Ping, Pong, Logout, Register, Convs,
        GroupCreate, GroupAdd, GroupRemove, GroupGet, GroupTitle, Watch, SetPresence, Typing,
    )
)

# The types of section 7: a gate that does not serve protocol 1.1 answers
# every one of them Error{bad_request}, as a 1.0 gate does.
PROTOCOL_1_1_TYPES: frozenset[int] = frozenset(range(20, 32))
