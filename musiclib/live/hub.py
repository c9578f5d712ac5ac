"""One source, many listeners: the fan-out under every live feature.

A :class:`Hub` receives stamped chunks from exactly one source and hands each
one to every :class:`Subscription`. Publishing is synchronous and never waits
for anybody: a source is read once and at its own pace, whatever its
listeners do. Each subscription has its own bounded queue, measured in frames
of audio, whose bound the listener declared (its maximum latency). When a
listener falls further behind than that, the *oldest* audio in its queue is
dropped, for that listener only, and the listener is told exactly which
frames it lost with a :class:`Gap` before the next chunk it gets. Snapcast
drops stale chunks silently and Icecast cuts a client past its queue size;
here the listener keeps a sample-exact account.

A listener that keeps losing audio (at least once a second) for ``lag_limit``
seconds is cut: its queue is freed and it gets an :class:`End` whose reason
is ``too_slow``. Memory per listener is therefore bounded by what it declared
(``max_backlog_frames`` plus the preroll it asked for; the newest chunk is never
dropped, so a backlog shorter than one chunk still gets audio), and the chunks
themselves are shared: a queue holds references, not copies.

The hub also keeps the last ``history_seconds`` of audio, so a new listener
can start with the most recent audio (a wake-word detector wants the second
before it joined). Taking that history and registering the listener happen
in one synchronous call, so between the preroll and the live audio there is
neither a duplicate nor a hole.

Positions count frames since the channel started; every chunk carries the
position of its first frame, so a listener can always check continuity.
``epoch`` names that numbering (a listener that reconnects compares it). A
relay adopts another server's numbering with :meth:`Hub.start_at` before its
first chunk, so that every relay of one origin numbers the audio alike.
Nothing here does I/O; the only clock read is trio's, for the lag limit.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import trio

from ..decode import AudioFormat

#: seconds of recent audio a hub keeps for preroll, by default
DEFAULT_HISTORY = 10.0
#: a listener dropping audio at least this often (seconds) is "continuously behind"
LAG_WINDOW = 1.0


@dataclass(frozen=True, slots=True)
class Chunk:
    """Whole frames of audio and where they belong.

    ``position`` is the frame index of the first frame since the channel
    started; ``time_ns`` is the wall clock (``time.time_ns()``) at which the
    source delivered the chunk, that is when its last frame had been
    captured, so a listener's latency is its arrival time minus ``time_ns``.
    """

    position: int
    time_ns: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Gap:
    """``frames`` frames starting at ``position`` will never arrive."""

    position: int
    frames: int


@dataclass(frozen=True, slots=True)
class End:
    """The stream is over: ``reason`` is a short code, ``message`` one line for a human."""

    reason: str
    message: str


Item = Chunk | Gap


class Hub:
    """Fan-out of one source's chunks to any number of subscriptions."""

    def __init__(self, fmt: AudioFormat, *, history_seconds: float = DEFAULT_HISTORY) -> None:
        self.format = fmt
        self._bpf = fmt.bytes_per_frame
        #: position the next published chunk starts at
        self.position = 0
        self._history: collections.deque[Item] = collections.deque()
        self._history_frames = 0  # frames covered by _history, gaps included
        self._history_limit = max(0, round(history_seconds * fmt.sample_rate))
        self._subs: set[Subscription] = set()
        self.end: End | None = None
        #: chunks published so far
        self.chunks = 0
        #: wall clock of the last published chunk (0: none yet)
        self.last_time_ns = 0
        #: the identity of this numbering of positions (ns since the Unix epoch): a
        #: listener that reconnects and finds another epoch knows positions began anew
        self.epoch = time.time_ns()
        #: the source says no audio comes for now (a relay that lost its origin):
        #: the channel shows ``waiting`` though it has published before
        self.paused = False

    @property
    def closed(self) -> bool:
        """The source has ended; no more audio will come."""
        return self.end is not None

    @property
    def listeners(self) -> int:
        """Subscriptions receiving audio now."""
        return len(self._subs)

    def start_at(self, position: int, epoch: int) -> bool:
        """Number positions from ``position`` within ``epoch`` (another hub's numbering,
        the one a relay mirrors); ``False``, changing nothing, once the numbering is in
        use: a chunk was published, or a listener has been told where it starts and
        still listens (a hole of ``position`` frames would reach it)."""
        if self.chunks or self._subs or self._history or self.end is not None:
            return False
        if position < 0:
            raise ValueError(f"a position is never negative, not {position}")
        self.position = position
        self.epoch = epoch
        return True

    def frames_of(self, data: bytes) -> int:
        """Whole frames in ``data``; ``ValueError`` when it is not a whole number of them."""
        frames, rest = divmod(len(data), self._bpf)
        if rest or not frames:
            raise ValueError(
                f"a chunk must be whole frames of {self._bpf} bytes, not {len(data)} bytes"
            )
        return frames

    def publish(self, data: bytes, time_ns: int | None = None) -> Chunk:
        """Hand ``data`` (whole frames) to every listener now; it starts at :attr:`position`."""
        chunk = Chunk(self.position, time.time_ns() if time_ns is None else time_ns, data)
        self.publish_chunk(chunk)
        return chunk

    def publish_chunk(self, chunk: Chunk) -> None:
        """Like :meth:`publish` with the position given: a position past :attr:`position`
        leaves a hole, which every listener is told about as a :class:`Gap`.

        After :meth:`close` this does nothing: a source that is still being
        stopped when its channel ends has nobody left to hear it.
        """
        if self.end is not None:
            return
        frames = self.frames_of(chunk.data)
        if chunk.position < self.position:
            raise ValueError(f"chunk at {chunk.position} overlaps audio up to {self.position}")
        if chunk.position > self.position:
            hole = Gap(self.position, chunk.position - self.position)
            self._remember(hole, hole.frames)
            for sub in tuple(self._subs):
                sub._offer(hole, 0)
        self._remember(chunk, frames)
        self.position = chunk.position + frames
        self.chunks += 1
        self.last_time_ns = chunk.time_ns
        for sub in tuple(self._subs):
            sub._offer(chunk, frames)

    def _remember(self, item: Item, frames: int) -> None:
        history = self._history
        history.append(item)
        self._history_frames += frames
        while history and self._history_frames - _span(history[0], self._bpf) >= max(
            self._history_limit, 1
        ):
            self._history_frames -= _span(history.popleft(), self._bpf)

    def close(self, reason: str, message: str) -> None:
        """The source ended: each listener gets what is queued for it, then ``End``."""
        if self.end is not None:
            return
        self.end = End(reason, message)
        for sub in tuple(self._subs):
            sub._finish(self.end)
        self._subs.clear()

    def subscribe(
        self, *, max_backlog_frames: int, preroll_frames: int = 0, lag_limit: float = 10.0
    ) -> Subscription:
        """A new listener; it first gets up to ``preroll_frames`` of the most recent audio.

        Atomic: no chunk can be published between taking the preroll and
        registering, so the listener sees every frame from its first one on
        exactly once (or as part of a ``Gap``).
        """
        if max_backlog_frames < 1:
            raise ValueError("max_backlog_frames must be at least 1")
        preroll = self._preroll(max(0, preroll_frames))
        sub = Subscription(self, max_backlog_frames, lag_limit, preroll)
        if self.end is not None:
            sub._finish(self.end)
        else:
            self._subs.add(sub)
        return sub

    def _preroll(self, frames: int) -> list[Item]:
        """The most recent ``frames`` frames of history (fewer if it holds less)."""
        taken: list[Item] = []
        need = frames
        for item in reversed(self._history):
            if need <= 0:
                break
            span = _span(item, self._bpf)
            if span > need:  # keep only the end of this item
                skip = span - need
                if isinstance(item, Chunk):
                    item = Chunk(item.position + skip, item.time_ns, item.data[skip * self._bpf :])
                else:
                    item = Gap(item.position + skip, need)
                span = need
            taken.append(item)
            need -= span
        taken.reverse()
        return taken

    def _drop(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def oldest_backlog_ns(self) -> int:
        """The wall-clock time of the oldest audio waiting for any listener (0: none waits)."""
        oldest = 0
        for sub in self._subs:
            t = sub.oldest_time_ns
            if t and (not oldest or t < oldest):
                oldest = t
        return oldest


def _span(item: Item, bpf: int) -> int:
    return item.frames if isinstance(item, Gap) else len(item.data) // bpf


class Subscription:
    """One listener's view of a hub: its queue, its losses, its end.

    ``async for``-free on purpose: :meth:`next` returns a ``Chunk``, a
    ``Gap`` or, last, an ``End``; after the ``End`` it keeps returning it.
    ``on_cut`` (set by whoever serves the listener) is called synchronously
    when the hub cuts this listener, e.g. to stop a send that is stuck.
    """

    def __init__(
        self, hub: Hub, max_backlog_frames: int, lag_limit: float, preroll: list[Item]
    ) -> None:
        self._hub = hub
        self._bpf = hub._bpf
        self.max_backlog_frames = max_backlog_frames
        self.lag_limit = lag_limit
        self._queue: collections.deque[Item] = collections.deque(preroll)
        self._queued = sum(_span(i, self._bpf) for i in preroll if isinstance(i, Chunk))
        # what the listener asked for beyond its live backlog: the allowance shrinks
        # back to max_backlog_frames as the preroll is consumed
        self._preroll_left = self._queued
        self._lost: Gap | None = None  # dropped audio not yet reported; precedes the queue
        self._end: End | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._streak_start = 0.0
        self._last_drop: float | None = None
        #: frames this listener lost to falling behind (not counting holes in the source)
        self.lost_frames = 0
        #: first position this listener will see
        self.start_position = preroll[0].position if preroll else hub.position
        self.on_cut: Callable[[], None] | None = None
        #: a synchronous delivery, tried (from the source's task) for a chunk that would
        #: otherwise wake a reader waiting on an empty queue; True: it was delivered
        self.direct: Callable[[Chunk], bool] | None = None
        self._idle = False  # the reader waits in wait() with nothing taken and nothing queued
        self._poked = False

    # ---- the hub's side -------------------------------------------------

    def _offer(self, item: Item, frames: int) -> None:
        if self._end is not None:
            return
        if self._idle and self.direct is not None and isinstance(item, Chunk) and self.direct(item):
            return  # the order holds: the reader waits with nothing queued or taken
        self._queue.append(item)
        self._queued += frames
        if self._queued > self.max_backlog_frames + self._preroll_left:
            self._fall_behind()
        if self._lot:
            self._idle = False
            self._lot.unpark()

    def _fall_behind(self) -> None:
        """Drop the oldest audio until the queue fits again; cut a listener that stays behind."""
        limit = self.max_backlog_frames + self._preroll_left
        queue = self._queue
        lost_before = self.lost_frames
        # the newest chunk (just offered) is not behind, even when it alone exceeds the limit
        while self._queued > limit and len(queue) > 1:
            item = queue.popleft()
            span = _span(item, self._bpf)
            if isinstance(item, Chunk):
                self._queued -= span
                self.lost_frames += span
                self._preroll_left = max(0, self._preroll_left - span)
                limit = self.max_backlog_frames + self._preroll_left
            lost = self._lost
            self._lost = (
                Gap(item.position, span) if lost is None else Gap(lost.position, lost.frames + span)
            )
        if self.lost_frames == lost_before:
            return  # no audio lost: not a step towards a cut
        now = trio.current_time()
        if self._last_drop is None or now - self._last_drop > LAG_WINDOW:
            self._streak_start = now
        self._last_drop = now
        if now - self._streak_start >= self.lag_limit:
            self._cut()

    def _cut(self) -> None:
        self._hub._drop(self)
        self._queue.clear()
        self._queued = 0
        self._lost = None
        self._end = End(
            "too_slow",
            f"the listener fell behind and lost audio for {self.lag_limit:g} s; disconnected",
        )
        if self.on_cut is not None:
            self.on_cut()

    def _finish(self, end: End) -> None:
        if self._end is None:
            self._end = end
        self._idle = False
        if self._lot:
            self._lot.unpark_all()

    # ---- the listener's side --------------------------------------------

    @property
    def backlog_frames(self) -> int:
        """Frames of audio waiting for this listener."""
        return self._queued

    @property
    def oldest_time_ns(self) -> int:
        """Wall clock of the oldest chunk waiting for this listener (0: none waits)."""
        for item in self._queue:
            if isinstance(item, Chunk):
                return item.time_ns
        return 0

    @property
    def cut(self) -> bool:
        """The hub cut this listener for falling behind."""
        return self._end is not None and self._end.reason == "too_slow"

    def next_nowait(self) -> Chunk | Gap | End | None:
        """The next item if one is ready, else ``None``."""
        if self._lost is not None:
            lost, self._lost = self._lost, None
            return lost
        if self._queue:
            item = self._queue.popleft()
            if isinstance(item, Chunk):
                span = len(item.data) // self._bpf
                self._queued -= span
                if self._preroll_left:
                    self._preroll_left = max(0, self._preroll_left - span)
            return item
        return self._end

    def wake(self) -> None:
        """Make a pending :meth:`wait` return now, though nothing arrived."""
        self._poked = True
        self._idle = False
        if self._lot:
            self._lot.unpark_all()

    async def wait(self) -> None:
        """Wait until an item is ready (or :meth:`wake`); takes nothing, so cancelling it
        loses nothing. While it waits, :attr:`direct` may deliver chunks instead."""
        if self._poked or self._lost is not None or self._queue or self._end is not None:
            self._poked = False
            await trio.lowlevel.checkpoint()
            return
        self._idle = True
        try:
            await self._lot.park()
        finally:
            self._idle = False
            self._poked = False

    async def next(self) -> Chunk | Gap | End:
        """The next chunk, gap, or the end; waits for the source if nothing is queued.

        Cancellation-safe: a cancelled call has taken nothing from the queue.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            item = self.next_nowait()
            if item is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return item
            await self._lot.park()

    def close(self) -> None:
        """Stop receiving; frees the queue. Safe to call more than once."""
        self._hub._drop(self)
        self._queue.clear()
        self._queued = 0
        if self._end is None:
            self._end = End("closed", "the subscription was closed")
        if self._lot:
            self._lot.unpark_all()  # a reader waiting in next() gets the end

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
