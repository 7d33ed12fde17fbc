// A user's session with the region over the gate's WebSocket: handshake,
// login (password or resume token), requests and replies, pushes, the inbox
// seq set, unacknowledged Sends kept and resent with their cmid, and
// reconnecting. No DOM: the page listens to its events.
import * as codec from "./codec.js";
import { ClientHandshake } from "./channel.js";

export const PING_INTERVAL_MS = 25000;
export const WATCH_PER_REQUEST = 256; // section 7: ids in one Watch
export const TYPING_EVERY_MS = 3000; // section 7: Typing{true} at most this often while typing
export const TYPING_SHOWN_MS = 6000; // and a `true` counts as ended after this without another
const HANDSHAKE_TIMEOUT_MS = 10000;
const REQUEST_TIMEOUT_MS = 30000;
const SENDOK_GAP_GRACE_MS = 300;
const SYNC_LIMIT = 500;
const NO_RECONNECT_KICKS = new Set([2, 5]); // replaced, abuse
const RETRY_SEND_CODES = new Set([5, 7]); // rate_limited, unavailable
export const SESSION_OVER_CODES = new Set([2, 4, 9]); // auth_failed, no_such_user, forbidden: a token login cannot succeed

export const toHex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
export const fromHex = (s) => Uint8Array.from(s.match(/../g) ?? [], (h) => parseInt(h, 16));

export class RequestError extends Error {
  constructor(code, reason) {
    super(reason);
    this.code = code;
    this.codeName = codec.ERROR_CODES[code] ?? `error ${code}`;
  }
}

/** The inbox seqs held: the highest contiguous one plus the few above it (protocol.md section 5). */
export class SeqSet {
  constructor(maxContiguous = 0) { this.maxContiguous = maxContiguous; this.above = new Set(); }
  holds(seq) { return seq <= this.maxContiguous || this.above.has(seq); }
  get hasGap() { return this.above.size > 0; }
  add(seq) {
    if (this.holds(seq)) return false;
    if (seq === this.maxContiguous + 1) { this.maxContiguous = seq; this.absorb(); } else this.above.add(seq);
    return true;
  }
  raiseTo(seq) {
    if (seq <= this.maxContiguous) return;
    this.maxContiguous = seq;
    for (const s of this.above) if (s <= seq) this.above.delete(s);
    this.absorb();
  }
  absorb() {
    while (this.above.delete(this.maxContiguous + 1)) this.maxContiguous++;
  }
}

/** Reconnect delays: exponential to 5 s, each with jitter so dropped clients do not return together. */
export function* backoffDelays(first = 100, cap = 5000) {
  for (let d = first; ; d = Math.min(cap, d * 2)) yield d * (0.5 + 0.5 * Math.random());
}

/** One WebSocket, from HELLO to close. Resolves `opened` once Ready has been decrypted. */
class Connection {
  constructor(sodium, url, gatePk, onMessage, onClose) {
    this.onMessage = onMessage;
    this.onClose = onClose;
    this.refs = 0;
    this.waiting = new Map(); // ref -> {resolve, reject, timer}
    this.closed = false;
    this.handshake = new ClientHandshake(sodium, gatePk, [codec.BIN]);
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    this.opened = new Promise((resolve, reject) => { this.ready = resolve; this.failed = reject; });
    const timer = setTimeout(() => this.shut("handshake timed out"), HANDSHAKE_TIMEOUT_MS);
    this.opened.then(() => clearTimeout(timer), () => clearTimeout(timer));
    this.ws.onopen = () => this.ws.send(this.handshake.hello());
    this.ws.onmessage = (ev) => this.received(new Uint8Array(ev.data));
    this.ws.onclose = (ev) => this.shut(ev.reason || `connection closed (${ev.code})`);
    this.ws.onerror = () => {}; // onclose follows and says it
  }

