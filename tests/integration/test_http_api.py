"""Every HTTP endpoint of PROTOCOL.md: its success answer and its error answers."""

from __future__ import annotations

import pytest

from tests.integration.harness import Api, Stack, auth_event_kinds, new_mobile, new_user


def assert_error(status: int, body: dict, want_status: int, code: str) -> None:
    assert status == want_status, body
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_signup_returns_201_with_id(api_a: Api) -> None:
    status, body, _ = await api_a.call(
        "POST", "/auth/signup", {"name": "Ann", "mobileNo": new_mobile(), "password": "secret123"}
    )
    assert status == 201
    assert body["success"] is True and body["id"] and isinstance(body["message"], str)


async def test_signin_is_an_alias_of_signup(api_a: Api, api_b: Api) -> None:
    mobile = new_mobile()
    status, body, _ = await api_a.call(
        "POST", "/auth/signin", {"name": "Bo", "mobileNo": mobile, "password": "secret123"}
    )
    assert status == 201 and body["success"] is True
    status, body, _ = await api_b.call(
        "POST", "/auth/login", {"mobileNo": mobile, "password": "secret123"}
    )
    assert status == 200


async def test_signup_taken_number_is_409_on_any_node(api_a: Api, api_b: Api) -> None:
    mobile = new_mobile()
    await api_a.call(
        "POST", "/auth/signup", {"name": "A", "mobileNo": mobile, "password": "secret123"}
    )
    status, body, _ = await api_b.call(
        "POST", "/auth/signup", {"name": "B", "mobileNo": mobile, "password": "secret999"}
    )
    assert_error(status, body, 409, "conflict")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "A", "mobileNo": "12345", "password": "secret123"},  # too short a number
        {"name": "A", "mobileNo": "+1234567890123456", "password": "secret123"},
        {"name": "A", "mobileNo": "555-1234567", "password": "secret123"},
        {"name": "A", "mobileNo": 15551234567, "password": "secret123"},
        {"name": "", "mobileNo": "+15551234567", "password": "secret123"},
        {"name": "x" * 65, "mobileNo": "+15551234567", "password": "secret123"},
        {"name": "A", "mobileNo": "+15551234567", "password": "short"},
        {"name": "A", "mobileNo": "+15551234567", "password": "é" * 37},  # 74 bytes
        {"mobileNo": "+15551234567", "password": "secret123"},
        ["not", "an", "object"],
    ],
)
async def test_signup_invalid_body_is_400(api_a: Api, body: object) -> None:
    status, answer, _ = await api_a.call("POST", "/auth/signup", body)
    assert_error(status, answer, 400, "invalid_request")


async def test_signup_password_limits_count_utf8_bytes(api_a: Api) -> None:
    status, _, _ = await api_a.call(
        "POST", "/auth/signup", {"name": "A", "mobileNo": new_mobile(), "password": "é" * 36}
    )
    assert status == 201  # 72 bytes is the most bcrypt takes


async def test_malformed_json_is_400(api_a: Api) -> None:
    status, body, _ = await api_a.call("POST", "/auth/signup", raw=b"{not json")
    assert_error(status, body, 400, "invalid_request")


async def test_body_over_64k_is_413(api_a: Api) -> None:
    big = b'{"name": "' + b"a" * (65 * 1024) + b'"}'
    status, body, _ = await api_a.call("POST", "/auth/signup", raw=big)
    assert_error(status, body, 413, "payload_too_large")


async def test_login_returns_token_and_integer_expiry(api_a: Api) -> None:
    user = await new_user(api_a)
    status, body, _ = await api_a.call(
        "POST", "/auth/login", {"mobileNo": user.mobile, "password": user.password}
    )
    assert status == 200 and body["success"] is True
    assert isinstance(body["token"], str) and body["token"].count(".") == 2
    assert isinstance(body["expiresIn"], int) and 0 < body["expiresIn"] <= 86400


async def test_login_unknown_number_and_wrong_password_answer_alike(api_a: Api) -> None:
    user = await new_user(api_a)
    s1, wrong, _ = await api_a.call(
        "POST", "/auth/login", {"mobileNo": user.mobile, "password": "nope-nope"}
    )
    s2, unknown, _ = await api_a.call(
        "POST", "/auth/login", {"mobileNo": new_mobile(), "password": "nope-nope"}
    )
    assert_error(s1, wrong, 401, "invalid_credentials")
    assert (s1, wrong) == (s2, unknown)


async def test_login_missing_fields_is_400(api_a: Api) -> None:
    status, body, _ = await api_a.call("POST", "/auth/login", {"mobileNo": "+15551234567"})
    assert_error(status, body, 400, "invalid_request")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/auth/logout"),
        ("POST", "/block-action/block"),
        ("DELETE", "/block-action/unblock?mobileNo=%2B15551234567"),
        ("GET", "/block-action/list"),
        ("GET", "/profile/lastseen?mobileNo=%2B15551234567"),
    ],
)
@pytest.mark.parametrize("token", [None, "not-a-jwt", "a.b.c"])
async def test_auth_endpoints_refuse_bad_tokens(
    api_a: Api, method: str, path: str, token: str | None
) -> None:
    status, body, _ = await api_a.call(
        method, path, {"blockedUserMobileNo": "+15551234567"}, token=token
    )
    assert_error(status, body, 401, "unauthorized")


async def test_logout_revokes_the_token_on_every_node(api_a: Api, api_b: Api) -> None:
    user = await new_user(api_a)
    status, body, _ = await api_a.call("GET", "/block-action/list", token=user.token)
    assert status == 200
    status, body, _ = await api_a.call("POST", "/auth/logout", token=user.token)
    assert status == 200 and body["success"] is True
    for api in (api_a, api_b):
        status, body, _ = await api.call("GET", "/block-action/list", token=user.token)
        assert_error(status, body, 401, "unauthorized")


