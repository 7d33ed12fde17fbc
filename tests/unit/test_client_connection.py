"""Connection and Client against a small in-test gate on 127.0.0.1.

The fake gate speaks the real handshake and codecs (simzmq.wire) and keeps a
toy in-memory inbox, so these tests exercise the client's protocol handling
without a region. End-to-end tests against a real region live elsewhere.
"""

import asyncio
import os

import pytest

from simzmq.client import Client, Connection, RequestError
from simzmq.wire import messages as m
from simzmq.wire.codec import CODECS
from simzmq.wire.errors import ProtocolError
from simzmq.wire.frames import FrameDecoder, encode_frame
from simzmq.wire.handshake import MAX_HANDSHAKE_FRAME, GateHandshake, public_key
from simzmq.wire.messages import ErrorCode, KickCode


class GateConn:
    """One client connection as the fake gate sees it."""

    def __init__(self, gate, writer, codec, sender):
        self.gate = gate
        self.writer = writer
        self.codec = codec
        self.sender = sender
        self.user = None
        self.device = ""
        self.received = []  # (ref, msg) in arrival order
        self.raw_payloads = []  # undecodable plaintexts

    def send(self, msg, ref=0, final=False):
        frame = self.sender.seal(self.codec.encode(msg, ref), final)
        self.writer.write(encode_frame(frame))

    def drop(self):
        self.writer.close()