  received(frame) {
    if (this.closed) return;
    try {
      if (!this.handshake.receiver) {
        this.handshake.receiveWelcome(frame);
        return;
      }
      const { plaintext, final } = this.handshake.receiver.open(frame);
      const msg = codec.decode(codec.BIN, plaintext);
      if (!this.limits) {
        // The gate's first encrypted frame: it holds the key we pinned.
        if (msg.name !== "Ready") throw new Error(`expected Ready, got ${msg.name}`);
        this.limits = msg.fields;
        this.ws.send(this.handshake.sender.header);
        this.ready(msg.fields);
      } else if (msg.ref !== 0 && this.waiting.has(msg.ref)) {
        const w = this.waiting.get(msg.ref);
        this.waiting.delete(msg.ref);
        clearTimeout(w.timer);
        if (msg.name === "Error") w.reject(new RequestError(msg.fields.code, msg.fields.reason));
        else w.resolve(msg);
      } else {
        this.onMessage(msg);
      }
      if (final) this.shut(msg.name === "Kick" ? msg.fields.reason : "closed by the gate");
    } catch (e) {
      this.shut(`protocol error: ${e.message}`);
    }
  }

  request(name, fields = {}) {
    if (this.closed) return Promise.reject(new ConnectionLost("not connected"));
    this.refs = (this.refs % 0xffffffff) + 1;
    const ref = this.refs;
    this.ws.send(this.handshake.sender.seal(codec.encode(codec.BIN, name, ref, fields)));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(ref);
        reject(new ConnectionLost(`${name} timed out`));
        this.shut(`${name} timed out`);
      }, REQUEST_TIMEOUT_MS);
      this.waiting.set(ref, { resolve, reject, timer });
    });
  }

  shut(why) {
    if (this.closed) return;
    this.closed = true;
    this.why = why;
    this.failed(new ConnectionLost(why));
    for (const w of this.waiting.values()) { clearTimeout(w.timer); w.reject(new ConnectionLost(why)); }
    this.waiting.clear();
    try { this.ws.close(); } catch { /* already closing */ }
    this.onClose(this, why);
  }
}

export class ConnectionLost extends Error {}

/**
 * Events (CustomEvent detail):
 *   state     {state, why}  state: offline | connecting | online | reconnecting | stopped
 *   message   {msg, own}    an inbox entry newly held (own: from this page's Send)
 *   sent      {cmid, ok}    a Send acknowledged (durable)
 *   sendfail  {cmid, error} a Send refused for good
 *   read      notice        a ReadNotice
 *   session   {user, token} a new resume token (store it)
 *   synced    {}            a Sync finished: the inbox is complete
 *   presence  Presence      a watched user's state ({user, state, last_seen_ms}; 0 unknown, 1 offline, 2 online, 3 away)
 *   typing    TypingNotice  {user, peer, typing}: peer is the group, or this user for one-to-one typing
 */
export class ChatClient extends EventTarget {
  constructor(sodium, { url, gatePk, device }) {
    super();
    this.sodium = sodium;
    this.url = url;
    this.gatePk = gatePk;
    this.device = device;
    this.user = "";
    this.token = new Uint8Array(0);
    this.conn = null;
    this.state = "offline";
    this.inbox = null; // SeqSet once logged in
    this.pending = new Map(); // cmid hex -> {to, cmid, kind, body}, in send order
    this.limits = { max_body: 65536 };
    this.stopping = false;
    this.watched = new Set(); // ids watched; watched again after every reconnect
    this.presence = new Map(); // user -> the latest Presence
  }

