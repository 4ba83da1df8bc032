"""chatnode.app: URLs in messages people read never show a password; sweeps outlive
their failures."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from chatnode.app import Node, safe_url
from chatnode.config import Settings


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:hunter2@cache:6379/0", "redis://user:***@cache:6379/0"),
        ("redis://user:hunter2@cache/0", "redis://user:***@cache/0"),
        (
            "postgresql://chat:hunter2@db.internal:5432/chatnode",
            "postgresql://chat:***@db.internal:5432/chatnode",
        ),
        (
            "postgresql://chat:hunter2@db:5432/chatnode?sslmode=require",
            "postgresql://chat:***@db:5432/chatnode?sslmode=require",
        ),
        ("rediss://default:hunter2@cache:6380", "rediss://default:***@cache:6380"),
    ],
)
def test_password_is_replaced(url: str, shown: str) -> None:
    assert safe_url(url) == shown
    assert "hunter2" not in safe_url(url)


def test_password_without_user_is_hidden() -> None:
    out = safe_url("redis://:hunter2@cache:6379/0")
    assert "hunter2" not in out
    assert "cache:6379/0" in out


@pytest.mark.parametrize("password", ["p@ss", "p:ss", "p%40ss", "***hunter2***"])
def test_awkward_passwords_are_hidden(password: str) -> None:
    out = safe_url(f"postgresql://chat:{password}@db:5432/chatnode")
    assert password not in out
    assert out == "postgresql://chat:***@db:5432/chatnode"


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "postgresql://127.0.0.1:5432/chatnode",
        "postgresql://chat@db:5432/chatnode",
        "redis+unix:///tmp/redis.sock",
        "",
    ],
)
def test_url_without_password_is_unchanged(url: str) -> None:
    assert safe_url(url) == url


def test_ipv6_host_keeps_its_brackets() -> None:
    assert safe_url("postgresql://u:hunter2@[::1]:5432/db") == "postgresql://u:***@[::1]:5432/db"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://chat@db:5432/chatnode?password=hunter2",
        "redis://cache:6379/0?password=hunter2",
    ],
)
def test_password_in_query_is_hidden(url: str) -> None:
    assert "hunter2" not in safe_url(url)


def test_bad_port_does_not_raise() -> None:
    out = safe_url("postgresql://chat:hunter2@db:notaport/chatnode")
    assert "hunter2" not in out


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://chat@db:5432/chatnode?sslmode=require&sslpassword=hunter2",
        "postgresql://chat@db:5432/chatnode?SSLPassword=hunter2",
        "postgresql://chat@db:5432/chatnode?%70assword=hunter2",
        "postgresql://chat:hunter2@db:5432/chatnode?sslpassword=hunter2#frag",
        "redis://cache:6379/0?password=hunter2&client_name=a@b",
    ],
)
def test_every_password_item_of_the_query_is_hidden(url: str) -> None:
    assert "hunter2" not in safe_url(url)


def test_sslpassword_keeps_the_other_items() -> None:
    out = safe_url("postgresql://chat@db:5432/x?sslmode=require&sslpassword=hunter2")
    assert out == "postgresql://chat@db:5432/x?sslmode=require&sslpassword=***"


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db port=5432 password=hunter2 dbname=chatnode",
        "host=db password = hunter2 dbname=chatnode",
        "host=db password='hunter2 with spaces' dbname=chatnode",
        "host=db password='it\\'s hunter2' dbname=chatnode",
        "host=db sslpassword=hunter2 user=chat",
        "host=db PASSWORD=hunter2",
    ],
)
def test_keyword_dsn_passwords_are_hidden(dsn: str) -> None:
    out = safe_url(dsn)
    assert "hunter2" not in out and "host=db" in out


def test_keyword_dsn_keeps_the_other_keywords() -> None:
    out = safe_url("host=db port=5432 password='a b' dbname=chatnode")
    assert out == "host=db port=5432 password=*** dbname=chatnode"


@pytest.mark.parametrize("password", ["p/ss", "p?ss", "p#ss", "p/s@s?x"])
def test_unencoded_separators_in_the_password_do_not_leak_it(password: str) -> None:
    out = safe_url(f"postgresql://chat:{password}@db:5432/chatnode")
    assert out == "postgresql://chat:***@db:5432/chatnode"


async def test_a_failing_sweep_is_logged_and_runs_again() -> None:
    node = Node(Settings.from_env({}))
    calls: list[str] = []

    def plain() -> None:
        calls.append("plain")
        raise RuntimeError("a bug")

    async def remote() -> None:
        calls.append("remote")
        raise ConnectionError("Redis is away")

    with capture_logs() as logged:
        sweeps = [asyncio.create_task(node._every(0.01, fn)) for fn in (plain, remote)]
        async with asyncio.timeout(5):
            while calls.count("plain") < 2 or calls.count("remote") < 2:
                await asyncio.sleep(0.01)
        for task in sweeps:
            task.cancel()
        await asyncio.gather(*sweeps, return_exceptions=True)
    plain_logs = [e for e in logged if e.get("sweep") == "plain"]
    remote_logs = [e for e in logged if e.get("sweep") == "remote"]
    assert plain_logs and all(e["log_level"] == "error" and e["exc_info"] for e in plain_logs)
    assert remote_logs and all(
        e["log_level"] == "warning" and e["error"] == "ConnectionError" for e in remote_logs
    )
