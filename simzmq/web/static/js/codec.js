// The messages of protocol.md section 3 and the two codecs of section 4.
// Declared once in SCHEMA; both codecs are derived from it. Integers are
// JavaScript numbers (the protocol keeps every u64 below 2^53), bytes are
// Uint8Array, strings are strings.

export class ProtocolError extends Error {}

const MSG = [["msg_id", "u64"], ["seq", "u64"], ["sender", "str"], ["to", "str"], ["kind", "u8"],
  ["ts_ms", "u64"], ["cmid", "bytes"], ["body", "bytes"]];
const CONV = [["peer", "str"], ["last_msg_id", "u64"], ["unread", "u32"], ["peer_read", "u64"]];
const PRESENCE = [["user", "str"], ["state", "u8"], ["last_seen_ms", "u64"]];

// name: [type, fields]; a field is [name, kind] or [name, "list"|"struct", item fields];
// kind "strs" is a list of str.
export const SCHEMA = {
  Login: [1, [["user", "str"], ["password", "str"], ["token", "bytes"], ["device", "str"]]],
  LoginOk: [2, [["user", "str"], ["session", "bytes"], ["token", "bytes"], ["max_seq", "u64"], ["server_ms", "u64"]]],
  Error: [3, [["code", "u16"], ["reason", "str"]]],
  Send: [4, [["to", "str"], ["cmid", "bytes"], ["kind", "u8"], ["body", "bytes"]]],
  SendOk: [5, [["msg_id", "u64"], ["seq", "u64"], ["ts_ms", "u64"]]],
  Sync: [6, [["since", "u64"], ["limit", "u32"]]],
  Batch: [7, [["msgs", "list", MSG], ["more", "bool"]]],
  NewMsg: [8, [["msg", "struct", MSG]]],
  Read: [9, [["peer", "str"], ["msg_id", "u64"]]],
  Ok: [10, []],
  ReadNotice: [11, [["reader", "str"], ["peer", "str"], ["msg_id", "u64"], ["ts_ms", "u64"]]],
  Ping: [12, [["ts_ms", "u64"]]],
  Pong: [13, [["ts_ms", "u64"]]],
  Logout: [14, []],
  Register: [15, [["user", "str"], ["password", "str"]]],
  Convs: [16, []],
  ConvList: [17, [["convs", "list", CONV]]],
  Kick: [18, [["code", "u16"], ["reason", "str"]]],
  Ready: [19, [["server_ms", "u64"], ["max_frame", "u32"], ["max_body", "u32"], ["idle_timeout_s", "u32"]]],
  // Section 7: presence and typing.
  Watch: [26, [["users", "strs"]]],
  PresenceList: [27, [["states", "list", PRESENCE]]],
  PresenceNotice: [28, [["state", "struct", PRESENCE]]],
  SetPresence: [29, [["state", "u8"]]],
  Typing: [30, [["peer", "str"], ["typing", "bool"]]],
  TypingNotice: [31, [["user", "str"], ["peer", "str"], ["typing", "bool"]]],
};

const STR_ITEM = [["s", "str"]];

const BY_TYPE = new Map(Object.entries(SCHEMA).map(([name, [type, fields]]) => [type, { name, fields }]));

export const ERROR_CODES = { 1: "bad_request", 2: "auth_failed", 3: "not_logged_in", 4: "no_such_user",
  5: "rate_limited", 6: "too_large", 7: "unavailable", 8: "internal", 9: "forbidden", 10: "exists" };
export const KICK_CODES = { 0: "shutdown", 1: "protocol_violation", 2: "replaced", 3: "idle",
  4: "slow_consumer", 5: "abuse" };

const MAX = { u8: 0xff, u16: 0xffff, u32: 0xffffffff, u64: Number.MAX_SAFE_INTEGER };
const utf8 = new TextEncoder();
const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

function checkInt(kind, v) {
  if (!Number.isSafeInteger(v) || v < 0 || v > MAX[kind]) {
    throw new ProtocolError(`${kind} out of range: ${v}`);
  }
  return v;
}

