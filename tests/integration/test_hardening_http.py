"""Issue 8, HTTP side: each attack on the HTTP API, run against real nodes.

Per-address limits behind a trusted proxy (3), signup limits and bcrypt lanes (4), the
login limiter reserving before bcrypt (7), lockouts per number and address (8), look-up
limits (11), block copies in Redis that cannot go stale (12, 13), logout that does not
fail after revoking (15), tokens bound to an existing account (17), failed logins in
the audit trail and invisible characters in names (22).

Tests on nodes with small per-address limits present addresses of their own through
X-Forwarded-For (random, so reruns within a window do not meet old counts): every test
client is 127.0.0.1, and the counters in Redis are shared by every node of the session.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt
import pytest
import redis.asyncio as aioredis
import websockets

from chatnode import accounts, blocks, keys
from chatnode.errors import Unavailable
from chatnode.redisio import Batcher
from tests.integration.harness import (
    JWT_SECRET,
    Api,
    NodeProc,
    Stack,
    User,
    auth_event_kinds,
    connected,
    new_mobile,
    new_user,
)

PROXIED = {
    "CHATNODE_TRUSTED_PROXIES": "127.0.0.1",
    "CHATNODE_LOGIN_FAILS_PER_NUMBER": "3",
    "CHATNODE_LOGIN_FAILS_PER_ADDRESS": "6",
    "CHATNODE_SIGNUPS_PER_ADDRESS": "3",
    "CHATNODE_SIGNUP_WINDOW_S": "60",
    "CHATNODE_LOOKUPS_PER_USER": "5",
    "CHATNODE_LOOKUP_WINDOW_S": "60",
}
DIRECT = {  # no trusted proxy: X-Forwarded-For means nothing
    "CHATNODE_LOGIN_FAILS_PER_NUMBER": "3",
    "CHATNODE_SIGNUPS_PER_ADDRESS": "3",
}


@pytest.fixture(scope="module")
def proxied(stack: Stack, workdir: Path) -> Iterator[NodeProc]:
    """A node behind a 'proxy' at 127.0.0.1, with small limits."""
    node = NodeProc(stack, "hard-proxied", workdir, **PROXIED).start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def direct(stack: Stack, workdir: Path) -> Iterator[NodeProc]:
    node = NodeProc(stack, "hard-direct", workdir, **DIRECT).start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
async def pool(stack: Stack) -> AsyncIterator[Any]:
    p = await accounts.create_pool(stack.database_url, max_size=2)
    yield p
    await p.close()


@pytest.fixture(scope="module")
async def batcher(stack: Stack) -> AsyncIterator[Batcher]:
    b = Batcher(stack.redis_url)
    yield b
    await b.close()


def new_address() -> str:
    """A client address no earlier run used (198.18.0.0/15, for benchmarks)."""
    return f"198.{random.randrange(18, 20)}.{random.randrange(256)}.{random.randrange(1, 255)}"


async def call(
    http: aiohttp.ClientSession,
    node: NodeProc,
    method: str,
    path: str,
    body: Any = None,
    *,
    forwarded_for: str | None = None,
    token: str | None = None,
    params: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Any]:
    return await Api(http, node.http).call(
        method, path, body, token=token, params=params, forwarded_for=forwarded_for
    )


async def login(
    http: aiohttp.ClientSession, node: NodeProc, mobile: str, password: str, address: str
) -> tuple[int, dict[str, Any], Any]:
    return await call(
        http,
        node,
        "POST",
        "/auth/login",
        {"mobileNo": mobile, "password": password},
        forwarded_for=address,
    )


def signup_body(mobile: str | None = None) -> dict[str, str]:
    return {"name": "Hard", "mobileNo": mobile or new_mobile(), "password": "password123"}


def assert_limited(status: int, body: dict[str, Any], headers: Any) -> None:
    assert status == 429, body
    assert body["success"] is False and body["error"]["code"] == "rate_limited"
    assert int(headers["Retry-After"]) >= 1


# -- 3: the client address behind a trusted proxy -------------------------------------


async def test_failed_logins_behind_a_trusted_proxy_lock_out_only_that_address(
    proxied: NodeProc, api_a: Api, http: aiohttp.ClientSession
) -> None:
    user = await new_user(api_a)
    attacker, owner = new_address(), new_address()
    statuses = [
        (await login(http, proxied, new_mobile(), "wrong-guess", attacker))[0] for _ in range(7)
    ]
    assert statuses == [401] * 6 + [429]  # CHATNODE_LOGIN_FAILS_PER_ADDRESS=6
    assert_limited(*await login(http, proxied, user.mobile, user.password, attacker))
    # entries a client puts before the proxy's own are not believed
    spoofed = f"{owner}, {attacker}"
    assert_limited(*await login(http, proxied, user.mobile, user.password, spoofed))
    status, body, _ = await login(http, proxied, user.mobile, user.password, owner)
    assert status == 200 and body["token"]


async def test_ipv6_clients_are_counted_by_their_64(
    proxied: NodeProc, http: aiohttp.ClientSession
) -> None:
    """One host holds a whole /64: a fresh address from it for every guess is still the
    same client."""
    net = f"2001:db8:{random.randrange(1, 0xFFFF):x}:{random.randrange(1, 0xFFFF):x}"
    statuses = [
        (await login(http, proxied, new_mobile(), "wrong-guess", f"{net}::{i + 1:x}"))[0]
        for i in range(7)
    ]
    assert statuses == [401] * 6 + [429]  # CHATNODE_LOGIN_FAILS_PER_ADDRESS=6
    other = f"2001:db8:{random.randrange(1, 0xFFFF):x}:{random.randrange(1, 0xFFFF):x}::1"
    assert (await login(http, proxied, new_mobile(), "wrong-guess", other))[0] == 401


async def test_without_trusted_proxies_forwarded_for_is_ignored(
    direct: NodeProc, api_a: Api, http: aiohttp.ClientSession
) -> None:
    user = await new_user(api_a)
    statuses = [
        (await login(http, direct, user.mobile, "wrong-guess", new_address()))[0] for _ in range(5)
    ]
    assert statuses == [401, 401, 401, 429, 429]  # one address: 127.0.0.1
    # every test signs up from 127.0.0.1: this node's limit of 3 is used up whatever
    # X-Forwarded-For says
    answers = [
        await call(http, direct, "POST", "/auth/signup", signup_body(), forwarded_for=new_address())
        for _ in range(5)
    ]
    limited = [a for a in answers if a[0] == 429]
    assert len(limited) >= 2
    assert_limited(*limited[0])


# -- 4: signups: a limit per address, conflicts before bcrypt, logins keep a thread ----


async def test_signups_are_limited_per_client_address(
    proxied: NodeProc, http: aiohttp.ClientSession
) -> None:
    address = new_address()
    for _ in range(3):
        status, body, _ = await call(
            http, proxied, "POST", "/auth/signup", signup_body(), forwarded_for=address
        )
        assert status == 201, body
    assert_limited(
        *await call(http, proxied, "POST", "/auth/signup", signup_body(), forwarded_for=address)
    )
    status, _, _ = await call(
        http, proxied, "POST", "/auth/signup", signup_body(), forwarded_for=new_address()
    )
    assert status == 201


async def test_taken_number_is_refused_before_bcrypt(
    stack: Stack, workdir: Path, api_a: Api, http: aiohttp.ClientSession
) -> None:
    """On a node where one hash takes about a second, a conflict answers at once."""
    node = NodeProc(stack, "hard-slow", workdir, CHATNODE_BCRYPT_ROUNDS="14").start()
    try:
        user = await new_user(api_a)
        assert (await call(http, node, "GET", "/readyz"))[0] == 200  # warm the pools
        started = time.monotonic()
        status, body, _ = await call(http, node, "POST", "/auth/signup", signup_body(user.mobile))
        took = time.monotonic() - started
        assert status == 409 and body["error"]["code"] == "conflict"
        assert took < 0.5, f"409 after {took:.2f} s: the password was hashed first"
    finally:
        node.stop()


async def test_login_keeps_a_bcrypt_thread_during_a_signup_burst(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession
) -> None:
    """Signups may hold one of the two bcrypt threads, never both: a login queued behind
    a burst of signups is answered long before the burst is through."""
    node = NodeProc(stack, "hard-busy", workdir, CHATNODE_BCRYPT_ROUNDS="11").start()
    try:
        user = await new_user(Api(http, node.http))
        done: list[int] = []

        async def one_signup() -> None:
            status, body, _ = await call(http, node, "POST", "/auth/signup", signup_body())
            assert status == 201, body
            done.append(status)

        burst = [asyncio.create_task(one_signup()) for _ in range(24)]
        await asyncio.sleep(0.3)  # every signup is queued for bcrypt by now
        status, body, _ = await call(
            http, node, "POST", "/auth/login", {"mobileNo": user.mobile, "password": user.password}
        )
        finished_before_login = len(done)
        await asyncio.gather(*burst)
        assert status == 200, body
        assert finished_before_login < 12, (
            f"the login waited for {finished_before_login} of 24 signups"
        )
    finally:
        node.stop()


# -- 7 and 8: the login limiter ------------------------------------------------------


async def test_parallel_wrong_passwords_cannot_pass_the_limit(
    proxied: NodeProc, api_a: Api, http: aiohttp.ClientSession
) -> None:
    user = await new_user(api_a)
    address = new_address()
    answers = await asyncio.gather(
        *(login(http, proxied, user.mobile, f"wrong-{i}", address) for i in range(25))
    )
    statuses = [a[0] for a in answers]
    assert 1 <= statuses.count(401) <= 3, statuses  # CHATNODE_LOGIN_FAILS_PER_NUMBER=3
    assert statuses.count(429) == 25 - statuses.count(401)


async def test_right_passwords_do_not_use_up_the_budget(
    proxied: NodeProc, api_a: Api, http: aiohttp.ClientSession
) -> None:
    user = await new_user(api_a)
    address = new_address()
    for _ in range(8):  # more than either limit
        status, _, _ = await login(http, proxied, user.mobile, user.password, address)
        assert status == 200
    assert (await login(http, proxied, user.mobile, "wrong-guess", address))[0] == 401


async def test_lockout_of_a_number_does_not_stop_its_owner_elsewhere(
    proxied: NodeProc, api_a: Api, http: aiohttp.ClientSession
) -> None:
    user = await new_user(api_a)
    guesser, owner = new_address(), new_address()
    statuses = [
        (await login(http, proxied, user.mobile, "wrong-guess", guesser))[0] for _ in range(4)
    ]
    assert statuses == [401, 401, 401, 429]
    assert_limited(*await login(http, proxied, user.mobile, user.password, guesser))
    status, body, _ = await login(http, proxied, user.mobile, user.password, owner)
    assert status == 200 and body["token"]
    assert_limited(*await login(http, proxied, user.mobile, user.password, guesser))


# -- 11: look-ups per user -----------------------------------------------------------


async def test_lookups_are_limited_per_user(
    proxied: NodeProc, api_a: Api, http: aiohttp.ClientSession
) -> None:
    me, other = await new_user(api_a), await new_user(api_a)
    lookups: list[tuple[str, str, Any, dict[str, str] | None]] = [
        ("GET", "/profile/lastseen", None, {"mobileNo": other.mobile}),
        ("GET", "/profile/lastseen", None, {"mobileNo": new_mobile()}),  # 404 counts too
        ("POST", "/block-action/block", {"blockedUserMobileNo": other.mobile}, None),
        ("GET", "/block-action/list", None, None),
        ("DELETE", "/block-action/unblock", None, {"mobileNo": other.mobile}),
    ]
    for method, path, body, params in lookups:  # CHATNODE_LOOKUPS_PER_USER=5
        status, answer, _ = await call(
            http, proxied, method, path, body, token=me.token, params=params
        )
        assert status in (200, 404), answer
    for method, path, body, params in lookups:
        assert_limited(
            *await call(http, proxied, method, path, body, token=me.token, params=params)
        )
    status, _, _ = await call(
        http, proxied, "GET", "/profile/lastseen", token=other.token, params={"mobileNo": me.mobile}
    )
    assert status == 200  # the budget is per user


# -- 12 and 13: the Redis copy of block lists --------------------------------------------


async def test_reload_replaces_a_stale_block_copy(
    api_a: Api, cluster: tuple[NodeProc, NodeProc], redis: aioredis.Redis
) -> None:
    """Redis says U blocked S, PostgreSQL says not: once U's copy reloads, S reaches U."""
    u, s = await new_user(api_a), await new_user(api_a)
    await redis.sadd(keys.blocks(u.mobile), s.mobile, "<+15550000000")
    await redis.delete(keys.account(u.mobile))
    async with connected(cluster[0].ws, s.token) as sc:
        accepted = await sc.send_message(u.mobile, "after the reload", cid="stale1")
        assert accepted["type"] == "accepted"
    assert await redis.smembers(keys.blocks(u.mobile)) == set()
    assert await redis.exists(keys.account(u.mobile))
    async with connected(cluster[1].ws, u.token) as uc:
        got = await uc.recv_type("message")
    assert got["from"] == s.mobile and got["body"] == "after the reload"


