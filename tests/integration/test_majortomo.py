"""A third party's Majordomo v0.2: majortomo's own Worker and Client (the
MDP v0.2 library on PyPI, spec 18) through a real region (`simzmq up`, CURVE
on), next to the IM service and to 7/MDP clients and workers.

majortomo makes its DEALER socket and connects it in one step, with no hook
for socket options in between. A ZeroMQ context applies its default socket
options to every socket it makes, so each majortomo object gets a context
whose defaults are the CURVE keys of its role (worker on the backend, gate on
the frontend): the keys are set before the connect, and nothing of majortomo
is patched or subclassed.

majortomo 0.2.0's Client does not number its commands as spec 18 does (it
uses the worker's numbers: REQUEST 0x02, PARTIAL 0x03, FINAL 0x04) and takes
replies without the service frame, as majortomo's broker sends them; the
broker answers each client in the numbering its request came in, so these
parts are bodies alone."""

from __future__ import annotations

import threading
import time

import pytest
import zmq
from majortomo.client import Client as MajortomoClient
from majortomo.worker import Worker as MajortomoWorker

from simzmq import bus, mdp
from simzmq.mdpworker import WorkerSession
from simzmq.wire import messages as m
from tests.integration.test_flows import fresh, next_event, run, user
from tests.region import Region

pytestmark = pytest.mark.timeout(120)


def endpoint(region, name):
    return region.env[f"SIMZMQ_BROKER_PRIMARY_{name.upper()}"]


def role_context(region, role):
    """A context whose sockets are CURVE clients with ``role``'s key."""
    keys = bus.load_keys(region.data_dir, role)
    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    ctx.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    ctx.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    ctx.setsockopt(zmq.CURVE_SERVERKEY, keys.server)
    return ctx


class EchoWorker:
    """majortomo's Worker serving ``echo`` in a thread: ``stream n`` is
    answered with n PARTIALs and a FINAL ``end``, ``quit`` with a FINAL, after
    which it says DISCONNECT and stops; anything else is echoed in a FINAL."""

    def __init__(self, region):
        self.ctx = role_context(region, "worker")
        self.worker = MajortomoWorker(endpoint(region, "backend"), "echo", heartbeat_interval=0.1,
                                      heartbeat_timeout=5.0, zmq_context=self.ctx, zmq_linger=0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        worker = self.worker
        worker.connect()
        while True:
            client, body = worker.wait_for_request()
            if body[0] == b"stream":
                for i in range(int(body[1])):
                    worker.send_reply_partial(client, [b"part %d" % i])
                worker.send_reply_final(client, [b"end"])
            elif body[0] == b"quit":
                worker.send_reply_final(client, [b"bye"])
                worker.close()
                return
            else:
                worker.send_reply_final(client, body)


class Echo7Worker:
    """simzmq's own 7/MDP worker session serving ``echo7`` in a thread."""

    def __init__(self, region):
        self.stopping = threading.Event()
        self.ctx = zmq.Context()
        configure = bus.client_configurator(bus.load_keys(region.data_dir, "worker"))
        self.session = WorkerSession(self.ctx, endpoint(region, "backend"), "echo7",
                                     configure_socket=lambda sock: configure(sock, "backend"))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        session = self.session
        try:
            while not self.stopping.is_set():
                session.socket.poll(20)
                for request in session.recv_requests(time.monotonic()):
                    session.reply(request, [b"seven:" + request.body[-1]])
                session.tick(time.monotonic())
        finally:
            session.close()

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
        self.ctx.destroy(0)


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    r = Region(tmp_path_factory.mktemp("majortomo") / "data")
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def echo(region):
    worker = EchoWorker(region)
    client = MajortomoClient(endpoint(region, "frontend"), zmq_context=role_context(region, "gate"), zmq_linger=0)
    client.connect()
    wait_for_service(client, b"echo")
    yield client
    client.send(b"echo", b"quit")
    assert list(client.recv_all(timeout=10)) == [[b"bye"]]
    worker.thread.join(10)
    client.close()
    client._zmq_context.destroy(0)
    worker.ctx.destroy(0)


def wait_for_service(client, service, timeout=15.0):
    """Ask MMI (over v0.2) until a worker serves ``service``."""
    end = time.monotonic() + timeout
    while True:
        client.send(b"mmi.service", service)
        (answer,) = list(client.recv_all(timeout=10))
        if answer == [b"200"]:
            return
        assert answer == [b"404"]
        assert time.monotonic() < end, f"no worker for {service!r}"
        time.sleep(0.05)


def test_majortomo_client_gets_the_final_reply(echo, region):
    echo.send(b"echo", b"hello", b"")
    assert list(echo.recv_all(timeout=10)) == [[b"hello", b""]]
    assert "ready for b'echo' in 18/MDP" in region.read_log()


def test_partial_replies_stream_then_the_final(echo):
    echo.send(b"echo", b"stream", b"3")
    parts = list(echo.recv_all(timeout=10))
    assert parts == [[b"part 0"], [b"part 1"], [b"part 2"], [b"end"]]
    # The request is complete: the next one is served by the same one-at-a-time worker.
    echo.send(b"echo", b"again")
    assert list(echo.recv_all(timeout=10)) == [[b"again"]]


def test_im_keeps_working_next_to_the_v2_service(echo, region):
    async def main():
        a, b = fresh("mt-a"), fresh("mt-b")
        alice = await user(region, a)
        bob = await user(region, b)
        ok = await alice.send(b, b"hello through the same broker")
        pushed = await next_event(bob, m.NewMsg)
        assert pushed.msg.msg_id == ok.msg_id and pushed.msg.body == b"hello through the same broker"
        await alice.close()
        await bob.close()
    run(main())
    echo.send(b"echo", b"still here")
    assert list(echo.recv_all(timeout=10)) == [[b"still here"]]


def test_7mdp_client_and_worker_alongside(echo, region):
    ctx = role_context(region, "gate")
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(endpoint(region, "frontend"))
        # A 7/MDP client of the v0.2 worker gets its one reply, the FINAL:
        # it has no way to take the PARTIALs.
        dealer.send_multipart(mdp.build_client_request(b"echo", [b"stream", b"2"]))
        assert dealer.poll(10_000)
        assert mdp.parse_client_reply(dealer.recv_multipart()) == (b"echo", [b"end"])
        assert not dealer.poll(200)
        # A 7/MDP worker serves the majortomo client, which gets a FINAL.
        seven = Echo7Worker(region)
        try:
            wait_for_service(echo, b"echo7")
            echo.send(b"echo7", b"hi")
            assert list(echo.recv_all(timeout=10)) == [[b"seven:hi"]]
            dealer.send_multipart(mdp.build_client_request(b"echo7", [b"plain"]))
            assert dealer.poll(10_000)
            assert mdp.parse_client_reply(dealer.recv_multipart()) == (b"echo7", [b"seven:plain"])
        finally:
            seven.stop()
    finally:
        ctx.destroy(0)


def test_a_dropped_message_is_logged_with_its_reason(region):
    ctx = role_context(region, "gate")
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(endpoint(region, "frontend"))
        dealer.send_multipart([b"", b"MDPC02", b"\x04", b"echo", b"a client never sends FINAL"])
        expected = "dropped a client message from "
        end = time.monotonic() + 10
        while not any(expected in line and "unknown command" in line for line in region.read_log().splitlines()):
            assert time.monotonic() < end, region.read_log()[-2000:]
            time.sleep(0.05)
    finally:
        ctx.destroy(0)
