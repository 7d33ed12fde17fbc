"""The web chat in headless Chromium against a real region."""

from __future__ import annotations

import json
from pathlib import Path

from playwright.sync_api import expect

from simzmq.wire import messages as m
from tests.browser.conftest import PHONE, ROOT
from tests.browser.web import TcpUser, bubble, conv_entry, log_in, open_chat, register, send

VECTORS = ROOT.parent / "shared" / "vectors"


def test_page_headers_and_config(region):
    status, body = region.http_get("/web/config.json")
    assert status == 200 and body["gate_pk"] == region.gate_pk.hex() and body["ws_path"] == "/ws"
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{region.http_port}/") as r:
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        page = r.read().decode()
    assert '<script type="importmap">' in page and "/vendor/libsodium-wrappers-sumo@" in page
    with urllib.request.urlopen(f"http://127.0.0.1:{region.http_port}/static/js/client.js") as r:
        assert r.headers["Content-Type"].startswith("text/javascript") and r.headers["Cache-Control"] == "no-cache"
    vendor = page.split('"libsodium-sumo":"')[1].split('"')[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{region.http_port}{vendor}") as r:
        assert "immutable" in r.headers["Cache-Control"]
    assert region.http_get("/static/../__init__.py")[0] in (403, 404)


def test_vectors_pass_in_the_browser(new_page, region):
    """The page's own modules, loaded by Chromium, pass shared/vectors (the same checks as node --test)."""
    page = new_page()
    expect(page.locator("#login-view")).to_be_visible()
    # Serve the repository's tests/js and the page's modules under /__test__/ on the page's origin.
    page.route("**/__test__/**", lambda route: route.fulfill(
        path=str(ROOT / route.request.url.split("/__test__/", 1)[1]), content_type="text/javascript"))
    result = page.evaluate("""async ([codecVectors, handshakeVectors]) => {
        const checks = await import('/__test__/tests/js/vectors.mjs');
        const sodium = (await import('libsodium-wrappers-sumo')).default;
        await sodium.ready;
        const n = checks.checkCodec(codecVectors);
        checks.checkHandshake(sodium, handshakeVectors);
        return n;
    }""", [json.loads((VECTORS / "codec.json").read_text()), json.loads((VECTORS / "handshake.json").read_text())])
    codec = json.loads((VECTORS / "codec.json").read_text())
    assert result == 2 * len(codec["messages"]) + len(codec["malformed"])


def test_two_browser_users_chat_with_unread_counts_and_receipts(new_page):
    alice, bob = new_page(), new_page()
    register(alice, "alice", "alice-pass-1")
    register(bob, "bob", "bob-pass-1")
    open_chat(alice, "bob")
    send(alice, "hi bob")
    expect(bubble(alice, "hi bob")).to_have_attribute("data-status", "sent")
    # Bob's list shows the conversation, its last message and one unread, live.
    expect(conv_entry(bob, "alice")).to_contain_text("hi bob")
    expect(conv_entry(bob, "alice").locator(".badge")).to_have_text("1")
    open_chat(bob, "alice")
    expect(bubble(bob, "hi bob")).to_have_count(1)
    expect(conv_entry(bob, "alice").locator(".badge")).to_have_count(0)
    # Opening it read it: alice sees the receipt.
    expect(bubble(alice, "hi bob")).to_have_attribute("data-status", "read")
    send(bob, "hello alice\nsecond line")
    expect(bubble(alice, "hello alice")).to_have_count(1)
    expect(bubble(alice, "hello alice").locator(".body")).to_have_text("hello alice\nsecond line")
    # Alice has the conversation open: bob's message is read at once.
    expect(bubble(bob, "hello alice")).to_have_attribute("data-status", "read")
    expect(conv_entry(alice, "bob").locator(".badge")).to_have_count(0)


def test_browser_and_tcp_client_chat_both_ways(new_page, region):
    with TcpUser(region, "carol", "carol-pass-1") as carol:
        dave = new_page()
        register(dave, "dave", "dave-pass-1")
        # browser -> TCP: a push, then a read receipt back.
        open_chat(dave, "carol")
        send(dave, "from the browser")
        pushed = carol.next_event(m.NewMsg).msg
        assert (pushed.sender, pushed.to, pushed.body) == ("dave", "carol", b"from the browser")
        expect(bubble(dave, "from the browser")).to_have_attribute("data-status", "sent")
        carol.run(carol.client.read("dave", pushed.msg_id))
        expect(bubble(dave, "from the browser")).to_have_attribute("data-status", "read")
        # TCP -> browser: live in the open conversation, and the browser's read reaches carol.
        ok = carol.run(carol.client.send("dave", "from the terminal".encode()))
        expect(bubble(dave, "from the terminal")).to_have_count(1)
        notice = carol.next_event(m.ReadNotice)
        assert (notice.reader, notice.peer, notice.msg_id) == ("dave", "carol", ok.msg_id)
        # Text is text: markup in a message is shown, never run.
        carol.run(carol.client.send("dave", b"<img src=x onerror=alert(1)> <b>bold</b>"))
        expect(bubble(dave, "<b>bold</b>")).to_have_count(1)
        assert dave.locator(".msg img, .msg b").count() == 0


def test_reload_keeps_the_session_and_history(new_page):
    erin = new_page()
    register(erin, "erin", "erin-pass-1")
    open_chat(erin, "erin")
    for i in range(3):
        send(erin, f"note {i}")
    expect(erin.locator('.msg[data-status="sent"]')).to_have_count(3)
    stored = erin.evaluate("JSON.stringify(sessionStorage)")
    assert "erin-pass-1" not in stored and "token" in stored
    erin.reload()
    # Back in without a password, by the resume token; history from /v1/history.
    expect(erin.locator("#chat-view")).to_be_visible()
    expect(erin.locator("#conn")).to_have_attribute("data-state", "online")
    expect(conv_entry(erin, "erin")).to_contain_text("note 2")
    open_chat(erin, "erin")
    for i in range(3):
        expect(bubble(erin, f"note {i}")).to_have_count(1)
    # Logging out revokes the token: a reload asks for the password again.
    erin.click("#logout")
    expect(erin.locator("#login-view")).to_be_visible()
    erin.reload()
    expect(erin.locator("#login-view")).to_be_visible()
    log_in(erin, "erin", "erin-pass-1")


def test_history_scrolls_back(new_page, region):
    with TcpUser(region, "frank", "frank-pass-1") as frank:
        grace = new_page()
        register(grace, "grace", "grace-pass-1")
        for i in range(70):
            frank.run(frank.client.send("grace", f"line {i:02d}".encode()))
        expect(conv_entry(grace, "frank").locator(".badge")).to_have_text("70")
        grace.reload()  # a fresh page holds nothing: the conversation comes from /v1/history
        expect(conv_entry(grace, "frank").locator(".badge")).to_have_text("70")
        open_chat(grace, "frank")
        expect(bubble(grace, "line 69")).to_be_visible()
        expect(bubble(grace, "line 00")).to_have_count(0)  # older than the first page of 50
        grace.locator("#messages").evaluate("el => { el.scrollTop = 0; }")
        expect(bubble(grace, "line 00")).to_have_count(1)
        expect(grace.locator(".msg")).to_have_count(70)
        expect(grace.locator("#older")).to_be_hidden()


def test_bad_input_shows_a_clear_message(new_page):
    page = new_page()
    register(page, "heidi", "heidi-pass-1")
    # A message over max_body: refused by the page, with the limit, and nothing sent.
    open_chat(page, "heidi")
    page.fill("#text", "x" * (64 * 1024 + 1))
    page.click("#send")
    expect(page.locator("#send-error")).to_contain_text("at most 64 KB")
    expect(page.locator(".msg")).to_have_count(0)
    # A user who does not exist: the Send fails for good, and says why.
    open_chat(page, "nobody-here")
    send(page, "anyone?")
    expect(bubble(page, "anyone?")).to_have_attribute("data-status", "failed")
    expect(bubble(page, "anyone?")).to_contain_text("There is no user of that name.")
    page.click("#logout")
    expect(page.locator("#login-view")).to_be_visible()

    other = new_page()
    # A taken name.
    other.fill("#user", "heidi")
    other.fill("#password", "another-pass")
    other.click("#register-btn")
    expect(other.locator("#login-error")).to_have_text("That user name is taken. Pick another, or log in.")
    # A wrong password.
    other.click("#login-btn")
    expect(other.locator("#login-error")).to_have_text("Wrong user name or password.")
    # A malformed name never leaves the page.
    other.fill("#user", "no spaces please")
    other.click("#login-btn")
    expect(other.locator("#login-error")).to_contain_text("User names are 1–64")
    expect(other.locator("#login-view")).to_be_visible()


def test_phone_screen_and_keyboard_only(new_page):
    buddy = new_page()
    register(buddy, "ivan", "ivan-pass-1")
    page = new_page(viewport=PHONE)
    keys = page.keyboard
    # Log in by keyboard: the name field has the focus.
    expect(page.locator("#user")).to_be_focused()
    keys.type("judy")
    keys.press("Tab")
    keys.type("judy-pass-1")
    keys.press("Tab")  # Log in
    keys.press("Tab")  # Create account
    keys.press("Enter")
    expect(page.locator("#chat-view")).to_be_visible()
    # The start box has the focus: a name, Enter, a message, Enter.
    expect(page.locator("#new-peer")).to_be_focused()
    keys.type("ivan")
    keys.press("Enter")
    expect(page.locator("#text")).to_be_focused()
    expect(page.locator(".sidebar")).to_be_hidden()  # one pane at a time on a phone
    keys.type("typed, not clicked")
    keys.press("Enter")
    expect(bubble(page, "typed, not clicked")).to_have_attribute("data-status", "sent")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways: {width}px"
    # Escape goes back to the list, the focus on the conversation it left.
    keys.press("Escape")
    expect(page.locator(".sidebar")).to_be_visible()
    expect(conv_entry(page, "ivan")).to_be_focused()
    keys.press("Enter")
    expect(page.locator("#peer-name")).to_have_text("ivan")
    expect(bubble(buddy, "typed, not clicked")).to_have_count(0)  # not open: only in the list
    expect(conv_entry(buddy, "judy").locator(".badge")).to_have_text("1")
