"""The asyncio client library for shared/protocol.md.

Two layers:

* ``Connection`` — one TCP connection to a gate: handshake, encryption,
  request/reply matching by ref, pushes. It never reconnects. Its lower-level
  ``send_*`` helpers let tests speak deliberately bad protocol.
* ``Client`` — a user's view on top: login with password, then resume token;
  reconnect with backoff; Sends that survive reconnects (same cmid); the inbox
  kept gap-free by ``InboxTracker`` and Sync.

The pure pieces (``InboxTracker``, ``backoff_delays``) have no I/O and no clock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from simzmq.keys import load_gate_public
from simzmq.seqset import SeqSet
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN, CODECS, Codec
from simzmq.wire.errors import HandshakeError, ProtocolError
from simzmq.wire.frames import FrameDecoder, encode_frame
from simzmq.wire.handshake import MAX_HANDSHAKE_FRAME, ClientHandshake
from simzmq.wire.messages import GROUP_EVENT_KIND, ErrorCode, KickCode, PresenceState
from simzmq.wire.rules import is_group as is_group_id  # the client library's name for it

log = logging.getLogger("simzmq.client")

READ_CHUNK = 65536
MAX_REF = 2**32 - 1
# The protocol asks clients to ping at least every 30 s; the margin covers a
# busy event loop.
PING_INTERVAL_S = 25.0
HANDSHAKE_TIMEOUT_S = 10.0
# Sync's own upper bound; 0 would mean the same.
SYNC_LIMIT = 500
# A SendOk whose seq jumps past the inbox usually means a NewMsg push is
# already on its way (replies and pushes take different paths through the
# region); give it this long before asking for a Sync.
SENDOK_GAP_GRACE_S = 0.3
# Kicks after which reconnecting would be wrong: another device took over, or
# the gate considers this client abusive.
# Section 7: clients send Typing{true} at most every TYPING_EVERY_S while
# typing, and take a `true` as ended after TYPING_SHOWN_S without another.
TYPING_EVERY_S = 3.0
WATCH_PER_REQUEST = 256  # ids in one Watch (section 7)
TYPING_SHOWN_S = 6.0
NO_RECONNECT_KICKS = frozenset({KickCode.REPLACED, KickCode.ABUSE})
# Errors after which a Send is worth repeating with the same cmid.
RETRY_SEND_CODES = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED})


class RequestError(Exception):
    """The gate answered a request with ``Error{code, reason}``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        try:
            name = ErrorCode(self.code).name.lower()
        except ValueError:
            name = str(self.code)
        return f"{name}: {self.reason}"


def load_gate_key(data_dir) -> bytes:
    """The gate's public key from ``DATA/keys/gate.pub`` (64 hex characters)."""
    return load_gate_public(Path(data_dir))


def new_group_id() -> str:
    """An unguessable group id, as protocol.md section 7 asks: # and 22
    random characters of [A-Za-z0-9]."""
    alphabet = string.ascii_letters + string.digits
    return "#" + "".join(secrets.choice(alphabet) for _ in range(22))


def group_event(msg: m.Msg) -> m.GroupEvent | None:
    """The GroupEvent a group event entry carries (bin, whatever the
    connection's codec), or None for anything else."""
    if not is_group_id(msg.to) or msg.kind != GROUP_EVENT_KIND:
        return None
    try:
        return BIN.decode_struct(m.GroupEvent, msg.body)
    except ProtocolError:
        return None


def now_ms() -> int:
    return int(time.time() * 1000)


# --- one connection ----------------------------------------------------------


