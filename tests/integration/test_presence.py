"""Presence and typing (protocol.md section 7) through a real region with
two gates: states only among contacts (a non-contact and an unknown id see
state 0), changes pushed to the watchers on either gate, typing reaching the
right sessions only and held to its rate, and a user whose gate is killed
going offline within idle_timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request

import pytest

from simzmq.client import Client, RequestError, new_group_id
from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode, PresenceState
from tests.region import parse_metrics, region_fixture

pytestmark = pytest.mark.timeout(240)

IDLE_TIMEOUT_S = 6
ONLINE, AWAY, OFFLINE, UNKNOWN = (PresenceState.ONLINE, PresenceState.AWAY, PresenceState.OFFLINE,
                                  PresenceState.UNKNOWN)

region = region_fixture("presence", gates=2, extra_env={"SIMZMQ_GATE_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S)})


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


async def user(region, name, gate: int, codecs=(1,), device="") -> Client:
    c = Client("127.0.0.1", region.gate_port + gate, region.gate_pk, name, password="pw-" + name, codecs=codecs,
               ping_interval=IDLE_TIMEOUT_S / 3, device=device)
    try:
        await c.register()
    except Exception:
        pass  # a second client of the same user
    await c.login()
    return c


async def next_event(client: Client, want, timeout=30.0):
    """The first event `want(event)` accepts; the ones before it are returned too."""
    skipped = []
    while True:
        event = await asyncio.wait_for(client.events.get(), timeout)
        if want(event):
            return event, skipped
        skipped.append(event)


def presence_of(user: str, state=None):
    return lambda e: (type(e) is m.PresenceNotice and e.state.user == user
                      and (state is None or e.state.state == state))


def typing_from(user: str):
    return lambda e: type(e) is m.TypingNotice and e.user == user


def new_msg_from(user: str, body: bytes | None = None):
    return lambda e: type(e) is m.NewMsg and e.msg.sender == user and (body is None or e.msg.body == body)


def gate_metrics(region, gate: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{region.http_port + gate}/metrics", timeout=5) as r:
        return parse_metrics(r.read().decode())


def states(presences) -> dict[str, int]:
    return {p.user: p.state for p in presences}


def test_presence_among_contacts_across_two_gates(region):
    tag = str(os.getpid())

    async def main():
        alice = await user(region, "alice" + tag, 0)
        bob = await user(region, "bob" + tag, 1, codecs=(2,))
        carol = await user(region, "carol" + tag, 0)
        dave = await user(region, "dave" + tag, 1)
        # bob and carol write to alice: alice may see them. alice writes to
        # bob: bob may see her. Nobody writes to dave.
        for sender in (bob, carol):
            await sender.send(alice.user, b"hi")
        await alice.send(bob.user, b"hi")

        got = await alice.watch([bob.user, carol.user, dave.user, "nobody" + tag, "#nogroup", alice.user])
        assert states(got) == {bob.user: ONLINE, carol.user: ONLINE, dave.user: UNKNOWN,
                               "nobody" + tag: UNKNOWN, "#nogroup": UNKNOWN, alice.user: ONLINE}
        assert all(p.last_seen_ms == 0 for p in got if p.state == UNKNOWN)
        assert states(await dave.watch([alice.user, dave.user])) == {alice.user: UNKNOWN, dave.user: ONLINE}
        assert states(await bob.watch([alice.user, carol.user])) == {alice.user: ONLINE, carol.user: UNKNOWN}

        # bob (gate 1) goes away: alice (gate 0) hears it.
        await bob.set_presence(AWAY)
        notice, _ = await next_event(alice, presence_of(bob.user))
        assert notice.state.state == AWAY and notice.state.last_seen_ms > 0

        # alice goes away: bob hears it, dave (who watches her, not her
        # contact) does not: his next notice is his own change after hers.
        await alice.set_presence(AWAY)
        await next_event(bob, presence_of(alice.user, AWAY))
        await dave.set_presence(AWAY)
        _, before = await next_event(dave, presence_of(dave.user, AWAY))
        assert not any(presence_of(alice.user)(e) for e in before)

        # carol leaves: alice sees her offline, with when she was last seen.
        await carol.close()
        notice, _ = await next_event(alice, presence_of(carol.user, OFFLINE))
        assert notice.state.last_seen_ms > 0
        # Watch{[]} stops everything; bob's change no longer reaches alice.
        assert await alice.watch([]) == []
        await bob.set_presence(ONLINE)
        await bob.send(alice.user, b"marker")
        _, before = await next_event(alice, new_msg_from(bob.user, b"marker"))
        assert not any(type(e) is m.PresenceNotice for e in before)
        for c in (alice, bob, dave):
            await c.close()
    run(main())


def test_a_first_message_makes_the_sender_visible_to_its_watcher(region):
    tag = str(os.getpid())

    async def main():
        erin = await user(region, "erin" + tag, 0)
        frank = await user(region, "frank" + tag, 1)
        assert states(await erin.watch([frank.user])) == {frank.user: UNKNOWN}
        await frank.send(erin.user, b"hello")
        notice, _ = await next_event(erin, presence_of(frank.user, ONLINE))
        assert notice.state.last_seen_ms > 0
        for c in (erin, frank):
            await c.close()
    run(main())


def test_typing_reaches_the_right_sessions_only(region):
    tag = str(os.getpid())
    group = new_group_id()

    async def main():
        gina = await user(region, "gina" + tag, 0, device="phone")
        gina2 = await user(region, "gina" + tag, 1, device="laptop")
        hugo = await user(region, "hugo" + tag, 1)
        ivan = await user(region, "ivan" + tag, 0)
        # hugo and ivan write to gina; gina writes to hugo.
        for sender in (hugo, ivan):
            await sender.send(gina.user, b"hi")
        await gina.send(hugo.user, b"hi")

        # hugo types to gina: both of gina's sessions, on both gates.
        await hugo.typing(gina.user, True)
        for c in (gina, gina2):
            notice, _ = await next_event(c, typing_from(hugo.user))
            assert notice == m.TypingNotice(user=hugo.user, peer=gina.user, typing=True)
        assert gina.typing_in(hugo.user) == [hugo.user]
        # ivan types to gina, who never wrote to him: nothing reaches her
        # (her next event is ivan's message after it).
        await ivan.typing(gina.user, True)
        await ivan.send(gina.user, b"after typing")
        _, before = await next_event(gina, new_msg_from(ivan.user, b"after typing"))
        assert not any(type(e) is m.TypingNotice for e in before)
        # gina's own typing never reaches her other session.
        await gina.typing(hugo.user, True)
        await next_event(hugo, typing_from(gina.user))
        await gina.send(hugo.user, b"after typing")
        _, before = await next_event(gina2, new_msg_from(gina.user, b"after typing"))
        assert not any(type(e) is m.TypingNotice for e in before)

        # A group: ivan's typing reaches the other members, with the group as peer.
        await gina.group_create(group, "G", [hugo.user, ivan.user])
        await ivan.typing(group, True)
        for c in (gina, gina2, hugo):
            notice, _ = await next_event(c, typing_from(ivan.user))
            assert notice == m.TypingNotice(user=ivan.user, peer=group, typing=True)

        # A session that appears offline types to no one.
        dropped = gate_metrics(region, 1).get('simzmq_gate_typing_dropped_total{why="offline"}', 0)
        await hugo.set_presence(OFFLINE)
        await hugo.typing(gina.user, False)
        await hugo.send(gina.user, b"marker")
        _, before = await next_event(gina, new_msg_from(hugo.user, b"marker"))
        assert not any(type(e) is m.TypingNotice for e in before)
        assert gate_metrics(region, 1)['simzmq_gate_typing_dropped_total{why="offline"}'] == dropped + 1
        await hugo.set_presence(ONLINE)

        # A burst to one peer: at most one a second gets through, the rest
        # are answered Ok and dropped (counted).
        before_burst = gate_metrics(region, 1).get('simzmq_gate_typing_dropped_total{why="typing_peer"}', 0)
        await asyncio.gather(*(hugo.typing(gina.user, i % 2 == 0) for i in range(20)))
        await hugo.send(gina.user, b"after the burst")
        _, before = await next_event(gina, new_msg_from(hugo.user, b"after the burst"))
        passed = sum(1 for e in before if typing_from(hugo.user)(e))
        assert passed < 20
        assert gate_metrics(region, 1)['simzmq_gate_typing_dropped_total{why="typing_peer"}'] \
            >= before_burst + 20 - passed
        for c in (gina, gina2, hugo, ivan):
            await c.close()
    run(main())


def test_watch_limits_and_set_presence_values(region):
    tag = str(os.getpid())

    async def main():
        kim = await user(region, "kim" + tag, 0)

        async def refused(msg) -> int:
            with pytest.raises(RequestError) as info:
                await kim.conn.request(msg)
            return info.value.code
        assert await refused(m.Watch(users=[f"u{i}" for i in range(257)])) == ErrorCode.TOO_LARGE
        # 256 distinct ids, each twice: counted (and answered) once.
        reply = await kim.conn.request(m.Watch(users=[f"u{i}" for i in range(256)] * 2))
        assert len(reply.states) == 256
        for start in range(256, 1024, 256):
            await kim.watch([f"u{i}" for i in range(start, start + 256)])
        assert await refused(m.Watch(users=["one-more"])) == ErrorCode.TOO_LARGE
        # Ids already watched do not count again.
        assert states(await kim.watch(["u1", "u2"])) == {"u1": UNKNOWN, "u2": UNKNOWN}
        for state in (0, 4, 255):
            assert await refused(m.SetPresence(state=state)) == ErrorCode.BAD_REQUEST
        await kim.close()
    run(main())


def test_a_user_whose_gate_is_killed_is_offline_within_idle_timeout(region):
    tag = str(os.getpid())

    async def main():
        lena = await user(region, "lena" + tag, 0)
        max_ = await user(region, "max" + tag, 1)
        max_.reconnect = False
        await max_.send(lena.user, b"hi")
        assert states(await lena.watch([max_.user])) == {max_.user: ONLINE}
        os.kill(region.pid("gate-2"), signal.SIGKILL)
        # The gate's lease runs out (within two thirds of idle_timeout), and
        # the next report of the live gate makes the worker tell lena.
        notice, _ = await next_event(lena, presence_of(max_.user, OFFLINE), timeout=120)
        assert notice.state.last_seen_ms > 0
        await lena.close()
    run(main())
