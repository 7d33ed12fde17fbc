"""Hostile and broken input against a real region (`simzmq up`): each gets a
clear error or a closed connection, stores nothing, and the gate keeps serving
everyone else."""

from __future__ import annotations

import os
import struct
import time

import pytest

from simzmq.wire import messages as m
from simzmq.wire.codec import BIN
from simzmq.wire.handshake import ClientHandshake
from simzmq.wire.messages import ErrorCode, KickCode
from tests.rawclient import Closed, RawClient
from tests.region import region_fixture

pytestmark = pytest.mark.timeout(120)


region = region_fixture("bad", extra_env={"SIMZMQ_GATE_HANDSHAKE_TIMEOUT_S": "2"})


@pytest.fixture(scope="module")
def users(region):
    """alice and bob, registered and logged in; the witnesses that nothing leaks or breaks."""
    clients = {}
    for name in ("alice", "bob"):
        c = RawClient(region.gate_port, region.gate_pk)
        assert c.registered(name, "pw-" + name)
        ok = c.served(m.Login(user=name, password="pw-" + name, token=b"", device="test"))
        assert isinstance(ok, m.LoginOk)
        clients[name] = c
    return clients


def max_seq(client) -> int:
    batch = client.request(m.Sync(since=0, limit=0))
    return max((x.seq for x in batch.msgs), default=0)


def still_serving(region, users):
    """A fresh connection completes a round trip and the witnesses still work."""
    c = RawClient(region.gate_port, region.gate_pk)
    assert isinstance(c.request(m.Ping(ts_ms=1)), m.Pong)
    c.close()
    assert isinstance(users["alice"].request(m.Ping(ts_ms=2)), m.Pong)


