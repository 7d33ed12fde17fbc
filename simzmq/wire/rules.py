"""Field rules for client requests (protocol.md section 5, "Limits", and
section 7 for protocol 1.1).

The codec guarantees types and ranges of the wire kinds; this module checks
what the protocol forbids beyond that. ``validate_request`` raises
``ProtocolError`` with code 1 (bad_request) or 6 (too_large).

A gate that does not serve protocol 1.1 (``protocol_1_1=False``) answers every
request of section 7 ``Error{bad_request}`` whatever its fields, exactly as a
1.0 gate does: that answer to ``SetPresence`` is how a client learns that the
gate has no section 7.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .errors import ProtocolError
from .messages import (
    CLIENT_REQUESTS,
    PROTOCOL_1_1_TYPES,
    PROTOCOL_KINDS,
    ErrorCode,
    GroupAdd,
    GroupCreate,
    GroupGet,
    GroupRemove,
    GroupTitle,
    Login,
    Ping,
    Pong,
    PresenceState,
    Read,
    Register,
    Send,
    SetPresence,
    Sync,
    Typing,
    Watch,
)

MAX_USER_ID = 64
MAX_PASSWORD = 256  # bytes of UTF-8
MAX_DEVICE = 64  # bytes of UTF-8
MAX_TOKEN = 64
MAX_CMID = 32
MAX_REASON = 256
MAX_TITLE = 256  # bytes of UTF-8
MAX_GROUP_MEMBERS = 256  # the default of the gate's max_group_members
MAX_WATCH_REQUEST = 256  # distinct ids in one Watch
MAX_WATCH_CONNECTION = 1024  # distinct ids watched by one connection (the gate counts)
# msg_id, seq and ts_ms stay below 2**53 so that JavaScript numbers hold them.
MAX_SAFE_INTEGER = 2**53 - 1

_USER_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}", re.ASCII)
_GROUP_ID = re.compile(r"#[A-Za-z0-9_.\-]{1,63}", re.ASCII)
# Control characters (C0, DEL, C1) and the bidirectional embeddings,
# overrides and isolates (U+202A-U+202E, U+2066-U+2069), which can make a
# title display as something else than it is.
_BAD_TITLE_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_SETTABLE_PRESENCE = frozenset({PresenceState.OFFLINE, PresenceState.ONLINE, PresenceState.AWAY})


def is_valid_user_id(s: object) -> bool:
    """True for 1-64 characters of ``[A-Za-z0-9_.-]``."""
    return isinstance(s, str) and _USER_ID.fullmatch(s) is not None


def is_valid_group_id(s: object) -> bool:
    """True for ``#`` and 1-63 characters of ``[A-Za-z0-9_.-]``."""
    return isinstance(s, str) and _GROUP_ID.fullmatch(s) is not None


def is_group(peer: str) -> bool:
    """Whether a peer (a Send's `to`, a Read's or Conv's `peer`) is a group:
    group ids start with ``#``, user ids never do. The one test of it, for
    the server and the client alike."""
    return peer.startswith("#")


def _bad(reason: str, ref: int) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, reason, ref)


def _too_large(reason: str, ref: int) -> ProtocolError:
    return ProtocolError(ErrorCode.TOO_LARGE, reason, ref)


def check_user_id(name: str, value: str, ref: int = 0) -> None:
    _check_id(name, value, ref, users=True, groups=False)


def _check_id(name: str, value: str, ref: int, users: bool, groups: bool) -> None:
    """`value` is a user id (if `users`) or a group id (if `groups`)."""
    if len(value) > MAX_USER_ID:
        raise _too_large(f"{name} longer than {MAX_USER_ID} characters", ref)
    if not ((users and is_valid_user_id(value)) or (groups and is_valid_group_id(value))):
        what = " or ".join(w for w, on in (("user id", users), ("group id", groups)) if on)
        raise _bad(f"{name} is not a valid {what}", ref)


def _check_ids(name: str, values: list[str], count: int, limit: int, ref: int, groups: bool) -> None:
    """A list of `count` (at most `limit`) ids, each a user id (or a group id if `groups`)."""
    if count > limit:
        raise _too_large(f"{name} holds more than {limit} ids", ref)
    for value in values:
        _check_id(name, value, ref, users=True, groups=groups)


def _check_cmid(value: bytes, ref: int) -> None:
    if not value:
        raise _bad("empty cmid", ref)
    if len(value) > MAX_CMID:
        raise _too_large(f"cmid longer than {MAX_CMID} bytes", ref)


def _check_title(value: str, ref: int) -> None:
    # Section 7 names bad_request for a title over its length, not the
    # too_large of section 3's general rule: the specific rule wins.
    if len(value.encode("utf-8")) > MAX_TITLE:
        raise _bad(f"title longer than {MAX_TITLE} bytes", ref)
    if _BAD_TITLE_CHAR.search(value):
        raise _bad("title holds a control or bidirectional-override character", ref)


def _check_safe_int(name: str, value: int, ref: int) -> None:
    if value > MAX_SAFE_INTEGER:
        raise _bad(f"{name} must be below 2**53", ref)


def _check_password(value: str, ref: int) -> None:
    size = len(value.encode("utf-8"))
    if size == 0:
        raise _bad("empty password", ref)
    if size > MAX_PASSWORD:
        raise _too_large(f"password longer than {MAX_PASSWORD} bytes", ref)


