"""Live sources, the pacer and the converter, against the real ffmpeg.

Every byte a source or converter publishes is compared with a direct run of
ffmpeg on the same input with the same arguments; no ffmpeg is mocked. The
pacer's arithmetic is checked on trio's mock clock (``autojump_clock``),
where waits are exact; the sources run on the real clock (they wait on
ffmpeg's pipes), so their timing is only checked from below.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import subprocess
import time
import wave
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import imageio_ffmpeg
import pytest
import trio

import musiclib.devices
from musiclib.decode import AudioFormat
from musiclib.errors import DecodeFailed, InternalError, NotFound
from musiclib.live.convert import (
    convert_command,
    input_packet_frames,
    run_converter,
    scale_position,
)
from musiclib.live.hub import Chunk, End, Gap, Hub, Subscription
from musiclib.live.pacing import Pacer
from musiclib.live.sources import (
    FrameCutter,
    ffmpeg_input_command,
    run_decoded,
    run_ffmpeg,
    run_mic,
)

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
#: a guard against hangs only; every test here finishes far sooner
HANG_GUARD = 30
#: what the live tests decode to: 22.05 kHz stereo, 20 ms = 441 frames
LIVE = AudioFormat("s16le", 22050, 2)
LIVE_CHUNK = 441
MONO_16K = AudioFormat("s16le", 16000, 1)
STEREO_48K_F32 = AudioFormat("f32le", 48000, 2)
#: "as much backlog as the test needs": a subscription that never drops
NO_DROP = 10**9


def _ffmpeg(*args: str) -> bytes:
    """Run ffmpeg directly (the reference), returning its standard output."""
    return subprocess.run(
        [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
    ).stdout


async def _reference(path: Path, fmt: AudioFormat) -> bytes:
    """``ffmpeg -i path -f FMT -ar R -ac C -``: what a live channel must carry."""
    cmd = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(path)]
    cmd += ["-f", fmt.sample_format, "-ar", str(fmt.sample_rate), "-ac", str(fmt.channels), "-"]
    done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True)
    return done.stdout


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Short real files: sines and noise made by ffmpeg, a WAV written with ``wave``,
    and files that are not audio at all."""
    root = tmp_path_factory.mktemp("live-media")
    files = {
        "sine": root / "sine.flac",  # 0.5 s, 44.1 kHz mono 440 Hz
        "short": root / "short.ogg",  # 0.11 s stereo noise: not a whole number of chunks
        "noise": root / "noise.wav",  # 0.2 s, 32 kHz stereo, written with the wave module
        "broken": root / "broken.mp3",  # random bytes
        "text": root / "text.wav",  # a text file
    }
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=0.5",
            str(files["sine"]))  # fmt: skip
    _ffmpeg("-f", "lavfi", "-i", "anoisesrc=d=0.11:c=pink:r=48000:s=7", "-ac", "2",
            "-c:a", "libvorbis", str(files["short"]))  # fmt: skip
    rng = random.Random(11)
    with wave.open(str(files["noise"]), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(32000)
        w.writeframes(rng.randbytes(6400 * 4))
    files["broken"].write_bytes(rng.randbytes(20000))
    files["text"].write_text("this is not a wav file\n" * 100)
    return files


def _drain(sub: Subscription) -> list[Chunk | Gap]:
    """Everything queued for ``sub`` now (the sources do not close their hub)."""
    items: list[Chunk | Gap] = []
    while (item := sub.next_nowait()) is not None and not isinstance(item, End):
        items.append(item)
    return items


def _check_contiguous(chunks: Sequence[Chunk | Gap], start: int, bpf: int) -> None:
    position = start
    for item in chunks:
        assert item.position == position
        position += item.frames if isinstance(item, Gap) else len(item.data) // bpf


def _ffmpeg_children() -> set[int]:
    """Process ids of the ffmpeg processes (running or zombie) this test process started."""
    found = set()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        if "ffmpeg" in comm and int(rest.split()[1]) == me:
            found.add(int(entry))
    return found


# ---- the pacer --------------------------------------------------------------------------


async def test_pacer_waits_are_exact(autojump_clock: trio.abc.Clock) -> None:
    pacer = Pacer(1000)
    start = trio.current_time()
    assert pacer.start == start
    for frames in (0, 1, 20, 500, 1500, 1501):
        await pacer.wait_for(frames)
        assert trio.current_time() == pacer.deadline(frames) == start + frames / 1000
    # a deadline already past: no sleep, but still a checkpoint
    with trio.CancelScope() as scope:
        scope.cancel()
        await pacer.wait_for(10)
    assert scope.cancelled_caught
    assert trio.current_time() == start + 1.501


@pytest.mark.parametrize("burst", [0.0, 0.25, 1.0])
async def test_pacer_never_ahead_of_burst_plus_elapsed(
    autojump_clock: trio.abc.Clock, burst: float
) -> None:
    """A producer releasing 20 ms chunks as fast as allowed, watched at every release:
    after t seconds at most burst + t seconds went out, and exactly that much
    (to the chunk) when the producer is greedy."""
    rate, chunk = 48000, 960
    pacer = Pacer(rate, burst=burst)
    released: list[tuple[float, int]] = []
    total = 0
    while total < 3 * rate:
        await pacer.wait_for(total + chunk)
        total += chunk
        released.append((trio.current_time() - pacer.start, total))
    for t, frames in released:
        assert frames / rate <= burst + t + 1e-9
        # greedy: the chunk went out the moment it was allowed, not later
        assert t == pytest.approx(max(0.0, frames / rate - burst), abs=1e-9)
    assert released[-1][0] == pytest.approx(3.0 - burst)


async def test_pacer_wall_stamps(autojump_clock: trio.abc.Clock) -> None:
    pacer = Pacer(16000)
    assert pacer.wall_ns(0) == pacer.start_wall_ns
    assert pacer.wall_ns(16000) == pacer.start_wall_ns + 1_000_000_000
    assert pacer.wall_ns(320) - pacer.wall_ns(0) == 20_000_000
    bursty = Pacer(1000, burst=0.5)
    assert bursty.wall_ns(250) == bursty.start_wall_ns  # inside the burst: the start
    assert bursty.wall_ns(1500) == bursty.start_wall_ns + 1_000_000_000
    assert bursty.deadline(1500) == bursty.start + 1.0


def test_pacer_rejects_nonsense() -> None:
    async def main() -> None:
        with pytest.raises(ValueError):
            Pacer(0)
        with pytest.raises(ValueError):
            Pacer(8000, burst=-1)
        with pytest.raises(ValueError):
            Pacer(8000, burst=math.nan)
        with pytest.raises(ValueError):
            Pacer(8000).deadline(-1)

    trio.run(main)


# ---- cutting ------------------------------------------------------------------------------


def test_frame_cutter_recuts_any_pieces_into_whole_chunks() -> None:
    rng = random.Random(3)
    data = rng.randbytes(4 * 1000 + 2)  # 1000 frames of 4 bytes and half a frame
    cutter = FrameCutter(4, 96)
    chunks: list[bytes] = []
    at = 0
    while at < len(data):
        size = rng.choice([1, 3, 7, 100, 383, 384, 1000])
        chunks += cutter.feed(data[at : at + size])
        at += size
    assert all(len(c) == 384 for c in chunks)
    assert len(chunks) == 1000 // 96
    tail = cutter.flush()
    assert len(tail) == (1000 % 96) * 4  # whole frames only; the half frame is dropped
    assert b"".join(chunks) + tail == data[:4000]
    assert cutter.flush() == b"" and cutter.pending == 0


# ---- run_decoded --------------------------------------------------------------------------


async def test_run_decoded_publishes_ffmpegs_bytes_paced(media: dict[str, Path]) -> None:
    path = media["sine"]  # 0.5 s
    expected = await _reference(path, LIVE)
    hub = Hub(LIVE)
    sub = hub.subscribe(max_backlog_frames=NO_DROP)
    start_ns, start = time.time_ns(), trio.current_time()
    with trio.fail_after(HANG_GUARD):
        await run_decoded(hub, [path], loop=False, ffmpeg=None, chunk_frames=LIVE_CHUNK)
    elapsed = trio.current_time() - start
    chunks = _drain(sub)
    assert all(isinstance(c, Chunk) for c in chunks)
    assert b"".join(c.data for c in chunks if isinstance(c, Chunk)) == expected
    _check_contiguous(chunks, 0, LIVE.bytes_per_frame)
    sizes = [len(c.data) // LIVE.bytes_per_frame for c in chunks if isinstance(c, Chunk)]
    assert all(size == LIVE_CHUNK for size in sizes[:-1]) and 0 < sizes[-1] <= LIVE_CHUNK
    duration = len(expected) / LIVE.bytes_per_second
    assert duration == pytest.approx(0.5, abs=0.01)
    assert elapsed >= duration - 0.02  # real time, not as fast as ffmpeg decodes
    # stamps: the pacer's schedule, 20 ms apart, never in the future of the publish
    stamps = [c.time_ns for c in chunks if isinstance(c, Chunk)]
    assert stamps[0] >= start_ns
    assert all(b - a == 20_000_000 for a, b in itertools.pairwise(stamps[:-1]))
    assert stamps[-1] <= time.time_ns()


async def test_run_decoded_tracks_follow_each_other(media: dict[str, Path]) -> None:
    """Two tracks are one stream: positions and the schedule carry on; the first
    track's last chunk is short, the second starts a fresh full chunk."""
    paths = [media["short"], media["noise"]]
    expected = [await _reference(p, LIVE) for p in paths]
    hub = Hub(LIVE)
    sub = hub.subscribe(max_backlog_frames=NO_DROP)
    start = trio.current_time()
    with trio.fail_after(HANG_GUARD):
        await run_decoded(hub, paths, loop=False, ffmpeg=None, chunk_frames=LIVE_CHUNK)
    elapsed = trio.current_time() - start
    chunks = [c for c in _drain(sub) if isinstance(c, Chunk)]
    _check_contiguous(chunks, 0, LIVE.bytes_per_frame)
    assert b"".join(c.data for c in chunks) == b"".join(expected)
    first_frames = len(expected[0]) // LIVE.bytes_per_frame
    assert first_frames % LIVE_CHUNK  # the test needs a short last chunk
    boundary = [c.position for c in chunks].index(first_frames)
    assert len(chunks[boundary - 1].data) < LIVE_CHUNK * LIVE.bytes_per_frame
    assert len(chunks[boundary].data) == LIVE_CHUNK * LIVE.bytes_per_frame
    assert elapsed >= sum(len(e) for e in expected) / LIVE.bytes_per_second - 0.02


async def test_run_decoded_loop_wraps_forever(media: dict[str, Path]) -> None:
    path = media["short"]
    one = await _reference(path, LIVE)
    hub = Hub(LIVE)
    wanted = 3 * len(one) // (LIVE_CHUNK * LIVE.bytes_per_frame) + 1  # past two wraps
    got: list[Chunk] = []
    with hub.subscribe(max_backlog_frames=NO_DROP) as sub, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_decoded(hub, [path], loop=True, ffmpeg=None, chunk_frames=LIVE_CHUNK)
            )
            while len(got) < wanted:
                item = await sub.next()
                assert isinstance(item, Chunk)
                got.append(item)
            nursery.cancel_scope.cancel()
    _check_contiguous(got, 0, LIVE.bytes_per_frame)
    data = b"".join(c.data for c in got)
    assert len(data) > 2 * len(one)
    assert data == (one * 4)[: len(data)]
    assert not _ffmpeg_children()


async def test_run_decoded_skips_a_broken_track(
    media: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    paths = [media["broken"], media["short"], media["text"], media["noise"]]
    expected = await _reference(media["short"], LIVE) + await _reference(media["noise"], LIVE)
    hub = Hub(LIVE)
    sub = hub.subscribe(max_backlog_frames=NO_DROP)
    with caplog.at_level(logging.WARNING, logger="musiclib.live"), trio.fail_after(HANG_GUARD):
        await run_decoded(hub, paths, loop=False, ffmpeg=None, chunk_frames=LIVE_CHUNK)
    chunks = _drain(sub)
    _check_contiguous(chunks, 0, LIVE.bytes_per_frame)
    assert b"".join(c.data for c in chunks if isinstance(c, Chunk)) == expected
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 2
    assert "broken.mp3" in skipped[0] and "text.wav" in skipped[1]
    assert str(media["broken"].parent) not in " ".join(skipped)  # names, not server paths


@pytest.mark.parametrize("loop", [False, True])
async def test_run_decoded_all_broken_raises(media: dict[str, Path], loop: bool) -> None:
    paths = [media["broken"], media["text"], media["broken"].with_name("missing.flac")]
    hub = Hub(LIVE)
    with trio.fail_after(HANG_GUARD), pytest.raises(DecodeFailed, match="none of the 3 tracks"):
        await run_decoded(hub, paths, loop=loop, ffmpeg=None, chunk_frames=LIVE_CHUNK)
    assert hub.position == 0
    with trio.fail_after(HANG_GUARD), pytest.raises(DecodeFailed, match=r"broken\.mp3"):
        await run_decoded(hub, paths[:1], loop=loop, ffmpeg=None, chunk_frames=LIVE_CHUNK)
    with pytest.raises(NotFound):
        await run_decoded(hub, [], loop=loop, ffmpeg=None, chunk_frames=LIVE_CHUNK)
    assert not _ffmpeg_children()


async def test_run_decoded_without_ffmpeg_is_an_internal_error(media: dict[str, Path]) -> None:
    with pytest.raises(InternalError, match="ffmpeg is not available"):
        await run_decoded(
            Hub(LIVE), [media["sine"]], loop=True, ffmpeg="/nonexistent/ffmpeg", chunk_frames=441
        )


async def test_run_decoded_cancelled_leaves_no_ffmpeg(media: dict[str, Path]) -> None:
    hub = Hub(LIVE)
    seen: set[int] = set()
    with hub.subscribe(max_backlog_frames=NO_DROP) as sub, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_decoded(
                    hub, [media["sine"]], loop=True, ffmpeg=None, chunk_frames=LIVE_CHUNK
                )
            )
            await sub.next()  # ffmpeg runs: it is still writing the 0.5 s track
            seen = _ffmpeg_children()
            nursery.cancel_scope.cancel()
    assert seen
    assert not _ffmpeg_children()
    for pid in seen:
        assert not Path(f"/proc/{pid}").exists()


# ---- run_ffmpeg ---------------------------------------------------------------------------


async def test_run_ffmpeg_lavfi_input(media: dict[str, Path]) -> None:
    fmt = AudioFormat("s16le", 8000, 1)
    args = ["-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=8000:duration=0.3"]
    direct = await trio.run_process(
        ffmpeg_input_command(FFMPEG, args, fmt), capture_stdout=True, capture_stderr=True
    )
    # the command as the spec spells it; -re and -f lavfi sit before -i, where they belong
    assert ffmpeg_input_command("ffmpeg", ["-re", *args], fmt) == [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-re", *args,
        "-vn", "-map", "0:a:0?", "-f", "s16le", "-acodec", "pcm_s16le",
        "-ar", "8000", "-ac", "1", "pipe:1",
    ]  # fmt: skip
    for input_args in (args, ["-re", *args]):
        hub = Hub(fmt)
        sub = hub.subscribe(max_backlog_frames=NO_DROP)
        start = trio.current_time()
        with trio.fail_after(HANG_GUARD):
            await run_ffmpeg(hub, input_args, ffmpeg=None, chunk_frames=160)
        elapsed = trio.current_time() - start
        chunks = [c for c in _drain(sub) if isinstance(c, Chunk)]
        _check_contiguous(chunks, 0, fmt.bytes_per_frame)
        assert b"".join(c.data for c in chunks) == direct.stdout
        assert len(direct.stdout) == 2400 * 2
        assert [len(c.data) for c in chunks] == [320] * 15
        assert elapsed >= 0.3 - 0.02  # paced by our own pacer even without -re
        stamps = [c.time_ns for c in chunks]
        assert stamps == sorted(stamps)
    assert not _ffmpeg_children()


async def test_run_ffmpeg_failures_say_why(media: dict[str, Path]) -> None:
    hub = Hub(LIVE)
    with trio.fail_after(HANG_GUARD), pytest.raises(DecodeFailed) as info:
        await run_ffmpeg(hub, ["-i", str(media["broken"])], ffmpeg=None, chunk_frames=441)
    assert str(info.value).startswith("cannot decode the ffmpeg input: ")
    # video only: ffmpeg itself says there is no audio stream to map
    with (
        trio.fail_after(HANG_GUARD),
        pytest.raises(DecodeFailed, match="the ffmpeg input has no audio stream"),
    ):
        await run_ffmpeg(hub, ["-f", "lavfi", "-i", "testsrc=d=0.1"], ffmpeg=None, chunk_frames=441)
    with pytest.raises(InternalError):
        await run_ffmpeg(hub, ["-i", "x"], ffmpeg="/nonexistent/ffmpeg", chunk_frames=441)
    assert hub.position == 0
    assert not _ffmpeg_children()


# ---- run_converter ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noise_16k() -> bytes:
    """1.3 s of 16 kHz mono s16le pink noise with a sine in it (not a whole number of chunks)."""
    return _ffmpeg(
        "-f", "lavfi", "-i", "anoisesrc=d=1.3:c=pink:r=16000:s=5:a=0.3",
        "-f", "lavfi", "-i", "sine=frequency=700:sample_rate=16000:duration=1.3",
        "-filter_complex", "amix=inputs=2", "-f", "s16le", "-ac", "1", "-ar", "16000", "-",
    )  # fmt: skip


async def _convert_directly(data: bytes, source: AudioFormat, target: AudioFormat) -> bytes:
    """The same ffmpeg command as the converter's, fed the whole input at once."""
    done = await trio.run_process(
        convert_command(FFMPEG, source, target),
        stdin=data,
        capture_stdout=True,
        capture_stderr=True,
    )
    return done.stdout


def _publish_all(hub: Hub, data: bytes, chunk_frames: int, t0_ns: int) -> None:
    """Publish ``data`` in chunks stamped as if captured in real time from ``t0_ns``."""
    size = chunk_frames * hub.format.bytes_per_frame
    for at in range(0, len(data), size):
        piece = data[at : at + size]
        end = hub.position + len(piece) // hub.format.bytes_per_frame
        hub.publish(piece, t0_ns + end * 1_000_000_000 // hub.format.sample_rate)


async def _collect_until_end(sub: Subscription) -> tuple[list[Chunk | Gap], End]:
    items: list[Chunk | Gap] = []
    while True:
        item = await sub.next()
        if isinstance(item, End):
            return items, item
        items.append(item)


async def test_converter_equals_one_ffmpeg_run_on_the_whole_input(noise_16k: bytes) -> None:
    source = Hub(MONO_16K)
    out = Hub(STEREO_48K_F32)
    t0 = 1_700_000_000_000_000_000
    half = len(noise_16k) // 2 // 640 * 640
    _publish_all(source, noise_16k[:half], 320, t0)  # history: out gets it as preroll
    listener = out.subscribe(max_backlog_frames=NO_DROP)
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_converter(
                source, out, ffmpeg=None, task_status=task_status))  # fmt: skip
            assert len(_ffmpeg_children()) == 1
            # the rest live, in pieces of 20 ms, some time apart
            rest = noise_16k[half:]
            for at in range(0, len(rest), 640):
                piece = rest[at : at + 640]
                stop = source.position + len(piece) // 2
                source.publish(piece, t0 + stop * 1_000_000_000 // 16000)
                if at % 6400 == 0:
                    await trio.sleep(0.01)
            source.close("source_ended", "that was all")
            items, end = await _collect_until_end(listener)
    assert end == End("source_ended", "that was all")
    assert out.closed
    expected = await _convert_directly(noise_16k, MONO_16K, STEREO_48K_F32)
    chunks = [c for c in items if isinstance(c, Chunk)]
    assert len(chunks) == len(items)  # no gaps
    _check_contiguous(chunks, 0, STEREO_48K_F32.bytes_per_frame)
    got = b"".join(c.data for c in chunks)
    assert len(got) == len(expected) == 3 * len(noise_16k) // 2 * 8
    assert got == expected
    assert all(len(c.data) == 960 * 8 for c in chunks[:-1])
    # each chunk stamped with the capture time of its last input frame
    for c in chunks:
        end_in = (c.position + len(c.data) // 8) / 3
        assert c.time_ns == pytest.approx(t0 + end_in * 1e9 / 16000, abs=1000)
    assert not _ffmpeg_children()


async def test_converter_positions_and_gaps(noise_16k: bytes) -> None:
    """A source that started long ago and has a hole: out positions are the source's
    scaled (44.1/16, not an integer ratio), and the hole is converted as silence."""
    source = Hub(MONO_16K, history_seconds=0.25)
    target = AudioFormat("s16le", 44100, 1)
    out = Hub(target)
    origin = 1_000_003
    source.publish_chunk(Chunk(origin, 0, noise_16k[:640]))  # a hole from 0 (forgotten)
    _publish_all(source, noise_16k[640:16000], 320, 0)
    probe = source.subscribe(max_backlog_frames=1, preroll_frames=source.position)
    start = probe.start_position  # where the history (hence the conversion) starts
    probe.close()
    assert origin < start < source.position - 3999
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_converter(
                source, out, ffmpeg=None, task_status=task_status))  # fmt: skip
            # a fresh out hub starts where the converted audio starts: no gap from 0
            assert out.position == scale_position(start, 16000, 44100)
            sub = out.subscribe(max_backlog_frames=NO_DROP)
            hole_at = source.position
            source.publish_chunk(Chunk(hole_at + 1600, 0, noise_16k[16000:32000]))
            source.close("source_failed", "the microphone went away")
            items, end = await _collect_until_end(sub)
    assert end == End("source_failed", "the microphone went away")
    assert all(isinstance(i, Chunk) for i in items)
    _check_contiguous(items, scale_position(start, 16000, 44100), 2)
    fed = noise_16k[:16000][(start - origin) * 2 :]
    assert len(fed) == (hole_at - start) * 2
    expected = await _convert_directly(
        fed + bytes(1600 * 2) + noise_16k[16000:32000], MONO_16K, target
    )
    assert b"".join(i.data for i in items if isinstance(i, Chunk)) == expected
    assert not _ffmpeg_children()


async def test_converter_failure_closes_out(noise_16k: bytes) -> None:
    source = Hub(MONO_16K)
    out = Hub(STEREO_48K_F32)
    sub = out.subscribe(max_backlog_frames=NO_DROP)
    with (
        trio.fail_after(HANG_GUARD),
        pytest.RaisesGroup(pytest.RaisesExc(DecodeFailed, match="conversion to f32le")),
    ):
        async with trio.open_nursery() as nursery:
            # "false" runs, reads nothing and exits 1: a converter whose ffmpeg dies
            await nursery.start(lambda task_status: run_converter(
                source, out, ffmpeg="false", task_status=task_status))  # fmt: skip
            _publish_all(source, noise_16k[:6400], 320, 0)
    end = await sub.next()
    assert isinstance(end, End) and end.reason == "source_failed"
    out2 = Hub(STEREO_48K_F32)
    with pytest.raises(InternalError):
        await run_converter(source, out2, ffmpeg="/nonexistent/ffmpeg")


async def test_converter_cancelled_leaves_no_ffmpeg(noise_16k: bytes) -> None:
    source = Hub(MONO_16K)
    out = Hub(STEREO_48K_F32)
    sub = out.subscribe(max_backlog_frames=NO_DROP)
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_converter(
                source, out, ffmpeg=None, task_status=task_status))  # fmt: skip
            pids = _ffmpeg_children()
            _publish_all(source, noise_16k, 320, 0)
            item = await sub.next()  # the converter works
            assert isinstance(item, Chunk)
            nursery.cancel_scope.cancel()
    assert len(pids) == 1
    assert not _ffmpeg_children()
    assert not Path(f"/proc/{pids.pop()}").exists()
    assert not out.closed  # left to the canceller, who knows why
    assert source.listeners == 0  # the converter's subscription is gone


# ---- run_mic ------------------------------------------------------------------------------


class _FakeMicrophone:
    """Stands in for devices.Microphone (no sound card here): scripted blocks, and a
    drop of two blocks between the second and the third."""

    def __init__(self, fmt: AudioFormat, block_frames: int) -> None:
        self.block_frames = block_frames
        self.overflows = 0
        self._blocks = [bytes([i]) * block_frames * fmt.bytes_per_frame for i in range(1, 5)]
        self._sent = 0

    def __aiter__(self) -> _FakeMicrophone:
        return self

    async def __anext__(self) -> tuple[bytes, int]:
        await trio.lowlevel.checkpoint()
        if self._sent == len(self._blocks):
            raise StopAsyncIteration
        if self._sent == 2:
            self.overflows += 2
        self._sent += 1
        return self._blocks[self._sent - 1], 1000 * self._sent


async def test_run_mic_publishes_blocks_and_reports_drops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[tuple[str | None, AudioFormat, int]] = []

    @contextlib.asynccontextmanager
    async def fake_open_input(
        device: str | None, fmt: AudioFormat, *, block_frames: int
    ) -> AsyncIterator[_FakeMicrophone]:
        opened.append((device, fmt, block_frames))
        yield _FakeMicrophone(fmt, block_frames)

    monkeypatch.setattr(musiclib.devices, "open_input", fake_open_input)
    hub = Hub(MONO_16K)
    sub = hub.subscribe(max_backlog_frames=NO_DROP)
    await run_mic(hub, "USB", chunk_frames=320)
    assert opened == [("USB", MONO_16K, 320)]
    items = _drain(sub)
    assert [(type(i).__name__, i.position) for i in items] == [
        ("Chunk", 0), ("Chunk", 320), ("Gap", 640), ("Chunk", 1280), ("Chunk", 1600),
    ]  # fmt: skip
    assert isinstance(items[2], Gap) and items[2].frames == 640
    assert [i.time_ns for i in items if isinstance(i, Chunk)] == [1000, 2000, 3000, 4000]


@pytest.mark.parametrize(
    ("rate", "frames"),
    [(8000, 512), (11025, 1024), (16000, 1024), (22050, 2048), (32000, 2048), (44100, 4096),
     (48000, 4096), (96000, 8192)],
)  # fmt: skip
def test_input_packet_frames(rate: int, frames: int) -> None:
    """The demuxer's packet sizes as measured with ffmpeg 9.0 (see convert.py)."""
    assert input_packet_frames(rate) == frames


async def test_input_packet_frames_is_what_ffmpeg_holds_back() -> None:
    """Fed 10 ms at a time, ffmpeg says nothing until a whole demuxer packet is in."""
    fmt = AudioFormat("s16le", 16000, 1)
    cmd = convert_command(FFMPEG, fmt, fmt)
    process = await trio.lowlevel.open_process(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    stdin, stdout = process.stdin, process.stdout
    assert stdin is not None and stdout is not None

    async def feed() -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            for _ in range(50):
                await stdin.send_all(bytes(160 * 2))
                await trio.sleep(0.002)

    try:
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                first = await stdout.receive_some(1 << 20)
                nursery.cancel_scope.cancel()
    finally:
        process.kill()
        await process.wait()
        await stdin.aclose()
        await stdout.aclose()
    assert len(first) == input_packet_frames(16000) * 2
