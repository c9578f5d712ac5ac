"""End to end: live audio through real (virtual) sound devices, server and CLI as processes.

No mocks of PortAudio or of the server. The devices are those of tests/audio_env.py: a
private PulseAudio daemon whose null sink ``mic`` is the default input (``paplay`` plays
into it) and whose null sink ``spk`` is the default output (``parec`` records its
monitor), and an ALSA ``type file`` PCM, ``filemic``, that records a file's bytes in real
time (clocked by pulse). At the null sinks' own format (s16le, 44100 Hz, stereo) pulse
passes every sample untouched, and the file device gives the file's bytes in any format,
so every test here compares samples byte for byte, not by ear.

Each test asks for the ``pulse`` (and ``alsa_file_input``) fixtures, so without
PulseAudio or PortAudio the whole file skips with the fixtures' one reason.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import audio_env
import pytest
import trio
from conftest import STOP_TIMEOUT, run_cli
from live_support import (
    IO_TIMEOUT,
    POLL,
    Finished,
    Heard,
    alive,
    cli_process,
    ffmpeg_children,
    finish,
    hear,
    live_server,
    run_cli_async,
    wait_for_channel,
)

from musiclib.client import open_client
from musiclib.decode import AudioFormat
from musiclib.protocol import Audio

pytestmark = pytest.mark.e2e

#: the null sinks' format: what pulse passes untouched both ways
PULSE = audio_env.PULSE_FORMAT
#: a microphone channel's default format (16 kHz mono s16le), what the file device records
SPEECH = AudioFormat("s16le", 16000, 1)


# ---------------------------------------------------------------------------- comparing


def find_exact(recorded: bytes, sound: bytes, fmt: AudioFormat, what: str) -> int:
    """Where ``sound`` lies byte for byte inside ``recorded`` (a frame boundary)."""
    at = recorded.find(sound)
    if at < 0:
        probe = sound[: 4 * fmt.bytes_per_frame * 64]
        near = recorded.find(probe)
        hint = "not even its first 64 frames" if near < 0 else f"its start at byte {near}"
        pytest.fail(f"{what}: the sound is not in it byte for byte ({hint} of {len(recorded)})")
    assert at % fmt.bytes_per_frame == 0, f"{what}: found at byte {at}, not a frame boundary"
    return at


def silent(data: bytes) -> bool:
    return data.count(0) == len(data)


# ---------------------------------------------------------------------------- the API client


# ---------------------------------------------------------------------------- processes


def recorders(pulse: audio_env.Pulse) -> list[int]:
    """The process ids of the daemon's recording streams (source-outputs), one per stream."""
    text = pulse.pactl("list", "source-outputs")
    return [int(pid) for pid in re.findall(r'application\.process\.id = "(\d+)"', text)]


async def wait_for_recorders(
    pulse: audio_env.Pulse, check: Callable[[list[int]], bool], timeout: float = 5.0
) -> list[int]:
    """Poll the daemon's recording streams until ``check`` holds for their pids."""
    found: list[int] = []
    with trio.move_on_after(timeout):
        while True:
            found = await trio.to_thread.run_sync(recorders, pulse)
            if check(found):
                return found
            await trio.sleep(POLL)
    pytest.fail(f"the pulse daemon's recording streams stayed those of the pids {found}")


# ============================================================================ 1. a file microphone