class Connection:
    """One handshaken, encrypted connection to a gate.

    Open with ``await Connection.open(...)``. Replies are matched to requests by
    ref; pushes (ref 0: NewMsg, ReadNotice, Kick) go to ``on_push`` if given,
    else to the ``pushes`` queue. A Ping from the gate is answered with a Pong.
    When the connection ends, pending requests fail with ConnectionError and
    ``on_close`` (if given) is called once.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handshake: ClientHandshake,
        decoder: FrameDecoder,
        ready: m.Ready,
        on_push: Callable[[object], None] | None,
        on_close: Callable[["Connection"], None] | None,
        ping_interval: float | None,
    ) -> None:
        self.ready = ready
        self.codec: Codec = CODECS[handshake.codec_id]
        self.pushes: asyncio.Queue = asyncio.Queue()
        self.kick: m.Kick | None = None  # the Kick that ended the connection, if any
        self.clean_close = False  # the gate's last frame carried TAG_FINAL
        self.close_reason: str | None = None
        self._reader = reader
        self._writer = writer
        self._sender = handshake.sender
        self._receiver = handshake.receiver
        self._decoder = decoder
        self._on_push = on_push
        self._on_close = on_close
        self._pending: dict[int, asyncio.Future] = {}
        self._next_ref = 1
        self._closed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._last_send = self._loop.time()
        self._reader_task = asyncio.create_task(self._read_loop())
        self._ping_task = (
            asyncio.create_task(self._ping_loop(ping_interval)) if ping_interval else None
        )

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        gate_pk: bytes,
        codecs=(1, 2),
        max_frame: int = 1 << 20,
        *,
        on_push: Callable[[object], None] | None = None,
        on_close: Callable[["Connection"], None] | None = None,
        ping_interval: float | None = PING_INTERVAL_S,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
        source_address: str | None = None,
    ) -> "Connection":
        """Connect, run the handshake and check the gate's Ready.

        `source_address` binds the local end to that IP address (a host with
        several, or a test standing in for clients from elsewhere).

        Raises OSError if the gate cannot be reached, ProtocolError (a
        HandshakeError or ChannelError) if it does not hold the pinned key or
        breaks the protocol, and asyncio.TimeoutError if it is too slow.
        """
        handshake = ClientHandshake(gate_pk, codecs)
        reader, writer = await asyncio.open_connection(
            host, port, local_addr=(source_address, 0) if source_address else None)
        try:
            ready, decoder = await asyncio.wait_for(
                _client_handshake(reader, writer, handshake, max_frame), handshake_timeout
            )
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, handshake, decoder, ready, on_push, on_close, ping_interval)

    # -- requests -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def request_nowait(self, msg: object) -> asyncio.Future:
        """Send a request now and return the future of its reply.

        Requests sent this way go out in call order. The future raises
        RequestError for an Error reply, ConnectionError if the connection ends
        first.
        """
        future = self._loop.create_future()
        if self._closed.is_set():
            future.set_exception(ConnectionError(self.close_reason or "connection closed"))
            return future
        ref = self._take_ref()
        self._pending[ref] = future
        try:
            self._write_message(msg, ref)
        except BaseException:
            self._pending.pop(ref, None)
            raise
        return future

    async def request(self, msg: object, timeout: float | None = None) -> object:
        """Send a request and wait for its reply (raises RequestError for Error)."""
        future = self.request_nowait(msg)
        await self._drain()
        if timeout is None:
            return await future
        return await asyncio.wait_for(future, timeout)

    async def ping(self) -> int:
        """Round trip a Ping; returns the ts_ms echoed by the gate."""
        pong = await self.request(m.Ping(ts_ms=now_ms()))
        return pong.ts_ms

    async def logout(self) -> None:
        """Revoke this session's token; the gate answers Ok and closes."""
        try:
            await self.request(m.Logout())
        finally:
            self.close()

    def close(self) -> None:
        """Drop the connection (sends nothing: the gate sees an unclean close)."""
        self._shutdown("closed by the client")

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- lower level, for tests that misbehave on purpose ----------------------

    async def send_raw_bytes(self, data: bytes) -> None:
        """Bytes straight onto the socket, no framing."""
        self._writer.write(data)
        await self._drain()

    async def send_raw_frame(self, payload: bytes) -> None:
        """A length-prefixed frame whose payload is not encrypted."""
        await self.send_raw_bytes(encode_frame(payload))

    async def send_payload(self, plaintext: bytes, final: bool = False) -> None:
        """An encrypted frame carrying an arbitrary plaintext payload."""
        self._writer.write(encode_frame(self._sender.seal(plaintext, final)))
        await self._drain()

    async def send_message(self, msg: object, ref: int = 0, final: bool = False) -> None:
        """Encode and send a message without waiting for (or matching) a reply."""
        await self.send_payload(self.codec.encode(msg, ref), final)

    # -- internals ------------------------------------------------------------

    def _take_ref(self) -> int:
        ref = self._next_ref
        while ref in self._pending:  # only after 2**32 requests with some still open
            ref = ref % MAX_REF + 1
        self._next_ref = ref % MAX_REF + 1
        return ref

    def _write_message(self, msg: object, ref: int, final: bool = False) -> None:
        frame = self._sender.seal(self.codec.encode(msg, ref), final)
        self._writer.write(len(frame).to_bytes(4, "big") + frame)
        self._last_send = self._loop.time()

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._shutdown(f"write failed: {exc}")

    async def _read_loop(self) -> None:
        reason = "connection closed by the gate"
        try:
            # Frames that arrived together with Ready.
            self._handle_payloads(self._decoder.feed(b""))
            while not self._closed.is_set():
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    if not self.clean_close:
                        reason = "connection closed by the gate without a final frame"
                    break
                self._handle_payloads(self._decoder.feed(data))
        except ProtocolError as exc:
            reason = f"protocol error from the gate: {exc}"
            log.warning("%s", reason)
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc}"
        except asyncio.CancelledError:
            reason = "closed by the client"
        finally:
            self._shutdown(reason)

    def _handle_payloads(self, payloads: list[bytes]) -> None:
        for payload in payloads:
            if self._closed.is_set():
                return
            plaintext, final = self._receiver.open(payload)
            if final:
                self.clean_close = True
            try:
                ref, msg = self.codec.decode(plaintext)
            except ProtocolError as exc:
                # A message this client cannot read (say, from a newer gate):
                # fail the request it answers, if any, and carry on.
                log.warning("undecodable message from the gate: %s", exc)
                future = self._pending.pop(exc.ref, None) if exc.ref else None
                if future is not None and not future.done():
                    future.set_exception(exc)
                if final:
                    self._shutdown("closed by the gate")
                    return
                continue
            if type(msg) is m.Ping:
                if not final:
                    self._write_message(m.Pong(ts_ms=msg.ts_ms), ref)
            elif ref == 0:
                if type(msg) is m.Kick:
                    self.kick = msg
                if self._on_push is not None:
                    self._on_push(msg)
                else:
                    self.pushes.put_nowait(msg)
            else:
                future = self._pending.pop(ref, None)
                if future is None or future.done():
                    log.debug("reply with unknown ref %d dropped", ref)
                elif type(msg) is m.Error:
                    future.set_exception(RequestError(msg.code, msg.reason))
                else:
                    future.set_result(msg)
            if final:
                why = f"kicked: {self.kick.reason}" if self.kick else "closed by the gate"
                self._shutdown(why)
                return

    async def _ping_loop(self, interval: float) -> None:
        while not self._closed.is_set():
            idle = self._loop.time() - self._last_send
            if idle < interval:
                await asyncio.sleep(interval - idle)
                continue
            try:
                self.request_nowait(m.Ping(ts_ms=now_ms())).add_done_callback(_ignore_result)
            except (ConnectionError, OSError, ProtocolError):
                return

    def _shutdown(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self.close_reason = reason
        self._closed.set()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionError(reason))
        self._writer.close()
        current = asyncio.current_task()
        for task in (self._reader_task, self._ping_task):
            if task is not None and task is not current:
                task.cancel()
        if self._on_close is not None:
            try:
                self._on_close(self)
            except Exception:
                log.exception("on_close callback failed")


