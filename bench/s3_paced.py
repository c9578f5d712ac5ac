"""Scenario 3: 100 concurrent decoded streams, paced in real time, for 30 s.

Each stream asks for ``decode(track, duration=30, realtime=True)``: s16le at the source's
44.1 kHz stereo, through one ffmpeg each. The server is started with ``--max-decodes 128``
(its default of 32 would refuse most of them with ``busy``).

Lateness, defined precisely: let ``t0`` be the arrival of a stream's first sample. At
every 100 ms step ``s`` after ``t0``, up to the stream's duration plus the slack, the
client must have received at least ``min(total, s - 0.5 s)`` of audio (0.5 s of slack for
scheduling and chunking). A step that falls short is a late sample; "late streams" counts
the streams with at least one. Missing frames are those expected (duration x rate) and
never received. Server CPU share is the server's CPU time plus that of the ffmpeg children
it reaped, over the wall time of the run, over all cores.

Baseline: the same ffmpeg command line (``musiclib.decode.decode_command``) with ffmpeg's
own ``-re`` pacing, 100 of them run directly by this process, read and judged the same way;
its CPU share is that of ffmpeg alone, the floor of any server that decodes per stream.

Why: the issue asks for 100 paced decoded streams with no late chunk, and what they cost.
"""

from __future__ import annotations

import resource
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from bench import data
from bench.common import CPUS, Row, Scenario, Sizes, Target, cpu_times, percentile
from bench.data import DataFile
from bench.servers import musiclib_server, wait_indexed

SLACK = 0.5
STEP = 0.1
RATE = 44100
CHANNELS = 2
BYTES_PER_SECOND = RATE * CHANNELS * 2
NONE_LATE = Target("0", "value", "<=", 0)
#: issue 15, item 4: a paced stream starts no later than a bare ``ffmpeg -re`` does
AS_FAST_AS_FFMPEG = Target("<= 1.0x", "ratio", "<=", 1.0)


@dataclass
class StreamLog:
    """Arrivals of one stream: (seconds after its first byte, bytes received so far)."""

    arrivals: list[tuple[float, int]] = field(default_factory=list)
    startup: float | None = None  # seconds from the request to the first byte
    error: str | None = None

    @property
    def received(self) -> int:
        return self.arrivals[-1][1] if self.arrivals else 0


@dataclass(frozen=True)
class Lateness:
    late_samples: int
    max_lag: float  # seconds behind the requirement, worst step


def lateness(arrivals: list[tuple[float, int]], total: int, duration: float) -> Lateness:
    """Judge one stream against ``min(total, s - SLACK)`` at every STEP up to the end."""
    late, worst, i, have = 0, 0.0, 0, 0
    steps = round((duration + SLACK) / STEP)
    for k in range(1, steps + 1):
        s = k * STEP
        while i < len(arrivals) and arrivals[i][0] <= s:
            have = arrivals[i][1]
            i += 1
        need = min(total, int((s - SLACK) * BYTES_PER_SECOND))
        if have < need:
            late += 1
            worst = max(worst, (need - have) / BYTES_PER_SECOND)
    return Lateness(late, worst)


class _Recorder:
    """Fills a StreamLog from chunks as they arrive."""

    def __init__(self, log: StreamLog, requested: float) -> None:
        self.log = log
        self.requested = requested
        self.t0: float | None = None
        self.total = 0

    def chunk(self, n: int) -> None:
        now = trio.current_time()
        if self.t0 is None:
            self.t0 = now
            self.log.startup = now - self.requested
        self.total += n
        self.log.arrivals.append((now - self.t0, self.total))


async def _musiclib_stream(address: str, track: str, duration: float, log: StreamLog) -> None:
    from musiclib.client import open_client

    rec = _Recorder(log, trio.current_time())
    async with (
        open_client(address, timeout=60) as client,
        client.decode(
            track, sample_rate=RATE, channels=CHANNELS, duration=duration, realtime=True
        ) as stream,
    ):
        async for chunk in stream:
            rec.chunk(len(chunk))


