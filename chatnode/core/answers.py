"""Answers in frame order, and the frames to write to the socket this turn.

Answers (`accepted`, `error`) go out in the order of the frames they answer, though some
need Redis first: such a frame takes its place in the queue, and what comes behind it
waits there. Inbox entries queue behind due answers too, so a receipt never beats the
`accepted` of its message.
"""

from __future__ import annotations

OUT_BUFFER_LOW = 256 * 1024  # past this many unsent bytes a session takes no entries
OUT_BUFFER_MAX = 4 * 1024 * 1024  # a client this far behind is disconnected


class Answer:
    """The place of one frame's answer among its socket's answers."""

    __slots__ = ("done", "frame")

    def __init__(self) -> None:
        self.done = False
        self.frame: bytes | None = None


class Answers:
    """A socket's answers due, and its outbox: frames ready, written at the turn's end."""

    __slots__ = ("outbox", "outbytes", "queue", "queued", "shut")

    def __init__(self) -> None:
        self.queue: list[Answer] | None = None  # answers waiting for an earlier one
        self.queued = 0  # bytes of frames in `queue`
        self.outbox: list[bytes] = []
        self.outbytes = 0  # bytes in outbox
        self.shut = False  # the socket is closing: nothing more is written

    def push(self, frame: bytes) -> None:
        """A frame to write now, ahead of any answer due (hello, typing)."""
        if self.shut:
            return
        self.outbox.append(frame)
        self.outbytes += len(frame)

    def later(self) -> Answer:
        """A place for the answer of a frame that needs Redis first."""
        answer = Answer()
        if self.queue is None:
            self.queue = [answer]
        else:
            self.queue.append(answer)
        return answer

    def give(self, answer: Answer | None, frame: bytes | None) -> None:
        """Give a frame's answer (None: nothing to say); `answer` None means right now,
        behind any answer still due."""
        queue = self.queue
        if answer is None:
            if frame is None:
                return
            if not queue:
                self.push(frame)
                return
            answer = Answer()
            queue.append(answer)
        answer.done, answer.frame = True, frame
        if frame is not None:
            self.queued += len(frame)
        while queue and queue[0].done:
            head = queue.pop(0)
            if head.frame is not None:
                self.queued -= len(head.frame)
                self.push(head.frame)
        if not queue:
            self.queue = None

    def take(self) -> list[bytes]:
        """The frames to write now; the outbox is empty after."""
        out, self.outbox, self.outbytes = self.outbox, [], 0
        return out

    def waiting(self) -> int:
        """Bytes queued in this process for the socket."""
        return self.outbytes + self.queued
