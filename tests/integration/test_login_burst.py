"""A burst of password Logins through a real region, every client retrying
`unavailable` / `rate_limited` as the protocol tells it to: every Login
completes, the worker refuses at once the checks it could not finish in
time and drops the ones whose caller gave up (and counts each), and messages
are served meanwhile. No timing is asserted: the machine may be slow."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request

import pytest

from simzmq.bench import logins
from simzmq.client import Connection
from simzmq.wire import messages as m
from tests.region import Region, parse_metrics

USERS = 150


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    # A short gate timeout, so a burst of 150 checks is several timeouts' worth
    # of password work for two threads.
    env = {"SIMZMQ_GATE_REQUEST_TIMEOUT_S": "2", "SIMZMQ_BROKER_REQUEST_TIMEOUT_MS": "1500",
           "SIMZMQ_IM_PWHASH_THREADS": "2"}
    r = Region(tmp_path_factory.mktemp("burst") / "data", extra_env=env)
    r.start()
    yield r
    r.stop()


def im_metrics(region) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{region.im_metrics_port}/metrics", timeout=30) as resp:
        return parse_metrics(resp.read().decode())


def login_outcomes(metrics: dict) -> dict[str, float]:
    prefix = 'simzmq_im_requests_total{outcome="'
    out = {}
    for key, value in metrics.items():
        if key.startswith(prefix) and key.endswith('",type="Login"}'):
            out[key[len(prefix):].split('"', 1)[0]] = value
    return out


async def chat_meanwhile(region, stop: asyncio.Event) -> int:
    """A pair exchanging messages while the burst runs; how many were acked."""
    a, b = "chat" + os.urandom(3).hex(), "chat" + os.urandom(3).hex()
    conns = await logins.open_connections("127.0.0.1", region.gate_port, region.gate_pk, 2)
    setup = await logins.burst(conns, [m.Register(user=a, password="pw-a"), m.Register(user=b, password="pw-b")])
    assert not setup.failed
    await logins.burst(conns, [m.Login(user=a, password="pw-a", token=b"", device=""),
                               m.Login(user=b, password="pw-b", token=b"", device="")])
    acked = 0
    while not stop.is_set():
        reply = await conns[0].request(m.Send(to=b, cmid=os.urandom(16), kind=0, body=b"still here"))
        assert isinstance(reply, m.SendOk)
        acked += 1
        await asyncio.sleep(0.05)
    for conn in conns:
        conn.close()
    return acked


@pytest.mark.timeout(600)
def test_a_login_burst_completes_and_the_worker_computes_nothing_for_callers_who_gave_up(region):
    users = logins.users_for("burst" + os.urandom(2).hex(), USERS)

    async def scenario():
        stop = asyncio.Event()
        chat = asyncio.create_task(chat_meanwhile(region, stop))
        await asyncio.sleep(0)
        registered, logged_in = await logins.register_and_login("127.0.0.1", region.gate_port, region.gate_pk, users)
        stop.set()
        return registered, logged_in, await chat

    registered, logged_in, acked = asyncio.run(scenario())
    assert registered.failed == [] and registered.done == USERS
    assert logged_in.failed == [] and logged_in.done == USERS, logged_in.as_dict()
    assert acked >= 1  # messages went through while the password threads were busy

    metrics = im_metrics(region)
    outcomes = login_outcomes(metrics)
    expired = sum(v for k, v in metrics.items() if k.startswith("simzmq_im_expired_dropped_total{"))
    refused = metrics.get("simzmq_im_password_refused_total", 0.0)
    # Every request the worker dropped is counted once, as the outcome
    # "expired" of its type; every refusal is an "unavailable" answer.
    assert expired == sum(v for k, v in metrics.items() if k.startswith('simzmq_im_requests_total{outcome="expired"'))
    assert refused <= sum(v for k, v in metrics.items()
                          if k.startswith('simzmq_im_requests_total{outcome="unavailable"'))
    assert outcomes.get("ok", 0.0) >= USERS + 2
    # Each retry the clients made was an answer the worker (refusal, drop) or
    # the gate (its timeout) gave; the worker's refusals and drops are among them.
    assert logged_in.retried.get("unavailable", 0) + registered.retried.get("unavailable", 0) >= refused
    # Nothing left queued behind (a check whose caller already retried and
    # got in may still be on its way out: it is dropped, not computed).
    for _ in range(300):
        if im_metrics(region).get("simzmq_im_password_queue", -1) == 0:
            break
        time.sleep(0.1)
    assert im_metrics(region).get("simzmq_im_password_queue", -1) == 0
