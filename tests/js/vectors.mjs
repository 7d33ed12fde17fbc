// The shared vectors (codec.json, handshake.json) against the browser
// client's modules. Plain functions over the parsed vectors, so that the same
// checks run under `node --test` (vectors.test.mjs) and in Chromium (the
// browser test imports this file into the page).
import * as codec from "../../simzmq/web/static/js/codec.js";
import { ClientHandshake, Receiver, ChannelError } from "../../simzmq/web/static/js/channel.js";

const hex = (s) => Uint8Array.from(s.match(/../g) ?? [], (h) => parseInt(h, 16));
const toHex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

function fail(what, got, want) {
  throw new Error(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
}

function equal(what, got, want) {
  const a = JSON.stringify(got), b = JSON.stringify(want);
  if (a !== b) fail(what, got, want);
}

// Vector fields as the codec holds them: {"hex": ...} becomes bytes.
function fromVector(v) {
  if (Array.isArray(v)) return v.map(fromVector);
  if (v && typeof v === "object") {
    if ("hex" in v && Object.keys(v).length === 1) return hex(v.hex);
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, fromVector(x)]));
  }
  return v;
}

// Comparable form of decoded fields: bytes as {"hex": ...} again.
function toVector(v) {
  if (v instanceof Uint8Array) return { hex: toHex(v) };
  if (Array.isArray(v)) return v.map(toVector);
  if (v && typeof v === "object") return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, toVector(x)]));
  return v;
}

/** Every message encodes to its bin and msgpack bytes and decodes back; every malformed payload is refused. */
export function checkCodec(vectors) {
  let checked = 0;
  for (const vec of vectors.messages) {
    for (const [id, key] of [[codec.BIN, "bin"], [codec.MSGPACK, "msgpack"]]) {
      const encoded = codec.encode(id, vec.name, vec.ref, fromVector(vec.fields));
      equal(`${vec.name} ${key} encoding`, toHex(encoded), vec[key]);
      const decoded = codec.decode(id, hex(vec[key]));
      equal(`${vec.name} ${key} decoding`, [decoded.name, decoded.type, decoded.ref, toVector(decoded.fields)],
        [vec.name, vec.type, vec.ref, vec.fields]);
      checked++;
    }
  }
  for (const bad of vectors.malformed) {
    const id = bad.codec === "bin" ? codec.BIN : codec.MSGPACK;
    try {
      codec.decode(id, hex(bad.payload));
    } catch (e) {
      if (!(e instanceof codec.ProtocolError)) fail(`${bad.why}: error kind`, e.constructor.name, "ProtocolError");
      checked++;
      continue;
    }
    fail(`${bad.why}: decoded`, "a message", "ProtocolError");
  }
  return checked;
}

/** The fixed-key handshake yields the vectors' HELLO, keys and plaintexts; a tampered frame breaks the channel. */
export function checkHandshake(sodium, v) {
  const hs = new ClientHandshake(sodium, hex(v.gate_static_pk), [1, 2], hex(v.client_eph_sk));
  equal("client_eph_pk", toHex(hs.ephPk), v.client_eph_pk);
  equal("gate_static_pk from its secret", toHex(sodium.crypto_scalarmult_base(hex(v.gate_static_sk))), v.gate_static_pk);
  equal("HELLO", toHex(hs.hello()), v.hello);
  hs.receiveWelcome(hex(v.welcome));
  equal("codec chosen", hs.codecId, hex(v.welcome)[5]);
  // The gate's frames decrypt, in order, to the plaintexts and tags.
  for (const [i, frame] of v.gate_frames.entries()) {
    const { plaintext, final } = hs.receiver.open(hex(frame.ciphertext));
    equal(`gate frame ${i}`, [toHex(plaintext), final], [frame.plaintext, frame.tag === 3]);
  }
  // The client's frames, under the vectors' c2s_header, decrypt with the derived c2s_key.
  const c2s = new Receiver(sodium, hex(v.c2s_key), hex(v.c2s_header));
  for (const [i, frame] of v.client_frames.entries()) {
    const { plaintext, final } = c2s.open(hex(frame.ciphertext));
    equal(`client frame ${i}`, [toHex(plaintext), final], [frame.plaintext, frame.tag === 3]);
  }
  // What this client seals, a gate holding c2s_key opens (our own header: it is random).
  const sealed = hs.sender.seal(hex(v.client_frames[0].plaintext));
  const gateSide = new Receiver(sodium, hex(v.c2s_key), hs.sender.header);
  equal("own sealed frame", toHex(gateSide.open(sealed).plaintext), v.client_frames[0].plaintext);
  // A tampered first gate frame fails, and the channel stays broken.
  const again = new ClientHandshake(sodium, hex(v.gate_static_pk), [1, 2], hex(v.client_eph_sk));
  again.receiveWelcome(hex(v.welcome));
  for (const frame of [v.tampered_gate_frame, v.gate_frames[0].ciphertext]) {
    try {
      again.receiver.open(hex(frame));
    } catch (e) {
      if (!(e instanceof ChannelError)) fail("tampered frame: error kind", e.constructor.name, "ChannelError");
      continue;
    }
    fail("tampered frame", "decrypted", "ChannelError");
  }
  // A WELCOME choosing a codec that was not offered is refused.
  const binOnly = new ClientHandshake(sodium, hex(v.gate_static_pk), [1], hex(v.client_eph_sk));
  const welcome = hex(v.welcome);
  welcome[5] = 2;
  try {
    binOnly.receiveWelcome(welcome);
  } catch {
    return;
  }
  fail("WELCOME with a codec not offered", "accepted", "refused");
}
