"""Scenario 6: the persistent index of 10 000 and 100 000 files (issues 7 and 15).

Each tree is hard links, 100 to a folder, to six one-second tagged files (MP3, Ogg
Vorbis, FLAC, Opus, M4A, WAV): every file is parsed by mutagen as a real one would be,
while the page cache holds only six files' worth of data, so this measures the indexing
code rather than the disk. The big tree is ten times the small one (100 000 files; with
``--quick``, 1000 and 10 000), generated once into ``bench/data`` in a few seconds. Every
index is a fresh file in a temporary folder (``--index`` for the server), so the user's
cache is never read or written.

In this process, on the small tree (each variant on a fresh index; the variants take
turns, round after round, so that a noisy moment hits them alike; median of the rounds):

* ``Library.rescan()`` of the whole tree, cold: tags read in the scanning thread
  (``workers=0``, compared with ``os.walk`` plus one ``os.stat`` a file, the floor of any
  scan), and by 2 threads, 2 processes and 4 processes (each compared with
  ``workers=0``). The process pool is started by ``spawn``, and its start-up is part of
  the figure, as it is for the server. The default is one process per core, at most 4.
* the same rescan warm (nothing changed: a walk, a stat per file and one query of the
  stored sizes and mtimes), against the walk-and-stat floor; opening an existing index
  (``Library(...)``, which runs ``PRAGMA quick_check``); all tracks read back from it.

The real server as a user meets it: ``musiclib serve --index FILE`` with the default
``--workers`` (one serving process per core: a supervisor, worker 0 that scans and
writes the index, the others reading it), in cold/warm pairs, on both trees, whole
processes throughout (the CLI's own start-up included, as the issue measured):

* cold: a fresh index file; from launching the server to its ``listening`` line, to its
  ``indexed N tracks`` log line (the scan is done), and to the end of the first
  ``musiclib ls --json`` that lists every track without saying the server is still
  indexing (run as soon as ``indexed`` is logged; if it is not complete the bench polls
  with handshakes, lists again, and says so in a note). Then the background sha256 pass
  that follows each scan is awaited (its ``stored the sha256`` log line), so that the
  warm server has nothing left to do.
* warm: the server is stopped and started again on the same index file: launch to
  ``listening``, to ``indexed`` and to a complete ``ls --json``.
* against the warm server: ``musiclib ls --json`` of every track, CLI wall time and the
  client's peak RSS (``wait4``), its output to /dev/null, compared with ``musiclib ls
  --json --limit 1`` (the same start-up, connection and handshake, one track); ``ls
  --limit 20`` (a page, as a table); on the small tree the whole table (``ls``).
* memory: the peak RSS (VmHWM) of the largest serving process (a worker, or the server
  itself with one), compared with a server of an empty folder, and every process's peak
  added up (supervisor, workers, tag-reading processes), sampled every 20 ms.

The bytecode cache. A user's install has one (pip compiles what it installs; an editable
install writes it on first run), but this environment sets ``PYTHONDONTWRITEBYTECODE=1``,
so without one every process (supervisor, each worker, each tag-reading process, each
``ls``) would compile musiclib from source, about 0.15 s of every warm start (issue 15,
measured: warm 10 000 0.80-0.85 s without, 0.65-0.70 s with, alternating). As scenario 8
does, the whole scenario runs with a private ``PYTHONPYCACHEPREFIX`` (the working tree is
not written), filled by a warm-up (the in-process rescans' pool processes, a server of an
empty folder and an ``ls`` against it); one more warm start of the small tree is made
without it, as this environment runs it, for comparison.

A complete listing is asked for once the server logs ``indexed N tracks``, not polled
for: polling with a handshake every 20 ms slowed the warm server's rescan from 0.07-0.12
s to 0.10-0.36 s (issue 7; the scan thread and the event loop answering handshakes
share one GIL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

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

# issue 15, item 3 (10 000 files, on 2 cores)
COLD = Target("<= 2.5 s", "value", "<=", 2.5)
WARM = Target("<= 0.6 s", "value", "<=", 0.6)
LS_JSON = Target("<= 0.4 s", "value", "<=", 0.4)
# issue 15, item 5 (100 000 files)
BIG_COLD = Target("<= 10 s", "value", "<=", 10.0)
BIG_WARM = Target("<= 1 s", "value", "<=", 1.0)
BIG_LS_JSON = Target("<= 2 s", "value", "<=", 2.0)
BIG_LS_RSS = Target("<= 60 MiB", "value", "<=", 60.0)
BIG_SERVER_RSS = Target("<= 150 MB (143 MiB)", "value", "<=", 150e6 / 2**20)

#: how long a server may take to log its first "indexed N tracks"
SCAN_TIMEOUT = 300.0
#: how long the background sha256 pass after the cold scan may take before we go on
HASH_TIMEOUT = 180.0
#: how often the server's children are sampled for their peak RSS (seconds)
SAMPLE_EVERY = 0.02

Pool = Literal["process", "thread"]


@dataclass(frozen=True)
class Counts:
    """How often each thing is repeated; ``--quick`` (a 1000-file tree) does less."""

    rounds: int  # in-process cold rescans, per variant
    warm: int  # in-process warm rescans, index openings and full reads
    pairs: int  # cold/warm server pairs, small tree
    ls: int  # CLI runs of each kind per warm server, small tree
    big_pairs: int  # the same for the big tree
    big_ls: int

    @classmethod
    def of(cls, sizes: Sizes) -> Counts:
        if sizes.tree_files < Sizes().tree_files:  # --quick
            return cls(rounds=1, warm=3, pairs=1, ls=3, big_pairs=1, big_ls=2)
        return cls(rounds=3, warm=5, pairs=3, ls=5, big_pairs=2, big_ls=3)


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
_STILL_SCANNING = "still indexing"


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


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children...)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in child_pids(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


class Peaks(threading.Thread):
    """Samples the peak RSS (VmHWM) of a server and every process below it until stopped.

    A process's VmHWM only grows, so sampling misses at most the last 20 ms of a
    short-lived one. ``peaks`` maps pid to (peak MiB, command line). With
    ``--workers N`` the server is a supervisor whose children serve; the serving
    processes (:meth:`serving`) are the server itself and its ``worker_main``
    children; the tag-reading processes are the spawned ones.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks: dict[int, tuple[float, str]] = {}
        self._stop_sampling = threading.Event()

    def sample(self) -> None:
        for pid in [self.pid, *descendants(self.pid)]:
            peak = peak_rss_mib(pid)
            if peak is None:
                continue
            old = self.peaks.get(pid)
            if old is None:
                cmd = read_text(f"/proc/{pid}/cmdline").replace("\0", " ").strip()
                self.peaks[pid] = (peak, cmd)
            elif peak > old[0]:
                self.peaks[pid] = (peak, old[1])

    def run(self) -> None:
        while not self._stop_sampling.wait(SAMPLE_EVERY):  # a sampling period, not a sync
            self.sample()

    def stop(self) -> None:
        self._stop_sampling.set()
        self.join(5)
        self.sample()

    def serving(self) -> list[float]:
        """Peaks of the processes that serve: the server, or its workers."""
        return [
            mib for pid, (mib, cmd) in self.peaks.items() if pid == self.pid or "worker_main" in cmd
        ]

    def readers(self) -> list[float]:
        """Peaks of the tag-reading processes (the resource tracker left out)."""
        return [
            mib
            for pid, (mib, cmd) in self.peaks.items()
            if "spawn_main" in cmd and "resource_tracker" not in cmd
        ]

    def total(self) -> float:
        return sum(mib for mib, _ in self.peaks.values())


