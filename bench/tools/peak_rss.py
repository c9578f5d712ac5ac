"""Run the musiclib CLI and record its peak RSS just before the interpreter exits.

``python -m bench.tools.peak_rss OUT ARGS...`` runs ``musiclib ARGS...`` in this process
(exactly what the ``musiclib`` entry point does; ``--import-only`` just imports the CLI)
and, from an ``atexit`` handler, writes ``VmHWM`` of /proc/self/status in KiB to OUT. The
high-water mark covers the whole life of the process, so reading it at exit misses
nothing; the player, a separate process, is not counted.
"""

from __future__ import annotations

import atexit
import sys


def _record(out: str) -> None:
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(out, "w") as f:
        f.write(hwm + "\n")


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    atexit.register(_record, out)
    from musiclib.cli import main as cli_main

    if args == ["--import-only"]:  # the baseline: the CLI imported, nothing run
        return

    sys.argv = ["musiclib", *args]
    cli_main(args)  # exits by itself on errors, returns on success


if __name__ == "__main__":
    main()