async def test_load_into_redis_replaces_the_set(
    api_a: Api, pool: Any, batcher: Batcher, redis: aioredis.Redis
) -> None:
    u, n = await new_user(api_a), await new_user(api_a)
    status, _, _ = await api_a.call(
        "POST", "/block-action/block", {"blockedUserMobileNo": n.mobile}, u.token
    )
    assert status == 200
    await redis.sadd(keys.blocks(u.mobile), "stale")
    await redis.delete(keys.account(u.mobile))
    assert await blocks.load_into_redis(pool, batcher, u.mobile)
    assert await redis.smembers(keys.blocks(u.mobile)) == {n.mobile}
    assert await redis.get(keys.account(u.mobile)) == keys.account_value([keys.DEFAULT_DEVICE])


async def test_a_block_change_stops_a_reload_that_read_before_it(
    api_a: Api, pool: Any, batcher: Batcher, redis: aioredis.Redis
) -> None:
    """A reload that may have read PostgreSQL before a block was committed does not mark
    its copy whole: the block's mirror took its nonce away."""
    u, n = await new_user(api_a), await new_user(api_a)
    copy = await accounts.redis_copy(pool, u.mobile)  # read before the block
    assert copy is not None
    await redis.delete(keys.account(u.mobile))
    await redis.set(keys.loading(u.mobile), "nonce-1")
    status, _, _ = await api_a.call(
        "POST", "/block-action/block", {"blockedUserMobileNo": u.mobile}, n.token
    )
    assert status == 200
    assert not await blocks._load(batcher, u.mobile, copy, "nonce-1")
    assert not await redis.exists(keys.account(u.mobile))
    assert await blocks.load_into_redis(pool, batcher, u.mobile)  # reads again
    assert await redis.smembers(keys.blocks(u.mobile)) == {keys.blocked_marker(n.mobile)}


