"""The HTTP endpoints of accounts: signup, login, logout."""

from __future__ import annotations

import dataclasses
import unicodedata
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from chatnode import accounts, auth, blocks, devices, logs, ratelimit
from chatnode.apibase import (
    SERVICES,
    Services,
    client_address,
    current_user,
    json_body,
    mobile_field,
    ok,
    string_field,
)
from chatnode.config import Settings
from chatnode.errors import (
    Conflict,
    InvalidCredentials,
    InvalidRequest,
    NotFound,
    RateLimited,
)
from chatnode.frames import is_mobile

log = logs.get(__name__)

# Invisible characters that change how the text around them is shown (bidi overrides and
# isolates, zero-width characters): a name must not pass for another or reorder what
# follows it. Most are category Cf anyway; they are listed to say what is meant.
INVISIBLE = frozenset(
    [
        *map(chr, range(0x202A, 0x202F)),  # LRE, RLE, PDF, LRO, RLO
        *map(chr, range(0x2066, 0x206A)),  # LRI, RLI, FSI, PDI
        *map(chr, range(0x200B, 0x2010)),  # ZWSP, ZWNJ, ZWJ, LRM, RLM
        "\u2060",  # word joiner
        "\ufeff",  # zero-width no-break space
    ]
)
# control, format, surrogate, line and paragraph separator
UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def name_field(body: dict[str, Any], field: str = "name") -> str:
    """A name people read (an account's, a device's): 1-64 printable characters."""
    name = string_field(body, field)
    if not 1 <= len(name) <= 64 or not name.strip():
        raise InvalidRequest(f"{field} must be 1-64 characters")
    if any(ch in INVISIBLE or unicodedata.category(ch) in UNPRINTABLE_CATEGORIES for ch in name):
        raise InvalidRequest(f"{field} must not contain control, format or invisible characters")
    return name


def device_name(name: str) -> str:
    """The name a device is stored and found by: trimmed, Unicode NFC."""
    return unicodedata.normalize("NFC", name.strip())


def password_field(body: dict[str, Any]) -> str:
    password = string_field(body, "password")
    if "\x00" in password:  # bcrypt would silently cut the password there
        raise InvalidRequest("password must not contain NUL characters")
    if not 8 <= len(password.encode("utf-8", "surrogatepass")) <= auth.MAX_PASSWORD_BYTES:
        raise InvalidRequest("password must be 8-72 UTF-8 bytes")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("password must be valid UTF-8") from None
    return password


async def signup(request: web.Request) -> web.Response:
    """Create an account. Limited per client address; a taken number is refused before
    the bcrypt hash (cheap conflicts; the insert still settles a race), and the hash runs
    in bcrypt's signup lane, so signups cannot take all of the logins' threads."""
    svc = request.app[SERVICES]
    body = await json_body(request)
    name = name_field(body)
    mobile = mobile_field(body.get("mobileNo"), "mobileNo")
    password = password_field(body)
    cfg = svc.settings
    address = client_address(request)
    verdict = await ratelimit.hit(
        svc.batcher, "signup-address", address, cfg.signups_per_address, cfg.signup_window_s
    )
    if not verdict.allowed:
        log.info("signup_limited", address=address)
        raise RateLimited("too many signups, try again later", retry_after=verdict.retry_after)
    if await accounts.is_registered(svc.pool, mobile):
        raise Conflict("this mobile number is already registered")
    hashed = await svc.passwords.hash(password, address)
    user_id = await accounts.create_user(svc.pool, mobile, name, hashed, cfg.node_id)
    try:  # Redis learns of the user now; if it can't, the first send reloads from PostgreSQL
        await blocks.load_into_redis(svc.pool, svc.batcher, mobile)
    except Exception as exc:
        log.warning("signup_redis_copy_failed", user=mobile, error=type(exc).__name__)
    log.info("signup", user=mobile)
    return ok(201, message="signed up", id=str(user_id))


