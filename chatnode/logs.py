"""structlog set-up: JSON lines in production, console in dev; secrets never logged."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

REDACTED_KEYS = frozenset({"password", "token", "body", "authorization", "secret"})


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in REDACTED_KEYS.intersection(event):
        event[key] = "***"
    return event


def configure(node_id: str, fmt: str = "json", level: int = logging.INFO) -> None:
    """Configure structlog once per process, binding the node id to every event."""
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(node=node_id)
    # Quieten libraries that log per connection at INFO.
    for name in ("websockets", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


def get(name: str) -> Any:
    return structlog.get_logger(name)
