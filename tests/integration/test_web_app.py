"""The web app (chatnode/web) in a real browser: Debian's Chromium driven by Playwright,
against two real nodes serving it (CHATNODE_WEB_DIR). Two users in two browser contexts
(two browsers, one phone-sized): sign up, chat both ways with ticks that follow the
protocol, typing, online and last seen, a network cut while the other sends, a block,
and a second tab of the same user. Screenshots go to build/screenshots/."""

from __future__ import annotations

import os
import shutil
import signal
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
BROWSER_HERE = os.path.exists(CHROMIUM) or bool(os.environ.get("CHATNODE_REQUIRE_BROWSER"))


def app_nodes(stack: Stack, workdir: Path, *names: str) -> tuple[NodeProc, ...]:
    """Nodes serving the app, each naming every node's socket and API, and letting the
    pages of every node call it (as `chatnode dev` does); not started."""
    nodes = tuple(NodeProc(stack, name, workdir, CHATNODE_WEB_DIR=str(WEB_DIR)) for name in names)
    apis = ",".join(n.http for n in nodes)
    for n in nodes:
        n.env["CHATNODE_WEB_SOCKETS"] = ",".join(n.ws for n in nodes)
        n.env["CHATNODE_WEB_APIS"] = n.env["CHATNODE_CORS_ORIGINS"] = apis
    return nodes


@pytest.fixture(scope="module")
def web_nodes(stack: Stack, workdir: Path) -> Iterator[tuple[NodeProc, NodeProc]]:
    a, b = app_nodes(stack, workdir, "web-a", "web-b")
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    if not BROWSER_HERE:
        pytest.skip("no chromium here (scripts/test installs Debian's)")
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


TICKS = ("sending", "accepted", "delivered", "read")


async def status_of(page: Any, text: str, status: str) -> None:
    """Waits until the own bubble's tick is exactly `status`."""
    await page.wait_for_selector(f"{bubble(text, True)}[data-status={status}]", timeout=WAIT_MS)


async def status_reaches(page: Any, text: str, status: str) -> None:
    """Waits until the own bubble's tick is `status` or a later one: a tick may pass
    through `accepted` faster than the page is polled when the recipient is online."""
    later = ",".join(f"[data-status={s}]" for s in TICKS[TICKS.index(status) :])
    await page.wait_for_selector(f"{bubble(text, True)}:is({later})", timeout=WAIT_MS)


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
        await pb.type("#text", "hi alice", delay=20)  # the contact list shows it too
        await pa.wait_for_selector(
            f"#contacts li[data-mobile='{bob}'] .seen:text('typing…')", timeout=WAIT_MS
        )
        await pb.press("#text", "Enter")
        await pa.wait_for_selector(bubble("hi alice", False), timeout=WAIT_MS)
        await status_of(pb, "hi alice", "read")

        # bob goes back to his contacts: alice's next message is delivered, not read,
        # until he opens the conversation again
        await pb.click("#back")
        await send(pa, "read me later")
        await status_of(pa, "read me later", "delivered")
        await pa.wait_for_timeout(1000)
        await status_of(pa, "read me later", "delivered")  # still: bob has not seen it
        await pb.wait_for_selector(f"#contacts li[data-mobile='{alice}'] .badge", timeout=WAIT_MS)
        await pb.click(f"#contacts li[data-mobile='{alice}']")
        await status_of(pa, "read me later", "read")

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
        await pb.wait_for_selector(bubble("while you were away 2", False), timeout=WAIT_MS)
        expected = ["hello bob", "hi alice", "read me later"] + [
            f"while you were away {i}" for i in range(3)
        ]
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


@pytest.fixture
def doomed_nodes(stack: Stack, workdir: Path) -> Iterator[tuple[NodeProc, NodeProc]]:
    a, b = app_nodes(stack, workdir, "web-doomed", "web-survivor")
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


