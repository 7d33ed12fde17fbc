"""The web chat across a gate killed with SIGKILL (`simzmq up` restarts it):
the pages reconnect with their resume tokens, resend what was not
acknowledged with the same cmid, sync what they missed, and nothing is lost
or doubled."""

from __future__ import annotations

import os
import signal

from playwright.sync_api import expect

from tests.browser.web import bubble, conv_entry, open_chat, register, send

SLOW = 60_000  # ms: a restart, a broker failover of the worker, a backoff


def record_states(page):
    page.evaluate("""() => {
        window.seenStates = [];
        window.simzmq.client().addEventListener('state', (e) => window.seenStates.push(e.detail.state));
    }""")


def test_killed_gate_loses_nothing_and_doubles_nothing(new_page, region):
    alice, bob = new_page(), new_page()
    register(alice, "alice", "alice-pass-1")
    register(bob, "bob", "bob-pass-1")
    open_chat(alice, "bob")
    send(alice, "before the crash")
    expect(bubble(alice, "before the crash")).to_have_attribute("data-status", "sent")
    expect(conv_entry(bob, "alice")).to_contain_text("before the crash")
    for page in (alice, bob):
        record_states(page)

    gate = region.pid("gate-1")
    worker = region.pid("im-1")
    # 1. The gate freezes: a Send waits, visibly pending, for a SendOk that cannot come.
    os.kill(gate, signal.SIGSTOP)
    send(alice, "sent to a frozen gate")
    expect(bubble(alice, "sent to a frozen gate")).to_have_attribute("data-status", "pending")
    os.kill(gate, signal.SIGKILL)
    expect(alice.locator("#conn")).to_have_attribute("data-state", "online", timeout=SLOW)
    expect(bubble(alice, "sent to a frozen gate")).to_have_attribute("data-status", "sent", timeout=SLOW)

    # 2. The worker freezes: the Send reaches the store only after the gate
    # that carried it is dead, so its SendOk is lost; the resend (same cmid)
    # gets the first SendOk back instead of storing it twice.
    gate = region.pid("gate-1")
    os.kill(worker, signal.SIGSTOP)
    try:
        send(alice, "sent while the worker sleeps")
        expect(bubble(alice, "sent while the worker sleeps")).to_have_attribute("data-status", "pending")
        os.kill(gate, signal.SIGKILL)
    finally:
        os.kill(worker, signal.SIGCONT)
    expect(bubble(alice, "sent while the worker sleeps")).to_have_attribute("data-status", "sent", timeout=SLOW)

    for page in (alice, bob):
        expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=SLOW)
        states = page.evaluate("window.seenStates")
        assert "reconnecting" in states and states[-1] == "online", states
    texts = ["before the crash", "sent to a frozen gate", "sent while the worker sleeps"]
    # Bob missed pushes while his connection was down: Sync fills the gap, once.
    open_chat(bob, "alice")
    for text in texts:
        expect(bubble(bob, text)).to_have_count(1, timeout=SLOW)
        expect(bubble(alice, text)).to_have_count(1)
        expect(bubble(alice, text)).to_have_attribute("data-status", "read", timeout=SLOW)
    # What the store holds, read afresh: each message exactly once.
    for page in (alice, bob):
        page.reload()
        expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=SLOW)
        open_chat(page, "alice" if page is bob else "bob")
        for text in texts:
            expect(bubble(page, text)).to_have_count(1)
        expect(page.locator(".msg")).to_have_count(len(texts))


def test_reload_resends_what_was_not_acknowledged(new_page, region):
    """A Send without its SendOk survives a reload of the page: the page
    resends it, same cmid, once it is logged in again."""
    kim, lee = new_page(), new_page()
    register(kim, "kim", "kim-pass-1")
    register(lee, "lee", "lee-pass-1")
    open_chat(kim, "lee")
    worker = region.pid("im-1")
    os.kill(worker, signal.SIGSTOP)
    try:
        send(kim, "written before the reload")
        expect(bubble(kim, "written before the reload")).to_have_attribute("data-status", "pending")
        kim.reload()  # the worker still sleeps: the token login waits for it
        expect(kim.locator("#conn")).to_have_attribute("data-state", "connecting")
    finally:
        os.kill(worker, signal.SIGCONT)
    expect(kim.locator("#conn")).to_have_attribute("data-state", "online", timeout=SLOW)
    open_chat(kim, "lee")
    expect(bubble(kim, "written before the reload")).to_have_attribute("data-status", "sent", timeout=SLOW)
    expect(bubble(lee, "written before the reload")).to_have_count(0)  # not open: in the list
    expect(conv_entry(lee, "kim").locator(".badge")).to_have_text("1", timeout=SLOW)
    lee.reload()
    open_chat(lee, "kim")
    expect(bubble(lee, "written before the reload")).to_have_count(1)
    expect(bubble(kim, "written before the reload")).to_have_attribute("data-status", "read")
    expect(kim.locator(".msg")).to_have_count(1)
