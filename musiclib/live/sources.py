"""The readers of live audio: each runs one source and publishes it into a hub.

A source is an async function that runs until its audio ends (or it is
cancelled), cutting what it reads into chunks of exactly ``chunk_frames``
frames (20 ms by default) and handing each to :meth:`Hub.publish
<musiclib.live.hub.Hub.publish>`, which never blocks: a source is read once,
at its own pace, whatever its listeners do. There are three:

- :func:`run_decoded`: library tracks decoded by ffmpeg and played in real
  time, one after another (and again, with ``loop``), as one continuous
  channel: positions and the pacing clock carry on across tracks;
- :func:`run_ffmpeg`: any input ffmpeg can open (a stream URL, a device, a
  lavfi generator), given as operator-written ffmpeg input arguments;
- :func:`run_mic`: a sound card's input through :mod:`musiclib.devices`.

ffmpeg writes whatever its pipe lets through, so its output is re-cut with a
:class:`FrameCutter`. Every ffmpeg is run the way :mod:`musiclib.decode` runs
its decoders: standard error drained into a small tail, and the process
killed and reaped on every way out, cancellation included.

None of these close the hub when they end: the caller knows why the source
ended (the track list ran out, an error, a shutdown) and says so with
``hub.close``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from .. import decode
from ..decode import AudioFormat, Decoder, open_decoder, resolve_ffmpeg
from ..errors import DecodeFailed, NotFound
from .hub import Chunk, Hub
from .pacing import Pacer

log = logging.getLogger("musiclib.live")

#: chunks per second of audio: a chunk is 20 ms, like most voice and VoIP framings
CHUNKS_PER_SECOND = 50
#: bytes asked of an ffmpeg pipe at a time (a read returns what is there, up to this)
PIPE_READ_SIZE = 64 * 1024


def default_chunk_frames(fmt: AudioFormat) -> int:
    """Frames in one 20 ms chunk of ``fmt`` (at least one)."""
    return max(1, fmt.sample_rate // CHUNKS_PER_SECOND)


class FrameCutter:
    """Re-cut a byte stream into chunks of exactly ``chunk_frames`` whole frames.

    A pipe delivers bytes in whatever pieces the kernel and the writer chose,
    not even whole frames; listeners want fixed 20 ms chunks. The remainder
    waits in a bytearray for the next piece; :meth:`flush` hands out the last,
    shorter chunk at the end of a stream.
    """

    def __init__(self, bytes_per_frame: int, chunk_frames: int) -> None:
        if bytes_per_frame < 1 or chunk_frames < 1:
            raise ValueError("bytes_per_frame and chunk_frames must be positive")
        self.bytes_per_frame = bytes_per_frame
        self.chunk_bytes = bytes_per_frame * chunk_frames
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held back, waiting to complete a chunk."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; the chunks it completes, in order (often none or one)."""
        size = self.chunk_bytes
        buf = self._buf
        buf += data
        count = len(buf) // size
        if not count:
            return []
        with memoryview(buf) as view:
            chunks = [view[i * size : (i + 1) * size].tobytes() for i in range(count)]
        del buf[: count * size]
        return chunks

    def flush(self) -> bytes:
        """The whole frames still held (possibly ``b""``); a partial frame is dropped.

        ffmpeg ending in the middle of a frame is reported by the
        :class:`~musiclib.decode.Decoder` itself; here it can only be discarded.
        """
        whole = len(self._buf) - len(self._buf) % self.bytes_per_frame
        tail = bytes(self._buf[:whole])
        self._buf.clear()
        return tail


@asynccontextmanager
async def open_ffmpeg(
    cmd: Sequence[str], fmt: AudioFormat, *, label: str, stdin: bool = False
) -> AsyncIterator[Decoder]:
    """Run an ffmpeg command line whose standard output is raw ``fmt``; hand out its reader.

    :func:`musiclib.decode.open_ffmpeg` with a label for messages
    (``cannot decode <label>: ...``) instead of an input file, and the live
    sources' pipe read size.
    """
    # the Decoder wants a path only to name it in messages; a label without a slash is its name
    name = Path(label.replace("/", "_"))
    async with decode.open_ffmpeg(
        cmd, fmt, source=name, stdin=stdin, chunk_size=PIPE_READ_SIZE
    ) as decoder:
        yield decoder


