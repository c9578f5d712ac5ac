"""Scenario 6: building the index of 10 000 files.

The tree is 10 000 hard links, 100 to a folder, to six one-second tagged files (MP3, Ogg
Vorbis, FLAC, Opus, M4A, WAV): every file is parsed by mutagen as a real one would be,
while the page cache holds only six files' worth of data, so this measures the indexing
code rather than the disk.

* ``Library(root).rescan()`` in this process, median of 3; baseline: walking the same
  tree with ``os.walk`` and one ``os.stat`` per file, the floor of any scan.
* a cold start of the real server: from launching ``musiclib serve`` to its
  ``listening`` line, to a ``welcome`` that says the scan is done with all 10 000
  tracks (polled every 20 ms with handshakes only; the server has no scan-finished
  notification), and to a complete ``list`` reply (``ListEnd.scanning`` false, the
  count right) received through the client API.
* ``musiclib ls`` of the whole library (CLI wall time, a 10 000-row table) and the
  server's peak RSS holding the index.

Cold only: issue 7 adds a persistent index with warm restarts; until then every start
rescans everything.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from bench import data
from bench.common import MUSICLIB, Row, Scenario, Sizes, median
from bench.servers import ServerProcess, musiclib_server, wait_indexed, wait_scanned


def walk_and_stat(root: Path) -> int:
    count = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.startswith("."):
                os.stat(os.path.join(folder, name))
                count += 1
    return count


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def rescan_seconds(root: Path, expected: int) -> float:
    from musiclib.library import Library

    library = Library(root)
    seconds = timed(library.rescan)
    if len(library.tracks()) != expected:
        raise RuntimeError(f"rescan found {len(library.tracks())} of {expected} tracks")
    return seconds


@dataclass
class ColdStart:
    """Seconds from launching the server to each step, and what it cost."""

    listening: float
    scanned: float  # ``welcome`` says: not scanning, all tracks
    listed: float  # then one complete ``list`` reply received (through the client API)
    ls: float  # wall time of ``musiclib ls`` afterwards
    rss_mib: float | None


def cold_start(root: Path, expected: int) -> ColdStart:
    began = time.perf_counter()
    with musiclib_server(root) as server:
        listening = time.perf_counter() - began
        trio.run(wait_scanned, server.address, expected)
        scanned = time.perf_counter() - began
        trio.run(wait_indexed, server.address, expected)
        listed = time.perf_counter() - began
        ls = _ls_seconds(server)
        return ColdStart(listening, scanned, listed, ls, server.peak_rss_mib())


def _ls_seconds(server: ServerProcess) -> float:
    argv = [MUSICLIB, "ls", "--server", server.address]
    began = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - began


def run(sizes: Sizes) -> Scenario:
    n = sizes.tree_files
    sc = Scenario("6", f"Index build for {n} files (cold)")
    root = data.tree(n)
    walk = median([timed(lambda: walk_and_stat(root)) for _ in range(3)])
    rescan = median([rescan_seconds(root, n) for _ in range(3)])
    cold = cold_start(root, n)
    label = "os.walk + stat"
    rows = [
        Row("Library.rescan() in process", rescan, "s", walk, label),
        Row("  per file", rescan / n * 1e6, "µs", walk / n * 1e6, label),
        Row("server launch to 'listening'", cold.listening, "s"),
        Row("server launch to index done", cold.scanned, "s", rescan, "rescan in process"),
        Row("  and a complete list received", cold.listed, "s"),
        Row(f"musiclib ls of {n} tracks (CLI wall)", cold.ls, "s"),
        Row("server peak RSS with the index", cold.rss_mib, "MiB"),
    ]
    for row in rows:
        sc.add(row)
    sc.notes.append("cold start only: a persistent index with warm restarts is issue 7")
    sc.raw = {"files": n, "walk_s": walk, "rescan_s": rescan, "cold": vars(cold)}
    return sc
