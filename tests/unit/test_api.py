"""HTTP API helpers: which counter a client address falls in; what a name may hold."""

from __future__ import annotations

import pytest

from chatnode import apiauth, netaddr
from chatnode.errors import InvalidRequest


@pytest.mark.parametrize(
    ("address", "subject"),
    [
        ("203.0.113.5", "203.0.113.5"),
        ("::ffff:203.0.113.5", "203.0.113.5"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::1", "2001:db8:1:2::/64"),
        ("::1", "::/64"),
        ("unknown", "unknown"),
    ],
)
def test_limit_subject(address: str, subject: str) -> None:
    assert netaddr.limit_subject(address) == subject


@pytest.mark.parametrize(
    "name",
    [
        "evil\u202egnp.exe",
        "a\u202ab",
        "a\u2066b\u2069",
        "zero\u200bwidth",
        "join\u200dme",
        "\u200emark",
        "word\u2060joiner",
        "\ufeffbom",
        "soft\u00adhyphen",
        "line\u2028sep",
        "para\u2029sep",
        "tab\there",
        "c1\u0085",
        "tag\U000e0041",
        "x" * 65,
        " ",
        "",
    ],
)
def test_names_refused(name: str) -> None:
    with pytest.raises(InvalidRequest):
        apiauth.name_field({"name": name})


@pytest.mark.parametrize("name", ["Zoë", "محمد", "李小龍", "Ana 😀", "O'Brien-Smith", "x" * 64])
def test_names_kept(name: str) -> None:
    assert apiauth.name_field({"name": name}) == name
