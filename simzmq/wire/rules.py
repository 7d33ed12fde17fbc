"""Field rules for client requests (protocol.md section 5, "Limits").

The codec guarantees types and ranges of the wire kinds; this module checks
what the protocol forbids beyond that. ``validate_request`` raises
``ProtocolError`` with code 1 (bad_request) or 6 (too_large).
"""

from __future__ import annotations

import re
from typing import Callable

from .errors import ProtocolError
from .messages import (
    CLIENT_REQUESTS,
    ErrorCode,
    Login,
    Ping,
    Pong,
    Read,
    Register,
    Send,
    Sync,
)

MAX_USER_ID = 64
MAX_PASSWORD = 256  # bytes of UTF-8
MAX_DEVICE = 64  # bytes of UTF-8
MAX_TOKEN = 64
MAX_CMID = 32
MAX_REASON = 256
# msg_id, seq and ts_ms stay below 2**53 so that JavaScript numbers hold them.
MAX_SAFE_INTEGER = 2**53 - 1

_USER_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}", re.ASCII)


def is_valid_user_id(s: object) -> bool:
    """True for 1-64 characters of ``[A-Za-z0-9_.-]``."""
    return isinstance(s, str) and _USER_ID.fullmatch(s) is not None


def _bad(reason: str, ref: int) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, reason, ref)


def _too_large(reason: str, ref: int) -> ProtocolError:
    return ProtocolError(ErrorCode.TOO_LARGE, reason, ref)


def check_user_id(name: str, value: str, ref: int = 0) -> None:
    if len(value) > MAX_USER_ID:
        raise _too_large(f"{name} longer than {MAX_USER_ID} characters", ref)
    if not is_valid_user_id(value):
        raise _bad(f"{name} is not a valid user id", ref)


def _check_safe_int(name: str, value: int, ref: int) -> None:
    if value > MAX_SAFE_INTEGER:
        raise _bad(f"{name} must be below 2**53", ref)


def _check_password(value: str, ref: int) -> None:
    size = len(value.encode("utf-8"))
    if size == 0:
        raise _bad("empty password", ref)
    if size > MAX_PASSWORD:
        raise _too_large(f"password longer than {MAX_PASSWORD} bytes", ref)


def _login(msg: Login, max_body: int, ref: int) -> None:
    check_user_id("user", msg.user, ref)
    if bool(msg.password) == bool(msg.token):
        raise _bad("exactly one of password and token must be given", ref)
    if msg.password:
        _check_password(msg.password, ref)
    if len(msg.token) > MAX_TOKEN:
        raise _too_large(f"token longer than {MAX_TOKEN} bytes", ref)
    if len(msg.device.encode("utf-8")) > MAX_DEVICE:
        raise _too_large(f"device longer than {MAX_DEVICE} bytes", ref)


def _register(msg: Register, max_body: int, ref: int) -> None:
    check_user_id("user", msg.user, ref)
    _check_password(msg.password, ref)


def _send(msg: Send, max_body: int, ref: int) -> None:
    check_user_id("to", msg.to, ref)
    if not msg.cmid:
        raise _bad("empty cmid", ref)
    if len(msg.cmid) > MAX_CMID:
        raise _too_large(f"cmid longer than {MAX_CMID} bytes", ref)
    if len(msg.body) > max_body:
        raise _too_large(f"body longer than {max_body} bytes", ref)


def _sync(msg: Sync, max_body: int, ref: int) -> None:
    _check_safe_int("since", msg.since, ref)


def _read(msg: Read, max_body: int, ref: int) -> None:
    check_user_id("peer", msg.peer, ref)
    _check_safe_int("msg_id", msg.msg_id, ref)


def _ping(msg: Ping | Pong, max_body: int, ref: int) -> None:
    _check_safe_int("ts_ms", msg.ts_ms, ref)


def _no_fields(msg: object, max_body: int, ref: int) -> None:
    pass


_RULES: dict[type, Callable[[object, int, int], None]] = {
    Login: _login,
    Register: _register,
    Send: _send,
    Sync: _sync,
    Read: _read,
    Ping: _ping,
    Pong: _ping,
}


def validate_request(msg: object, max_body: int, ref: int = 0) -> None:
    """Check a decoded client request; raise ProtocolError if the protocol forbids it.

    A type a client may not send (a gate-only or internal one) is bad_request.
    """
    msg_type = getattr(type(msg), "TYPE", None)
    if msg_type not in CLIENT_REQUESTS:
        raise _bad(f"{type(msg).__name__} is not a client request", ref)
    _RULES.get(type(msg), _no_fields)(msg, max_body, ref)
