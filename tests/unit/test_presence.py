"""chatnode.presence.iso: lastSeen as ISO-8601 UTC with milliseconds and a Z."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnode import presence

ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
YEAR_2200_MS = int((datetime(2200, 1, 1, tzinfo=UTC) - EPOCH).total_seconds() * 1000)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1, "1970-01-01T00:00:00.001Z"),
        (999, "1970-01-01T00:00:00.999Z"),
        (1000, "1970-01-01T00:00:01.000Z"),
        (1700000000123, "2023-11-14T22:13:20.123Z"),
        (1700000000999, "2023-11-14T22:13:20.999Z"),
        (1709210096789, "2024-02-29T12:34:56.789Z"),
    ],
)
def test_iso_examples(ms: int, text: str) -> None:
    assert presence.iso(ms) == text


def test_iso_is_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        assert presence.iso(0) == "1970-01-01T00:00:00.000Z"
    finally:
        monkeypatch.undo()
        time.tzset()


@given(st.integers(min_value=0, max_value=YEAR_2200_MS))
def test_iso_shape_and_round_trip(ms: int) -> None:
    text = presence.iso(ms)
    assert ISO_RE.match(text), text
    back = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert back == EPOCH + timedelta(milliseconds=ms)


def test_iso_is_exact_far_in_the_future() -> None:
    assert presence.iso(253402300799999) == "9999-12-31T23:59:59.999Z"


def test_now_ms_is_milliseconds_since_the_epoch() -> None:
    before = int(datetime.now(UTC).timestamp() * 1000)
    ms = presence.now_ms()
    after = int(datetime.now(UTC).timestamp() * 1000)
    assert isinstance(ms, int)
    assert before - 1 <= ms <= after + 1
