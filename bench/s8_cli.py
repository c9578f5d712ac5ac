"""Scenario 8: a CLI that answers at once (issue 15, item 2).

Every figure is a median of N runs, wall time from launching a process (``time.time()`` in
this process, the same clock the player stamps with) to its exit or to the player's first
byte, next to the bare interpreter measured in the same run:

* baselines: ``python -c pass`` (the venv's interpreter) and ``python -c "import trio"``;
* ``python -c "import musiclib.cli"``;
* ``musiclib ls`` on the shipped library (``library/``, 10 tracks) against a running server,
  standard output a pipe (the plain table); target at most 150 ms;
* ``musiclib play TRACK --pipe --player CMD``: launch to the first byte the player reads from
  its standard input. CMD is bash running ``head -c 1`` and stamping ``$EPOCHREALTIME`` into a
  file (scenario 4's player); ``--pipe`` so the figure is musiclib's path to the player's
  stdin, not an HTTP player's start-up. Target at most 120 ms;
* the same ``play`` with a player that does not exist: it exits (status 6) right where it
  would connect, after every import and the parse, so the difference to the row above is
  what the network, the server and the player's start take;
* ``musiclib ls`` once more without a bytecode cache, for information.

The bytecode cache. Users' installs have one (pip compiles what it installs; an editable
install writes it on first run), but this environment sets ``PYTHONDONTWRITEBYTECODE=1``, so
musiclib's own modules would be compiled from source at every launch (about 25 ms of
``compile()`` here). The scenario therefore gives every command a private
``PYTHONPYCACHEPREFIX`` (the working tree is not written), filled by one warm-up run of each
command, and measures with it; the last row shows ``ls`` as this environment runs it, musiclib
compiled at each launch.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from bench.common import MUSICLIB, PYTHON, REPO, Row, Scenario, Sizes, Target, median
from bench.servers import musiclib_server, wait_indexed

LS = Target("<= 150 ms", "value", "<=", 150.0)
FIRST_BYTE = Target("<= 120 ms", "value", "<=", 120.0)
#: the shipped library and the track ``play`` fetches from it (its original bytes)
LIBRARY = REPO / "library"
TRACK = "Brume"
TRACKS = 10


def run_ms(argv: list[str], env: dict[str, str], status: int = 0) -> float:
    """Launch ``argv``, wait for it, ms from launch to exit; it must exit with ``status``."""
    began = time.time()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, timeout=60)
    elapsed = (time.time() - began) * 1000
    if done.returncode != status:
        raise RuntimeError(f"{argv[:3]} exited {done.returncode}: {done.stderr.decode()[-300:]}")
    return elapsed


def first_byte_ms(argv: list[str], env: dict[str, str], stamp: Path) -> float:
    """Launch ``argv`` (a ``play``); ms from the launch to the player's stamp."""
    stamp.unlink(missing_ok=True)
    began = time.time()
    run_ms(argv, env)
    return (float(stamp.read_text().strip().replace(",", ".")) - began) * 1000


def stamping_player(stamp: Path) -> str:
    script = f"head -c 1 >/dev/null; echo $EPOCHREALTIME > {shlex.quote(str(stamp))}; "
    return "bash -c " + shlex.quote(script + "exec cat >/dev/null")


def run(sizes: Sizes) -> Scenario:
    n = max(sizes.startup_runs, 5)
    sc = Scenario("8", f"CLI answers at once: ls and play on the shipped library (median of {n})")
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        # A private bytecode cache (the working tree is not written), filled by each
        # command's warm-up run: with a prefix set, Python reads every module's cached
        # bytecode there, the standard library's and trio's included.
        env = {**os.environ, "PYTHONPYCACHEPREFIX": str(Path(tmp) / "pycache")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        measured = dict(env, PYTHONDONTWRITEBYTECODE="1")
        as_here = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
        as_here["PYTHONDONTWRITEBYTECODE"] = "1"  # musiclib compiled at every launch

        def med(argv: list[str], e: dict[str, str] = measured, status: int = 0) -> float:
            run_ms(argv, env if e is measured else e, status)  # warm-up: caches, not the figure
            return median([run_ms(argv, e, status) for _ in range(n)])

        interp = med([PYTHON, "-c", "pass"])
        trio_ms = med([PYTHON, "-c", "import trio"])
        cli = med([PYTHON, "-c", "import musiclib.cli"])
        with musiclib_server(LIBRARY, "--index", str(Path(tmp) / "index.sqlite")) as server:
            trio.run(wait_indexed, server.address, TRACKS)
            addr = ["--server", server.address]
            ls = med([MUSICLIB, "ls", *addr])
            ls_compiling = med([MUSICLIB, "ls", *addr], as_here)
            no_player = [MUSICLIB, "play", TRACK, "--pipe", "-q", *addr]
            no_player += ["--player", str(Path(tmp) / "no-such-player")]
            started = med(no_player, status=6)  # PlayerNotFound: just before connecting
            play = None
            if shutil.which("bash"):
                stamp = Path(tmp) / "first-byte"
                argv = [MUSICLIB, "play", TRACK, "--pipe", "-q", *addr]
                argv += ["--player", stamping_player(stamp)]
                first_byte_ms(argv, env, stamp)
                play = median([first_byte_ms(argv, measured, stamp) for _ in range(n)])
            else:
                sc.notes.append("play skipped: bash (the stamping player) is not installed")
    base = "python -c pass"
    for row in (
        Row("interpreter start-up (python -c pass)", interp, "ms"),
        Row("python -c 'import trio'", trio_ms, "ms", interp, base),
        Row("python -c 'import musiclib.cli'", cli, "ms", interp, base),
        Row("musiclib ls, shipped library: launch to exit", ls, "ms", interp, base, LS),
        Row("play --pipe: launch to the player's first byte", play, "ms", interp, base, FIRST_BYTE),
        Row(
            "play, no such player: launch to exit, just before connecting",
            started,
            "ms",
            interp,
            base,
        ),
        Row(
            "musiclib ls, compiling musiclib at launch (no .pyc)",
            ls_compiling,
            "ms",
            ls,
            "ls with .pyc",
        ),
    ):
        sc.add(row)
    sc.notes.append(
        f"musiclib ls costs {ls - interp:.0f} ms over the interpreter; import trio alone "
        f"{trio_ms - interp:.0f} ms of it"
    )
    if play is not None:
        sc.notes.append(
            f"play's first byte comes {play - started:.0f} ms after its start-up is over "
            f"(imports and parse: {started - interp:.0f} ms over the interpreter)"
        )
    sc.raw = {"runs": n, "pycache_prefix": True}
    return sc
