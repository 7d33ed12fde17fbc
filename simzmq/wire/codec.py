"""Codecs derived from the declarations in ``messages.py`` (protocol.md section 4).

At import each codec compiles, for every declared message and struct, an
encode and a decode closure from the field kinds; nothing here knows any
message by name. Codecs are looked up by their protocol id in ``CODECS``.

A payload is ``u8 type | u32 ref | body``. ``decode`` raises ``ShortPayload``
for fewer than 5 bytes and ``ProtocolError(code=1, ref=ref)`` for an unknown
type or a malformed body; ``encode`` raises ``ProtocolError(code=1)`` for a
message whose values do not fit their declared kinds.
"""

from __future__ import annotations

import operator
import struct
from typing import Any, Callable

import msgpack

from .errors import ProtocolError, ShortPayload
from .messages import MESSAGES, STRUCTS, FieldSpec, NewMsg, field_specs

_BAD_REQUEST = 1

HEADER = struct.Struct(">BI")
_U32 = struct.Struct(">I")

_FIXED_FORMAT = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "bool": "B"}
_UINT_MAX = {"u8": 0xFF, "u16": 0xFFFF, "u32": 0xFFFFFFFF, "u64": 0xFFFFFFFFFFFFFFFF}


class _Malformed(ValueError):
    """A body that breaks section 4; turned into ProtocolError with the ref."""


def peek_header(payload: bytes) -> tuple[int, int]:
    """``(type, ref)`` of a payload without decoding its body."""
    if len(payload) < HEADER.size:
        raise ShortPayload()
    return HEADER.unpack_from(payload, 0)


class Codec:
    """A message codec: ``encode(msg, ref) -> payload``, ``decode(payload) -> (ref, msg)``.

    ``encode_struct`` and ``decode_struct`` give a declared struct's body
    alone, without the header (a group event's inbox body is a GroupEvent in
    bin, section 7).
    """

    id: int
    name: str

    def __init__(self) -> None:
        self._encoders: dict[type, Callable[[Any], bytes]] = {}
        self._decoders: dict[int, Callable[[bytes, int], Any]] = {}
        for type_id, cls in MESSAGES.items():
            self._encoders[cls], self._decoders[type_id] = self._compile(cls)
        self._bodies: dict[type, tuple[Callable[[Any], bytes], Callable[[bytes, int], Any]]] = {
            cls: self._compile(cls) for cls in STRUCTS
        }

    def _compile(self, cls: type) -> tuple[Callable[[Any], bytes], Callable[[bytes, int], Any]]:
        """(encode(obj) -> body, decode(buf, start) -> obj) for a message or struct class."""
        raise NotImplementedError

    def encode(self, msg: object, ref: int) -> bytes:
        encoder = self._encoders.get(type(msg))
        if encoder is None:
            raise ProtocolError(_BAD_REQUEST, f"not a protocol message: {type(msg).__name__}", ref)
        return _encoding(lambda: HEADER.pack(msg.TYPE, ref) + encoder(msg), msg, ref if type(ref) is int else 0)

    def decode(self, payload: bytes) -> tuple[int, object]:
        if len(payload) < HEADER.size:
            raise ShortPayload()
        if type(payload) is not bytes:
            payload = bytes(payload)
        type_id, ref = HEADER.unpack_from(payload, 0)
        decoder = self._decoders.get(type_id)
        if decoder is None:
            raise ProtocolError(_BAD_REQUEST, f"unknown message type {type_id}", ref)
        return ref, _decoding(decoder, payload, HEADER.size, MESSAGES[type_id], ref)

    def encode_struct(self, value: object) -> bytes:
        """The body of a declared struct (no header)."""
        codec = self._bodies.get(type(value))
        if codec is None:
            raise ProtocolError(_BAD_REQUEST, f"not a protocol struct: {type(value).__name__}")
        return _encoding(lambda: codec[0](value), value, 0)

    def decode_struct(self, cls: type, body: bytes) -> object:
        """A ``cls`` from its whole body; ProtocolError(bad_request) if malformed."""
        codec = self._bodies.get(cls)
        if codec is None:
            raise ProtocolError(_BAD_REQUEST, f"not a protocol struct: {getattr(cls, '__name__', cls)}")
        return _decoding(codec[1], bytes(body), 0, cls, 0)

    def __repr__(self) -> str:
        return f"<Codec {self.id} {self.name}>"


