"""CURVE and ZAP on a real broker: the right keys work, and a key the broker
does not know (or a key of the wrong role) cannot register as a worker, send
as a gate, subscribe to notifications, read the broker state or inject
notifications. Then a whole region: `up` makes the keys and everything runs
on them; with [bus] curve = false a plain socket gets in.

A refused client never completes its handshake; the client's socket monitor
reports HANDSHAKE_FAILED_AUTH with the ZAP status 400, which is how each
refusal is observed without waiting for something not to happen."""

from __future__ import annotations

import json
import logging
import queue
import stat
import threading
import time
import urllib.request

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from simzmq import bus, keys, mdp
from simzmq.envelope import pack_notice, unpack_notice, unpack_stamp
from simzmq.mdpworker import WorkerSession
from tests.brokerthread import ANY, BrokerThread
from tests.region import Region, free_ports

HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class SecureBroker(BrokerThread):
    """A Broker serving in a thread, CURVE on, its ZAP handler in its own context."""

    def __init__(self, data_dir, **kw):
        self.context = zmq.Context()
        self.bus = bus.start_broker_bus(self.context, data_dir)
        kw.setdefault("state_pub", ANY)
        kw.setdefault("heartbeat_ms", 250)
        kw.setdefault("peer_heartbeat_ms", 100)
        super().__init__(context=self.context, configure_socket=self.bus.configure_socket,
                         auth_counts=self.bus.zap.counts, **kw)

    def stop(self):
        super().stop()
        self.bus.zap.stop()
        self.context.destroy(0)


class EchoWorker:
    """An im worker with the worker key in a thread: answers every request
    with its last body frame prefixed by "echo:", and keeps what it got."""

    def __init__(self, data, endpoint):
        self.data = data
        self.endpoint = endpoint
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(10)

    def _run(self):
        ctx = zmq.Context()
        session = WorkerSession(ctx, self.endpoint, "im", credit=64, heartbeat_interval=0.25,
                                configure_socket=lambda s: role(self.data, "worker")(s, "backend"))
        self.identity = session.identity
        self.started.set()
        try:
            while not self.stopping.is_set():
                session.socket.poll(20)
                for request in session.recv_requests(time.monotonic()):
                    self.requests.put(request.body)
                    session.reply(request, [request.body[1], b"echo:" + request.body[-1]])
                session.tick(time.monotonic())
        finally:
            session.close()
            ctx.destroy(0)

    def stop(self):
        self.stopping.set()
        self.thread.join(5)


@pytest.fixture
def data(tmp_path):
    keys.ensure_bus_keys(tmp_path)
    return tmp_path


@pytest.fixture
def broker(data):
    b = SecureBroker(data)
    yield b
    b.stop()


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(0)


def role(data, name):
    return bus.client_configurator(bus.load_keys(data, name))


def stranger(data):
    """A client with a key nobody listed, that knows the broker's public key."""
    public, secret = zmq.curve_keypair()
    return bus.client_configurator(bus.BusKeys("stranger", public, secret, keys.load_bus_public(data, "broker")))


def connect(ctx, kind, endpoint, configure=None, subscribe=None, identity=None):
    """Connect a socket and wait for its handshake: (socket, event, value)."""
    sock = ctx.socket(kind)
    sock.linger = 0
    if identity is not None:
        sock.identity = identity
    if configure is not None:
        configure(sock, "")
    if subscribe is not None:
        sock.setsockopt(zmq.SUBSCRIBE, subscribe)
    mon = sock.get_monitor_socket(HANDSHAKE_EVENTS)
    try:
        sock.connect(endpoint)
        if not mon.poll(10_000):
            raise TimeoutError(f"no handshake with {endpoint}")
        event = recv_monitor_message(mon)
    finally:
        sock.disable_monitor()
        mon.close(0)
    return sock, event["event"], int(event["value"])


def send_anyway(sock, frames):
    """Send without blocking: a socket that never connected may refuse to queue."""
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        pass


def drain(q):
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def refused(event, value):
    return event == zmq.EVENT_HANDSHAKE_FAILED_AUTH and value == 400


def recv(sock, timeout_ms=10_000):
    if not sock.poll(timeout_ms):
        raise TimeoutError("nothing received")
    return sock.recv_multipart()


def read_state(sock):
    while True:
        frames = recv(sock)
        if frames[0] == b"state":
            return json.loads(frames[1])


