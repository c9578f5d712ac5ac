"""The client's side of live audio: ``listen`` into a sink, ``publish`` from a source.

Listening writes every chunk to its sink as it arrives (standard output is
written unbuffered, so a pipe to a wake-word detector sees each chunk at
once). When the server says audio was lost (``gap``), the sink gets the same
number of frames of silence by default, so a recording keeps its length and
a detector its sample clock; the loss is reported on standard error.

Publishing reads a local source into a local :class:`~musiclib.live.hub.Hub`
with the same readers the server uses (a file is decoded and paced in real
time; a microphone is read through PortAudio) and forwards the hub to the
server as one listener of it. Standard input is forwarded as it comes.

Sinks and sources are small objects behind one interface each, so the CLI
only picks them.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import trio

from .client import RETRYABLE, Client, ListenReader
from .decode import AudioFormat
from .errors import OutputError, single_errors
from .live.hub import Chunk, End, Gap, Hub
from .live.sources import default_chunk_frames
from .protocol import Audio, ListenEnd, ListenStart
from .wav import patch_sizes, wav_header

log = logging.getLogger("musiclib.client")

#: chunk latencies kept for the summary line: ten minutes of 20 ms chunks
LATENCY_SAMPLES = 30_000

Connector = Callable[[], AbstractAsyncContextManager[Client]]


class Sink(Protocol):
    """Where a listen's samples go."""

    async def write(self, data: bytes) -> bool:
        """Write samples; ``False`` when the sink is gone (a player quit, a pipe closed)."""

    async def close(self) -> None:
        """Everything written has been passed on (a WAV header is patched)."""


class FdSink:
    """Raw samples (or a streamed WAV) to a file descriptor, each chunk as it arrives."""

    def __init__(self, fd: int, header: bytes = b"") -> None:
        self.fd = fd
        self._pending = header

    async def write(self, data: bytes) -> bool:
        if self._pending:
            data, self._pending = self._pending + data, b""
        try:
            await trio.to_thread.run_sync(_write_all, self.fd, data)
        except BrokenPipeError:
            return False
        except OSError as exc:
            raise OutputError(f"cannot write the output: {exc.strerror or exc}") from None
        return True

    async def close(self) -> None:
        if self._pending:
            await self.write(b"")


def create_output(path: Path, *, replace: bool = False) -> BinaryIO:
    """A new file at ``path`` for a recording: an existing one is refused (as ``get``
    refuses it) unless ``replace``, which removes it first, so that a symbolic link
    there is replaced, never written through. OutputError on failure."""
    try:
        if replace and (path.is_symlink() or path.is_file()):
            path.unlink()
        return open(path, "xb")  # the sink closes it
    except FileExistsError:
        raise OutputError(f"{path} already exists: use --force to replace it") from None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


class WavFileSink:
    """A WAV file whose header states the real length once the listen ends.

    The header is patched on every way out, Ctrl-C included, so what was
    recorded is always a valid file.
    """

    def __init__(self, path: Path, fmt: AudioFormat, *, replace: bool = False) -> None:
        self.path = path
        self._file: BinaryIO = create_output(path, replace=replace)
        try:
            self._file.write(wav_header(fmt.sample_format, fmt.sample_rate, fmt.channels, None))
        except OSError as exc:
            self._file.close()
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.data_bytes = 0

    async def write(self, data: bytes) -> bool:
        try:
            await trio.to_thread.run_sync(self._file.write, data)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self.data_bytes += len(data)
        return True

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(self._finish)
            except OSError as exc:
                raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def _finish(self) -> None:
        with self._file:
            self._file.flush()
            patch_sizes(self._file, self.data_bytes)


class RawFileSink(WavFileSink):
    """Bare samples to a file (``-o FILE --format s16le``): no header to patch."""

    def __init__(self, path: Path, *, replace: bool = False) -> None:
        self.path = path
        self._file = create_output(path, replace=replace)
        self.data_bytes = 0

    def _finish(self) -> None:
        with self._file:
            self._file.flush()