async def login(request: web.Request) -> web.Response:
    """Log in. Each attempt reserves its place in the failed-login counters before bcrypt
    runs (so parallel guesses cannot all pass a limit), and a right password gives its
    place back. The per-number counter is kept per client address too: a guesser locks
    the number only from where they guess, and its owner logs in from elsewhere."""
    svc = request.app[SERVICES]
    body = await json_body(request)
    mobile = body.get("mobileNo")
    password = string_field(body, "password")
    if not isinstance(mobile, str):
        raise InvalidRequest("mobileNo must be a string")
    named = "device" in body  # a v2 login: the answer and `hello` name the device
    # a device is known by its name trimmed and in NFC: "café" typed two ways is one
    device = device_name(name_field(body, "device")) if named else devices.DEFAULT_NAME
    cfg = svc.settings
    address = client_address(request)
    limits = login_limits(cfg, mobile if is_mobile(mobile) else "malformed", address)
    verdict = await ratelimit.reserve(svc.batcher, limits, cfg.login_fail_window_s)
    if not verdict.allowed:
        raise RateLimited(
            "too many failed logins, try again later", retry_after=verdict.retry_after
        )
    try:
        user = await accounts.find_user(svc.pool, mobile) if is_mobile(mobile) else None
        good = await svc.passwords.verify(password, user.password_hash if user else None, address)
    except Exception:  # not a guess: the database or bcrypt could not judge it (503)
        await ratelimit.release(svc.batcher, limits)
        raise
    if user is None or not good:
        if user is not None:
            await record_failed_login(svc, user)
        raise InvalidCredentials()
    await ratelimit.release(svc.batcher, limits)
    claims = svc.tokens.claims(user.mobile, user.id)
    expires = datetime.fromtimestamp(claims.expires_at, UTC)
    device_id = await accounts.login_device(
        svc.pool, user.id, device, cfg.max_devices, claims.jti, expires
    )
    claims = dataclasses.replace(
        claims, device=device_id, named=named, default=device == devices.DEFAULT_NAME
    )
    await devices.joined(svc.pool, svc.batcher, user.id, user.mobile, device_id, claims.device_key)
    token = svc.tokens.encode(claims)
    svc.tokens.known.remember(user.id, user.mobile)
    await accounts.record_event(svc.pool, user.id, "login", cfg.node_id)
    log.info("login", user=user.mobile, device=device_id)
    answer: dict[str, Any] = {"token": token, "expiresIn": claims.expires_at - _now()}
    if named:  # a v1 login (no `device`) gets the v1 answer, field for field
        answer["deviceId"] = str(device_id)
    return ok(message="logged in", **answer)


async def record_failed_login(svc: Services, user: accounts.User) -> None:
    """The audit trail of a wrong password (numbers without an account have no row to
    point at). A database that cannot take it does not change the answer."""
    try:
        await accounts.record_event(svc.pool, user.id, "login_failed", svc.settings.node_id)
    except Exception as exc:
        log.warning("login_failed_not_recorded", user=user.mobile, error=type(exc).__name__)


async def logout(request: web.Request) -> web.Response:
    """Revoke the token; done once PostgreSQL and Redis hold the revocation. Closing the
    socket it opened is best effort: if the route look-up or the message fails, each
    node's periodic token check closes it anyway."""
    svc = request.app[SERVICES]
    claims = await current_user(request)
    expires = datetime.fromtimestamp(claims.expires_at, UTC)
    await accounts.revoke_token(svc.pool, claims.uid, claims.jti, expires, svc.settings.node_id)
    await auth.revoke_in_redis(svc.batcher, [(claims.jti, claims.expires_at)])
    await devices.close_sessions(
        svc.batcher, svc.router, claims.mobile, claims.device_key, [claims.jti]
    )
    log.info("logout", user=claims.mobile)
    return ok(message="logged out")


async def list_devices(request: web.Request) -> web.Response:
    """The caller's devices, oldest first."""
    svc = request.app[SERVICES]
    claims = await current_user(request)
    return ok(data=devices.listing(await accounts.list_devices(svc.pool, claims.uid)))


async def delete_device(request: web.Request) -> web.Response:
    """Remove one of the caller's devices (404 for any other id): its tokens stop working
    and its socket closes with 4003. The caller may remove the device it calls from."""
    svc = request.app[SERVICES]
    claims = await current_user(request)
    raw = request.match_info["deviceId"]
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) <= auth.MAX_UID:
        raise NotFound("no such device")
    await devices.remove(
        svc.pool,
        svc.batcher,
        svc.router,
        claims.uid,
        claims.mobile,
        int(raw),
        svc.settings.node_id,
    )
    return ok(message="device removed")


def login_limits(settings: Settings, mobile: str, address: str) -> list[tuple[str, str, int]]:
    """Failed-login counters a login is judged by: per number at this client address,
    and per client address."""
    return [
        ("login-number", f"{mobile}|{address}", settings.login_fails_per_number),
        ("login-address", address, settings.login_fails_per_address),
    ]


def _now() -> int:
    return int(datetime.now(UTC).timestamp())
