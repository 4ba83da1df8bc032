"""chatnode.routing.dispatch: decoding node-channel payloads into listener calls."""

from __future__ import annotations

from typing import Any

import pytest

from chatnode.routing import dispatch


class Recorder:
    """A Listener that writes down every call it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def on_wake(self, mobiles: list[str]) -> None:
        self.calls.append(("wake", (mobiles,)))

    def on_kick(self, mobile: str, session: str) -> None:
        self.calls.append(("kick", (mobile, session)))

    def on_logout(self, mobile: str, jti: str) -> None:
        self.calls.append(("logout", (mobile, jti)))

    def on_typing(self, to: str, sender: str, state: str) -> None:
        self.calls.append(("typing", (to, sender, state)))

    def on_resync(self) -> None:
        self.calls.append(("resync", ()))


def calls_for(payload: str) -> list[tuple[str, tuple[Any, ...]]]:
    rec = Recorder()
    dispatch(rec, payload)
    return rec.calls


def test_wake_one() -> None:
    assert calls_for("w|+15550000001") == [("wake", (["+15550000001"],))]


def test_wake_many_in_order() -> None:
    assert calls_for("w|1234567,+7654321,5555555") == [
        ("wake", (["1234567", "+7654321", "5555555"],))
    ]


def test_wake_skips_empty_names() -> None:
    assert calls_for("w|1234567,,7654321,") == [("wake", (["1234567", "7654321"],))]


def test_kick() -> None:
    assert calls_for("k|+15550000001|sess-42") == [("kick", ("+15550000001", "sess-42"))]


def test_logout() -> None:
    assert calls_for("l|+15550000001|jti-abc") == [("logout", ("+15550000001", "jti-abc"))]


@pytest.mark.parametrize("state", ["start", "stop"])
def test_typing(state: str) -> None:
    assert calls_for(f"t|1234567|7654321|{state}") == [("typing", ("1234567", "7654321", state))]


def test_typing_argument_order_is_to_then_sender() -> None:
    # gateway publishes f"t|{frame.to}|{sender}|{state}"
    (
        (
            name,
            (to, sender, _),
        ),
    ) = calls_for("t|to-user|from-user|start")
    assert (name, to, sender) == ("typing", "to-user", "from-user")


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "x|1234567",
        "r|",
        "W|1234567",
        "wake|1234567",
        "k|1234567",  # kick needs mobile and session
        "k|1234567|s|extra",
        "l|1234567",
        "l|1234567|j|extra",
        "t|1234567|7654321",  # typing needs to, sender and state
        "t|1234567|7654321|start|extra",
        "k",
        "t",
    ],
)
def test_unknown_or_malformed_payload_calls_nothing(payload: str) -> None:
    assert calls_for(payload) == []


def test_each_payload_makes_exactly_one_call() -> None:
    rec = Recorder()
    for payload in ("w|1234567", "k|1234567|s", "l|1234567|j", "t|1234567|7654321|stop"):
        dispatch(rec, payload)
    assert [name for name, _ in rec.calls] == ["wake", "kick", "logout", "typing"]