def _ignore_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def _read_handshake_frame(reader: asyncio.StreamReader, decoder: FrameDecoder) -> bytes:
    while True:
        payload = decoder.next_payload()
        if payload is not None:
            return payload
        data = await reader.read(READ_CHUNK)
        if not data:
            raise ConnectionError("the gate closed the connection during the handshake")
        decoder.append(data)


async def _client_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handshake: ClientHandshake,
    max_frame: int,
) -> tuple[m.Ready, FrameDecoder]:
    """HELLO out, WELCOME in, Ready decrypted, then c2s_header out."""
    writer.write(encode_frame(handshake.hello()))
    decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
    handshake.receive_welcome(await _read_handshake_frame(reader, decoder))
    decoder.max_frame = max_frame
    # Nothing leaves the client before the gate has proven it holds the key.
    plaintext, final = handshake.receiver.open(await _read_handshake_frame(reader, decoder))
    ref, ready = CODECS[handshake.codec_id].decode(plaintext)
    if type(ready) is not m.Ready or ref != 0 or final:
        raise HandshakeError(f"the gate's first frame is {type(ready).__name__}, not Ready")
    writer.write(encode_frame(handshake.sender.header))
    await writer.drain()
    return ready, decoder


# --- inbox tracking (pure) -----------------------------------------------------


