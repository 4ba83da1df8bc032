"""Error codes of PROTOCOL.md, the exception tree, and their HTTP statuses."""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    INVALID_CREDENTIALS = "invalid_credentials"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    # socket-only codes
    INVALID_FRAME = "invalid_frame"
    UNKNOWN_RECIPIENT = "unknown_recipient"
    TOO_LARGE = "too_large"
    BLOCKED = "blocked"
    INBOX_FULL = "inbox_full"
    TOO_MANY_DEVICES = "too_many_devices"


HTTP_STATUS: dict[Code, int] = {
    Code.INVALID_REQUEST: 400,
    Code.UNAUTHORIZED: 401,
    Code.INVALID_CREDENTIALS: 401,
    Code.NOT_FOUND: 404,
    Code.CONFLICT: 409,
    Code.TOO_MANY_DEVICES: 409,
    Code.PAYLOAD_TOO_LARGE: 413,
    Code.RATE_LIMITED: 429,
    Code.UNAVAILABLE: 503,
    Code.INTERNAL: 500,
}


class CloseCode:
    """WebSocket close codes of PROTOCOL.md."""

    REPLACED = 4001
    LOGGED_OUT = 4003
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    RESTARTING = 1012


class ChatError(Exception):
    """Root of chatnode's refusals: a stable code and a message for people."""

    code: Code = Code.INTERNAL
    default_message = "internal error"

    def __init__(self, message: str | None = None, *, code: Code | None = None) -> None:
        self.message = message or self.default_message
        if code is not None:
            self.code = code
        super().__init__(self.message)

    @property
    def status(self) -> int:
        return HTTP_STATUS.get(self.code, 400)


class InvalidRequest(ChatError):
    code = Code.INVALID_REQUEST
    default_message = "invalid request"


class Unauthorized(ChatError):
    code = Code.UNAUTHORIZED
    default_message = "missing, invalid, expired or revoked token"


class InvalidCredentials(ChatError):
    code = Code.INVALID_CREDENTIALS
    default_message = "unknown number or wrong password"


class NotFound(ChatError):
    code = Code.NOT_FOUND
    default_message = "not found"


class Conflict(ChatError):
    code = Code.CONFLICT
    default_message = "already exists"


class TooManyDevices(ChatError):
    code = Code.TOO_MANY_DEVICES
    default_message = "this account has as many devices as it may; remove one first"


class Unavailable(ChatError):
    code = Code.UNAVAILABLE
    default_message = "a backing service is unavailable, try again later"


class RateLimited(ChatError):
    code = Code.RATE_LIMITED
    default_message = "too many requests, slow down"

    def __init__(self, message: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnknownRecipient(ChatError):
    code = Code.UNKNOWN_RECIPIENT
    default_message = "no such user"


class Blocked(ChatError):
    code = Code.BLOCKED
    default_message = "you blocked this user; unblock to send"


class InboxFull(ChatError):
    code = Code.INBOX_FULL
    default_message = "the recipient's inbox is full"
