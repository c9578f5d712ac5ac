"""Run the benchmark scenarios, print a table for each, write ``bench/results.json``.

``python -m bench [--quick] [--only NAME ...]`` (or ``python bench/run.py``). Scenario
names: ``download``, ``concurrent``, ``paced``, ``startup``, ``client-rss``, ``index``,
``live``, ``cli``, ``workers``, ``relay``, ``cluster`` (or their numbers 1-11). A scenario that
fails is reported as an error and the others still run; the exit status is 1 if any
failed to run (a FAIL against a target is a finding, not an error, and leaves the status
at 0).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BENCH_DIR,
    PYTHON,
    Scenario,
    Sizes,
    markdown_table,
    read_text,
    text_table,
)

#: CPU use by others (percent of all cores) above which a scenario gets a "noisy" note
BUSY_PCT = 15.0
#: how long the machine is watched, idle on our side, before each scenario
BUSY_WINDOW = 1.0
#: (number, name, module) in the issue's order
SCENARIOS = (
    ("1", "download", "bench.s1_download"),
    ("2", "concurrent", "bench.s2_concurrent"),
    ("3", "paced", "bench.s3_paced"),
    ("4", "startup", "bench.s4_startup"),
    ("5", "client-rss", "bench.s5_client_rss"),
    ("6", "index", "bench.s6_index"),
    ("7", "live", "bench.s7_live"),
    ("8", "cli", "bench.s8_cli"),
    ("9", "workers", "bench.s9_workers"),
    ("10", "relay", "bench.s10_relay"),
    ("11", "cluster", "bench.s11_cluster"),
    ("12", "wyoming", "bench.s12_wyoming"),
)


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpuinfo = read_text("/proc/cpuinfo")
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line),
        platform.processor() or "unknown",
    )
    mem_kib = next(
        (
            int(line.split()[1])
            for line in read_text("/proc/meminfo").splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": _version(["nginx", "-v"]).removeprefix("nginx version: "),
        "curl": " ".join(_version(["curl", "--version"]).split()[:2]),
        "ffmpeg": _ffmpeg_version(),
    }


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _cpu_jiffies() -> tuple[int, int]:
    fields = [int(x) for x in read_text("/proc/stat").split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields), idle


def background_busy() -> float:
    """Percent of all cores busy over BUSY_WINDOW while this suite does nothing."""
    total0, idle0 = _cpu_jiffies()
    time.sleep(BUSY_WINDOW)  # a measurement window, not synchronisation
    total1, idle1 = _cpu_jiffies()
    total = total1 - total0
    return 100.0 * (total - (idle1 - idle0)) / total if total else 0.0


def _ffmpeg_version() -> str:
    try:
        import imageio_ffmpeg

        return f"imageio-ffmpeg {imageio_ffmpeg.get_ffmpeg_version()}"
    except Exception as exc:  # reported, not fatal: the decoded scenarios will fail loudly
        return f"unavailable ({exc})"


def select(only: list[str]) -> list[tuple[str, str, str]]:
    if not only:
        return list(SCENARIOS)
    chosen = [s for s in SCENARIOS if s[0] in only or s[1] in only]
    unknown = set(only) - {s[0] for s in chosen} - {s[1] for s in chosen}
    if unknown:
        names = ", ".join(f"{n} ({k})" for k, n, _ in SCENARIOS)
        raise SystemExit(f"unknown scenario {', '.join(sorted(unknown))}; choose from {names}")
    return chosen


def run_one(key: str, name: str, module: str, sizes: Sizes) -> tuple[Scenario, bool]:
    busy = background_busy()
    print(f"\n== scenario {key}: {name} (CPU busy before it: {busy:.0f}%)", flush=True)
    began = time.perf_counter()
    try:
        scenario: Scenario = importlib.import_module(module).run(sizes)
        ok = True
    except Exception as exc:  # report it and go on with the others
        traceback.print_exc()
        scenario = Scenario(key, name)
        scenario.notes.append(f"ERROR: {type(exc).__name__}: {exc}")
        ok = False
    scenario.seconds = time.perf_counter() - began
    scenario.raw["cpu_busy_before_pct"] = busy
    if busy > BUSY_PCT:
        scenario.notes.append(
            f"other processes kept the CPUs {busy:.0f}% busy just before this scenario: "
            "its figures may be noisy"
        )
    print(f"-- {scenario.title} ({scenario.seconds:.0f} s)")
    if scenario.rows:
        print(text_table(scenario.rows))
    for note in scenario.notes:
        print(f"   note: {note}")
    return scenario, ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="NAME",
        help="scenarios to run, by name or number: "
        + ", ".join(f"{n} ({k})" for k, n, _ in SCENARIOS),
    )
    parser.add_argument(
        "--output", type=Path, default=BENCH_DIR / "results.json", help="where the JSON goes"
    )
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    chosen = select(args.only)
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    results: list[Scenario] = []
    failed = False
    for key, name, module in chosen:
        scenario, ok = run_one(key, name, module, sizes)
        results.append(scenario)
        failed |= not ok
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command.strip(),
        "python_executable": PYTHON,
        "machine": info,
        "sizes": vars(sizes),
        "scenarios": [s.as_dict() for s in results],
    }
    args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.output}\n")
    print(markdown_table(results))
    for sc in results:
        for note in sc.notes:
            print(f"\n- scenario {sc.key}: {note}", end="")
    print()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
