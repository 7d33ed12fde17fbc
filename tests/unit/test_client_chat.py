"""The terminal chat, driven by scripted input against the in-test gate."""

import asyncio

import pytest

from simzmq.chat import format_body, format_conv, run_chat
from simzmq.client import Client
from simzmq.wire import messages as m
from tests.unit.test_client_connection import FakeGate, logged_in, wait_for


def test_format_body():
    assert format_body(0, "héllo".encode()) == "héllo"
    assert format_body(0, b"\xff") == "\ufffd"
    assert format_body(3, b"abc") == "<kind 3, 3 bytes>"
    assert "2 unread" in format_conv(m.Conv(peer="bob", unread=2))


async def scripted(lines):
    for line in lines:
        if callable(line):
            await line()
            continue
        yield line + "\n"


@pytest.mark.timeout(20)
def test_chat_session_sends_receives_and_reads():
    async def main():
        gate = await FakeGate().start()
        bob = Client("127.0.0.1", gate.port, gate.pk, "bob", "pw")
        await bob.register()
        await bob.login()
        output = []

        async def bob_writes():
            await wait_for(lambda: any("hello bob" in line for line in output), "alice's send")
            await bob.send("alice", b"hi alice")
            await wait_for(lambda: any("<- bob: hi alice" in line for line in output), "bob's reply")

        async def bob_reads_it():
            await wait_for(lambda: bob.max_contiguous_seq >= 1, "bob's copy")
            await bob.read("alice", bob.messages[1].msg_id)
            await wait_for(lambda: any("bob read your messages" in line for line in output), "receipt")

        lines = scripted([
            "hello?",  # no peer yet
            "/to bob",
            "hello bob",
            bob_reads_it,
            bob_writes,
            "/convs",
            "/read",
            "/bogus",
            "/quit",
            "never sent",
        ])
        await run_chat("127.0.0.1", gate.port, gate.pk, "alice", "pw", "term", True,
                       lines=lines, out=output.append)
        text = "\n".join(output)
        assert "registered alice" in text
        assert "pick a conversation first" in text
        assert "-> bob: hello bob" in text
        assert "<- bob: hi alice" in text
        assert "bob read your messages" in text
        assert "2 unread  (online)" in text  # the /convs line, with bob's presence
        assert "unknown command /bogus" in text
        assert "marked read up to message" in text
        assert [msg.body for msg in gate.inbox["bob"]] == [b"hello bob", b"hi alice"]
        # alice saw bob's message while talking to him, so it was marked read.
        reads = gate.requests_from("alice", m.Read)
        assert reads and reads[0].peer == "bob"
        await bob.close()
        await gate.stop()

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_chat_reports_bad_password_and_unreachable_gate():
    async def main():
        gate = await FakeGate().start()
        gate.users["alice"] = "right"
        gate.inbox["alice"] = []
        output = []
        await run_chat("127.0.0.1", gate.port, gate.pk, "alice", "wrong", "", False,
                       lines=scripted([]), out=output.append)
        assert any("auth_failed" in line for line in output)
        port = gate.port
        await gate.stop()
        output.clear()
        await run_chat("127.0.0.1", port, gate.pk, "alice", "right", "", False,
                       lines=scripted([]), out=output.append)
        assert any("cannot reach the gate" in line for line in output)

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_own_message_synced_back_before_its_sendok_is_shown_once():
    async def main():
        gate = await FakeGate().start()
        bob = await logged_in(gate, "bob")
        gate.lose_first_sendok()
        output = []
        lines = scripted(["/to bob", "once", "/convs", "/quit"])
        code = await run_chat("127.0.0.1", gate.port, gate.pk, "alice", "pw", "term", True,
                              lines=lines, out=output.append)
        assert code == 0
        assert len(gate.inbox["alice"]) == 1  # stored once
        # /convs runs after the send is done, so a second copy would be above it.
        assert sum("-> bob: once" in line for line in output) == 1, output
        await bob.close()
        await gate.stop()

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_opening_a_conversation_marks_it_read():
    async def main():
        gate = await FakeGate().start()
        bob = await logged_in(gate, "bob")
        output = []

        async def bob_writes_twice():
            await bob.send("alice", b"one")
            await bob.send("alice", b"two")
            await wait_for(lambda: sum("<- bob:" in line for line in output) == 2, "bob's messages")

        async def nothing_read_yet():
            assert gate.requests_from("alice", m.Read) == []

        lines = scripted(["/to carol", bob_writes_twice, nothing_read_yet, "/to bob", "/quit"])
        gate.users["carol"], gate.inbox["carol"] = "pw", []
        await run_chat("127.0.0.1", gate.port, gate.pk, "alice", "pw", "term", True,
                       lines=lines, out=output.append)
        assert [(r.peer, r.msg_id) for r in gate.requests_from("alice", m.Read)] == [("bob", gate.inbox["alice"][1].msg_id)]
        await wait_for(lambda: any(type(e) is m.ReadNotice for e in list(bob.events._queue)), "receipt")
        await bob.close()
        await gate.stop()

    asyncio.run(main())
