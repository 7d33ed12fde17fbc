"""The gate's reader, paused behind a client that reads slowly, always gives
the event loop a turn: a real TcpTransport over a loopback socket with small
buffers, and a reader shaped like GateTCPServer._serve."""

from __future__ import annotations

import asyncio
import socket

import pytest
from tornado.iostream import IOStream

from simzmq import gate as gate_mod
from tests.unit.test_fuzz_gate import GATE_CFG, GATE_SK

CFG = dict(GATE_CFG, limits=dict(GATE_CFG["limits"], pause_reading_bytes=64 * 1024,
                                 slow_consumer_min_bytes=1 << 30, max_outbound_total_bytes=1 << 30))
ROUNDS = 300


@pytest.mark.timeout(60)
def test_reader_paused_behind_never_spins():
    # Regression: when the write in flight completed but its done-callback
    # (which hands the backlog over) had not run yet, flushed() returned at
    # once and the reader, still behind, looped without yielding: the whole
    # gate froze. pytest-timeout's signal ends such a spin as a failure.
    async def main() -> int:
        gate = gate_mod.Gate("t", CFG, GATE_SK, [])
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        client.connect(listener.getsockname())
        client.setblocking(False)
        server_side, _ = listener.accept()
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        server_side.setblocking(False)
        transport = gate_mod.TcpTransport(IOStream(server_side), gate)
        conn = gate_mod.ClientConnection(gate, transport, "peer", "10.0.0.1")
        loop = asyncio.get_running_loop()
        wake = [loop.create_future()]

        def client_reads_a_little():
            try:
                while client.recv(65536):
                    pass
            except BlockingIOError:
                pass
            if not wake[0].done():
                wake[0].set_result(None)
            loop.call_later(0.002, client_reads_a_little)

        loop.call_later(0.002, client_reads_a_little)
        rounds = 0
        while rounds < ROUNDS:
            await wake[0]
            wake[0] = loop.create_future()
            for _ in range(gate_mod.FRAMES_PER_TURN):  # a turn's requests, each answered at once
                transport.write_payloads([b"x" * 3000])
            await asyncio.sleep(0)
            if conn.must_wait():
                await conn.ready_to_read()
            rounds += 1
        conn.connection_lost()
        client.close()
        listener.close()
        return rounds

    assert asyncio.run(main()) == ROUNDS
