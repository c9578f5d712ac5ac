"""One ffmpeg per (channel, listener format): a hub's audio converted into another hub.

A channel has one format, its source's; a listener may want another rate,
channel count or sample format. Converting per listener would run one ffmpeg
per listener; :func:`run_converter` runs one per *distinct* format instead
and publishes the result into a hub of its own, which fans out like any
other. Two tasks share the ffmpeg: a writer moves the source subscription's
chunks into ffmpeg's standard input, a reader cuts its standard output into
20 ms chunks and publishes them. trio's process pipes are async, so a full
pipe parks a task, never the event loop.

Positions stay comparable across formats: the first output frame gets the
source position of the first input frame, scaled by the rates (rounded half
up), and output positions are contiguous from there, since ffmpeg's
resampler makes ``in_frames * out_rate / in_rate`` frames out of
``in_frames`` and aligns their start. A hole in the source (a ``Gap``) is
fed as silence of the same length, so the alignment survives it. Each output
chunk is stamped with the capture time of the input frame it corresponds
to, interpolated from the source chunk holding that frame.

Latency: ffmpeg's raw PCM demuxer reads its input in packets of the largest
power of two of frames not above a tenth of a second
(:func:`input_packet_frames`: 1024 frames at 16 kHz, 64 ms; 4096 at 44.1 or
48 kHz, 85-93 ms) and waits for a whole packet before converting, so a
conversion adds up to that much: measured from a source's capture stamp to
the converted chunk's publication, 20-80 ms (median 40) from 16 kHz and
20-100 ms (median 60) from 44.1 or 48 kHz, with 20 ms source chunks. Neither ``-fflags
nobuffer``, ``-avioflags direct``, ``-probesize`` nor ``-blocksize`` changes
it (measured with ffmpeg 9.0); it is documented rather than fought.
"""

from __future__ import annotations

import collections
import logging
import time

import trio

from ..decode import AudioFormat, Decoder, resolve_ffmpeg
from ..errors import DecodeFailed, MusiclibError, single_errors
from .hub import Chunk, End, Hub, Subscription
from .sources import FrameCutter, default_chunk_frames, open_ffmpeg

log = logging.getLogger("musiclib.live")

#: seconds of source audio the converter may fall behind before it loses some (a Gap)
BACKLOG_SECONDS = 5.0
#: (position, time) pairs kept to stamp output chunks; ffmpeg holds far fewer chunks
MAX_MARKS = 4096
#: the largest piece of silence written at once for a gap, in seconds
SILENCE_PIECE_SECONDS = 1.0


def convert_command(ffmpeg: str, source: AudioFormat, target: AudioFormat) -> list[str]:
    """The ffmpeg command converting raw ``source`` on stdin to raw ``target`` on stdout.

    ``-fflags nobuffer`` and ``-flush_packets 1`` keep ffmpeg from holding
    audio back beyond what its demuxer's packet size forces (see the module's
    docstring).
    """
    for fmt in (source, target):
        problem = fmt.problem()
        if problem is not None:
            raise ValueError(problem)
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-fflags", "nobuffer"]
    cmd += ["-f", source.sample_format, "-ar", str(source.sample_rate)]
    cmd += ["-ac", str(source.channels), "-i", "pipe:0"]
    cmd += ["-f", target.sample_format, "-acodec", "pcm_" + target.sample_format]
    cmd += ["-ar", str(target.sample_rate), "-ac", str(target.channels)]
    cmd += ["-flush_packets", "1", "pipe:1"]
    return cmd


