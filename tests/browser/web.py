"""What a person does on the web chat, as Playwright steps, and a TCP user
(simzmq.client) on a thread of its own beside the synchronous browser."""

from __future__ import annotations

import asyncio
import threading

from playwright.sync_api import Page, expect

from simzmq.client import Client


def register(page: Page, user: str, password: str) -> None:
    page.fill("#user", user)
    page.fill("#password", password)
    page.click("#register-btn")
    logged_in(page, user)


def log_in(page: Page, user: str, password: str) -> None:
    page.fill("#user", user)
    page.fill("#password", password)
    page.click("#login-btn")
    logged_in(page, user)


def logged_in(page: Page, user: str) -> None:
    expect(page.locator("#chat-view")).to_be_visible()
    expect(page.locator("#me-name")).to_have_text(user)
    expect(page.locator("#conn")).to_have_attribute("data-state", "online")


def open_chat(page: Page, peer: str) -> None:
    """Open a conversation from the list, else start it from the box above."""
    existing = page.locator(f'.conv[data-peer="{peer}"]')
    if existing.count() and existing.is_visible():
        existing.click()
    else:
        page.fill("#new-peer", peer)
        page.press("#new-peer", "Enter")
    expect(page.locator("#peer-name")).to_have_text(peer)


def send(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def bubble(page: Page, text: str):
    """The message bubble(s) whose text is exactly `text`."""
    return page.locator(".msg").filter(has=page.locator(".body", has_text=text))


def conv_entry(page: Page, peer: str):
    return page.locator(f'.conv[data-peer="{peer}"]')


class TcpUser:
    """A simzmq.client.Client on its own event loop thread, registered and
    logged in; calls block. Use it in a `with`."""

    def __init__(self, region, user: str, password: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = self.run(self._make(region, user, password))

    def __enter__(self) -> "TcpUser":
        try:
            self.run(self.client.register())
            self.run(self.client.login())
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def _make(self, region, user, password):
        return Client("127.0.0.1", region.gate_port, region.gate_pk, user, password, device="tcp")

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def next_event(self, kind: type, timeout: float = 30):
        """The next event of this type (NewMsg, ReadNotice); others are skipped."""
        async def wait():
            while True:
                event = await self.client.events.get()
                if isinstance(event, kind):
                    return event
        return self.run(asyncio.wait_for(wait(), timeout), timeout + 5)

    def close(self):
        self.run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
