"""musiclib.devices against real PortAudio: a private PulseAudio daemon and an ALSA file device.

No mocks of PortAudio: the microphone is a pulse null sink that ``paplay`` plays into, the
speaker a null sink that ``parec`` records, and an ALSA ``type file`` PCM replays a file's
bytes (see tests/audio_env.py for what each preserves). The one simulated failure is a
missing ``sounddevice`` module, to check the message a user gets.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import audio_env
import pytest
import trio

from musiclib import devices
from musiclib.decode import AudioFormat
from musiclib.errors import DeviceError

FMT = audio_env.PULSE_FORMAT
BLOCK = FMT.sample_rate // 50  # 20 ms, what the live sources use


def find_exact(recorded: bytes, sound: bytes, fmt: AudioFormat) -> int:
    """Where ``sound`` lies byte for byte inside ``recorded`` (frame-aligned); fails if nowhere."""
    at = recorded.find(sound)
    assert at >= 0, "the sound is not in the recording byte for byte" + _near_miss(recorded, sound)
    assert at % fmt.bytes_per_frame == 0
    return at


def _near_miss(recorded: bytes, sound: bytes) -> str:
    """Say how much of ``sound`` did arrive, to make a failure readable."""
    probe = sound[4000:4064]
    at = recorded.find(probe)
    if at < 0:
        return " (not even a 64-byte piece of it)"
    start = at - 4000
    same = sum(
        1
        for i in range(0, len(sound), 4)
        if recorded[start + i : start + i + 4] == sound[i : i + 4]
    )
    return f" ({same} of {len(sound) // 4} aligned 4-byte pieces match at byte {start})"


def streams(pulse: audio_env.Pulse, kind: str) -> int:
    """How many ``source-outputs`` (recorders: the two keepers are always there) or
    ``sink-inputs`` (players) the daemon has."""
    return len(pulse.pactl("list", "short", kind).splitlines())


async def wait_for_streams(pulse: audio_env.Pulse, kind: str, count: int) -> None:
    """The daemon learns of a closed stream a moment after PortAudio closed it."""
    with trio.fail_after(3):
        while streams(pulse, kind) != count:  # noqa: ASYNC110 (pulse's state, polled)
            await trio.sleep(0.02)


# --- without the extra --------------------------------------------------------------------------


def test_importing_devices_does_not_import_sounddevice() -> None:
    code = (
        "import sys, musiclib.devices, musiclib.errors; "
        "assert 'sounddevice' not in sys.modules, 'sounddevice was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # `import sounddevice` fails
    for call in (devices.sounddevice_module, devices.list_devices):
        with pytest.raises(DeviceError) as info:
            call()
        assert str(info.value) == (
            "microphone and speaker support needs the optional extra: "
            "pip install 'musiclib[devices]'"
        )
        assert info.value.exit_code == 8
    with pytest.raises(DeviceError, match=r"musiclib\[devices\]"):
        async with devices.open_input(None, FMT, block_frames=BLOCK):
            pass  # pragma: no cover
    with pytest.raises(DeviceError, match=r"musiclib\[devices\]"):
        async with devices.open_output(None, FMT):
            pass  # pragma: no cover


def test_missing_portaudio_library_says_so() -> None:
    # sounddevice itself raises OSError when ctypes cannot find libportaudio
    code = (
        "import ctypes.util; ctypes.util.find_library = lambda name: None\n"
        "from musiclib import devices, errors\n"
        "try:\n"
        "    devices.sounddevice_module()\n"
        "except errors.DeviceError as exc:\n"
        "    print(exc)\n"
    )
    if audio_env.portaudio_problem() is not None:
        pytest.skip(audio_env.portaudio_problem())
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "PortAudio library" in done.stdout and "libportaudio2" in done.stdout


def test_formats_devices_cannot_take_are_refused() -> None:
    with pytest.raises(ValueError, match="s16le, f32le"):
        devices._dtype(AudioFormat("u8", 8000, 1))


# --- listing and finding ------------------------------------------------------------------------


def test_list_devices_shows_the_pulse_daemon(pulse: audio_env.Pulse) -> None:
    found = devices.list_devices()
    by_name = {d.name: d for d in found}
    assert {"pulse", "default"} <= set(by_name), found
    assert [d.index for d in found] == list(range(len(found)))
    default = by_name["default"]
    assert default.is_default_input and default.is_default_output
    assert default.hostapi == "ALSA"
    assert default.max_input_channels > 0 and default.max_output_channels > 0
    assert default.default_samplerate > 0
    assert sum(d.is_default_input for d in found) == 1


def test_find_device(pulse: audio_env.Pulse) -> None:
    index = {d.name: d.index for d in devices.list_devices()}
    assert devices.find_device(None, "input") is None
    assert devices.find_device("pulse", "input") == index["pulse"]
    assert devices.find_device("PULS", "output") == index["pulse"]  # a part, any case
    assert devices.find_device("efau", "input") == index["default"]
    assert devices.find_device(str(index["default"]), "input") == index["default"]


def test_find_device_errors_name_the_devices(pulse: audio_env.Pulse) -> None:
    with pytest.raises(DeviceError) as info:
        devices.find_device("no such mic", "input")
    message = str(info.value)
    assert "no input device matches 'no such mic'" in message
    assert "'pulse'" in message and "'default' (default)" in message
    with pytest.raises(DeviceError, match="matches several output devices") as info:
        devices.find_device("u", "output")  # pUlse, defaUlt
    assert "'pulse'" in str(info.value) and "'default'" in str(info.value)
    with pytest.raises(DeviceError, match="there is no input device 99; input devices: "):
        devices.find_device("99", "input")


# --- the ALSA file device: exact bytes ----------------------------------------------------------


async def read_blocks(mic: devices.Microphone, count: int, timeout: float = 10) -> list[bytes]:
    blocks = []
    with trio.fail_after(timeout):
        async for data, _ in mic:
            blocks.append(data)
            if len(blocks) == count:
                break
    return blocks


async def check_file_input(device: audio_env.FileInput, sound: bytes, blocks: int) -> None:
    # The unpaced device delivers ~2 s of audio a millisecond; a buffer bigger than
    # anything it can produce before we have read keeps the first blocks from being dropped.
    async with devices.open_input(device.name, FMT, block_frames=BLOCK, buffer_seconds=600) as mic:
        got = await read_blocks(mic, blocks)
        assert mic.input_overflows == 0
    assert all(len(b) == BLOCK * FMT.bytes_per_frame for b in got)
    assert b"".join(got) == sound


async def test_open_input_gives_the_files_samples_exactly(
    alsa_file_input: Callable[..., audio_env.FileInput],
) -> None:
    sound = audio_env.noise(25 * BLOCK)  # 0.5 s
    await check_file_input(alsa_file_input(sound), sound, 25)


async def test_the_paced_file_input_is_exact_too(
    pulse: audio_env.Pulse, alsa_file_input: Callable[..., audio_env.FileInput]
) -> None:
    sound = audio_env.noise(15 * BLOCK, seed=5)  # 0.3 s, played in real time
    start = time.monotonic()
    await check_file_input(alsa_file_input(sound, paced=True), sound, 15)
    assert time.monotonic() - start > 0.25


async def test_open_input_float_samples(
    alsa_file_input: Callable[..., audio_env.FileInput],
) -> None:
    fmt = AudioFormat("f32le", 48000, 1)
    values = [(i % 200 - 100) / 128 for i in range(fmt.sample_rate // 10)]
    sound = struct.pack(f"<{len(values)}f", *values)
    device = alsa_file_input(sound)
    async with devices.open_input(device.name, fmt, block_frames=480, buffer_seconds=600) as mic:
        got = await read_blocks(mic, 10)
    assert b"".join(got) == sound


async def test_a_late_reader_loses_the_oldest_blocks_not_the_newest(
    pulse: audio_env.Pulse,
) -> None:
    async with devices.open_input(None, FMT, block_frames=BLOCK, buffer_seconds=0.1) as mic:
        await trio.sleep(0.6)  # 30 blocks arrive, 5 fit
        before = time.time_ns()
        _, stamp = await mic.__anext__()
        assert mic.overflows >= 15
        assert mic.dropped_before_last == mic.overflows  # all of them before this block
        await mic.__anext__()
        assert mic.dropped_before_last == 0
    assert before - stamp < 200_000_000  # what is left is the last 0.1 s


async def test_blocks_are_recut_to_block_frames() -> None:
    """PortAudio may call back with other sizes than asked; blocks stay exact, stamps too."""

    class Status:
        input_overflow = False

    mic = devices.Microphone(AudioFormat("s16le", 1000, 1), 4, buffer_seconds=10)
    stream = bytes(range(2 * 11))
    mic._callback(stream[:6], 3, None, Status())  # 3 frames: no whole block yet
    mic._callback(stream[6:], 8, None, Status())  # 8 more: two blocks, 3 frames left over
    first, second = await mic.__anext__(), await mic.__anext__()
    assert first[0] == stream[:8] and second[0] == stream[8:16]
    # at 1000 Hz the second block ended 3 ms before the callback, the first 7 ms before
    assert second[1] - first[1] == 4_000_000
    assert mic._partial == stream[16:]


# --- the pulse microphone -----------------------------------------------------------------------


async def test_mic_hears_exactly_what_is_played_into_it(
    pulse: audio_env.Pulse, tmp_path: Path
) -> None:
    sound = audio_env.noise(FMT.sample_rate // 2)  # 0.5 s
    wav = audio_env.write_wav(tmp_path / "noise.wav", sound)
    got: list[tuple[bytes, int]] = []
    async with devices.open_input(None, FMT, block_frames=BLOCK) as mic, trio.open_nursery() as n:
        n.start_soon(trio.to_thread.run_sync, pulse.play_into_mic, wav)
        with trio.move_on_after(1.2):
            async for block in mic:
                got.append(block)
        assert mic.overflows == 0 and mic.input_overflows == 0
    recorded = b"".join(data for data, _ in got)
    at = find_exact(recorded, sound, FMT)
    # around the sound the null sink's monitor gave silence, in real time
    assert recorded[:at].count(0) == at
    assert recorded[at + len(sound) :].count(0) == len(recorded) - at - len(sound)
    assert len(got) >= 50  # 1.2 s of 20 ms blocks (a few may still be on their way)
    steps = [b - a for (_, a), (_, b) in itertools.pairwise(got)]
    assert sum(steps) / len(steps) == pytest.approx(20e6, rel=0.1)


def test_no_devices_at_all_is_a_device_error(tmp_path: Path) -> None:
    """No sound card and no sound server: opening the default device says there is none."""
    if audio_env.portaudio_problem() is not None:
        pytest.skip(audio_env.portaudio_problem())
    code = (
        "import trio\n"
        "from musiclib import devices, errors\n"
        "from musiclib.decode import AudioFormat\n"
        "print(len(devices.list_devices()))\n"
        "async def main():\n"
        "    fmt = AudioFormat('s16le', 48000, 1)\n"
        "    async with devices.open_input(None, fmt, block_frames=960):\n"
        "        pass\n"
        "try:\n"
        "    trio.run(main)\n"
        "except errors.DeviceError as exc:\n"
        "    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "XDG_"))}
    env.update(HOME=str(tmp_path), XDG_RUNTIME_DIR=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    count, _, message = done.stdout.partition("\n")
    if count != "0":
        pytest.skip("this machine has a sound card")
    assert message.strip() == (
        "there is no default input device; "
        "there are no input devices (no sound card, or no sound server running)"
    ), done.stderr


async def record_while_playing(
    pulse: audio_env.Pulse, wav: Path, fmt: AudioFormat, seconds: float
) -> bytes:
    got = []
    block = fmt.sample_rate // 50
    async with devices.open_input(None, fmt, block_frames=block) as mic, trio.open_nursery() as n:
        n.start_soon(trio.to_thread.run_sync, pulse.play_into_mic, wav)
        with trio.move_on_after(seconds):
            async for data, _ in mic:
                got.append(data)
    return b"".join(got)


async def test_mic_in_f32le_is_the_same_samples_over_32768(
    pulse: audio_env.Pulse, tmp_path: Path
) -> None:
    sound = audio_env.noise(FMT.sample_rate // 4, seed=6)
    wav = audio_env.write_wav(tmp_path / "noise.wav", sound)
    fmt = AudioFormat("f32le", FMT.sample_rate, FMT.channels)
    recorded = await record_while_playing(pulse, wav, fmt, 0.8)
    ints = struct.unpack(f"<{len(sound) // 2}h", sound)
    find_exact(recorded, struct.pack(f"<{len(ints)}f", *(i / 32768 for i in ints)), fmt)


async def test_mic_at_another_rate_is_resampled_not_exact(
    pulse: audio_env.Pulse, tmp_path: Path
) -> None:
    sound = audio_env.noise(FMT.sample_rate // 2, seed=7)  # 0.5 s at 44100 Hz, stereo
    wav = audio_env.write_wav(tmp_path / "noise.wav", sound)
    fmt = AudioFormat("s16le", 48000, 1)
    recorded = await record_while_playing(pulse, wav, fmt, 1.0)
    samples = struct.unpack(f"<{len(recorded) // 2}h", recorded)
    loud = [i for i, v in enumerate(samples) if abs(v) > 1000]
    assert (loud[-1] - loud[0]) / fmt.sample_rate == pytest.approx(0.5, abs=0.02)


async def test_a_busy_or_impossible_device_is_a_device_error(pulse: audio_env.Pulse) -> None:
    with pytest.raises(DeviceError) as info:
        async with devices.open_input(None, AudioFormat("s16le", 44100, 64), block_frames=882):
            pass  # pragma: no cover
    message = str(info.value)
    assert message.startswith("cannot open the default input device: ")
    assert "input devices: " in message and "'default' (default)" in message
    with pytest.raises(DeviceError, match="no output device matches 'nothing here'"):
        async with devices.open_output("nothing here", FMT):
            pass  # pragma: no cover


async def test_streams_are_closed_on_cancellation(pulse: audio_env.Pulse) -> None:
    recorders, players = streams(pulse, "source-outputs"), streams(pulse, "sink-inputs")
    with trio.move_on_after(0.3):
        async with devices.open_input(None, FMT, block_frames=BLOCK) as mic:
            assert streams(pulse, "source-outputs") == recorders + 1
            async for _ in mic:
                pass
    await wait_for_streams(pulse, "source-outputs", recorders)
    with trio.move_on_after(0.3):
        async with devices.open_output(None, FMT) as speaker:
            assert streams(pulse, "sink-inputs") == players + 1
            while True:
                await speaker.write(bytes(BLOCK * FMT.bytes_per_frame))
    await wait_for_streams(pulse, "sink-inputs", players)


# --- the pulse speaker --------------------------------------------------------------------------


async def play(speaker: devices.Speaker, sound: bytes, piece: int) -> None:
    for start in range(0, len(sound), piece):
        await speaker.write(sound[start : start + piece])


async def test_speaker_plays_exactly_what_is_written(pulse: audio_env.Pulse) -> None:
    sound = audio_env.noise(FMT.sample_rate // 2, seed=2)
    recording = pulse.start_recording_speaker()
    try:
        await trio.sleep(0.2)
        async with devices.open_output(None, FMT) as speaker:
            with trio.fail_after(5):
                await play(speaker, sound, BLOCK * FMT.bytes_per_frame)
                await speaker.drain()
            assert speaker.underruns == 0
            assert speaker.played == speaker.written == len(sound)
    finally:
        recorded = await trio.to_thread.run_sync(recording.stop)
    at = find_exact(recorded, sound, FMT)
    assert recorded[:at].count(0) == at


async def test_speaker_counts_underruns_when_the_writer_stalls(
    pulse: audio_env.Pulse, caplog: pytest.LogCaptureFixture
) -> None:
    first = audio_env.noise(FMT.sample_rate // 5, seed=3)
    second = audio_env.noise(FMT.sample_rate // 5, seed=4)
    caplog.set_level(logging.WARNING, logger="musiclib.devices")
    recording = pulse.start_recording_speaker()
    try:
        await trio.sleep(0.2)
        async with devices.open_output(None, FMT, jitter_ms=40) as speaker:
            with trio.fail_after(5):
                await play(speaker, first, 4400)
                await trio.sleep(0.5)  # the writer stalls: the buffer runs dry
                assert speaker.underruns == 1
                await play(speaker, second, 4400)
                await speaker.drain()
            assert speaker.underruns == 1  # drained to the end: not an underrun
    finally:
        recorded = await trio.to_thread.run_sync(recording.stop)
    assert "speaker ran dry 1 time(s)" in caplog.text
    # both pieces are heard intact, with silence between them (the stall)
    one, two = find_exact(recorded, first, FMT), find_exact(recorded, second, FMT)
    gap = recorded[one + len(first) : two]
    assert gap.count(0) == len(gap) and len(gap) / FMT.bytes_per_second > 0.25  # ~0.5 - 0.2