def input_packet_frames(sample_rate: int) -> int:
    """Input frames ffmpeg's raw PCM demuxer waits for before converting any of them.

    The largest power of two not above a tenth of a second: 512 at 8 kHz, 1024
    at 11.025-16 kHz, 2048 at 22.05-32 kHz, 4096 at 44.1-48 kHz (measured with
    ffmpeg 9.0 for all of these, mono and stereo). A converter holds back up to
    this much of its input, so this is the latency a conversion adds at most,
    besides the output cutter's partial chunk.
    """
    return 1 << max(0, (sample_rate // 10).bit_length() - 1)


def scale_position(position: int, from_rate: int, to_rate: int) -> int:
    """``position * to_rate / from_rate`` rounded half up, in exact integer arithmetic."""
    return (2 * position * to_rate + from_rate) // (2 * from_rate)


class _Conversion:
    """What the writer knows and the reader needs: where the input started, the
    stamps of the chunks written, and how the source ended."""

    def __init__(self, source: AudioFormat, target: AudioFormat, first_in: int) -> None:
        self.source = source
        self.target = target
        self.first_in = first_in
        self.first_out = scale_position(first_in, source.sample_rate, target.sample_rate)
        #: (end position, time_ns) of each source chunk written to ffmpeg, oldest first
        self.marks: collections.deque[tuple[int, int]] = collections.deque(maxlen=MAX_MARKS)
        #: how the source ended (set by the writer once it has closed ffmpeg's stdin)
        self.end: End | None = None

    def time_ns(self, out_end: int) -> int:
        """The capture time of the input frame that output position ``out_end``
        (the exclusive end of a chunk) corresponds to.

        Linear from the source chunk holding that frame: its ``time_ns`` is
        when its last frame was captured, and frames are ``1/rate`` apart.
        Past the newest chunk (the resampler's rounding, or silence fed for a
        gap) it extrapolates from the newest one.
        """
        in_rate, out_rate = self.source.sample_rate, self.target.sample_rate
        in_end = self.first_in + (out_end - self.first_out) * in_rate / out_rate
        marks = self.marks
        if not marks:  # only silence so far: nothing was captured
            return time.time_ns()
        while len(marks) > 1 and marks[0][0] < in_end:
            marks.popleft()  # output only moves forward: older chunks are done with
        position, stamp = marks[0]
        return stamp + round((in_end - position) * 1e9 / in_rate)


async def _feed(sub: Subscription, stdin: trio.abc.SendStream, state: _Conversion) -> None:
    """Move the subscription's audio into ffmpeg's standard input until the source ends.

    A hole (a ``Gap``, or a chunk starting past what was written) becomes
    silence of the same length, logged once per converter, so that output
    positions stay aligned with the source's. A broken pipe means ffmpeg
    died: stop quietly, and let the reader report ffmpeg's own reason.
    """
    fmt = state.source
    bpf = fmt.bytes_per_frame
    piece = max(1, round(SILENCE_PIECE_SECONDS * fmt.sample_rate))
    expected = state.first_in
    zeros = b""
    holes = 0
    try:
        while True:
            item = await sub.next()
            if isinstance(item, End):
                state.end = item
                break
            start = item.position if isinstance(item, Chunk) else item.position + item.frames
            hole = start - expected
            if hole > 0:
                if not holes:
                    log.info(
                        "live: converting to %s %d Hz %d ch: %d frames missing at %d, fed as "
                        "silence (further holes are only counted)",
                        state.target.sample_format,
                        state.target.sample_rate,
                        state.target.channels,
                        hole,
                        expected,
                    )
                holes += 1
                while hole > 0:  # in bounded pieces: a gap may be long
                    frames = min(hole, piece)
                    if len(zeros) != frames * bpf:
                        zeros = bytes(frames * bpf)
                    await stdin.send_all(zeros)
                    hole -= frames
                    expected += frames
            if isinstance(item, Chunk):
                data = item.data
                if item.position < expected:  # overlaps what was written: keep the new part
                    data = data[(expected - item.position) * bpf :]
                if data:
                    expected += len(data) // bpf
                    state.marks.append((expected, item.time_ns))
                    await stdin.send_all(data)
        await stdin.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # ffmpeg is gone; the reader sees its end and says why


async def _collect(decoder: Decoder, out: Hub, state: _Conversion) -> None:
    """Cut ffmpeg's output into 20 ms chunks and publish them at their mapped positions."""
    target = state.target
    bpf = target.bytes_per_frame
    cutter = FrameCutter(bpf, default_chunk_frames(target))
    produced = 0

    def publish(data: bytes) -> None:
        nonlocal produced
        position = state.first_out + produced
        produced += len(data) // bpf
        end = position + len(data) // bpf
        if position < out.position:  # `out` already has audio there (a reused hub)
            data = data[(out.position - position) * bpf :]
            position = out.position
        if data:
            out.publish_chunk(Chunk(position, state.time_ns(end), data))

    async for data in decoder:
        for chunk in cutter.feed(data):
            publish(chunk)
    if tail := cutter.flush():
        publish(tail)


async def run_converter(
    source: Hub,
    out: Hub,
    *,
    ffmpeg: str | None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Convert ``source``'s audio to ``out.format`` with one ffmpeg, publishing into ``out``.

    Subscribes to ``source`` with a backlog of :data:`BACKLOG_SECONDS` and the
    source's whole history as preroll, so ``out`` gets the history too. A
    fresh ``out`` (nothing published yet) is moved to the position where the
    converted audio starts, so its listeners do not see the frames before it
    as one huge gap. ``task_status.started()`` is called once ffmpeg runs.

    When the source ends, ffmpeg's stdin is closed, its output drained, and
    ``out`` closed with the source's reason and message. If ffmpeg fails,
    ``out`` is closed with ``source_failed`` and
    :class:`~musiclib.errors.DecodeFailed` is raised. On cancellation ffmpeg
    is killed and reaped and ``out`` is left as it is, for the canceller to
    close with its own reason.
    """
    exe = resolve_ffmpeg(ffmpeg)
    cmd = convert_command(exe, source.format, out.format)
    in_rate = source.format.sample_rate
    label = (
        f"the conversion to {out.format.sample_format} "
        f"{out.format.sample_rate} Hz {out.format.channels} ch"
    )
    with source.subscribe(
        max_backlog_frames=max(1, round(BACKLOG_SECONDS * in_rate)),
        preroll_frames=source.position,  # everything the source still remembers
    ) as sub:
        state = _Conversion(source.format, out.format, sub.start_position)
        if out.chunks == 0 and out.position == 0 and not out.closed:
            out.position = state.first_out
        try:
            async with open_ffmpeg(cmd, out.format, label=label, stdin=True) as decoder:
                stdin = decoder.process.stdin
                assert stdin is not None
                task_status.started()
                with single_errors():
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_feed, sub, stdin, state)
                        await _collect(decoder, out, state)
                        if state.end is None:  # ffmpeg ended although its input goes on
                            raise DecodeFailed(f"cannot decode {label}: ffmpeg stopped early")
        except MusiclibError as exc:
            out.close("source_failed", str(exc))
            raise
        out.close(state.end.reason, state.end.message)
