"""The session rules (gate_session.ClientConnection) driven directly: what a
request may do in which state, what is answered here and what forwarded,
and the timers. A fake transport, back end and clock (from test_fuzz_gate);
a real client handshake and channel."""

from __future__ import annotations

import dataclasses

import pytest

from simzmq import gate as gate_mod
from simzmq.gate_session import CLOSED, HANDSHAKE, OPEN, WAIT_HEADER, ClientConnection
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN
from simzmq.wire.messages import ErrorCode, KickCode
from tests.unit.test_fuzz_gate import (GATE_CFG, GATE_SK, Client, FakeBackend, FakeLoop, FakeTransport, make_gate,
                                      reply_for)


def logged_in(gate, index=1, user="alice", device=""):
    c = Client(gate, index, 1)
    c.finish_handshake()
    _, origin, msg, cb = c.forwarded(gate, m.Login(user=user, password="pw", device=device))
    cb(reply_for(msg, origin, "ok"))
    c.read()
    assert c.logged_in_as == user
    return c


def send(c, msg, ref):
    c.sent_refs[ref] += 1
    c.conn.payload_received(c.tx.seal(c.codec.encode(msg, ref)))
    c.read()
    return c.received[-1] if c.received else None


def test_states_of_the_handshake():
    gate, _ = make_gate()
    c = Client(gate, 1, 1)  # HELLO in: WELCOME and Ready out
    assert c.conn.state == WAIT_HEADER and isinstance(c.received[0][1], m.Ready)
    c.finish_handshake()
    assert c.conn.state == OPEN and c.transport.max_frame == GATE_CFG.max_frame


def test_a_request_before_the_handshake_ends_closes_the_connection():
    gate, _ = make_gate()
    c = Client(gate, 1, 1)
    assert c.conn.state == WAIT_HEADER
    c.conn.payload_received(b"not a 24-byte header")
    assert c.transport.closed and c.conn.state == CLOSED
    transport = FakeTransport()
    fresh = ClientConnection(gate, transport, "client3", "10.0.0.3")
    assert fresh.state == HANDSHAKE
    fresh.payload_received(b"SIMZ but not a HELLO")
    assert transport.closed and not transport.frames


@pytest.mark.parametrize("msg", [m.Send(to="bob", cmid=b"c1", body=b"x"), m.Sync(), m.Read(peer="bob", msg_id=1), m.Convs()])
def test_session_requests_before_login_are_refused_here(msg):
    gate, _ = make_gate()
    c = Client(gate, 1, 1)
    c.finish_handshake()
    ref, reply, _ = send(c, msg, 1)
    assert ref == 1 and reply.code == ErrorCode.NOT_LOGGED_IN
    assert not gate.backend.pending


def test_ping_is_answered_here_and_logout_before_login_closes():
    gate, _ = make_gate()
    c = Client(gate, 1, 1)
    c.finish_handshake()
    assert send(c, m.Ping(ts_ms=7), 1)[1] == m.Pong(ts_ms=7)
    ref, reply, final = send(c, m.Logout(), 2)
    assert (ref, reply, final) == (2, m.Ok(), True)
    assert c.transport.closed and c.conn.state == CLOSED and not gate.backend.pending


def test_a_second_login_is_a_bad_request_pending_or_done():
    gate, _ = make_gate()
    c = Client(gate, 1, 1)
    c.finish_handshake()
    _, origin, msg, cb = c.forwarded(gate, m.Login(user="alice", password="pw"))
    assert send(c, m.Login(user="bob", password="pw"), 2)[1].code == ErrorCode.BAD_REQUEST
    cb(reply_for(msg, origin, "ok"))
    c.read()
    assert send(c, m.Login(user="bob", password="pw"), 3)[1].code == ErrorCode.BAD_REQUEST
    assert not gate.backend.pending


def test_session_requests_go_under_the_logged_in_user_and_session():
    gate, _ = make_gate()
    c = logged_in(gate)
    key, origin, msg, _ = c.forwarded(gate, m.Send(to="bob", cmid=b"c1", body=b"hi"), ref=5)
    assert (key, origin, msg.to) == ("alice", c.conn.session, "bob")
    key, _, msg, _ = c.forwarded(gate, m.Logout(), ref=6)
    assert key == "alice" and isinstance(msg, m.Revoke) and msg.token == b"k" * 32


