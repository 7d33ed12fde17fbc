// The handshake and the encrypted channel of protocol.md section 2, without
// I/O: bytes in, bytes out. `sodium` is libsodium-wrappers-sumo once ready.

export class HandshakeError extends Error {}
export class ChannelError extends Error {}

const MAGIC = [0x53, 0x49, 0x4d, 0x5a]; // "SIMZ"
const VERSION = 1;
const KEY_SIZE = 32;
export const HEADER_SIZE = 24;
export const OVERHEAD = 17;
const WELCOME_PREFIX_SIZE = 38;
const WELCOME_SIZE = 62;
// "simzmq-v1" and 7 zero bytes.
const PERSON = Uint8Array.from([..."simzmq-v1"].map((c) => c.charCodeAt(0)).concat(Array(7).fill(0)));
const SALT = new Uint8Array(16);

const concat = (...parts) => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) { out.set(p, off); off += p.length; }
  return out;
};
const isZero = (b) => b.every((x) => x === 0);

function checkKey(name, key) {
  if (!(key instanceof Uint8Array) || key.length !== KEY_SIZE) throw new HandshakeError(`${name} must be ${KEY_SIZE} bytes`);
  return key;
}

/** BLAKE2b-512 of `input`, zero salt, personalization "simzmq-v1".
 *
 * The wrappers' crypto_generichash_blake2b_salt_personal hashes no input
 * (it is a key derivation), so this calls the library's C function itself. */
export function blake2bPersonal(sodium, input) {
  const lib = sodium.libsodium;
  const size = 64 + input.length + SALT.length + PERSON.length;
  const base = lib._malloc(size);
  try {
    const out = base, inp = base + 64, salt = inp + input.length, person = salt + SALT.length;
    lib.HEAPU8.set(input, inp);
    lib.HEAPU8.set(SALT, salt);
    lib.HEAPU8.set(PERSON, person);
    // (out, outlen, in, inlen as two 32-bit halves, key, keylen, salt, personal)
    if (lib._crypto_generichash_blake2b_salt_personal(out, 64, inp, input.length, 0, 0, 0, salt, person) !== 0) {
      throw new HandshakeError("BLAKE2b failed");
    }
    return lib.HEAPU8.slice(out, out + 64);
  } finally {
    lib._free(base);
  }
}

function x25519(sodium, sk, pk) {
  let shared;
  try {
    shared = sodium.crypto_scalarmult(sk, pk);
  } catch {
    throw new HandshakeError("small-order public key");
  }
  if (isZero(shared)) throw new HandshakeError("small-order public key");
  return shared;
}

/** [c2s_key, s2c_key] from the shared secrets and the transcript. */
export function deriveKeys(sodium, ee, es, gatePk, hello, welcomePrefix) {
  if (isZero(ee) || isZero(es)) throw new HandshakeError("small-order public key");
  const okm = blake2bPersonal(sodium, concat(ee, es, gatePk, hello, welcomePrefix));
  return [okm.slice(0, 32), okm.slice(32, 64)];
}

/** One direction's encrypting half; `header` goes to the peer. */
export class Sender {
  constructor(sodium, key) {
    this.sodium = sodium;
    const { state, header } = sodium.crypto_secretstream_xchacha20poly1305_init_push(checkKey("key", key));
    this.state = state;
    this.header = header;
    this.closed = false;
  }

  seal(plaintext, final = false) {
    if (this.closed) throw new ChannelError("frame after TAG_FINAL");
    if (final) this.closed = true;
    const s = this.sodium;
    return s.crypto_secretstream_xchacha20poly1305_push(this.state, plaintext, null,
      final ? s.crypto_secretstream_xchacha20poly1305_TAG_FINAL : s.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE);
  }
}

/** One direction's decrypting half; any failure leaves it broken for good. */
export class Receiver {
  constructor(sodium, key, header) {
    checkKey("key", key);
    if (!(header instanceof Uint8Array) || header.length !== HEADER_SIZE) {
      throw new HandshakeError(`stream header must be ${HEADER_SIZE} bytes`);
    }
    this.sodium = sodium;
    this.state = sodium.crypto_secretstream_xchacha20poly1305_init_pull(header, key);
    this.done = null; // why no more frames are accepted
  }

  /** {plaintext, final} of one frame, else ChannelError. */
  open(ciphertext) {
    if (this.done) throw new ChannelError(this.done);
    const s = this.sodium;
    let result = null;
    if (ciphertext.length >= OVERHEAD) {
      try {
        result = s.crypto_secretstream_xchacha20poly1305_pull(this.state, ciphertext, null);
      } catch {
        result = null;
      }
    }
    if (!result) {
      this.done = "channel broken by a frame that failed to decrypt";
      throw new ChannelError("frame failed to decrypt");
    }
    if (result.tag === s.crypto_secretstream_xchacha20poly1305_TAG_FINAL) {
      this.done = "frame after TAG_FINAL";
      return { plaintext: result.message, final: true };
    }
    if (result.tag !== s.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE) {
      this.done = `channel broken by tag ${result.tag}`;
      throw new ChannelError(`unexpected secretstream tag ${result.tag}`);
    }
    return { plaintext: result.message, final: false };
  }
}

/** The client's side: hello() out, receiveWelcome() in; then sender.header is the c2s_header. */
export class ClientHandshake {
  constructor(sodium, gatePk, codecs = [1], ephSk = null) {
    this.sodium = sodium;
    this.gatePk = checkKey("gate public key", gatePk);
    if (codecs.length < 1 || codecs.length > 255) throw new HandshakeError("1-255 codecs");
    this.codecs = Uint8Array.from(codecs);
    this.ephSk = ephSk ? checkKey("ephemeral secret key", ephSk) : sodium.randombytes_buf(KEY_SIZE);
    this.ephPk = sodium.crypto_scalarmult_base(this.ephSk);
    this.helloBytes = concat(Uint8Array.from(MAGIC), Uint8Array.of(VERSION, codecs.length), this.codecs, this.ephPk);
    this.codecId = null;
    this.sender = null;
    this.receiver = null;
  }

  hello() {
    return this.helloBytes;
  }

  receiveWelcome(welcome) {
    if (this.receiver) throw new HandshakeError("second WELCOME");
    if (welcome.length !== WELCOME_SIZE) throw new HandshakeError(`WELCOME of ${welcome.length} bytes`);
    if (!MAGIC.every((b, i) => welcome[i] === b)) throw new HandshakeError("WELCOME magic is not SIMZ");
    if (welcome[4] !== VERSION) throw new HandshakeError(`unsupported version ${welcome[4]}`);
    if (!this.codecs.includes(welcome[5])) throw new HandshakeError(`gate chose codec ${welcome[5]}, which was not offered`);
    const prefix = welcome.slice(0, WELCOME_PREFIX_SIZE);
    const ee = x25519(this.sodium, this.ephSk, welcome.slice(6, WELCOME_PREFIX_SIZE));
    const es = x25519(this.sodium, this.ephSk, this.gatePk);
    const [c2s, s2c] = deriveKeys(this.sodium, ee, es, this.gatePk, this.helloBytes, prefix);
    this.receiver = new Receiver(this.sodium, s2c, welcome.slice(WELCOME_PREFIX_SIZE));
    this.sender = new Sender(this.sodium, c2s);
    this.codecId = welcome[5];
  }
}
