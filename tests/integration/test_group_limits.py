"""A member who floods a group, or tries to put strangers in it, against a real
region (docs/security.md, "Groups"): strangers are refused and nothing
changes; group Sends and changes over the group_writes limit get
rate_limited and store nothing; far over it the connection is kicked for
abuse; the other members, and the flooder's one-to-one Sends, are served
throughout. A user in max_groups_per_user groups is put in no more."""

from __future__ import annotations

import asyncio
import os
import urllib.request

import pytest

from simzmq.client import Client, Connection, RequestError, new_group_id
from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode, KickCode
from tests.region import parse_metrics, region_fixture

pytestmark = pytest.mark.timeout(120)

BURST = 5
MAX_GROUPS = 2
region = region_fixture("grouplimits", extra_env={"SIMZMQ_GATE_LIMITS_GROUP_WRITES_PER_S": "0.01",
                                                  "SIMZMQ_GATE_LIMITS_GROUP_WRITES_BURST": str(BURST),
                                                  "SIMZMQ_GATE_LIMITS_ABUSE_FACTOR": "2",
                                                  "SIMZMQ_GATE_LIMITS_MAX_GROUPS_PER_USER": str(MAX_GROUPS)})


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


async def user(region, name: str) -> Client:
    c = Client("127.0.0.1", region.gate_port, region.gate_pk, name, password="pw-" + name)
    await c.register()
    await c.login()
    return c


async def logged_in_connection(region, client: Client) -> Connection:
    conn = await Connection.open("127.0.0.1", region.gate_port, region.gate_pk, ping_interval=None)
    await conn.request(m.Login(user=client.user, password="", token=client.token, device=""))
    return conn


async def inbox(conn: Connection) -> list[m.Msg]:
    batch = await conn.request(m.Sync(since=0, limit=500))
    assert not batch.more
    return batch.msgs


def gate_metrics(region) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{region.http_port}/metrics", timeout=5) as r:
        return parse_metrics(r.read().decode())


def test_strangers_are_refused_and_a_group_flood_is_limited_then_kicked(region):
    tag = str(os.getpid())
    group = new_group_id()
    before = gate_metrics(region)

    async def main():
        alice = await user(region, "gla" + tag)
        bob = await user(region, "glb" + tag)
        carol = await user(region, "glc" + tag)
        await bob.send(alice.user, b"hi alice")  # alice is bob's contact: she may put him in a group
        info = await alice.group_create(group, "flood", [bob.user])  # group write 1
        assert info.members == [alice.user, bob.user]

        # Carol never wrote to alice: a stranger, refused, and the group is as it was.
        with pytest.raises(RequestError) as refused:
            await alice.group_add(group, [carol.user])  # group write 2
        assert refused.value.code == ErrorCode.FORBIDDEN
        assert (await alice.group_get(group)).members == [alice.user, bob.user]

        # Alice floods the group on a connection of her own.
        flood = await logged_in_connection(region, alice)
        acked, limited = [], 0
        outcome = None
        for k in range(4 * BURST):
            try:
                ok = await flood.request(m.Send(to=group, cmid=b"flood-%d" % k, kind=0, body=b"f%d" % k))
                acked.append((k, ok.msg_id))
            except RequestError as exc:
                assert exc.code == ErrorCode.RATE_LIMITED, exc
                limited += 1
            except ConnectionError:
                outcome = "closed"
                break
        # The budget had BURST - 2 writes left; then refusals, then the kick.
        assert [k for k, _ in acked] == list(range(BURST - 2))
        assert limited == 2 * BURST  # abuse_factor x burst refusals, then Kick{abuse}
        assert outcome == "closed" and flood.kick is not None and flood.kick.code == KickCode.ABUSE

        # Only the acknowledged ones are stored, once, in both members' inboxes.
        bobs = await logged_in_connection(region, bob)
        for conn in (bobs, await logged_in_connection(region, alice)):
            stored = [x for x in await inbox(conn) if x.to == group and x.kind == 0]
            assert [x.msg_id for x in stored] == [msg_id for _, msg_id in acked]
        # Bob, a member within his own budget, still writes to the group;
        # alice's one-to-one Sends are another limit.
        await bob.send(group, b"bob to the group")
        await alice.send(bob.user, b"alice to bob")
        for c in (alice, bob, carol):
            await c.close()

    run(main())
    after = gate_metrics(region)

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)
    assert delta('simzmq_gate_rate_limited_total{limit="group_writes"}') == 2 * BURST + 1
    assert delta('simzmq_gate_kicks_total{reason="abuse"}') == 1
    # create, the refused add, BURST - 2 flood Sends, bob's group Send
    assert delta("simzmq_gate_group_writes_total") == 2 + (BURST - 2) + 1


def test_a_user_in_max_groups_per_user_groups_is_put_in_no_more(region):
    tag = str(os.getpid())

    async def main():
        dave = await user(region, "gld" + tag)
        erin = await user(region, "gle" + tag)
        await erin.send(dave.user, b"hi dave")  # dave is erin's contact
        full = [new_group_id() for _ in range(MAX_GROUPS)]
        for group in full:
            await dave.group_create(group, "mine", [])
        more = new_group_id()
        with pytest.raises(RequestError) as refused:
            await dave.group_create(more, "one more", [erin.user])
        assert refused.value.code == ErrorCode.TOO_LARGE
        with pytest.raises(RequestError) as unknown:
            await erin.group_get(more)
        assert unknown.value.code == ErrorCode.NO_SUCH_USER
        # Erin, in none, may create one; dave may not be put in it.
        await erin.group_create(more, "erin's", [])
        await dave.send(erin.user, b"hi erin")
        with pytest.raises(RequestError) as refused:
            await erin.group_add(more, [dave.user])
        assert refused.value.code == ErrorCode.TOO_LARGE
        assert (await erin.group_get(more)).members == [erin.user]
        for c in (dave, erin):
            await c.close()

    run(main())
