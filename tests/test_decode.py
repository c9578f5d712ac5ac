"""The ffmpeg pipeline: same bytes as ffmpeg itself, clear failures, no stray processes.

"Same parameters" is defined by :func:`decode_command`: every decode through
:func:`open_decoder` is compared byte for byte with a direct run of that very
command line writing to a file.
"""

from __future__ import annotations

import itertools
import math
import os
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import pytest
import trio
import trio.testing

from musiclib.decode import (
    SAMPLE_FORMATS,
    AudioFormat,
    DecodeSlots,
    decode_command,
    ffmpeg_executable,
    open_decoder,
)
from musiclib.errors import Busy, DecodeFailed, InternalError

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
RATE = 44100
MONO_16K = AudioFormat("s16le", 16000, 1)
NATIVE_F32 = AudioFormat("f32le", RATE, 2)
#: a guard against hangs only; every test here finishes far sooner
HANG_GUARD = 60


@dataclass(frozen=True)
class Media:
    mp3: Path  # 3 s stereo 440 Hz sine
    flac: Path  # the same, lossless
    long: Path  # 60 s stereo flac
    two_streams: Path  # mka: mono 440 Hz (not default), then stereo 880 Hz (default)
    cover: Path  # the mp3 with cover art as a second stream
    noise: Path  # random bytes named .mp3
    text: Path  # a text file named .wav


def _ffmpeg(*args: str) -> bytes:
    done = subprocess.run(
        [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
    )
    return done.stdout


def _sine(freq: int, seconds: int) -> list[str]:
    return ["-f", "lavfi", "-i", f"sine=frequency={freq}:duration={seconds}:sample_rate={RATE}"]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    d = tmp_path_factory.mktemp("media")
    m = Media(
        mp3=d / "sine.mp3",
        flac=d / "sine.flac",
        long=d / "long.flac",
        two_streams=d / "two.mka",
        cover=d / "cover.mp3",
        noise=d / "noise.mp3",
        text=d / "notes.wav",
    )
    _ffmpeg(*_sine(440, 3), "-ac", "2", str(m.mp3))
    _ffmpeg(*_sine(440, 3), "-ac", "2", str(m.flac))
    _ffmpeg(*_sine(440, 60), "-ac", "2", str(m.long))
    _ffmpeg(
        *_sine(440, 2),
        *_sine(880, 2),
        "-filter_complex",
        "[1:a]pan=stereo|c0=c0|c1=c0[s]",
        "-map",
        "0:a",
        "-map",
        "[s]",
        "-c:a",
        "flac",
        "-disposition:a:0",
        "0",
        "-disposition:a:1",
        "default",
        str(m.two_streams),
    )
    png = d / "cover.png"
    _ffmpeg("-f", "lavfi", "-i", "color=c=red:s=64x64", "-frames:v", "1", str(png))
    _ffmpeg(
        *("-i", str(m.mp3), "-i", str(png), "-map", "0:a", "-map", "1:v", "-c:a", "copy"),
        *("-c:v", "png", "-disposition:v:0", "attached_pic", "-id3v2_version", "3", str(m.cover)),
    )
    m.noise.write_bytes(bytes((i * 7919 + (i >> 3) * 104729) % 251 for i in range(50_000)))
    m.text.write_text("these are my notes, not a song\n")
    return m


def run_to_file(cmd: list[str], out: Path) -> bytes:
    """Run ``cmd`` as it is, standard output to a file; what it wrote."""
    with open(out, "wb") as f:
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, check=True)
    return out.read_bytes()


async def direct(cmd: list[str], out: Path) -> bytes:
    return await trio.to_thread.run_sync(run_to_file, cmd, out)


async def decode_all(
    source: Path,
    fmt: AudioFormat,
    *,
    start: float = 0.0,
    duration: float | None = None,
    ffmpeg: str | None = None,
) -> tuple[bytes, int]:
    """Everything ``open_decoder`` yields, and the decoder's frame count."""
    with trio.fail_after(HANG_GUARD):
        async with open_decoder(
            source, fmt, start=start, duration=duration, ffmpeg=ffmpeg
        ) as decoder:
            chunks = [chunk async for chunk in decoder]
            assert decoder.bytes_read == sum(map(len, chunks))
            return b"".join(chunks), decoder.frames