def state_until(sock, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        status = read_state(sock)
        if predicate(status) or time.monotonic() > deadline:
            return status


@pytest.mark.timeout(60)
def test_the_right_keys_work_on_every_socket(broker, data, ctx):
    ep = broker.ep
    ops, event, _ = connect(ctx, zmq.SUB, ep["state_pub"], role(data, "ops"), subscribe=b"state")
    assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED
    worker = EchoWorker(data, ep["backend"])
    status = state_until(ops, lambda s: len(s["workers"]) == 1)
    assert [w["identity"] for w in status["workers"]] == [worker.identity.hex()]

    gate, event, _ = connect(ctx, zmq.DEALER, ep["frontend"], role(data, "gate"))
    assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED
    gate.send_multipart(mdp.build_client_request(b"im", [b"alice", b"corr0001", b"", b"payload"]))
    assert mdp.parse_client_reply(recv(gate)) == (b"im", [b"corr0001", b"echo:payload"])
    assert worker.requests.get(timeout=5) == [b"alice", b"corr0001", b"", b"payload"]

    sub, event, _ = connect(ctx, zmq.SUB, ep["notify_out"], role(data, "gate"), subscribe=b"alice\0")
    assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED
    pub, event, _ = connect(ctx, zmq.PUB, ep["notify_in"], role(data, "worker"))
    assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED
    # The subscription travels upstream to the PUB; publish until it arrives.
    while not sub.poll(50):
        pub.send_multipart([b"alice\0", pack_notice(b"", b"hello")])
    topic, _stamp, notice = sub.recv_multipart()
    assert (topic, unpack_notice(notice)) == (b"alice\0", (b"", b"hello"))

    status = read_state(ops)
    assert status["curve"] is True
    for socket_name in ("frontend", "backend", "notify_in", "notify_out", "state_pub"):
        assert status["auth"]["accepted"][socket_name] >= 1, status["auth"]
        assert status["auth"]["refused"][socket_name] == 0
    worker.stop()


@pytest.mark.timeout(60)
def test_an_unknown_key_cannot_register_as_a_worker(broker, data, ctx, caplog):
    ep = broker.ep
    ops, _, _ = connect(ctx, zmq.SUB, ep["state_pub"], role(data, "ops"), subscribe=b"state")
    with caplog.at_level(logging.WARNING, logger="simzmq.bus"):
        rogue, event, value = connect(ctx, zmq.DEALER, ep["backend"], stranger(data), identity=b"rogue-worker")
        assert refused(event, value)
        # A gate's key is known, but not as a worker's.
        wrong_role, event, value = connect(ctx, zmq.DEALER, ep["backend"], role(data, "gate"), identity=b"gate-as-w")
        assert refused(event, value)
    # Without CURVE at all the handshake cannot even start.
    plain, event, _ = connect(ctx, zmq.DEALER, ep["backend"])
    assert event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    for sock in (rogue, wrong_role, plain):
        send_anyway(sock, mdp.build_ready(b"im", 8))
    # Then the real worker registers, and it is the only one the broker has.
    worker = EchoWorker(data, ep["backend"])
    status = state_until(ops, lambda s: len(s["workers"]) >= 1)
    assert [w["identity"] for w in status["workers"]] == [worker.identity.hex()]
    assert status["auth"]["refused"]["backend"] >= 2
    lines = [r.getMessage() for r in caplog.records if r.name == "simzmq.bus"]
    assert any("refused a CURVE client on backend from 127.0.0.1: unknown key" in line for line in lines), lines
    assert any("a gate key; backend accepts worker keys only" in line for line in lines), lines
    worker.stop()


@pytest.mark.timeout(60)
def test_an_unknown_key_cannot_send_as_a_gate(broker, data, ctx):
    ep = broker.ep
    ops, _, _ = connect(ctx, zmq.SUB, ep["state_pub"], role(data, "ops"), subscribe=b"state")
    worker = EchoWorker(data, ep["backend"])
    state_until(ops, lambda s: len(s["workers"]) == 1)
    rogue, event, value = connect(ctx, zmq.DEALER, ep["frontend"], stranger(data))
    assert refused(event, value)
    wrong_role, event, value = connect(ctx, zmq.DEALER, ep["frontend"], role(data, "worker"))
    assert refused(event, value)
    for sock in (rogue, wrong_role):
        for i in range(20):
            send_anyway(sock, mdp.build_client_request(b"im", [b"victim", b"roguecor", b"", b"x%d" % i]))
            send_anyway(sock, mdp.build_client_request(mdp.MMI_SERVICE, [b"im"]))
    gate, event, _ = connect(ctx, zmq.DEALER, ep["frontend"], role(data, "gate"))
    assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED
    gate.send_multipart(mdp.build_client_request(b"im", [b"victim", b"realcorr", b"", b"marker"]))
    assert mdp.parse_client_reply(recv(gate))[1] == [b"realcorr", b"echo:marker"]
    # The worker got the gate's request and nothing of the others'; they were
    # never in the broker at all: it counted one request from one gate.
    assert drain(worker.requests) == [[b"victim", b"realcorr", b"", b"marker"]]
    status = read_state(ops)
    assert status["requests_total"] == 1 and status["gates"] == 1
    assert status["auth"]["refused"]["frontend"] >= 2
    # Nothing ever comes back to the refused clients (not even MMI answers):
    # with no connection there is no way back.
    assert rogue.poll(0) == 0 and wrong_role.poll(0) == 0
    worker.stop()


@pytest.mark.timeout(60)
def test_an_unknown_key_gets_no_notifications_and_no_state(broker, data, ctx):
    ep = broker.ep
    rogue_sub, event, value = connect(ctx, zmq.SUB, ep["notify_out"], stranger(data), subscribe=b"")
    assert refused(event, value)
    ops_sub, event, value = connect(ctx, zmq.SUB, ep["notify_out"], role(data, "ops"), subscribe=b"")
    assert refused(event, value)
    rogue_state, event, value = connect(ctx, zmq.SUB, ep["state_pub"], stranger(data), subscribe=b"")
    assert refused(event, value)
    gate_state, event, value = connect(ctx, zmq.SUB, ep["state_pub"], role(data, "gate"), subscribe=b"")
    assert refused(event, value)

    gate, _, _ = connect(ctx, zmq.SUB, ep["notify_out"], role(data, "gate"), subscribe=b"")
    ops, event, _ = connect(ctx, zmq.SUB, ep["state_pub"], role(data, "ops"), subscribe=b"")
    assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED
    pub, _, _ = connect(ctx, zmq.PUB, ep["notify_in"], role(data, "worker"))
    received = 0
    while received < 5:
        pub.send_multipart([b"bob\0", pack_notice(b"", b"secret message")])
        if gate.poll(50):
            frames = gate.recv_multipart()
            assert frames[0] == b"bob\0" and unpack_notice(frames[-1])[1] == b"secret message"
            received += 1
    read_state(ops)
    read_state(ops)
    # The refused subscribers were connected all along and got nothing.
    for sock in (rogue_sub, ops_sub, rogue_state, gate_state):
        assert sock.poll(0) == 0
    status = read_state(ops)
    assert status["auth"]["refused"]["notify_out"] >= 2 and status["auth"]["refused"]["state_pub"] >= 2


@pytest.mark.timeout(60)
def test_an_unknown_key_cannot_inject_notifications(broker, data, ctx):
    ep = broker.ep
    gate, _, _ = connect(ctx, zmq.SUB, ep["notify_out"], role(data, "gate"), subscribe=b"carol\0")
    rogue, event, value = connect(ctx, zmq.PUB, ep["notify_in"], stranger(data))
    assert refused(event, value)
    gate_pub, event, value = connect(ctx, zmq.PUB, ep["notify_in"], role(data, "gate"))
    assert refused(event, value)
    worker, event, _ = connect(ctx, zmq.PUB, ep["notify_in"], role(data, "worker"))
    assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED
    got = []
    while len(got) < 10:
        # The forgeries go out interleaved with the real ones; had either
        # connection been let in, some would arrive among them.
        send_anyway(rogue, [b"carol\0", pack_notice(b"", b"forged by a stranger")])
        send_anyway(gate_pub, [b"carol\0", pack_notice(b"", b"forged by a gate")])
        worker.send_multipart([b"carol\0", pack_notice(b"", b"real")])
        if gate.poll(50):
            while gate.poll(0):
                got.append(gate.recv_multipart())
    assert {unpack_notice(frames[-1])[1] for frames in got} == {b"real"}
    # The broker numbered only the real ones: seqs run 1, 2, 3 … without holes.
    seqs = [unpack_stamp(frames[1])[1] for frames in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


@pytest.mark.timeout(60)
def test_reloaded_allow_lists_admit_new_keys_and_drop_removed_ones(broker, data, ctx):
    ep = broker.ep
    public, secret = zmq.curve_keypair()
    second_gate = bus.client_configurator(bus.BusKeys("gate", public, secret, keys.load_bus_public(data, "broker")))
    sock, event, value = connect(ctx, zmq.DEALER, ep["frontend"], second_gate)
    assert refused(event, value)
    sock.close(0)
    allowed = keys.allow_dir(data, "gate") / "gate-b.key"
    allowed.write_text(keys.curve_cert_text("gate", public))
    bus.reload_policy(broker.bus.zap, data)
    sock, event, _ = connect(ctx, zmq.DEALER, ep["frontend"], second_gate)
    assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED
    sock.close(0)
    allowed.unlink()
    bus.reload_policy(broker.bus.zap, data)
    sock, event, value = connect(ctx, zmq.DEALER, ep["frontend"], second_gate)
    assert refused(event, value)


@pytest.mark.timeout(60)
def test_a_pair_of_brokers_reads_each_others_state_with_the_broker_key(data, ctx):
    p_state, b_state = (f"tcp://127.0.0.1:{port}" for port in free_ports(2))
    primary = SecureBroker(data, role="primary", state_pub=p_state, peer_state=b_state)
    backup = SecureBroker(data, role="backup", state_pub=b_state, peer_state=p_state)
    try:
        ops, _, _ = connect(ctx, zmq.SUB, backup.ep["state_pub"], role(data, "ops"), subscribe=b"state")
        status = state_until(ops, lambda s: s["state"] == "passive" and s["peer_state"] == "active")
        assert (status["role"], status["state"], status["peer_state"]) == ("backup", "passive", "active")
        assert status["peer_heard_ago"] is not None
    finally:
        primary.stop()
        backup.stop()


# --- a whole region -----------------------------------------------------------------


def region_endpoints(region):
    env = region.env
    return {name: env[f"SIMZMQ_BROKER_PRIMARY_{name.upper()}"]
            for name in ("frontend", "backend", "notify_in", "notify_out", "state")}


@pytest.mark.timeout(120)
def test_a_region_runs_on_the_keys_up_made_and_refuses_strangers(tmp_path, ctx):
    with Region(tmp_path / "data") as region:
        data = region.data_dir
        d = data / "keys" / "bus"
        for name in ("broker", "gate", "worker", "ops"):
            assert stat.S_IMODE((d / f"{name}.key_secret").stat().st_mode) == 0o600
            assert (d / f"{name}.key").exists()
        assert "bus CURVE is off" not in region.read_log()
        ep = region_endpoints(region)
        for name in ("frontend", "backend", "notify_in", "notify_out", "state"):
            kind = {"frontend": zmq.DEALER, "backend": zmq.DEALER, "notify_in": zmq.PUB}.get(name, zmq.SUB)
            sock, event, value = connect(ctx, kind, ep[name], stranger(data))
            assert refused(event, value), name
            sock.close(0)
        ops, event, _ = connect(ctx, zmq.SUB, ep["state"], role(data, "ops"), subscribe=b"state")
        status = state_until(ops, lambda s: len(s["workers"]) == 1 and s["gates"] >= 1)
        assert status["state"] == "active" and status["curve"] is True
        assert status["auth"]["refused"]["backend"] >= 1
        # The refusals are in the broker's metrics too (read when scraped).
        url = f"http://127.0.0.1:{region.env['SIMZMQ_BROKER_PRIMARY_METRICS_PORT']}/metrics"
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(url, timeout=5) as r:
                metrics = r.read().decode()
            refusals = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("simzmq_broker_auth_refusals_total{")}
            if len(refusals) == 5 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert set(refusals) == {f'socket="{name}"' for name in
                                 ("frontend", "backend", "notify_in", "notify_out", "state_pub")}, refusals
        assert min(refusals.values()) >= 1, refusals
        assert "simzmq_broker_failovers_total 0.0" in metrics
        assert "simzmq_broker_active 1.0" in metrics
    assert "refused a CURVE client on backend" in region.read_log()


@pytest.mark.timeout(120)
def test_curve_off_lets_a_plain_socket_in(tmp_path, ctx):
    with Region(tmp_path / "data", extra_env={"SIMZMQ_BUS_CURVE": "false"}) as region:
        sock, event, _ = connect(ctx, zmq.SUB, region_endpoints(region)["state"], subscribe=b"state")
        assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED
        status = read_state(sock)
        assert status["curve"] is False and "auth" not in status
    assert "bus CURVE is off" in region.read_log()


@pytest.mark.timeout(60)
def test_keys_makes_and_lists_the_role_keys(tmp_path):
    import subprocess
    import sys

    from tests.region import ROOT

    def run():
        out = subprocess.run([sys.executable, "-m", "simzmq", "keys", "--data", str(tmp_path)],
                             capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        assert out.returncode == 0, out.stderr
        return out.stdout

    first = run()
    publics = {name: keys.load_bus_public(tmp_path, name) for name in ("broker", "gate", "worker", "ops")}
    for name, public in publics.items():
        assert f"{name:<7} {public.decode()}  ({tmp_path / 'keys' / 'bus' / f'{name}.key'})" in first
    assert "secret" not in first.replace("the secrets are in the .key_secret files", "")
    # Another gate's key, dropped into the gate allow-list, is listed too.
    extra, _ = zmq.curve_keypair()
    (keys.allow_dir(tmp_path, "gate") / "gate-b.key").write_text(keys.curve_cert_text("gate", extra))
    second = run()
    assert f"gate    {extra.decode()}  ({keys.allow_dir(tmp_path, 'gate') / 'gate-b.key'})" in second
    # Nothing was remade.
    assert {name: keys.load_bus_public(tmp_path, name) for name in publics} == publics
    assert set(first.splitlines()) < set(second.splitlines())
