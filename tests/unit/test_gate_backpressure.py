"""The gate's TCP transport (gate_tcp) over real loopback sockets on uvloop:
reading pauses behind a client that does not read and at
max_pending_requests, and resumes by itself (frames already read are served
without waiting for more bytes); frames written in one turn of the loop go
out in one write."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest
import uvloop

from simzmq import gate as gate_mod
from simzmq import gate_tcp
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN, CODECS
from simzmq.wire.frames import FrameDecoder, encode_frame
from simzmq.wire.handshake import ClientHandshake
from tests.unit.test_fuzz_gate import GATE_CFG, GATE_PK, GATE_SK, FakeBackend, reply_for

pytestmark = pytest.mark.timeout(60)

CFG = dataclasses.replace(GATE_CFG, limits=dataclasses.replace(
    GATE_CFG.limits, pause_reading_bytes=64 * 1024, requests_per_s=1e9, requests_burst=10**9,
    slow_consumer_min_bytes=1 << 30, max_outbound_total_bytes=1 << 30))


class Peer:
    """A client on an asyncio stream: handshake, requests, replies."""

    async def connect(self, port: int, rcvbuf: int = 0) -> "Peer":
        sock = socket.socket()
        if rcvbuf:  # small kernel buffers: the gate's own queue fills soon
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock)
        self.decoder = FrameDecoder(1 << 24)
        self.frames: list[bytes] = []
        hs = ClientHandshake(GATE_PK, codecs=(1,))
        self.writer.write(encode_frame(hs.hello()))
        hs.receive_welcome(await self.frame())
        self.rx, self.tx, self.codec = hs.receiver, hs.sender, CODECS[hs.codec_id]
        await self.recv()  # Ready
        self.writer.write(encode_frame(self.tx.header))
        return self

    async def frame(self) -> bytes:
        while not self.frames:
            data = await self.reader.read(65536)
            assert data, "the gate closed the connection"
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    async def recv(self):
        plaintext, _ = self.rx.open(await self.frame())
        return self.codec.decode(plaintext)

    def send(self, msgs, first_ref: int = 1) -> None:
        """All of `msgs` in one write: the gate reads them in one go."""
        self.writer.write(b"".join(encode_frame(self.tx.seal(self.codec.encode(msg, ref)))
                                   for ref, msg in enumerate(msgs, first_ref)))


async def start_gate():
    gate = gate_mod.Gate("t", CFG, GATE_SK, [])
    gate.loop = asyncio.get_running_loop()
    gate.backend = FakeBackend()
    server = await gate_tcp.listen(gate, "127.0.0.1", 0)
    # Accepted sockets inherit the listener's send buffer.
    server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    return gate, server, server.sockets[0].getsockname()[1]


def run(coro):
    return uvloop.run(coro)


def test_reading_pauses_behind_a_client_that_does_not_read_and_resumes():
    n = 20000  # Pongs: several times what the buffers on the way hold

    async def main():
        gate, server, port = await start_gate()
        peer = await Peer().connect(port, rcvbuf=8192)
        peer.send([m.Ping(ts_ms=i) for i in range(n)])
        proto = None
        for _ in range(2000):  # until the gate stops reading: its write buffer is full
            await asyncio.sleep(0.005)
            proto = next(iter(gate.connections)).transport
            if proto.writing_paused:
                break
        assert not proto.reading and proto.writing_paused
        got = [await peer.recv() for _ in range(n)]  # reading again, the rest is served
        assert [ref for ref, _ in got] == list(range(1, n + 1))
        assert all(isinstance(msg, m.Pong) and msg.ts_ms == ref - 1 for ref, msg in got)
        peer.writer.close()
        server.close()

    run(main())


async def logged_in_peer():
    """A gate, its listener, and a Peer logged in as alice."""
    gate, server, port = await start_gate()
    peer = await Peer().connect(port)
    peer.send([m.Login(user="alice", password="pw")])
    while not gate.backend.pending:
        await asyncio.sleep(0.005)
    _, origin, msg, cb = gate.backend.pending.pop()
    cb(reply_for(msg, origin, "ok"))
    assert isinstance((await peer.recv())[1], m.LoginOk)
    return gate, server, peer


def test_frames_read_at_max_pending_are_served_once_replies_drain():
    async def main():
        gate, server, peer = await logged_in_peer()
        # Reads (a Sync would be served one at a time anyway), in one write, read at once.
        peer.send([m.Read(peer="bob", msg_id=i + 1) for i in range(10)], first_ref=2)
        answered = []
        while len(answered) < 10:
            await asyncio.sleep(0.005)
            # Never more than max_pending_requests with the back end at once;
            # the client sends nothing more, the rest must come from the buffer.
            assert len(gate.backend.pending) <= CFG.limits.max_pending_requests
            while gate.backend.pending:
                _, origin, msg, cb = gate.backend.pending.pop(0)
                cb(reply_for(msg, origin, "ok"))
                answered.append(msg)
        refs = sorted([(await peer.recv())[0] for _ in range(10)])
        assert refs == list(range(2, 12))
        peer.writer.close()
        server.close()

    run(main())


def test_syncs_are_read_one_at_a_time():
    async def main():
        gate, server, peer = await logged_in_peer()
        peer.send([m.Sync(), m.Sync(), m.Ping(ts_ms=7)], first_ref=2)  # one write
        for ref in (2, 3):
            while not gate.backend.pending:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)  # time to read the next one, were it reading
            assert len(gate.backend.pending) == 1
            _, origin, msg, cb = gate.backend.pending.pop()
            assert isinstance(msg, m.Sync)
            cb(reply_for(msg, origin, "ok"))
            got_ref, batch = await peer.recv()
            assert got_ref == ref and isinstance(batch, m.Batch)
        got_ref, pong = await peer.recv()
        assert got_ref == 4 and isinstance(pong, m.Pong)
        peer.writer.close()
        server.close()

    run(main())


class RecordingTransport(asyncio.Transport):
    """What GateProtocol hands its transport, write by write."""

    def __init__(self):
        super().__init__()
        self.writes = []
        self.closing = False

    def get_extra_info(self, name, default=None):
        return ("10.0.0.1", 4000) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_write_buffer_size(self):
        return 0

    def write(self, data):
        self.writes.append(bytes(data))

    def is_closing(self):
        return self.closing

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def feed(proto, data: bytes) -> None:
    buf = proto.get_buffer(len(data))
    buf[:len(data)] = data
    proto.buffer_updated(len(data))


def test_replies_and_pushes_of_one_turn_go_out_in_one_write():
    async def main():
        gate, server, _ = await start_gate()
        server.close()
        proto = gate_tcp.GateProtocol(gate, gate_tcp.Flusher(asyncio.get_running_loop()))
        transport = RecordingTransport()
        proto.connection_made(transport)
        hs = ClientHandshake(GATE_PK, codecs=(1,))
        feed(proto, encode_frame(hs.hello()))
        await asyncio.sleep(0)
        assert len(transport.writes) == 1  # WELCOME and Ready together
        welcome, ready = FrameDecoder(1 << 20).feed(transport.writes[0])
        hs.receive_welcome(welcome)
        assert isinstance(BIN.decode(hs.receiver.open(ready)[0])[1], m.Ready)
        feed(proto, encode_frame(hs.sender.header))
        feed(proto, b"".join(encode_frame(hs.sender.seal(BIN.encode(m.Ping(ts_ms=i), i + 1))) for i in range(5)))
        feed(proto, encode_frame(hs.sender.seal(BIN.encode(m.Login(user="alice", password="pw"), 9))))
        _, origin, msg, cb = gate.backend.pending.pop()
        cb(reply_for(msg, origin, "ok"))
        gate.fanout.on_notification(b"alice\0", b"", BIN.encode(
            m.NewMsg(msg=m.Msg(msg_id=1, seq=4, sender="bob", to="alice", body=b"hi")), 0))
        assert len(transport.writes) == 1  # nothing yet: at the end of the turn
        await asyncio.sleep(0)
        assert len(transport.writes) == 2
        frames = FrameDecoder(1 << 20).feed(transport.writes[1])
        got = [BIN.decode(hs.receiver.open(f)[0]) for f in frames]
        assert [type(msg).__name__ for _, msg in got] == ["Pong"] * 5 + ["LoginOk", "NewMsg"]
        proto.connection_lost(None)
        assert not gate.connections and not gate.fanout.sessions

    run(main())
