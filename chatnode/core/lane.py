"""The slow lane of one socket: frames whose work may need PostgreSQL (a recipient or a
receipt owner Redis lost), run one at a time by the driver (slowpath.py). The socket's
later frames wait until the lane is empty, so answers and Redis writes keep their order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chatnode import frames, logs
from chatnode.core.actions import Finish, Job, Next, RunSlow
from chatnode.core.answers import Answer
from chatnode.errors import ChatError, Code

if TYPE_CHECKING:
    from chatnode.core.socket import SocketCore

log = logs.get(__name__)


@dataclass(slots=True)
class Slow:
    """A place in the lane: the job running or waiting, and its answer's place."""

    answer: Answer
    ref: str | None
    job: Job
    finish: Finish


class SlowLane:
    """The jobs waiting, first the one running. One runner (the driver's task) takes
    them in turn: `RunSlow` starts it when the lane gets work and none is running."""

    __slots__ = ("core", "queue", "running")

    def __init__(self, core: SocketCore) -> None:
        self.core = core
        self.queue: list[Slow] | None = None
        self.running = False  # a runner takes jobs until `next` gives it None

    @property
    def busy(self) -> bool:
        return self.queue is not None

    def add(self, answer: Answer, ref: str | None, job: Job, finish: Finish) -> None:
        """Run a job that may need PostgreSQL; the socket's later frames wait for it."""
        if self.queue is None:
            self.queue = []
        self.queue.append(Slow(answer, ref, job, finish))
        if not self.running:
            self.running = True
            self.core.emit(RunSlow())

    def next(self) -> Job | None:
        """The job the runner runs next; None when the lane is empty or the socket gone,
        and the runner stops."""
        if self.queue and not self.core.closed:
            return self.queue[0].job
        self.running = False
        return None

    def done(self, result: Any) -> None:
        """The result (or the exception) of the job `next` gave."""
        core = self.core
        assert self.queue
        head = self.queue[0]
        missed = False
        try:
            out = head.finish(result)
        except ChatError as exc:
            core.node.metrics.refuse(exc.code)
            out = frames.error(exc.code, exc.message, head.ref)
            missed = exc.code == Code.UNKNOWN_RECIPIENT
        except Exception:
            log.exception("slow_operation_failed", user=core.mobile)
            out = frames.error(Code.UNAVAILABLE, "try again later", head.ref)
        if isinstance(out, Next):
            head.job, head.finish = out.job, out.finish
            return
        core.answers.give(head.answer, out)
        self.queue.pop(0)
        if missed:
            core.count_refusal()  # each miss may have cost a database look-up
        if not self.queue:
            self.queue = None
            core.release_held()