@dataclass(frozen=True, slots=True)
class _Limits:
    max_body: int
    max_group_members: int
    protocol_1_1: bool


def _login(msg: Login, limits: _Limits, ref: int) -> None:
    check_user_id("user", msg.user, ref)
    if bool(msg.password) == bool(msg.token):
        raise _bad("exactly one of password and token must be given", ref)
    if msg.password:
        _check_password(msg.password, ref)
    if len(msg.token) > MAX_TOKEN:
        raise _too_large(f"token longer than {MAX_TOKEN} bytes", ref)
    if len(msg.device.encode("utf-8")) > MAX_DEVICE:
        raise _too_large(f"device longer than {MAX_DEVICE} bytes", ref)


def _register(msg: Register, limits: _Limits, ref: int) -> None:
    check_user_id("user", msg.user, ref)
    _check_password(msg.password, ref)


def _send(msg: Send, limits: _Limits, ref: int) -> None:
    _check_id("to", msg.to, ref, users=True, groups=limits.protocol_1_1)
    _check_cmid(msg.cmid, ref)
    if len(msg.body) > limits.max_body:
        raise _too_large(f"body longer than {limits.max_body} bytes", ref)
    if limits.protocol_1_1 and msg.kind in PROTOCOL_KINDS:
        raise _bad(f"kinds {PROTOCOL_KINDS.start}-{PROTOCOL_KINDS.stop - 1} belong to the protocol", ref)


def _sync(msg: Sync, limits: _Limits, ref: int) -> None:
    _check_safe_int("since", msg.since, ref)


def _read(msg: Read, limits: _Limits, ref: int) -> None:
    _check_id("peer", msg.peer, ref, users=True, groups=limits.protocol_1_1)
    _check_safe_int("msg_id", msg.msg_id, ref)


def _ping(msg: Ping | Pong, limits: _Limits, ref: int) -> None:
    _check_safe_int("ts_ms", msg.ts_ms, ref)


def _group_create(msg: GroupCreate, limits: _Limits, ref: int) -> None:
    _check_id("group", msg.group, ref, users=False, groups=True)
    _check_title(msg.title, ref)
    _check_ids("members", msg.members, len(msg.members), limits.max_group_members, ref, groups=False)


def _group_change(msg: GroupAdd | GroupRemove, limits: _Limits, ref: int) -> None:
    _check_id("group", msg.group, ref, users=False, groups=True)
    _check_ids("users", msg.users, len(msg.users), limits.max_group_members, ref, groups=False)
    _check_cmid(msg.cmid, ref)


def _group_get(msg: GroupGet, limits: _Limits, ref: int) -> None:
    _check_id("group", msg.group, ref, users=False, groups=True)


def _group_title(msg: GroupTitle, limits: _Limits, ref: int) -> None:
    _check_id("group", msg.group, ref, users=False, groups=True)
    _check_title(msg.title, ref)
    _check_cmid(msg.cmid, ref)


def _watch(msg: Watch, limits: _Limits, ref: int) -> None:
    # Each id counts once; group ids are well-formed here (their presence is
    # state 0, section 7).
    _check_ids("users", msg.users, len(set(msg.users)), MAX_WATCH_REQUEST, ref, groups=True)


def _set_presence(msg: SetPresence, limits: _Limits, ref: int) -> None:
    if msg.state not in _SETTABLE_PRESENCE:
        raise _bad("state must be 1 (offline), 2 (online) or 3 (away)", ref)


def _typing(msg: Typing, limits: _Limits, ref: int) -> None:
    _check_id("peer", msg.peer, ref, users=True, groups=True)


def _no_fields(msg: object, limits: _Limits, ref: int) -> None:
    pass


_RULES: dict[type, Callable[[object, _Limits, int], None]] = {
    Login: _login,
    Register: _register,
    Send: _send,
    Sync: _sync,
    Read: _read,
    Ping: _ping,
    Pong: _ping,
    GroupCreate: _group_create,
    GroupAdd: _group_change,
    GroupRemove: _group_change,
    GroupGet: _group_get,
    GroupTitle: _group_title,
    Watch: _watch,
    SetPresence: _set_presence,
    Typing: _typing,
}


def validate_request(
    msg: object,
    max_body: int,
    ref: int = 0,
    *,
    protocol_1_1: bool = False,
    max_group_members: int = MAX_GROUP_MEMBERS,
) -> None:
    """Check a decoded client request; raise ProtocolError if the protocol forbids it.

    A type a client may not send (a gate-only or internal one) is bad_request,
    and so is every request of section 7 unless the gate serves protocol 1.1
    (``protocol_1_1``); then ``max_group_members`` bounds the id lists of
    GroupCreate, GroupAdd and GroupRemove.
    """
    msg_type = getattr(type(msg), "TYPE", None)
    if msg_type not in CLIENT_REQUESTS:
        raise _bad(f"{type(msg).__name__} is not a client request", ref)
    if msg_type in PROTOCOL_1_1_TYPES and not protocol_1_1:
        raise _bad(f"{type(msg).__name__}: this gate does not serve protocol 1.1 "
                   "(groups, presence, typing)", ref)
    _RULES.get(type(msg), _no_fields)(msg, _Limits(max_body, max_group_members, protocol_1_1), ref)