def assert_gone(pid: int) -> None:
    """No such process: neither running nor a zombie waiting to be reaped."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    proc = Path(f"/proc/{pid}/stat")
    if proc.exists():  # pragma: no cover - only if the pid was reused meanwhile
        assert proc.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


# ---- the bytes are ffmpeg's own ----------------------------------------------


@pytest.mark.parametrize("fmt", [MONO_16K, NATIVE_F32], ids=["s16le-16k-mono", "f32le-native"])
@pytest.mark.parametrize("kind", ["mp3", "flac"])
async def test_decoded_bytes_equal_a_direct_run(
    media: Media, tmp_path: Path, kind: str, fmt: AudioFormat
) -> None:
    source = getattr(media, kind)
    data, frames = await decode_all(source, fmt)
    expected = await direct(decode_command(FFMPEG, source, fmt), tmp_path / "out.raw")
    assert data == expected
    assert frames == len(data) // fmt.bytes_per_frame == 3 * fmt.sample_rate


@pytest.mark.parametrize("fmt", [MONO_16K, NATIVE_F32], ids=["s16le-16k-mono", "f32le-native"])
@pytest.mark.parametrize("kind", ["mp3", "flac"])
async def test_start_and_duration_equal_a_direct_run(
    media: Media, tmp_path: Path, kind: str, fmt: AudioFormat
) -> None:
    source = getattr(media, kind)
    data, frames = await decode_all(source, fmt, start=1.5, duration=1.0)
    cmd = decode_command(FFMPEG, source, fmt, start=1.5, duration=1.0)
    assert data == await direct(cmd, tmp_path / "out.raw")
    assert frames == len(data) // fmt.bytes_per_frame == fmt.sample_rate  # one second


async def test_f32le_carries_the_sine(media: Media) -> None:
    data, frames = await decode_all(media.flac, NATIVE_F32)
    samples = struct.unpack(f"<{frames * 2}f", data)
    left, right = samples[0::2], samples[1::2]
    assert left == right
    # lavfi's sine has amplitude 1/8; the fixture's mono-to-stereo upmix took 3 dB off
    assert max(left) == pytest.approx(1 / 8 / math.sqrt(2), abs=0.002)
    crossings = sum(1 for a, b in itertools.pairwise(left) if a < 0 <= b)
    assert abs(crossings - 3 * 440) <= 1


async def test_only_the_first_audio_stream(media: Media, tmp_path: Path) -> None:
    """ffmpeg alone would pick the default stereo stream; -map 0:a:0 takes the first."""
    fmt = AudioFormat("s16le", RATE, 1)
    data, _ = await decode_all(media.two_streams, fmt)
    first = _ffmpeg(*_sine(440, 2), "-f", "s16le", "-ac", "1", "pipe:1")
    assert data == first
    picked_by_ffmpeg = _ffmpeg("-i", str(media.two_streams), "-f", "s16le", "-ac", "1", "pipe:1")
    assert data != picked_by_ffmpeg


async def test_cover_art_is_ignored(media: Media) -> None:
    with_cover, _ = await decode_all(media.cover, MONO_16K)
    without, _ = await decode_all(media.mp3, MONO_16K)
    assert with_cover == without


@pytest.mark.parametrize("chunk_size", [1000, 4096, 65536])
async def test_chunks_are_bounded(media: Media, chunk_size: int) -> None:
    async with open_decoder(media.flac, MONO_16K, chunk_size=chunk_size) as decoder:
        sizes = [len(chunk) async for chunk in decoder]
    assert sizes and max(sizes) <= chunk_size
    assert sum(sizes) == 3 * 16000 * 2
    with pytest.raises(StopAsyncIteration):  # iterating past the end stays at the end
        await decoder.__anext__()


# ---- failures: one line, ffmpeg's reason, no server path ------------------------


@pytest.mark.parametrize("kind", ["noise", "text"])
async def test_undecodable_file(media: Media, kind: str) -> None:
    source: Path = getattr(media, kind)
    with pytest.raises(DecodeFailed) as info:
        async with open_decoder(source, MONO_16K) as decoder:
            pid = decoder.pid
            async for _ in decoder:
                pass
    message = str(info.value)
    assert message.startswith(f"cannot decode {source.name}: ")
    assert "Invalid data" in message
    assert "\n" not in message and len(message) < 300
    assert str(source.parent) not in message
    assert info.value.code == "decode_failed"
    assert decoder.process.returncode not in (None, 0)
    assert_gone(pid)


async def test_missing_source(tmp_path: Path) -> None:
    source = tmp_path / "gone.flac"
    with pytest.raises(DecodeFailed, match=r"^cannot decode gone\.flac: .*No such file") as info:
        await decode_all(source, MONO_16K)
    assert str(tmp_path) not in str(info.value)


def fake_ffmpeg(tmp_path: Path, body: str) -> str:
    """A shell script standing in for ffmpeg; ``$src`` is the argument after ``-i``."""
    script = tmp_path / "fake-ffmpeg"
    script.write_text(
        "#!/bin/sh\n"
        'prev=""; for a; do [ "$prev" = "-i" ] && src="$a"; prev="$a"; done\n' + body + "\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


async def test_stderr_is_drained_and_the_last_line_kept(tmp_path: Path) -> None:
    """1 MiB on stderr would block ffmpeg for ever if nobody read it meanwhile."""
    source = tmp_path / "deep" / "song.ogg"
    ffmpeg = fake_ffmpeg(
        tmp_path,
        "head -c 1048576 /dev/zero | tr '\\0' 'x' >&2\n"
        "printf '\\n[ogg @ 0x55d0c0ffee00] trouble reading %s\\n\\n' \"$src\" >&2\n"
        "exit 3",
    )
    with pytest.raises(DecodeFailed) as info:
        await decode_all(source, MONO_16K, ffmpeg=ffmpeg)
    assert str(info.value) == "cannot decode song.ogg: trouble reading song.ogg"


async def test_a_relative_source_is_scrubbed_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ffmpeg = fake_ffmpeg(tmp_path, 'echo "cannot open $PWD/$src or $src" >&2; exit 1')
    with pytest.raises(DecodeFailed) as info:
        await decode_all(Path("deep/song.ogg"), MONO_16K, ffmpeg=ffmpeg)
    assert str(info.value) == "cannot decode song.ogg: cannot open song.ogg or song.ogg"


async def test_a_long_reason_is_cut(tmp_path: Path) -> None:
    ffmpeg = fake_ffmpeg(tmp_path, "printf 'E%.0s' $(seq 500) >&2; exit 1")
    with pytest.raises(DecodeFailed) as info:
        await decode_all(tmp_path / "a.mp3", MONO_16K, ffmpeg=ffmpeg)
    reason = str(info.value).removeprefix("cannot decode a.mp3: ")
    assert reason.startswith("EEEE") and reason.endswith("...")
    assert len(reason) <= 200


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("exit 2", "ffmpeg exited with status 2"),
        ("kill -9 $$", "ffmpeg was killed by SIGKILL"),
        ("printf abc; exit 0", "ffmpeg ended in the middle of a sample frame (3 bytes"),
    ],
)
async def test_failures_without_a_word(tmp_path: Path, body: str, reason: str) -> None:
    ffmpeg = fake_ffmpeg(tmp_path, body)
    with pytest.raises(DecodeFailed) as info:
        await decode_all(tmp_path / "a.mp3", MONO_16K, ffmpeg=ffmpeg)
    assert str(info.value).startswith(f"cannot decode a.mp3: {reason}")


async def test_ffmpeg_missing_is_the_servers_fault(tmp_path: Path) -> None:
    with pytest.raises(InternalError, match="ffmpeg is not available on the server"):
        await decode_all(tmp_path / "a.mp3", MONO_16K, ffmpeg=str(tmp_path / "no-ffmpeg"))
    not_executable = tmp_path / "ffmpeg"
    not_executable.write_text("")
    with pytest.raises(InternalError, match="ffmpeg is not available on the server"):
        await decode_all(tmp_path / "a.mp3", MONO_16K, ffmpeg=str(not_executable))


async def test_bad_musiclib_ffmpeg_is_the_servers_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUSICLIB_FFMPEG", str(tmp_path / "nope"))
    with pytest.raises(InternalError, match="MUSICLIB_FFMPEG"):
        await decode_all(tmp_path / "a.mp3", MONO_16K)


# ---- the process never outlives the block ---------------------------------------


async def test_cancelled_mid_stream(media: Media) -> None:
    with trio.CancelScope() as scope:
        async with open_decoder(media.long, NATIVE_F32) as decoder:
            pid = decoder.pid
            assert await decoder.__anext__()
            scope.cancel()
            await decoder.__anext__()  # the next checkpoint raises Cancelled
    assert scope.cancelled_caught
    assert decoder.process.returncode is not None
    assert_gone(pid)


async def test_cancelled_while_waiting_for_output(tmp_path: Path) -> None:
    """Cancelled while blocked on an empty pipe: the process is killed and reaped."""
    ffmpeg = fake_ffmpeg(tmp_path, "exec sleep 1000")
    async with trio.open_nursery() as nursery:
        started = trio.Event()
        pids: list[int] = []

        async def read_forever() -> None:
            async with open_decoder(tmp_path / "a.mp3", MONO_16K, ffmpeg=ffmpeg) as decoder:
                pids.append(decoder.pid)
                started.set()
                async for _ in decoder:
                    pass

        nursery.start_soon(read_forever)
        await started.wait()
        await trio.testing.wait_all_tasks_blocked()  # the reader waits on the empty pipe
        os.kill(pids[0], 0)  # alive until we leave
        nursery.cancel_scope.cancel()
    assert_gone(pids[0])


async def test_exception_in_the_block(media: Media) -> None:
    with pytest.raises(RuntimeError, match="boom") as info:  # as raised, not in a group
        async with open_decoder(media.long, NATIVE_F32) as decoder:
            pid = decoder.pid
            await decoder.__anext__()
            raise RuntimeError("boom")
    assert type(info.value) is RuntimeError
    assert info.value.__context__ is None
    assert_gone(pid)


async def test_leaving_early_kills_ffmpeg(media: Media) -> None:
    async with open_decoder(media.long, NATIVE_F32) as decoder:
        pid = decoder.pid
        async for _ in decoder:
            break
    assert decoder.process.returncode == -9  # killed: it had most of the file to go
    assert_gone(pid)


async def test_finished_stream_is_reaped(media: Media) -> None:
    async with open_decoder(media.flac, MONO_16K) as decoder:
        pid = decoder.pid
        async for _ in decoder:
            pass
        assert decoder.process.returncode == 0
    assert_gone(pid)


async def test_backpressure_reaches_ffmpeg(media: Media) -> None:
    """Not reading stops ffmpeg: it waits on the full pipe, and nothing piles up here."""
    with trio.fail_after(HANG_GUARD):
        async with open_decoder(media.long, NATIVE_F32) as decoder:
            first = await decoder.__anext__()
            await trio.sleep(0.5)  # ample time to decode 60 s at hundreds of times real time
            assert decoder.process.returncode is None
            os.kill(decoder.pid, 0)
            assert proc_state(decoder.pid) != "Z"
            assert decoder.bytes_read == len(first)
            rest = [chunk async for chunk in decoder]
    total = len(first) + sum(map(len, rest))
    assert total == decoder.bytes_read == 60 * RATE * NATIVE_F32.bytes_per_frame
    assert decoder.frames == 60 * RATE


# ---- the command line ---------------------------------------------------------


def test_decode_command_defaults() -> None:
    assert decode_command("ff", Path("/m/a b.mp3"), MONO_16K) == [
        *("ff", "-nostdin", "-hide_banner", "-loglevel", "error"),
        *("-i", "/m/a b.mp3", "-vn", "-map", "0:a:0"),
        *("-f", "s16le", "-acodec", "pcm_s16le", "-ar", "16000", "-ac", "1", "pipe:1"),
    ]


def test_decode_command_seeks_on_the_input() -> None:
    cmd = decode_command("ff", Path("a.flac"), NATIVE_F32, start=1.5, duration=0.25)
    assert cmd[5:11] == ["-ss", "1.5", "-i", "a.flac", "-t", "0.25"]
    assert cmd[-9:] == ["-f", "f32le", "-acodec", "pcm_f32le", "-ar", "44100", "-ac", "2", "pipe:1"]
    assert decode_command("ff", Path("a"), MONO_16K, start=120)[5:7] == ["-ss", "120"]
    assert decode_command("ff", Path("a"), MONO_16K, start=1e-7)[5:7] == ["-ss", "0"]


@pytest.mark.parametrize(
    ("fmt", "kwargs", "match"),
    [
        (AudioFormat("s24le", 44100, 2), {}, "unknown sample format"),
        (MONO_16K, {"start": -1.0}, "start"),
        (MONO_16K, {"start": float("nan")}, "start"),
        (MONO_16K, {"duration": float("inf")}, "duration"),
    ],
)
def test_decode_command_refuses(fmt: AudioFormat, kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_command("ff", Path("a"), fmt, **kwargs)


@pytest.mark.parametrize(
    ("fmt", "problem"),
    [
        (AudioFormat("s16le", 44100, 2), None),
        (AudioFormat("f32le", 384000, 8), None),
        (AudioFormat("f32le", 1000, 1), None),
        (AudioFormat("u8", 44100, 2), "unknown sample format 'u8'"),
        (AudioFormat("s16le", 44100, 0), "channels must be 1 to 8, not 0"),
        (AudioFormat("s16le", 44100, 9), "channels must be 1 to 8, not 9"),
        (AudioFormat("s16le", 999, 2), "sample rate must be 1000 to 384000 Hz, not 999"),
        (AudioFormat("s16le", 384001, 2), "sample rate must be 1000 to 384000 Hz"),
    ],
)
def test_audio_format_problem(fmt: AudioFormat, problem: str | None) -> None:
    if problem is None:
        assert fmt.problem() is None
    else:
        assert (fmt.problem() or "").startswith(problem)


def test_audio_format_sizes() -> None:
    assert SAMPLE_FORMATS == {"s16le": 2, "f32le": 4}
    assert NATIVE_F32.bytes_per_frame == 8
    assert NATIVE_F32.bytes_per_second == 352800
    assert MONO_16K.bytes_per_frame == 2
    assert MONO_16K.bytes_per_second == 32000


# ---- which ffmpeg -------------------------------------------------------------


def test_ffmpeg_executable_defaults_to_imageio() -> None:
    assert ffmpeg_executable({}) == FFMPEG
    assert ffmpeg_executable({"MUSICLIB_FFMPEG": ""}) == FFMPEG


def test_ffmpeg_executable_from_the_environment() -> None:
    assert ffmpeg_executable({"MUSICLIB_FFMPEG": FFMPEG}) == FFMPEG


@pytest.mark.parametrize("what", ["missing", "directory", "not-executable"])
def test_ffmpeg_executable_refuses(tmp_path: Path, what: str) -> None:
    path = tmp_path / "ffmpeg"
    if what == "directory":
        path.mkdir()
    elif what == "not-executable":
        path.write_text("#!/bin/sh\n")
    with pytest.raises(FileNotFoundError, match="MUSICLIB_FFMPEG") as info:
        ffmpeg_executable({"MUSICLIB_FFMPEG": str(path)})
    assert str(path) in str(info.value)


# ---- slots and pacing -----------------------------------------------------------


async def test_slots_busy_then_free(autojump_clock: trio.testing.MockClock) -> None:
    slots = DecodeSlots(1, 0.1)
    assert slots.in_use == 0
    async with slots.acquire():
        assert slots.in_use == 1
        before = trio.current_time()
        with pytest.raises(Busy, match=r"^the decoder is busy; try again shortly$"):
            async with slots.acquire():
                pytest.fail("got a slot that was taken")
        assert trio.current_time() - before == pytest.approx(0.1)
        assert slots.in_use == 1
    assert slots.in_use == 0
    async with slots.acquire():
        assert slots.in_use == 1


async def test_slots_waiter_gets_a_freed_slot(autojump_clock: trio.testing.MockClock) -> None:
    slots = DecodeSlots(2, 5.0)
    got: list[float] = []

    async def third() -> None:
        async with slots.acquire():
            got.append(trio.current_time())

    async with trio.open_nursery() as nursery, slots.acquire(), slots.acquire():
        assert slots.in_use == 2
        begin = trio.current_time()
        nursery.start_soon(third)
        await trio.sleep(3)
        assert got == []
    assert got == [pytest.approx(begin + 3)]
    assert slots.in_use == 0


async def test_slots_message_names_the_limit(autojump_clock: trio.testing.MockClock) -> None:
    slots = DecodeSlots(8, 0)
    async with trio.open_nursery() as nursery:
        release = trio.Event()

        async def hold() -> None:
            async with slots.acquire():
                await release.wait()

        for _ in range(8):
            nursery.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        assert slots.in_use == 8
        with pytest.raises(Busy, match=r"^all 8 decoders are busy; try again shortly$"):
            async with slots.acquire():
                pass
        release.set()
    assert slots.in_use == 0


async def test_slots_with_no_wait_still_grant_a_free_slot() -> None:
    slots = DecodeSlots(1, 0)
    async with slots.acquire():
        assert slots.in_use == 1