def _encoding(encode: Callable[[], bytes], value: object, ref: int) -> bytes:
    """``encode()``, with values that do not fit their kinds as ProtocolError."""
    try:
        return encode()
    except (struct.error, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ProtocolError(_BAD_REQUEST, f"cannot encode {type(value).__name__}: {exc}", ref) from exc


def _decoding(decode: Callable[[bytes, int], Any], buf: bytes, start: int, cls: type, ref: int):
    """``decode(buf, start)``, with a malformed body as ProtocolError."""
    try:
        return decode(buf, start)
    except (_Malformed, struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(_BAD_REQUEST, f"malformed {cls.__name__}: {exc}", ref) from exc


# --- bin (id 1) --------------------------------------------------------------
#
# A struct compiles to a list of (get, encode, decode) steps. Consecutive
# fixed-width fields share one struct.Struct; str, bytes, list and nested
# struct fields get a step each. `get(obj)` gives what `encode(value, out)`
# appends to the chunk list `out`; `decode(buf, off, values)` appends what it
# reads to `values` and returns the new offset. List items use the same
# value codecs as fields.


def _group_runs(specs: tuple[FieldSpec, ...]) -> list[list[FieldSpec]]:
    runs: list[list[FieldSpec]] = []
    for spec in specs:
        fixed = spec.kind in _FIXED_FORMAT
        if fixed and runs and runs[-1][0].kind in _FIXED_FORMAT:
            runs[-1].append(spec)
        else:
            runs.append([spec])
    return runs


def _bin_min_size(spec: FieldSpec) -> int:
    """Fewest bytes any value of ``spec`` takes; bounds hostile list counts."""
    if spec.kind in _FIXED_FORMAT:
        return struct.calcsize(">" + _FIXED_FORMAT[spec.kind])
    if spec.kind == "struct":
        return sum(_bin_min_size(s) for s in field_specs(spec.struct))
    return 4


def _bin_fixed_run(run: list[FieldSpec]):
    """(encode(values, out), decode(buf, off, values) -> off) for a tuple of fixed-width values."""
    packer = struct.Struct(">" + "".join(_FIXED_FORMAT[s.kind] for s in run))
    names = [s.name for s in run]
    bools = tuple(i for i, s in enumerate(run) if s.kind == "bool")
    size = packer.size

    if bools:

        def encode(values, out):
            for i in bools:
                if type(values[i]) is not bool:
                    raise TypeError(f"{names[i]} must be a bool")
            out.append(packer.pack(*values))

        def decode(buf, off, values):
            raw = list(packer.unpack_from(buf, off))
            for i in bools:
                if raw[i] > 1:
                    raise _Malformed(f"{names[i]}: bool byte {raw[i]} is not 0 or 1")
                raw[i] = raw[i] == 1
            values.extend(raw)
            return off + size

    else:

        def encode(values, out):
            out.append(packer.pack(*values))

        def decode(buf, off, values):
            values.extend(packer.unpack_from(buf, off))
            return off + size

    return encode, decode


def _bin_value(spec: FieldSpec, struct_codecs: dict):
    """(encode(value, out), decode(buf, off, values) -> off) for one value of ``spec``."""
    name = spec.name
    pack_u32 = _U32.pack
    unpack_u32 = _U32.unpack_from

    if spec.kind in _FIXED_FORMAT:
        encode_tuple, decode = _bin_fixed_run([spec])

        def encode(value, out):
            encode_tuple((value,), out)

    elif spec.kind == "str":

        def encode(value, out):
            raw = value.encode("utf-8")
            out.append(pack_u32(len(raw)))
            out.append(raw)

        def decode(buf, off, values):
            (n,) = unpack_u32(buf, off)
            start = off + 4
            end = start + n
            if end > len(buf):
                raise _Malformed(f"{name}: str length past end")
            values.append(str(buf[start:end], "utf-8"))
            return end

    elif spec.kind == "bytes":

        def encode(value, out):
            if not isinstance(value, (bytes, bytearray)):
                raise TypeError(f"{name} must be bytes")
            out.append(pack_u32(len(value)))
            out.append(value)

        def decode(buf, off, values):
            (n,) = unpack_u32(buf, off)
            start = off + 4
            end = start + n
            if end > len(buf):
                raise _Malformed(f"{name}: bytes length past end")
            values.append(buf[start:end])
            return end

    elif spec.kind == "struct":
        item_cls = spec.struct

        def encode(value, out):
            if type(value) is not item_cls:
                raise TypeError(f"{name} must be a {item_cls.__name__}")
            struct_codecs[item_cls][0](value, out)

        def decode(buf, off, values):
            return struct_codecs[item_cls][1](buf, off, values)

    elif spec.kind == "list":
        encode_item, decode_item = _bin_value(spec.item, struct_codecs)
        min_item = max(1, _bin_min_size(spec.item))

        def encode(value, out):
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"{name} must be a list")
            out.append(pack_u32(len(value)))
            for item in value:
                encode_item(item, out)

        def decode(buf, off, values):
            (n,) = unpack_u32(buf, off)
            off += 4
            if n * min_item > len(buf) - off:
                raise _Malformed(f"{name}: list count past end")
            items: list = []
            for _ in range(n):
                off = decode_item(buf, off, items)
            values.append(items)
            return off

    else:  # pragma: no cover - field_specs admits no other kind
        raise TypeError(f"unknown kind {spec.kind}")
    return encode, decode


class BinCodec(Codec):
    id = 1
    name = "bin"

    def __init__(self) -> None:
        # (encode(obj, out), decode(buf, off, values) -> off) per class, shared
        # by nested structs; filled lazily so declaration order does not matter.
        self._structs: dict[type, tuple[Callable, Callable]] = {}
        super().__init__()

    def _struct_codec(self, cls: type) -> tuple[Callable, Callable]:
        if cls in self._structs:
            return self._structs[cls]
        steps = []
        decoders = []
        for run in _group_runs(field_specs(cls)):
            if run[0].kind in _FIXED_FORMAT:
                names = [s.name for s in run]
                if len(names) == 1:
                    single = operator.attrgetter(names[0])
                    get = lambda obj, single=single: (single(obj),)  # noqa: E731
                else:
                    get = operator.attrgetter(*names)
                enc, dec = _bin_fixed_run(run)
            else:
                get = operator.attrgetter(run[0].name)
                enc, dec = _bin_value(run[0], self._structs)
                for spec in (run[0], run[0].item):
                    if spec is not None and spec.struct is not None:
                        self._struct_codec(spec.struct)
            steps.append((get, enc))
            decoders.append(dec)

        def encode(obj, out):
            for get, enc in steps:
                enc(get(obj), out)

        def decode(buf, off, out):
            values: list = []
            for step in decoders:
                off = step(buf, off, values)
            out.append(cls(*values))
            return off

        self._structs[cls] = (encode, decode)
        return encode, decode

    def _compile(self, cls: type):
        encode_struct, decode_struct = self._struct_codec(cls)

        def encode(obj) -> bytes:
            out: list = []
            encode_struct(obj, out)
            return b"".join(out)

        def decode(buf: bytes, start: int):
            values: list = []
            end = decode_struct(buf, start, values)
            if end != len(buf):
                raise _Malformed(f"{len(buf) - end} trailing bytes")
            return values[0]

        return encode, decode


# --- msgpack (id 2) ----------------------------------------------------------
#
# Encoding: each declaration compiles to a function building a dict in declared
# order with values checked against their kinds, packed by msgpack (which
# writes the shortest forms). Decoding: msgpack parses with maps kept as lists
# of pairs (so duplicate keys are visible) and a converter per kind checks each
# value strictly.


class _MapPairs(list):
    """A msgpack map as its list of (key, value) pairs, told apart from arrays."""


def _mp_uint_checks(kind: str):
    limit = _UINT_MAX[kind]

    def to_wire(value):
        if type(value) is not int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{kind} must be an int, not {type(value).__name__}")
            value = int(value)  # IntEnum and other int subclasses
        if not 0 <= value <= limit:
            raise ValueError(f"{value} out of range for {kind}")
        return value

    def from_wire(value):
        if type(value) is not int:
            raise _Malformed(f"expected {kind}, got {_mp_kind_name(value)}")
        if not 0 <= value <= limit:
            raise _Malformed(f"{value} out of range for {kind}")
        return value

    return to_wire, from_wire


def _mp_kind_name(value) -> str:
    if value is None:
        return "nil"
    if type(value) is _MapPairs:
        return "map"
    return type(value).__name__


def _mp_exact_checks(kind: str, py_type: type, accept: tuple[type, ...]):
    def to_wire(value):
        if not isinstance(value, accept):
            raise TypeError(f"{kind} must be {py_type.__name__}, not {type(value).__name__}")
        return value

    def from_wire(value):
        if type(value) is not py_type:
            raise _Malformed(f"expected {kind}, got {_mp_kind_name(value)}")
        return value

    return to_wire, from_wire


_MP_SCALARS = {
    "u8": _mp_uint_checks("u8"),
    "u16": _mp_uint_checks("u16"),
    "u32": _mp_uint_checks("u32"),
    "u64": _mp_uint_checks("u64"),
    "str": _mp_exact_checks("str", str, (str,)),
    "bytes": _mp_exact_checks("bytes", bytes, (bytes, bytearray)),
    "bool": _mp_exact_checks("bool", bool, (bool,)),
}


class MsgpackCodec(Codec):
    id = 2
    name = "msgpack"

    def __init__(self) -> None:
        self._structs: dict[type, tuple[Callable, Callable]] = {}
        super().__init__()

    def _struct_codec(self, cls: type) -> tuple[Callable, Callable]:
        """(to_wire(obj) -> dict, from_wire(map pairs) -> obj) for one class."""
        if cls in self._structs:
            return self._structs[cls]
        fields = []
        for spec in field_specs(cls):
            to_wire, from_wire = self._value_codec(spec)
            fields.append((spec.name, operator.attrgetter(spec.name), to_wire, from_wire))

        def to_wire(obj):
            if type(obj) is not cls:
                raise TypeError(f"expected {cls.__name__}, got {type(obj).__name__}")
            return {name: conv(get(obj)) for name, get, conv, _ in fields}

        def from_wire(pairs):
            if type(pairs) is not _MapPairs:
                raise _Malformed(f"{cls.__name__} must be a map, got {_mp_kind_name(pairs)}")
            by_key = dict(pairs)
            if len(by_key) != len(pairs):
                raise _Malformed(f"duplicate key in {cls.__name__}")
            values = []
            for name, _, _, conv in fields:
                if name not in by_key:
                    raise _Malformed(f"missing field {name}")
                try:
                    values.append(conv(by_key[name]))
                except _Malformed as exc:
                    raise _Malformed(f"{name}: {exc}") from None
            return cls(*values)

        self._structs[cls] = (to_wire, from_wire)
        return to_wire, from_wire

    def _value_codec(self, spec: FieldSpec) -> tuple[Callable, Callable]:
        """(to_wire(value), from_wire(parsed)) for one value of ``spec``."""
        if spec.kind == "struct":
            return self._struct_codec(spec.struct)
        if spec.kind == "list":
            return self._list_codec(spec.item)
        return _MP_SCALARS[spec.kind]

    def _list_codec(self, item: FieldSpec) -> tuple[Callable, Callable]:
        item_to_wire, item_from_wire = self._value_codec(item)

        def to_wire(items):
            if not isinstance(items, (list, tuple)):
                raise TypeError("expected a list")
            return [item_to_wire(item) for item in items]

        def from_wire(items):
            if type(items) is not list:
                raise _Malformed(f"expected an array, got {_mp_kind_name(items)}")
            return [item_from_wire(item) for item in items]

        return to_wire, from_wire

    def _compile(self, cls: type):
        to_wire, from_wire = self._struct_codec(cls)
        packb = msgpack.packb
        unpackb = msgpack.unpackb

        def encode(msg) -> bytes:
            return packb(to_wire(msg), use_bin_type=True)

        def decode(buf: bytes, start: int):
            try:
                tree = unpackb(
                    memoryview(buf)[start:],
                    raw=False,
                    use_list=True,
                    strict_map_key=True,
                    object_pairs_hook=_MapPairs,
                )
            except Exception as exc:  # msgpack raises many types for bad input
                raise _Malformed(f"bad msgpack: {exc}") from exc
            return from_wire(tree)

        return encode, decode


BIN = BinCodec()
MSGPACK = MsgpackCodec()
CODECS: dict[int, Codec] = {codec.id: codec for codec in (BIN, MSGPACK)}


# --- the bin layout of NewMsg, for the bus's hot path --------------------------
#
# A NewMsg in the bin codec is `type | ref | msg_id u64 | seq u64 | ...`: the
# gate reads a push's seq, and a worker makes the sender's copy of a message
# from the recipient's, without decoding or encoding the whole message.
# Tests check these against the derived codec.

_NEWMSG_SEQ = slice(HEADER.size + 8, HEADER.size + 16)
_NEWMSG_TYPE = NewMsg.TYPE


def bin_newmsg_seq(payload: bytes) -> int:
    """The Msg.seq of a bin-encoded NewMsg payload."""
    if len(payload) < _NEWMSG_SEQ.stop or payload[0] != _NEWMSG_TYPE:
        raise ProtocolError(_BAD_REQUEST, "not a bin NewMsg")
    return int.from_bytes(payload[_NEWMSG_SEQ], "big")


def bin_newmsg_with_seq(payload: bytes, seq: int) -> bytes:
    """The same bin-encoded NewMsg with another Msg.seq."""
    if len(payload) < _NEWMSG_SEQ.stop or payload[0] != _NEWMSG_TYPE:
        raise ProtocolError(_BAD_REQUEST, "not a bin NewMsg")
    return payload[:_NEWMSG_SEQ.start] + seq.to_bytes(8, "big") + payload[_NEWMSG_SEQ.stop:]