class PlayerSink:
    """A WAV stream into a media player's standard input."""

    def __init__(self, player: object, fmt: AudioFormat, frames: int | None = None) -> None:
        from .player import Player

        assert isinstance(player, Player)
        self.player = player
        size = None if frames is None else frames * fmt.bytes_per_frame
        # a known length lets the player show it (and gaps are filled, so it holds)
        self._header = wav_header(fmt.sample_format, fmt.sample_rate, fmt.channels, size)

    async def write(self, data: bytes) -> bool:
        if self._header:
            data, self._header = self._header + data, b""
        return await self.player.feed(data)

    async def close(self) -> None:
        pass


class SpeakerSink:
    """This machine's speaker through PortAudio, with a small jitter buffer."""

    def __init__(self, speaker: object) -> None:
        self.speaker = speaker

    async def write(self, data: bytes) -> bool:
        await self.speaker.write(data)  # type: ignore[attr-defined]
        return True

    async def close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self.speaker.drain()  # type: ignore[attr-defined]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


@dataclass
class ListenStats:
    """What a listen received, lost and how late it was."""

    start: ListenStart | None = None
    end: ListenEnd | None = None
    frames: int = 0
    lost: int = 0
    gaps: int = 0
    #: the latest chunks' latencies (bounded: a listen may run for days)
    latencies_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_SAMPLES)
    )
    stopped_by_user: bool = False
    sink_gone: bool = False

    def summary(self) -> str:
        """One line for standard error."""
        assert self.start is not None
        rate = self.start.sample_rate
        parts = [f"{self.frames} frames ({self.frames / rate:.2f} s)"]
        if self.lost:
            parts.append(f"{self.lost} lost in {self.gaps} gaps")
        if self.latencies_ms:
            lat = sorted(self.latencies_ms)
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            recent = " (last 10 min)" if len(lat) == LATENCY_SAMPLES else ""
            parts.append(
                f"latency median {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms{recent}"
            )
        return ", ".join(parts)


@dataclass(frozen=True)
class ListenOptions:
    """How to listen: the format asked for, the latency bound, the preroll, the length."""

    sample_format: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    max_latency_ms: int = 500
    preroll_ms: int = 0
    duration: float | None = None
    fill_gaps: bool = True


#: makes the sink for a listen's format; the second argument is the number of frames the
#: listen will write when it is known in advance (``--duration``), for a WAV header
SinkOpener = Callable[[AudioFormat, "int | None"], AbstractAsyncContextManager[Sink]]


async def listen(
    connect: Connector,
    channel: str,
    options: ListenOptions,
    open_sink: SinkOpener,
    *,
    retry_delays: Sequence[float] = (),
    on_start: Callable[[ListenStart, bool], None] | None = None,
) -> ListenStats:
    """Receive ``channel`` into the sink ``open_sink`` makes for the stream's format.

    ``on_start(start, continues)`` is told of every listen start (the first and each
    after a reconnection, ``continues`` when it resumes the same run) before any of
    its audio reaches the sink: a sink that stamps audio with the channel's clock
    (``listen --wyoming``) learns the positions there.

    The first Ctrl-C (SIGINT) or SIGTERM asks the server to stop, so the
    audio already on its way is still written and a WAV file is finished
    properly; a second one interrupts at once. ``--duration`` becomes an
    exact frame count (at the channel's rate, asked first on the same
    connection when no ``--rate`` is given).

    A dropped connection is listened to again after each of ``retry_delays``
    (seconds), with a preroll that covers the time it was away: positions
    already written are skipped and positions the channel no longer has are
    reported and filled like any gap, so the output keeps the channel's
    timing, every frame once. A channel that was started anew meanwhile
    (another ``epoch``) simply continues from its new start.
    """
    run = _Listening(channel, options, open_sink)
    run.on_start = on_start
    delays = list(retry_delays)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with contextlib.AsyncExitStack() as sinks, trio.open_nursery() as nursery:
            nursery.start_soon(run.on_signals, signals, nursery.cancel_scope)
            while True:
                try:
                    async with connect() as client:
                        await run.once(client, sinks)
                    break
                except RETRYABLE as exc:  # the network, a peer cut mid-frame, a full server
                    if not delays or run.stats.stopped_by_user or run.stats.sink_gone:
                        raise
                    if run.stats.start is None:
                        raise  # never started: nothing to resume, say so at once
                    delay = delays.pop(0)
                    log.warning("%s; listening again in %g s", exc, delay)
                    await trio.sleep(delay)
            nursery.cancel_scope.cancel()
    return run.stats