#: GNU time, to learn a CLI run's own peak RSS (see :func:`run_cli`)
GNU_TIME = shutil.which("time") or next(
    (p for p in ("/usr/bin/time",) if os.access(p, os.X_OK)), None
)


@dataclass
class Cli:
    """One CLI run: wall seconds and the client's peak RSS (MiB; None: not measured)."""

    seconds: float
    rss: float | None


def run_cli(argv: list[str], out: int | IO[bytes] = subprocess.DEVNULL) -> tuple[Cli, str]:
    """One CLI run, its output to ``out``: its wall time, peak RSS and standard error.

    The peak RSS is the kernel's (``ru_maxrss``) as GNU ``time`` reports it for the
    process it starts. Not ``wait4`` here: a process forked from this one and then
    exec'd keeps this one's peak as its own (Linux carries ``maxrss`` over an
    ``execve``), and this process holds a parsed listing of 100 000 tracks. Without
    GNU time the RSS is not measured (None). The run must succeed.
    """
    with tempfile.NamedTemporaryFile(prefix="bench-rss-") as rss, tempfile.TemporaryFile() as err:
        timed_argv = [GNU_TIME, "-f", "%M", "-o", rss.name, *argv] if GNU_TIME else argv
        began = time.perf_counter()
        done = subprocess.run(timed_argv, stdout=out, stderr=err)
        seconds = time.perf_counter() - began
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
        kib = read_text(rss.name).strip().splitlines()[-1:] if GNU_TIME else []
    if done.returncode != 0:
        raise RuntimeError(f"{argv[1:3]} exited {done.returncode}: {text[-300:]}")
    return Cli(seconds, int(kib[0]) / 1024 if kib and kib[0].isdigit() else None), text


