"""The bus policy (who may connect to which broker socket), the refusal log,
the bus key files and the socket configurators."""

from __future__ import annotations

import logging
import stat

import pytest
import zmq
import zmq.auth

from simzmq import bus, keys

GATE, WORKER, BROKER, OPS, STRANGER = (zmq.curve_keypair()[0] for _ in range(5))


@pytest.fixture
def policy():
    return bus.BusPolicy({"gate": [GATE], "worker": [WORKER], "broker": [BROKER], "ops": [OPS]})


def test_the_allow_lists_are_the_ones_documented():
    assert bus.SOCKET_ROLES == {
        "frontend": {"gate"},
        "backend": {"worker"},
        "notify_in": {"worker"},
        "notify_out": {"gate", "worker"},
        "state_pub": {"broker", "ops"},
    }


@pytest.mark.parametrize("domain, allowed", [
    ("frontend", {GATE}),
    ("backend", {WORKER}),
    ("notify_in", {WORKER}),
    ("notify_out", {GATE, WORKER}),
    ("state_pub", {BROKER, OPS}),
])
def test_each_socket_admits_its_roles_only(policy, domain, allowed):
    for key in (GATE, WORKER, BROKER, OPS, STRANGER):
        decision = policy.decide(domain, key)
        assert decision.allowed is (key in allowed), (domain, decision)
    assert policy.accepted[domain] == len(allowed)
    assert policy.refused[domain] == 5 - len(allowed)


def test_refusals_say_why(policy):
    unknown = policy.decide("backend", STRANGER)
    assert unknown == bus.Decision(False, None, "unknown key; backend accepts worker keys only")
    wrong_role = policy.decide("backend", GATE)
    assert not wrong_role.allowed and wrong_role.role == "gate"
    assert "a gate key" in wrong_role.reason and "worker" in wrong_role.reason
    accepted = policy.decide("state_pub", OPS)
    assert accepted == bus.Decision(True, "ops", "OK")


def test_an_unknown_domain_admits_nobody(policy):
    for key in (GATE, WORKER, BROKER, OPS):
        assert not policy.decide("", key).allowed
        assert not policy.decide("peer_state", key).allowed
    assert policy.refused_other_domain == 8
    assert sum(policy.refused.values()) == 0


def test_a_key_in_two_roles_is_allowed_where_either_is():
    shared = bus.BusPolicy({"gate": [GATE], "worker": [GATE]})
    for domain in ("frontend", "backend", "notify_in", "notify_out"):
        assert shared.decide(domain, GATE).allowed
    assert not shared.decide("state_pub", GATE).allowed
    assert shared.key_count("gate") == shared.key_count("worker") == 1


def test_several_keys_per_role_and_no_roles_invented():
    second_gate = zmq.curve_keypair()[0]
    p = bus.BusPolicy({"gate": [GATE, second_gate]})
    assert p.decide("frontend", second_gate).allowed and p.decide("frontend", GATE).allowed
    assert not p.decide("backend", second_gate).allowed
    with pytest.raises(ValueError, match="unknown bus roles: admin"):
        bus.BusPolicy({"admin": [GATE]})


def test_refusal_log_first_then_once_per_interval_with_the_count():
    rl = bus.RefusalLog(interval=60.0, limit=3)
    assert rl.should_log("backend", STRANGER, "10.0.0.9", 100.0) == 0
    for t in (100.1, 101.0, 159.9):
        assert rl.should_log("backend", STRANGER, "10.0.0.9", t) is None
    assert rl.should_log("backend", STRANGER, "10.0.0.9", 160.0) == 3
    assert rl.should_log("backend", STRANGER, "10.0.0.9", 161.0) is None
    # Another socket, address or key is another client: logged at once.
    assert rl.should_log("frontend", STRANGER, "10.0.0.9", 161.0) == 0
    assert rl.should_log("backend", STRANGER, "10.0.0.8", 161.0) == 0
    # Bounded: the oldest is forgotten and would be logged again.
    assert rl.should_log("backend", GATE, "10.0.0.9", 161.0) == 0
    assert len(rl.seen) == 3
    assert rl.should_log("backend", STRANGER, "10.0.0.9", 162.0) == 0


def test_zap_callback_asks_the_policy_and_logs_refusals_once(policy, caplog):
    ctx = zmq.Context()
    try:
        clock = [10.0]
        zap = bus.ZapHandler(ctx, policy, clock=lambda: clock[0])
        zap._address = "192.0.2.7"
        with caplog.at_level(logging.INFO, logger="simzmq.bus"):
            assert zap.callback("backend", WORKER) is True
            assert zap.callback("backend", STRANGER) is False
            assert zap.callback("backend", STRANGER) is False
            clock[0] += bus.REFUSAL_LOG_INTERVAL_S
            assert zap.callback("backend", STRANGER) is False
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(lines) == 2
        assert "on backend from 192.0.2.7: unknown key" in lines[0] and STRANGER.decode() in lines[0]
        assert "1 more refusals" in lines[1]
        assert zap.counts() == {"accepted": {**dict.fromkeys(bus.SOCKET_ROLES, 0), "backend": 1},
                                "refused": {**dict.fromkeys(bus.SOCKET_ROLES, 0), "backend": 3}}
        # A new policy takes over; the counts carry on.
        zap.reload(bus.BusPolicy({"worker": [STRANGER]}))
        assert zap.callback("backend", STRANGER) is True
        assert zap.callback("backend", WORKER) is False
        assert zap.counts()["accepted"]["backend"] == 2 and zap.counts()["refused"]["backend"] == 4
    finally:
        ctx.term()


