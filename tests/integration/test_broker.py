"""A real Broker on 127.0.0.1 with real DEALER clients and workers."""

import socket
import threading
import time

import pytest
import zmq

from simzmq import mdp
from simzmq.envelope import pack_notice, unpack_notice, unpack_stamp
from simzmq.broker import parse_state_message
from simzmq.bstar import DualActive, State
from simzmq.mdpworker import WorkerGroup
from tests.brokerthread import ANY, BrokerThread



class Running(BrokerThread):
    """A Broker serving in a thread, with fast heartbeats."""

    def __init__(self, ctx, **kw):
        kw.setdefault("heartbeat_ms", 50)
        # A broker whose thread dies at start says so at once.
        super().__init__(start_timeout=5, context=ctx, **kw)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def broker(ctx):
    running = Running(ctx)
    yield running
    running.stop()


def client(ctx, endpoint):
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    return sock


def recv(sock, timeout_ms=5000):
    if not sock.poll(timeout_ms):
        raise TimeoutError("nothing received")
    return sock.recv_multipart()


def call(sock, service, body, timeout_ms=5000):
    sock.send_multipart(mdp.build_client_request(service, body))
    return mdp.parse_client_reply(recv(sock, timeout_ms))


def wait_for_worker(ctx, endpoint, service, deadline=5.0):
    """mmi.service until the broker knows a worker for the service."""
    sock = client(ctx, endpoint)
    try:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if call(sock, b"mmi.service", [service])[1] == [b"200"]:
                return
            time.sleep(0.02)
        raise TimeoutError(f"no worker for {service!r}")
    finally:
        sock.close()


class ServingThread:
    """Serve a WorkerGroup in a thread; replies with a tag and the body."""

    def __init__(self, group, tag):
        self.group = group
        self.tag = tag
        self.running = True
        self.served = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.running:
            for request in self.group.poll(20):
                self.served.append(request.body)
                self.group.reply(request, [self.tag, *request.body])
        self.group.close()

    def stop(self):
        self.running = False
        self.thread.join(5)


@pytest.mark.timeout(20)
def test_plain_mdp_worker_round_trip(ctx, broker):
    """A third-party-style worker: raw DEALER, READY without credit frame."""
    worker = client(ctx, broker.ep["backend"])
    worker.send_multipart([b"", mdp.W_WORKER, mdp.READY, b"echo"])
    wait_for_worker(ctx, broker.ep["frontend"], b"echo")
    gate = client(ctx, broker.ep["frontend"])
    gate.send_multipart(mdp.build_client_request(b"echo", [b"hello", b"there"]))
    while True:
        frames = recv(worker)
        cmd = mdp.parse_broker_message(frames)
        if cmd.command == mdp.REQUEST:
            break
    assert cmd.body == [b"hello", b"there"]
    worker.send_multipart(mdp.build_reply(cmd.client, [b"HELLO"]))
    assert mdp.parse_client_reply(recv(gate)) == (b"echo", [b"HELLO"])
    assert call(gate, b"mmi.service", [b"nobody"]) == (b"mmi.service", [b"404"])
    assert call(gate, b"mmi.whatever", []) == (b"mmi.whatever", [b"501"])
    worker.close()
    gate.close()


@pytest.mark.timeout(30)
def test_two_workers_share_keys_and_every_request_is_answered(ctx, broker):
    a = ServingThread(WorkerGroup([broker.ep["backend"]], "im", credit=16, heartbeat_interval=0.05,
                                  context=ctx), b"a")
    b = ServingThread(WorkerGroup([broker.ep["backend"]], "im", credit=16, heartbeat_interval=0.05,
                                  context=ctx), b"b")
    try:
        gate = client(ctx, broker.ep["frontend"])
        wait_for_workers(broker, 2)
        n = 200
        for i in range(n):
            gate.send_multipart(mdp.build_client_request(b"im", [b"user%d" % (i % 40), b"%d" % i]))
        answered = {}
        for _ in range(n):
            service, body = mdp.parse_client_reply(recv(gate))
            assert service == b"im"
            tag, key, seq = body
            answered.setdefault(key, []).append((tag, int(seq)))
        assert sum(len(v) for v in answered.values()) == n
        tags = {tag for v in answered.values() for tag, _ in v}
        assert tags == {b"a", b"b"}
        for key, replies in answered.items():
            # One worker per key, answered in the order sent.
            assert len({tag for tag, _ in replies}) == 1, key
            seqs = [s for _, s in replies]
            assert seqs == sorted(seqs), key
        gate.close()
    finally:
        a.stop()
        b.stop()


