"""A client for protocol 1.1 conformance tests, written from shared/protocol.md
alone: frame-level requests (tests/rawclient.py), pushes kept in arrival order,
and the bin decoding of a GroupEvent body done here, from section 4's rules,
not by the product's codec."""

from __future__ import annotations

import itertools
import os
import random
import socket
import string
import struct
import time

from simzmq.wire import messages as m
from tests.rawclient import RawClient

ALNUM = string.ascii_letters + string.digits
PASSWORD = "conformance-pw"
_names = itertools.count(1)


def group_id() -> str:
    """What section 7 asks clients to pick: `#` and 22 random characters."""
    return "#" + "".join(random.choice(ALNUM) for _ in range(22))


def cmid() -> bytes:
    return os.urandom(16)


# --- bin decoding of a GroupEvent (section 4), independent of simzmq's codec ---


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise ValueError("short body")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def u(self, fmt: str) -> int:
        return struct.unpack(">" + fmt, self.take(struct.calcsize(fmt)))[0]

    def str(self) -> str:
        return self.take(self.u("I")).decode("utf-8")


def decode_group_event(body: bytes) -> m.GroupEvent:
    """`GroupEvent{op:u8, actor:str, users:list<str>, title:str, version:u64}` in bin."""
    r = _Reader(body)
    op = r.u("B")
    actor = r.str()
    users = [r.str() for _ in range(r.u("I"))]
    title = r.str()
    version = r.u("Q")
    if r.at != len(body):
        raise ValueError("trailing bytes after a GroupEvent")
    return m.GroupEvent(op=op, actor=actor, users=users, title=title, version=version)


def is_event(msg: m.Msg) -> bool:
    return msg.kind == m.GROUP_EVENT_KIND


def events_of(msgs, group: str) -> list[m.GroupEvent]:
    """The decoded group events of `group` among inbox entries, in inbox order."""
    return [decode_group_event(x.body) for x in msgs if x.to == group and is_event(x)]


# --- connections ---------------------------------------------------------------


class Conn(RawClient):
    """One logged-in session. Pushes read past while waiting for a reply are
    kept, in order, in `pushes` until a test takes them with `until`."""

    def __init__(self, port: int, gate_pk: bytes, user: str, codec: int = 1):
        super().__init__(port, gate_pk, codec=codec)
        self.user = user
        self.pushes: list = []
        self.token = b""
        self.login_ms = 0

    def skipped(self, msg) -> None:
        self.pushes.append(msg)

    def ask(self, msg):
        """The reply to `msg`, asked again while the gate answers `unavailable`
        (a loaded machine); every request these tests repeat is idempotent."""
        return self.served(msg)

    def ok(self, msg) -> None:
        reply = self.ask(msg)
        assert type(reply) is m.Ok, f"{msg} answered {reply}"

    def error(self, msg, code: m.ErrorCode) -> m.Error:
        reply = self.ask(msg)
        assert type(reply) is m.Error and reply.code == code, f"{msg} answered {reply}, expected {code.name}"
        return reply

    def info(self, group: str) -> m.GroupInfo:
        reply = self.ask(m.GroupGet(group=group))
        assert type(reply) is m.GroupInfo, f"GroupGet {group} answered {reply}"
        return reply

    def post(self, to: str, body: bytes = b"hi", kind: int = 0, cm: bytes | None = None) -> m.SendOk:
        msg = m.Send(to=to, cmid=cm or cmid(), kind=kind, body=body)
        reply = self.ask(msg)
        assert type(reply) is m.SendOk, f"{msg} answered {reply}"
        return reply

    def inbox(self) -> list[m.Msg]:
        """The whole inbox, by Sync from 0."""
        out: list[m.Msg] = []
        while True:
            batch = self.ask(m.Sync(since=out[-1].seq if out else 0, limit=0))
            assert type(batch) is m.Batch, batch
            out.extend(batch.msgs)
            if not batch.more:
                return out

    def convs(self) -> dict[str, m.Conv]:
        reply = self.ask(m.Convs())
        assert type(reply) is m.ConvList, reply
        return {c.peer: c for c in reply.convs}

    def watch(self, users: list[str]) -> dict[str, m.Presence]:
        reply = self.ask(m.Watch(users=users))
        assert type(reply) is m.PresenceList, f"Watch answered {reply}"
        return {p.user: p for p in reply.states}

    def _next(self, deadline: float):
        while True:
            if time.monotonic() > deadline:
                raise AssertionError("push not received in time")
            try:
                ref, msg, _ = self.recv()
            except (socket.timeout, TimeoutError):
                continue
            if ref == 0:
                return msg
            raise AssertionError(f"unexpected reply {msg} with ref {ref}")

    def until(self, wanted, within: float = 60.0):
        """(the first push for which `wanted(push)` holds, the pushes before it);
        all of them are consumed. Raises if none comes `within` seconds (a
        bound against a hang, not a timing requirement)."""
        deadline = time.monotonic() + within
        before = []
        while True:
            msg = self.pushes.pop(0) if self.pushes else self._next(deadline)
            if wanted(msg):
                return msg, before
            before.append(msg)


class World:
    """Users and sessions of one test, on the gates of a shared region; every
    connection is closed at the end of the test."""

    def __init__(self, region):
        self.region = region
        self.conns: list[Conn] = []
        self.devices = itertools.count(1)

    def port(self, gate: int) -> int:
        return self.region.gate_port + gate - 1

    def http_port(self, gate: int) -> int:
        return self.region.http_port + gate - 1

    def user(self, gate: int = 1, tag: str = "u", codec: int = 1) -> Conn:
        """A new user, registered and logged in on `gate` (codec 1 bin, 2 msgpack)."""
        name = f"{tag}{next(_names)}x{random.randrange(10**6)}"
        c = Conn(self.port(gate), self.region.gate_pk, name, codec)
        self.conns.append(c)
        reply = c.served(m.Register(user=name, password=PASSWORD))
        assert type(reply) is m.Ok, reply
        self._login(c)
        return c

    def session(self, name: str, gate: int = 1) -> Conn:
        """Another session of an existing user."""
        c = Conn(self.port(gate), self.region.gate_pk, name)
        self.conns.append(c)
        self._login(c)
        return c

    def _login(self, c: Conn) -> None:
        ok = c.served(m.Login(user=c.user, password=PASSWORD, token=b"", device=f"dev{next(self.devices)}"))
        assert type(ok) is m.LoginOk, ok
        c.token, c.login_ms = ok.token, ok.server_ms

    def server_ms(self) -> int:
        """The gate's clock now, from a fresh connection's Ready."""
        c = RawClient(self.port(1), self.region.gate_pk)
        c.close()
        return c.ready.server_ms

    def close(self) -> None:
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def writes(sender: Conn, *peers: Conn) -> None:
    """`sender` sends each of `peers` a one-to-one message, which makes each of
    them one of its contacts (sees its presence, may put it in a group, gets
    its typing)."""
    for p in peers:
        sender.post(p.user, b"hello")