async def test_failed_mirror_drops_the_copy_and_answers_200(
    api_a: Api, cluster: tuple[NodeProc, NodeProc], redis: aioredis.Redis
) -> None:
    """The target's half of a block fails in Redis (its set is not a set): PostgreSQL has
    the block, so the answer is 200, and the target's copy is dropped, to reload."""
    me, target = await new_user(api_a), await new_user(api_a)
    await redis.delete(keys.blocks(target.mobile))
    await redis.set(keys.blocks(target.mobile), "not-a-set")
    status, body, _ = await api_a.call(
        "POST", "/block-action/block", {"blockedUserMobileNo": target.mobile}, me.token
    )
    assert status == 200, body
    assert not await redis.exists(keys.account(target.mobile))
    async with connected(cluster[1].ws, me.token) as mc:
        refused = await mc.send_message(target.mobile, "hi", cid="drop1")
    assert refused["type"] == "error" and refused["code"] == "blocked"  # reloaded: '<me'
    assert await redis.type(keys.blocks(target.mobile)) == "set"


async def test_block_answers_503_only_when_redis_takes_neither_step(
    stack: Stack, api_a: Api, pool: Any
) -> None:
    me, target = await new_user(api_a), await new_user(api_a)
    from chatnode import devstack

    dead = Batcher(f"redis://127.0.0.1:{devstack.free_port()}/0", timeout=1)
    try:
        with pytest.raises(Unavailable):
            await blocks.block(pool, dead, me.mobile, target.mobile)
    finally:
        await dead.close()
        for task in list(blocks._drops):  # the background retries: not against a dead port
            task.cancel()
    assert await blocks.has_blocked(pool, me.mobile, target.mobile)


