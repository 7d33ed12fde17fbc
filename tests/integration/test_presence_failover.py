"""Presence across a broker failover: when the active broker is killed the
gate switches to the other one and asks again, paced
(simzmq/watchresync.py), for every state its connections watch. Each
watcher is pushed the watched user's state again, the gate logs the resync's
start and end, and later changes reach the watchers through the new
broker."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import pytest

from simzmq.client import Client
from simzmq.wire import messages as m
from simzmq.wire.messages import PresenceState
from tests.chaos import active_broker
from tests.region import region_fixture, until_available

pytestmark = pytest.mark.timeout(300)

# A loaded machine must not make a broker take a live worker for dead.
region = region_fixture("presence_failover", extra_env={"SIMZMQ_BROKER_HEARTBEAT_MS": "1000",
                                                        "SIMZMQ_GATE_REQUEST_TIMEOUT_S": "20"})
WATCHERS = 5


async def login(region, name: str) -> Client:
    c = Client("127.0.0.1", region.gate_port, region.gate_pk, name, password="pw-" + name)
    await c.register()
    await c.login()
    return c


async def next_presence(client: Client, user: str, state: int) -> m.Presence:
    while True:
        event = await asyncio.wait_for(client.events.get(), 120)
        if type(event) is m.PresenceNotice and event.state.user == user and event.state.state == state:
            return event.state


def test_watchers_are_told_again_after_a_failover_and_hear_later_changes(region):
    tag = os.getpid()
    killed = active_broker(region)

    async def main():
        dan = await login(region, f"dan-{tag}")
        watchers = [await login(region, f"w{i}-{tag}") for i in range(WATCHERS)]
        for w in watchers:
            # Contacts both ways: each may see the other.
            await dan.send(w.user, b"hi")
            await w.send(dan.user, b"hi")
            assert [p.state for p in await w.watch([dan.user])] == [PresenceState.ONLINE]
        os.kill(region.pid("broker-" + killed), signal.SIGKILL)
        # The resync after the switch pushes each watcher dan's state again.
        for w in watchers:
            await next_presence(w, dan.user, PresenceState.ONLINE)
        await until_available(lambda: dan.set_presence(PresenceState.AWAY))
        for w in watchers:
            await next_presence(w, dan.user, PresenceState.AWAY)
        for c in [dan, *watchers]:
            await c.close()
    asyncio.run(asyncio.wait_for(main(), 250))
    status, health = region.http_get("/v1/health")
    assert status == 200 and health["broker"] != killed and health.get("failovers", 0) >= 1, health
    log = region.read_log()
    assert "presence resync: asking again for what" in log
    done = [int(n) for n in re.findall(r"presence resync done: (\d+) Watch requests", log)]
    assert done and max(done) >= WATCHERS, done