async def _ffmpeg_stream(path: Path, duration: float, log: StreamLog) -> None:
    from musiclib.decode import AudioFormat, decode_command, ffmpeg_executable

    cmd = decode_command(
        ffmpeg_executable(), path, AudioFormat("s16le", RATE, CHANNELS), duration=duration
    )
    cmd.insert(cmd.index("-i"), "-re")
    rec = _Recorder(log, trio.current_time())
    process = await trio.lowlevel.open_process(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        while chunk := await process.stdout.receive_some(64 * 1024):
            rec.chunk(len(chunk))
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()


StreamFn = Callable[..., Awaitable[None]]


async def _guarded(fn: StreamFn, args: tuple[object, ...], log: StreamLog) -> None:
    try:
        await fn(*args, log)
    except Exception as exc:  # a failed stream is a finding: its frames count as missing
        log.error = f"{type(exc).__name__}: {exc}"


async def run_streams(n: int, fn: StreamFn, *args: object) -> tuple[list[StreamLog], float]:
    logs = [StreamLog() for _ in range(n)]
    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for log in logs:
            nursery.start_soon(_guarded, fn, args, log)
    return logs, time.perf_counter() - began


@dataclass
class Judged:
    """A run's verdict over all its streams."""

    late_samples: int
    late_streams: int
    max_lag: float
    missing_frames: int
    errors: list[str]
    startup_p99_ms: float | None
    startup_p50_ms: float | None
    cpu_share: float

    @classmethod
    def of(cls, logs: list[StreamLog], duration: float, cpu: float, wall: float) -> Judged:
        total = round(duration * RATE) * CHANNELS * 2
        judged = [lateness(log.arrivals, total, duration) for log in logs]
        startups = [log.startup * 1000 for log in logs if log.startup is not None]
        return cls(
            late_samples=sum(j.late_samples for j in judged),
            late_streams=sum(1 for j in judged if j.late_samples),
            max_lag=max((j.max_lag for j in judged), default=0.0),
            missing_frames=sum(max(0, total - log.received) for log in logs) // (CHANNELS * 2),
            errors=[log.error for log in logs if log.error],
            startup_p99_ms=percentile(startups, 99) if startups else None,
            startup_p50_ms=percentile(startups, 50) if startups else None,
            cpu_share=100 * cpu / wall / CPUS,
        )


def _musiclib(n: int, duration: float, track: DataFile) -> Judged:
    with musiclib_server(track.root, "--max-decodes", str(max(128, n))) as server:
        trio.run(wait_indexed, server.address, 1)
        before = cpu_times(server.pid)
        logs, wall = trio.run(
            run_streams, n, _musiclib_stream, server.address, track.name, duration
        )
        cpu = cpu_times(server.pid).total - before.total
    return Judged.of(logs, duration, cpu, wall)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _baseline(n: int, duration: float, track: DataFile) -> Judged:
    before = _children_cpu()
    logs, wall = trio.run(run_streams, n, _ffmpeg_stream, track.path, duration)
    return Judged.of(logs, duration, _children_cpu() - before, wall)


def run(sizes: Sizes) -> Scenario:
    n, duration = sizes.paced_streams, sizes.paced_seconds
    sc = Scenario("3", f"{n} decoded streams paced in real time for {duration:g} s")
    track = data.paced_track()
    ml = _musiclib(n, duration, track)
    base = _baseline(n, duration, track)
    sc.notes.append(
        f"server started with --max-decodes {max(128, n)} (default 32); "
        f"late = more than {SLACK} s behind real time at a {STEP * 1000:.0f} ms step"
    )
    for name, judged in (("musiclib", ml), ("ffmpeg -re", base)):
        if judged.errors:
            sc.notes.append(f"{name}: {len(judged.errors)} streams failed: {judged.errors[0]}")
    label = "ffmpeg -re alone"
    rows = [
        Row("late 100 ms samples", ml.late_samples, "count", base.late_samples, label, NONE_LATE),
        Row("streams with a late sample", ml.late_streams, "count", base.late_streams, label),
        Row("worst lag behind real time", ml.max_lag * 1000, "ms", base.max_lag * 1000, label),
        Row("missing frames", ml.missing_frames, "count", base.missing_frames, label, NONE_LATE),
        Row("failed streams", len(ml.errors), "count", len(base.errors), label),
        Row(
            "request to first sample, p99",
            ml.startup_p99_ms,
            "ms",
            base.startup_p99_ms,
            label,
            AS_FAST_AS_FFMPEG,
        ),
        Row("request to first sample, p50", ml.startup_p50_ms, "ms", base.startup_p50_ms, label),
        Row("server + ffmpeg CPU share", ml.cpu_share, "%", base.cpu_share, label),
    ]
    for row in rows:
        sc.add(row)
    sc.raw = {"musiclib": vars(ml), "ffmpeg_re": vars(base), "streams": n, "duration": duration}
    return sc