async def test_a_user_blocked_by_9000_loads_in_chunks(
    api_a: Api, cluster: tuple[NodeProc, NodeProc], stack: Stack, redis: aioredis.Redis
) -> None:
    target, helper = await new_user(api_a), await new_user(api_a)
    prefix = f"+6{random.randrange(10**5):05d}"
    conn = await asyncpg.connect(stack.database_url)
    try:
        await conn.execute(
            "WITH b AS (INSERT INTO users (mobile_no, name, password_hash)"
            "  SELECT $1 || lpad(i::text, 6, '0'), 'blocker', 'x'"
            "  FROM generate_series(1, 9000) i RETURNING id)"
            " INSERT INTO blocks (blocker_id, blocked_id)"
            " SELECT b.id, u.id FROM b, users u WHERE u.mobile_no = $2",
            prefix,
            target.mobile,
        )
        status, _, _ = await api_a.call(
            "POST", "/block-action/block", {"blockedUserMobileNo": target.mobile}, helper.token
        )
        assert status == 200
        await redis.delete(keys.account(target.mobile))
        async with connected(cluster[0].ws, helper.token) as hc:
            refused = await hc.send_message(target.mobile, "hi", cid="chunk1")
        assert refused["type"] == "error" and refused["code"] == "blocked", refused
        assert await redis.scard(keys.blocks(target.mobile)) == 9001
        assert await redis.exists(keys.account(target.mobile))
    finally:
        await conn.execute("DELETE FROM users WHERE mobile_no LIKE $1 || '%'", prefix)
        await conn.close()