class _PacedPublisher:
    """Publish chunks into a hub no faster than real time, with one :class:`Pacer`.

    The pacer starts at the first chunk, not before: ffmpeg's start-up (15-65
    ms, longer for a network input) must not become a credit that lets the
    first second or so through faster than real time.

    ``stamp``: ``"schedule"`` stamps each chunk with the pacer's wall-clock
    schedule (a file has no capture time; its schedule is the nearest thing),
    ``"now"`` with the moment it is published (a live input's audio was
    captured just before ffmpeg handed it over).
    """

    def __init__(self, hub: Hub, *, stamp: Literal["schedule", "now"]) -> None:
        self.hub = hub
        self.stamp_schedule = stamp == "schedule"
        self.bytes_per_frame = hub.format.bytes_per_frame
        self.pacer: Pacer | None = None
        #: frames published so far
        self.frames = 0

    async def send(self, data: bytes) -> None:
        if self.pacer is None:
            self.pacer = Pacer(self.hub.format.sample_rate)
        self.frames += len(data) // self.bytes_per_frame
        await self.pacer.wait_for(self.frames)
        stamp = self.pacer.wall_ns(self.frames) if self.stamp_schedule else time.time_ns()
        self.hub.publish(data, stamp)


async def _pump(decoder: Decoder, cutter: FrameCutter, publisher: _PacedPublisher) -> None:
    """Everything ``decoder`` reads, cut and published; whole frames left over go too.

    When ffmpeg fails at the end, the audio it did produce is still published
    (a listener would rather hear the first half of a damaged track) before
    the failure is raised.
    """
    try:
        async for data in decoder:
            for chunk in cutter.feed(data):
                await publisher.send(chunk)
    except DecodeFailed:
        if tail := cutter.flush():
            await publisher.send(tail)
        raise
    if tail := cutter.flush():
        await publisher.send(tail)


def _check_chunk_frames(chunk_frames: int) -> None:
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be positive, not {chunk_frames}")


async def run_decoded(
    hub: Hub, paths: Sequence[Path], *, loop: bool, ffmpeg: str | None, chunk_frames: int
) -> None:
    """Play ``paths`` in order (forever, with ``loop``) as one live channel.

    Each track is decoded to ``hub.format`` by its own ffmpeg, started when
    the previous track has been read to its end. The tracks follow each other
    without a hole: positions continue, and one :class:`Pacer` runs across
    all of them (no burst: this is a live channel, every listener hears the
    same moment). Chunks are stamped with the pacer's schedule. The last
    chunk of a track may be shorter than ``chunk_frames``.

    A track that fails to decode is logged (once per path) and skipped. A
    round in which no track yields a single frame raises
    :class:`~musiclib.errors.DecodeFailed`: otherwise a loop over broken
    files would start ffmpeg after ffmpeg forever without ever sleeping.
    """
    _check_chunk_frames(chunk_frames)
    if not paths:
        raise NotFound("there are no tracks to play")
    exe = resolve_ffmpeg(ffmpeg)
    fmt = hub.format
    publisher = _PacedPublisher(hub, stamp="schedule")
    warned: set[Path] = set()
    while True:
        round_start = publisher.frames
        last_failure = ""
        for path in paths:
            cutter = FrameCutter(fmt.bytes_per_frame, chunk_frames)
            try:
                async with open_decoder(
                    path, fmt, ffmpeg=exe, chunk_size=PIPE_READ_SIZE
                ) as decoder:
                    await _pump(decoder, cutter, publisher)
            except DecodeFailed as exc:
                last_failure = str(exc)
                level = logging.DEBUG if path in warned else logging.WARNING
                log.log(level, "live: skipping a track: %s", exc)
                warned.add(path)
        if publisher.frames == round_start:
            if last_failure and len(paths) == 1:
                raise DecodeFailed(last_failure)
            if last_failure:
                raise DecodeFailed(
                    f"none of the {len(paths)} tracks could be decoded (the last: {last_failure})"
                )
            which = "the track holds" if len(paths) == 1 else "the tracks hold"
            raise DecodeFailed(f"{which} no audio")
        if not loop:
            return


