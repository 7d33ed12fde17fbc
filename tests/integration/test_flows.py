"""Every flow of protocol.md sections 3 and 5, through the client library,
against a real region started with `simzmq up` with two gates (and as many
workers as tests/region.py is told: three in bin/test's Postgres pass).

The clients of a test are spread over both gates in turn, so the flows hold
whichever gate each party is on; a test that needs a party on a given gate
says so with ``port``."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time

import pytest

from simzmq.client import Client, Connection, RequestError
from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode, KickCode
from tests.region import region_fixture, until_available

pytestmark = pytest.mark.timeout(120)


region = region_fixture("flows", gates=2)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


_counter = [0]
# Which gate the next client without a ``port`` goes to.
_next_gate = itertools.count()


def fresh(prefix: str) -> str:
    _counter[0] += 1
    return f"{prefix}{_counter[0]}-{os.getpid()}"


async def user(region, name, device="", codecs=(1, 2), port=None, register=True) -> Client:
    port = port or region.gate_port + next(_next_gate) % region.gates
    c = Client("127.0.0.1", port, region.gate_pk, name, password="pw-" + name,
               device=device, codecs=codecs)
    if register:
        await until_available(c.register)
    await until_available(c.login)
    return c


async def next_event(client: Client, kind, timeout=10):
    while True:
        ev = await asyncio.wait_for(client.events.get(), timeout)
        if isinstance(ev, kind):
            return ev


async def no_event(client: Client, kind, wait=0.5):
    try:
        while True:
            ev = await asyncio.wait_for(client.events.get(), wait)
            if isinstance(ev, kind):
                return ev
    except asyncio.TimeoutError:
        return None


@pytest.mark.parametrize("codec", [1, 2])
def test_register_login_send_push_sync(region, codec):
    async def main():
        a, b = fresh("a"), fresh("b")
        alice = await user(region, a, codecs=(codec,))
        bob = await user(region, b, codecs=(codec,))
        ok = await alice.send(b, b"hello bob")
        assert ok.seq == 1 and ok.msg_id > 0
        pushed = await next_event(bob, m.NewMsg)
        assert pushed.msg.body == b"hello bob" and pushed.msg.sender == a and pushed.msg.seq == 1
        assert pushed.msg.msg_id == ok.msg_id and pushed.msg.ts_ms == ok.ts_ms
        # Sync gives the same message from the store.
        conn = bob.conn
        batch = await conn.request(m.Sync(since=0, limit=0))
        assert [x.msg_id for x in batch.msgs] == [ok.msg_id] and not batch.more
        await alice.close()
        await bob.close()
    run(main())


def test_sender_other_devices_get_the_message_but_not_the_sending_one(region):
    async def main():
        a, b = fresh("a"), fresh("b")
        phone = await user(region, a, device="phone")
        laptop = await user(region, a, device="laptop", register=False, port=region.gate_port + 1)
        bob = await user(region, b)
        ok = await phone.send(b, b"from my phone")
        copy = await next_event(laptop, m.NewMsg)
        assert copy.msg.seq == ok.seq and copy.msg.to == b
        await next_event(bob, m.NewMsg)
        # The phone holds it from its SendOk; no push comes back to it.
        conn_pushes = await no_event(phone, m.NewMsg)
        assert conn_pushes is None
        for c in (phone, laptop, bob):
            await c.close()
    run(main())


def test_send_is_idempotent_on_cmid(region):
    async def main():
        a, b = fresh("a"), fresh("b")
        alice = await user(region, a)
        bob = await user(region, b)
        send = m.Send(to=b, cmid=os.urandom(16), kind=0, body=b"once")
        first = await alice.conn.request(send)
        # Another connection of the same sender (another device) retries it.
        other = await Connection.open("127.0.0.1", region.gate_port + 1, region.gate_pk, ping_interval=None)
        await other.request(m.Login(user=a, password="pw-" + a, token=b"", device="other"))
        again = await other.request(send)
        assert again == first
        with pytest.raises(RequestError) as err:
            await other.request(m.Send(to=b, cmid=send.cmid, kind=0, body=b"changed"))
        assert err.value.code == ErrorCode.BAD_REQUEST
        batch = await bob.conn.request(m.Sync(since=0, limit=0))
        assert [x.body for x in batch.msgs] == [b"once"]
        other.close()
        await alice.close()
        await bob.close()
    run(main())


def test_pipelined_sends_keep_their_order(region):
    async def main():
        a, b = fresh("a"), fresh("b")
        alice = await user(region, a)
        bob = await user(region, b)
        futures = [alice.conn.request_nowait(m.Send(to=b, cmid=os.urandom(16), kind=0, body=b"%03d" % i))
                   for i in range(100)]
        oks = await asyncio.gather(*futures)
        assert [o.seq for o in oks] == list(range(1, 101))
        batch = await bob.conn.request(m.Sync(since=0, limit=0))
        assert [x.body for x in batch.msgs] == [b"%03d" % i for i in range(100)]
        ids = [x.msg_id for x in batch.msgs]
        assert ids == sorted(ids)
        await alice.close()
        await bob.close()
    run(main())


def test_sync_limit_more_and_empty(region):
    async def main():
        a, b = fresh("a"), fresh("b")
        alice = await user(region, a)
        bob = await user(region, b)
        for i in range(12):
            await alice.send(b, b"m%d" % i)
        page = await bob.conn.request(m.Sync(since=0, limit=5))
        assert [x.seq for x in page.msgs] == [1, 2, 3, 4, 5] and page.more
        page = await bob.conn.request(m.Sync(since=10, limit=5))
        assert [x.seq for x in page.msgs] == [11, 12] and not page.more
        page = await bob.conn.request(m.Sync(since=12, limit=5))
        assert page.msgs == [] and not page.more
        # The client library's own sync holds everything afterwards.
        await bob.sync()
        assert bob.max_contiguous_seq == 12
        await alice.close()
        await bob.close()
    run(main())


def test_big_bodies_sync_in_frames_that_fit(region):
    async def main():
        a, b = fresh("a"), fresh("b")
        alice = await user(region, a)
        bob = await user(region, b)
        big = b"x" * 60000
        for _ in range(40):  # 2.4 MB in all: more than one max_frame
            await alice.send(b, big)
        first = await bob.conn.request(m.Sync(since=0, limit=0))
        assert 1 <= len(first.msgs) < 40 and first.more
        await bob.sync()
        assert bob.max_contiguous_seq == 40
        await alice.close()
        await bob.close()
    run(main())


def test_send_to_self(region):
    async def main():
        a = fresh("a")
        phone = await user(region, a, device="phone")
        tablet = await user(region, a, device="tablet", register=False)
        ok = await phone.send(a, b"note to self")
        assert ok.seq == 1
        pushed = await next_event(tablet, m.NewMsg)
        assert pushed.msg.seq == 1 and pushed.msg.sender == a == pushed.msg.to
        batch = await tablet.conn.request(m.Sync(since=0, limit=0))
        assert len(batch.msgs) == 1
        await phone.close()
        await tablet.close()
    run(main())


def test_read_receipts_and_convs(region):
    async def main():
        a, b, c = fresh("a"), fresh("b"), fresh("c")
        alice = await user(region, a)
        bob = await user(region, b, device="phone")
        bob2 = await user(region, b, device="laptop", register=False, port=region.gate_port + 1)
        carol = await user(region, c)
        m1 = await alice.send(b, b"one")
        m2 = await alice.send(b, b"two")
        m3 = await carol.send(b, b"three")
        convs = await bob.convs()
        assert [(x.peer, x.last_msg_id, x.unread, x.peer_read) for x in convs] == [
            (c, m3.msg_id, 1, 0), (a, m2.msg_id, 2, 0)]
        await bob.read(a, m1.msg_id)
        notice = await next_event(alice, m.ReadNotice)
        assert (notice.reader, notice.peer, notice.msg_id) == (b, a, m1.msg_id)
        other = await next_event(bob2, m.ReadNotice)
        assert other.msg_id == m1.msg_id
        convs = {x.peer: x for x in await bob.convs()}
        assert convs[a].unread == 1
        assert {x.peer: x for x in await alice.convs()}[b].peer_read == m1.msg_id
        # A Read that does not raise the mark: Ok, and nobody hears of it.
        await bob.read(a, m1.msg_id)
        assert await no_event(alice, m.ReadNotice) is None
        # A message of another conversation is refused.
        with pytest.raises(RequestError) as err:
            await bob.read(a, m3.msg_id)
        assert err.value.code == ErrorCode.BAD_REQUEST
        for x in (alice, bob, bob2, carol):
            await x.close()
    run(main())


def test_ping_pong(region):
    async def main():
        conn = await Connection.open("127.0.0.1", region.gate_port, region.gate_pk, ping_interval=None)
        assert conn.ready.max_body == 65536 and conn.ready.idle_timeout_s == 90
        pong = await conn.request(m.Ping(ts_ms=123456))
        assert pong == m.Pong(ts_ms=123456)
        conn.close()
    run(main())


def test_resume_token_and_logout(region):
    async def main():
        a = fresh("a")
        first = await user(region, a)
        token = first.token
        assert len(token) == 32
        # The token logs in another connection, and a fresh token comes back.
        conn = await Connection.open("127.0.0.1", region.gate_port, region.gate_pk, ping_interval=None)
        ok = await conn.request(m.Login(user=a, password="", token=token, device=""))
        assert ok.user == a and ok.token != token and len(ok.session) == 16
        # Logout revokes the token of that session and closes cleanly.
        await conn.request(m.Logout())
        await asyncio.wait_for(conn.wait_closed(), 5)
        assert conn.clean_close
        again = await Connection.open("127.0.0.1", region.gate_port, region.gate_pk, ping_interval=None)
        with pytest.raises(RequestError) as err:
            await again.request(m.Login(user=a, password="", token=ok.token, device=""))
        assert err.value.code == ErrorCode.AUTH_FAILED
        # The first token was not the one revoked.
        ok2 = await again.request(m.Login(user=a, password="", token=token, device=""))
        assert ok2.user == a
        again.close()
        await first.close()
    run(main())


@pytest.mark.parametrize("other_gate", [False, True])
def test_same_device_elsewhere_kicks_the_older_session(region, other_gate):
    async def main():
        a = fresh("a")
        c = Client("127.0.0.1", region.gate_port, region.gate_pk, a, password="pw", device="phone")
        await c.register()
        old = await Connection.open("127.0.0.1", region.gate_port, region.gate_pk, ping_interval=None)
        await old.request(m.Login(user=a, password="pw", token=b"", device="phone"))
        keep = await Connection.open("127.0.0.1", region.gate_port, region.gate_pk, ping_interval=None)
        await keep.request(m.Login(user=a, password="pw", token=b"", device="tablet"))
        port = region.gate_port + (1 if other_gate else 0)
        new = await Connection.open("127.0.0.1", port, region.gate_pk, ping_interval=None)
        await new.request(m.Login(user=a, password="pw", token=b"", device="phone"))
        await asyncio.wait_for(old.wait_closed(), 10)
        assert old.kick is not None and old.kick.code == KickCode.REPLACED and old.clean_close
        # Another device of the same user stays.
        assert await keep.request(m.Ping(ts_ms=1)) == m.Pong(ts_ms=1)
        assert await new.request(m.Ping(ts_ms=2)) == m.Pong(ts_ms=2)
        keep.close()
        new.close()
    run(main())


def test_history_over_http(region):
    async def main():
        a, b, c = fresh("a"), fresh("b"), fresh("c")
        alice = await user(region, a)
        bob = await user(region, b)
        carol = await user(region, c)
        sent = [await alice.send(b, b"h%d" % i) for i in range(5)]
        await carol.send(b, b"not for alice")
        return alice.token, bob.token, sent, (a, b, c), [alice, bob, carol]
    token, bob_token, sent, (a, b, c), clients = run(main())
    status, page = region.http_get(f"/v1/history/{b}?limit=3", {"Authorization": "Bearer " + token.hex()})
    assert status == 200 and page["more"] is True
    assert [x["msg_id"] for x in page["messages"]] == [s.msg_id for s in sent[::-1][:3]]
    assert page["messages"][0]["body"] == "aDQ=" and page["messages"][0]["sender"] == a
    status, older = region.http_get(f"/v1/history/{b}?limit=3&before={page['messages'][-1]['msg_id']}",
                                    {"Authorization": "Bearer " + token.hex()})
    assert status == 200 and [x["msg_id"] for x in older["messages"]] == [sent[1].msg_id, sent[0].msg_id]
    assert older["more"] is False
    # alice cannot read bob and carol's conversation: asking for "carol" gives her own (empty) one.
    status, other = region.http_get(f"/v1/history/{c}", {"Authorization": "Bearer " + token.hex()})
    assert status == 200 and other["messages"] == []
    assert region.http_get(f"/v1/history/{b}")[0] == 401
    assert region.http_get(f"/v1/history/{b}", {"Authorization": "Bearer " + "00" * 32})[0] == 401
    assert region.http_get(f"/v1/history/{b}", {"Authorization": "Bearer zz"})[0] == 401
    assert region.http_get(f"/v1/history/{b}?limit=1000", {"Authorization": "Bearer " + token.hex()})[0] == 400
    assert region.http_get("/v1/history/bad%20peer", {"Authorization": "Bearer " + token.hex()})[0] == 400

    async def close():
        for x in clients:
            await x.close()
    run(close())


def test_health_and_metrics(region):
    status, body = region.http_get("/v1/health")
    assert status == 200 and body["status"] == "ok" and body["broker"] == "primary"
    status, text = region.http_get("/metrics")
    assert status == 200 and "simzmq_gate_requests_total" in text and "simzmq_gate_connections" in text


def test_websocket_transport(region):
    from tornado.websocket import websocket_connect

    from simzmq.wire.codec import CODECS
    from simzmq.wire.handshake import ClientHandshake

    async def main():
        ws = await websocket_connect(f"ws://127.0.0.1:{region.http_port}/ws")
        hs = ClientHandshake(region.gate_pk)
        await ws.write_message(hs.hello(), binary=True)
        hs.receive_welcome(await ws.read_message())
        plaintext, _ = hs.receiver.open(await ws.read_message())
        codec = CODECS[hs.codec_id]
        assert isinstance(codec.decode(plaintext)[1], m.Ready)
        await ws.write_message(hs.sender.header, binary=True)
        await ws.write_message(hs.sender.seal(codec.encode(m.Ping(ts_ms=77), 9)), binary=True)
        plaintext, _ = hs.receiver.open(await ws.read_message())
        assert codec.decode(plaintext) == (9, m.Pong(ts_ms=77))
        ws.close()
    run(main())


def test_gate_restart_client_resumes_and_loses_nothing(region):
    async def main():
        a, b = fresh("a"), fresh("b")
        alice = await user(region, a, port=region.gate_port)
        bob = await user(region, b, port=region.gate_port + 1)
        first_token = alice.token
        await alice.send(b, b"before")
        gate_pid = region.pid("gate-1")
        os.kill(gate_pid, signal.SIGKILL)
        # Sends made while the gate is down are resent with their cmid once
        # the supervisor has restarted it.
        oks = await asyncio.gather(*(alice.send(b, b"during %d" % i) for i in range(5)))
        assert sorted(o.seq for o in oks) == [2, 3, 4, 5, 6]
        assert alice.reconnects >= 1 and alice.token != first_token
        deadline = time.monotonic() + 10
        while bob.max_contiguous_seq < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert [bob.messages[s].body for s in range(1, 7)] == [b"before"] + [b"during %d" % i for i in range(5)]
        assert region.pid("gate-1") != gate_pid
        await alice.close()
        await bob.close()
    run(main())
