"""The ffmpeg pipeline: find the binary, build the command, read the samples in chunks.

Every decoded stream gets one ffmpeg process of its own, and its samples are
read from ffmpeg's standard output pipe one chunk at a time, only when the
caller asks for the next chunk. Backpressure is therefore end to end: a slow
client makes the server stop reading the pipe, the pipe fills, ffmpeg blocks
on its write, and nothing grows without bound anywhere. ffmpeg's standard
error is drained at the same time into a small ring buffer, so ffmpeg can
never block on it, and its last line becomes the reason when decoding fails.

pydub is deliberately not used on this path: ``AudioSegment.from_file``
decodes the whole file into memory (166 MiB for a five-minute track), where a
streaming ffmpeg read in 64 KiB chunks used about 15 MiB.

The process never outlives :func:`open_decoder`: leaving the block for any
reason (the end of the stream, an exception, a cancellation) kills ffmpeg if
it still runs and reaps it, so there are no orphans and no zombies.

Besides the decoder itself: :func:`output_format` brings a source's own rate
and channels into the protocol's ranges when a request leaves them to the
source (an 800 Hz, a 768 kHz or a 12-channel file decodes too), and
:class:`DecodeSlots` caps how many decodes run at once. Playback speed is
:class:`musiclib.live.pacing.Pacer`'s job, for paced decoded streams and live
channels alike.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import trio

from .errors import Busy, DecodeFailed, InternalError, single_errors
from .protocol import CHANNELS, SAMPLE_FORMATS, SAMPLE_RATES

if sys.version_info < (3, 11):  # pragma: no cover
    pass

#: the environment variable naming the ffmpeg binary to use
FFMPEG_ENV = "MUSICLIB_FFMPEG"
#: bytes read from ffmpeg's standard output at a time, by default
DEFAULT_CHUNK_SIZE = 64 * 1024
#: how much of ffmpeg's standard error is kept (the end of it)
STDERR_KEEP = 8 * 1024
#: the longest failure reason passed on from ffmpeg, in characters
REASON_MAX = 200

# "[mp3 @ 0x55d0c0ffee00] " and "[in#0 @ 0x...] ": addresses mean nothing to a client
_LOG_PREFIX = re.compile(r"^\[[^\]]* @ 0x[0-9a-fA-F]+\]\s*")


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """What a decoded stream carries: interleaved samples of one format, rate and layout."""

    sample_format: str
    sample_rate: int
    channels: int

    @property
    def bytes_per_frame(self) -> int:
        """Bytes of one sample frame (one sample of every channel)."""
        return SAMPLE_FORMATS[self.sample_format] * self.channels

    @property
    def bytes_per_second(self) -> int:
        """Bytes of one second of audio."""
        return self.bytes_per_frame * self.sample_rate

    def problem(self) -> str | None:
        """Why this format cannot be decoded to, or ``None`` if it can."""
        if self.sample_format not in SAMPLE_FORMATS:
            known = ", ".join(SAMPLE_FORMATS)
            return f"unknown sample format {self.sample_format!r} (known: {known})"
        if self.channels not in CHANNELS:
            return f"channels must be {CHANNELS.start} to {CHANNELS.stop - 1}, not {self.channels}"
        if self.sample_rate not in SAMPLE_RATES:
            low, high = SAMPLE_RATES.start, SAMPLE_RATES.stop - 1
            return f"sample rate must be {low} to {high} Hz, not {self.sample_rate}"
        return None


def output_format(
    sample_format: str | None,
    sample_rate: int | None,
    channels: int | None,
    *,
    source_rate: int | None,
    source_channels: int | None,
) -> AudioFormat:
    """What a decoded stream carries: the request's values, else the source's own,
    brought into the ranges the protocol allows (PROTOCOL.md, ``stream``).

    A source rate outside 1000..384000 Hz becomes the nearest bound (a 768 kHz
    file decodes at 384 kHz, an 800 Hz one at 1000 Hz); a source with more
    than 8 channels is mixed down to 2 (see :func:`downmix_filter`); a source
    whose rate or channels are unknown gives 48000 Hz and 2 channels.
    """
    if not sample_rate:
        rate = source_rate or 48000
        sample_rate = min(max(rate, SAMPLE_RATES.start), SAMPLE_RATES.stop - 1)
    if not channels:
        channels = source_channels if source_channels and source_channels in CHANNELS else 2
    return AudioFormat(sample_format or "s16le", sample_rate, channels)


def downmix_filter(source_channels: int | None, channels: int) -> str | None:
    """The ``pan`` filter that mixes a source of more than 8 channels into ``channels``.

    ffmpeg knows no channel layout for many such counts (9, 11, 32...) and then
    cannot remix them at all; so every source past the protocol's 8 channels
    is mixed the same simple way: output channel ``k`` is the average of source
    channels ``k``, ``k + channels``, ``k + 2 * channels``... (to stereo: the even
    channels on the left, the odd ones on the right). ``None`` for 8 or fewer,
    which ffmpeg remixes by their layout.
    """
    if source_channels is None or source_channels <= CHANNELS.stop - 1:
        return None
    mixes = (
        f"c{k}<" + "+".join(f"c{i}" for i in range(k, source_channels, channels))
        for k in range(channels)
    )
    return f"pan={channels}c|" + "|".join(mixes)


def ffmpeg_executable(environ: Mapping[str, str] = os.environ) -> str:
    """The ffmpeg to run: ``$MUSICLIB_FFMPEG`` if set, else the one imageio-ffmpeg ships.

    Raises ``FileNotFoundError`` if ``$MUSICLIB_FFMPEG`` names no executable
    file (a bare name is looked up on ``PATH``), or if there is no ffmpeg at all.
    """
    configured = environ.get(FFMPEG_ENV)
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise FileNotFoundError(
                f"{FFMPEG_ENV}={configured!r} does not name an executable file; "
                f"fix it or unset {FFMPEG_ENV} to use the ffmpeg bundled with imageio-ffmpeg"
            )
        return found
    return _bundled_ffmpeg()


def resolve_ffmpeg(ffmpeg: str | None) -> str:
    """The ffmpeg to run: ``ffmpeg`` itself, else :func:`ffmpeg_executable`'s; none at all
    is the server's fault (:class:`~musiclib.errors.InternalError`), not the client's."""
    if ffmpeg is not None:
        return ffmpeg
    try:
        return ffmpeg_executable()
    except FileNotFoundError as exc:
        raise InternalError(f"ffmpeg is not available on the server: {exc}") from None


@functools.cache
def _bundled_ffmpeg() -> str:
    try:
        exe: str = imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as exc:  # imageio-ffmpeg's way of saying it found none
        raise FileNotFoundError(f"no ffmpeg found: {exc}") from None
    return exe


def _seconds(value: float) -> str:
    """``value`` as ffmpeg reads a duration: plain decimal seconds, no exponent."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def decode_command(
    ffmpeg: str,
    source: Path,
    fmt: AudioFormat,
    *,
    start: float = 0.0,
    duration: float | None = None,
    source_channels: int | None = None,
) -> list[str]:
    """The ffmpeg command line that writes ``source``'s first audio stream as raw ``fmt``.

    The samples go to standard output; ``-ss`` comes before ``-i`` so ffmpeg
    seeks in the input instead of decoding and discarding everything before
    ``start``. ``-map 0:a:0`` picks the first audio stream, so cover art or
    further streams never reach the output. ``source_channels`` (when known)
    past 8 adds :func:`downmix_filter`.
    """
    problem = fmt.problem()
    if problem is not None:
        raise ValueError(problem)
    if not (math.isfinite(start) and start >= 0):
        raise ValueError(f"start must be a non-negative number of seconds, not {start}")
    if duration is not None and not (math.isfinite(duration) and duration >= 0):
        raise ValueError(f"duration must be a non-negative number of seconds, not {duration}")
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error"]
    if start > 0:
        cmd += ["-ss", _seconds(start)]
    cmd += ["-i", str(source)]
    if duration is not None:
        cmd += ["-t", _seconds(duration)]
    cmd += ["-vn", "-map", "0:a:0"]
    downmix = downmix_filter(source_channels, fmt.channels)
    if downmix is not None:
        cmd += ["-af", downmix]
    cmd += ["-f", fmt.sample_format, "-acodec", "pcm_" + fmt.sample_format]
    cmd += ["-ar", str(fmt.sample_rate), "-ac", str(fmt.channels), "pipe:1"]
    return cmd


