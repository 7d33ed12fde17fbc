"""A whole region on Postgres instead of SQLite: the main flows and a worker
kill, through real processes and a real throwaway Postgres cluster."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from simzmq.client import Client
from simzmq.wire import messages as m
from tests.region import Region

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def region(tmp_path_factory, pg_cluster):
    dsn = pg_cluster.create_database()
    r = Region(tmp_path_factory.mktemp("pgregion") / "data", workers=2, store=dsn)
    r.start()
    yield r
    r.stop()


def test_flows_and_worker_kill_on_postgres(region):
    async def main():
        alice = Client("127.0.0.1", region.gate_port, region.gate_pk, "alice", password="pw-a")
        bob = Client("127.0.0.1", region.gate_port, region.gate_pk, "bob", password="pw-b")
        for c in (alice, bob):
            await c.register()
            await c.login()
        first = await alice.send("bob", b"on postgres")
        pushed = await asyncio.wait_for(bob.events.get(), 10)
        assert isinstance(pushed, m.NewMsg) and pushed.msg.msg_id == first.msg_id
        await bob.read("alice", first.msg_id)
        convs = await alice.convs()
        assert convs[0].peer == "bob" and convs[0].peer_read == first.msg_id
        # Kill a worker while sends are in flight: none lost, none doubled.
        sends = [asyncio.ensure_future(alice.send("bob", b"%d" % i)) for i in range(200)]
        os.kill(region.pid("im-1"), signal.SIGKILL)
        oks = await asyncio.gather(*sends)
        assert sorted(o.seq for o in oks) == list(range(2, 202))
        await bob.sync()
        bodies = [bob.messages[s].body for s in range(2, 202)]
        assert bodies == [b"%d" % i for i in range(200)]
        assert bob.max_contiguous_seq == 201
        await alice.close()
        await bob.close()
    asyncio.run(asyncio.wait_for(main(), 120))