function decodeUtf8(bytes) {
  try {
    return strictUtf8.decode(bytes);
  } catch {
    throw new ProtocolError("invalid UTF-8 in str");
  }
}

// --- bin (id 1) --------------------------------------------------------------

class Writer {
  constructor() { this.parts = []; this.size = 0; }
  bytes(b) { this.parts.push(b); this.size += b.length; }
  uint(n, v) {
    const b = new Uint8Array(n);
    const view = new DataView(b.buffer);
    if (n === 1) view.setUint8(0, v);
    else if (n === 2) view.setUint16(0, v);
    else if (n === 4) view.setUint32(0, v);
    else { view.setUint32(0, Math.floor(v / 2 ** 32)); view.setUint32(4, v >>> 0); }
    this.bytes(b);
  }
  done() {
    const out = new Uint8Array(this.size);
    let off = 0;
    for (const p of this.parts) { out.set(p, off); off += p.length; }
    return out;
  }
}

class Reader {
  constructor(bytes, off) {
    this.b = bytes; this.off = off;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  need(n) {
    if (this.off + n > this.b.length) throw new ProtocolError("body too short");
  }
  uint(n) {
    this.need(n);
    const v = this.view, o = this.off;
    this.off += n;
    if (n === 1) return v.getUint8(o);
    if (n === 2) return v.getUint16(o);
    if (n === 4) return v.getUint32(o);
    const hi = v.getUint32(o);
    if (hi >= 2 ** 21) throw new ProtocolError("u64 at or above 2^53");
    return hi * 2 ** 32 + v.getUint32(o + 4);
  }
  take(n) {
    this.need(n);
    const out = this.b.slice(this.off, this.off + n);
    this.off += n;
    return out;
  }
}

const WIDTH = { u8: 1, u16: 2, u32: 4, u64: 8 };

function binWrite(w, fields, obj) {
  for (const [name, kind, item] of fields) {
    const v = obj[name];
    if (kind in WIDTH) w.uint(WIDTH[kind], checkInt(kind, v ?? 0));
    else if (kind === "bool") w.uint(1, v ? 1 : 0);
    else if (kind === "str" || kind === "bytes") {
      const b = kind === "str" ? utf8.encode(v ?? "") : (v ?? new Uint8Array(0));
      w.uint(4, b.length);
      w.bytes(b);
    } else if (kind === "struct") binWrite(w, item, v);
    else if (kind === "list") {
      w.uint(4, v.length);
      for (const x of v) binWrite(w, item, x);
    } else if (kind === "strs") {
      w.uint(4, v.length);
      for (const x of v) binWrite(w, STR_ITEM, { s: x });
    }
  }
}

function binRead(r, fields) {
  const obj = {};
  for (const [name, kind, item] of fields) {
    if (kind in WIDTH) obj[name] = r.uint(WIDTH[kind]);
    else if (kind === "bool") {
      const v = r.uint(1);
      if (v > 1) throw new ProtocolError("bool is neither 0 nor 1");
      obj[name] = v === 1;
    } else if (kind === "str") obj[name] = decodeUtf8(r.take(r.uint(4)));
    else if (kind === "bytes") obj[name] = r.take(r.uint(4));
    else if (kind === "struct") obj[name] = binRead(r, item);
    else if (kind === "list") {
      const count = r.uint(4);
      r.need(count); // every item takes at least one byte: no huge loop on a forged count
      obj[name] = [];
      for (let i = 0; i < count; i++) obj[name].push(binRead(r, item));
    } else if (kind === "strs") {
      const count = r.uint(4);
      r.need(count);
      obj[name] = [];
      for (let i = 0; i < count; i++) obj[name].push(binRead(r, STR_ITEM).s);
    }
  }
  return obj;
}

// --- msgpack (id 2) ----------------------------------------------------------

function mpUint(w, v) {
  if (v < 0x80) w.uint(1, v);
  else if (v <= 0xff) { w.uint(1, 0xcc); w.uint(1, v); }
  else if (v <= 0xffff) { w.uint(1, 0xcd); w.uint(2, v); }
  else if (v <= 0xffffffff) { w.uint(1, 0xce); w.uint(4, v); }
  else { w.uint(1, 0xcf); w.uint(8, v); }
}

function mpHeader(w, n, fix, fixMax, codes) {
  if (fix !== null && n <= fixMax) w.uint(1, fix | n);
  else if (codes[0] !== null && n <= 0xff) { w.uint(1, codes[0]); w.uint(1, n); }
  else if (n <= 0xffff) { w.uint(1, codes[1]); w.uint(2, n); }
  else { w.uint(1, codes[2]); w.uint(4, n); }
}

const mpStr = (w, s) => { const b = utf8.encode(s); mpHeader(w, b.length, 0xa0, 31, [0xd9, 0xda, 0xdb]); w.bytes(b); };
const mpBin = (w, b) => { mpHeader(w, b.length, null, 0, [0xc4, 0xc5, 0xc6]); w.bytes(b); };
const mpMap = (w, n) => mpHeader(w, n, 0x80, 15, [null, 0xde, 0xdf]);
const mpArray = (w, n) => mpHeader(w, n, 0x90, 15, [null, 0xdc, 0xdd]);

function mpWrite(w, fields, obj) {
  mpMap(w, fields.length);
  for (const [name, kind, item] of fields) {
    const v = obj[name];
    mpStr(w, name);
    if (kind in WIDTH) mpUint(w, checkInt(kind, v ?? 0));
    else if (kind === "bool") w.uint(1, v ? 0xc3 : 0xc2);
    else if (kind === "str") mpStr(w, v ?? "");
    else if (kind === "bytes") mpBin(w, v ?? new Uint8Array(0));
    else if (kind === "struct") mpWrite(w, item, v);
    else if (kind === "list") {
      mpArray(w, v.length);
      for (const x of v) mpWrite(w, item, x);
    } else if (kind === "strs") {
      mpArray(w, v.length);
      for (const x of v) mpStr(w, x);
    }
  }
}

// One MessagePack value, as {t: kind, v: value}; kinds: int, str, bin, bool, map, array, other.
function mpValue(r) {
  const c = r.uint(1);
  const len = (n) => r.uint(n);
  if (c <= 0x7f) return { t: "int", v: c };
  if (c >= 0x80 && c <= 0x8f) return mpMapValue(r, c & 0x0f);
  if (c >= 0x90 && c <= 0x9f) return mpArrayValue(r, c & 0x0f);
  if (c >= 0xa0 && c <= 0xbf) return { t: "str", v: decodeUtf8(r.take(c & 0x1f)) };
  switch (c) {
    case 0xc2: return { t: "bool", v: false };
    case 0xc3: return { t: "bool", v: true };
    case 0xc4: return { t: "bin", v: r.take(len(1)) };
    case 0xc5: return { t: "bin", v: r.take(len(2)) };
    case 0xc6: return { t: "bin", v: r.take(len(4)) };
    case 0xcc: return { t: "int", v: r.uint(1) };
    case 0xcd: return { t: "int", v: r.uint(2) };
    case 0xce: return { t: "int", v: r.uint(4) };
    case 0xcf: return { t: "int", v: r.uint(8) };
    case 0xd9: return { t: "str", v: decodeUtf8(r.take(len(1))) };
    case 0xda: return { t: "str", v: decodeUtf8(r.take(len(2))) };
    case 0xdb: return { t: "str", v: decodeUtf8(r.take(len(4))) };
    case 0xdc: return mpArrayValue(r, len(2));
    case 0xdd: return mpArrayValue(r, len(4));
    case 0xde: return mpMapValue(r, len(2));
    case 0xdf: return mpMapValue(r, len(4));
    // Valid MessagePack that no field may hold (an unknown key may): skipped whole.
    case 0xc0: return { t: "nil" };
    case 0xca: r.take(4); return { t: "float" };
    case 0xcb: r.take(8); return { t: "float" };
    case 0xd0: r.take(1); return { t: "negative int" };
    case 0xd1: r.take(2); return { t: "negative int" };
    case 0xd2: r.take(4); return { t: "negative int" };
    case 0xd3: r.take(8); return { t: "negative int" };
    case 0xc7: { const n = len(1); r.take(1 + n); return { t: "ext" }; }
    case 0xc8: { const n = len(2); r.take(1 + n); return { t: "ext" }; }
    case 0xc9: { const n = len(4); r.take(1 + n); return { t: "ext" }; }
    default:
      if (c >= 0xe0) return { t: "negative int" };
      if (c >= 0xd4 && c <= 0xd8) { r.take(1 + 2 ** (c - 0xd4)); return { t: "ext" }; }
      throw new ProtocolError(`msgpack byte 0x${c.toString(16)} is never valid`);
  }
}

function mpArrayValue(r, n) {
  r.need(n);
  const items = [];
  for (let i = 0; i < n; i++) items.push(mpValue(r));
  return { t: "array", v: items };
}

function mpMapValue(r, n) {
  r.need(2 * n);
  const map = new Map();
  for (let i = 0; i < n; i++) {
    const key = mpValue(r);
    const value = mpValue(r);
    if (key.t === "str") {
      if (map.has(key.v)) throw new ProtocolError(`msgpack duplicate key ${key.v}`);
      map.set(key.v, value);
    }
  }
  return { t: "map", v: map };
}

function mpFields(value, fields) {
  if (value.t !== "map") throw new ProtocolError("msgpack body is not a map");
  const obj = {};
  for (const [name, kind, item] of fields) {
    const v = value.v.get(name);
    if (v === undefined) throw new ProtocolError(`msgpack map missing field ${name}`);
    const want = kind in WIDTH ? "int" : kind === "bytes" ? "bin" : kind === "struct" ? "map"
      : kind === "list" || kind === "strs" ? "array" : kind;
    if (v.t !== want) throw new ProtocolError(`msgpack ${v.t} where ${kind} is required for ${name}`);
    if (kind in WIDTH) obj[name] = checkInt(kind, v.v);
    else if (kind === "struct") obj[name] = mpFields(v, item);
    else if (kind === "list") obj[name] = v.v.map((x) => mpFields(x, item));
    else if (kind === "strs") {
      obj[name] = v.v.map((x) => {
        if (x.t !== "str") throw new ProtocolError(`msgpack ${x.t} in a list of str`);
        return x.v;
      });
    } else obj[name] = v.v;
  }
  return obj;
}

// --- both ----------------------------------------------------------------------

export const BIN = 1;
export const MSGPACK = 2;

/** One payload: u8 type | u32 ref | body. */
export function encode(codec, name, ref, fields = {}) {
  const spec = SCHEMA[name];
  if (!spec) throw new Error(`unknown message ${name}`);
  const w = new Writer();
  w.uint(1, spec[0]);
  w.uint(4, checkInt("u32", ref));
  if (codec === BIN) binWrite(w, spec[1], fields);
  else mpWrite(w, spec[1], fields);
  return w.done();
}

/** {name, type, ref, fields} of one payload, else ProtocolError. */
export function decode(codec, payload) {
  if (payload.length < 5) throw new ProtocolError("payload shorter than 5 bytes");
  const r = new Reader(payload, 0);
  const type = r.uint(1);
  const ref = r.uint(4);
  const spec = BY_TYPE.get(type);
  if (!spec) throw new ProtocolError(`unknown message type ${type}`);
  const fields = codec === BIN ? binRead(r, spec.fields) : mpFields(mpValue(r), spec.fields);
  if (r.off !== payload.length) throw new ProtocolError("trailing bytes after the body");
  return { name: spec.name, type, ref, fields };
}
