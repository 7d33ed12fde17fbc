"""Headless Chromium (Debian's, at /usr/bin/chromium) driven by Playwright,
against a real region. A failing test leaves a screenshot of every page it
opened in test-artifacts/ (named after the test)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.region import Region

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("SIMZMQ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1200, "height": 760}


@pytest.fixture(scope="module")
def chromium():
    # Per module, not per session: Playwright's sync API keeps an event loop
    # running on this thread while it is open, and later tests use asyncio.run.
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: bin/test installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    """One region per test module: tests in a module use user names of their own."""
    with Region(tmp_path_factory.mktemp("web") / "data") as r:
        yield r


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.failed_call = report.failed


@pytest.fixture
def new_page(chromium, request, region):
    """new_page(viewport=DESKTOP) -> a page at the region's web chat, in a
    browser context of its own (its own sessionStorage)."""
    contexts, pages = [], []

    def make(viewport=DESKTOP, open_page=True):
        context = chromium.new_context(viewport=viewport)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(20000)
        page.console_messages = []
        page.on("console", lambda m: page.console_messages.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: page.console_messages.append(f"pageerror: {e}"))
        pages.append(page)
        if open_page:
            page.goto(f"http://127.0.0.1:{region.http_port}/")
        return page

    yield make
    if getattr(request.node, "failed_call", False):
        ARTIFACTS.mkdir(exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
        for i, page in enumerate(pages):
            try:
                page.screenshot(path=str(ARTIFACTS / f"{name}-{i}.png"), full_page=True)
                (ARTIFACTS / f"{name}-{i}.console.txt").write_text("\n".join(page.console_messages))
            except Exception as exc:  # a crashed page: say so, keep the test's own error
                print(f"no screenshot of page {i}: {exc}")
    for context in contexts:
        context.close()
