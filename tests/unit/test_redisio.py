"""The batcher's Redis link: reconnects back off instead of hammering a dead Redis."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from chatnode import devstack
from chatnode.redisio import Link, Script


async def test_failed_connect_backs_off_then_tries_again() -> None:
    link = Link(f"redis://127.0.0.1:{devstack.free_port()}/0")  # nothing listens there
    with pytest.raises(OSError):
        await link.execute([("PING",)])
    with pytest.raises(RedisConnectionError, match="backing off"):
        await link.execute([("PING",)])  # at once: refused without a connect attempt
    link._retry_at = 0.0  # the back-off has run out
    with pytest.raises(OSError):
        await link.execute([("PING",)])
    assert link._backoff == 0.1  # doubled from 0.05


def test_link_refuses_tls_urls_it_cannot_speak() -> None:
    with pytest.raises(ValueError, match="plain TCP"):
        Link("rediss://127.0.0.1:6380/0")


def test_script_sha_is_the_sha1_of_its_source() -> None:
    import hashlib

    source = "return 1"
    assert Script(source).sha == hashlib.sha1(source.encode()).hexdigest()
