// The chat page: binds ChatClient to the DOM. User text only ever goes in
// through textContent.
import sodium from "libsodium-wrappers-sumo";
import { ChatClient, RequestError, SESSION_OVER_CODES, TYPING_EVERY_MS, TYPING_SHOWN_MS, toHex, fromHex } from "./client.js";

const $ = (id) => document.getElementById(id);
const utf8 = new TextEncoder();
const text = new TextDecoder();
const USER_ID = /^[A-Za-z0-9_.-]{1,64}$/;
const HISTORY_PAGE = 50;
const STORE = "simzmq.session";

const ERRORS = {
  auth_failed: "Wrong user name or password.",
  exists: "That user name is taken. Pick another, or log in.",
  forbidden: "Registration is closed on this server.",
  rate_limited: "Too many attempts. Wait a little and try again.",
  bad_request: "The server refused that request.",
  no_such_user: "There is no user of that name.",
  too_large: "That message is too large for the server.",
  unavailable: "The server is busy. Try again in a moment.",
};
const explain = (e) => (e instanceof RequestError ? (ERRORS[e.codeName] ?? e.message) : e.message);
const STATES = { offline: "Offline", connecting: "Connecting…", online: "Online", reconnecting: "Reconnecting…",
  stopped: "Signed out" };

// --- state --------------------------------------------------------------------

let config, client;
const convs = new Map(); // peer -> {peer, lastMsgId, unread, peerRead, last}
const threads = new Map(); // peer -> {msgs: Map msg_id -> msg, pending: Map cmid -> item, oldest, more, loaded}
let current = null; // the open conversation's peer
const typers = new Map(); // conversation peer -> Map user -> timer that ends their "typing"
let typingSent = { peer: null, at: 0 }; // our last Typing{true}
const PRESENCE_WORDS = { 1: "offline", 2: "online", 3: "away" };

const thread = (peer) => {
  if (!threads.has(peer)) threads.set(peer, { msgs: new Map(), pending: new Map(), oldest: 0, more: true, loaded: false });
  return threads.get(peer);
};
const conv = (peer) => {
  if (!convs.has(peer)) convs.set(peer, { peer, lastMsgId: 0, unread: 0, peerRead: 0, last: null });
  return convs.get(peer);
};
const peerOf = (msg) => (msg.to.startsWith("#") ? msg.to : msg.sender === client.user ? msg.to : msg.sender);
const bodyText = (msg) => (msg.kind === 0 ? text.decode(msg.body) : msg.kind === 255 ? "(group event)" : `(message of kind ${msg.kind})`);

// --- session storage: the token survives a reload of this tab, never the password ---

function saveSession() {
  const pending = [...client.pending.values()].map((p) => ({ to: p.to, cmid: toHex(p.cmid), kind: p.kind, body: toHex(p.body) }));
  sessionStorage.setItem(STORE, JSON.stringify({ user: client.user, token: toHex(client.token), device: client.device,
    gatePk: config.gate_pk, pending }));
}

function loadSession() {
  try {
    return JSON.parse(sessionStorage.getItem(STORE) ?? "null");
  } catch {
    return null;
  }
}

// --- connection state -----------------------------------------------------------

function showState(state, why) {
  $("conn").dataset.state = state;
  $("conn-text").textContent = STATES[state] ?? state;
  $("conn").title = why || "";
}

// --- login --------------------------------------------------------------------

function loginError(message) {
  const el = $("login-error");
  el.textContent = message;
  el.hidden = !message;
}

function credentials() {
  const user = $("user").value.trim();
  const password = $("password").value;
  if (!USER_ID.test(user)) {
    loginError("User names are 1–64 letters, digits, dots, dashes or underscores.");
    $("user").focus();
    return null;
  }
  if (!password) {
    loginError("Enter a password.");
    $("password").focus();
    return null;
  }
  return { user, password };
}