async def test_a_node_killed_mid_conversation_loses_and_doubles_nothing(
    browser: Any, doomed_nodes: tuple[NodeProc, NodeProc]
) -> None:
    """Alice's page and socket are on the node that dies (SIGKILL): her app moves its
    socket to the other node; what she sent meanwhile and what Bob sent her arrive
    once, in order, and her ticks end at read."""
    doomed, survivor = doomed_nodes
    alice, bob = new_mobile(), new_mobile()
    ctx_a, ctx_b = await browser.new_context(), await browser.new_context()
    try:
        pa, pb = await ctx_a.new_page(), await ctx_b.new_page()
        await sign_up(pa, doomed.http + "/", alice, "Alice")
        await sign_up(pb, survivor.http + "/", bob, "Bob")
        await open_chat(pb, alice)
        await open_chat(pa, bob)
        await send(pa, "before")
        await status_of(pa, "before", "read")
        doomed.signal(signal.SIGKILL)
        await pa.wait_for_selector("#offline-bar:not(:empty)", timeout=WAIT_MS)
        await send(pb, "while your node was down")
        # stored before alice sends again (she may already be back: then it is read at once)
        await status_reaches(pb, "while your node was down", "accepted")
        await send(pa, "during 1")  # into alice's outbox while she has no socket, or
        await send(pa, "during 2")  # just after she got one: stored after bob's anyway
        await pa.wait_for_selector("#conn[data-state=online]", timeout=WAIT_MS)
        for text in ("during 1", "during 2"):
            await status_of(pa, text, "read")
        await pa.wait_for_selector(bubble("while your node was down", False), timeout=WAIT_MS)
        await pb.wait_for_selector(bubble("during 2", False), timeout=WAIT_MS)
        # both sides in the order the server stored them
        stored = ["before", "while your node was down", "during 1", "during 2"]
        assert await bodies(pb) == stored
        assert await bodies(pa) == stored
        # REST moves too: her page's node is gone, its API with it; a block goes to the
        # other node's (CORS), and holds: bob's next message does not reach her
        await pa.click("#block")
        await pa.wait_for_selector("#block:text('Unblock')", timeout=WAIT_MS)
        await send(pb, "after her block")
        await status_of(pb, "after her block", "accepted")
        await pa.click("#block")
        await pa.wait_for_selector("#block:text('Block')", timeout=WAIT_MS)
        await send(pb, "after her unblock")
        await pa.wait_for_selector(bubble("after her unblock", False), timeout=WAIT_MS)
        assert "after her block" not in await bodies(pa)
    finally:
        await ctx_a.close()
        await ctx_b.close()


async def test_the_app_is_served_with_its_policy_and_nothing_else(
    web_nodes: tuple[NodeProc, NodeProc],
) -> None:
    import aiohttp

    node = web_nodes[0]
    async with aiohttp.ClientSession() as http:
        async with http.get(node.http + "/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            csp = r.headers["Content-Security-Policy"]
            assert "script-src" not in csp and "default-src 'self'" in csp
            assert f"ws://127.0.0.1:{node.ws_port}" in csp and "connect-src 'self' ws: " not in csp
        async with http.get(node.http + "/config.js") as r:
            assert f'"wsPort":{node.ws_port}' in await r.text()
        for path in ("/pyproject.toml", "/..%2Fpyproject.toml", "/web/app.js", "/README.md"):
            async with http.get(node.http + path) as r:
                assert r.status == 404, path
        async with http.get(node.http + "/", headers={"Host": "evil; script-src *"}) as r:
            assert "script-src" not in r.headers["Content-Security-Policy"]


async def test_the_api_answers_other_origins_only_when_listed(
    web_nodes: tuple[NodeProc, NodeProc],
) -> None:
    """CHATNODE_CORS_ORIGINS: the page another node served may call this node's API
    (preflight, answers, errors); any other origin gets no CORS header. The app learns
    the other APIs from config.js (CHATNODE_WEB_APIS), and its policy allows them."""
    import aiohttp

    node, other = web_nodes
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    async with aiohttp.ClientSession() as http:
        async with http.options(
            node.http + "/block-action/block", headers={"Origin": other.http, **preflight}
        ) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == other.http
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        async with http.get(
            node.http + "/profile/lastseen?mobileNo=1", headers={"Origin": other.http}
        ) as r:
            assert r.status == 401  # no token: the error is readable by that page too
            assert r.headers["Access-Control-Allow-Origin"] == other.http
        evil = "http://evil.example"
        async with http.options(
            node.http + "/block-action/block", headers={"Origin": evil, **preflight}
        ) as r:
            assert "Access-Control-Allow-Origin" not in r.headers and r.status == 404
        async with http.get(node.http + "/healthz", headers={"Origin": evil}) as r:
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
            assert r.headers["Vary"] == "Origin"  # a cache keeps answers apart by origin
        async with http.get(node.http + "/config.js") as r:
            assert f'"apis":["{node.http}","{other.http}"]' in await r.text()
        async with http.get(node.http + "/") as r:
            assert other.http in r.headers["Content-Security-Policy"]