class ListenCursor:
    """Where a listen stands across reconnections: the channel's run and the next position.

    Sans-IO, shared by ``listen`` and by a relay (:mod:`musiclib.live.relay`),
    the two clients that resume a channel: after a dropped connection they ask
    for a preroll covering the time away (:meth:`resume_preroll_ms`), skip the
    positions they already have and treat those the channel no longer has as
    lost (:meth:`place`). Positions only compare within one run of the channel
    (its ``epoch``): :meth:`begin` says whether the new listen continues it.
    """

    def __init__(self) -> None:
        #: the run of the channel being followed (``listen_start.epoch``)
        self.epoch: int | None = None
        #: the next position due (``None``: take the first one that comes)
        self.expected: int | None = None
        #: trio time of the last event received
        self.last_arrival = 0.0
        #: a listen has started before
        self.begun = False

    def resume_preroll_ms(self) -> int:
        """The preroll a listen started again now asks for: the time away, and a margin."""
        away = trio.current_time() - self.last_arrival
        return min(PREROLL_LIMIT_MS, math.ceil(away * 1000) + 250)

    def begin(self, start: ListenStart) -> bool:
        """A listen started; ``True`` when it continues the run followed so far, ``False``
        on the first listen or when the channel was started anew (positions from its
        start on are then due)."""
        same = self.begun and start.epoch == self.epoch
        self.begun = True
        if not same:
            self.expected = None
        self.epoch = start.epoch
        if self.expected is None:
            self.expected = start.position
        self.last_arrival = trio.current_time()
        return same

    def place(self, position: int, frames: int) -> tuple[int, int]:
        """An event of ``frames`` at ``position`` arrived: ``(skip, hole)``, the frames at
        its start already had before, and the frames missing before it."""
        assert self.expected is not None, "begin() comes first"
        self.last_arrival = trio.current_time()
        return max(0, self.expected - position), max(0, position - self.expected)