async def test_fifty_listeners_of_a_virtual_microphone_hear_its_file_exactly(
    pulse: audio_env.Pulse,
    alsa_file_input: Callable[..., audio_env.FileInput],
    start_server: Any,
    tmp_path: Path,
) -> None:
    """``kitchen=mic:filemic?rate=16000&channels=1`` on the paced ALSA file device.

    45 API listeners and 5 ``musiclib listen`` processes, all listening at once, join
    with preroll and ask for the first 4 s: every one starts at position 0, gets no
    gap, and every byte is the file's own from its first frame (position p is frame p
    of the file). All API listeners got the very same chunks (positions, capture
    times, bytes), one every 20 ms of capture time.
    """
    sound = audio_env.noise(3 * SPEECH.sample_rate, SPEECH, seed=21)  # 3 s of noise
    # then silence, far longer than the test runs: past its end the device would give
    # stale bytes of its ring buffer
    data = sound + bytes(45 * SPEECH.bytes_per_second)
    device = alsa_file_input(data, paced=True)
    opened = time.time_ns()
    srv = live_server(start_server, tmp_path, f"kitchen=mic:{device.name}?rate=16000&channels=1")
    seconds = 4
    frames = seconds * SPEECH.sample_rate
    want = data[: frames * SPEECH.bytes_per_frame]
    api_count, cli_count = 45, 5
    heard: list[Heard] = []
    outputs: list[Finished] = []

    async def api_listener() -> None:
        heard.append(await hear(srv.address, "kitchen", preroll_ms=10_000, frames=frames))

    async def cli_listener() -> None:
        args = ("listen", "kitchen", "--format", "s16le", "--preroll", "10000")
        outputs.append(await run_cli_async(*args, "--duration", str(seconds), server=srv.address))

    most = 0

    async def count_listeners() -> None:
        nonlocal most
        async with open_client(srv.address, timeout=IO_TIMEOUT, version=2) as client:
            while True:
                (info,) = await client.channels()
                most = max(most, info.listeners)
                await trio.sleep(POLL)

    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as outer:
            outer.start_soon(count_listeners)
            async with trio.open_nursery() as nursery:
                for _ in range(cli_count):
                    nursery.start_soon(cli_listener)
                for _ in range(api_count):
                    nursery.start_soon(api_listener)
            outer.cancel_scope.cancel()

    assert len(heard) == api_count and len(outputs) == cli_count
    assert most == api_count + cli_count, f"at most {most} listeners at once"
    first = heard[0]
    for n, listen in enumerate(heard):
        assert listen.start.position == 0, (
            f"API listener {n} started at {listen.start.position}: joined more than 10 s "
            "after the server opened the device?"
        )
        assert (listen.start.sample_rate, listen.start.channels) == (16000, 1)
        assert listen.start.source == "mic:filemic" and not listen.start.converted
        assert listen.end is not None
        assert (listen.end.reason, listen.end.frames, listen.end.lost) == ("complete", frames, 0)
        listen.assert_contiguous_audio()
        assert listen.events == first.events, f"API listener {n} differs from listener 0"
    chunks = [e for e in first.events if isinstance(e, Audio)]
    assert all(len(c.payload) == 320 * SPEECH.bytes_per_frame for c in chunks)  # 20 ms
    samples = first.samples()
    if samples != want:
        at = samples.find(sound[:4096])
        pytest.fail(
            f"the channel is not the file from its first frame: the file's start is at byte "
            f"{at} of the channel (-1: nowhere); equal bytes: "
            f"{sum(a == b for a, b in zip(samples, want, strict=True))} of {len(want)}"
        )
    # captured in real time, after the server opened the device, stamped 20 ms apart
    span_ns = chunks[-1].time_ns - chunks[0].time_ns
    assert span_ns / 1e9 == pytest.approx((len(chunks) - 1) * 0.02, abs=0.15)
    assert chunks[0].time_ns > opened
    for n, out in enumerate(outputs):
        assert out.returncode == 0, out.stderr
        line = out.summary()
        assert line.startswith(f"musiclib: kitchen: {frames} frames ({seconds:.2f} s)"), line
        assert line.endswith("(the requested frames were sent)"), line
        assert out.stdout == want, f"CLI listener {n}: not the file's first {seconds} s exactly"


# ============================================================================ 2. the pulse mic


async def test_a_pulse_microphone_channel_carries_a_burst_exactly(
    pulse: audio_env.Pulse, start_server: Any, tmp_path: Path
) -> None:
    """``kitchen=mic?rate=44100&channels=2`` (the default input, pulse's ``mic``): a
    burst of noise played into the microphone reaches a listener byte for byte,
    with the microphone's silence before and after it and no gap anywhere."""
    burst = audio_env.noise(PULSE.sample_rate // 2, seed=22)  # 0.5 s
    wav = audio_env.write_wav(tmp_path / "burst.wav", burst)
    srv = live_server(start_server, tmp_path, "kitchen=mic?rate=44100&channels=2")
    joined, done = trio.Event(), trio.Event()
    results: dict[str, Heard] = {}

    async def listener() -> None:
        results["api"] = await hear(
            srv.address, "kitchen", until=done, joined=joined, max_latency_ms=2000
        )

    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener)
            await joined.wait()
            await trio.to_thread.run_sync(pulse.play_into_mic, wav)
            await trio.sleep(0.5)
            done.set()

    heard = results["api"]
    assert (heard.start.sample_rate, heard.start.channels) == (44100, 2)
    assert heard.start.source == "mic" and not heard.start.converted
    assert heard.end is not None and (heard.end.reason, heard.end.lost) == ("stopped", 0)
    heard.assert_contiguous_audio()
    recorded = heard.samples()
    at = find_exact(recorded, burst, PULSE, "the listener's audio")
    assert silent(recorded[:at]) and silent(recorded[at + len(burst) :])
    assert len(recorded) - len(burst) >= PULSE.bytes_per_second // 4  # silence around it


