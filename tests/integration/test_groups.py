"""Groups (protocol.md section 7) through a real region with two gates:
members on both, events in order, every member seeing the group's messages
in one order, non-members refused without learning anything, idempotent
retries, closing, and the group's HTTP history."""

from __future__ import annotations

import asyncio
import os

import pytest

from simzmq.client import Client, RequestError, group_event, new_group_id
from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode, GroupOp
from tests.region import region_fixture

pytestmark = pytest.mark.timeout(180)


region = region_fixture("groups", gates=2)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def user(region, name, gate: int, codecs=(1,)) -> Client:
    c = Client("127.0.0.1", region.gate_port + gate, region.gate_pk, name, password="pw-" + name, codecs=codecs)
    await c.register()
    await c.login()
    return c


async def group_events(client: Client, group: str, count: int, timeout=15) -> list[m.GroupEvent]:
    """The first `count` events of `group` this client holds, waiting for pushes."""
    async def wait():
        while True:
            got = [group_event(x) for x in client.conversation(group) if group_event(x)]
            if len(got) >= count:
                return got[:count]
            await asyncio.wait_for(client.events.get(), timeout)
    try:
        return await wait()
    except asyncio.TimeoutError:
        raise AssertionError(f"{client.user} holds only {[group_event(x) for x in client.conversation(group)]}")


async def error_of(call) -> RequestError:
    with pytest.raises(RequestError) as info:
        await call
    return info.value


def test_groups_across_two_gates(region):
    tag = str(os.getpid())
    group = new_group_id()

    async def main():
        alice = await user(region, "alice" + tag, 0)
        bob = await user(region, "bob" + tag, 1, codecs=(2,))  # msgpack: events' bodies stay bin
        carol = await user(region, "carol" + tag, 0)
        dave = await user(region, "dave" + tag, 1)
        # Everyone writes to alice: alice is their contact and may put them in.
        for c in (bob, carol, dave):
            await c.send(alice.user, b"hello")
        # dave has not written to bob: bob cannot put dave in.
        info = await alice.group_create(group, "Crew", [bob.user, carol.user])
        assert info == m.GroupInfo(group=group, title="Crew", owner=alice.user,
                                   members=[alice.user, bob.user, carol.user], version=1)
        # A retried create answers the current group.
        assert await alice.group_create(group, "Crew", [bob.user, carol.user]) == info
        assert (await error_of(bob.group_create(group, "Mine", []))).code == ErrorCode.EXISTS
        for c in (alice, bob, carol):
            (created,) = await group_events(c, group, 1)
            assert created.op == GroupOp.CREATED and created.version == 1

        # Non-members learn nothing: a group that exists answers as one that does not.
        elsewhere = new_group_id()
        for there, nowhere in ((dave.group_get(group), dave.group_get(elsewhere)),
                               (dave.send(group, b"x"), dave.send(elsewhere, b"x")),
                               (dave.group_add(group, [dave.user]), dave.group_add(elsewhere, [dave.user]))):
            a, b = await error_of(there), await error_of(nowhere)
            assert a.code == b.code == ErrorCode.NO_SUCH_USER
            assert a.reason.replace(group, elsewhere) == b.reason
        assert (await error_of(bob.group_add(group, [dave.user]))).code == ErrorCode.FORBIDDEN

        # Messages from members on both gates, at once: one order for all.
        sends = [c.send(group, f"{c.user}-{i}".encode()) for i in range(10) for c in (alice, bob, carol)]
        oks = await asyncio.gather(*sends)
        for c in (alice, bob, carol):
            await c.sync()
        orders = [[x.msg_id for x in c.conversation(group)] for c in (alice, bob, carol)]
        assert orders[0] == orders[1] == orders[2] and len(orders[0]) == 31
        assert sorted(ok.msg_id for ok in oks) == orders[0][1:]

        # A GroupAdd repeated with its cmid answers Ok and changes nothing.
        add = m.GroupAdd(group=group, users=[dave.user], cmid=b"add-dave-" + tag.encode())
        assert isinstance(await alice.conn.request(add), m.Ok)
        assert isinstance(await alice.conn.request(add), m.Ok)
        events = await group_events(dave, group, 1)
        assert events == [m.GroupEvent(op=GroupOp.ADDED, actor=alice.user, users=[dave.user], version=2)]
        # dave sees the group from when it joined.
        status, page = region.http_get(f"/v1/history/%23{group[1:]}",
                                       {"Authorization": "Bearer " + dave.token.hex()})
        assert status == 200 and [x["kind"] for x in page["messages"]] == [255]
        status, page = region.http_get(f"/v1/history/%23{group[1:]}?limit=100",
                                       {"Authorization": "Bearer " + bob.token.hex()})
        assert status == 200 and len(page["messages"]) == 32

        # Reading: the others' lowest mark.
        last = orders[0][-1]
        await bob.read(group, last)
        convs = {c.peer: c for c in await alice.convs()}
        assert convs[group].last_msg_id > last and convs[group].unread == 20

        # The owner leaves: left, then owner changed; then everyone leaves and
        # the group is closed, its id still taken.
        await alice.group_leave(group)
        for c in (bob, carol):
            ops = [e.op for e in await group_events(c, group, 4)]
            assert ops == [GroupOp.CREATED, GroupOp.ADDED, GroupOp.LEFT, GroupOp.OWNER_CHANGED]
        assert [e.op for e in await group_events(dave, group, 3)] == [GroupOp.ADDED, GroupOp.LEFT,
                                                                     GroupOp.OWNER_CHANGED]
        # The leaver gets its left event, not the hand-over.
        assert [e.op for e in await group_events(alice, group, 3)][-1] == GroupOp.LEFT
        assert (await bob.group_get(group)).owner == bob.user
        for c in (bob, carol, dave):
            await c.group_leave(group)
        # Each owner that leaves hands over to the earliest joined; dave,
        # the last, closes it.
        dave_events = await group_events(dave, group, 8)
        assert [e.version for e in dave_events] == list(range(2, 10))
        assert [e.users for e in dave_events if e.op == GroupOp.OWNER_CHANGED] == [[bob.user], [carol.user],
                                                                                   [dave.user]]
        assert (await error_of(dave.group_get(group))).code == ErrorCode.NO_SUCH_USER
        assert (await error_of(alice.group_create(group, "Again", []))).code == ErrorCode.EXISTS
        for c in (alice, bob, carol, dave):
            await c.close()

    run(main())


