"""Tasks nobody awaits: each is held until done (the loop keeps only a weak reference),
and can be waited for, with a deadline, or cancelled when the owner closes."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class TaskSet:
    """Tasks started and forgotten by their caller."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run `coro` as a task held here until it is done."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait(self, limit_s: float) -> None:
        """Wait for the tasks running now to finish, at most `limit_s` seconds."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=limit_s)

    async def cancel(self, limit_s: float) -> None:
        """Cancel the tasks running now and wait, at most `limit_s` seconds, for them to end."""
        for task in list(self._tasks):
            task.cancel()
        await self.wait(limit_s)
