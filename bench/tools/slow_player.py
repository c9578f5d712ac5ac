"""A stand-in media player: reads standard input at a fixed rate and discards it.

``python bench/tools/slow_player.py BYTES_PER_SECOND``. It reads 64 KiB at a time and
sleeps as needed to stay at the rate (the sleeps are the pacing, not synchronisation), so a
client that saves and plays at once has to hold or re-read what the player has not taken.
"""

from __future__ import annotations

import os
import sys
import time

READ = 64 * 1024


def main() -> None:
    rate = float(sys.argv[1])
    began = time.monotonic()
    taken = 0
    fd = sys.stdin.fileno()
    while chunk := os.read(fd, READ):
        taken += len(chunk)
        ahead = taken / rate - (time.monotonic() - began)
        if ahead > 0:
            time.sleep(ahead)


if __name__ == "__main__":
    main()
