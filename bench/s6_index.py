"""Scenario 6: the persistent index of 10 000 files (issue 7).

The tree is 10 000 hard links, 100 to a folder, to six one-second tagged files (MP3, Ogg
Vorbis, FLAC, Opus, M4A, WAV): every file is parsed by mutagen as a real one would be,
while the page cache holds only six files' worth of data, so this measures the indexing
code rather than the disk. Every index is a fresh file in a temporary folder (``--index``
for the server), so the user's cache is never read or written.

In this process (each variant on a fresh index; the variants take turns, round after
round, so that a noisy moment hits them alike; median of the rounds):

* ``Library.rescan()`` of the whole tree, cold: tags read in the scanning thread
  (``workers=0``, compared with ``os.walk`` plus one ``os.stat`` a file, the floor of any
  scan), and by 2 threads, 2 processes and 4 processes (each compared with
  ``workers=0``). The process pool is started by ``spawn``, and its start-up is part of
  the figure, as it is for the server. The default is one process per core, at most 4.
* the same rescan warm (nothing changed: a walk, a stat per file and one query of the
  stored sizes and mtimes), against the walk-and-stat floor; opening an existing index
  (``Library(...)``, which runs ``PRAGMA quick_check``); all tracks read back from it.

The real server (``musiclib serve --index FILE``, defaults otherwise), in cold/warm pairs:

* cold: a fresh index file; from launching the server to its ``listening`` line, to its
  ``indexed N tracks`` log line (the scan is done), and to a complete ``list`` reply
  received through the client API (``ListEnd.scanning`` false, all tracks; the issue's
  target). Then the background sha256 pass that follows each scan is awaited (its
  ``stored the sha256`` log line), so that the warm server has nothing left to do.
* warm: the server is stopped and started again on the same index file: launch to
  ``listening`` and to a complete ``list`` reply (the issue's target).
* against the warm server: ``musiclib ls --json`` of every track, CLI wall time with its
  output to /dev/null (the issue's target), compared with ``musiclib ls --json --limit 1``
  (the same start-up, connection and handshake, one track); and the plain ``ls`` table.
  One more ``ls --json`` is captured and checked to hold every track.
* memory: each server's peak RSS (VmHWM), compared with a server of an empty folder;
  the tag-reading processes (the pool's children) are sampled every 20 ms while the cold
  server runs, and their peaks are added up with the server's.

A complete list is asked for once the server logs ``indexed N tracks``: one ``list``
request, whose reply must hold every track with ``ListEnd.scanning`` false (if it does
not, the bench falls back to polling as the other scenarios do and says so in a note).
The other scenarios poll with a handshake every 20 ms instead; here that polling slowed
the warm server's rescan from 0.07-0.12 s to 0.10-0.36 s (presumably because the scan
thread and the event loop answering handshakes share one GIL), a large part of a 1 s
target.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import trio

from bench import data
from bench.common import (
    CPUS,
    MUSICLIB,
    Row,
    Scenario,
    Sizes,
    Target,
    child_pids,
    median,
    peak_rss_mib,
    read_text,
)
from bench.servers import musiclib_server, wait_indexed

COLD = Target("<= 5 s", "value", "<=", 5.0)
WARM = Target("<= 1 s", "value", "<=", 1.0)
LS_JSON = Target("<= 1 s", "value", "<=", 1.0)

#: how long a server may take to log its first "indexed N tracks"
SCAN_TIMEOUT = 120.0
#: how long the background sha256 pass after the cold scan may take before we go on
HASH_TIMEOUT = 120.0
#: how often the server's children are sampled for their peak RSS (seconds)
SAMPLE_EVERY = 0.02

Pool = Literal["process", "thread"]


@dataclass(frozen=True)
class Counts:
    """How often each thing is repeated; ``--quick`` (a 1000-file tree) does less."""

    rounds: int  # in-process cold rescans, per variant
    warm: int  # in-process warm rescans, index openings and full reads
    pairs: int  # cold/warm server pairs
    ls: int  # CLI runs of each kind per warm server

    @classmethod
    def of(cls, sizes: Sizes) -> Counts:
        if sizes.tree_files < Sizes().tree_files:  # --quick
            return cls(rounds=1, warm=3, pairs=1, ls=3)
        return cls(rounds=3, warm=5, pairs=3, ls=5)


# ---- in process -------------------------------------------------------------


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


def cold_rescan(root: Path, expected: int, workers: int, pool: Pool) -> float:
    """Seconds of one ``Library.rescan()`` into a fresh index file (opening it not counted)."""
    from musiclib.library import Library

    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        index = Path(tmp) / "index.sqlite3"
        with Library(root, index, workers=workers, pool=pool) as library:
            seconds = timed(library.rescan)
            if library.count != expected:
                raise RuntimeError(f"rescan found {library.count} of {expected} tracks")
    return seconds


@dataclass
class Warm:
    """Medians over runs on one populated index."""

    rescan: float  # Library.rescan() with nothing changed
    open: float  # Library(root, index): the index opened and checked
    read_all: float  # Library.tracks(): every row back as TrackInfo


def warm_in_process(root: Path, expected: int, runs: int) -> Warm:
    from musiclib.library import Library

    rescans, opens, reads = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        index = Path(tmp) / "index.sqlite3"
        with Library(root, index) as library:
            library.rescan()
        for _ in range(runs):
            began = time.perf_counter()
            library = Library(root, index)
            opens.append(time.perf_counter() - began)
            with library:
                rescans.append(timed(library.rescan))
                began = time.perf_counter()
                tracks = library.tracks()
                reads.append(time.perf_counter() - began)
                if len(tracks) != expected:
                    raise RuntimeError(f"the index holds {len(tracks)} of {expected} tracks")
    return Warm(median(rescans), median(opens), median(reads))


# ---- the server ---------------------------------------------------------------

_INDEXED = re.compile(r"indexed (\d+) tracks under ")
_READING = re.compile(r"reading (\d+) new or changed files of (\d+)")
_HASHED = re.compile(r"stored the sha256 of (\d+) files")


class LogMarks:
    """When the server first logged each line of interest (``time.perf_counter()``)."""

    def __init__(self) -> None:
        self.indexed_at: float | None = None
        self.indexed = threading.Event()
        self.read_files = 0  # from "reading K new or changed files of M" (0: none logged)
        self.hashed_at: float | None = None
        self.hashed = threading.Event()

    def feed(self, when: float, line: str) -> None:
        """Called by the server's reader thread for each line."""
        if self.indexed_at is None and _INDEXED.search(line):
            self.indexed_at = when
            self.indexed.set()
        elif match := _READING.search(line):
            self.read_files += int(match.group(1))
        elif self.hashed_at is None and _HASHED.search(line):
            self.hashed_at = when
            self.hashed.set()