def test_garbage_instead_of_hello(region, users):
    c = RawClient(region.gate_port, handshake=False)
    c.send_frame(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.closed_without_data()
    still_serving(region, users)


def test_unknown_version(region, users):
    c = RawClient(region.gate_port, handshake=False)
    hello = bytearray(ClientHandshake(region.gate_pk).hello())
    hello[4] = 2
    c.send_frame(bytes(hello))
    assert c.closed_without_data()
    still_serving(region, users)


def test_no_common_codec(region, users):
    c = RawClient(region.gate_port, handshake=False)
    c.send_frame(ClientHandshake(region.gate_pk, codecs=(9,)).hello())
    assert c.closed_without_data()


def test_four_gib_frame_length(region, users):
    c = RawClient(region.gate_port, handshake=False)
    c.send_bytes(struct.pack(">I", 0xFFFFFFFF) + b"x" * 100)
    assert c.closed_without_data()
    # The same after the handshake: a frame announced above max_frame.
    c = RawClient(region.gate_port, region.gate_pk)
    c.send_bytes(struct.pack(">I", 0xFFFFFFFF))
    assert c.closed_without_data()
    still_serving(region, users)


def test_tampered_ciphertext(region, users):
    before = max_seq(users["bob"])
    c = RawClient(region.gate_port, region.gate_pk)
    assert isinstance(c.served(m.Login(user="alice", password="pw-alice", token=b"", device="")), m.LoginOk)
    frame = bytearray(c.tx.seal(BIN.encode(m.Send(to="bob", cmid=b"t1", kind=0, body=b"evil"), 1)))
    frame[-1] ^= 1
    c.send_frame(bytes(frame))
    assert c.closed_without_data()
    assert max_seq(users["bob"]) == before
    still_serving(region, users)


def test_malformed_body_keeps_connection(region, users):
    c = users["alice"]
    before = max_seq(users["bob"])
    # A Send whose body stops in the middle of the cmid.
    c.send_plaintext(bytes([m.Send.TYPE]) + struct.pack(">I", 77) + b"\x00\x00\x00\x03bob\x00\x00\x00\x08ab")
    ref, reply, _ = c.recv()
    assert ref == 77 and isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST
    assert max_seq(users["bob"]) == before
    assert isinstance(c.request(m.Ping(ts_ms=3)), m.Pong)


@pytest.mark.parametrize("mtype", [0, 20, 63, 64, 127, 128, 200, 255, m.LoginOk.TYPE, m.NewMsg.TYPE,
                                   m.Kick.TYPE, m.Ready.TYPE, m.History.TYPE])
def test_unknown_or_server_only_type(region, users, mtype):
    c = users["alice"]
    c.send_plaintext(bytes([mtype]) + struct.pack(">I", 5))
    ref, reply, _ = c.recv()
    assert ref == 5 and isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST
    assert isinstance(c.request(m.Ping(ts_ms=4)), m.Pong)


def test_short_payload_is_kicked(region, users):
    c = RawClient(region.gate_port, region.gate_pk)
    c.send_plaintext(b"\x0c\x00")
    ref, reply, final = c.recv()
    assert isinstance(reply, m.Kick) and reply.code == KickCode.PROTOCOL_VIOLATION and final
    assert c.closed_without_data()


def test_fifty_silent_connections(region, users):
    silent = [RawClient(region.gate_port, handshake=False) for _ in range(50)]
    # Everyone else is served while they sit there...
    still_serving(region, users)
    # ...and the gate closes them all after handshake_timeout (2 s here).
    for s in silent:
        s.sock.settimeout(15)
        assert s.closed_without_data()
        s.close()
    still_serving(region, users)


def test_send_before_login(region, users):
    before = max_seq(users["bob"])
    c = RawClient(region.gate_port, region.gate_pk)
    reply = c.request(m.Send(to="bob", cmid=b"x1", kind=0, body=b"hi"))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.NOT_LOGGED_IN
    for msg in (m.Sync(since=0, limit=0), m.Read(peer="bob", msg_id=1), m.Convs()):
        reply = c.request(msg)
        assert isinstance(reply, m.Error) and reply.code == ErrorCode.NOT_LOGGED_IN
    assert max_seq(users["bob"]) == before


def test_password_and_token_together(region, users):
    c = RawClient(region.gate_port, region.gate_pk)
    reply = c.served(m.Login(user="alice", password="pw-alice", token=b"\x01" * 32, device=""))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST
    reply = c.served(m.Login(user="alice", password="", token=b"", device=""))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST
    # The connection stays and can still log in properly.
    assert isinstance(c.served(m.Login(user="alice", password="pw-alice", token=b"", device="")), m.LoginOk)
    # A second Login on a logged-in connection is refused.
    reply = c.served(m.Login(user="alice", password="pw-alice", token=b"", device=""))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("user", ["", "has space", "ümlaut", "#group", "a/b"])
def test_invalid_user_id(region, users, user):
    c = RawClient(region.gate_port, region.gate_pk)
    reply = c.served(m.Register(user=user, password="pw"))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST
    reply = users["alice"].request(m.Send(to=user, cmid=os.urandom(8), kind=0, body=b"x"))
    # A group id is a well-formed `to` (section 7): this group does not exist.
    expected = ErrorCode.NO_SUCH_USER if user == "#group" else ErrorCode.BAD_REQUEST
    assert isinstance(reply, m.Error) and reply.code == expected


def test_user_id_too_long(region, users):
    c = RawClient(region.gate_port, region.gate_pk)
    reply = c.served(m.Register(user="a" * 65, password="pw"))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.TOO_LARGE


def test_empty_cmid(region, users):
    before = max_seq(users["bob"])
    reply = users["alice"].request(m.Send(to="bob", cmid=b"", kind=0, body=b"x"))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST
    reply = users["alice"].request(m.Send(to="bob", cmid=b"c" * 33, kind=0, body=b"x"))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.TOO_LARGE
    assert max_seq(users["bob"]) == before


def test_body_over_limit(region, users):
    before = max_seq(users["bob"])
    reply = users["alice"].request(m.Send(to="bob", cmid=os.urandom(16), kind=0, body=b"x" * (64 * 1024 + 1)))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.TOO_LARGE
    assert max_seq(users["bob"]) == before
    # Exactly the limit is fine.
    reply = users["alice"].request(m.Send(to="bob", cmid=os.urandom(16), kind=0, body=b"x" * (64 * 1024)))
    assert isinstance(reply, m.SendOk)


def test_recipient_does_not_exist(region, users):
    before = max_seq(users["alice"])
    reply = users["alice"].request(m.Send(to="nobody", cmid=os.urandom(16), kind=0, body=b"x"))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.NO_SUCH_USER
    assert max_seq(users["alice"]) == before


def test_wrong_password(region, users):
    c = RawClient(region.gate_port, region.gate_pk)
    for user in ("alice", "nobody"):
        reply = c.served(m.Login(user=user, password="wrong", token=b"", device=""))
        assert isinstance(reply, m.Error) and reply.code == ErrorCode.AUTH_FAILED


def test_forged_token(region, users):
    c = RawClient(region.gate_port, region.gate_pk)
    reply = c.served(m.Login(user="alice", password="", token=os.urandom(32), device=""))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.AUTH_FAILED
    # bob's real token does not log in as alice.
    bob = RawClient(region.gate_port, region.gate_pk)
    ok = bob.served(m.Login(user="bob", password="pw-bob", token=b"", device=""))
    reply = c.served(m.Login(user="alice", password="", token=ok.token, device=""))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.AUTH_FAILED


def test_register_existing_user(region, users):
    c = RawClient(region.gate_port, region.gate_pk)
    reply = c.served(m.Register(user="alice", password="another"))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.EXISTS
    # With alice's own password it is a repeat of her Register: Ok, nothing changes.
    assert isinstance(c.served(m.Register(user="alice", password="pw-alice")), m.Ok)
    # The old password still works: nothing changed.
    assert isinstance(c.served(m.Login(user="alice", password="pw-alice", token=b"", device="")), m.LoginOk)


def test_cmid_reuse_with_other_content(region, users):
    cmid = os.urandom(16)
    first = users["alice"].request(m.Send(to="bob", cmid=cmid, kind=0, body=b"one"))
    assert isinstance(first, m.SendOk)
    before = max_seq(users["bob"])
    reply = users["alice"].request(m.Send(to="bob", cmid=cmid, kind=0, body=b"two"))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST
    assert max_seq(users["bob"]) == before


def test_read_outside_conversation(region, users):
    carol = RawClient(region.gate_port, region.gate_pk)
    carol.served(m.Register(user="carol", password="pw-carol"))
    carol.served(m.Login(user="carol", password="pw-carol", token=b"", device=""))
    sent = users["alice"].request(m.Send(to="bob", cmid=os.urandom(16), kind=0, body=b"private"))
    # carol names a message of alice and bob's conversation: refused.
    reply = carol.request(m.Read(peer="alice", msg_id=sent.msg_id))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST
    # and carol's inbox holds nothing of it.
    assert carol.request(m.Sync(since=0, limit=0)).msgs == []


def test_connection_stays_after_errors(region, users):
    """After all of the above, the witnesses were never disconnected."""
    for c in users.values():
        assert isinstance(c.request(m.Ping(ts_ms=9)), m.Pong)


def test_header_and_large_first_request_in_one_write(region, users):
    """The frame limit rises when the handshake completes, even in the middle
    of what one read returned: a large first request right behind the
    c2s_header is answered."""
    from simzmq.wire.codec import CODECS
    from simzmq.wire.frames import encode_frame

    c = RawClient(region.gate_port, handshake=False)
    hs = ClientHandshake(region.gate_pk)
    c.send_frame(hs.hello())
    hs.receive_welcome(c.read_frame())
    c.rx, c.tx, c.codec = hs.receiver, hs.sender, CODECS[hs.codec_id]
    c.rx.open(c.read_frame())
    big = c.tx.seal(c.codec.encode(m.Register(user="l" * 60, password="p" * 256), 1))
    assert len(big) > 293
    c.send_bytes(encode_frame(hs.sender.header) + encode_frame(big))
    ref, reply, _ = c.recv()
    assert ref == 1 and isinstance(reply, m.Ok)