class Decoder:
    """The samples of one running ffmpeg, as an async iterator of ``bytes`` chunks.

    Chunks are whatever the pipe delivers (at most ``chunk_size`` bytes each),
    not necessarily whole frames; ``bytes_read`` counts them. At the end of the
    stream the iteration waits for ffmpeg to exit and raises
    :class:`~musiclib.errors.DecodeFailed` if it failed or if the bytes do not
    make a whole number of frames. Get one from :func:`open_decoder`.
    """

    def __init__(
        self,
        process: trio.Process,
        source: Path,
        fmt: AudioFormat,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        assert process.stdout is not None and process.stderr is not None
        self.process = process
        self.source = source
        self.format = fmt
        self.chunk_size = chunk_size
        #: bytes of samples received from ffmpeg so far
        self.bytes_read = 0
        self._stdout = process.stdout
        self._stderr = process.stderr
        self._stderr_tail = bytearray()
        self._stderr_done = trio.Event()
        self._finished = False

    @property
    def pid(self) -> int:
        """The process id of the ffmpeg behind this decoder."""
        return self.process.pid

    @property
    def frames(self) -> int:
        """Whole sample frames received so far."""
        return self.bytes_read // self.format.bytes_per_frame

    def __aiter__(self) -> Decoder:
        return self

    async def __anext__(self) -> bytes:
        if self._finished:
            raise StopAsyncIteration
        chunk = await self._stdout.receive_some(self.chunk_size)
        if chunk:
            self.bytes_read += len(chunk)
            return bytes(chunk)  # a no-op for the bytes a pipe gives
        self._finished = True
        await self._check_exit()
        raise StopAsyncIteration

    async def _check_exit(self) -> None:
        """At the end of the output: did ffmpeg succeed, and are the frames whole?"""
        status = await self.process.wait()
        await self._stderr_done.wait()
        name = self.source.name
        if status != 0:
            raise DecodeFailed(f"cannot decode {name}: {self._reason(status)}")
        if self.bytes_read % self.format.bytes_per_frame:
            raise DecodeFailed(
                f"cannot decode {name}: ffmpeg ended in the middle of a sample frame "
                f"({self.bytes_read} bytes, {self.format.bytes_per_frame} bytes a frame)"
            )

    def _reason(self, status: int) -> str:
        """ffmpeg's own last word on the failure, made safe and short for a client."""
        text = self._stderr_tail.decode("utf-8", errors="replace")
        # the longest first, so that no part of the absolute path is left behind
        for path in sorted({str(self.source.absolute()), str(self.source)}, key=len, reverse=True):
            text = text.replace(path, self.source.name)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            reason = _LOG_PREFIX.sub("", lines[-1]) or lines[-1]
        elif status < 0:
            try:
                reason = f"ffmpeg was killed by {signal.Signals(-status).name}"
            except ValueError:
                reason = f"ffmpeg was killed by signal {-status}"
        else:
            reason = f"ffmpeg exited with status {status}"
        if len(reason) > REASON_MAX:
            reason = reason[: REASON_MAX - 3] + "..."
        return reason

    async def _drain_stderr(self) -> None:
        """Read ffmpeg's standard error to its end, keeping only the last few KiB."""
        try:
            while chunk := await self._stderr.receive_some(4096):
                self._stderr_tail += chunk
                del self._stderr_tail[:-STDERR_KEEP]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._stderr_done.set()


@asynccontextmanager
async def open_decoder(
    source: Path,
    fmt: AudioFormat,
    *,
    start: float = 0.0,
    duration: float | None = None,
    ffmpeg: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    source_channels: int | None = None,
) -> AsyncIterator[Decoder]:
    """Start ffmpeg on ``source`` and hand out a :class:`Decoder` reading its samples.

    On the way out, for whatever reason, ffmpeg is killed if it still runs and
    is always reaped. An ffmpeg that cannot be found or started is the
    server's fault: :class:`~musiclib.errors.InternalError`. Errors raised in
    the block come out as they are, not wrapped in an exception group.
    ``source_channels``: see :func:`decode_command`.
    """
    cmd = decode_command(
        resolve_ffmpeg(ffmpeg),
        source,
        fmt,
        start=start,
        duration=duration,
        source_channels=source_channels,
    )
    async with open_ffmpeg(cmd, fmt, source=source, chunk_size=chunk_size) as decoder:
        yield decoder


@asynccontextmanager
async def open_ffmpeg(
    cmd: Sequence[str],
    fmt: AudioFormat,
    *,
    source: Path,
    stdin: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> AsyncIterator[Decoder]:
    """Run any ffmpeg command whose standard output is raw ``fmt``; hand out its reader.

    The one place an ffmpeg process is started and ended: ``source`` names
    the input in failure messages (its path is never shown to a client);
    with ``stdin`` the process gets a pipe on standard input
    (``decoder.process.stdin``), else ``/dev/null``. Leaving the block for any
    reason kills ffmpeg if it still runs, reaps it and closes every pipe.
    """
    try:
        process = await trio.lowlevel.open_process(
            list(cmd),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InternalError(f"ffmpeg is not available on the server: {cmd[0]}: {reason}") from None
    try:
        decoder = Decoder(process, source, fmt, chunk_size)
        with single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(decoder._drain_stderr)
                try:
                    yield decoder
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await _kill_and_reap(process)


async def _kill_and_reap(process: trio.Process) -> None:
    """SIGKILL ``process`` unless it has exited, wait for it, and close our pipe ends."""
    if process.returncode is None:
        process.kill()  # ffmpeg holds nothing worth a graceful exit here
    await process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            await stream.aclose()


class DecodeSlots:
    """A cap on how many decodes run at once, and on how many one address runs,
    with a bounded wait for a free slot.

    ``per_address`` (``None``: no cap of its own) keeps one client address from
    holding every decoder: its requests past its share wait like any other,
    then get ``busy`` saying so, while other addresses still find a decoder.
    """

    def __init__(self, limit: int, wait: float, per_address: int | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if wait < 0:
            raise ValueError("wait must not be negative")
        if per_address is not None and per_address < 1:
            raise ValueError("per_address must be at least 1 (or None)")
        self.limit = limit
        self.wait = wait
        #: (a share as big as the whole is no share: then only ``limit`` counts)
        self.per_address = per_address if per_address is not None and per_address < limit else None
        self._semaphore = trio.Semaphore(limit)
        #: each address's share, only while one of its decodes runs or waits
        self._shares: dict[str, trio.Semaphore] = {}

    @property
    def in_use(self) -> int:
        """Slots taken right now."""
        return self.limit - self._semaphore.value

    def used_by(self, address: str) -> int:
        """Slots ``address`` holds right now."""
        share = self._shares.get(address)
        return 0 if share is None or self.per_address is None else self.per_address - share.value

    @asynccontextmanager
    async def acquire(self, address: str | None = None) -> AsyncIterator[None]:
        """Hold a slot for the block; ``Busy`` if none frees up within ``wait`` seconds.

        With an ``address``, the slot also counts against that address's share.
        """
        deadline = trio.current_time() + self.wait
        share = None
        if address is not None and self.per_address is not None:
            share = self._shares.setdefault(address, trio.Semaphore(self.per_address))
        try:
            if share is not None:
                n, streams = self.per_address, "streams" if self.per_address != 1 else "stream"
                mine = (
                    f"busy: this address already runs {n} decoded {streams}, its share of the "
                    f"server's {self.limit}; try again when one ends"
                )
                await _take(share, deadline, lambda: Busy(mine))
            try:
                what = "the decoder is" if self.limit == 1 else f"all {self.limit} decoders are"
                busy = f"{what} busy; try again shortly"
                await _take(self._semaphore, deadline, lambda: Busy(busy))
                try:
                    yield
                finally:
                    self._semaphore.release()
            finally:
                if share is not None:
                    share.release()
        finally:
            if (
                share is not None
                and address is not None
                and share.value == self.per_address
                and share.statistics().tasks_waiting == 0
            ):
                self._shares.pop(address, None)  # nobody holds or waits: forget the address


async def _take(semaphore: trio.Semaphore, deadline: float, busy: Callable[[], Busy]) -> None:
    """Acquire ``semaphore`` by ``deadline``, else raise ``busy()``."""
    try:
        semaphore.acquire_nowait()
    except trio.WouldBlock:
        with trio.move_on_at(deadline) as waited:
            await semaphore.acquire()
        if waited.cancelled_caught:
            raise busy() from None
    else:
        await trio.lowlevel.cancel_shielded_checkpoint()  # cannot lose the slot we hold