def wait_for_workers(running, count, deadline=5.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end and len(running.broker.core.workers) < count:
        time.sleep(0.02)
    assert len(running.broker.core.workers) >= count


@pytest.mark.timeout(30)
def test_killed_worker_requests_go_to_the_other(ctx):
    # The victim takes requests and never answers, then vanishes without
    # DISCONNECT; the broker must expire it and re-send what it held.
    broker = Running(ctx, heartbeat_ms=200)
    victim = client(ctx, broker.ep["backend"])
    victim.send_multipart(mdp.build_ready(b"im", 100))
    survivor = ServingThread(WorkerGroup([broker.ep["backend"]], "im", credit=100, heartbeat_interval=0.2,
                                         context=ctx), b"survivor")
    try:
        wait_for_workers(broker, 2)
        gate = client(ctx, broker.ep["frontend"])
        n = 60
        for i in range(n):
            gate.send_multipart(mdp.build_client_request(b"im", [b"user%d" % i, b"%d" % i]))
        # Let the victim receive its share, heartbeating so it is not yet expired.
        held = 0
        end = time.monotonic() + 3
        while time.monotonic() < end and held < 5:
            if victim.poll(20):
                cmd = mdp.parse_broker_message(victim.recv_multipart())
                held += cmd.command == mdp.REQUEST
            victim.send_multipart(mdp.build_heartbeat())
        assert held > 0, "rendezvous gave the victim nothing"
        victim.close(linger=0)
        seqs = set()
        for _ in range(n):
            _, body = mdp.parse_client_reply(recv(gate))
            assert body[0] == b"survivor"
            seqs.add(int(body[2]))
        assert seqs == set(range(n))
        assert broker.broker.core.worker_expiries_total == 1
        assert broker.broker.core.requests_requeued_total >= held
        gate.close()
    finally:
        survivor.stop()
        broker.stop()


@pytest.mark.timeout(20)
def test_notifications_forwarded_by_topic(ctx, broker):
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"ann\x00")
    sub.connect(broker.ep["notify_out"])
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.connect(broker.ep["notify_in"])
    received = []
    end = time.monotonic() + 10
    # Subscriptions travel SUB -> XPUB -> XSUB -> PUB; publish until they arrive.
    while time.monotonic() < end and not received:
        pub.send_multipart([b"anna\x00", pack_notice(b"", b"not for ann")])
        pub.send_multipart([b"ann\x00", pack_notice(b"origin", b"for ann")])
        if sub.poll(50):
            received.append(sub.recv_multipart())
    # Forwarded stamped with the broker's epoch and the topic's seq
    # (docs/internal-protocol.md, Notifications).
    (first,) = received
    topic, stamp, notice = first
    assert (topic, unpack_notice(notice)) == (b"ann\x00", (b"origin", b"for ann"))
    epoch, last = unpack_stamp(stamp)
    assert len(epoch) == 8
    while sub.poll(100):
        frames = sub.recv_multipart()
        assert frames[0] == b"ann\x00" and unpack_stamp(frames[1]) == (epoch, last + 1)
        last += 1
    sub.close()
    pub.close()


@pytest.mark.timeout(30)
def test_worker_session_comes_back_after_broker_restart(ctx):
    first = Running(ctx)
    endpoints = dict(first.ep)
    worker = ServingThread(WorkerGroup([endpoints["backend"]], "echo", heartbeat_interval=0.05, context=ctx),
                           b"w")
    try:
        wait_for_worker(ctx, endpoints["frontend"], b"echo")
        first.stop()
        # The first broker's sockets close in ZeroMQ's I/O thread; its ports
        # may take a moment to be free again.
        second = None
        end = time.monotonic() + 5
        while second is None:
            try:
                second = Running(ctx, **{k: endpoints[k] for k in ("frontend", "backend", "notify_in", "notify_out")})
            except RuntimeError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        try:
            wait_for_worker(ctx, endpoints["frontend"], b"echo", deadline=10)
            gate = client(ctx, endpoints["frontend"])
            assert call(gate, b"echo", [b"again"]) == (b"echo", [b"w", b"again"])
            gate.close()
        finally:
            second.stop()
    finally:
        worker.stop()