# --- key files ---------------------------------------------------------------


def test_bus_keys_are_made_once_in_the_zpl_format(tmp_path):
    publics = keys.ensure_bus_keys(tmp_path)
    assert set(publics) == {"broker", "gate", "worker", "ops"}
    d = tmp_path / "keys" / "bus"
    for role, public in publics.items():
        secret_file, public_file = d / f"{role}.key_secret", d / f"{role}.key"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        pub, sec = zmq.auth.load_certificate(secret_file)
        assert pub == public and zmq.curve_public(sec) == public
        assert zmq.auth.load_certificate(public_file) == (public, None)
        assert "secret-key" not in public_file.read_text()
        assert (d / "allow" / role).is_dir()
    assert len(set(publics.values())) == 4
    assert keys.ensure_bus_keys(tmp_path) == publics
    # A lost public file comes back from the secret; the pair stays.
    (d / "gate.key").unlink()
    assert keys.ensure_bus_keys(tmp_path) == publics
    assert zmq.auth.load_certificate(d / "gate.key")[0] == publics["gate"]


def test_allow_lists_add_keys_to_a_role(tmp_path):
    publics = keys.ensure_bus_keys(tmp_path)
    extra_pub, extra_sec = zmq.curve_keypair()
    # A certificate made elsewhere with pyzmq's own tool is accepted as is.
    other = tmp_path / "elsewhere"
    other.mkdir()
    made_pub, _ = zmq.auth.create_certificates(other, "gate-b")
    (tmp_path / "keys" / "bus" / "allow" / "gate" / "gate-b.key").write_bytes((other / "gate-b.key").read_bytes())
    (tmp_path / "keys" / "bus" / "allow" / "worker" / "w2.key").write_text(keys.curve_cert_text("worker", extra_pub))
    allowed = keys.allowed_bus_keys(tmp_path)
    gate_b = zmq.auth.load_certificate(made_pub)[0]
    assert set(allowed["gate"]) == {publics["gate"], gate_b}
    assert set(allowed["worker"]) == {publics["worker"], extra_pub}
    p = bus.load_policy(tmp_path)
    assert p.decide("frontend", gate_b).allowed and not p.decide("backend", gate_b).allowed
    assert p.decide("notify_in", extra_pub).allowed


def test_broken_or_missing_key_files_are_clear_errors(tmp_path):
    with pytest.raises(keys.KeyFileError, match="simzmq keys"):
        keys.load_bus_pair(tmp_path, "worker")
    keys.ensure_bus_keys(tmp_path)
    d = tmp_path / "keys" / "bus"
    (d / "allow" / "gate" / "bad.key").write_text('curve\n    public-key = "not-a-key"\n')
    with pytest.raises(keys.KeyFileError, match="bad public key"):
        keys.allowed_bus_keys(tmp_path)
    (d / "allow" / "gate" / "bad.key").write_text("curve\n")
    with pytest.raises(keys.KeyFileError, match="no public-key"):
        keys.allowed_bus_keys(tmp_path)
    (d / "allow" / "gate" / "bad.key").unlink()
    # A secret file whose public key is someone else's.
    other_pub, _ = zmq.curve_keypair()
    _, sec = keys.load_bus_pair(tmp_path, "ops")
    (d / "ops.key_secret").write_text(keys.curve_cert_text("ops", other_pub, sec))
    with pytest.raises(keys.KeyFileError, match="does not belong"):
        keys.load_bus_pair(tmp_path, "ops")


# --- socket configuration ------------------------------------------------------


def test_configurators_make_servers_with_zap_domains_and_clients(tmp_path):
    keys.ensure_bus_keys(tmp_path)
    broker_keys = bus.load_keys(tmp_path, "broker")
    gate_keys = bus.load_keys(tmp_path, "gate")
    assert gate_keys.server == broker_keys.public and broker_keys.server == broker_keys.public
    configure = bus.broker_configurator(broker_keys)
    ctx = zmq.Context()
    try:
        for name in bus.SOCKET_ROLES:
            sock = ctx.socket(zmq.ROUTER)
            configure(sock, name)
            assert sock.curve_server == 1 and sock.zap_domain == name.encode()
            assert sock.mechanism == zmq.CURVE
            sock.close(0)
        peer = ctx.socket(zmq.SUB)
        configure(peer, bus.PEER_STATE)
        assert peer.curve_server == 0 and peer.mechanism == zmq.CURVE
        peer.close(0)
        with pytest.raises(ValueError, match="no bus policy"):
            configure(ctx.socket(zmq.PUB), "somewhere")
        # The keys themselves are write-only options: the integration tests
        # (tests/integration/test_bus_security.py) show they connect.
        with pytest.raises(ValueError, match="broker key"):
            bus.broker_configurator(gate_keys)
        dealer = ctx.socket(zmq.DEALER)
        bus.client_configurator(gate_keys)(dealer, "frontend")
        assert dealer.curve_server == 0 and dealer.mechanism == zmq.CURVE
        dealer.close(0)
    finally:
        ctx.destroy(0)
