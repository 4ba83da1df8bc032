"""Frames and bodies fuzzed with hypothesis against a live node: every input gets an error
frame or a close code, never a crash or an exception's text; the node keeps serving."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.integration.harness import NodeProc, new_mobile

KNOWN_CODES = {
    "invalid_frame",
    "unknown_recipient",
    "too_large",
    "blocked",
    "rate_limited",
    "inbox_full",
    "unavailable",
}
ALLOWED_CLOSES = {1000, 1007, 1008, 1009}  # 1011 would be a crash
LEAKS = ("Traceback", "Exception", "Error(", 'File "', "line ")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.just(2**70),
    st.just(-(2**70)),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
mobiles = st.one_of(st.from_regex(r"\+?[0-9]{7,15}", fullmatch=True), st.text(max_size=20), scalars)
ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True), st.text(max_size=70), scalars
)
frames = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("send"),
            "id": ids,
            "to": mobiles,
            "body": st.one_of(st.text(max_size=200), scalars),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("ack"), "msgIds": st.one_of(st.lists(ids, max_size=5), scalars)}
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("read"),
            "to": mobiles,
            "ids": st.one_of(st.lists(ids, max_size=5), scalars),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("typing"),
            "to": mobiles,
            "state": st.one_of(st.sampled_from(["start", "stop"]), scalars),
        }
    ),
    st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    json_values,
)
raw_texts = st.one_of(
    st.text(max_size=300),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.sampled_from(
        ["1e999999", "-1e999999", "123456789012345678901234567890", "NaN", '"\\ud800"']
    ),
)
payloads = st.one_of(
    frames.map(lambda f: ("text", json.dumps(f))),
    raw_texts.map(lambda t: ("text", t)),
    st.binary(max_size=200).map(lambda b: ("binary", b)),
    st.binary(min_size=1, max_size=50).map(lambda b: ("badutf8", b"\xff\xfe" + b)),
)


def http_json(method: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


def make_user(base: str) -> tuple[str, str]:
    mobile = new_mobile()
    http_json(
        "POST", base + "/auth/signup", {"name": "fuzz", "mobileNo": mobile, "password": "fuzzpass1"}
    )
    token = http_json("POST", base + "/auth/login", {"mobileNo": mobile, "password": "fuzzpass1"})[
        "token"
    ]
    return mobile, token


class Socket:
    """A synchronous client that reconnects whenever the server closed it."""

    def __init__(self, url: str, token: str) -> None:
        self.url = f"{url}?token={token}"
        self.ws: ClientConnection | None = None
        self.probes = 0

    def open(self) -> ClientConnection:
        if self.ws is None:
            self.ws = connect(self.url, open_timeout=10, max_size=2**20, legacy=True)
            assert json.loads(self.ws.recv(timeout=10))["type"] == "hello"
        return self.ws

    def close(self) -> None:
        """Close the socket and so its background thread."""
        if self.ws is not None:
            self.ws.close()
            self.ws = None

    def answer(self, kind: str, data: str | bytes) -> tuple[str, Any]:
        """Send one payload, then a probe that always gets an error; what came back for
        the payload (a frame, or None for frames that need no answer), or the close code."""
        ws = self.open()
        self.probes += 1
        probe = f"probe-{self.probes}"
        try:
            if kind == "badutf8":
                ws.send(data, text=True)  # bytes that are not UTF-8, in a text frame
            else:
                ws.send(data)
            ws.send(json.dumps({"type": "send", "id": probe, "to": "x", "body": "x"}))
            replies = []
            while True:
                reply = json.loads(ws.recv(timeout=10))
                if reply.get("ref") == probe:
                    break
                replies.append(reply)
            assert len(replies) <= 1, replies
            return "frame", replies[0] if replies else None
        except ConnectionClosed as closed:
            self.ws = None
            return "closed", closed.rcvd.code if closed.rcvd else None


@pytest.fixture(scope="module")
def fuzz_target(isolated: NodeProc) -> Iterator[tuple[NodeProc, Socket, str, str]]:
    node = isolated
    me, token = make_user(node.http)
    peer, _ = make_user(node.http)
    sock = Socket(node.ws, token)
    yield node, sock, me, peer
    sock.close()


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=payloads)
def test_every_frame_gets_an_error_or_a_close_code(
    fuzz_target: tuple[NodeProc, Socket, str, str], payload: tuple[str, Any]
) -> None:
    node, sock, _, _ = fuzz_target
    kind, data = payload
    how, what = sock.answer(kind, data)
    if how == "closed":
        assert what in ALLOWED_CLOSES, f"closed with {what}"
    elif what is not None:
        assert what["type"] in ("error", "accepted"), what
        if what["type"] == "error":
            assert what["code"] in KNOWN_CODES
            assert not any(leak in what["message"] for leak in LEAKS), what["message"]
    assert node.proc is not None and node.proc.poll() is None  # never crashes


def test_node_still_serves_after_the_fuzzing(
    fuzz_target: tuple[NodeProc, Socket, str, str],
) -> None:
    node, _, _, peer = fuzz_target
    _, token = make_user(node.http)
    fresh = Socket(node.ws, token)
    how, reply = fresh.answer(
        "text", json.dumps({"type": "send", "id": "after", "to": peer, "body": "ok"})
    )
    assert how == "frame" and reply["type"] == "accepted" and reply["id"] == "after"


bodies = st.one_of(
    st.dictionaries(
        st.sampled_from(["name", "mobileNo", "password", "blockedUserMobileNo", "x"]),
        json_values,
        max_size=4,
    ),
    json_values,
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(
        ["/auth/signup", "/auth/signin", "/auth/login", "/auth/logout", "/block-action/block"]
    ),
    body=st.one_of(bodies.map(lambda b: json.dumps(b).encode()), st.binary(max_size=300)),
)
def test_http_bodies_never_500(
    fuzz_target: tuple[NodeProc, Socket, str, str], path: str, body: bytes
) -> None:
    node = fuzz_target[0]
    req = urllib.request.Request(
        node.http + path, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    assert status < 500 or status == 503, raw
    answer = json.loads(raw)
    assert isinstance(answer["success"], bool)
    if not answer["success"]:
        assert not any(leak in answer["error"]["message"] for leak in LEAKS)