async def test_block_list_unblock(api_a: Api, api_b: Api) -> None:
    me = await new_user(api_a)
    other = await new_user(api_a, name="Other")
    status, body, _ = await api_a.call(
        "POST", "/block-action/block", {"blockedUserMobileNo": other.mobile}, me.token
    )
    assert status == 200 and body["success"] is True
    status, _, _ = await api_b.call(
        "POST", "/block-action/block", {"blockedUserMobileNo": other.mobile}, me.token
    )
    assert status == 200  # idempotent
    status, body, _ = await api_b.call("GET", "/block-action/list", token=me.token)
    assert status == 200 and body["data"] == [{"mobileNo": other.mobile, "username": "Other"}]
    status, body, _ = await api_a.call(
        "DELETE", "/block-action/unblock", token=me.token, params={"mobileNo": other.mobile}
    )
    assert status == 200 and body["success"] is True
    status, body, _ = await api_a.call("GET", "/block-action/list", token=me.token)
    assert body["data"] == []
    status, body, _ = await api_a.call(
        "DELETE", "/block-action/unblock", token=me.token, params={"mobileNo": other.mobile}
    )
    assert_error(status, body, 404, "not_found")  # no longer blocked


async def test_block_errors(api_a: Api) -> None:
    me = await new_user(api_a)
    status, body, _ = await api_a.call(
        "POST", "/block-action/block", {"blockedUserMobileNo": new_mobile()}, me.token
    )
    assert_error(status, body, 404, "not_found")
    status, body, _ = await api_a.call(
        "POST", "/block-action/block", {"blockedUserMobileNo": me.mobile}, me.token
    )
    assert_error(status, body, 400, "invalid_request")
    status, body, _ = await api_a.call(
        "POST", "/block-action/block", {"blockedUserMobileNo": "bad"}, me.token
    )
    assert_error(status, body, 400, "invalid_request")
    status, body, _ = await api_a.call(
        "DELETE", "/block-action/unblock", token=me.token, params={"mobileNo": new_mobile()}
    )
    assert_error(status, body, 404, "not_found")
    status, body, _ = await api_a.call("DELETE", "/block-action/unblock", token=me.token)
    assert_error(status, body, 400, "invalid_request")


async def test_lastseen_answers(api_a: Api) -> None:
    me = await new_user(api_a)
    other = await new_user(api_a, name="Never")
    status, body, _ = await api_a.call(
        "GET", "/profile/lastseen", token=me.token, params={"mobileNo": other.mobile}
    )
    assert status == 200
    assert body["data"] == {"username": "Never", "mobileNo": other.mobile}  # never connected
    status, body, _ = await api_a.call(
        "GET", "/profile/lastseen", token=me.token, params={"mobileNo": new_mobile()}
    )
    assert_error(status, body, 404, "not_found")
    status, body, _ = await api_a.call(
        "GET", "/profile/lastseen", token=me.token, params={"mobileNo": "x"}
    )
    assert_error(status, body, 400, "invalid_request")


async def test_unknown_path_and_method_are_404_envelopes(api_a: Api) -> None:
    status, body, _ = await api_a.call("GET", "/no/such/path")
    assert_error(status, body, 404, "not_found")
    status, body, _ = await api_a.call("GET", "/auth/signup")
    assert_error(status, body, 404, "not_found")


async def test_health_ready_metrics(api_a: Api) -> None:
    status, _, _ = await api_a.call("GET", "/healthz")
    assert status == 200
    status, body, _ = await api_a.call("GET", "/readyz")
    assert status == 200 and body["success"] is True
    async with api_a.session.get(api_a.base + "/metrics") as resp:
        text = await resp.text()
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    for name in (
        "chatnode_messages_accepted_total",
        "chatnode_messages_delivered_total",
        "chatnode_messages_acked_total",
        "chatnode_sockets_open",
        "chatnode_send_seconds_bucket",
    ):
        assert name in text


async def test_auth_events_record_signup_login_logout(api_a: Api, stack: Stack) -> None:
    user = await new_user(api_a)
    await api_a.call("POST", "/auth/logout", token=user.token)
    kinds = await auth_event_kinds(stack.database_url, user.mobile)
    assert kinds == [("signup", "test-a"), ("login", "test-a"), ("logout", "test-a")]


@pytest.mark.parametrize(
    "body",
    [
        {"name": "nul\u0000name", "mobileNo": "+15551230000", "password": "secret123"},
        {"name": "tab\tname", "mobileNo": "+15551230000", "password": "secret123"},
        {"name": "ok", "mobileNo": "+15551230000", "password": "secret\u0000123"},
    ],
)
async def test_signup_control_characters_are_400_not_500(api_a: Api, body: dict) -> None:
    """Found by schemathesis: PostgreSQL cannot store NUL, and bcrypt stops at it."""
    status, answer, _ = await api_a.call("POST", "/auth/signup", body)
    assert_error(status, answer, 400, "invalid_request")


@pytest.mark.parametrize("password", ["x" * 100, "nul\u0000password", "é" * 40])
async def test_login_with_impossible_password_is_401_not_500(api_a: Api, password: str) -> None:
    """Found by schemathesis: bcrypt refuses over 72 bytes; such a login is just wrong."""
    user = await new_user(api_a)
    status, body, _ = await api_a.call(
        "POST", "/auth/login", {"mobileNo": user.mobile, "password": password}
    )
    assert_error(status, body, 401, "invalid_credentials")