def ffmpeg_input_command(ffmpeg: str, input_args: Sequence[str], fmt: AudioFormat) -> list[str]:
    """The ffmpeg command that reads the operator's ``input_args`` and writes raw ``fmt``.

    ``input_args`` go where ffmpeg's input options go (``-re``, ``-f lavfi``,
    ``-i URL``...). ``-map 0:a:0?`` takes the first audio stream of the first
    input; the ``?`` makes ffmpeg itself say that there is none ("Output
    file does not contain any stream") instead of failing on the map.
    """
    problem = fmt.problem()
    if problem is not None:
        raise ValueError(problem)
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", *input_args]
    cmd += ["-vn", "-map", "0:a:0?"]
    cmd += ["-f", fmt.sample_format, "-acodec", "pcm_" + fmt.sample_format]
    cmd += ["-ar", str(fmt.sample_rate), "-ac", str(fmt.channels), "pipe:1"]
    return cmd


async def run_ffmpeg(
    hub: Hub, input_args: Sequence[str], *, ffmpeg: str | None, chunk_frames: int
) -> None:
    """Publish whatever ffmpeg makes of ``input_args`` until it ends.

    Paced by a :class:`Pacer` of our own as well, so a file given without
    ``-re`` still plays in real time; a live input is never ahead of it
    anyway. Chunks are stamped with the wall clock when they are published.
    ffmpeg failing (exit status other than 0) raises
    :class:`~musiclib.errors.DecodeFailed` with its last line of standard
    error, after the audio it did produce has been published.
    """
    _check_chunk_frames(chunk_frames)
    fmt = hub.format
    cmd = ffmpeg_input_command(resolve_ffmpeg(ffmpeg), input_args, fmt)
    publisher = _PacedPublisher(hub, stamp="now")
    cutter = FrameCutter(fmt.bytes_per_frame, chunk_frames)
    async with open_ffmpeg(cmd, fmt, label="the ffmpeg input") as decoder:
        try:
            await _pump(decoder, cutter, publisher)
        except DecodeFailed:
            # ffmpeg's last line would be "Error opening output files: Invalid argument"
            if b"does not contain any stream" in decoder._stderr_tail:
                raise DecodeFailed("the ffmpeg input has no audio stream") from None
            raise


async def run_mic(hub: Hub, device: str | None, *, chunk_frames: int) -> None:
    """Publish a sound card's input, block by block, stamped by the device wrapper.

    :mod:`musiclib.devices` (and through it ``sounddevice`` and PortAudio, an
    optional extra) is imported only here, so a server without a microphone
    channel never needs them. Device errors come out as
    :class:`~musiclib.errors.DeviceError`.

    Blocks the device wrapper had to drop (this task fell behind its buffer)
    are not papered over: the next block is published that many blocks
    further on, so listeners get a ``Gap`` of exactly the lost frames and
    positions stay in step with the device's clock. (A drop racing with the
    read may be reported one block early; the count is exact.)
    """
    _check_chunk_frames(chunk_frames)
    from ..devices import open_input

    async with open_input(device, hub.format, block_frames=chunk_frames) as blocks:
        dropped = blocks.overflows
        async for data, time_ns in blocks:
            if hub.closed:  # ended from outside (the server shuts down): release the device
                return
            lost, dropped = blocks.overflows - dropped, blocks.overflows
            if lost:
                log.warning("live: the microphone reader fell behind; %d blocks lost", lost)
            position = hub.position + lost * blocks.block_frames
            hub.publish_chunk(Chunk(position, time_ns, data))
