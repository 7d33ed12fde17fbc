"""The one exception family of the wire layer.

Every way that bytes from the network can be wrong ends up as a
``ProtocolError``: callers at the connection boundary catch this one type and
decide, by subclass and ``code``, whether to answer ``Error``, ``Kick`` or to
drop the connection.
"""

from __future__ import annotations

# Protocol error codes used here; the full list is ``messages.ErrorCode``.
# Repeated as literals so that this module depends on nothing.
_BAD_REQUEST = 1
_TOO_LARGE = 6


class ProtocolError(Exception):
    """Input that breaks shared/protocol.md.

    ``code`` is the protocol's Error code for the reply (1 bad_request,
    6 too_large, ...), ``reason`` a short human-readable explanation and
    ``ref`` the ref of the offending message if it is known, else 0.
    """

    def __init__(self, code: int, reason: str, ref: int = 0) -> None:
        super().__init__(code, reason, ref)
        self.code = int(code)
        self.reason = reason
        self.ref = ref

    def __str__(self) -> str:
        return f"{self.reason} (code {self.code}, ref {self.ref})"


class ShortPayload(ProtocolError):
    """A decrypted payload shorter than the 5-byte message header.

    The gate answers ``Kick{protocol_violation}`` and closes.
    """

    def __init__(self, reason: str = "payload shorter than 5 bytes", ref: int = 0) -> None:
        super().__init__(_BAD_REQUEST, reason, ref)


class FrameTooLarge(ProtocolError):
    """A length prefix above the current ``max_frame``; the connection closes."""

    def __init__(self, reason: str, ref: int = 0) -> None:
        super().__init__(_TOO_LARGE, reason, ref)


class HandshakeError(ProtocolError):
    """A bad HELLO, WELCOME or c2s_header; the connection closes, nothing sent."""

    def __init__(self, reason: str, ref: int = 0) -> None:
        super().__init__(_BAD_REQUEST, reason, ref)


class ChannelError(ProtocolError):
    """A frame that fails to decrypt, carries a bad tag or follows TAG_FINAL."""

    def __init__(self, reason: str, ref: int = 0) -> None:
        super().__init__(_BAD_REQUEST, reason, ref)