class _Listening:
    """One ``listen`` command's state across reconnections: the sink, where it stands."""

    def __init__(self, channel: str, options: ListenOptions, open_sink: SinkOpener) -> None:
        self.channel = channel
        self.options = options
        self.open_sink = open_sink
        self.stats = ListenStats()
        self.sink: Sink | None = None
        self.fmt: AudioFormat | None = None
        self.total: int | None = None  # positions to cover in all (--duration)
        self.covered = 0  # positions covered so far: audio, gaps and holes
        self.cursor = ListenCursor()  # the next position to write, in which run
        self.audio: ListenReader | None = None
        self.on_start: Callable[[ListenStart, bool], None] | None = None

    async def on_signals(self, signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
        async for _ in signals:
            if self.stats.stopped_by_user:
                scope.cancel()  # the second signal: now
                raise KeyboardInterrupt
            self.stats.stopped_by_user = True
            if self.audio is not None:
                await self.audio.stop()

    async def once(self, client: Client, sinks: contextlib.AsyncExitStack) -> None:
        """One connection's listen (the first, or one after a reconnection)."""
        opts = self.options
        first = self.fmt is None
        if first:
            fmt_request = (opts.sample_format, opts.sample_rate, opts.channels)
            preroll = opts.preroll_ms
            if opts.duration is not None:
                rate = opts.sample_rate
                if rate is None:
                    known = {c.name: c for c in await client.channels()}
                    rate = known[self.channel].sample_rate if self.channel in known else 48000
                self.total = max(1, round(opts.duration * rate))
        else:
            assert self.fmt is not None
            fmt_request = (self.fmt.sample_format, self.fmt.sample_rate, self.fmt.channels)
            preroll = self.cursor.resume_preroll_ms()
        left = None if self.total is None else self.total - self.covered
        async with client.listen(
            self.channel,
            sample_format=fmt_request[0],
            sample_rate=fmt_request[1],
            channels=fmt_request[2],
            max_latency_ms=opts.max_latency_ms,
            preroll_ms=preroll,
            frames=left if first else None,  # a resumed listen may begin with frames we have
        ) as audio:
            self.audio = audio
            try:
                await self._receive(audio, sinks, first)
            finally:
                self.audio = None
            self.stats.end = audio.end

    async def _receive(
        self, audio: ListenReader, sinks: contextlib.AsyncExitStack, first: bool
    ) -> None:
        start = audio.start
        assert start is not None
        cursor = self.cursor
        if first:
            self.stats.start = start
            self.fmt = AudioFormat(start.sample_format, start.sample_rate, start.channels)
            self.sink = await sinks.enter_async_context(self.open_sink(self.fmt, self.total))
        continues = cursor.begin(start)
        if self.on_start is not None:
            self.on_start(start, continues)
        if continues:
            log.info("listening to %s again", self.channel)
        elif not first:
            log.warning(
                "%s was started anew meanwhile; continuing from its new start", self.channel
            )
        fmt, sink = self.fmt, self.sink
        assert fmt is not None and sink is not None
        bpf = fmt.bytes_per_frame
        async for event in audio:
            frames = len(event.payload) // bpf if isinstance(event, Audio) else event.frames
            position = event.position
            # skip: already written before a reconnection; hole: gone while we were away
            skip, hole = cursor.place(position, frames)
            if skip >= frames:
                continue
            assert cursor.expected is not None
            if hole and not await self._lose(hole, cursor.expected, "while reconnecting"):
                break
            frames -= skip
            if self.total is not None:
                frames = min(frames, self.total - self.covered)
            if isinstance(event, Audio):
                self.stats.latencies_ms.append((time.time_ns() - event.time_ns) / 1e6)
                data = event.payload[skip * bpf : (skip + frames) * bpf]
                ok = await sink.write(data)
                self.stats.frames += frames
                self.covered += frames
            else:
                ok = await self._lose(frames, position + skip, "this listener fell behind")
            cursor.expected = position + skip + frames
            if not ok:
                self.stats.sink_gone = True
                await audio.stop()
                break
            if self.total is not None and self.covered >= self.total:
                await audio.stop()  # a resumed listen counts for itself (no-op once complete)
                if audio.end is None:
                    async for _ in audio:  # what is on its way until listen_end: not ours
                        pass
                break

    async def _lose(self, frames: int, position: int, why: str) -> bool:
        """Account for ``frames`` lost at ``position`` (and fill them with silence)."""
        fmt, sink = self.fmt, self.sink
        assert fmt is not None and sink is not None
        if self.total is not None:
            frames = min(frames, self.total - self.covered)
        self.stats.gaps += 1
        self.stats.lost += frames
        self.covered += frames
        log.warning(
            "lost %d frames (%.0f ms) at frame %d: %s",
            frames,
            frames * 1000 / fmt.sample_rate,
            position,
            why,
        )
        return not self.options.fill_gaps or await sink.write(bytes(frames * fmt.bytes_per_frame))


#: the longest preroll a reconnection asks for (what the reference server keeps)
PREROLL_LIMIT_MS = 10_000


@dataclass(frozen=True)
class PublishSource:
    """A local source for ``publish``: its format, a description, and its reader."""

    format: AudioFormat
    description: str
    read: Callable[[Hub], Awaitable[None]]


def file_source(path: Path, fmt: AudioFormat, ffmpeg: str | None = None) -> PublishSource:
    """A local file, decoded by ffmpeg to ``fmt`` and paced in real time."""
    from .live.sources import run_decoded

    async def read(hub: Hub) -> None:
        await run_decoded(
            hub, [path], loop=False, ffmpeg=ffmpeg, chunk_frames=default_chunk_frames(fmt)
        )

    return PublishSource(fmt, path.name, read)


def mic_source(device: str | None, fmt: AudioFormat) -> PublishSource:
    """This machine's microphone (or the input device named ``device``)."""
    from .live.sources import run_mic

    async def read(hub: Hub) -> None:
        await run_mic(hub, device, chunk_frames=default_chunk_frames(fmt))

    return PublishSource(fmt, f"mic:{device}" if device else "mic", read)


def stdin_source(fmt: AudioFormat, fd: int = 0, *, realtime: bool = False) -> PublishSource:
    """Raw samples from standard input, forwarded as they come (paced with ``realtime``)."""
    from .live.pacing import Pacer
    from .live.sources import FrameCutter

    async def read(hub: Hub) -> None:
        cutter = FrameCutter(fmt.bytes_per_frame, default_chunk_frames(fmt))
        pacer = Pacer(fmt.sample_rate) if realtime else None
        while True:
            try:
                data = await trio.to_thread.run_sync(os.read, fd, 64 * 1024, abandon_on_cancel=True)
            except OSError as exc:
                raise OutputError(f"cannot read standard input: {exc.strerror or exc}") from None
            pieces = cutter.feed(data) if data else [t for t in [cutter.flush()] if t]
            for piece in pieces:
                if pacer is not None:
                    await pacer.wait_for(hub.position + len(piece) // fmt.bytes_per_frame)
                hub.publish(piece)
            if not data:
                return

    return PublishSource(fmt, "stdin", read)


@dataclass
class PublishStats:
    """What a publish sent."""

    frames: int = 0
    lost: int = 0
    accepted: int | None = None
    stopped_by_user: bool = False


async def publish(client: Client, channel: str, source: PublishSource) -> PublishStats:
    """Feed ``channel`` from ``source`` until the source ends or Ctrl-C.

    The source publishes into a local hub and this function is its one
    listener, forwarding to the server: the network never holds up a device
    callback, and if the network falls behind by more than 5 s the oldest
    local audio is dropped (and reported) instead of growing a queue.
    """
    fmt = source.format
    stats = PublishStats()
    hub = Hub(fmt, history_seconds=0)
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        hub.subscribe(max_backlog_frames=5 * fmt.sample_rate, lag_limit=math.inf) as sub,
    ):
        async with client.publish(
            channel,
            sample_rate=fmt.sample_rate,
            channels=fmt.channels,
            sample_format=fmt.sample_format,
            source=source.description,
        ) as pub:
            with single_errors():
                async with trio.open_nursery() as nursery:
                    reading = trio.CancelScope()

                    async def read() -> None:
                        with reading:
                            await source.read(hub)
                        hub.close("source_ended", "the source ended")

                    async def on_signal() -> None:
                        async for _ in signals:
                            if stats.stopped_by_user:
                                nursery.cancel_scope.cancel()
                                raise KeyboardInterrupt
                            stats.stopped_by_user = True
                            reading.cancel()

                    nursery.start_soon(read)
                    nursery.start_soon(on_signal)
                    while not isinstance(item := await sub.next(), End):
                        if isinstance(item, Gap):
                            stats.lost += item.frames
                            log.warning("the network fell behind: %d frames not sent", item.frames)
                            continue
                        assert isinstance(item, Chunk)
                        await pub.send(item.data)
                        stats.frames += len(item.data) // fmt.bytes_per_frame
                    nursery.cancel_scope.cancel()
        stats.accepted = pub.done.frames if pub.done is not None else None
    return stats
