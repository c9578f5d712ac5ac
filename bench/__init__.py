"""musiclib's benchmark suite (issue 5): ``python -m bench [--quick] [--only NAME ...]``.

Every scenario runs the real server as a subprocess on loopback, measures it, measures a
baseline in the same run (a plain ``socket.sendfile`` server written here, nginx and curl
when installed, ffmpeg alone, the bare interpreter...), and prints both with their ratio
and the issue's target. Data files are generated once under ``bench/data/`` and reused.

This package imports nothing heavy at import time: ``bench.peak_rss`` and
``bench.sendfile_server`` run as small helper processes.
"""
