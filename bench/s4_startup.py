"""Scenario 4: how long the CLI takes to be useful.

* The bare interpreter: ``python -c pass`` (the venv's), wall time, median of N runs. Every
  other figure here includes one interpreter start-up; the issue's target is stated
  "after the interpreter is up", so this is subtracted where the target applies.
* ``python -c "import musiclib.cli"``: what importing the CLI costs on top.
* ``musiclib play TRACK --player CMD``: from launching the command to the first byte read
  by the player. CMD is a bash one-liner that reads one byte with ``head -c 1``, writes
  ``$EPOCHREALTIME`` to a file and drains the rest; the difference from the launch time
  (same wall clock) is the figure. The player's own start-up (bash and head reading a
  byte that is already waiting) is measured separately and shown, not subtracted.
* the same with ``--decode`` (the server starts an ffmpeg first): for information.
* ``musiclib ls`` against a running server: wall time.

The server runs throughout with its index complete, serving the 40 s MP3. Where Python's
``-X importtime`` is available its per-package totals go into the notes: that is where
the CLI's start-up goes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import trio

from bench import data
from bench.common import MUSICLIB, PYTHON, REPO, Row, Scenario, Sizes, Target, median
from bench.servers import musiclib_server, wait_indexed

FIRST_BYTE = Target("<= 100 ms", "value", "<=", 100.0)


def wall_ms(argv: list[str]) -> float:
    """Wall time of one run of ``argv`` to its exit, in ms; it must succeed."""
    began = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = (time.perf_counter() - began) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:3]} exited {done.returncode}: {done.stderr.decode()[-300:]}")
    return elapsed


def player_spec(stamp: Path) -> str:
    """A player that stamps the wall time of its first byte into ``stamp``, then drains."""
    script = f"head -c 1 >/dev/null; echo $EPOCHREALTIME > {shlex.quote(str(stamp))}; "
    script += "exec cat >/dev/null"
    return f"bash -c {shlex.quote(script)}"


def read_stamp(stamp: Path) -> float:
    return float(stamp.read_text().strip().replace(",", "."))


def first_byte_ms(argv: list[str], stamp: Path) -> float:
    """Launch ``argv`` (musiclib play ...); ms from the launch to the player's stamp."""
    stamp.unlink(missing_ok=True)
    launched = time.time()
    wall_ms(argv)
    return (read_stamp(stamp) - launched) * 1000


def player_floor_ms(stamp: Path) -> float:
    """The player alone, its byte already waiting in the pipe: launch to stamp, ms."""
    stamp.unlink(missing_ok=True)
    launched = time.time()
    argv = shlex.split(player_spec(stamp))
    done = subprocess.run(argv, input=b"x", stdout=subprocess.DEVNULL, timeout=30, check=True)
    assert done.returncode == 0
    return (read_stamp(stamp) - launched) * 1000


def import_profile() -> dict[str, float]:
    """``-X importtime`` self times of ``import musiclib.cli``, summed per top-level package."""
    done = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", "import musiclib.cli"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    totals: dict[str, float] = defaultdict(float)
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or "self" in line:
            continue
        self_us = float(parts[0].split(":")[1])
        totals[parts[2].strip().split(".")[0]] += self_us / 1000
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def run(sizes: Sizes) -> Scenario:
    n = sizes.startup_runs
    sc = Scenario("4", f"CLI start-up: first byte at the player, ls (median of {n})")
    if shutil.which("bash") is None:
        sc.notes.append("play figures skipped: bash (the stamping player) is not installed")
    track = data.paced_track()
    interp = median([wall_ms([PYTHON, "-c", "pass"]) for _ in range(n)])
    imports = median([wall_ms([PYTHON, "-c", "import musiclib.cli"]) for _ in range(n)])
    with (
        tempfile.TemporaryDirectory(prefix="bench-play-") as tmp,
        musiclib_server(track.root) as server,
    ):
        trio.run(wait_indexed, server.address, 1)
        addr = ["--server", server.address]
        stamp = Path(tmp) / "first-byte"
        ls = median([wall_ms([MUSICLIB, "ls", *addr]) for _ in range(n)])
        play = decoded = floor = None
        if shutil.which("bash"):
            spec = player_spec(stamp)
            argv = [MUSICLIB, "play", track.name, "--player", spec, *addr]
            play = median([first_byte_ms(argv, stamp) for _ in range(n)])
            decoded = median([first_byte_ms([*argv, "--decode"], stamp) for _ in range(n)])
            floor = median([player_floor_ms(stamp) for _ in range(n)])
    label = "python -c pass"

    def up(value: float | None) -> float | None:
        return None if value is None else value - interp

    rows = [
        Row("interpreter start-up (python -c pass)", interp, "ms"),
        Row("python -c 'import musiclib.cli'", imports, "ms", interp, label),
        Row("play: launch to first byte at the player", play, "ms", interp, label),
        Row("play: first byte, after the interpreter is up", up(play), "ms", target=FIRST_BYTE),
        Row("play --decode: first byte, after the interpreter", up(decoded), "ms"),
        Row("the player's own start-up (bash + head)", floor, "ms"),
        Row("ls: wall time", ls, "ms", interp, label),
    ]
    for row in rows:
        sc.add(row)
    profile = import_profile()
    top = ", ".join(f"{k} {v:.0f} ms" for k, v in list(profile.items())[:6])
    sc.notes.append(f"import musiclib.cli, self time by package (-X importtime): {top}")
    sc.raw = {"import_ms_by_package": profile, "runs": n, "pid": os.getpid()}
    return sc
