"""The command line: serve refuses guessable JWT secrets, dev --redis-cluster a Redis URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatnode.__main__ import main, secret_refusal
from chatnode.config import KNOWN_PLACEHOLDER_SECRETS, MIN_JWT_SECRET_BYTES


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "x" * (MIN_JWT_SECRET_BYTES - 1),
        "é" * 15,
        *sorted(KNOWN_PLACEHOLDER_SECRETS),
        "Change-Me",
    ],
)
def test_guessable_secrets_are_refused_naming_the_variable(secret: str) -> None:
    refusal = secret_refusal(secret)
    assert refusal is not None and "CHATNODE_JWT_SECRET" in refusal
    assert "\n" not in refusal
    if secret:
        assert secret not in refusal  # the value itself is never printed


@pytest.mark.parametrize("secret", ["x" * MIN_JWT_SECRET_BYTES, "é" * 16, "0123456789abcdef" * 4])
def test_secrets_of_32_bytes_or_more_are_accepted(secret: str) -> None:
    assert secret_refusal(secret) is None


def test_dev_redis_cluster_refuses_a_configured_redis_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--redis-cluster starts its own Redis: a CHATNODE_REDIS_URL as well is a usage error
    (exit 2), before anything starts."""
    monkeypatch.setenv("CHATNODE_REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(SystemExit) as done:
        main(["dev", "--redis-cluster", "--nodes", "0", "--data-dir", str(tmp_path / "dev")])
    assert done.value.code == 2
    assert not (tmp_path / "dev").exists()
