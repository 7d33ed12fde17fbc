"""Group read receipts through a real region with two gates (protocol.md
section 7, "Reading"): a reader who reads fast reaches each other member as
at most one ReadNotice a second, the latest, in order; its own other
session gets every one; Convs shows the marks."""

from __future__ import annotations

import asyncio
import os

import pytest

from simzmq.client import Client, new_group_id
from simzmq.wire import messages as m
from tests.integration.test_groups import user
from tests.integration.test_presence import gate_metrics
from tests.region import region_fixture

pytestmark = pytest.mark.timeout(180)

region = region_fixture("group_reads", gates=2)

THINNED = "simzmq_gate_read_notices_thinned_total"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def reads_until(client: Client, reader: str, group: str, last: int, timeout=30.0) -> list[int]:
    """The msg_ids of `reader`'s ReadNotices in `group` that reach `client`,
    up to the one of `last`."""
    got = []
    while not got or got[-1] != last:
        event = await asyncio.wait_for(client.events.get(), timeout)
        if type(event) is m.ReadNotice and event.reader == reader and event.peer == group:
            got.append(event.msg_id)
    return got


def test_a_fast_reader_reaches_the_other_members_thinned_to_its_latest(region):
    tag = str(os.getpid())
    group = new_group_id()
    count = 40

    async def main():
        ann = await user(region, "ann" + tag, 0)
        ann_laptop = Client("127.0.0.1", region.gate_port + 1, region.gate_pk, ann.user, password="pw-" + ann.user,
                            device="laptop", codecs=(2,))
        await ann_laptop.login()
        bob = await user(region, "bob" + tag, 1)
        carol = await user(region, "carol" + tag, 0, codecs=(2,))  # msgpack: decoded at the gate
        for c in (bob, carol):
            await c.send(ann.user, b"hello")
        await ann.group_create(group, "Readers", [bob.user, carol.user])
        ids = [(await bob.send(group, f"line {i}".encode())).msg_id for i in range(count)]
        thinned_before = sum(gate_metrics(region, g).get(THINNED, 0) for g in (0, 1))

        # ann scrolls through all of them: the Reads go out at once, one after another.
        replies = [ann.conn.request_nowait(m.Read(peer=group, msg_id=i)) for i in ids]
        assert all(isinstance(r, m.Ok) for r in await asyncio.gather(*replies))

        # Each other member, on either gate: rising, the last the final
        # mark, and fewer notices than reads (the Reads took far less than
        # `count` seconds: a bound with room to spare, not a timing).
        for member in (bob, carol):
            got = await reads_until(member, ann.user, group, ids[-1])
            assert got == sorted(set(got)) and set(got) <= set(ids), got
            assert len(got) < count, got
        assert sum(gate_metrics(region, g).get(THINNED, 0) for g in (0, 1)) > thinned_before
        # ann's other session is not thinned: every raise of her mark reaches
        # it (one worker publishes them in order; with more, two Reads
        # committed at once may raise the mark once).
        laptop = await reads_until(ann_laptop, ann.user, group, ids[-1])
        if region.workers == 1:
            assert laptop == ids
        else:
            assert ids[-1] in laptop

        await carol.read(group, ids[-1])
        assert {c.peer: c for c in await bob.convs()}[group].peer_read == ids[-1]
        conv = {c.peer: c for c in await ann.convs()}[group]
        assert conv.unread == 0
        for c in (ann, ann_laptop, bob, carol):
            await c.close()

    run(main())