  setState(state, why = "") {
    this.state = state;
    this.emit("state", { state, why });
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  async open() {
    const conn = new Connection(this.sodium, this.url, this.gatePk, (m) => this.onPush(m), (c, why) => this.onClosed(c, why));
    this.limits = await conn.opened;
    return conn;
  }

  /** Create an account (does not log in). */
  async register(user, password) {
    const conn = await this.open();
    try {
      await conn.request("Register", { user, password });
    } finally {
      conn.shut("registered");
    }
  }

  /** Log in with a password or, when `password` is empty, the resume token. Keeps the session from then on. */
  async login(user, { password = "", token = null } = {}) {
    this.stopping = false;
    this.user = user;
    if (token) this.token = token;
    this.setState("connecting");
    try {
      await this.connectAndLogin(password);
    } catch (e) {
      this.setState("offline", e.message);
      throw e;
    }
  }

  async connectAndLogin(password = "") {
    const conn = await this.open();
    let ok;
    try {
      ok = (await conn.request("Login", password
        ? { user: this.user, password, device: this.device }
        : { user: this.user, token: this.token, device: this.device })).fields;
    } catch (e) {
      conn.shut("login failed");
      throw e;
    }
    this.conn = conn;
    this.token = ok.token;
    this.emit("session", { user: this.user, token: ok.token });
    if (!this.inbox) {
      // A fresh page holds nothing yet; what came before, it reads from /v1/history.
      this.inbox = new SeqSet(ok.max_seq);
    }
    this.setState("online");
    // Unacknowledged Sends go again, in their order, with their cmids.
    for (const p of this.pending.values()) this.transmit(p);
    if (this.inbox.hasGap || ok.max_seq > this.inbox.maxContiguous) this.requestSync();
    if (this.watched.size) this.watch([...this.watched]).catch(() => {});
    clearInterval(this.pinger);
    this.pinger = setInterval(() => this.conn === conn && conn.request("Ping", { ts_ms: Date.now() }).catch(() => {}),
      PING_INTERVAL_MS);
    return ok;
  }

  onClosed(conn, why) {
    if (conn !== this.conn) return;
    this.conn = null;
    clearInterval(this.pinger);
    if (this.stopping) return;
    if (this.kick && NO_RECONNECT_KICKS.has(this.kick.code)) {
      this.stop(`signed out: ${this.kick.reason}`);
      return;
    }
    this.reconnect(why);
  }

  async reconnect(why) {
    this.setState("reconnecting", why);
    for (const delay of backoffDelays()) {
      await new Promise((r) => setTimeout(r, delay));
      if (this.stopping) return;
      try {
        this.kick = null;
        await this.connectAndLogin();
        return;
      } catch (e) {
        if (e instanceof RequestError && SESSION_OVER_CODES.has(e.code)) {
          this.stop("your session has ended; log in again");
          return;
        }
        this.setState("reconnecting", e.message);
      }
    }
  }

  stop(why) {
    this.stopping = true;
    clearInterval(this.pinger);
    if (this.conn) this.conn.shut(why);
    this.conn = null;
    this.setState("stopped", why);
  }

  /** Revoke the token and close. */
  async logout() {
    const conn = this.conn;
    this.stopping = true;
    try {
      if (conn) await conn.request("Logout");
    } catch { /* closing anyway */ }
    this.pending.clear();
    this.stop("logged out");
  }

  /** Requests that are safe to repeat wait for a connection. */
  async call(name, fields) {
    for (;;) {
      if (this.stopping) throw new ConnectionLost("stopped");
      if (this.conn) {
        try {
          return (await this.conn.request(name, fields)).fields;
        } catch (e) {
          if (!(e instanceof ConnectionLost)) throw e;
        }
      }
      await new Promise((resolve) => {
        const once = (ev) => {
          if (ev.detail.state === "online" || ev.detail.state === "stopped") {
            this.removeEventListener("state", once);
            resolve();
          }
        };
        this.addEventListener("state", once);
      });
    }
  }

  convs() { return this.call("Convs").then((f) => f.convs); }

  /** Watch these ids too (section 7); their states come as "presence" events. */
  async watch(users) {
    const ids = [...new Set(users)].slice(0, WATCH_PER_REQUEST);
    for (const u of ids) this.watched.add(u);
    const list = await this.call("Watch", { users: ids });
    for (const p of list.states) this.onPresence(p);
    return list.states;
  }

  onPresence(p) {
    this.presence.set(p.user, p);
    this.emit("presence", p);
  }

  /** Tell whoever may hear it that this user is typing to `peer` (or stopped). */
  typing(peer, typing) {
    if (this.conn && this.state === "online") this.conn.request("Typing", { peer, typing }).catch(() => {});
  }
  read(peer, msgId) { return this.call("Read", { peer, msg_id: msgId }); }

  /** Queue a Send; returns its cmid (hex). Sent now if online, else at the next login. */
  send(to, body, kind = 0) {
    const cmid = this.sodium.randombytes_buf(16);
    const p = { to, cmid, kind, body };
    this.pending.set(toHex(cmid), p);
    this.transmit(p);
    return toHex(cmid);
  }

  /** Sends restored from before a reload: resent with their cmids once online. */
  restorePending(list) {
    for (const p of list) this.pending.set(toHex(p.cmid), p);
  }

  transmit(p) {
    const conn = this.conn;
    if (!conn || this.state !== "online") return; // the next login sends it
    conn.request("Send", p).then((ok) => this.sendOk(p, ok.fields), (e) => {
      const key = toHex(p.cmid);
      if (!this.pending.has(key) || e instanceof ConnectionLost) return; // resent after the reconnect
      if (RETRY_SEND_CODES.has(e.code)) {
        setTimeout(() => this.conn === conn && this.pending.has(key) && this.transmit(p), 1000 + 1000 * Math.random());
        return;
      }
      this.pending.delete(key);
      this.emit("sendfail", { cmid: key, error: e });
    });
  }

  sendOk(p, ok) {
    const key = toHex(p.cmid);
    if (!this.pending.delete(key)) return;
    const msg = { msg_id: ok.msg_id, seq: ok.seq, sender: this.user, to: p.to, kind: p.kind, ts_ms: ok.ts_ms,
      cmid: p.cmid, body: p.body };
    this.emit("sent", { cmid: key, ok });
    this.apply(msg, true);
    if (this.inbox.hasGap && !this.gapCheck) {
      // The push of a seq below ours may still be on its way.
      this.gapCheck = setTimeout(() => { this.gapCheck = null; if (this.inbox.hasGap) this.requestSync(); },
        SENDOK_GAP_GRACE_MS);
    }
  }

  apply(msg, own = false) {
    if (!this.inbox.add(msg.seq)) return;
    this.emit("message", { msg, own });
  }

  onPush(m) {
    if (m.name === "NewMsg") {
      const seq = m.fields.msg.seq;
      if (this.inbox.holds(seq)) return;
      if (seq === this.inbox.maxContiguous + 1) this.apply(m.fields.msg);
      else this.requestSync();
    } else if (m.name === "ReadNotice") {
      this.emit("read", m.fields);
    } else if (m.name === "PresenceNotice") {
      this.onPresence(m.fields.state);
    } else if (m.name === "TypingNotice") {
      this.emit("typing", m.fields);
    } else if (m.name === "Kick") {
      this.kick = m.fields;
    } else if (m.name === "Ping") {
      this.conn?.ws.send(this.conn.handshake.sender.seal(codec.encode(codec.BIN, "Pong", m.ref, m.fields)));
    }
  }

  requestSync() {
    if (this.syncing) { this.syncAgain = true; return; }
    this.syncing = this.syncLoop().finally(() => { this.syncing = null; });
  }

  async syncLoop() {
    try {
      do {
        this.syncAgain = false;
        for (;;) {
          const since = this.inbox.maxContiguous;
          const batch = await this.call("Sync", { since, limit: SYNC_LIMIT });
          for (const msg of batch.msgs) this.apply(msg);
          if (!batch.more || this.inbox.maxContiguous === since) break;
        }
      } while (this.syncAgain);
      this.emit("synced", {});
    } catch (e) {
      if (!(e instanceof ConnectionLost)) console.warn("sync failed", e);
    }
  }
}
