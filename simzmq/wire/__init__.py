"""The client protocol of shared/protocol.md, sections 1-5 and 7, without I/O or clocks."""

from .codec import BIN, CODECS, MSGPACK, Codec, peek_header
from .errors import ChannelError, FrameTooLarge, HandshakeError, ProtocolError, ShortPayload
from .frames import FrameDecoder, encode_frame
from .handshake import (
    MAX_HANDSHAKE_FRAME,
    ClientHandshake,
    GateHandshake,
    Receiver,
    Sender,
    derive_keys,
)
from .messages import CLIENT_REQUESTS, MESSAGES, PROTOCOL_1_1_TYPES, ErrorCode, GroupOp, KickCode, PresenceState
from .rules import is_valid_group_id, is_valid_user_id, validate_request

__all__ = [
    "BIN",
    "CLIENT_REQUESTS",
    "CODECS",
    "MAX_HANDSHAKE_FRAME",
    "MESSAGES",
    "MSGPACK",
    "PROTOCOL_1_1_TYPES",
    "ChannelError",
    "ClientHandshake",
    "Codec",
    "ErrorCode",
    "FrameDecoder",
    "FrameTooLarge",
    "GateHandshake",
    "GroupOp",
    "HandshakeError",
    "KickCode",
    "PresenceState",
    "ProtocolError",
    "Receiver",
    "Sender",
    "ShortPayload",
    "derive_keys",
    "encode_frame",
    "is_valid_group_id",
    "is_valid_user_id",
    "peek_header",
    "validate_request",
]