def ls_json_complete(address: str, expected: int) -> tuple[float, bool]:
    """One ``musiclib ls --json`` of everything: when it ended (``time.perf_counter()``),
    and whether it listed every track without saying the server was still indexing
    (its output is counted after that time was taken)."""
    with tempfile.TemporaryFile() as out:
        _, err = run_cli([MUSICLIB, "ls", "--json", "--server", address], out)
        ended = time.perf_counter()
        out.seek(0)
        listed = len(json.load(out))
    return ended, listed >= expected and _STILL_SCANNING not in err


@dataclass
class Start:
    """One server start, seconds from launching it; RSS in MiB."""

    listening: float
    listed: float  # a complete `ls --json` done (the CLI's whole run included)
    polled: bool  # the ls right after "indexed" was not complete: polled, then ls again
    indexed: float | None  # the "indexed N tracks" log line
    hashed: float | None  # the "stored the sha256" log line (None: not awaited or not seen)
    read_files: int  # files the scan read (0 when nothing had changed)
    rss: float = 0.0  # the largest serving process's peak RSS
    serving_rss: list[float] = field(default_factory=list)  # each serving process's peak
    readers_rss: list[float] = field(default_factory=list)  # tag-reading workers' peaks
    total_rss: float = 0.0  # every process's peak, added up
    ls_json: list[Cli] = field(default_factory=list)
    ls_one: list[Cli] = field(default_factory=list)
    ls_page: list[Cli] = field(default_factory=list)  # ls --limit 20 (a table)
    ls_table: list[Cli] = field(default_factory=list)


def start_server(
    root: Path,
    index: Path,
    expected: int,
    workers: int,
    *,
    await_hashes: bool = False,
    ls_runs: int = 0,
    table: bool = True,
) -> Start:
    """Launch ``musiclib serve --index INDEX --workers N``, run ``ls --json`` once it has
    logged ``indexed``; then optionally wait for the sha256 pass and time ``ls`` runs."""
    marks = LogMarks()
    began = time.perf_counter()
    options = ("--index", str(index), "--workers", str(workers))
    with musiclib_server(root, *options, on_line=marks.feed) as server:
        listening = time.perf_counter() - began
        peaks = Peaks(server.pid)
        peaks.start()
        try:
            if not marks.indexed.wait(SCAN_TIMEOUT):
                raise RuntimeError(f"the server did not log 'indexed' in {SCAN_TIMEOUT:.0f} s")
            ended, complete = ls_json_complete(server.address, expected)
            polled = not complete
            tries = 0
            while not complete:
                tries += 1
                if tries > 10:
                    raise RuntimeError("ls --json never listed every track")
                trio.run(wait_indexed, server.address, expected, SCAN_TIMEOUT)
                ended, complete = ls_json_complete(server.address, expected)
            listed = ended - began
            if await_hashes:
                marks.hashed.wait(HASH_TIMEOUT)
            start = Start(
                listening=listening,
                listed=listed,
                polled=polled,
                indexed=None if marks.indexed_at is None else marks.indexed_at - began,
                hashed=None if marks.hashed_at is None else marks.hashed_at - began,
                read_files=marks.read_files,
            )
            ls = [MUSICLIB, "ls", "--server", server.address]
            for _ in range(ls_runs):
                start.ls_json.append(run_cli([*ls, "--json"])[0])
                start.ls_one.append(run_cli([*ls, "--json", "--limit", "1"])[0])
                start.ls_page.append(run_cli([*ls, "--limit", "20"])[0])
                if table:
                    start.ls_table.append(run_cli(ls)[0])
        finally:
            peaks.stop()
        start.serving_rss = peaks.serving()
        start.rss = max(start.serving_rss, default=0.0)
        start.readers_rss = peaks.readers()
        start.total_rss = peaks.total()
    return start


