"""chatnode.auth: bcrypt lanes, tokens carrying the account id, the known-accounts cache."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import pytest

from chatnode import accounts, auth
from chatnode.errors import Unauthorized, Unavailable

SECRET = "unit-secret-" + "x" * 32


async def test_signups_cannot_take_every_bcrypt_thread() -> None:
    """Eight slow signup hashes queued, then a login: the login's verify runs on the
    thread signups may not take, so it ends while most of the signups still wait."""
    fast = auth.Passwords(rounds=4)
    cheap_hash = await fast.hash("password123")  # verifying it takes a millisecond
    fast.close()
    passwords = auth.Passwords(rounds=12)
    try:
        signups = [asyncio.create_task(passwords.hash(f"password{i}")) for i in range(8)]
        await asyncio.sleep(0.01)
        assert await passwords.verify("password123", cheap_hash)
        finished = sum(t.done() for t in signups)
        assert finished <= 2, f"{finished} of 8 signups ran before the login"
        assert all(h.startswith("$2b$12$") for h in await asyncio.gather(*signups))
    finally:
        passwords.close()


async def test_one_worker_is_shared() -> None:
    passwords = auth.Passwords(rounds=4, workers=1)
    try:
        hashed = await passwords.hash("password123")
        assert await passwords.verify("password123", hashed)
        assert not await passwords.verify("password124", hashed)
    finally:
        passwords.close()


async def test_slots_go_round_the_clients_waiting() -> None:
    """One client floods: a second client's request waits for one slot, not the flood."""
    slots = auth.FairSlots(1)
    await slots.acquire("flood")
    order: list[str] = []

    async def one(client: str, name: str) -> None:
        await slots.acquire(client)
        order.append(name)
        await asyncio.sleep(0)
        slots.release()

    flood = [asyncio.create_task(one("flood", f"f{i}")) for i in range(5)]
    await asyncio.sleep(0)
    other = asyncio.create_task(one("other", "o"))
    await asyncio.sleep(0)
    slots.release()
    await asyncio.gather(*flood, other)
    assert order[:2] == ["f0", "o"] and sorted(order) == ["f0", "f1", "f2", "f3", "f4", "o"]


async def test_a_waiter_that_gives_up_leaves_nothing_behind() -> None:
    slots = auth.FairSlots(1)
    await slots.acquire("a")
    gave_up = asyncio.create_task(slots.acquire("b"))
    await asyncio.sleep(0)
    gave_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gave_up
    slots.release()
    await asyncio.wait_for(slots.acquire("c"), 1)  # the slot came back, not lost to "b"
    # a waiter cancelled just after it was given the slot passes it on
    taker = asyncio.create_task(slots.acquire("d"))
    await asyncio.sleep(0)
    slots.release()  # resolves taker's future ...
    taker.cancel()  # ... but it is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await taker
    await asyncio.wait_for(slots.acquire("e"), 1)


async def test_one_client_may_queue_only_so_many() -> None:
    slots = auth.FairSlots(1, most_waiting=2)
    await slots.acquire("a")
    waiting = [asyncio.create_task(slots.acquire("a")) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Unavailable):
        await slots.acquire("a")
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


def test_tokens_carry_the_account_id() -> None:
    tokens = auth.Tokens(SECRET, 60)
    token, claims = tokens.issue("+15551234567", 42, 7)
    assert (claims.uid, claims.device) == (42, 7)
    assert tokens.decode(token) == claims
    payload = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert (payload["uid"], payload["did"]) == (42, 7)


@pytest.mark.parametrize("uid", [None, "42", 42.0, True, 0, -1, 2**63])
def test_tokens_without_a_valid_account_id_are_refused(uid: Any) -> None:
    payload: dict[str, Any] = {
        "sub": "+15551234567",
        "did": 7,
        "jti": "j",
        "exp": int(time.time()) + 60,
    }
    if uid is not None:
        payload["uid"] = uid
    with pytest.raises(Unauthorized):
        auth.Tokens(SECRET, 60).decode(jwt.encode(payload, SECRET, algorithm="HS256"))


def test_a_token_from_before_devices_is_the_default_device() -> None:
    payload = {"sub": "+15551234567", "uid": 42, "jti": "j", "exp": int(time.time()) + 60}
    claims = auth.Tokens(SECRET, 60).decode(jwt.encode(payload, SECRET, algorithm="HS256"))
    assert (claims.device, claims.default, claims.device_key) == (0, True, "")


@pytest.mark.parametrize("did", ["7", 7.0, True, 0, -1, 2**63])
def test_tokens_with_an_invalid_device_id_are_refused(did: Any) -> None:
    payload: dict[str, Any] = {
        "sub": "+15551234567",
        "uid": 42,
        "jti": "j",
        "exp": int(time.time()) + 60,
    }
    payload["did"] = did
    with pytest.raises(Unauthorized):
        auth.Tokens(SECRET, 60).decode(jwt.encode(payload, SECRET, algorithm="HS256"))


class Lookups:
    """Stands in for accounts.account_exists: answers from a set, or fails."""

    def __init__(self, existing: set[tuple[int, str]]) -> None:
        self.existing = existing
        self.calls = 0
        self.down = False

    async def __call__(self, pool: Any, uid: int, mobile: str) -> bool:
        self.calls += 1
        if self.down:
            raise Unavailable("the database is unavailable")
        return (uid, mobile) in self.existing


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> Lookups:
    fake = Lookups({(1, "+1555000001"), (2, "+1555000002"), (3, "+1555000003")})
    monkeypatch.setattr(accounts, "account_exists", fake)
    return fake


async def test_known_accounts_are_remembered_for_a_while(lookups: Lookups) -> None:
    known = auth.KnownAccounts(ttl_s=0.2)
    assert await known.exists(None, 1, "+1555000001")
    assert await known.exists(None, 1, "+1555000001")
    assert lookups.calls == 1
    await asyncio.sleep(0.25)
    assert await known.exists(None, 1, "+1555000001")
    assert lookups.calls == 2


async def test_misses_are_asked_every_time(lookups: Lookups) -> None:
    known = auth.KnownAccounts()
    assert not await known.exists(None, 1, "+1555000002")  # wrong uid for the number
    assert not await known.exists(None, 1, "+1555000002")
    assert lookups.calls == 2


async def test_known_accounts_survive_a_database_outage(lookups: Lookups) -> None:
    known = auth.KnownAccounts(ttl_s=0)
    assert await known.exists(None, 1, "+1555000001")
    lookups.down = True
    assert await known.exists(None, 1, "+1555000001")  # known before the outage
    with pytest.raises(Unavailable):
        await known.exists(None, 2, "+1555000002")


async def test_the_cache_is_bounded(lookups: Lookups) -> None:
    known = auth.KnownAccounts(max_entries=2)
    for uid in (1, 2, 3):
        assert await known.exists(None, uid, f"+155500000{uid}")
    assert lookups.calls == 3
    assert await known.exists(None, 3, "+1555000003")
    assert lookups.calls == 3
    assert await known.exists(None, 1, "+1555000001")  # the oldest went first
    assert lookups.calls == 4


async def test_remembered_pairs_need_no_lookup(lookups: Lookups) -> None:
    known = auth.KnownAccounts()
    known.remember(1, "+1555000001")
    assert await known.exists(None, 1, "+1555000001")
    assert lookups.calls == 0
