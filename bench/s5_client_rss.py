"""Scenario 5: the client's peak memory while saving and playing a 1 GiB file.

The CLI runs in its own process under :mod:`bench.tools.peak_rss`, which records VmHWM
at exit (the player is another process and is not counted). The player is
:mod:`bench.tools.slow_player` reading 64 MiB/s, far slower than loopback, so the
client must either park what the player has not taken (``--save``: in the ``.part`` file)
or slow the network down (no save: a bounded queue and TCP flow control).

Variants: ``play --save -o FILE`` with the big file and with one 8 times smaller (memory
must not follow the file's size), ``play`` without saving, and ``get -o FILE``. A save
counts as verified when the command exits 0 (it checks size and sha256 before the final
rename) and the saved file's sha256 matches the generated one (checked here as well).
Baseline: the same wrapper with the CLI imported and nothing run (``--import-only``).

Why: the issue asks for client RSS <= 80 MiB whatever the file size.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from bench import data
from bench.common import BENCH_DIR, DATA, MIB, PYTHON, REPO, Row, Scenario, Sizes, Target
from bench.data import DataFile
from bench.servers import musiclib_server, wait_indexed

RSS = Target("<= 80 MiB", "value", "<=", 80.0)


@dataclass
class Run:
    peak_mib: float
    seconds: float
    status: int


def measure(args: list[str], scratch: Path) -> Run:
    """Run ``musiclib ARGS`` under the peak-RSS wrapper."""
    out = scratch / "hwm"
    out.unlink(missing_ok=True)
    argv = [PYTHON, "-m", "bench.tools.peak_rss", str(out), *args]
    began = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        print(f"   {args[:2]} exited {done.returncode}: {done.stderr.decode()[-300:]}")
    return Run(int(out.read_text()) / 1024, seconds, done.returncode)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * MIB):
            digest.update(block)
    return digest.hexdigest()


def saved_ok(run: Run, path: Path, expected: DataFile) -> bool:
    ok = run.status == 0 and path.exists() and sha256_of(path) == expected.sha256
    path.unlink(missing_ok=True)
    return ok


def run(sizes: Sizes) -> Scenario:
    big = data.big_file(sizes.big_bytes)
    small = data.big_file(sizes.big_bytes // 8)
    sc = Scenario("5", f"Client peak RSS, saving and playing a {big.size // MIB} MiB file")
    player = f"{PYTHON} {BENCH_DIR / 'tools' / 'slow_player.py'} {sizes.player_rate}"
    with (
        tempfile.TemporaryDirectory(prefix="bench-rss-", dir=DATA) as tmp,
        musiclib_server(big.root) as server,
    ):
        scratch = Path(tmp)
        trio.run(wait_indexed, server.address, 2)
        addr = ["--server", server.address]
        dest = scratch / "saved.flac"
        base = measure(["--import-only"], scratch)
        play_save = measure(
            ["play", big.name, "--player", player, "--save", "-o", str(dest), *addr], scratch
        )
        big_ok = saved_ok(play_save, dest, big)
        play_small = measure(
            ["play", small.name, "--player", player, "--save", "-o", str(dest), *addr], scratch
        )
        small_ok = saved_ok(play_small, dest, small)
        play_only = measure(["play", big.name, "--player", player, *addr], scratch)
        get = measure(["get", big.name, "-o", str(dest), *addr], scratch)
        get_ok = saved_ok(get, dest, big)
    label = "CLI imported, idle"
    mib = f"{big.size // MIB} MiB"
    rows = [
        Row(f"play --save, {mib}", play_save.peak_mib, "MiB", base.peak_mib, label, RSS),
        Row(
            f"play --save, {small.size // MIB} MiB",
            play_small.peak_mib,
            "MiB",
            base.peak_mib,
            label,
            RSS,
        ),
        Row(f"play (no save), {mib}", play_only.peak_mib, "MiB", base.peak_mib, label, RSS),
        Row(f"get -o FILE, {mib}", get.peak_mib, "MiB", base.peak_mib, label, RSS),
    ]
    for row in rows:
        sc.add(row)
    verified = {"play --save big": big_ok, "play --save small": small_ok, "get -o": get_ok}
    bad = [k for k, ok in verified.items() if not ok]
    sc.notes.append(
        f"player reads {sizes.player_rate // MIB} MiB/s; saves verified: "
        + ("all" if not bad else "NOT " + ", ".join(bad))
        + f"; play --save took {play_save.seconds:.1f} s, get {get.seconds:.1f} s"
    )
    if play_only.status != 0:
        sc.notes.append(f"play without save exited {play_only.status}")
    sc.raw = {
        "runs": {
            k: vars(v)
            for k, v in {
                "import_only": base,
                "play_save": play_save,
                "play_save_small": play_small,
                "play": play_only,
                "get": get,
            }.items()
        },
        "verified": verified,
    }
    return sc
