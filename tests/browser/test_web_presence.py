"""Presence and typing (protocol section 7) in the web chat, two browsers
against a real region: a peer's dot once it has written to you, its
"typing…" under its name while it writes, and offline when it leaves."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.web import conv_entry, open_chat, register, send


def test_presence_and_typing_between_two_browsers(new_page):
    erin, finn = new_page(), new_page()
    register(erin, "erin", "erin-pass-1")
    register(finn, "finn", "finn-pass-1")
    open_chat(erin, "finn")
    send(erin, "hi finn")
    open_chat(finn, "erin")
    # erin wrote to finn: finn sees her presence.
    expect(conv_entry(finn, "erin").locator(".presence")).to_have_attribute("data-state", "online")
    expect(finn.locator("#peer-status")).to_have_text("online")
    # finn's first message makes erin see him too.
    send(finn, "hi erin")
    expect(conv_entry(erin, "finn").locator(".presence")).to_have_attribute("data-state", "online")
    # finn writes: erin, who has his conversation open, sees it.
    finn.locator("#text").fill("a long thought")
    expect(erin.locator("#peer-status")).to_have_text("typing…")
    # finn leaves: erin sees him offline, with when he was last seen.
    finn.locator("#logout").click()
    expect(conv_entry(erin, "finn").locator(".presence")).to_have_attribute("data-state", "offline")
    expect(erin.locator("#peer-status")).to_contain_text("last seen", timeout=20000)