# ============================================================================ 3. the speaker


async def test_listen_on_the_speaker_plays_the_channel_exactly(
    pulse: audio_env.Pulse, start_server: Any, tmp_path: Path
) -> None:
    """``musiclib listen hall --speaker`` (the default output: pulse's ``spk``) of a
    channel published from a 44.1 kHz stereo WAV file: what ``spk.monitor`` hears holds
    the file's samples byte for byte, and the listen exits 0 when the publisher ends."""
    sound = audio_env.noise(3 * PULSE.sample_rate // 2, seed=23)  # 1.5 s
    wav = audio_env.write_wav(tmp_path / "x.wav", sound)
    srv = live_server(start_server, tmp_path)
    recording = pulse.start_recording_speaker()
    try:
        with trio.fail_after(IO_TIMEOUT):
            async with cli_process("publish", "hall", "--from", wav, server=srv.address) as pub:
                await wait_for_channel(srv.address, "hall")
                # the preroll brings the audio sent before it joined; the latency bound is
                # high enough for all of it to wait at the server instead of being dropped
                args = ("--speaker", "--preroll", "10000", "--max-latency", "10000")
                async with cli_process("listen", "hall", *args, server=srv.address) as listen:
                    listened = await finish(listen)
                published = await finish(pub)
    finally:
        recorded = await trio.to_thread.run_sync(recording.stop)
    assert published.returncode == 0, published.stderr
    assert published.summary() == "musiclib: hall: published 66150 frames (1.50 s) from x.wav"
    assert listened.returncode == 0, listened.stderr
    line = listened.summary()
    assert line.startswith("musiclib: hall: 66150 frames (1.50 s), latency median "), line
    assert line.endswith("(channel 'hall': the publisher ended)"), line
    at = find_exact(recorded, sound, PULSE, "spk.monitor")
    assert silent(recorded[:at]) and silent(recorded[at + len(sound) :])


async def test_a_stalled_channel_makes_the_speaker_run_dry_and_says_so(
    pulse: audio_env.Pulse, start_server: Any, tmp_path: Path
) -> None:
    """A publisher (standard input) that stalls for 0.6 s between two pieces: the speaker
    plays both pieces exactly with silence between, and the listen reports the one
    underrun on standard error."""
    first = audio_env.noise(PULSE.sample_rate * 3 // 10, seed=24)  # 0.3 s each
    second = audio_env.noise(PULSE.sample_rate * 3 // 10, seed=25)
    srv = live_server(start_server, tmp_path)
    args = ("--from=-", "--rate", "44100", "--channels", "2")
    recording = pulse.start_recording_speaker()
    try:
        with trio.fail_after(IO_TIMEOUT):
            async with cli_process(
                "publish", "hall", *args, server=srv.address, stdin=subprocess.PIPE
            ) as pub:
                await wait_for_channel(srv.address, "hall")
                async with cli_process("listen", "hall", "--speaker", server=srv.address) as lis:
                    await wait_for_channel(srv.address, "hall", listeners=1)
                    assert pub.stdin is not None
                    await pub.stdin.send_all(first)
                    await trio.sleep(0.6)  # the source stalls: the speaker runs dry
                    await pub.stdin.send_all(second)
                    await pub.stdin.aclose()
                    published = await finish(pub)
                    listened = await finish(lis)
    finally:
        recorded = await trio.to_thread.run_sync(recording.stop)
    assert published.returncode == 0, published.stderr
    assert listened.returncode == 0, listened.stderr
    lines = listened.lines()
    assert "musiclib: the speaker ran dry 1 times (underruns)" in lines, listened.stderr
    assert lines[-1].startswith("musiclib: hall: 26460 frames (0.60 s)"), listened.stderr
    one = find_exact(recorded, first, PULSE, "spk.monitor, the first piece")
    two = find_exact(recorded, second, PULSE, "spk.monitor, the second piece")
    gap = recorded[one + len(first) : two]
    # the stall (0.6 s) less the first piece's 0.3 s, give or take the buffers' latency
    assert silent(gap) and len(gap) / PULSE.bytes_per_second > 0.2, len(gap)


# ============================================================================ 4. publish --from mic


async def test_publish_from_the_pulse_microphone_arrives_exactly(
    pulse: audio_env.Pulse, start_server: Any, tmp_path: Path
) -> None:
    """``musiclib publish hall --from mic --rate 44100 --channels 2`` while a burst is
    played into the microphone: a listener of ``hall`` gets the burst byte for byte;
    Ctrl-C ends the publish cleanly, and the listener hears that the publisher left."""
    burst = audio_env.noise(PULSE.sample_rate // 2, seed=26)
    wav = audio_env.write_wav(tmp_path / "burst.wav", burst)
    srv = live_server(start_server, tmp_path)
    args = ("--from", "mic", "--rate", "44100", "--channels", "2")
    joined = trio.Event()
    results: dict[str, Heard] = {}

    async def listener() -> None:
        results["api"] = await hear(
            srv.address, "hall", joined=joined, retry=True, max_latency_ms=2000
        )

    with trio.fail_after(IO_TIMEOUT):
        async with (
            cli_process("publish", "hall", *args, server=srv.address) as pub,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(listener)
            await joined.wait()
            # the channel exists as soon as the publisher connected; its audio starts
            # when the publisher's microphone is open: play only once it is recording
            await wait_for_channel(srv.address, "hall", position=1)
            await trio.to_thread.run_sync(pulse.play_into_mic, wav)
            await trio.sleep(0.5)
            pub.send_signal(signal.SIGINT)
            published = await finish(pub)

    assert published.returncode == 0, published.stderr
    match = re.fullmatch(
        r"musiclib: hall: published (\d+) frames \([\d.]+ s\) from mic", published.summary()
    )
    assert match, published.stderr
    heard = results["api"]
    assert (heard.start.sample_rate, heard.start.channels) == (44100, 2)
    assert heard.start.source == "publish:mic"
    assert heard.end is not None
    assert (heard.end.reason, heard.end.lost) == ("publisher_left", 0), heard.end
    assert heard.end.message == "channel 'hall': the publisher ended"
    heard.assert_contiguous_audio()
    # the listener heard everything from where it joined to the publisher's last frame
    assert heard.start.position + heard.end.frames == int(match.group(1))
    recorded = heard.samples()
    at = find_exact(recorded, burst, PULSE, "the listener's audio")
    assert silent(recorded[:at]) and silent(recorded[at + len(burst) :])


# ============================================================================ 5. naming devices


def named(devices: list[dict[str, Any]], kind: str) -> str:
    """The ``kind`` devices as a DeviceError names them: ``0: 'pulse', 1: 'default' (default)``."""
    return ", ".join(
        f"{d['index']}: {d['name']!r}" + (" (default)" if d[f"is_default_{kind}"] else "")
        for d in devices
        if d[f"max_{kind}_channels"] > 0
    )


def test_devices_lists_pulse_and_a_missing_device_is_one_line(
    pulse: audio_env.Pulse, tmp_path: Path
) -> None:
    """``musiclib devices`` shows the pulse daemon's devices; a device that does not exist
    stops ``serve`` before it listens and ``listen --speaker`` before it connects, with
    exit status 8 and one line naming the devices there are."""
    listed = run_cli("devices", "--json")
    assert listed.returncode == 0, listed.stderr
    found = [json.loads(line) for line in listed.stdout.decode().splitlines()]
    by_name = {d["name"]: d for d in found}
    assert {"pulse", "default"} <= set(by_name), found
    assert by_name["default"]["is_default_input"] and by_name["default"]["is_default_output"]
    assert by_name["default"]["hostapi"] == "ALSA"
    table = run_cli("devices")
    assert table.returncode == 0, table.stderr
    rows = table.stdout.decode().splitlines()
    assert rows[0].split() == ["#", "NAME", "API", "IN", "OUT", "RATE"], rows
    assert len(rows) == 1 + len(found)
    assert re.fullmatch(
        r"\d+\s+default\s+ALSA\s+\d+\s+\d+\s+\d+\s+default input default output",
        next(r for r in rows if " default " in r),
    ), rows

    root = tmp_path / "root"
    root.mkdir()
    serve = run_cli("serve", "--root", root, "--port", "0", "--channel", "x=mic:nonexistent")
    assert serve.returncode == 8, serve.stderr
    assert serve.stderr.strip().splitlines() == [
        "musiclib: no input device matches 'nonexistent'; input devices: " + named(found, "input")
    ]

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        done = run_cli("listen", "kitchen", "--speaker", "--device", "nope", server=address)
        assert done.returncode == 8, done.stderr
        assert done.stderr.strip().splitlines() == [
            "musiclib: no output device matches 'nope'; output devices: " + named(found, "output")
        ]
        with pytest.raises(BlockingIOError):
            listener.accept()  # it never connected


# ============================================================================ 6. shutdown


async def test_sigterm_with_devices_open_ends_everything_and_closes_the_mic(
    pulse: audio_env.Pulse, start_server: Any, tmp_path: Path
) -> None:
    """A server with a microphone channel, a converter (a listener at 8 kHz), a native
    API listener, a CLI listener and ``publish --from mic``: SIGTERM makes the server
    exit 0 in time, every listen ends with ``shutdown``, the publisher exits with the
    one line saying so, no ffmpeg is left, and no recording stream of the server or
    the publisher is left on the pulse daemon."""
    before = await trio.to_thread.run_sync(recorders, pulse)  # the fixture's keepers
    srv = live_server(start_server, tmp_path, "kitchen=mic")
    server_pid = srv.process.pid
    results: dict[str, Any] = {}
    with trio.fail_after(IO_TIMEOUT):
        async with (
            cli_process("publish", "hall", "--from", "mic", server=srv.address) as pub,
            cli_process("listen", "kitchen", "--format", "s16le", server=srv.address) as lis,
            trio.open_nursery() as nursery,
        ):

            async def api(name: str, channel: str, **request: Any) -> None:
                results[name] = await hear(srv.address, channel, retry=True, **request)

            async def cli(name: str, process: trio.Process) -> None:
                results[name] = await finish(process)

            nursery.start_soon(cli, "pub", pub)
            nursery.start_soon(cli, "cli", lis)
            nursery.start_soon(api, "native", "kitchen")
            nursery.start_soon(functools.partial(api, "converted", "kitchen", sample_rate=8000))
            nursery.start_soon(api, "hall", "hall")
            # kitchen: the native API listener, the CLI one, the converter and its listener
            await wait_for_channel(srv.address, "kitchen", listeners=4)
            await wait_for_channel(srv.address, "hall", listeners=1)
            converters = ffmpeg_children(server_pid)
            assert len(converters) == 1, converters
            # the server and the publisher each record from the pulse microphone
            await wait_for_recorders(pulse, lambda pids: server_pid in pids and pub.pid in pids)

            started = time.monotonic()
            status = await trio.to_thread.run_sync(srv.stop)
            stopped_in = time.monotonic() - started
    assert status == 0, srv.log()
    assert stopped_in < STOP_TIMEOUT
    for name in ("native", "converted", "hall"):
        end = results[name].end
        assert end is not None and end.reason == "shutdown", (name, end)
        assert end.message == "the server is shutting down"
    assert results["converted"].start.converted and results["converted"].start.sample_rate == 8000
    cli = results["cli"]
    assert cli.returncode == 0, cli.stderr
    assert cli.summary().endswith("(the server is shutting down)"), cli.stderr
    published = results["pub"]
    assert published.returncode == 3, published.stderr
    assert published.summary() == "musiclib: the server is shutting down"
    assert [pid for pid in converters if alive(pid)] == []
    # every recording stream left is one of the keepers there were before
    await wait_for_recorders(pulse, lambda pids: sorted(pids) == sorted(before))
    assert "Traceback" not in srv.log(), srv.log()