async function busy(fn) {
  const buttons = [$("login-btn"), $("register-btn")];
  buttons.forEach((b) => { b.disabled = true; });
  try {
    await fn();
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

async function logIn(user, opts) {
  await client.login(user, opts);
  saveSession();
  enterChat();
}

function onLoginSubmit(ev) {
  ev.preventDefault();
  const c = credentials();
  if (!c) return;
  loginError("");
  busy(async () => {
    try {
      await logIn(c.user, { password: c.password });
    } catch (e) {
      loginError(explain(e));
    }
  });
}

function onRegister() {
  const c = credentials();
  if (!c) return;
  loginError("");
  busy(async () => {
    try {
      await client.register(c.user, c.password);
      await logIn(c.user, { password: c.password });
    } catch (e) {
      loginError(explain(e));
    }
  });
}

function enterChat() {
  $("password").value = "";
  $("login-view").hidden = true;
  $("chat-view").hidden = false;
  $("me").hidden = false;
  $("me-name").textContent = client.user;
  refreshConvs();
  $("new-peer").focus();
}

function leaveChat(message) {
  sessionStorage.removeItem(STORE);
  convs.clear();
  threads.clear();
  current = null;
  $("chat-view").hidden = true;
  $("me").hidden = true;
  $("login-view").hidden = false;
  $("user").value = client.user;
  loginError(message);
  client = newClient();
  $("password").focus();
}

// --- conversation list --------------------------------------------------------------

async function refreshConvs() {
  let list;
  try {
    list = await client.convs();
  } catch {
    return;
  }
  for (const c of list) {
    const entry = conv(c.peer);
    entry.lastMsgId = Math.max(entry.lastMsgId, c.last_msg_id);
    entry.unread = c.peer === current ? 0 : c.unread;
    entry.peerRead = Math.max(entry.peerRead, c.peer_read);
  }
  renderConvs();
  if (current) renderThread();
  watchPeers();
  // The list names only the last msg_id: the text of the newest few comes from history.
  const missing = [...convs.values()].filter((c) => !c.last && c.lastMsgId).slice(0, 12);
  await Promise.all(missing.map(async (c) => {
    const page = await history(c.peer, 0, 1).catch(() => null);
    if (page?.messages.length && !c.last) {
      c.last = page.messages[0];
      renderConvs();
    }
  }));
}

// --- presence and typing (section 7) ----------------------------------------------

/** Watch every user we have a conversation with (their presence shows if they wrote to us). */
function watchPeers() {
  const users = [...convs.keys()].filter((p) => !p.startsWith("#") && !client.watched.has(p));
  if (users.length) client.watch(users).catch(() => {});
}

function presenceText(peer) {
  const p = client.presence.get(peer);
  if (!p || !PRESENCE_WORDS[p.state]) return "";
  if (p.state === 1 && p.last_seen_ms) return `last seen ${shortTime(p.last_seen_ms)}`;
  return PRESENCE_WORDS[p.state];
}

function renderPeerStatus() {
  if (!current) return;
  const who = [...(typers.get(current)?.keys() ?? [])];
  const typing = who.length === 0 ? "" : current.startsWith("#") ? `${who.join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "typing…";
  $("peer-status").textContent = typing || presenceText(current);
}

function onTyping({ detail: n }) {
  const peer = n.peer.startsWith("#") ? n.peer : n.user;
  const users = typers.get(peer) ?? new Map();
  clearTimeout(users.get(n.user));
  if (n.typing) users.set(n.user, setTimeout(() => { users.delete(n.user); renderPeerStatus(); }, TYPING_SHOWN_MS));
  else users.delete(n.user);
  typers.set(peer, users);
  renderPeerStatus();
}

/** While text is being written: Typing{true} at most every few seconds; {false} when it is sent or cleared. */
function onInput() {
  const now = Date.now();
  if (current && $("text").value.trim()) {
    if (typingSent.peer !== current || now - typingSent.at >= TYPING_EVERY_MS) {
      if (typingSent.peer !== current) stopTyping();
      client.typing(current, true);
      typingSent = { peer: current, at: now };
    }
  } else stopTyping();
}

function stopTyping() {
  if (typingSent.peer) client.typing(typingSent.peer, false);
  typingSent = { peer: null, at: 0 };
}

function renderConvs() {
  const ul = $("conv-list");
  const sorted = [...convs.values()].sort((a, b) => b.lastMsgId - a.lastMsgId);
  ul.replaceChildren(...sorted.map((c) => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.className = "conv";
    b.dataset.peer = c.peer;
    if (c.peer === current) b.setAttribute("aria-current", "true");
    const name = document.createElement("span");
    name.className = "conv-name";
    name.textContent = c.peer;
    const last = document.createElement("span");
    last.className = "conv-last";
    last.textContent = c.last ? (c.last.sender === client.user ? "You: " : "") + bodyText(c.last) : "";
    const time = document.createElement("span");
    time.className = "conv-time";
    time.textContent = c.last ? shortTime(c.last.ts_ms) : "";
    b.append(name, time, last);
    const state = client.presence.get(c.peer)?.state;
    if (PRESENCE_WORDS[state]) {
      const dot = document.createElement("span");
      dot.className = "presence";
      dot.dataset.state = PRESENCE_WORDS[state];
      dot.title = presenceText(c.peer);
      dot.setAttribute("aria-label", dot.title);
      name.prepend(dot);
    }
    if (c.unread > 0) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = c.unread > 99 ? "99+" : String(c.unread);
      badge.setAttribute("aria-label", `${c.unread} unread`);
      b.append(badge);
    }
    b.addEventListener("click", () => openConversation(c.peer));
    li.append(b);
    return li;
  }));
  $("no-convs").hidden = sorted.length > 0;
}

function shortTime(ms) {
  const d = new Date(ms);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : d.toLocaleDateString([], { month: "short", day: "numeric" });
}

// --- one conversation ---------------------------------------------------------------

async function history(peer, before, limit) {
  const q = new URLSearchParams({ before: String(before), limit: String(limit) });
  const r = await fetch(`${config.history_path}${encodeURIComponent(peer)}?${q}`, {
    headers: { Authorization: `Bearer ${toHex(client.token)}` }, cache: "no-store" });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.reason || `history: HTTP ${r.status}`);
  body.messages = body.messages.map((m) => ({ ...m, body: Uint8Array.from(atob(m.body), (c) => c.charCodeAt(0)) }));
  return body;
}

async function loadOlder(peer) {
  const t = thread(peer);
  if (!t.more || t.loading) return;
  t.loading = true;
  $("older").disabled = true;
  try {
    const page = await history(peer, t.oldest, HISTORY_PAGE);
    for (const m of page.messages) {
      t.msgs.set(m.msg_id, m);
      t.oldest = t.oldest ? Math.min(t.oldest, m.msg_id) : m.msg_id;
    }
    t.more = page.more && page.messages.length > 0;
    t.loaded = true;
  } catch (e) {
    showSendError(`Could not load history: ${e.message}`);
  } finally {
    t.loading = false;
    $("older").disabled = false;
  }
  if (peer === current) renderThread({ keepTop: true });
}

async function openConversation(peer) {
  current = peer;
  $("no-peer").hidden = true;
  $("peer-view").hidden = false;
  $("chat-view").classList.add("show-conversation");
  $("peer-name").textContent = peer;
  stopTyping();
  if (!peer.startsWith("#") && !client.watched.has(peer)) client.watch([peer]).catch(() => {});
  renderPeerStatus();
  showSendError("");
  renderConvs();
  renderThread();
  $("text").focus();
  const t = thread(peer);
  if (!t.loaded) await loadOlder(peer);
  markRead(peer);
}

function closeConversation() {
  $("chat-view").classList.remove("show-conversation");
  const peer = current;
  current = null;
  renderConvs();
  document.querySelector(`.conv[data-peer="${CSS.escape(peer ?? "")}"]`)?.focus();
}

/** Opening (or looking at) a conversation reads it: Read up to the newest message from the peer. */
function markRead(peer) {
  if (peer !== current || document.visibilityState !== "visible") return;
  const c = conv(peer);
  const theirs = [...thread(peer).msgs.values()].filter((m) => m.sender !== client.user).map((m) => m.msg_id);
  const newest = Math.max(0, ...theirs);
  c.unread = 0;
  renderConvs();
  if (newest > (c.myRead ?? 0)) {
    c.myRead = newest;
    client.read(peer, newest).catch(() => { c.myRead = 0; });
  }
}

function renderThread({ keepTop = false } = {}) {
  if (!current) return;
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const fromBottom = box.scrollHeight - box.scrollTop;
  const t = thread(current);
  const c = conv(current);
  const items = [...t.msgs.values()].sort((a, b) => a.msg_id - b.msg_id);
  const list = $("message-list");
  list.replaceChildren(...items.map((m) => bubble(m, m.sender === client.user
    ? (m.msg_id <= c.peerRead ? "read" : "sent") : null)),
  ...[...t.pending.values()].map((p) => bubble(p, p.error ? "failed" : "pending")));
  $("older").hidden = !t.more || !t.loaded;
  if (keepTop) box.scrollTop = box.scrollHeight - fromBottom;
  else if (atBottom || !keepTop) box.scrollTop = box.scrollHeight;
}

const STATUS = { pending: ["◷", "Sending…"], sent: ["✓", "Sent"], read: ["✓✓", "Read"], failed: ["!", "Not sent"] };

function bubble(m, status) {
  const li = document.createElement("li");
  li.className = `msg ${m.sender === client.user ? "mine" : "theirs"}`;
  if (m.msg_id) li.dataset.msgId = String(m.msg_id);
  if (m.cmid) li.dataset.cmid = typeof m.cmid === "string" ? m.cmid : toHex(m.cmid);
  if (status) li.dataset.status = status;
  const body = document.createElement("p");
  body.className = "body";
  body.textContent = bodyText(m);
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = m.ts_ms ? shortTime(m.ts_ms) : "";
  if (status) {
    const s = document.createElement("span");
    s.className = "status";
    const [symbol, label] = STATUS[status];
    s.textContent = `${label} ${symbol}`;
    if (m.error) s.title = m.error;
    meta.append(meta.textContent ? " · " : "", s);
  }
  li.append(body, meta);
  if (m.error) {
    const err = document.createElement("p");
    err.className = "msg-error";
    err.textContent = `Not sent: ${m.error}`;
    li.append(err);
  }
  return li;
}

function showSendError(message) {
  $("send-error").textContent = message;
  $("send-error").hidden = !message;
}

function onSend(ev) {
  ev.preventDefault();
  const peer = current;
  const value = $("text").value;
  if (!peer || !value.trim()) return;
  const body = utf8.encode(value);
  const max = client.limits.max_body;
  if (body.length > max) {
    showSendError(`This message is ${formatSize(body.length)}; the server takes at most ${formatSize(max)}. Shorten it or split it.`);
    return;
  }
  showSendError("");
  stopTyping();
  const cmid = client.send(peer, body);
  thread(peer).pending.set(cmid, { sender: client.user, to: peer, kind: 0, body, cmid, ts_ms: 0 });
  saveSession();
  $("text").value = "";
  autoGrow();
  renderThread();
}

const formatSize = (n) => (n >= 1024 ? `${(n / 1024).toFixed(n % 1024 ? 1 : 0)} KB` : `${n} bytes`);

function autoGrow() {
  const ta = $("text");
  ta.style.height = "auto";
  ta.style.height = `${Math.min(ta.scrollHeight, 160)}px`;
}

// --- client events ----------------------------------------------------------------

function onMessage({ detail: { msg } }) {
  const peer = peerOf(msg);
  const t = thread(peer);
  t.msgs.set(msg.msg_id, msg);
  if (msg.cmid) t.pending.delete(toHex(msg.cmid));
  const c = conv(peer);
  if (msg.msg_id >= c.lastMsgId) {
    c.lastMsgId = msg.msg_id;
    c.last = msg;
  }
  if (msg.sender !== client.user && msg.msg_id > (c.myRead ?? 0)) c.unread += 1;
  if (peer === current) {
    renderThread();
    markRead(peer);
  }
  renderConvs();
}

function onSent({ detail: { cmid, ok } }) {
  for (const [peer, t] of threads) {
    const p = t.pending.get(cmid);
    if (!p) continue;
    t.pending.delete(cmid);
    t.msgs.set(ok.msg_id, { ...p, msg_id: ok.msg_id, seq: ok.seq, ts_ms: ok.ts_ms, cmid: fromHex(cmid) });
    const c = conv(peer);
    if (ok.msg_id >= c.lastMsgId) { c.lastMsgId = ok.msg_id; c.last = t.msgs.get(ok.msg_id); }
    if (peer === current) renderThread();
    renderConvs();
  }
  saveSession();
}

function onSendFail({ detail: { cmid, error } }) {
  for (const [peer, t] of threads) {
    const p = t.pending.get(cmid);
    if (!p) continue;
    p.error = explain(error);
    if (peer === current) renderThread();
  }
  saveSession();
}

function onRead({ detail: n }) {
  if (n.reader === client.user) {
    // Read on another device of ours.
    const c = conv(n.peer);
    c.myRead = Math.max(c.myRead ?? 0, n.msg_id);
    if (n.msg_id >= c.lastMsgId) c.unread = 0;
    renderConvs();
    return;
  }
  const peer = n.peer.startsWith("#") ? n.peer : n.reader;
  const c = conv(peer);
  c.peerRead = Math.max(c.peerRead, n.msg_id);
  if (peer === current) renderThread();
}

function onState({ detail: { state, why } }) {
  showState(state, why);
  if (state === "online" && !$("chat-view").hidden) refreshConvs();
  if (state === "stopped" && !$("chat-view").hidden) leaveChat(why === "logged out" ? "" : why.charAt(0).toUpperCase() + why.slice(1) + ".");
}

function newClient() {
  const saved = loadSession();
  const device = saved?.device ?? `web-${toHex(sodium.randombytes_buf(4))}`;
  const c = new ChatClient(sodium, { url: config.ws_url, gatePk: fromHex(config.gate_pk), device });
  c.addEventListener("state", onState);
  c.addEventListener("message", onMessage);
  c.addEventListener("sent", onSent);
  c.addEventListener("sendfail", onSendFail);
  c.addEventListener("read", onRead);
  c.addEventListener("presence", () => { renderConvs(); renderPeerStatus(); });
  c.addEventListener("typing", onTyping);
  c.addEventListener("session", () => saveSession());
  c.addEventListener("synced", () => current && renderThread());
  return c;
}

// --- start --------------------------------------------------------------------

async function main() {
  await sodium.ready;
  const r = await fetch("/web/config.json", { cache: "no-store" });
  config = await r.json();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  config.ws_url = `${scheme}//${location.host}${config.ws_path}`;
  client = newClient();
  window.simzmq = { client: () => client }; // for the browser tests and the curious

  $("login-form").addEventListener("submit", onLoginSubmit);
  $("register-btn").addEventListener("click", onRegister);
  $("logout").addEventListener("click", () => client.logout());
  $("new-chat").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const peer = $("new-peer").value.trim();
    const err = $("new-chat-error");
    if (!USER_ID.test(peer) && !/^#[A-Za-z0-9_.-]{1,63}$/.test(peer)) {
      err.textContent = "User names are 1–64 letters, digits, dots, dashes or underscores.";
      err.hidden = false;
      return;
    }
    err.hidden = true;
    $("new-peer").value = "";
    conv(peer);
    openConversation(peer);
  });
  $("composer").addEventListener("submit", onSend);
  $("text").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) onSend(ev);
  });
  $("text").addEventListener("input", autoGrow);
  $("text").addEventListener("input", onInput);
  $("text").addEventListener("blur", stopTyping);
  $("back").addEventListener("click", closeConversation);
  $("older").addEventListener("click", () => loadOlder(current));
  $("messages").addEventListener("scroll", () => {
    if ($("messages").scrollTop < 30 && current && thread(current).loaded) loadOlder(current);
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && current) closeConversation();
  });
  document.addEventListener("visibilitychange", () => current && markRead(current));

  // A reload of this tab resumes with the stored token, if the gate's key is the one it pinned.
  const saved = loadSession();
  if (saved && saved.gatePk !== config.gate_pk) {
    sessionStorage.removeItem(STORE);
    loginError("The server's key changed since you logged in. Log in again only if you trust this change.");
  } else if (saved?.token) {
    client.restorePending(saved.pending.map((p) => ({ to: p.to, cmid: fromHex(p.cmid), kind: p.kind, body: fromHex(p.body) })));
    for (const p of saved.pending) {
      thread(p.to).pending.set(p.cmid, { sender: saved.user, to: p.to, kind: p.kind, body: fromHex(p.body), cmid: p.cmid, ts_ms: 0 });
    }
    try {
      await logIn(saved.user, { token: fromHex(saved.token) });
      return;
    } catch (e) {
      if (!(e instanceof RequestError) || !SESSION_OVER_CODES.has(e.code)) {
        // Unreachable or busy: the session is still good; keep trying it.
        enterChat();
        client.reconnect(e.message);
        return;
      }
      sessionStorage.removeItem(STORE);
      client = newClient();
      $("user").value = saved.user;
      loginError("Your session has ended; log in again.");
    }
  }
  $("login-view").hidden = false;
  $("user").focus();
}

$("login-view").hidden = true;
main().catch((e) => {
  $("login-view").hidden = false;
  loginError(`This page could not start: ${e.message}`);
});