def test_a_former_members_conv_stays_as_it_was(region):
    """Section 7: "A former member keeps its own copies [...] and its Conv
    stays as it was at its removal", whatever the others do afterwards."""
    tag = str(os.getpid())
    group = new_group_id()

    async def main():
        owner = await user(region, "owner" + tag, 0)
        former = await user(region, "former" + tag, 1)
        await former.send(owner.user, b"hello")
        await owner.group_create(group, "team", [former.user])
        await owner.send(group, b"1")
        await owner.group_remove(group, [former.user])

        async def conv():
            return {c.peer: c for c in await former.convs()}[group]

        at_removal = await conv()
        await owner.send(group, b"2")
        await owner.group_title(group, "later")
        await owner.sync()
        await owner.read(group, owner.conversation(group)[-1].msg_id)
        assert (await conv()) == at_removal
        assert at_removal.unread == 1
        for c in (owner, former):
            await c.close()

    run(main())


def test_the_terminal_chat_makes_and_uses_a_group(region):
    from simzmq.chat import ChatSession

    tag = str(os.getpid())

    async def main():
        alice = await user(region, "chat-alice" + tag, 0)
        bob = await user(region, "chat-bob" + tag, 1)
        await bob.send(alice.user, b"hi")
        said, heard = [], []
        alice_chat, bob_chat = ChatSession(alice, said.append), ChatSession(bob, heard.append)
        await alice_chat.handle_line(f"/group create Crew {bob.user}")
        group = alice_chat.peer
        assert group.startswith("#") and said[0] == f"created {group} (Crew) with {alice.user}, {bob.user}"
        await alice_chat.handle_line("hello crew")
        async def bob_sees(text):
            while not any(text in line for line in heard):
                await bob_chat.handle_event(await asyncio.wait_for(bob.events.get(), 15))
        await bob_sees(f"{alice.user} created the group with {alice.user}, {bob.user}")
        await bob_sees(f"<- {alice.user} in {group}: hello crew")
        await bob_chat.handle_line(f"/to {group}")
        await bob_chat.handle_line("/group leave")
        await bob_sees(f"{group}: {bob.user} left")
        await alice_chat.handle_line(f"/group add {bob.user}")
        assert not any("refused" in line for line in said), said
        for c in (alice, bob):
            await c.close()

    run(main())
