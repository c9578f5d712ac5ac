"""Live channels in Wyoming, against the reference implementation on the other side.

* ``serve --wyoming``: the ``wyoming`` library's ``AsyncTcpClient`` describes
  the endpoint and reads a channel (format, timestamps from the channel's
  clock, ``audio-stop`` at its end, ``select-program``, a slow reader's gap).
* ``listen --wyoming`` (the real CLI): a wake-word service built from the
  library's server classes and pymicro-wakeword (tests/wyoming_services.py)
  hears "okay nabu" spoken by espeak-ng into a channel; a test recogniser
  proves utterances are cut on silence and on ``--duration``; a restarted
  service is connected to again.
* End to end: ``wyoming-satellite`` 1.0.0 with ``--mic-uri`` on musiclib and
  ``--wake-uri`` on the wake service, driven as Home Assistant drives it
  (``describe``, ``run-satellite``), starts a pipeline when the word is spoken.
  It pins wyoming==1.4.1 (the rest of the voice extra needs 1.10.2), so the
  test installs it into a venv of its own under .venv/ (kept between runs).

Everything runs on 127.0.0.1, every wait is bounded; nothing asserts speed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import venv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO, client_env, running_server

wyoming = pytest.importorskip(
    "wyoming", reason="the voice extra is not installed (pip install -e '.[voice]')"
)
pytest.importorskip("pymicro_wakeword", reason="the voice extra is not installed")

from wyoming.audio import AudioChunk, AudioStart  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.event import Event  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402

from musiclib.decode import ffmpeg_executable  # noqa: E402

pytestmark = pytest.mark.e2e

SERVICES = REPO / "tests" / "wyoming_services.py"
WAIT = 60.0  # seconds any one step may take on a busy 2-core box
_WYOMING_LOG = re.compile(r"Wyoming microphones on 127\.0\.0\.1:(\d+)")


# ---------------------------------------------------------------------------- audio


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 kHz mono WAV: 1 s quiet, "okay nabu", 1.5 s quiet, "okay nabu", 1 s quiet."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng is not installed (make system-deps)")
    folder = tmp_path_factory.mktemp("speech")
    said = folder / "said.wav"
    subprocess.run([espeak, "-w", str(said), "okay nabu"], check=True, timeout=WAIT)
    out = folder / "speech.wav"
    quiet = "anullsrc=r=16000:cl=mono"
    graph = "[1]aresample=16000,asplit[s][t];[0][s][2][t][3]concat=n=5:v=0:a=1"
    subprocess.run(
        [
            ffmpeg_executable(), "-loglevel", "error", "-y",
            "-f", "lavfi", "-t", "1", "-i", quiet,
            "-i", str(said),
            "-f", "lavfi", "-t", "1.5", "-i", quiet,
            "-f", "lavfi", "-t", "1", "-i", quiet,
            "-filter_complex", graph,
            "-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le", str(out),
        ],
        check=True,
        timeout=WAIT,
    )  # fmt: skip
    return out


def speech_seconds(wav: Path) -> float:
    import wave

    with wave.open(str(wav)) as w:
        return w.getnframes() / w.getframerate()


# ---------------------------------------------------------------------------- processes


@contextmanager
def service(kind: str, port: int = 0) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A test Wyoming service (tests/wyoming_services.py); killed and reaped after."""
    proc = subprocess.Popen(
        [sys.executable, str(SERVICES), kind, "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = _readline(proc.stdout, WAIT)
        assert line.startswith("READY "), line + (proc.stderr.read() if proc.stderr else "")
        yield proc, int(line.split()[1])
    finally:
        proc.kill()
        proc.wait(timeout=WAIT)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _readline(stream: object, timeout: float) -> str:
    """One line from a text pipe, failing the test after ``timeout`` s."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)  # type: ignore[attr-defined]
    reader.start()
    reader.join(timeout)
    if not box:
        pytest.fail(f"no line within {timeout:g} s")
    return box[0]


@contextmanager
def wyoming_server(
    tmp_path: Path, *channels: str, args: tuple[str, ...] = ()
) -> Iterator[tuple[str, int]]:
    """``musiclib serve`` with ``--channel`` each and ``--wyoming 127.0.0.1:0``:
    (musiclib address, Wyoming port)."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    extra = [a for spec in channels for a in ("--channel", spec)]
    with running_server(root, *extra, "--wyoming", "127.0.0.1:0", *args) as srv:
        port = int(srv.wait_for_log(_WYOMING_LOG, timeout=WAIT).group(1))
        yield srv.address, port


def listen_cli(address: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "musiclib", "listen", *args],
        cwd=REPO,
        env=client_env({"MUSICLIB_SERVER": address}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = WAIT) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout:g} s; stdout {out!r}, stderr {err!r}")
    assert "Traceback" not in err, err
    return proc.returncode, out, err


def run_async(coro: object, timeout: float = WAIT) -> object:
    """Run the reference library's asyncio code, bounded."""

    async def bounded() -> object:
        return await asyncio.wait_for(coro, timeout)  # type: ignore[arg-type]

    return asyncio.run(bounded())


async def read_until(client: AsyncTcpClient, wanted: str, limit: int = 10_000) -> Event:
    for _ in range(limit):
        event = await client.read_event()
        assert event is not None, f"closed before {wanted}"
        if event.type == wanted:
            return event
    raise AssertionError(f"no {wanted} in {limit} events")


SINE = "ffmpeg:-re -f lavfi -i sine=frequency=440:sample_rate=48000"


# ---------------------------------------------------------------------------- the endpoint


def test_describe_lists_channels_as_mic_programs(tmp_path: Path) -> None:
    with wyoming_server(tmp_path, f"hall={SINE}", f"kitchen={SINE}?rate=16000&channels=1",
                        args=("--wyoming-format", "hall=48000/2")) as (_, port):  # fmt: skip

        async def describe() -> Info:
            async with AsyncTcpClient("127.0.0.1", port) as client:
                await client.write_event(Describe().event())
                return Info.from_event(await read_until(client, "info"))

        info = run_async(describe())
    assert isinstance(info, Info)
    mics = {m.name: m for m in info.mic}
    assert set(mics) == {"hall", "kitchen"}
    assert (mics["kitchen"].mic_format.rate, mics["kitchen"].mic_format.width) == (16000, 2)
    assert mics["kitchen"].mic_format.channels == 1
    assert (mics["hall"].mic_format.rate, mics["hall"].mic_format.channels) == (48000, 2)


def test_audio_events_carry_the_format_and_the_channel_clock(tmp_path: Path) -> None:
    # a 48 kHz stereo channel: the endpoint sends it converted to 16 kHz mono
    with wyoming_server(tmp_path, f"hall={SINE}") as (_, port):

        async def read() -> tuple[AudioStart, list[AudioChunk]]:
            async with AsyncTcpClient("127.0.0.1", port) as client:
                start = AudioStart.from_event(await read_until(client, "audio-start"))
                chunks = []
                while len(chunks) < 100:  # two seconds
                    event = await client.read_event()
                    assert event is not None
                    if AudioChunk.is_type(event.type):
                        chunks.append(AudioChunk.from_event(event))
                return start, chunks

        start, chunks = run_async(read())  # type: ignore[misc]
    assert (start.rate, start.width, start.channels) == (16000, 2, 1)
    assert start.timestamp is not None and start.timestamp >= 0
    for chunk in chunks:
        assert (chunk.rate, chunk.width, chunk.channels) == (16000, 2, 1)
        assert any(chunk.audio), "a sine is not silence"
    # each timestamp is its chunk's position in ms: one first position explains them all
    first = chunks[0].timestamp
    assert first is not None and first >= start.timestamp

    def explains(position: int) -> bool:
        for chunk in chunks:
            if chunk.timestamp != position * 1000 // 16000:
                return False
            position += len(chunk.audio) // 2
        return True

    assert any(explains(first * 16 + k) for k in range(16)), [c.timestamp for c in chunks[:5]]


def test_audio_stop_when_the_channel_ends(tmp_path: Path) -> None:
    with wyoming_server(tmp_path, f"short={SINE}:duration=3?rate=16000&channels=1") as (_, port):

        async def read() -> tuple[list[str], Event | None]:
            async with AsyncTcpClient("127.0.0.1", port) as client:
                types = []
                while True:
                    event = await client.read_event()
                    if event is None:
                        return types, None
                    types.append(event.type)
                    if event.type == "audio-stop":
                        last = await client.read_event()
                        return types, last

        types, after = run_async(read())  # type: ignore[misc]
    assert types[0] == "audio-start"
    assert types[-1] == "audio-stop"
    assert set(types[1:-1]) <= {"audio-chunk"}
    assert after is None, "the connection closes after audio-stop"


def test_select_program_switches_channel(tmp_path: Path) -> None:
    channels = (f"a={SINE}?rate=16000&channels=1", f"b={SINE}?rate=16000&channels=1")
    with wyoming_server(tmp_path, *channels) as (_, port):

        async def switch() -> list[str]:
            async with AsyncTcpClient("127.0.0.1", port) as client:
                await read_until(client, "audio-chunk")
                await client.write_event(Event("select-program", {"name": "b"}))
                seen = [(await read_until(client, "audio-stop")).type]
                seen.append((await read_until(client, "audio-start")).type)
                seen.append((await read_until(client, "audio-chunk")).type)
                await client.write_event(Event("select-program", {"name": "nope"}))
                error = await read_until(client, "error")
                seen.append(error.data["code"])
                return seen

        seen = run_async(switch())
    assert seen == ["audio-stop", "audio-start", "audio-chunk", "not_found"]


def test_a_slow_reader_sees_the_gap_in_the_timestamps(tmp_path: Path) -> None:
    """A client that stops reading loses its oldest audio (max latency 200 ms); when it
    reads again, the timestamps jump by what it lost."""
    args = ("--wyoming-latency", "200", "--lag-limit", "60")
    with wyoming_server(tmp_path, f"a={SINE}?rate=16000&channels=1", args=args) as (_, port):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(WAIT)
        sock.connect(("127.0.0.1", port))
        with sock:
            stamps: list[tuple[int, int]] = []
            buf = bytearray()

            def events(count: int) -> None:
                nonlocal buf
                while len(stamps) < count:
                    while b"\n" not in buf:
                        buf += sock.recv(65536)
                    line, _, rest = bytes(buf).partition(b"\n")
                    head = json.loads(line)
                    need = head.get("data_length", 0) + head.get("payload_length", 0)
                    while len(rest) < need:
                        rest += sock.recv(65536)
                    data = json.loads(rest[: head.get("data_length", 0)] or b"{}")
                    buf = bytearray(rest[need:])
                    if head["type"] == "audio-chunk":
                        stamps.append((data["timestamp"], head["payload_length"] // 2))

            events(10)
            time.sleep(8)  # far more than the socket buffers hold at 32 kB/s with a 4 KiB window
            events(len(stamps) + 400)
    jumps = [
        (b[0] - a[0]) - a[1] * 1000 // 16000
        for a, b in itertools.pairwise(stamps)
        if b[0] - a[0] > a[1] * 1000 // 16000 + 1
    ]
    assert jumps, "no gap visible in the timestamps"
    assert sum(jumps) > 1000, jumps  # seconds of audio were dropped, not a rounding


# ---------------------------------------------------------------------------- the client


def test_listen_wyoming_prints_detections(tmp_path: Path, speech: Path) -> None:
    source = f"kitchen=ffmpeg:-re -stream_loop -1 -i {speech}?rate=16000&channels=1"
    with wyoming_server(tmp_path, source) as (address, _), service("wake") as (_, port):
        proc = listen_cli(address, "kitchen", "--wyoming", f"tcp://127.0.0.1:{port}",
                          "--wake", "okay_nabu", "--duration", "12")  # fmt: skip
        code, out, err = finish(proc)
        proc_json = listen_cli(address, "kitchen", "--wyoming", f"tcp://127.0.0.1:{port}",
                               "--json", "--duration", "7")  # fmt: skip
        code_json, out_json, _ = finish(proc_json)
    assert code == 0, err
    lines = out.splitlines()
    # two phrases per loop of about 5 s: at least two in 12 s
    assert len(lines) >= 2, (out, err)
    times = []
    for line in lines:
        match = re.fullmatch(r"detection okay_nabu at (\d+\.\d\d) s", line)
        assert match, line
        times.append(float(match.group(1)))
    assert times == sorted(times)
    assert code_json == 0
    answers = [json.loads(line) for line in out_json.splitlines()]
    assert answers and all(a["type"] == "detection" and a["name"] == "okay_nabu" for a in answers)


def test_listen_wyoming_reconnects_when_the_service_restarts(tmp_path: Path, speech: Path) -> None:
    source = f"kitchen=ffmpeg:-re -stream_loop -1 -i {speech}?rate=16000&channels=1"
    with wyoming_server(tmp_path, source) as (address, _):
        with service("wake") as (_first, port):
            proc = listen_cli(address, "kitchen", "--wyoming", f"tcp://127.0.0.1:{port}",
                              "--duration", "25")  # fmt: skip
            assert proc.stdout is not None
            assert _readline(proc.stdout, WAIT).startswith("detection okay_nabu")
        # the first service is gone (killed); a new one on the same port
        with service("wake", port) as (_second, _):
            assert _readline(proc.stdout, WAIT).startswith("detection okay_nabu")
            code, _, err = finish(proc)
    assert code == 0, err
    assert "connecting again" in err


def test_transcribe_cuts_utterances_on_silence_and_duration(tmp_path: Path, speech: Path) -> None:
    source = f"talk=ffmpeg:-re -i {speech}?rate=16000&channels=1"
    with wyoming_server(tmp_path, source) as (address, _), service("asr") as (_, port):
        proc = listen_cli(address, "talk", "--wyoming", f"tcp://127.0.0.1:{port}", "--transcribe")
        code, out, err = finish(proc)
    assert code == 0, err
    pattern = re.compile(
        r"transcript: (\d+) samples at 16000 Hz 2 bytes 1 ch from (\d+) ms "
        r"\(transcribe asked: True\)"
    )
    said = [pattern.fullmatch(line) for line in out.splitlines()]
    assert len(said) == 2 and all(said), out
    for match in said:
        assert match is not None
        samples = int(match.group(1))
        # a phrase (under 1.5 s), its preroll and the quiet that ended it; not the 1.5 s
        # pause and the next phrase
        assert 0.7 * 16000 < samples < 2.6 * 16000, out

    source = f"talk=ffmpeg:-re -i {speech}?rate=16000&channels=1"
    with wyoming_server(tmp_path, source) as (address, _), service("asr") as (_, port):
        proc = listen_cli(address, "talk", "--wyoming", f"tcp://127.0.0.1:{port}",
                          "--transcribe", "--duration", "0.5")  # fmt: skip
        code, out, err = finish(proc)
    assert code == 0, err
    counts = [int(m.group(1)) for m in re.finditer(r"transcript: (\d+) samples", out)]
    assert counts and counts.count(8000) >= 2, out  # cut at exactly 0.5 s


def test_listen_wyoming_errors_are_one_line(tmp_path: Path) -> None:
    with wyoming_server(tmp_path, f"a={SINE}?rate=16000&channels=1") as (address, _):
        with service("asr") as (_, port):
            code, _out, err = finish(
                listen_cli(address, "a", "--wyoming", f"tcp://127.0.0.1:{port}")
            )
        assert code == 4, err
        assert err.strip().count("\n") == 0 and "offers no wake-word detection" in err
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        with free:
            dead = free.getsockname()[1]
        code, _, err = finish(listen_cli(address, "a", "--wyoming", f"tcp://127.0.0.1:{dead}"))
        assert code == 3 and "cannot connect" in err, err
        code, _, err = finish(listen_cli(address, "a", "--wyoming", "http://x"))
        assert code == 2 and "tcp://HOST:PORT" in err, err


# ---------------------------------------------------------------------------- the satellite

SATELLITE = "wyoming-satellite==1.0.0"


@pytest.fixture(scope="module")
def satellite_python() -> Path:
    """A venv with wyoming-satellite 1.0.0 (which pins wyoming==1.4.1), made once."""
    home = REPO / ".venv" / "wyoming-satellite-1.0.0"
    python = home / "bin" / "python"
    if not (home / ".installed").exists():
        if not (REPO / ".venv").is_dir():
            pytest.skip("no .venv to keep the satellite's venv in")
        shutil.rmtree(home, ignore_errors=True)
        venv.create(home, with_pip=True)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", SATELLITE],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot install {SATELLITE}: {done.stderr.strip()[-300:]}")
        (home / ".installed").touch()
    return python


def test_satellite_hears_the_wake_word_through_musiclib(
    tmp_path: Path, speech: Path, satellite_python: Path
) -> None:
    source = f"kitchen=ffmpeg:-re -stream_loop -1 -i {speech}?rate=16000&channels=1"
    with wyoming_server(tmp_path, source) as (_, mic_port), service("wake") as (_wake, wake_port):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        sat_port = probe.getsockname()[1]
        probe.close()
        sat = subprocess.Popen(
            [
                str(satellite_python), "-m", "wyoming_satellite",
                "--name", "musiclib test", "--uri", f"tcp://127.0.0.1:{sat_port}",
                "--mic-uri", f"tcp://127.0.0.1:{mic_port}",
                "--wake-uri", f"tcp://127.0.0.1:{wake_port}", "--wake-word-name", "okay_nabu",
                "--no-zeroconf", "--debug",
            ],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            events = run_async(_drive_like_home_assistant(sat_port), timeout=2 * WAIT)
        finally:
            sat.send_signal(signal.SIGTERM)
            try:
                sat.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                sat.kill()
                sat.wait()
            if sat.stderr is not None:
                sat.stderr.close()
    assert isinstance(events, list)
    kinds = [e.type for e in events]
    assert "run-pipeline" in kinds, kinds
    pipeline = events[kinds.index("run-pipeline")]
    assert pipeline.data["start_stage"] == "asr"  # the wake word was heard on the satellite
    after = [AudioChunk.from_event(e) for e in events[kinds.index("run-pipeline") :]
             if e.type == "audio-chunk"]  # fmt: skip
    assert after and all((c.rate, c.width, c.channels) == (16000, 2, 1) for c in after)


async def _drive_like_home_assistant(port: int) -> list[Event]:
    """What Home Assistant's Wyoming integration does: connect (again until the satellite
    listens), ``describe``, then ``run-satellite``; then read what the satellite streams."""
    from wyoming.satellite import RunSatellite

    for _ in range(600):
        try:
            client = AsyncTcpClient("127.0.0.1", port)
            await client.connect()
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the satellite never listened")
    try:
        await client.write_event(Describe().event())
        info = Info.from_event(await read_until(client, "info"))
        assert info.satellite is not None
        await client.write_event(RunSatellite().event())
        events: list[Event] = []
        while True:
            event = await client.read_event()
            assert event is not None, "the satellite closed"
            events.append(event)
            chunks_after = sum(1 for e in events if e.type == "audio-chunk")
            if any(e.type == "run-pipeline" for e in events) and chunks_after >= 10:
                return events
    finally:
        await client.disconnect()


def test_voice_packages_are_not_runtime_dependencies() -> None:
    """`make serve` installs the runtime only: the voice packages live in extras."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    assert "wyoming" not in runtime and "pymicro" not in runtime
    assert any(d.startswith("wyoming==") for d in project["optional-dependencies"]["voice"])
