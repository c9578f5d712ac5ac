"""A clock-driven pacer: audio released no faster than it plays.

A live channel fed from a file (or from an ffmpeg that decodes faster than
real time) must not run ahead of the listeners' clocks, or their buffers
would grow without bound. :class:`Pacer` is the one object that says *when*
the next frames may go out. It is pure arithmetic on a fixed starting point
plus :func:`trio.sleep_until`, never a running sum of ``sleep`` calls, so
the time spent decoding, publishing or waiting for the scheduler does not
accumulate into drift: a late wake-up is followed by an earlier next one.

The clock is trio's (``trio.current_time()``), so tests can run it with
``MockClock``/pytest-trio's ``autojump_clock`` in zero wall time. Chunks are
stamped with the wall clock (``time.time_ns()``) through :attr:`start_wall_ns`,
read at the same instant as the trio clock's start.
"""

from __future__ import annotations

import math
import time

import trio


class Pacer:
    """Release frames no faster than real time: after t seconds at most
    burst + t seconds of audio. Clock: trio.current_time().

    Frames are counted from the pacer's start (its construction), so one
    pacer can span several tracks of a channel: the schedule is that of one
    continuous stream, and a gap between tracks (ffmpeg starting) is caught
    up instead of shifting everything after it.
    """

    def __init__(self, sample_rate: int, *, burst: float = 0.0) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, not {sample_rate}")
        if not (math.isfinite(burst) and burst >= 0):
            raise ValueError(f"burst must be a non-negative number of seconds, not {burst}")
        self.sample_rate = sample_rate
        self.burst = burst
        #: trio time at the pacer's start
        self.start = trio.current_time()
        #: wall clock (``time.time_ns()``) at the pacer's start, to stamp chunks
        self.start_wall_ns = time.time_ns()

    def deadline(self, frames_total: int) -> float:
        """The trio time at which ``frames_total`` frames (since the start) may be released.

        Never before the start: the burst lets the first ``burst`` seconds out
        at once, not earlier than the pacer existed.
        """
        if frames_total < 0:
            raise ValueError(f"frames_total must not be negative, not {frames_total}")
        return self.start + max(0.0, frames_total / self.sample_rate - self.burst)

    def wall_ns(self, frames_total: int) -> int:
        """The wall clock matching :meth:`deadline`: when a chunk ending at that frame
        goes out on schedule, i.e. the ``time_ns`` to stamp it with.

        ``start_wall_ns + frames_total * 1e9 / rate``, shifted earlier by the burst
        (and never before the start), in integer arithmetic so that stamps of a
        long-running channel do not lose nanoseconds to float rounding.
        """
        if frames_total < 0:
            raise ValueError(f"frames_total must not be negative, not {frames_total}")
        offset = frames_total * 1_000_000_000 // self.sample_rate - round(self.burst * 1e9)
        return self.start_wall_ns + max(0, offset)

    async def wait_for(self, frames_total: int) -> None:
        """Sleep until ``frames_total`` frames (counted from the start) may be released.

        Always a checkpoint (it yields to the scheduler and can be cancelled),
        even when the deadline has already passed.
        """
        await trio.sleep_until(self.deadline(frames_total))
