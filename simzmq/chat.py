"""A terminal chat for a person, on top of ``simzmq.client.Client``.

Commands: ``/to PEER`` opens the conversation with a user or a group
(``/to #group``; and marks it read, as any chat app does), a plain line sends
to it, ``/group create TITLE USER...`` makes a group and opens it, ``/group
add USER...`` and ``/group leave`` change the open one, ``/convs`` lists conversations with
unread counts and the peers' presence (and watches it from then on),
``/presence online|away|offline`` sets this session's, ``/read`` marks the open conversation read, ``/history`` shows
what this session holds of it, ``/quit`` leaves. Incoming messages and read
receipts print as they arrive, and so do watched peers' presence changes and
"typing" notices; messages arriving in the open conversation are marked
read as they are shown.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from simzmq.client import Client, RequestError, group_event, is_group_id, new_group_id
from simzmq.keys import KeyFileError, load_gate_public
from simzmq.wire import messages as m
from simzmq.wire.errors import ProtocolError
from simzmq.wire.messages import ErrorCode, GroupOp
from simzmq.wire.rules import MAX_PASSWORD, MAX_WATCH_REQUEST, is_valid_group_id, is_valid_user_id

HELP = ("commands: /to PEER or /to #GROUP, then type to send; /group create TITLE USER...; /group add USER...;"
        " /group leave; /convs; /presence online|away|offline; /read; /history; /quit")
PRESENCE_WORDS = {m.PresenceState.OFFLINE: "offline", m.PresenceState.ONLINE: "online", m.PresenceState.AWAY: "away"}
PRESENCE_STATES = {word: state for state, word in PRESENCE_WORDS.items()}
EVENT_WORDS = {
    GroupOp.CREATED: "created the group with", GroupOp.ADDED: "added", GroupOp.REMOVED: "removed",
    GroupOp.LEFT: "left", GroupOp.TITLE_CHANGED: "renamed the group to", GroupOp.OWNER_CHANGED: "handed the group to",
}
TEXT_KIND = 0


def format_time(ts_ms: int) -> str:
    return time.strftime("%H:%M", time.localtime(ts_ms / 1000))


def format_body(kind: int, body: bytes) -> str:
    if kind == TEXT_KIND:
        return body.decode("utf-8", errors="replace")
    return f"<kind {kind}, {len(body)} bytes>"


def format_msg(msg: m.Msg, me: str) -> str:
    event = group_event(msg)
    if event is not None:
        what = event.title if event.op == GroupOp.TITLE_CHANGED else ", ".join(event.users)
        if event.op == GroupOp.LEFT:
            what = ""
        words = EVENT_WORDS.get(event.op, f"changed the group (op {event.op})")
        return f"[{format_time(msg.ts_ms)}] {msg.to}: {event.actor} {words} {what}".rstrip()
    if is_group_id(msg.to):
        arrow = f"-> {msg.to}" if msg.sender == me else f"<- {msg.sender} in {msg.to}"
    else:
        arrow = f"-> {msg.to}" if msg.sender == me else f"<- {msg.sender}"
    return f"[{format_time(msg.ts_ms)}] {arrow}: {format_body(msg.kind, msg.body)}"


def conversation_peer(msg: m.Msg, me: str) -> str:
    """Whom a message belongs to in the chat: the group, or the other user."""
    if is_group_id(msg.to):
        return msg.to
    return msg.to if msg.sender == me else msg.sender


def format_presence(p: m.Presence | None) -> str:
    """"online", "away", "offline, seen 14:02"; "" when unknown (not a
    contact, a group)."""
    if p is None or p.state not in PRESENCE_WORDS:
        return ""
    if p.state == m.PresenceState.OFFLINE and p.last_seen_ms:
        return f"offline, seen {format_time(p.last_seen_ms)}"
    return PRESENCE_WORDS[p.state]


def format_conv(conv: m.Conv, presence: m.Presence | None = None) -> str:
    unread = f"{conv.unread} unread" if conv.unread else "all read"
    shown = format_presence(presence)
    return f"  {conv.peer:<20} {unread}" + (f"  ({shown})" if shown else "")


class ChatSession:
    """The chat's behaviour, apart from where lines come from and go to."""

    def __init__(self, client: Client, out: Callable[[str], None]) -> None:
        self.client = client
        self.out = out
        self.peer: str | None = None
        self.done = asyncio.Event()

    async def handle_line(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if not line.strip():
            return
        if not line.startswith("/"):
            await self._send(line)
            return
        command, _, arg = line.partition(" ")
        arg = arg.strip()
        if command == "/to":
            if not (is_valid_user_id(arg) or is_valid_group_id(arg)):
                self.out("usage: /to PEER (a user id) or /to #GROUP")
                return
            await self._open(arg)
        elif command == "/group":
            await self._group(arg.split())
        elif command == "/convs":
            convs = await self.client.convs()
            if not convs:
                self.out("no conversations yet")
            users = [c.peer for c in convs if not is_group_id(c.peer)][:MAX_WATCH_REQUEST]
            if users:
                try:
                    await self.client.watch(users)
                except RequestError:
                    pass  # a gate without section 7: no presence shown
            for conv in convs:
                self.out(format_conv(conv, self.client.presence.get(conv.peer)))
        elif command == "/presence":
            if arg not in PRESENCE_STATES:
                self.out("usage: /presence online|away|offline")
                return
            await self.client.set_presence(PRESENCE_STATES[arg])
            self.out(f"you appear {arg}")
        elif command == "/read":
            await self._mark_read()
        elif command == "/history":
            if self._need_peer():
                for msg in self.client.conversation(self.peer):
                    self.out(format_msg(msg, self.client.user))
        elif command == "/quit":
            self.done.set()
        elif command == "/help":
            self.out(HELP)
        else:
            self.out(f"unknown command {command}; {HELP}")

    async def _open(self, peer: str) -> None:
        self.peer = peer
        self.out(f"talking to {peer}")
        for msg in self.client.conversation(peer)[-10:]:
            self.out(format_msg(msg, self.client.user))
        await self._mark_read(quiet=True)

    async def _group(self, words: list[str]) -> None:
        action, args = (words[0], words[1:]) if words else ("", [])
        try:
            if action == "create" and args:
                group = new_group_id()
                info = await self.client.group_create(group, args[0], args[1:])
                self.out(f"created {group} ({info.title}) with {', '.join(info.members)}")
                # Opened without replaying it: its one message, the creation,
                # prints as it arrives.
                self.peer = group
                self.out(f"talking to {group}")
            elif action in ("add", "leave") and (args or action == "leave"):
                if self.peer is None or not is_group_id(self.peer):
                    self.out("open a group first: /to #GROUP")
                elif action == "add":
                    await self.client.group_add(self.peer, args)
                else:
                    await self.client.group_leave(self.peer)
            else:
                self.out("usage: /group create TITLE USER...; /group add USER...; /group leave")
        except RequestError as exc:
            self.out(f"refused: {exc}")

    def _need_peer(self) -> bool:
        if self.peer is None:
            self.out("pick a conversation first: /to PEER")
            return False
        return True

    async def _send(self, text: str) -> None:
        if not self._need_peer():
            return
        peer = self.peer
        ok = await self.client.send(peer, text.encode("utf-8"))
        self.out(format_msg(self.client.messages.get(ok.seq) or m.Msg(
            msg_id=ok.msg_id, seq=ok.seq, sender=self.client.user, to=peer, ts_ms=ok.ts_ms,
            body=text.encode("utf-8")), self.client.user))

    async def _mark_read(self, quiet: bool = False) -> None:
        """Raise the read mark to the peer's newest held message (a Read that
        does not raise it changes nothing and notifies no one)."""
        if not self._need_peer():
            return
        me = self.client.user
        theirs = [msg for msg in self.client.conversation(self.peer)
                  if msg.sender != me and group_event(msg) is None]
        if not theirs:
            if not quiet:
                self.out("nothing to mark read")
            return
        await self.client.read(self.peer, theirs[-1].msg_id)
        if not quiet:
            self.out(f"marked read up to message {theirs[-1].msg_id}")

    async def handle_event(self, event: object) -> None:
        me = self.client.user
        if type(event) is m.NewMsg:
            msg = event.msg
            self.out(format_msg(msg, me))
            if conversation_peer(msg, me) == self.peer and msg.sender != me and group_event(msg) is None:
                await self.client.read(self.peer, msg.msg_id)
        elif type(event) is m.ReadNotice:
            if event.reader != me:
                self.out(f"  {event.reader} read your messages up to {event.msg_id}")
        elif type(event) is m.PresenceNotice:
            shown = format_presence(event.state)
            if event.state.user != me and shown:
                self.out(f"  {event.state.user} is {shown}")
        elif type(event) is m.TypingNotice:
            if event.typing:
                where = f" in {event.peer}" if is_group_id(event.peer) else ""
                self.out(f"  {event.user} is typing{where}...")
        elif type(event) is m.Kick:
            self.out(f"disconnected by the gate: {event.reason}")
            if event.code in (m.KickCode.REPLACED, m.KickCode.ABUSE):
                self.done.set()

    async def run(self, lines: AsyncIterator[str]) -> None:
        events = asyncio.create_task(self._pump_events())
        reading = asyncio.create_task(self._pump_lines(lines))
        try:
            await self.done.wait()
        finally:
            for task in (events, reading):
                task.cancel()
            await asyncio.gather(events, reading, return_exceptions=True)

    async def _pump_events(self) -> None:
        while True:
            event = await self.client.events.get()
            try:
                await self.handle_event(event)
            except (RequestError, ConnectionError) as exc:
                self.out(f"! {exc}")

    async def _pump_lines(self, lines: AsyncIterator[str]) -> None:
        try:
            async for line in lines:
                try:
                    await self.handle_line(line)
                except (RequestError, ConnectionError) as exc:
                    self.out(f"! {exc}")
                if self.done.is_set():
                    return
        finally:
            self.done.set()


async def stdin_lines() -> AsyncIterator[str]:
    """Lines of sys.stdin, read on a daemon thread so that exiting never waits
    for a blocked read (and so that whatever sys.stdin already buffered, such
    as a password line read before, is not skipped)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    while (line := await queue.get()) is not None:
        yield line


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class GateAddress:
    host: str
    port: int
    http_host: str
    http_port: int
    http_scheme: str
    gate_pk: bytes


def find_gate(cfg, host: str | None = None, port: int | None = None, http_port: int | None = None,
              gate_key: str | None = None) -> GateAddress:
    """Where a person's client finds the region's gate: the flags first, then
    gate-1 as `simzmq up` started it from DATA/run (its --port and
    --http-port, as `simzmq bench` finds it), then the configuration. The
    key is --gate-key, else DATA/keys/gate.pub. Raises KeyFileError."""
    from simzmq.bench.procstats import gate_http_ports, gate_port_from_pid
    if gate_key:
        try:
            pk = bytes.fromhex(gate_key)
        except ValueError:
            pk = b""
        if len(pk) != 32:
            raise KeyFileError("--gate-key must be 64 hex characters")
    else:
        pk = load_gate_public(cfg.data_dir)
    g = cfg.gate
    return GateAddress(
        host=host or g.host,
        port=port or gate_port_from_pid(cfg.data_dir) or g.port,
        http_host=host or g.http_host,
        http_port=http_port or gate_http_ports(cfg.data_dir).get("gate-1") or g.http_port,
        http_scheme="https" if g.tls_cert else "http",
        gate_pk=pk)


class PasswordError(Exception):
    """No usable password was given."""


def read_password(user: str, confirm: bool = False) -> str:
    """The password from a prompt that does not echo (typed twice when
    ``confirm``, for a new account), or the first line of stdin when stdin is
    not a terminal. Raises PasswordError for an empty or mistyped one."""
    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {user}: ")
        if confirm and password and getpass.getpass("Again: ") != password:
            raise PasswordError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise PasswordError(f"empty password for {user}: type it at the prompt, or give it as the first "
                            "line of standard input")
    if len(password.encode()) > MAX_PASSWORD:
        raise PasswordError(f"passwords are at most {MAX_PASSWORD} bytes")
    return password


def failure(exc: BaseException, host: str, port: int, suggest_register: bool = False) -> str:
    """The line a person reads when logging in failed with ``exc``;
    `suggest_register`: say that a new user needs --register."""
    if isinstance(exc, RequestError):
        if exc.code == ErrorCode.AUTH_FAILED and suggest_register:
            # The gate does not say which (protocol: no user enumeration).
            return f"login refused: {exc} (a new user needs --register)"
        return f"login refused: {exc}"
    if isinstance(exc, ProtocolError):
        return (f"the gate at {host}:{port} failed the handshake ({exc}); is the gate key "
                "(--gate-key, or DATA/keys/gate.pub) this region's?")
    if isinstance(exc, (OSError, ConnectionError, asyncio.TimeoutError)):
        return f"cannot reach the gate at {host}:{port}: {exc or type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"


async def log_in(client: Client, register: bool, out: Callable[[str], None]) -> m.LoginOk:
    """Log in, registering first if asked (an existing account is fine)."""
    if register:
        try:
            await client.register()
            out(f"registered {client.user}")
        except RequestError as exc:
            if exc.code != ErrorCode.EXISTS:
                raise
            out(f"{client.user} exists already; logging in")
    return await client.login()


async def run_chat(
    host: str,
    port: int,
    gate_pk: bytes,
    user: str,
    password: str,
    device: str,
    register: bool,
    *,
    lines: AsyncIterator[str] | None = None,
    out: Callable[[str], None] = _print,
) -> int:
    """Log in (registering first if asked) and chat until /quit or end of
    input. Returns the exit status: 0, or 1 if logging in failed."""
    client = Client(host, port, gate_pk, user, password, device)
    try:
        try:
            ok = await log_in(client, register, out)
        except (RequestError, ProtocolError, OSError, ConnectionError, asyncio.TimeoutError) as exc:
            out(f"! {failure(exc, host, port, suggest_register=not register)}")
            return 1
        out(f"logged in as {ok.user} ({ok.max_seq} messages in the inbox). {HELP}")
        session = ChatSession(client, out)
        await session.run(lines if lines is not None else stdin_lines())
        return 0
    finally:
        await client.close()
