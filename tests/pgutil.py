"""PostgreSQL set-up shared by the integration tests and the benchmark (scripts/bench.py)."""

from __future__ import annotations

import contextlib

import asyncpg


async def ensure_database(admin_url: str, name: str) -> bool:
    """Create database `name` through `admin_url` if it is missing; False if unreachable."""
    try:
        conn = await asyncpg.connect(admin_url, timeout=3)
    except Exception:
        return False
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{name}"')
        return True
    finally:
        await conn.close()
