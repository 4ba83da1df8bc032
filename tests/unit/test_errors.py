"""chatnode.errors: codes, HTTP statuses and close codes of PROTOCOL.md."""

from __future__ import annotations

import pytest

from chatnode import errors
from chatnode.errors import HTTP_STATUS, ChatError, CloseCode, Code

# PROTOCOL.md, "HTTP API" table
PROTOCOL_STATUS = {
    "invalid_request": 400,
    "unauthorized": 401,
    "invalid_credentials": 401,
    "not_found": 404,
    "conflict": 409,
    "payload_too_large": 413,
    "rate_limited": 429,
    "unavailable": 503,
    "internal": 500,
    "too_many_devices": 409,  # v2
}

# PROTOCOL.md, "Error codes on the socket"
SOCKET_CODES = {
    "invalid_frame",
    "unknown_recipient",
    "too_large",
    "blocked",
    "rate_limited",
    "inbox_full",
    "unavailable",
}


@pytest.mark.parametrize(("code", "status"), sorted(PROTOCOL_STATUS.items()))
def test_http_code_maps_to_protocol_status(code: str, status: int) -> None:
    assert HTTP_STATUS[Code(code)] == status


def test_http_status_table_has_exactly_the_protocol_codes() -> None:
    assert {str(c) for c in HTTP_STATUS} == set(PROTOCOL_STATUS)


def test_every_protocol_code_exists() -> None:
    assert {c.value for c in Code} == set(PROTOCOL_STATUS) | SOCKET_CODES


def test_codes_are_their_wire_strings() -> None:
    assert Code.INVALID_FRAME.value == "invalid_frame"
    assert Code("invalid_frame") is Code.INVALID_FRAME
    assert str(Code.TOO_LARGE) == "too_large"
    assert f"{Code.INBOX_FULL}" == "inbox_full"


SUBCLASSES = [
    (errors.InvalidRequest, Code.INVALID_REQUEST, 400),
    (errors.Unauthorized, Code.UNAUTHORIZED, 401),
    (errors.InvalidCredentials, Code.INVALID_CREDENTIALS, 401),
    (errors.NotFound, Code.NOT_FOUND, 404),
    (errors.TooManyDevices, Code.TOO_MANY_DEVICES, 409),
    (errors.Conflict, Code.CONFLICT, 409),
    (errors.Unavailable, Code.UNAVAILABLE, 503),
    (errors.UnknownRecipient, Code.UNKNOWN_RECIPIENT, None),
    (errors.Blocked, Code.BLOCKED, None),
    (errors.InboxFull, Code.INBOX_FULL, None),
]


@pytest.mark.parametrize(
    ("cls", "code", "status"), SUBCLASSES, ids=lambda v: getattr(v, "__name__", None)
)
def test_subclass_carries_its_code(cls: type[ChatError], code: Code, status: int | None) -> None:
    err = cls()
    assert isinstance(err, ChatError)
    assert err.code == code
    assert err.message == cls.default_message
    assert err.message
    assert str(err) == err.message
    if status is not None:
        assert err.status == status


@pytest.mark.parametrize(
    ("cls", "code", "status"), SUBCLASSES, ids=lambda v: getattr(v, "__name__", None)
)
def test_subclass_keeps_a_given_message(
    cls: type[ChatError], code: Code, status: int | None
) -> None:
    err = cls("custom words")
    assert err.message == "custom words"
    assert str(err) == "custom words"
    assert err.code == code


def test_subclasses_do_not_share_codes() -> None:
    codes = [code for _, code, _ in SUBCLASSES]
    assert len(codes) == len(set(codes))


def test_base_chat_error_is_internal_500() -> None:
    err = ChatError()
    assert err.code == Code.INTERNAL
    assert err.status == 500
    assert err.message == "internal error"


def test_code_override_changes_code_and_status() -> None:
    err = errors.InvalidRequest("slow down", code=Code.RATE_LIMITED)
    assert err.code == Code.RATE_LIMITED
    assert err.status == 429
    assert errors.InvalidRequest().code == Code.INVALID_REQUEST  # class untouched


def test_payload_too_large_via_override_is_413() -> None:
    assert ChatError("too big", code=Code.PAYLOAD_TOO_LARGE).status == 413


def test_socket_only_codes_fall_back_to_400() -> None:
    assert errors.InboxFull().status == 400
    assert errors.Blocked().status == 400


def test_close_codes_are_those_of_the_protocol() -> None:
    assert CloseCode.REPLACED == 4001
    assert CloseCode.LOGGED_OUT == 4003
    assert CloseCode.POLICY == 1008
    assert CloseCode.TOO_BIG == 1009
    assert CloseCode.INTERNAL == 1011
    assert CloseCode.RESTARTING == 1012
