"""The README's quickstart, run as written against two real nodes: Alice's message to Bob
is accepted and delivered across nodes, so a newcomer who pastes it sees the same."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

from chatnode import client as cn
from tests.integration.harness import NodeProc, new_mobile

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# Only fenced blocks whose info string is exactly this are the quickstart.
FENCE = re.compile(r"^```sh quickstart\n(.*?)^```$", re.MULTILINE | re.DOTALL)
ASSIGNMENT = re.compile(r"^([A-Z_]+)=(\S+)", re.MULTILINE)
FRAME_LINE = re.compile(r"^(alice|bob) < (\{.*\})$", re.MULTILINE)


def quickstart_blocks(text: str) -> list[str]:
    blocks = FENCE.findall(text)
    assert len(blocks) >= 2, "README.md has no ```sh quickstart blocks"
    return blocks


def script_for(blocks: list[str], overrides: dict[str, str]) -> str:
    """The blocks as one bash script, with this test's nodes and users assigned right
    after the README's first block (the one naming them)."""
    named = dict(ASSIGNMENT.findall(blocks[0]))
    assert set(named) == set(overrides), f"the quickstart's first block names {sorted(named)}"
    assigned = "".join(f"{name}='{value}'\n" for name, value in overrides.items())
    script = "\n".join([blocks[0], assigned, *blocks[1:]])
    # the interpreter running this test is the repo's .venv (scripts/test) or its equal
    return script.replace(".venv/bin/python", sys.executable)


def frames_seen(output: str) -> list[tuple[str, dict[str, Any]]]:
    return [(who, json.loads(raw)) for who, raw in FRAME_LINE.findall(output)]


async def run(argv: list[str]) -> str:
    """Run a command at the top of the repo (at most 45 s); its output, once it
    exited 0."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(45):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = out.decode(errors="replace")
    assert proc.returncode == 0, output
    return output


def test_quickstart_urls_are_the_ones_scripts_dev_prints() -> None:
    from chatnode.__main__ import _parser

    dev = _parser().parse_args(["dev"])
    named = dict(ASSIGNMENT.findall(quickstart_blocks(README.read_text())[0]))
    assert named["HTTP"] == f"http://127.0.0.1:{dev.http_port}"
    assert named["WS_A"] == f"ws://127.0.0.1:{dev.ws_port}/ws"
    assert named["WS_B"] == f"ws://127.0.0.1:{dev.ws_port + 1}/ws"


async def test_quickstart_message_is_accepted_and_delivered_across_nodes(
    cluster: tuple[NodeProc, NodeProc],
) -> None:
    a, b = cluster
    alice, bob = new_mobile(), new_mobile()
    script = script_for(
        quickstart_blocks(README.read_text()),
        {
            "HTTP": a.http,
            "WS_A": a.ws,
            "WS_B": b.ws,
            "ALICE": alice,
            "BOB": bob,
            "PASSWORD": "quickstart-password",
        },
    )
    output = await run(["bash", "-euo", "pipefail", "-c", script])
    assert output.count('"success":true,"message":"signed up"') == 2, output

    seen = frames_seen(output)
    accepted = [f for who, f in seen if who == "alice" and f["type"] == "accepted"]
    messages = [f for who, f in seen if who == "bob" and f["type"] == "message"]
    receipts = [f for who, f in seen if who == "alice" and f["type"] == "receipt"]
    assert len(accepted) == 1, output
    assert len(messages) == 1, output
    assert messages[0]["from"] == alice, output
    assert messages[0]["msgId"] == accepted[0]["msgId"], output
    assert messages[0]["id"] == accepted[0]["id"], output
    assert [(r["status"], r["by"], r["ids"]) for r in receipts] == [
        ("delivered", bob, [accepted[0]["id"]])
    ], output
    hellos = {who: f["node"] for who, f in seen if f["type"] == "hello"}
    assert hellos == {"alice": a.node_id, "bob": b.node_id}, output


PYTHON_FENCE = re.compile(r"^```python quickstart\n(.*?)^```$", re.MULTILINE | re.DOTALL)


async def test_the_python_quickstart_gets_its_delivered_receipt(
    cluster: tuple[NodeProc, NodeProc],
) -> None:
    """The README's chatnode.client lines, run as written with this test's node and users
    put in for dev's: Bob is connected (an acking client), Alice's script prints the
    delivered receipt of her message."""
    a, b = cluster
    (code,) = PYTHON_FENCE.findall(README.read_text())
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    alice, bob = new_mobile(), new_mobile()
    async with cn.Api(a.http, b.ws) as api:
        for mobile in (alice, bob):
            await api.signup("Quick", mobile, "correct-horse-42")
        bob_login = await api.login(bob, "correct-horse-42")
        script = (
            code.replace("http://127.0.0.1:8080", a.http)
            .replace("ws_port=8765", f"ws_port={a.ws_port}")
            .replace("+15550000001", alice)
            .replace("+15550000002", bob)
        )
        async with cn.Connection(b.ws, bob_login.token, on_message=lambda m: None):
            output = await run([sys.executable, "-c", script])
    assert "Receipt(" in output and "status='delivered'" in output and bob in output, output
