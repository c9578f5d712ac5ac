"""Scenario 12: what musiclib adds to a wake word's latency through Wyoming.

The audio: espeak-ng's "okay nabu", REPEATS times, each between 1.5 s and
2.5 s of quiet, 16 kHz mono. The end of a phrase is its last sample louder
than a whisper (RMS over 10 ms), found in the file itself.

* **baseline**: the same microWakeWord detector (tests/wyoming_services.py)
  fed the file in 20 ms chunks, paced as a microphone delivers them (a chunk
  is fed once its last sample's time has come); latency = the detection's
  wall clock minus the moment the phrase's last sample was "captured".
* **musiclib**: the bench writes the same samples, with the same pacing, into
  ``musiclib publish talk --from -``; ``musiclib listen talk --wyoming`` feeds
  the wake service (the same detector behind the reference ``wyoming``
  server classes); latency = when the ``detection`` line is read from the
  listen's standard output minus the moment the phrase's last sample was
  written. The difference of the medians is what musiclib (publish, server
  hub, listen, the Wyoming hop) adds.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import threading
import time
import wave
from pathlib import Path

from bench.common import PYTHON, Row, Scenario, Sizes, median

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "tests" / "wyoming_services.py"
REPEATS = 6
CHUNK = 320  # frames: 20 ms at 16 kHz


def _speech(folder: Path) -> tuple[bytes, list[float]]:
    """The samples and each phrase's end (seconds from the start)."""
    from musiclib.decode import ffmpeg_executable
    from musiclib.wyoming import rms16

    said = folder / "said.wav"
    subprocess.run(["espeak-ng", "-w", str(said), "okay nabu"], check=True)
    raw = subprocess.run(
        [
            ffmpeg_executable(),
            "-loglevel",
            "error",
            "-i",
            str(said),
            "-ar",
            "16000",
            "-ac",
            "1",
            "-f",
            "s16le",
            "-",
        ],
        check=True,
        capture_output=True,
    ).stdout
    last = 0
    for i in range(0, len(raw), 320):  # 10 ms windows
        if rms16(raw[i : i + 320]) >= 300:
            last = i + 320
    quiet = bytes(2 * 16000 * 3 // 2)
    pcm, ends = b"", []
    for _ in range(REPEATS):
        pcm += quiet
        ends.append((len(pcm) + last) / 2 / 16000)
        pcm += raw + quiet[: 2 * 16000]
    return pcm, ends


def _baseline(wav: Path, ends: list[float]) -> list[float]:
    out = subprocess.run(
        [PYTHON, str(SERVICES), "detect-file", str(wav), "--paced"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    start = int(out[0].split()[1]) / 1e9
    times = [int(line.split()[-1]) / 1e9 for line in out[1:] if line.startswith("detection")]
    return _latencies(times, [start + e for e in ends])


def _latencies(detections: list[float], ends: list[float]) -> list[float]:
    """Each phrase's latency: its first detection within 2 s of its end (ms)."""
    found = []
    for end in ends:
        near = [d for d in detections if end - 1.0 <= d <= end + 2.0]
        if near:
            found.append((near[0] - end) * 1000)
    return found


def _through_musiclib(pcm: bytes, ends: list[float], tmp: Path) -> list[float]:
    from bench.servers import musiclib_server

    root = tmp / "root"
    root.mkdir()
    wake = subprocess.Popen(
        [PYTHON, str(SERVICES), "wake"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    procs: list[subprocess.Popen[str]] = [wake]
    try:
        assert wake.stdout is not None
        port = int(wake.stdout.readline().split()[1])
        with musiclib_server(root) as server:
            addr = ["--server", server.address]
            publish = subprocess.Popen(
                [PYTHON, "-m", "musiclib", "publish", "talk", "--from", "-", "-q", *addr],
                stdin=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            procs.append(publish)  # type: ignore[arg-type]
            assert publish.stdin is not None
            silence = bytes(CHUNK * 2)
            for _ in range(50):  # a second of quiet: the channel exists
                publish.stdin.write(silence)
                publish.stdin.flush()
                time.sleep(0.02)
            listen = subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "musiclib",
                    "listen",
                    "talk",
                    "-q",
                    *addr,
                    "--wyoming",
                    f"tcp://127.0.0.1:{port}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            procs.append(listen)
            lines: list[float] = []

            def read() -> None:
                assert listen.stdout is not None
                for line in listen.stdout:
                    if line.startswith("detection"):
                        lines.append(time.time())

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            for _ in range(100):  # two seconds more: the listen is connected both ways
                publish.stdin.write(silence)
                publish.stdin.flush()
                time.sleep(0.02)
            start = time.time()
            t0 = time.monotonic()
            for i in range(0, len(pcm), CHUNK * 2):
                delay = t0 + (i // 2 + CHUNK) / 16000 - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                publish.stdin.write(pcm[i : i + CHUNK * 2])
                publish.stdin.flush()
            time.sleep(2.0)
            return _latencies(list(lines), [start + e for e in ends])
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run(sizes: Sizes) -> Scenario:
    sc = Scenario("12", f"Wyoming: 'okay nabu' x{REPEATS}, end of phrase to detection line")
    try:
        import pymicro_wakeword  # noqa: F401
        import wyoming  # noqa: F401
    except ImportError:
        sc.notes.append("skipped: the voice extra is not installed (pip install -e '.[voice]')")
        return sc
    if shutil.which("espeak-ng") is None:
        sc.notes.append("skipped: espeak-ng is not installed (make system-deps)")
        return sc
    with tempfile.TemporaryDirectory(prefix="bench-wyoming-") as name:
        tmp = Path(name)
        pcm, ends = _speech(tmp)
        wav = tmp / "speech.wav"
        with wave.open(str(wav), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(pcm)
        base = _baseline(wav, ends)
        ours = _through_musiclib(pcm, ends, tmp)
    b = median(base) if base else math.nan
    o = median(ours) if ours else math.nan
    sc.add(Row("detector on the file, paced (baseline): median latency", b, "ms"))
    sc.add(
        Row(
            "publish -> serve -> listen --wyoming -> service: median latency",
            o,
            "ms",
            b,
            "detector on the file",
        )
    )
    sc.add(Row("what musiclib adds (difference of the medians)", o - b, "ms"))
    sc.notes.append(
        f"detected {len(base)}/{REPEATS} phrases from the file, {len(ours)}/{REPEATS} "
        f"through musiclib; latencies (ms) baseline {[round(x) for x in base]}, "
        f"musiclib {[round(x) for x in ours]}"
    )
    sc.raw = {"baseline_ms": base, "musiclib_ms": ours, "repeats": REPEATS}
    del sizes  # one size: the phrase count is fixed
    return sc