# -- 15: logout after the revocation is stored ---------------------------------------


async def test_logout_succeeds_when_the_socket_cannot_be_found(
    api_a: Api, api_b: Api, redis: aioredis.Redis
) -> None:
    """The route look-up fails (the key is not a string): the token is revoked all the
    same, so the answer is 200, and the token no longer works anywhere."""
    user = await new_user(api_a)
    await redis.sadd(keys.route(user.mobile), "not-a-route")
    try:
        status, body, _ = await api_a.call("POST", "/auth/logout", token=user.token)
        assert status == 200 and body["success"] is True, body
        for api in (api_a, api_b):
            status, body, _ = await api.call("GET", "/block-action/list", token=user.token)
            assert status == 401 and body["error"]["code"] == "unauthorized"
    finally:
        await redis.delete(keys.route(user.mobile))


# -- 17: tokens name an existing account ---------------------------------------------


def mint(**claims: Any) -> str:
    now = int(time.time())
    payload = {"jti": f"minted-{random.randrange(10**9)}", "iat": now, "exp": now + 600, "did": 1}
    return jwt.encode(
        {k: v for k, v in {**payload, **claims}.items() if v is not None},
        JWT_SECRET,
        algorithm="HS256",
    )


async def handshake_status(url: str) -> int:
    try:
        async with websockets.connect(url, open_timeout=5):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


