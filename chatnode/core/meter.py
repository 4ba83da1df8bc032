"""One socket's limits: frames and their bytes, sends, invalid frames, refusals in a row.

A user holds one socket in the whole cluster (a new one closes the old with 4001), so a
bucket on the socket limits the user on every node at once.

Buckets are made on the first frame, so an idle socket carries none. The send bucket
outlives the socket: its level is saved in Redis when the socket ends and restored by
the user's next one, on any node, so reconnecting does not refill it.
"""

from __future__ import annotations

import math

from chatnode.bucket import Bucket
from chatnode.config import Settings

MAX_INVALID_FRAMES = 20  # in a burst; then the socket closes with 1008
INVALID_REFILL_PER_S = 0.2  # one more invalid frame forgiven every 5 s
# Frame bytes metered with frames: CHATNODE_FRAME_RATE and _BURST times this many bytes.
BYTES_PER_FRAME = 2048


class Meter:
    __slots__ = ("bytes", "frames", "invalid", "refused", "sends", "settings")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.frames: Bucket | None = None
        self.bytes: Bucket | None = None
        self.sends: Bucket | None = None
        self.invalid: Bucket | None = None  # invalid frames allowed, refilled slowly
        self.refused = 0  # refusals (rate limits, unknown recipients) since the last success

    def frame(self, now: float, size: int) -> bool:
        """Meter one frame of `size` bytes, before it is parsed: invalid and oversized
        frames cost what valid ones do. False: over the frame or byte rate."""
        if self.frames is None or self.bytes is None:
            self._start(now)
            assert self.frames is not None and self.bytes is not None
        return self.frames.take(now) and self.bytes.take(now, cost=size)

    def _start(self, now: float) -> None:
        cfg = self.settings
        self.frames = Bucket(cfg.frame_rate, cfg.frame_burst, now)
        self.bytes = Bucket(
            cfg.frame_rate * BYTES_PER_FRAME, cfg.frame_burst * BYTES_PER_FRAME, now
        )
        if self.sends is None:  # else restored from an earlier socket
            self.sends = Bucket(cfg.send_rate, cfg.send_burst, now)
        self.invalid = Bucket(INVALID_REFILL_PER_S, MAX_INVALID_FRAMES - 1, now)

    def send(self, now: float) -> bool:
        """Take a send token (a send or a read receipt); False: over the send rate."""
        return self.sends is None or self.sends.take(now)

    def invalid_frame(self, now: float) -> bool:
        """Count an invalid frame; False when a burst of them (however many valid frames
        between) used up the allowance."""
        if self.invalid is None:
            self._start(now)
            assert self.invalid is not None
        return self.invalid.take(now)

    def refusal(self) -> bool:
        """Count a refusal; True once there were CHATNODE_REFUSALS_BEFORE_CLOSE in a row."""
        self.refused += 1
        return self.refused >= self.settings.refusals_before_close

    def restore(self, saved: str | None, now: float, wall_s: float) -> None:
        """Take up the send tokens an earlier socket left (`tokens|when`, see `saved`)."""
        if not isinstance(saved, str):
            return  # none saved (or Redis is away): a full bucket
        tokens, _, stamp = saved.partition("|")
        try:
            left, at = float(tokens), float(stamp)
        except ValueError:
            return
        cfg = self.settings
        bucket = Bucket(cfg.send_rate, cfg.send_burst, now)
        refill = max(0.0, wall_s - at) * cfg.send_rate
        bucket.tokens = min(cfg.send_burst, max(0.0, left) + refill)
        self.sends = bucket

    def saved(self, now: float, wall_s: float) -> tuple[str, int] | None:
        """The send bucket's level to leave for the next socket, and for how many seconds
        (as long as it takes to refill); None if it is (nearly) full."""
        bucket = self.sends
        if bucket is None:
            return None
        bucket.take(now, cost=0)  # refill up to now
        missing = bucket.burst - bucket.tokens
        if missing < 1:
            return None
        return f"{bucket.tokens:.3f}|{wall_s:.3f}", max(1, math.ceil(missing / bucket.rate))