class ChildPeaks(threading.Thread):
    """Samples the peak RSS (VmHWM) of every child of ``pid`` until stopped.

    A child's VmHWM only grows, so sampling misses at most the last 20 ms of each
    child's life. ``peaks`` maps pid to (peak MiB, command line).
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks: dict[int, tuple[float, str]] = {}
        self._stop_sampling = threading.Event()

    def run(self) -> None:
        while not self._stop_sampling.wait(SAMPLE_EVERY):  # a sampling period, not a sync
            for child in child_pids(self.pid):
                peak = peak_rss_mib(child)
                if peak is None:
                    continue
                old = self.peaks.get(child)
                if old is None:
                    cmd = read_text(f"/proc/{child}/cmdline").replace("\0", " ").strip()
                    self.peaks[child] = (peak, cmd)
                elif peak > old[0]:
                    self.peaks[child] = (peak, old[1])

    def stop(self) -> None:
        self._stop_sampling.set()
        self.join(5)

    def workers(self) -> list[float]:
        """Peaks of the tag-reading processes (the resource tracker left out)."""
        return [mib for mib, cmd in self.peaks.values() if "resource_tracker" not in cmd]

    def total(self) -> float:
        return sum(mib for mib, _ in self.peaks.values())


@dataclass
class Start:
    """One server start, seconds from launching it; RSS in MiB."""

    listening: float
    listed: float  # a complete list reply received
    polled: bool  # the list right after "indexed" was not complete: polled instead
    indexed: float | None  # the "indexed N tracks" log line
    hashed: float | None  # the "stored the sha256" log line (None: not awaited or not seen)
    read_files: int  # files the scan read (0 when nothing had changed)
    rss: float | None  # the server's VmHWM at the end
    children_rss: list[float] = field(default_factory=list)  # tag-reading workers' peaks
    children_total: float = 0.0  # every child's peak, added up
    ls_json: list[float] = field(default_factory=list)
    ls_one: list[float] = field(default_factory=list)
    ls_table: list[float] = field(default_factory=list)


async def complete_list(address: str, expected: int) -> bool:
    """One ``list`` of everything: True if it was complete (all tracks, not scanning)."""
    from musiclib.client import open_client

    async with open_client(address) as client:
        tracks, end = await client.list()
    return not end.scanning and len(tracks) >= expected


def cli_seconds(argv: list[str]) -> float:
    """Wall time of one CLI run, its output to /dev/null; it must succeed."""
    began = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{argv[1:3]} exited {done.returncode}: {done.stderr.decode()[-300:]}")
    return seconds


def start_server(
    root: Path, index: Path, expected: int, *, await_hashes: bool = False, ls_runs: int = 0
) -> Start:
    """Launch ``musiclib serve --index INDEX``, wait for a complete list, then optionally
    wait for the sha256 pass and time ``ls`` runs; stop it."""
    marks = LogMarks()
    began = time.perf_counter()
    with musiclib_server(root, "--index", str(index), on_line=marks.feed) as server:
        listening = time.perf_counter() - began
        sampler = ChildPeaks(server.pid)
        sampler.start()
        try:
            if not marks.indexed.wait(SCAN_TIMEOUT):
                raise RuntimeError(f"the server did not log 'indexed' in {SCAN_TIMEOUT:.0f} s")
            polled = not trio.run(complete_list, server.address, expected)
            if polled:
                trio.run(wait_indexed, server.address, expected)
            listed = time.perf_counter() - began
            if await_hashes:
                marks.hashed.wait(HASH_TIMEOUT)
        finally:
            sampler.stop()
        start = Start(
            listening=listening,
            listed=listed,
            polled=polled,
            indexed=None if marks.indexed_at is None else marks.indexed_at - began,
            hashed=None if marks.hashed_at is None else marks.hashed_at - began,
            read_files=marks.read_files,
            rss=None,
            children_rss=sampler.workers(),
            children_total=sampler.total(),
        )
        ls = [MUSICLIB, "ls", "--server", server.address]
        for _ in range(ls_runs):
            start.ls_json.append(cli_seconds([*ls, "--json"]))
            start.ls_one.append(cli_seconds([*ls, "--json", "--limit", "1"]))
            start.ls_table.append(cli_seconds(ls))
        if ls_runs:
            out = subprocess.run([*ls, "--json"], capture_output=True, check=True).stdout
            if len(json.loads(out)) != expected:
                raise RuntimeError(f"ls --json listed {len(json.loads(out))} of {expected}")
        start.rss = server.peak_rss_mib()
    return start


def empty_server_rss() -> float | None:
    """Peak RSS of a server of an empty folder, after its (empty) scan and one list."""
    with tempfile.TemporaryDirectory(prefix="bench-empty-") as tmp:
        root = Path(tmp) / "library"
        root.mkdir()
        with musiclib_server(root, "--index", str(Path(tmp) / "index.sqlite3")) as server:
            trio.run(wait_indexed, server.address, 0)
            return server.peak_rss_mib()


# ---- the scenario ------------------------------------------------------------


def spread(values: list[float], unit: str = "s") -> str:
    if unit == "s":
        return ", ".join(f"{v:.3f}" for v in values)
    return ", ".join(f"{v:.1f}" for v in values)


def run(sizes: Sizes) -> Scenario:
    from musiclib.library import default_workers

    n = sizes.tree_files
    counts = Counts.of(sizes)
    sc = Scenario("6", f"Persistent index of {n} files")
    root = data.tree(n)

    # in process
    walk = median([timed(lambda: walk_and_stat(root)) for _ in range(counts.warm)])
    variants: list[tuple[str, int, Pool]] = [
        ("in the scanning thread (workers=0)", 0, "process"),
        ("2 threads", 2, "thread"),
        ("2 processes", 2, "process"),
        ("4 processes", 4, "process"),
    ]
    default = default_workers()
    if default not in (2, 4):
        variants.append((f"{default} processes", default, "process"))
    cold: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    for _ in range(counts.rounds):
        for label, workers, pool in variants:
            cold[label].append(cold_rescan(root, n, workers, pool))
    warm = warm_in_process(root, n, counts.warm)

    # the server
    empty_rss = empty_server_rss()
    pairs: list[tuple[Start, Start]] = []
    for _ in range(counts.pairs):
        with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
            index = Path(tmp) / "index.sqlite3"
            first = start_server(root, index, n, await_hashes=True)
            second = start_server(root, index, n, ls_runs=counts.ls)
        pairs.append((first, second))
    colds = [c for c, _ in pairs]
    warms = [w for _, w in pairs]

    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return median(present) if present else None

    serial = median(cold[variants[0][0]])
    walk_label = "os.walk + stat"
    serial_label = "workers=0"
    default_label = next(label for label, w, p in variants if w == default and p == "process")
    rows = [
        Row(f"rescan cold, {variants[0][0]}", serial, "s", walk, walk_label),
    ]
    for label, workers, pool in variants[1:]:
        note = "the default here" if (workers, pool) == (default, "process") else ""
        value = median(cold[label])
        rows.append(Row(f"rescan cold, {label}", value, "s", serial, serial_label, note=note))
    rows += [
        Row("rescan warm, nothing changed", warm.rescan, "s", walk, walk_label),
        Row("open an existing index (Library(), quick_check)", warm.open, "s"),
        Row(f"all {n} tracks read back from the index", warm.read_all, "s"),
        Row("server cold: launch to 'listening'", med([c.listening for c in colds]), "s"),
        Row(
            "server cold: launch to 'indexed' logged",
            med([c.indexed for c in colds]),
            "s",
            median(cold[default_label]),
            f"rescan in process, {default_label}",
        ),
        Row(
            f"server cold: launch to a complete list of {n}",
            med([c.listed for c in colds]),
            "s",
            target=COLD,
        ),
        Row("server cold: launch to every sha256 stored", med([c.hashed for c in colds]), "s"),
        Row("server warm: launch to 'listening'", med([w.listening for w in warms]), "s"),
        Row("server warm: launch to 'indexed' logged", med([w.indexed for w in warms]), "s"),
        Row(
            f"server warm: launch to a complete list of {n}",
            med([w.listed for w in warms]),
            "s",
            med([c.listed for c in colds]),
            "cold start",
            target=WARM,
        ),
    ]
    ls_json = [s for w in warms for s in w.ls_json]
    ls_one = [s for w in warms for s in w.ls_one]
    ls_table = [s for w in warms for s in w.ls_table]
    one_label = "ls --json --limit 1"
    rows += [
        Row(
            f"musiclib ls --json of {n} tracks (CLI wall)",
            median(ls_json),
            "s",
            median(ls_one),
            one_label,
            target=LS_JSON,
        ),
        Row(
            f"musiclib ls of {n} tracks, table (CLI wall)",
            median(ls_table),
            "s",
            median(ls_one),
            one_label,
        ),
        Row(
            "server peak RSS, cold start",
            med([c.rss for c in colds]),
            "MiB",
            empty_rss,
            "server of an empty folder",
        ),
        Row(
            "server peak RSS, warm, after the ls runs",
            med([w.rss for w in warms]),
            "MiB",
            empty_rss,
            "server of an empty folder",
        ),
    ]
    totals = [c.rss + c.children_total for c in colds if c.rss is not None]
    rows.append(
        Row(
            "cold start: server + children, sum of peaks",
            med(list[float | None](totals)),
            "MiB",
            empty_rss,
            "server of an empty folder",
        )
    )
    for row in rows:
        sc.add(row)

    # notes: spreads and anything odd
    sc.notes.append(
        f"{counts.rounds} round(s) of in-process cold rescans, {counts.pairs} cold/warm server "
        f"pair(s), {counts.ls * counts.pairs} runs of each ls; medians shown; default "
        f"workers here: {default} processes ({CPUS} CPUs)"
    )
    sc.notes.append(
        "cold rescans, s: "
        + "; ".join(f"{label}: {spread(cold[label])}" for label, _, _ in variants)
    )
    sc.notes.append(
        "server, s: cold complete list "
        + spread([c.listed for c in colds])
        + "; warm complete list "
        + spread([w.listed for w in warms])
        + "; ls --json "
        + spread(ls_json)
        + "; ls --json --limit 1 "
        + spread(ls_one)
    )
    workers_rss = [mib for c in colds for mib in c.children_rss]
    if workers_rss:
        sc.notes.append(
            f"tag-reading processes seen during the cold starts: {len(workers_rss)}, peak RSS "
            f"{min(workers_rss):.1f}-{max(workers_rss):.1f} MiB each"
        )
    for c in colds:
        if c.read_files != n:
            sc.notes.append(f"a cold start logged reading {c.read_files} files, not {n}")
        if c.hashed is None:
            sc.notes.append(f"a cold start's sha256 pass was not seen within {HASH_TIMEOUT:.0f} s")
    polled = sum(s.polled for s in colds + warms)
    if polled:
        sc.notes.append(
            f"{polled} start(s) gave an incomplete list right after logging 'indexed' "
            "and were polled with handshakes instead"
        )
    for w in warms:
        if w.read_files:
            sc.notes.append(f"a warm restart re-read {w.read_files} files (expected none)")
        if w.indexed is not None and w.indexed > w.listed:
            sc.notes.append(
                f"a warm restart answered a complete list ({w.listed:.3f} s) before its "
                f"rescan was done ({w.indexed:.3f} s): the index was already complete"
            )
    sc.raw = {
        "files": n,
        "counts": vars(counts),
        "walk_s": walk,
        "cold_rescan_s": cold,
        "warm": vars(warm),
        "empty_server_rss_mib": empty_rss,
        "servers": [{"cold": vars(c), "warm": vars(w)} for c, w in pairs],
    }
    return sc