async def user_id(stack: Stack, user: User) -> int:
    conn = await asyncpg.connect(stack.database_url)
    try:
        return int(await conn.fetchval("SELECT id FROM users WHERE mobile_no = $1", user.mobile))
    finally:
        await conn.close()


async def test_well_signed_tokens_of_no_account_are_refused(
    api_a: Api, cluster: tuple[NodeProc, NodeProc], stack: Stack
) -> None:
    user = await new_user(api_a)
    uid = await user_id(stack, user)
    assert (await api_a.call("GET", "/block-action/list", token=mint(sub=user.mobile, uid=uid)))[
        0
    ] == 200  # the test's minting is right
    forged = {
        "no account": mint(sub=new_mobile(), uid=uid),
        "wrong uid": mint(sub=user.mobile, uid=uid + 1),
        "no uid": mint(sub=user.mobile),
        "uid not a number": mint(sub=user.mobile, uid=str(uid)),
        "device not a number": mint(sub=user.mobile, uid=uid, did="1"),
    }
    for why, token in forged.items():
        status, body, _ = await api_a.call("GET", "/block-action/list", token=token)
        assert status == 401 and body["error"]["code"] == "unauthorized", why
        assert await handshake_status(f"{cluster[1].ws}?token={token}") == 401, why


# -- 22: failed logins are audited; names are printable -------------------------------


async def test_failed_logins_are_recorded_in_auth_events(api_a: Api, stack: Stack) -> None:
    user = await new_user(api_a)
    status, _, _ = await api_a.call(
        "POST", "/auth/login", {"mobileNo": user.mobile, "password": "wrong-guess"}
    )
    assert status == 401
    kinds = [kind for kind, _ in await auth_event_kinds(stack.database_url, user.mobile)]
    assert kinds == ["signup", "login", "login_failed"]


@pytest.mark.parametrize(
    "name",
    [
        "evil\u202egnp.exe",  # right-to-left override
        "a\u202ab",  # left-to-right embedding
        "a\u2067b",  # right-to-left isolate
        "a\u2069",  # pop directional isolate
        "zero\u200bwidth",
        "join\u200dme",
        "mark\u200f",
        "word\u2060joiner",
        "\ufeffbom",
        "soft\u00adhyphen",  # category Cf
        "line\u2028sep",
        "bell\u0007",
        "del\u007f",
        "c1\u0085",
    ],
)
async def test_names_with_invisible_or_control_characters_are_400(api_a: Api, name: str) -> None:
    status, body, _ = await api_a.call(
        "POST", "/auth/signup", {"name": name, "mobileNo": new_mobile(), "password": "secret123"}
    )
    assert status == 400 and body["error"]["code"] == "invalid_request", body


@pytest.mark.parametrize(
    "name", ["Zoë", "Łukasz Żółw", "محمد", "李小龍", "Ana 😀", "O'Brien-Smith"]
)
async def test_ordinary_names_in_any_script_are_fine(api_a: Api, name: str) -> None:
    status, body, _ = await api_a.call(
        "POST", "/auth/signup", {"name": name, "mobileNo": new_mobile(), "password": "secret123"}
    )
    assert status == 201, body


# -- found by a second attack on the fixes ----------------------------------------------