class InboxTracker(SeqSet):
    """The set of inbox seqs a client holds, as protocol.md section 5 describes.

    Seqs come from pushes, Batches and the client's own SendOks.
    """

    APPLY = "apply"  # seq is the next one: take it
    IGNORE = "ignore"  # already held
    GAP = "gap"  # something is missing before it: Sync

    __slots__ = ()

    def classify(self, seq: int) -> str:
        """What to do with a pushed NewMsg of this seq."""
        if self.holds(seq):
            return self.IGNORE
        if seq == self.max_contiguous + 1:
            return self.APPLY
        return self.GAP

    def behind(self, server_max_seq: int) -> bool:
        """True if the server's inbox has seqs this client does not hold."""
        return self.has_gap or server_max_seq > self.max_contiguous


def backoff_delays(
    first: float = 0.05, cap: float = 5.0, factor: float = 2.0, jitter: Callable[[], float] = random.random
) -> Iterator[float]:
    """Reconnect delays: exponential up to ``cap``, each scaled by 0.5-1.0 jitter
    so that many clients dropped together do not return together."""
    delay = first
    while True:
        yield delay * (0.5 + 0.5 * jitter())
        delay = min(cap, delay * factor)


# --- the user's client -----------------------------------------------------------


@dataclass(eq=False)
class _PendingSend:
    msg: m.Send
    future: asyncio.Future
    conn: Connection | None = None  # where it was last sent
    retry: asyncio.TimerHandle | None = field(default=None)