class FakeGate:
    """Enough of a gate and IM service for client tests.

    Knobs: ``drop_after_commit`` (cmids whose Send is stored, then the
    connection is dropped instead of answered), ``unavailable`` (cmids answered
    unavailable once), ``reorder`` (hold replies and answer them in reverse).
    """

    def __init__(self, sk=None):
        self.sk = sk or os.urandom(32)
        self.pk = public_key(self.sk)
        self.users = {}  # user -> password
        self.inbox = {}  # user -> [Msg], seq = index + 1
        self.cmids = {}  # (user, cmid) -> SendOk
        self.tokens = {}  # token -> user
        self.conns = []
        self.logins = []  # (user, "password" | "token")
        self.drop_after_commit = set()
        self.unavailable = set()
        self.suppress_push_seqs = set()
        self.next_msg_id = 1000
        self.headers_seen = 0
        self.server = None

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        for conn in self.conns:
            conn.drop()
        self.server.close()
        await self.server.wait_closed()

    def lose_first_sendok(self):
        """The next Send is stored, then its connection dropped before the
        SendOk (a failover), and the resend answered unavailable once: the
        client's Sync after the reconnect brings the message back before any
        SendOk does."""
        original = self._send

        def first_send(conn, ref, msg):
            self._send = original
            self.drop_after_commit.add(msg.cmid)
            original(conn, ref, msg)
            self.unavailable.add(msg.cmid)

        self._send = first_send

    def requests_from(self, user, kind):
        """The requests of this type that ``user``'s connections sent, in order."""
        return [msg for c in self.conns if c.user == user for _, msg in c.received if type(msg) is kind]

    def online(self, user):
        return [c for c in self.conns if c.user == user and not c.writer.is_closing()]

    async def _serve(self, reader, writer):
        decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)

        async def frames():
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for payload in decoder.feed(data):
                    yield payload

        handshake = GateHandshake(self.sk)
        stream = frames()
        try:
            welcome = handshake.receive_hello(await stream.__anext__())
            codec = CODECS[handshake.codec_id]
            conn = GateConn(self, writer, codec, handshake.sender)
            writer.write(encode_frame(welcome))
            conn.send(m.Ready(server_ms=1, max_frame=1 << 20, max_body=65536, idle_timeout_s=90))
            receiver = handshake.receive_c2s_header(await stream.__anext__())
            self.headers_seen += 1
            decoder.max_frame = 1 << 20
            self.conns.append(conn)
            async for payload in stream:
                plaintext, final = receiver.open(payload)
                try:
                    ref, msg = codec.decode(plaintext)
                except ProtocolError:
                    conn.raw_payloads.append(plaintext)
                    continue
                conn.received.append((ref, msg))
                self.handle(conn, ref, msg)
                if final:
                    break
        except (StopAsyncIteration, ProtocolError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    # -- a toy IM service -----------------------------------------------------

    def handle(self, conn, ref, msg):
        kind = type(msg)
        if kind is m.Ping:
            conn.send(m.Pong(ts_ms=msg.ts_ms), ref)
        elif kind is m.Register:
            if msg.user in self.users:
                conn.send(m.Error(code=ErrorCode.EXISTS, reason="taken"), ref)
            else:
                self.users[msg.user] = msg.password
                self.inbox[msg.user] = []
                conn.send(m.Ok(), ref)
        elif kind is m.Login:
            if msg.token:
                ok = self.tokens.get(msg.token) == msg.user
                self.logins.append((msg.user, "token"))
            else:
                ok = self.users.get(msg.user) == msg.password
                self.logins.append((msg.user, "password"))
            if not ok:
                conn.send(m.Error(code=ErrorCode.AUTH_FAILED, reason="no"), ref)
                return
            token = os.urandom(32)
            self.tokens[token] = msg.user
            conn.user, conn.device = msg.user, msg.device
            conn.send(m.LoginOk(user=msg.user, session=os.urandom(16), token=token,
                                max_seq=len(self.inbox[msg.user]), server_ms=1), ref)
        elif kind is m.Logout:
            conn.send(m.Ok(), ref, final=True)
            conn.drop()
        elif conn.user is None:
            conn.send(m.Error(code=ErrorCode.NOT_LOGGED_IN, reason="log in"), ref)
        elif kind is m.Send:
            self._send(conn, ref, msg)
        elif kind is m.Sync:
            entries = self.inbox[conn.user][msg.since : msg.since + 2]  # small pages
            more = msg.since + len(entries) < len(self.inbox[conn.user])
            conn.send(m.Batch(msgs=entries, more=more), ref)
        elif kind is m.Read:
            conn.send(m.Ok(), ref)
            for other in self.online(msg.peer):
                other.send(m.ReadNotice(reader=conn.user, peer=msg.peer, msg_id=msg.msg_id, ts_ms=5))
        elif kind is m.Convs:
            conn.send(m.ConvList(convs=[m.Conv(peer="bob", last_msg_id=1, unread=2, peer_read=0)]), ref)
        elif kind is m.Watch:
            # Everyone lets everyone see them here (no contacts in this fake).
            conn.send(m.PresenceList(states=[m.Presence(user=u, state=2 if self.online(u) else 1)
                                             for u in dict.fromkeys(msg.users)]), ref)

    def _send(self, conn, ref, msg):
        if msg.to not in self.users:
            conn.send(m.Error(code=ErrorCode.NO_SUCH_USER, reason=msg.to), ref)
            return
        if msg.cmid in self.unavailable:
            self.unavailable.discard(msg.cmid)
            conn.send(m.Error(code=ErrorCode.UNAVAILABLE, reason="busy"), ref)
            return
        key = (conn.user, msg.cmid)
        if key not in self.cmids:
            self.next_msg_id += 1
            copies = {msg.to: None, conn.user: None}
            for owner in copies:
                box = self.inbox[owner]
                entry = m.Msg(msg_id=self.next_msg_id, seq=len(box) + 1, sender=conn.user, to=msg.to,
                              kind=msg.kind, ts_ms=7, cmid=msg.cmid, body=msg.body)
                box.append(entry)
                copies[owner] = entry
                if entry.seq in self.suppress_push_seqs and owner == msg.to:
                    continue
                for other in self.online(owner):
                    if other is not conn:
                        other.send(m.NewMsg(msg=entry))
            mine = copies[conn.user]
            self.cmids[key] = m.SendOk(msg_id=mine.msg_id, seq=mine.seq, ts_ms=7)
        if msg.cmid in self.drop_after_commit:
            self.drop_after_commit.discard(msg.cmid)
            conn.drop()
            return
        conn.send(self.cmids[key], ref)


def run(coro):
    return asyncio.run(coro)


async def gate_and_conn(**kw):
    gate = await FakeGate().start()
    conn = await Connection.open("127.0.0.1", gate.port, gate.pk, **kw)
    return gate, conn


# --- Connection --------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("codecs", [(1, 2), (2, 1)])
def test_open_and_ping(codecs):
    async def main():
        gate, conn = await gate_and_conn(codecs=codecs)
        assert conn.ready == m.Ready(server_ms=1, max_frame=1 << 20, max_body=65536, idle_timeout_s=90)
        assert conn.codec.id == codecs[0]
        pong = await conn.request(m.Ping(ts_ms=99))
        assert pong == m.Pong(ts_ms=99)
        assert gate.conns[0].received[0][0] >= 1  # refs start at 1
        conn.close()
        await gate.stop()

    run(main())


@pytest.mark.timeout(10)
def test_error_reply_raises_request_error():
    async def main():
        gate, conn = await gate_and_conn()
        with pytest.raises(RequestError) as info:
            await conn.request(m.Convs())
        assert info.value.code == ErrorCode.NOT_LOGGED_IN
        conn.close()
        await gate.stop()

    run(main())


@pytest.mark.timeout(10)
def test_replies_matched_by_ref_in_any_order():
    async def main():
        gate, conn = await gate_and_conn()
        gate_conn_handle = gate.handle
        held = []

        def hold_pings(c, ref, msg):
            if type(msg) is m.Ping:
                held.append((c, ref, msg))
                if len(held) == 5:
                    for c2, ref2, msg2 in reversed(held):
                        gate_conn_handle(c2, ref2, msg2)
            else:
                gate_conn_handle(c, ref, msg)

        gate.handle = hold_pings
        results = await asyncio.gather(*(conn.request(m.Ping(ts_ms=i)) for i in range(5)))
        assert [r.ts_ms for r in results] == list(range(5))
        conn.close()
        await gate.stop()

    run(main())


@pytest.mark.timeout(10)
def test_pushes_go_to_queue_and_gate_ping_is_answered():
    async def main():
        gate, conn = await gate_and_conn()
        await conn.request(m.Ping(ts_ms=1))  # the gate has registered the connection
        g = gate.conns[0]
        g.send(m.ReadNotice(reader="bob", peer="alice", msg_id=3, ts_ms=4))
        g.send(m.Ping(ts_ms=42), ref=77)
        assert await conn.pushes.get() == m.ReadNotice(reader="bob", peer="alice", msg_id=3, ts_ms=4)
        for _ in range(100):
            if (77, m.Pong(ts_ms=42)) in g.received:
                break
            await asyncio.sleep(0.01)
        assert (77, m.Pong(ts_ms=42)) in g.received
        conn.close()
        await gate.stop()

    run(main())


@pytest.mark.timeout(10)
def test_on_push_callback():
    async def main():
        gate = await FakeGate().start()
        got = asyncio.Queue()
        conn = await Connection.open("127.0.0.1", gate.port, gate.pk, on_push=got.put_nowait)
        await conn.request(m.Ping(ts_ms=1))
        gate.conns[0].send(m.Kick(code=KickCode.SHUTDOWN, reason="bye"), final=True)
        assert await got.get() == m.Kick(code=0, reason="bye")
        await conn.wait_closed()
        assert conn.clean_close and conn.kick.code == 0
        assert conn.pushes.empty()
        await gate.stop()

    run(main())


@pytest.mark.timeout(10)
def test_connection_loss_fails_pending_requests():
    async def main():
        gate, conn = await gate_and_conn()
        closed = []
        gate.handle = lambda c, ref, msg: c.drop()
        conn._on_close = closed.append
        with pytest.raises(ConnectionError):
            await conn.request(m.Ping(ts_ms=1))
        assert conn.closed and closed == [conn]
        with pytest.raises(ConnectionError):
            await conn.request(m.Ping(ts_ms=2))
        await gate.stop()

    run(main())


@pytest.mark.timeout(10)
def test_wrong_gate_key_detected_before_anything_is_sent():
    async def main():
        gate = await FakeGate().start()
        with pytest.raises(ProtocolError):
            await Connection.open("127.0.0.1", gate.port, public_key(os.urandom(32)))
        await asyncio.sleep(0.05)
        assert gate.headers_seen == 0  # no c2s_header, let alone a Login
        await gate.stop()

    run(main())


@pytest.mark.timeout(10)
def test_no_common_codec_fails_open():
    async def main():
        gate = await FakeGate().start()
        with pytest.raises((ConnectionError, ProtocolError)):
            await Connection.open("127.0.0.1", gate.port, gate.pk, codecs=(9,))
        await gate.stop()

    run(main())


@pytest.mark.timeout(10)
def test_hostile_helpers_reach_the_gate():
    async def main():
        gate, conn = await gate_and_conn()
        await conn.send_payload(b"\x01\x02")
        await conn.send_message(m.Ping(ts_ms=5), ref=9)
        await conn.request(m.Ping(ts_ms=6))
        g = gate.conns[0]
        assert g.raw_payloads == [b"\x01\x02"]
        assert (9, m.Ping(ts_ms=5)) in g.received
        await conn.send_raw_frame(b"not encrypted at all")
        await conn.wait_closed()  # the gate dropped us for the undecryptable frame
        await gate.stop()

    run(main())


@pytest.mark.timeout(10)
def test_logout_ends_connection_cleanly():
    async def main():
        gate, conn = await gate_and_conn()
        await conn.logout()
        assert conn.closed
        await gate.stop()

    run(main())


# --- Client --------------------------------------------------------------------------


async def logged_in(gate, user, password="pw", register=True, **kw):
    client = Client("127.0.0.1", gate.port, gate.pk, user, password, **kw)
    if register:
        await client.register()
    await client.login()
    return client


async def wait_for(predicate, what="condition"):
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(15)
def test_send_and_receive_between_two_clients():
    async def main():
        gate = await FakeGate().start()
        alice = await logged_in(gate, "alice")
        bob = await logged_in(gate, "bob", codecs=(2,))
        ok = await alice.send("bob", b"hi bob")
        assert ok.seq == 1 and alice.messages[1].body == b"hi bob"
        event = await asyncio.wait_for(bob.events.get(), 5)
        assert event.msg.body == b"hi bob" and event.msg.sender == "alice"
        assert bob.max_contiguous_seq == 1 and bob.messages[1].msg_id == ok.msg_id
        await bob.read("alice", ok.msg_id)
        notice = await asyncio.wait_for(alice.events.get(), 5)
        assert notice == m.ReadNotice(reader="bob", peer="alice", msg_id=ok.msg_id, ts_ms=5)
        assert [c.peer for c in await alice.convs()] == ["bob"]
        assert bob.conversation("alice") == [bob.messages[1]]
        await alice.close()
        await bob.close()
        await gate.stop()

    run(main())


@pytest.mark.timeout(15)
def test_send_to_unknown_user_fails_without_retry():
    async def main():
        gate = await FakeGate().start()
        alice = await logged_in(gate, "alice")
        with pytest.raises(RequestError) as info:
            await alice.send("nobody", b"x")
        assert info.value.code == ErrorCode.NO_SUCH_USER
        assert alice.unacked == 0
        await alice.close()
        await gate.stop()

    run(main())


@pytest.mark.timeout(20)
def test_reconnect_with_token_resends_same_cmid():
    async def main():
        gate = await FakeGate().start()
        await logged_in(gate, "bob")
        alice = await logged_in(gate, "alice")
        original_send = gate._send

        def drop_first(conn, ref, msg):
            gate.drop_after_commit.add(msg.cmid)
            gate._send = original_send
            original_send(conn, ref, msg)

        gate._send = drop_first
        ok = await asyncio.wait_for(alice.send("bob", b"once"), 10)
        assert len(gate.inbox["bob"]) == 1  # stored once despite the resend
        sends = [msg for c in gate.conns if c.user == "alice" for _, msg in c.received if type(msg) is m.Send]
        assert len(sends) == 2 and sends[0].cmid == sends[1].cmid
        assert gate.logins.count(("alice", "token")) == 1
        assert alice.reconnects == 1
        assert alice.messages[ok.seq].body == b"once"
        await alice.close()
        await gate.stop()

    run(main())


@pytest.mark.timeout(20)
def test_unavailable_send_is_retried_with_same_cmid():
    async def main():
        gate = await FakeGate().start()
        await logged_in(gate, "bob")
        alice = await logged_in(gate, "alice")
        original_send = gate._send

        def busy_first(conn, ref, msg):
            gate.unavailable.add(msg.cmid)
            gate._send = original_send
            original_send(conn, ref, msg)

        gate._send = busy_first
        ok = await asyncio.wait_for(alice.send("bob", b"later"), 10)
        assert ok.seq == 1 and len(gate.inbox["bob"]) == 1
        await alice.close()
        await gate.stop()

    run(main())


@pytest.mark.timeout(20)
def test_gap_in_pushes_triggers_sync():
    async def main():
        gate = await FakeGate().start()
        bob = await logged_in(gate, "bob")
        alice = await logged_in(gate, "alice")
        gate.suppress_push_seqs = {2, 3}  # bob misses the pushes of seqs 2 and 3
        for i in range(5):
            await alice.send("bob", b"m%d" % i)
        await wait_for(lambda: bob.max_contiguous_seq == 5, "bob to sync")
        assert [bob.messages[s].body for s in range(1, 6)] == [b"m%d" % i for i in range(5)]
        bodies = []
        while not bob.events.empty():
            bodies.append(bob.events.get_nowait().msg.body)
        assert sorted(bodies) == sorted(b"m%d" % i for i in range(5))  # each applied once
        await alice.close()
        await bob.close()
        await gate.stop()

    run(main())


@pytest.mark.timeout(20)
def test_login_syncs_what_was_missed_offline():
    async def main():
        gate = await FakeGate().start()
        await logged_in(gate, "bob")
        gate.users["carol"] = "pw"
        gate.inbox["carol"] = []
        alice = await logged_in(gate, "alice")
        for i in range(5):
            await alice.send("carol", b"%d" % i)
        carol = await logged_in(gate, "carol", register=False)
        await wait_for(lambda: carol.max_contiguous_seq == 5, "carol to sync")
        await alice.close()
        await carol.close()
        await gate.stop()

    run(main())


@pytest.mark.timeout(20)
def test_kick_replaced_stops_reconnecting():
    async def main():
        gate = await FakeGate().start()
        alice = await logged_in(gate, "alice", device="phone")
        gate.conns[-1].send(m.Kick(code=KickCode.REPLACED, reason="elsewhere"), final=True)
        kick = await asyncio.wait_for(alice.events.get(), 5)
        assert kick.code == KickCode.REPLACED
        await wait_for(lambda: not alice.logged_in, "logout")
        await asyncio.sleep(0.2)
        assert gate.logins == [("alice", "password")]
        with pytest.raises(ConnectionError):
            await alice.send("alice", b"x")
        await alice.close()
        await gate.stop()

    run(main())


@pytest.mark.timeout(15)
def test_wrong_password():
    async def main():
        gate = await FakeGate().start()
        gate.users["alice"] = "right"
        gate.inbox["alice"] = []
        alice = Client("127.0.0.1", gate.port, gate.pk, "alice", "wrong")
        with pytest.raises(RequestError) as info:
            await alice.login()
        assert info.value.code == ErrorCode.AUTH_FAILED
        await alice.close()
        await gate.stop()

    run(main())


@pytest.mark.timeout(15)
def test_client_logout():
    async def main():
        gate = await FakeGate().start()
        alice = await logged_in(gate, "alice")
        await alice.logout()
        assert not alice.logged_in and alice.token == b""
        assert any(type(msg) is m.Logout for c in gate.conns for _, msg in c.received)
        await gate.stop()

    run(main())


@pytest.mark.timeout(15)
def test_send_before_login_is_refused():
    async def main():
        gate = await FakeGate().start()
        alice = Client("127.0.0.1", gate.port, gate.pk, "alice", "pw")
        with pytest.raises(ConnectionError):
            await alice.send("bob", b"x")
        await alice.close()
        await gate.stop()

    run(main())


def test_load_gate_key(tmp_path):
    from simzmq.client import load_gate_key
    from simzmq.keys import KeyFileError

    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "gate.pub").write_text("ab" * 32 + "\n")
    assert load_gate_key(tmp_path) == b"\xab" * 32
    (tmp_path / "keys" / "gate.pub").write_text("abc")
    with pytest.raises(KeyFileError):
        load_gate_key(tmp_path)


@pytest.mark.timeout(20)
def test_own_send_synced_back_completes_the_send_without_an_event():
    async def main():
        gate = await FakeGate().start()
        await logged_in(gate, "bob")
        alice = await logged_in(gate, "alice")
        gate.lose_first_sendok()
        ok = await asyncio.wait_for(alice.send("bob", b"once"), 10)
        assert ok == gate.cmids[("alice", gate.inbox["alice"][0].cmid)]
        assert alice.messages[ok.seq].body == b"once" and alice.unacked == 0
        assert alice.events.empty()  # send() reported it; it is no NewMsg event too
        await alice.close()
        await gate.stop()

    run(main())
