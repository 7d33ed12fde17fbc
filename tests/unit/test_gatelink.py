"""The link's shell against a stand-in broker (a ROUTER on 127.0.0.1): a
callback that raises does not stop the link."""

import asyncio
import dataclasses
import time

import pytest
import zmq

from simzmq import mdp
from simzmq.envelope import pack_reply, unpack_request
from simzmq.gatelink import Backend, BrokerEndpoints
from tests.configs import defaults


class FakeBroker:
    """Answers mmi.* probes; answers `im` requests only when told to."""

    def __init__(self, ctx):
        self.router = ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.xpub = ctx.socket(zmq.XPUB)
        self.xpub.linger = 0
        pub_port = self.xpub.bind_to_random_port("tcp://127.0.0.1")
        self.endpoints = BrokerEndpoints("fake", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{pub_port}")
        self.requests = []  # (identity, service frame, corr)

    def serve(self):
        while self.router.poll(0):
            frames = self.router.recv_multipart()
            identity, rest = frames[0], frames[1:]
            batched, service, body = mdp.parse_client_message(rest)
            if service.startswith(mdp.MMI_PREFIX):
                self.router.send_multipart([identity, *mdp.build_client_reply(service, [mdp.MMI_FOUND])])
                continue
            for i in range(0, len(body), 2):
                self.requests.append((identity, batched, unpack_request(body[i + 1])[0]))

    def answer(self, identity, corr, payload):
        self.router.send_multipart([identity, *mdp.build_client_reply(b"im", [pack_reply(corr, payload)])])


@pytest.mark.timeout(20)
def test_a_raising_reply_callback_does_not_stop_the_link():
    ctx = zmq.Context()
    broker = FakeBroker(ctx)
    got = []

    def raising(payload):
        got.append(("raising", payload))
        raise RuntimeError("a bug in a reply callback")

    async def scenario():
        cfg = dataclasses.replace(defaults().gate, request_timeout_s=0.5, probe_interval_ms=50, failover_after_ms=300)
        backend = Backend(ctx, [broker.endpoints], cfg, on_notification=lambda *a: None, on_resync=lambda user: None)
        backend.start()
        try:
            backend.request(b"ann", b"", b"first", raising)
            while not broker.requests:
                broker.serve()
                await asyncio.sleep(0.01)
            identity, _, corr = broker.requests[0]
            broker.answer(identity, corr, b"reply")
            # The reply is read by the tick itself (it drains before judging
            # the broker), so the raising callback runs inside the tick.
            time.sleep(0.2)
            backend._tick()
            while not got:
                broker.serve()
                await asyncio.sleep(0.01)
            # The link still ticks: an unanswered request times out, and the
            # broker's answers keep it reachable.
            backend.request(b"bob", b"", b"second", lambda payload: got.append(("second", payload)))
            for _ in range(300):
                broker.serve()
                if len(got) == 2:
                    break
                await asyncio.sleep(0.01)
            assert backend.reachable(asyncio.get_running_loop().time())
        finally:
            backend.close()

    try:
        asyncio.run(scenario())
    finally:
        ctx.destroy(linger=0)
    assert got == [("raising", b"reply"), ("second", None)]
    # Once the broker answered mmi.batch, requests of a turn went as a batch.
    assert broker.requests[-1][1] is True
