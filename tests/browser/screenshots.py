"""The screenshots in docs/web/, taken from the current code:

    .venv/bin/python -m tests.browser.screenshots [OUT_DIR]   (default docs/web)

test_web_screenshots.py runs the same scenario into a temporary directory."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import expect

from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PHONE, ROOT
from tests.browser.web import TcpUser, bubble, conv_entry, open_chat, register, send

NAMES = ["login.png", "chat.png", "pending.png", "phone-list.png", "phone-chat.png", "too-large.png"]


def take_screenshots(browser, region, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{region.http_port}/"
    contexts = []

    def page_at(viewport):
        context = browser.new_context(viewport=viewport, color_scheme="light")
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(20000)
        page.goto(url)
        return page

    shots = []

    def shot(page, name):
        path = out / name
        page.screenshot(path=str(path))
        shots.append(path)

    try:
        with TcpUser(region, "maria", "maria-pass-1") as maria, \
                TcpUser(region, "team-lead", "team-lead-pass-1") as lead:
            alice = page_at(DESKTOP)
            alice.fill("#user", "alice")
            shot(alice, "login.png")
            register(alice, "alice", "alice-pass-1")
            bob = page_at(DESKTOP)
            register(bob, "bob", "bob-pass-1")
            maria.run(maria.client.send("alice", b"Lunch at noon?"))
            lead.run(lead.client.send("alice", b"The release went out. Thanks, all!"))
            lead.run(lead.client.send("alice", b"Review notes are in the doc."))
            open_chat(alice, "bob")
            send(alice, "Hi Bob! Is the region up on your side?")
            open_chat(bob, "alice")
            send(bob, "Yes: two gates, the broker pair and three workers.")
            send(bob, "I killed a gate on purpose and the chat reconnected by itself.")
            expect(bubble(alice, "reconnected by itself")).to_have_count(1)
            send(alice, "Nice. Nothing lost?")
            expect(bubble(alice, "Nothing lost?")).to_have_attribute("data-status", "read")
            send(alice, "Sending one more while you look away")
            expect(bubble(alice, "while you look away")).to_have_attribute("data-status", "read")
            expect(conv_entry(alice, "team-lead").locator(".badge")).to_have_text("2")
            shot(alice, "chat.png")
            # A frozen gate: the Send stays pending (◷) until a SendOk comes.
            gate = region.pid("gate-1")
            os.kill(gate, signal.SIGSTOP)
            try:
                send(alice, "This one waits for the server")
                expect(bubble(alice, "waits for the server")).to_have_attribute("data-status", "pending")
                shot(alice, "pending.png")
            finally:
                os.kill(gate, signal.SIGCONT)
            expect(bubble(alice, "waits for the server")).to_have_attribute("data-status", "read")

            phone = page_at(PHONE)
            register(phone, "bob-phone", "bob-phone-pass-1")
            for friend in (maria, lead):
                friend.run(friend.client.send("bob-phone", b"Hello from the terminal client"))
            alice_to_phone = "Your phone works too. Keyboard only, even."
            open_chat(alice, "bob-phone")
            send(alice, alice_to_phone)
            open_chat(alice, "bob")  # so the phone's answer stays unread, its state "Sent"
            expect(conv_entry(phone, "alice").locator(".badge")).to_have_text("1")
            shot(phone, "phone-list.png")
            open_chat(phone, "alice")
            phone.fill("#text", "Reading you on a small screen.")
            phone.press("#text", "Enter")
            expect(bubble(phone, "small screen")).to_have_attribute("data-status", "sent")
            shot(phone, "phone-chat.png")

            phone.fill("#text", "x" * 70000)
            phone.click("#send")
            expect(phone.locator("#send-error")).to_be_visible()
            phone.fill("#text", "")
            shot(phone, "too-large.png")
    finally:
        for context in contexts:
            context.close()
    return shots


def main() -> None:
    from playwright.sync_api import sync_playwright

    from tests.region import Region

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "web"
    with tempfile.TemporaryDirectory() as tmp, Region(Path(tmp) / "data") as region, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        for path in take_screenshots(browser, region, out):
            print(path)
        browser.close()


if __name__ == "__main__":
    main()
