"""chatnode.tasks.TaskSet: tasks held until done, waited for or cancelled with a limit."""

from __future__ import annotations

import asyncio

from chatnode.tasks import TaskSet


async def test_a_task_is_held_until_done_then_forgotten() -> None:
    tasks = TaskSet()
    gate = asyncio.Event()
    task = tasks.spawn(gate.wait(), name="held")
    assert len(tasks) == 1 and task.get_name() == "held"
    gate.set()
    await tasks.wait(1)
    await asyncio.sleep(0)  # the done callback runs
    assert len(tasks) == 0 and task.result() is True


async def test_wait_gives_up_after_its_limit_and_leaves_the_task_running() -> None:
    tasks = TaskSet()
    task = tasks.spawn(asyncio.sleep(10))
    await tasks.wait(0.01)
    assert not task.done() and len(tasks) == 1
    await tasks.cancel(1)
    assert task.cancelled() and len(tasks) == 0


async def test_wait_and_cancel_with_no_tasks_return_at_once() -> None:
    tasks = TaskSet()
    await tasks.wait(10)
    await tasks.cancel(10)