def test_registration_closed_and_client_only_types():
    loop = FakeLoop()
    gate = gate_mod.Gate("t", dataclasses.replace(GATE_CFG, allow_register=False), GATE_SK, [], clock=lambda: loop.now, loop=loop)
    gate.backend = FakeBackend()
    c = Client(gate, 1, 1)
    c.finish_handshake()
    assert send(c, m.Register(user="alice", password="pw"), 1)[1].code == ErrorCode.FORBIDDEN
    assert send(c, m.Kick(code=1), 2)[1].code == ErrorCode.BAD_REQUEST  # a gate's message, not a request
    assert not gate.backend.pending and not c.transport.closed


def test_no_handshake_in_time_closes_without_a_word():
    gate, loop = make_gate()
    c = Client(gate, 1, 1)  # never sends its header
    written = len(c.transport.frames)
    loop.advance(GATE_CFG.handshake_timeout_s + 0.1)
    assert c.transport.closed and len(c.transport.frames) == written


@pytest.mark.parametrize("behind, code", [(0, KickCode.IDLE), (10**6, KickCode.SLOW_CONSUMER)])
def test_silence_is_kicked_idle_unless_the_client_is_behind_in_reading(behind, code):
    gate, loop = make_gate()
    c = logged_in(gate)
    loop.advance(GATE_CFG.idle_timeout_s / 2)
    assert not c.transport.closed
    c.transport.queued_bytes = behind
    loop.advance(GATE_CFG.idle_timeout_s)
    assert c.transport.closed
    c.read()
    _, kick, final = c.received[-1]
    assert isinstance(kick, m.Kick) and kick.code == code and final


def test_a_push_skips_the_session_it_came_from_and_other_users():
    gate, _ = make_gate()
    a1 = logged_in(gate, 1, device="phone")
    a2 = logged_in(gate, 2, device="laptop")
    b = logged_in(gate, 3, user="bob")
    push = BIN.encode(m.NewMsg(msg=m.Msg(msg_id=1, seq=5, sender="alice", to="bob", body=b"for alice")), 0)
    gate.fanout.on_notification(b"alice\0", a1.conn.session, push)
    for c in (a1, a2, b):
        c.read()
    assert [type(x[1]) for x in a2.received].count(m.NewMsg) == 1
    assert m.NewMsg not in [type(x[1]) for x in a1.received + b.received]
    gate.fanout.on_notification(b"alice\0", b"", push)  # the same seq again: pushed once only
    a2.read()
    assert [type(x[1]) for x in a2.received].count(m.NewMsg) == 1


def test_a_login_with_the_same_device_replaces_the_older_session():
    gate, _ = make_gate()
    old = logged_in(gate, 1, device="phone")
    logged_in(gate, 2, device="phone")
    old.read()
    assert old.transport.closed and old.received[-1][1].code == KickCode.REPLACED
    # Regression: the replaced session's end took the user offline (and
    # unsubscribed) with the new session still there.
    assert len(gate.fanout.sessions["alice"]) == 1 and gate.backend.subscribed == {"alice": 1}


def test_a_sync_pauses_reading_until_answered_and_a_late_reply_is_dropped_undecoded():
    gate, _ = make_gate()
    c = logged_in(gate)
    send(c, m.Sync(), 2)
    assert c.conn.paused and c.conn.large_replies_pending == 1
    _, origin, msg, cb = gate.backend.pending.pop()
    cb(reply_for(msg, origin, "ok"))
    c.read()
    assert not c.conn.paused and isinstance(c.received[-1][1], m.Batch)
    # The connection closes with a Sync outstanding: its reply, when it comes,
    # is counted and dropped without being decoded.
    send(c, m.Sync(), 3)
    _, origin, msg, cb = gate.backend.pending.pop()
    c.conn.close("gone")
    cb(b"\x00not even a reply")
    assert not c.conn.paused and c.conn.pending == 0