async def test_a_login_flood_from_one_address_does_not_hold_up_others(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession
) -> None:
    """40 wrong logins at once from one address (no account needed), then the owner of an
    account logs in from another: bcrypt's threads go round the addresses waiting, so
    the owner waits for a thread, not for the flood (which once made logins 503)."""
    node = NodeProc(
        stack,
        "hard-flood",
        workdir,
        CHATNODE_BCRYPT_ROUNDS="10",
        CHATNODE_TRUSTED_PROXIES="127.0.0.1",
        CHATNODE_LOGIN_FAILS_PER_ADDRESS="100000",
    ).start()
    try:
        user = await new_user(Api(http, node.http))
        flooder = new_address()
        done: list[int] = []

        async def guess() -> None:
            done.append((await login(http, node, new_mobile(), "wrong-guess", flooder))[0])

        flood = [asyncio.create_task(guess()) for _ in range(40)]
        await asyncio.sleep(0.3)  # the flood is queued for bcrypt
        status, body, _ = await login(http, node, user.mobile, user.password, new_address())
        before = len(done)
        await asyncio.gather(*flood)
        assert status == 200, body
        assert before < 10, f"the owner's login waited for {before} of 40 guesses"
        assert done.count(401) == 40
    finally:
        node.stop()


async def test_lookups_are_limited_per_address_too(
    stack: Stack, workdir: Path, api_a: Api, http: aiohttp.ClientSession
) -> None:
    """Accounts are cheap: one address with several of them shares one look-up budget."""
    node = NodeProc(
        stack,
        "hard-lookups",
        workdir,
        CHATNODE_TRUSTED_PROXIES="127.0.0.1",
        CHATNODE_LOOKUPS_PER_USER="5",
        CHATNODE_LOOKUPS_PER_ADDRESS="7",
    ).start()
    try:
        users = [await new_user(api_a) for _ in range(3)]
        address = new_address()
        statuses = []
        for user in users:
            for _ in range(3):
                status, _, _ = await call(
                    http,
                    node,
                    "GET",
                    "/block-action/list",
                    token=user.token,
                    forwarded_for=address,
                )
                statuses.append(status)
        assert statuses == [200] * 7 + [429] * 2
        status, _, _ = await call(
            http,
            node,
            "GET",
            "/block-action/list",
            token=users[2].token,
            forwarded_for=new_address(),
        )
        assert status == 200
    finally:
        node.stop()


async def test_a_block_and_an_unblock_racing_leave_redis_as_postgresql(
    api_a: Api, api_b: Api, pool: Any, redis: aioredis.Redis
) -> None:
    """Block on one node and unblock on the other at the same moment, 30 times: Redis
    once could end up 'not blocked' while PostgreSQL said 'blocked'."""
    me, target = await new_user(api_a), await new_user(api_a)
    for _ in range(30):
        await asyncio.gather(
            api_a.call(
                "POST", "/block-action/block", {"blockedUserMobileNo": target.mobile}, me.token
            ),
            api_b.call(
                "DELETE",
                "/block-action/unblock",
                token=me.token,
                params={"mobileNo": target.mobile},
            ),
        )
        in_pg = await blocks.has_blocked(pool, me.mobile, target.mobile)
        in_redis = await redis.sismember(keys.blocks(me.mobile), target.mobile)
        marker = await redis.sismember(keys.blocks(target.mobile), keys.blocked_marker(me.mobile))
        assert (in_pg, bool(in_redis), bool(marker)) in ((True, True, True), (False, False, False))


async def test_a_burst_on_one_block_pair_waits_its_turn_without_filling_the_pool(
    api_a: Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    """40 blocks of one pair at once on one node: they go one at a time, at most 8 wait
    (the rest 429), and another user's request is served meanwhile."""
    me, target, bystander = await new_user(api_a), await new_user(api_a), await new_user(api_a)
    burst = [
        api_a.call("POST", "/block-action/block", {"blockedUserMobileNo": target.mobile}, me.token)
        for _ in range(40)
    ]
    other = api_a.call("GET", "/block-action/list", token=bystander.token)
    *answers, (status, _, _) = await asyncio.gather(*burst, other)
    assert status == 200
    statuses = [a[0] for a in answers]
    assert set(statuses) == {200, 429}  # some waited their turn, the rest were refused
