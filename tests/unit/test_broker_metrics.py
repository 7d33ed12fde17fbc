"""The broker's counts and its /metrics: the gates' MMI probes are not
counted as requests; per-service totals survive an idle service being
forgotten; the collector reads the counts when scraped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from simzmq import mdp
from simzmq.broker import Broker, BrokerCollector, BrokerCore
from tests.configs import defaults


def test_the_gates_probes_are_not_requests():
    core = BrokerCore(heartbeat_interval=0.25, liveness=3, request_timeout=5.0)
    core.on_worker(b"w1", mdp.build_ready(b"im", 8), 0.0)
    for _ in range(5):
        core.on_client(b"gate", mdp.build_client_request(mdp.MMI_SERVICE, [b"im"]), 0.0)
    core.on_client(b"gate", mdp.build_client_request(b"im", [b"ann", b"x"]), 0.0)
    assert (core.requests_total, core.mmi_total) == (1, 5)
    assert core.snapshot(0.0)["requests_total"] == 1 and core.gate_count(0.0) == 1


def test_per_service_totals_survive_forgetting_an_idle_service():
    core = BrokerCore(heartbeat_interval=0.25, liveness=3, request_timeout=1.0)
    for _ in range(3):
        core.on_client(b"gate", mdp.build_client_request(b"echo", [b"x"]), 0.0)
    assert core.requests_by_service() == {"echo": 3}
    core.tick(2.0)  # the requests time out; the service, idle, is forgotten
    assert b"echo" not in core.services
    core.on_client(b"gate", mdp.build_client_request(b"echo", [b"y"]), 2.0)
    assert core.requests_by_service() == {"echo": 4}


def scrape(broker: Broker) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(BrokerCollector(broker))
    samples = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_the_metrics_are_the_counts_at_scrape_time():
    broker = Broker(defaults().broker, "primary", install_signal_handlers=False,
                    auth_counts=lambda: {"accepted": {"frontend": 2}, "refused": {"backend": 1}})
    core = broker.core
    core.on_worker(b"w1", mdp.build_ready(b"im", 8), 0.0)
    core.on_client(b"gate", mdp.build_client_request(b"im", [b"ann", b"x"]), 0.0)
    core.on_client(b"gate", mdp.build_client_request(mdp.MMI_SERVICE, [b"im"]), 0.0)
    first = scrape(broker)
    assert first['simzmq_broker_requests_total{service="im"}'] == 1
    assert first["simzmq_broker_mmi_requests_total"] == 1
    assert first['simzmq_broker_workers{service="im"}'] == 1
    assert first["simzmq_broker_in_flight"] == 1 and first["simzmq_broker_active"] == 1
    assert first["simzmq_broker_failovers_total"] == 0 and first["simzmq_broker_peer_heard_seconds"] == -1
    assert first['simzmq_broker_auth_refusals_total{socket="backend"}'] == 1
    assert first['simzmq_broker_auth_accepts_total{socket="frontend"}'] == 2
    core.on_client(b"gate", mdp.build_client_request(b"im", [b"bob", b"y"]), 0.0)
    broker.failovers += 1
    second = scrape(broker)
    assert second['simzmq_broker_requests_total{service="im"}'] == 2
    assert second["simzmq_broker_failovers_total"] == 1