def empty_server_rss(workers: int) -> float | None:
    """Peak RSS of the largest serving process of a server of an empty folder, after its
    (empty) scan and one list (an ``ls --json``, which also fills the bytecode cache)."""
    with tempfile.TemporaryDirectory(prefix="bench-empty-") as tmp:
        root = Path(tmp) / "library"
        root.mkdir()
        options = ("--index", str(Path(tmp) / "index.sqlite3"), "--workers", str(workers))
        with musiclib_server(root, *options) as server:
            peaks = Peaks(server.pid)
            trio.run(wait_indexed, server.address, 0)
            run_cli([MUSICLIB, "ls", "--json", "--server", server.address])
            peaks.sample()
            return max(peaks.serving(), default=None)


def bytecode_cache(where: Path) -> contextlib.AbstractContextManager[None]:
    """Every process started meanwhile reads and writes its bytecode under ``where``
    (see the module's docstring); the environment is restored afterwards."""
    return environment({"PYTHONPYCACHEPREFIX": str(where), "PYTHONDONTWRITEBYTECODE": None})


@contextlib.contextmanager
def environment(values: dict[str, str | None]) -> Iterator[None]:
    """``values`` in the environment meanwhile (``None``: unset), restored afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def serve_pairs(
    root: Path,
    n: int,
    workers: int,
    pairs: int,
    ls_runs: int,
    *,
    table: bool,
    uncached: dict[str, str | None] | None = None,
) -> tuple[list[tuple[Start, Start]], Start | None]:
    """``pairs`` cold starts (each on a fresh index, its sha256 pass awaited) each
    followed by a warm restart on the same index, against which ``ls`` runs; then, if
    ``uncached`` (the environment without the bytecode cache) is given, one more warm
    restart on the last index in that environment."""
    out = []
    extra = None
    for i in range(pairs):
        with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
            index = Path(tmp) / "index.sqlite3"
            cold = start_server(root, index, n, workers, await_hashes=True)
            warm = start_server(root, index, n, workers, ls_runs=ls_runs, table=table)
            if uncached is not None and i == pairs - 1:
                with environment(uncached):
                    extra = start_server(root, index, n, workers)
        out.append((cold, warm))
    return out, extra


# ---- the scenario ------------------------------------------------------------


def spread(values: list[float], unit: str = "s") -> str:
    if unit == "s":
        return ", ".join(f"{v:.3f}" for v in values)
    return ", ".join(f"{v:.1f}" for v in values)


def med(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def server_rows(
    n: int, pairs: list[tuple[Start, Start]], targets: dict[str, Target], empty_rss: float | None
) -> tuple[list[Row], list[str]]:
    """The rows (and notes) of one library size's server starts and ``ls`` runs."""
    colds = [c for c, _ in pairs]
    warms = [w for _, w in pairs]
    ls_json = [c for w in warms for c in w.ls_json]
    ls_one = [c for w in warms for c in w.ls_one]
    ls_page = [c for w in warms for c in w.ls_page]
    ls_table = [c for w in warms for c in w.ls_table]
    one = "ls --json --limit 1"
    tag = f"{n} files:"
    rows = [
        Row(f"{tag} server cold, launch to 'listening'", med([c.listening for c in colds]), "s"),
        Row(
            f"{tag} server cold, launch to 'indexed' logged",
            med([c.indexed for c in colds]),
            "s",
            target=targets.get("cold indexed"),
        ),
        Row(
            f"{tag} server cold, launch to a complete ls --json",
            med([c.listed for c in colds]),
            "s",
            target=targets.get("cold listed"),
        ),
        Row(
            f"{tag} server cold, launch to every sha256 stored", med([c.hashed for c in colds]), "s"
        ),
        Row(f"{tag} server warm, launch to 'listening'", med([w.listening for w in warms]), "s"),
        Row(
            f"{tag} server warm, launch to 'indexed' logged",
            med([w.indexed for w in warms]),
            "s",
            target=targets.get("warm indexed"),
        ),
        Row(
            f"{tag} server warm, launch to a complete ls --json",
            med([w.listed for w in warms]),
            "s",
            med([c.listed for c in colds]),
            "cold start",
            target=targets.get("warm listed"),
        ),
        Row(
            f"{tag} musiclib ls --json of every track (CLI wall)",
            med([c.seconds for c in ls_json]),
            "s",
            med([c.seconds for c in ls_one]),
            one,
            target=targets.get("ls json"),
        ),
        Row(
            f"{tag} musiclib ls --json, client peak RSS",
            med([c.rss for c in ls_json]),
            "MiB",
            med([c.rss for c in ls_one]),
            one,
            target=targets.get("ls rss"),
        ),
        Row(
            f"{tag} musiclib ls --limit 20 (CLI wall)",
            med([c.seconds for c in ls_page]),
            "s",
            med([c.seconds for c in ls_one]),
            one,
        ),
    ]
    if ls_table:
        rows.append(
            Row(
                f"{tag} musiclib ls, the whole table (CLI wall)",
                med([c.seconds for c in ls_table]),
                "s",
                med([c.seconds for c in ls_one]),
                one,
            )
        )
    rows += [
        Row(
            f"{tag} server peak RSS (largest serving process), cold",
            med([c.rss for c in colds]),
            "MiB",
            empty_rss,
            "server of an empty folder",
            target=targets.get("server rss"),
        ),
        Row(
            f"{tag} server peak RSS (largest serving process), warm after the ls runs",
            med([w.rss for w in warms]),
            "MiB",
            empty_rss,
            "server of an empty folder",
            target=targets.get("server rss"),
        ),
        Row(
            f"{tag} cold start: every process's peak RSS, added up",
            med([c.total_rss for c in colds]),
            "MiB",
        ),
    ]
    notes = [
        f"{tag} server, s: cold 'indexed' {spread([c.indexed or 0.0 for c in colds])}; cold "
        f"complete ls --json {spread([c.listed for c in colds])}; warm 'indexed' "
        f"{spread([w.indexed or 0.0 for w in warms])}; warm complete ls --json "
        f"{spread([w.listed for w in warms])}; ls --json {spread([c.seconds for c in ls_json])}; "
        f"ls --json --limit 1 {spread([c.seconds for c in ls_one])}; ls --json client RSS, "
        f"MiB: {spread([c.rss or 0.0 for c in ls_json], 'MiB')}"
    ]
    readers = [mib for c in colds for mib in c.readers_rss]
    if readers:
        notes.append(
            f"{tag} tag-reading processes seen during the cold starts: {len(readers)}, peak "
            f"RSS {min(readers):.1f}-{max(readers):.1f} MiB each; serving processes' peaks "
            f"(cold) {spread([m for c in colds for m in c.serving_rss], 'MiB')} MiB"
        )
    for c in colds:
        if c.read_files != n:
            notes.append(f"{tag} a cold start logged reading {c.read_files} files, not {n}")
        if c.hashed is None:
            notes.append(f"{tag} a cold start's sha256 pass was not seen in {HASH_TIMEOUT:.0f} s")
    polled = sum(s.polled for s in colds + warms)
    if polled:
        notes.append(
            f"{tag} {polled} start(s) gave an incomplete ls --json right after logging "
            "'indexed' and were polled with handshakes, then listed again"
        )
    for w in warms:
        if w.read_files:
            notes.append(f"{tag} a warm restart re-read {w.read_files} files (expected none)")
    return rows, notes