@pytest.mark.timeout(20)
def test_state_published(ctx):
    running = Running(ctx, state_pub=ANY, peer_heartbeat_ms=50)
    try:
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(running.ep["state_pub"])
        frames = recv(sub)
        assert parse_state_message(frames) is State.ACTIVE
        sub.close()
    finally:
        running.stop()


def _free_port(ctx):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(40)
def test_binary_star_failover(ctx):
    primary_state = f"tcp://127.0.0.1:{_free_port(ctx)}"
    backup_state = f"tcp://127.0.0.1:{_free_port(ctx)}"
    common = dict(peer_heartbeat_ms=100, heartbeat_ms=50)
    primary = Running(ctx, role="primary", state_pub=primary_state, peer_state=backup_state, **common)
    backup = Running(ctx, role="backup", state_pub=backup_state, peer_state=primary_state, **common)
    workers = []
    try:
        for name, running in ((b"p", primary), (b"b", backup)):
            workers.append(ServingThread(WorkerGroup([running.ep["backend"]], "echo", heartbeat_interval=0.05,
                                                     context=ctx), name))
        end = time.monotonic() + 10
        while time.monotonic() < end and not (
                primary.broker.state is State.ACTIVE and backup.broker.state is State.PASSIVE):
            time.sleep(0.02)
        assert primary.broker.state is State.ACTIVE
        assert backup.broker.state is State.PASSIVE
        gate_p = client(ctx, primary.ep["frontend"])
        assert call(gate_p, b"echo", [b"1"]) == (b"echo", [b"p", b"1"])
        # The passive broker drops requests while its peer is alive.
        gate_b = client(ctx, backup.ep["frontend"])
        gate_b.send_multipart(mdp.build_client_request(b"echo", [b"2"]))
        assert not gate_b.poll(300)
        assert backup.broker.state is State.PASSIVE
        # The primary dies; a client request after the peer expiry flips the backup.
        primary.stop()
        answer = None
        end = time.monotonic() + 10
        while time.monotonic() < end and answer is None:
            gate_b.send_multipart(mdp.build_client_request(b"echo", [b"3"]))
            if gate_b.poll(200):
                answer = mdp.parse_client_reply(gate_b.recv_multipart())
        assert answer == (b"echo", [b"b", b"3"])
        assert backup.broker.state is State.ACTIVE
        gate_p.close()
        gate_b.close()
    finally:
        for w in workers:
            w.stop()
        primary.stop()
        backup.stop()
    assert primary.error is None and backup.error is None


def _tell(fake_peer, states, until, end):
    """Publish the fake peer's states over and over until `until()` or `end`."""
    while time.monotonic() < end and not until():
        for state in states:
            fake_peer.send_multipart([b"state", b'{"state": "%s"}' % state.encode()])
        time.sleep(0.02)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("role", ["primary", "backup"])
def test_dual_active_stops_the_backup_only(ctx, role):
    """A peer claiming to be active while we are active stops a backup and
    leaves a primary serving; junk from the peer is never fatal."""
    fake_peer = ctx.socket(zmq.PUB)
    fake_peer.linger = 0
    port = fake_peer.bind_to_random_port("tcp://127.0.0.1")
    running = Running(ctx, role=role, state_pub=ANY, peer_state=f"tcp://127.0.0.1:{port}",
                      peer_heartbeat_ms=50)
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end and running.broker.state is not State.ACTIVE:
            fake_peer.send_multipart([b"state", b"{not json"])
            fake_peer.send_multipart([b"junk"])
            if role == "primary":
                fake_peer.send_multipart([b"state", b'{"state": "backup"}'])
            else:
                # active: the backup stands by; then the peer restarts
                # (primary), so the backup takes over
                first = running.broker.state is State.BACKUP
                fake_peer.send_multipart([b"state", b'{"state": "%s"}' % (b"active" if first else b"primary")])
            time.sleep(0.02)
        assert running.broker.state is State.ACTIVE
        assert running.thread.is_alive()
        _tell(fake_peer, ["active"], lambda: not running.thread.is_alive(), time.monotonic() + 2)
        if role == "primary":
            assert running.thread.is_alive() and running.broker.state is State.ACTIVE
            assert running.error is None
        else:
            running.thread.join(5)
            assert not running.thread.is_alive()
            assert isinstance(running.error, DualActive)
    finally:
        running.stop()
        fake_peer.close()
