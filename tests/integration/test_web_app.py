"""The web app (chatnode/web) in a real browser: Debian's Chromium driven by Playwright,
against two real nodes serving it (CHATNODE_WEB_DIR). Two users in two browser contexts
(two browsers, one phone-sized): sign up, chat both ways with ticks that follow the
protocol, typing, online and last seen, a network cut while the other sends, a block,
and a second tab of the same user. Screenshots go to build/screenshots/."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatnode.__main__ import WEB_DIR
from tests.integration.harness import NodeProc, Stack, new_mobile

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
# What the machine's closed network needs (no Google services), as root, headless.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CHATNODE_REQUIRE_BROWSER"),
    reason="no chromium here (scripts/test installs Debian's)",
)


@pytest.fixture(scope="module")
def web_nodes(stack: Stack, workdir: Path) -> Iterator[tuple[NodeProc, NodeProc]]:
    env = {"CHATNODE_WEB_DIR": str(WEB_DIR)}
    a = NodeProc(stack, "web-a", workdir, **env).start()
    b = NodeProc(stack, "web-b", workdir, **env).start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        await b.close()


async def sign_up(page: Any, url: str, mobile: str, name: str) -> None:
    await page.goto(url)
    await page.fill("#mobile", mobile)
    await page.fill("#password", "password123")
    await page.fill("#name", name)
    await page.click("#signup-button")
    await page.wait_for_selector("#conn[data-state=online]", timeout=WAIT_MS)


async def open_chat(page: Any, mobile: str) -> None:
    await page.fill("#contact-number", mobile)
    await page.press("#contact-number", "Enter")
    await page.wait_for_selector("#conversation:not([hidden])", timeout=WAIT_MS)


async def send(page: Any, text: str) -> None:
    await page.fill("#text", text)
    await page.press("#text", "Enter")


def bubble(text: str, mine: bool) -> str:
    return f"#messages li.{'mine' if mine else 'theirs'}:has(.body:text-is({text!r}))"


async def status_of(page: Any, text: str, status: str) -> None:
    await page.wait_for_selector(f"{bubble(text, True)}[data-status={status}]", timeout=WAIT_MS)


async def bodies(page: Any) -> list[str]:
    texts: list[str] = await page.locator("#messages li .body").all_text_contents()
    return texts


async def test_two_users_chat_in_real_browsers(
    browser: Any, web_nodes: tuple[NodeProc, NodeProc]
) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    a_url, b_url = web_nodes[0].http + "/", web_nodes[1].http + "/"
    alice, bob = new_mobile(), new_mobile()
    ctx_a = await browser.new_context(viewport={"width": 1100, "height": 720})
    ctx_b = await browser.new_context(viewport={"width": 390, "height": 760}, is_mobile=True)
    try:
        pa, pb = await ctx_a.new_page(), await ctx_b.new_page()
        await sign_up(pa, a_url, alice, "Alice")  # alice on node a, bob on node b
        await sign_up(pb, b_url, bob, "Bob")
        await open_chat(pb, alice)
        await open_chat(pa, bob)

        # typing reaches the other side; online shows while the other is connected
        await pa.type("#text", "hello bob", delay=20)
        await pb.wait_for_selector("#peer-status:text('typing…')", timeout=WAIT_MS)
        await pa.wait_for_selector("#peer-status:text('online')", timeout=WAIT_MS)
        await pa.press("#text", "Enter")
        # bob has the conversation open and visible: delivered, then read
        await pb.wait_for_selector(bubble("hello bob", False), timeout=WAIT_MS)
        await status_of(pa, "hello bob", "read")
        await send(pb, "hi alice")
        await pa.wait_for_selector(bubble("hi alice", False), timeout=WAIT_MS)
        await status_of(pb, "hi alice", "read")

        # bob's network is cut; alice's sends are accepted (one tick) and wait for him
        await ctx_b.set_offline(True)
        await pb.wait_for_selector("#offline-bar:text('offline')", timeout=WAIT_MS)
        await pa.wait_for_selector("#peer-status:text('last seen')", timeout=WAIT_MS)
        for i in range(3):
            await send(pa, f"while you were away {i}")
        for i in range(3):
            await status_of(pa, f"while you were away {i}", "accepted")
        await pa.screenshot(path=str(SHOTS / "alice-desktop-while-bob-is-offline.png"))
        await ctx_b.set_offline(False)  # back: everything once, in order, then read
        for i in range(3):
            await status_of(pa, f"while you were away {i}", "read")
        expected = ["hello bob", "hi alice"] + [f"while you were away {i}" for i in range(3)]
        assert await bodies(pb) == expected
        await pb.screenshot(path=str(SHOTS / "bob-phone-after-reconnect.png"))

        # a second tab of alice is a device of her own: it shows the same conversation,
        # gets what bob sends, and what it sends shows in the first tab
        pa2 = await ctx_a.new_page()
        await pa2.goto(a_url)
        await pa2.fill("#mobile", alice)
        await pa2.fill("#password", "password123")
        await pa2.click("#login-button")
        await pa2.wait_for_selector("#conn[data-state=online]", timeout=WAIT_MS)
        await pa2.click(f"#contacts li[data-mobile='{bob}']")
        await pa2.wait_for_selector(bubble("while you were away 2", True), timeout=WAIT_MS)
        await send(pb, "to both tabs")
        await pa2.wait_for_selector(bubble("to both tabs", False), timeout=WAIT_MS)
        await pa.wait_for_selector(bubble("to both tabs", False), timeout=WAIT_MS)
        await send(pa2, "from the second tab")
        await pa.wait_for_selector(bubble("from the second tab", True), timeout=WAIT_MS)
        await pb.wait_for_selector(bubble("from the second tab", False), timeout=WAIT_MS)
        assert (await bodies(pa)).count("to both tabs") == 1
        await pa2.close()

        # bob blocks alice: her messages and her typing no longer reach him
        await pb.click("#block")
        await pb.wait_for_selector("#block:text('Unblock')", timeout=WAIT_MS)
        await pa.type("#text", "are you there?", delay=20)
        await pa.press("#text", "Enter")
        await status_of(pa, "are you there?", "accepted")  # a blocked sender is not told
        await pb.wait_for_timeout(1500)
        assert "are you there?" not in await bodies(pb)
        assert "typing" not in (await pb.text_content("#peer-status") or "")
        await pb.click("#block")  # unblocked: new messages flow again
        await pb.wait_for_selector("#block:text('Block')", timeout=WAIT_MS)
        await send(pa, "after the unblock")
        await pb.wait_for_selector(bubble("after the unblock", False), timeout=WAIT_MS)
        assert "are you there?" not in await bodies(pb)
    finally:
        await ctx_a.close()
        await ctx_b.close()