def run(sizes: Sizes) -> Scenario:
    from musiclib.workers import default_workers as default_server_workers

    n = sizes.tree_files
    big = 10 * n
    counts = Counts.of(sizes)
    servers = default_server_workers()
    sc = Scenario("6", f"Persistent index of {n} and {big} files")
    root = data.tree(n)
    big_root = data.tree(big)
    as_here = {
        name: os.environ.get(name) for name in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")
    }
    with tempfile.TemporaryDirectory(prefix="bench-pycache-") as cache, bytecode_cache(Path(cache)):
        return _run(sc, n, big, counts, servers, root, big_root, as_here)


def _run(
    sc: Scenario,
    n: int,
    big: int,
    counts: Counts,
    servers: int,
    root: Path,
    big_root: Path,
    as_here: dict[str, str | None],
) -> Scenario:
    from musiclib.library import default_workers

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

    # the real server, as a user meets it: `serve` with its default --workers
    empty_rss = empty_server_rss(servers)
    small_pairs, uncached = serve_pairs(
        root, n, servers, counts.pairs, counts.ls, table=True, uncached=as_here
    )
    big_pairs, _ = serve_pairs(big_root, big, servers, counts.big_pairs, counts.big_ls, table=False)

    serial = median(cold[variants[0][0]])
    walk_label = "os.walk + stat"
    serial_label = "workers=0"
    rows = [
        Row(f"{n} files: rescan cold, {variants[0][0]}", serial, "s", walk, walk_label),
    ]
    for label, workers, pool in variants[1:]:
        note = "the default here" if (workers, pool) == (default, "process") else ""
        value = median(cold[label])
        rows.append(
            Row(f"{n} files: rescan cold, {label}", value, "s", serial, serial_label, note=note)
        )
    rows += [
        Row(f"{n} files: rescan warm, nothing changed", warm.rescan, "s", walk, walk_label),
        Row(f"{n} files: open an existing index (Library(), quick_check)", warm.open, "s"),
        Row(f"{n} files: all tracks read back from the index", warm.read_all, "s"),
    ]
    small_rows, small_notes = server_rows(
        n,
        small_pairs,
        {"cold listed": COLD, "warm listed": WARM, "ls json": LS_JSON},
        empty_rss,
    )
    big_rows, big_notes = server_rows(
        big,
        big_pairs,
        {
            "cold indexed": BIG_COLD,
            "warm indexed": BIG_WARM,
            "ls json": BIG_LS_JSON,
            "ls rss": BIG_LS_RSS,
            "server rss": BIG_SERVER_RSS,
        },
        empty_rss,
    )
    if uncached is not None:
        small_rows.append(
            Row(
                f"{n} files: server warm, launch to a complete ls --json, no bytecode cache "
                "(musiclib compiled at each launch, as this environment runs it)",
                uncached.listed,
                "s",
                med([w.listed for _, w in small_pairs]),
                "with the cache",
            )
        )
    for row in rows + small_rows + big_rows:
        sc.add(row)

    sc.notes.append(
        f"the server runs as `musiclib serve` does by default here: --workers {servers} "
        f"(one per core), so worker 0 scans while the others only read the index; "
        f"{counts.rounds} round(s) of in-process cold rescans; {counts.pairs} cold/warm "
        f"server pair(s) of {n} files and {counts.big_pairs} of {big}; "
        f"{counts.ls * counts.pairs} and {counts.big_ls * counts.big_pairs} runs of each ls; "
        f"medians shown; tag-reading processes per scan: {default} ({CPUS} CPUs); every "
        "process reads musiclib's bytecode from a private cache (PYTHONPYCACHEPREFIX), as "
        "a user's install does, but for the one row that says otherwise"
    )
    sc.notes.append(
        "cold rescans, s: "
        + "; ".join(f"{label}: {spread(cold[label])}" for label, _, _ in variants)
    )
    sc.notes += small_notes + big_notes
    sc.raw = {
        "files": [n, big],
        "server_workers": servers,
        "counts": vars(counts),
        "walk_s": walk,
        "cold_rescan_s": cold,
        "warm": vars(warm),
        "empty_server_rss_mib": empty_rss,
        "bytecode_cache": True,
        "uncached_warm": None if uncached is None else dataclasses.asdict(uncached),
        "servers": {
            str(size): [
                {"cold": dataclasses.asdict(c), "warm": dataclasses.asdict(w)} for c, w in pairs
            ]
            for size, pairs in ((n, small_pairs), (big, big_pairs))
        },
    }
    return sc
