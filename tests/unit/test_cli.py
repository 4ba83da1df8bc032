"""chatnode serve's refusal of guessable JWT secrets (chatnode.__main__.secret_refusal)."""

from __future__ import annotations

import pytest

from chatnode.__main__ import secret_refusal
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
