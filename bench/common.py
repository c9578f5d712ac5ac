"""Shared pieces: the run's sizes, result rows and their verdicts, statistics, /proc readers.

A scenario returns a :class:`Scenario` made of :class:`Row` objects. A row holds one
measured figure, optionally the baseline figure it is compared with (measured in the same
run), and optionally the issue's :class:`Target`; the ratio and the verdict follow from
those. Nothing here times or starts anything.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DATA = BENCH_DIR / "data"
#: the interpreter of the venv the bench runs in; the CLI is next to it
PYTHON = sys.executable
MUSICLIB = str(Path(sys.executable).with_name("musiclib"))
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; ``--quick`` shrinks everything to run in about a minute."""

    big_bytes: int = 1024 * MIB  # scenarios 1 and 5
    repeats: int = 5  # scenario 1: runs of each 1 GiB transfer (the median is reported)
    medium_bytes: int = 10_000_000  # scenario 2: "a 10 MB file"
    clients: int = 500  # scenario 2
    rounds: int = 3  # scenario 2: rounds of concurrent downloads, pooled
    paced_streams: int = 100  # scenario 3
    paced_seconds: float = 30.0  # scenario 3
    startup_runs: int = 10  # scenario 4
    player_rate: int = 64 * MIB  # scenario 5: bytes per second the slow player reads
    tree_files: int = 10_000  # scenario 6

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            big_bytes=128 * MIB,
            repeats=3,
            clients=100,
            rounds=2,
            paced_streams=20,
            paced_seconds=10.0,
            startup_runs=5,
            tree_files=1000,
        )


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``value`` or ``ratio`` compared with ``threshold``."""

    text: str
    on: Literal["value", "ratio"]
    op: Literal["<=", ">="]
    threshold: float

    def met(self, value: float, ratio: float | None) -> bool | None:
        x = value if self.on == "value" else ratio
        if x is None:
            return None
        return x <= self.threshold if self.op == "<=" else x >= self.threshold


@dataclass
class Row:
    """One figure, its baseline (same unit, same run) and the target it answers to."""

    measure: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "SKIP"
        if self.target is None:
            return ""
        met = self.target.met(self.value, self.ratio)
        if met is None:
            return "SKIP"
        return "PASS" if met else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        return {
            "measure": self.measure,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_name": self.baseline_name,
            "ratio": self.ratio,
            "target": self.target.text if self.target else None,
            "verdict": self.verdict,
            "note": self.note,
        }


@dataclass
class Scenario:
    """What one scenario measured: rows for the table, notes, raw figures for the JSON."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "rows": [r.as_dict() for r in self.rows],
            "notes": self.notes,
            "raw": self.raw,
            "seconds": round(self.seconds, 2),
        }


# ---- formatting -----------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    """A figure with its unit, at a precision that suits the unit."""
    if value is None:
        return "-"
    if unit in ("MiB/s", "MB/s", "files/s"):
        return f"{value:,.0f} {unit}"
    if unit in ("ms", "MiB", "%"):
        return f"{value:,.1f} {unit}"
    if unit == "s":
        return f"{value:,.3f} s" if value < 10 else f"{value:,.1f} s"
    if unit == "µs":
        return f"{value:,.0f} µs"
    if unit in ("", "count"):
        return f"{value:,.0f}"
    return f"{value:,.3g} {unit}"


def fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def table_cells(row: Row) -> list[str]:
    baseline = fmt(row.baseline, row.unit)
    if row.baseline_name:
        shown = baseline if row.baseline is not None else "skipped"
        baseline = f"{shown} ({row.baseline_name})"
    measure = row.measure + (f" [{row.note}]" if row.note else "")
    return [
        measure,
        fmt(row.value, row.unit),
        baseline,
        fmt_ratio(row.ratio),
        row.target.text if row.target else "",
        row.verdict,
    ]


HEADERS = ["measure", "musiclib", "baseline", "ratio", "target", "result"]


def text_table(rows: Sequence[Row]) -> str:
    """A plain aligned table for the terminal."""
    cells = [HEADERS] + [table_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(scenarios: Sequence[Scenario]) -> str:
    """One Markdown table for every scenario (pasted into BENCHMARKS.md)."""
    out = ["| # | " + " | ".join(HEADERS) + " |", "|---|" + "---|" * len(HEADERS)]
    for sc in scenarios:
        for row in sc.rows:
            cells = [c.replace("|", "\\|") for c in table_cells(row)]
            out.append(f"| {sc.key} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ---- statistics -----------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile by the nearest-rank method (p99 of 500 is the 495th value)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def mib_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / MIB / seconds


# ---- /proc ----------------------------------------------------------------


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (``VmHWM``, ``VmRSS``), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def peak_rss_mib(pid: int) -> float | None:
    kib = proc_status_kib(pid, "VmHWM")
    return None if kib is None else kib / 1024


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds of a process: its own, and those of its children it has reaped."""

    own: float
    children: float

    @property
    def total(self) -> float:
        return self.own + self.children


def cpu_times(pid: int) -> CpuTimes:
    """utime+stime and cutime+cstime from /proc/PID/stat (the name may hold spaces)."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()
    # after the name: state(3) ... utime(14) stime(15) cutime(16) cstime(17), 1-based
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return CpuTimes((utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK)


def child_pids(pid: int) -> list[int]:
    """Live children of ``pid`` (every thread's), from /proc/PID/task/*/children."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            continue
    return out


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def accept_queue(port: int) -> int | None:
    """Connections waiting to be accepted on the loopback listener at ``port``.

    For a socket in LISTEN state (``0A``) /proc/net/tcp shows the accept queue's current
    length as ``rx_queue``. None when no such listener is found.
    """
    for line in read_text("/proc/net/tcp").splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            return int(queues.split(":")[1], 16)
    return None