class Client:
    """A user's connection to the region that survives gate restarts.

    ``messages`` maps seq to Msg for every inbox entry this client holds;
    ``events`` receives each newly applied NewMsg (pushed or synced), every
    ReadNotice, PresenceNotice and TypingNotice, and any Kick.

    Presence and typing (section 7): ``presence`` holds the latest state of
    each watched user (watch()); ``typing_in(peer)`` who is typing in a
    conversation now. The client watches again and sets its presence again
    after every reconnect.
    """

    def __init__(
        self,
        host: str,
        port: int,
        gate_pk: bytes,
        user: str,
        password: str | None = None,
        device: str = "",
        codecs=(1, 2),
        *,
        reconnect: bool = True,
        ping_interval: float | None = PING_INTERVAL_S,
        max_frame: int = 1 << 20,
    ) -> None:
        self.host = host
        self.port = port
        self.gate_pk = gate_pk
        self.user = user
        self.password = password
        self.device = device
        self.codecs = tuple(codecs)
        self.reconnect = reconnect
        self.ping_interval = ping_interval
        self.max_frame = max_frame
        self.token = b""
        self.session = b""
        self.server_max_seq = 0
        self.messages: dict[int, m.Msg] = {}
        self.inbox = InboxTracker()
        self.events: asyncio.Queue = asyncio.Queue()
        self.conn: Connection | None = None
        self.reconnects = 0
        self._logged_in = asyncio.Event()
        self._unacked: dict[bytes, _PendingSend] = {}
        self._closing = False
        self._stopped = asyncio.Event()  # set when the client stops for good
        self._fatal: Exception | None = None
        self._supervisor: asyncio.Task | None = None
        self._sync_task: asyncio.Task | None = None
        self._sync_again = False
        self._gap_check: asyncio.TimerHandle | None = None
        self.presence: dict[str, m.Presence] = {}
        self.watched: list[str] = []
        self.my_presence = PresenceState.ONLINE
        self._typing_seen: dict[tuple[str, str], float] = {}  # (user, peer) -> when a `true` came
        self._restore_task: asyncio.Task | None = None

    @property
    def max_contiguous_seq(self) -> int:
        return self.inbox.max_contiguous

    @property
    def logged_in(self) -> bool:
        return self._logged_in.is_set()

    # -- account ------------------------------------------------------------

    async def register(self) -> None:
        """Create the user (needs a password); does not log in."""
        if not self.password:
            raise ValueError("register needs a password")
        conn = await self._open()
        try:
            await conn.request(m.Register(user=self.user, password=self.password))
        finally:
            if self.conn is not conn:
                conn.close()

    async def login(self) -> m.LoginOk:
        """Log in (password, or the resume token once there is one) and keep the
        session alive from then on, reconnecting when the connection drops."""
        if self._closing:
            raise ConnectionError("client is closed")
        if self.logged_in:
            raise RuntimeError(f"{self.user} is already logged in")
        ok = await self._connect_and_login()
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise())
        return ok

    async def logout(self) -> None:
        """Revoke the resume token and close."""
        self._closing = True
        conn = self.conn
        try:
            if conn is not None and not conn.closed:
                await conn.request(m.Logout())
        finally:
            self.token = b""
            await self.close()

    async def close(self) -> None:
        """Stop reconnecting, drop the connection and fail unacknowledged Sends."""
        self._closing = True
        self._stopped.set()
        self._logged_in.clear()
        for task in (self._supervisor, self._sync_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if self._gap_check is not None:
            self._gap_check.cancel()
        if self.conn is not None:
            self.conn.close()
        for pending in list(self._unacked.values()):
            self._finish_send(pending, error=ConnectionError("client closed"))
        for task in (self._supervisor, self._sync_task):
            if task is not None and task is not asyncio.current_task():
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass

    # -- requests -------------------------------------------------------------

    async def send(self, to: str, body: bytes, kind: int = 0) -> m.SendOk:
        """Send a message; returns its SendOk once it is durable.

        Survives reconnects: the Send is repeated with the same cmid until a
        SendOk or a final Error arrives (unavailable and rate_limited are not
        final).
        """
        if self._closing:
            raise ConnectionError("client is closed")
        if self._supervisor is None:
            raise ConnectionError("log in before sending")
        msg = m.Send(to=to, cmid=os.urandom(16), kind=kind, body=body)
        pending = _PendingSend(msg, asyncio.get_running_loop().create_future())
        self._unacked[msg.cmid] = pending
        if self.logged_in:
            self._transmit(pending)
        return await asyncio.shield(pending.future)

    @property
    def unacked(self) -> int:
        """Sends still waiting for their SendOk."""
        return len(self._unacked)

    async def sync(self) -> None:
        """Fetch every inbox entry this client does not hold yet."""
        while True:
            since = self.inbox.max_contiguous
            batch = await self._call(m.Sync(since=since, limit=SYNC_LIMIT))
            for msg in batch.msgs:
                self._receive(msg)
            if not batch.more or self.inbox.max_contiguous == since:
                # Done, or a Batch that does not advance the inbox: stop rather
                # than ask the same question forever.
                return

    async def read(self, peer: str, msg_id: int) -> None:
        """Raise the read mark in the conversation with ``peer`` to ``msg_id``."""
        await self._call(m.Read(peer=peer, msg_id=msg_id))

    async def convs(self) -> list[m.Conv]:
        reply = await self._call(m.Convs())
        return reply.convs

    async def ping(self) -> int:
        reply = await self._call(m.Ping(ts_ms=now_ms()))
        return reply.ts_ms

    # -- groups (protocol 1.1, section 7) ----------------------------------------
    # Each change carries a cmid chosen once, so a retry on a new connection
    # is the same request (answered Ok without a second change).

    async def group_create(self, group: str, title: str, members: list[str]) -> m.GroupInfo:
        """Create ``group`` (see new_group_id) with this user as owner."""
        return await self._call(m.GroupCreate(group=group, title=title, members=list(members)))

    async def group_get(self, group: str) -> m.GroupInfo:
        return await self._call(m.GroupGet(group=group))

    async def group_add(self, group: str, users: list[str]) -> None:
        await self._call(m.GroupAdd(group=group, users=list(users), cmid=os.urandom(16)))

    async def group_remove(self, group: str, users: list[str]) -> None:
        await self._call(m.GroupRemove(group=group, users=list(users), cmid=os.urandom(16)))

    async def group_leave(self, group: str) -> None:
        await self.group_remove(group, [self.user])

    async def group_title(self, group: str, title: str) -> None:
        await self._call(m.GroupTitle(group=group, title=title, cmid=os.urandom(16)))

    # -- presence and typing (section 7) ----------------------------------------

    async def set_presence(self, state: int) -> None:
        """2 online, 3 away, 1 appear offline; kept across reconnects."""
        await self._call(m.SetPresence(state=int(state)))
        self.my_presence = PresenceState(state)

    async def watch(self, users: list[str]) -> list[m.Presence]:
        """Watch `users` too (their states: in ``presence`` and as
        PresenceNotice events), WATCH_PER_REQUEST ids a request; [] stops
        watching anyone."""
        if not users:
            await self._call(m.Watch(users=[]))
            self.watched = []
            self.presence.clear()
            return []
        users = list(users)
        states = []
        for start in range(0, len(users), WATCH_PER_REQUEST):
            reply = await self._call(m.Watch(users=users[start:start + WATCH_PER_REQUEST]))
            states.extend(reply.states)
        self.watched = list(dict.fromkeys([*self.watched, *users]))
        for state in states:
            self.presence[state.user] = state
        return states

    async def typing(self, peer: str, typing: bool = True) -> None:
        await self._call(m.Typing(peer=peer, typing=typing))

    def typing_in(self, peer: str, now: float | None = None) -> list[str]:
        """Who is typing in the conversation with `peer` (a user or a group):
        a `true` seen less than TYPING_SHOWN_S ago and no `false` since."""
        now = time.monotonic() if now is None else now
        return sorted(user for (user, p), when in self._typing_seen.items()
                      if p == peer and now - when < TYPING_SHOWN_S)

    def _typing_notice(self, notice: m.TypingNotice) -> None:
        # A notice to us names us as `peer` for one-to-one typing: the
        # conversation is then the one with its sender.
        peer = notice.peer if is_group_id(notice.peer) else notice.user
        if notice.typing:
            self._typing_seen[(notice.user, peer)] = time.monotonic()
        else:
            self._typing_seen.pop((notice.user, peer), None)

    def conversation(self, peer: str) -> list[m.Msg]:
        """The held messages exchanged with ``peer`` (a user or a group, its
        events included), in seq order."""
        if is_group_id(peer):
            return [msg for seq, msg in sorted(self.messages.items()) if msg.to == peer]
        return [
            msg
            for seq, msg in sorted(self.messages.items())
            if (msg.sender == peer and msg.to == self.user) or (msg.sender == self.user and msg.to == peer)
        ]

    async def wait_logged_in(self) -> None:
        """Wait for a logged-in connection; raises once the client has stopped."""
        while not self._logged_in.is_set():
            if self._fatal is not None:
                raise self._fatal
            if self._closing:
                raise ConnectionError("client is closed")
            waiters = [
                asyncio.ensure_future(self._logged_in.wait()),
                asyncio.ensure_future(self._stopped.wait()),
            ]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    # -- internals ------------------------------------------------------------

    async def _open(self) -> Connection:
        return await Connection.open(
            self.host,
            self.port,
            self.gate_pk,
            self.codecs,
            self.max_frame,
            on_push=self._on_push,
            on_close=self._on_close,
            ping_interval=self.ping_interval,
        )

    async def _connect_and_login(self) -> m.LoginOk:
        conn = await self._open()
        try:
            ok = await self._login_on(conn)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self.session = ok.session
        self.server_max_seq = ok.max_seq
        self._logged_in.set()
        # Unacknowledged Sends go again, in their original order, same cmids.
        for pending in list(self._unacked.values()):
            if pending.conn is not conn:
                self._transmit(pending)
        if self.inbox.behind(ok.max_seq):
            self._request_sync()
        if self.watched or self.my_presence != PresenceState.ONLINE:
            self._restore_task = asyncio.create_task(self._restore_presence())
        return ok

    async def _restore_presence(self) -> None:
        """After a (re)connect: the presence this client had set, and its watches."""
        try:
            if self.my_presence != PresenceState.ONLINE:
                await self.set_presence(self.my_presence)
            if self.watched:
                await self.watch(self.watched)
        except (RequestError, ConnectionError) as exc:
            log.info("restoring presence for %s failed: %s", self.user, exc)

    async def _login_on(self, conn: Connection) -> m.LoginOk:
        if self.token:
            try:
                ok = await conn.request(m.Login(user=self.user, token=self.token, device=self.device))
                self.token = ok.token
                return ok
            except RequestError as exc:
                if exc.code != ErrorCode.AUTH_FAILED or not self.password:
                    raise
                self.token = b""  # expired or revoked: fall back to the password
        if not self.password:
            raise RequestError(ErrorCode.AUTH_FAILED, "no password and no valid resume token")
        ok = await conn.request(m.Login(user=self.user, password=self.password, device=self.device))
        self.token = ok.token
        return ok

    def _on_close(self, conn: Connection) -> None:
        if conn is self.conn:
            self._logged_in.clear()

    async def _supervise(self) -> None:
        """Reconnect whenever the logged-in connection ends, until closed."""
        while not self._closing:
            conn = self.conn
            if conn is not None and not conn.closed:
                await conn.wait_closed()
            if self._closing or not self.reconnect:
                return
            if conn is not None and conn.kick is not None and conn.kick.code in NO_RECONNECT_KICKS:
                self._give_up(ConnectionError(f"kicked: {conn.kick.reason}"))
                return
            for delay in backoff_delays():
                if self._closing:
                    return
                await asyncio.sleep(delay)
                try:
                    await self._connect_and_login()
                    self.reconnects += 1
                    break
                except RequestError as exc:
                    if exc.code in (ErrorCode.AUTH_FAILED, ErrorCode.NO_SUCH_USER, ErrorCode.FORBIDDEN):
                        self._give_up(exc)
                        return
                    log.info("login after reconnect failed: %s", exc)
                except (OSError, ConnectionError, ProtocolError, asyncio.TimeoutError) as exc:
                    log.info("reconnect to %s:%d failed: %s", self.host, self.port, exc)

    def _give_up(self, error: Exception) -> None:
        self._fatal = error
        self._closing = True
        self._stopped.set()
        for pending in list(self._unacked.values()):
            self._finish_send(pending, error=error)

    async def _call(self, msg: object) -> object:
        """A request that is safe to repeat: retried on a new connection if the
        current one drops before the reply."""
        while True:
            await self.wait_logged_in()
            try:
                return await self.conn.request(msg)
            except ConnectionError:
                if self._closing or not self.reconnect:
                    raise

    def _transmit(self, pending: _PendingSend) -> None:
        conn = self.conn
        if conn is None or conn.closed or not self.logged_in:
            return  # the next login sends it
        pending.conn = conn
        future = conn.request_nowait(pending.msg)
        future.add_done_callback(lambda f: self._send_replied(pending, conn, f))

    def _send_replied(self, pending: _PendingSend, conn: Connection, future: asyncio.Future) -> None:
        if pending.future.done():
            return
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            self._send_ok(pending, future.result())
        elif isinstance(error, ConnectionError):
            pass  # resent after the reconnect
        elif isinstance(error, RequestError) and error.code in RETRY_SEND_CODES:
            pending.retry = asyncio.get_running_loop().call_later(
                1.0 + random.random(), self._retransmit, pending, conn
            )
        else:
            self._finish_send(pending, error=error)

    def _retransmit(self, pending: _PendingSend, conn: Connection) -> None:
        pending.retry = None
        if not pending.future.done() and conn is self.conn:
            self._transmit(pending)

    def _send_ok(self, pending: _PendingSend, ok: m.SendOk) -> None:
        msg = pending.msg
        self._apply(
            m.Msg(
                msg_id=ok.msg_id,
                seq=ok.seq,
                sender=self.user,
                to=msg.to,
                kind=msg.kind,
                ts_ms=ok.ts_ms,
                cmid=msg.cmid,
                body=msg.body,
            ),
            notify=False,
        )
        if self.inbox.has_gap and self._gap_check is None:
            self._gap_check = asyncio.get_running_loop().call_later(
                SENDOK_GAP_GRACE_S, self._check_gap
            )
        self._finish_send(pending, result=ok)

    def _finish_send(self, pending: _PendingSend, result=None, error: Exception | None = None) -> None:
        self._unacked.pop(pending.msg.cmid, None)
        if pending.retry is not None:
            pending.retry.cancel()
        if not pending.future.done():
            if error is not None:
                pending.future.set_exception(error)
            else:
                pending.future.set_result(result)

    def _check_gap(self) -> None:
        self._gap_check = None
        if self.inbox.has_gap:
            self._request_sync()

    def _apply(self, msg: m.Msg, notify: bool) -> bool:
        if not self.inbox.add(msg.seq):
            return False
        self.messages[msg.seq] = msg
        if notify:
            self.events.put_nowait(m.NewMsg(msg=msg))
        return True

    def _receive(self, msg: m.Msg) -> None:
        """A Msg from a push or a Batch. One that is this client's own Send still
        waiting for its SendOk (its copy came another way first: a Sync after a
        reconnect or a failover, a push to a new connection) completes that
        Send, which `send()` reports; it is not also an event, or a chat would
        show it twice."""
        pending = self._unacked.get(msg.cmid) if msg.sender == self.user else None
        if pending is None:
            self._apply(msg, notify=True)
        else:
            self._send_ok(pending, m.SendOk(msg_id=msg.msg_id, seq=msg.seq, ts_ms=msg.ts_ms))

    def _on_push(self, push: object) -> None:
        kind = type(push)
        if kind is m.NewMsg:
            action = self.inbox.classify(push.msg.seq)
            if action == InboxTracker.APPLY:
                self._receive(push.msg)
            elif action == InboxTracker.GAP:
                self._request_sync()
        elif kind is m.ReadNotice or kind is m.Kick:
            self.events.put_nowait(push)
        elif kind is m.PresenceNotice:
            self.presence[push.state.user] = push.state
            self.events.put_nowait(push)
        elif kind is m.TypingNotice:
            self._typing_notice(push)
            self.events.put_nowait(push)
        else:
            log.debug("ignoring push %s", kind.__name__)

    def _request_sync(self) -> None:
        if self._closing:
            return
        if self._sync_task is not None and not self._sync_task.done():
            self._sync_again = True
            return
        self._sync_task = asyncio.create_task(self._background_sync())

    async def _background_sync(self) -> None:
        try:
            while True:
                self._sync_again = False
                await self.sync()
                if not self._sync_again:
                    return
        except (RequestError, ConnectionError) as exc:
            log.info("background sync for %s failed: %s", self.user, exc)
