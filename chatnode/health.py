"""What the node knows of its own readiness beyond pinging Redis and PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass

REQUIRED_EVICTION_POLICY = "noeviction"


@dataclass(slots=True)
class Health:
    """Set by app.py; read by /readyz."""

    draining: bool = False
    # Redis's maxmemory-policy as last read; None until read. Any policy but noeviction
    # may evict revocations (tokens work again) or inboxes (messages lost).
    eviction_policy: str | None = None

    def problem(self) -> str | None:
        """Why the node is not ready, apart from its dependencies; None if nothing."""
        if self.draining:
            return "draining"
        policy = self.eviction_policy
        if policy is not None and policy != REQUIRED_EVICTION_POLICY:
            return f"Redis maxmemory-policy is {policy}, not {REQUIRED_EVICTION_POLICY}"
        return None
