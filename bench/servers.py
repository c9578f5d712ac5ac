"""Servers under test, each a subprocess started and always stopped by a context manager.

* :func:`musiclib_server`: the real ``python -m musiclib serve --port 0 --log-level info``;
  the port comes from its ``listening on 127.0.0.1:PORT`` log line (logged at INFO).
* :func:`sendfile_server`: :mod:`bench.sendfile_server`, the plain ``socket.sendfile``
  baseline, which prints the same kind of line on its standard output.
* :func:`nginx_server`: nginx with a minimal configuration in a temporary folder, when
  nginx is installed (``None`` otherwise; the caller reports the skip).

A reader thread drains the announcing pipe for the whole life of the process (a full pipe
would stall a server that logs every connection) and sets an event on the ready line or
at end of file, so nothing here sleeps to synchronise. Stopping is SIGTERM, a bounded wait,
then SIGKILL.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from bench.common import PYTHON, REPO, peak_rss_mib

_LISTENING = re.compile(r"listening on (\S+):(\d+)")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class ServerProcess:
    """A running server subprocess and the address it announced."""

    def __init__(
        self,
        argv: list[str],
        announce_on: str = "stderr",
        on_line: Callable[[float, str], None] | None = None,
    ) -> None:
        self.argv = argv
        self._on_line = on_line
        pipe = subprocess.PIPE
        self.process = subprocess.Popen(
            argv,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=pipe if announce_on == "stdout" else subprocess.DEVNULL,
            stderr=pipe if announce_on == "stderr" else subprocess.DEVNULL,
        )
        stream = self.process.stdout if announce_on == "stdout" else self.process.stderr
        assert stream is not None
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self.address = ""
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            if self._on_line is not None:
                self._on_line(time.perf_counter(), line)
            self.lines.append(line)
            match = _LISTENING.search(line)
            if match and not self.address:
                self.address = f"{match.group(1)}:{match.group(2)}"
                self._ready.set()
        self._ready.set()  # end of file: the process is gone; wait_ready() reports it

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> str:
        """Block until the ready line; the address, or RuntimeError with the last lines."""
        if not self._ready.wait(timeout) or not self.address:
            tail = "\n    ".join(self.lines)
            raise RuntimeError(f"{self.argv[:4]} did not become ready:\n    {tail}")
        return self.address

    def peak_rss_mib(self) -> float | None:
        return peak_rss_mib(self.pid)

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        return self.process.returncode


@contextmanager
def musiclib_server(
    root: Path, *options: str, on_line: Callable[[float, str], None] | None = None
) -> Iterator[ServerProcess]:
    """``musiclib serve --root ROOT --port 0`` (plus ``options``), ready when yielded.

    ``on_line(when, line)`` is called in the reader thread for every log line, with
    ``time.perf_counter()`` at the moment it was read (to time what the server logs).
    """
    argv = [PYTHON, "-m", "musiclib", "serve", "--root", str(root), "--port", "0"]
    # every benchmark client comes from 127.0.0.1: no per-address caps, or they are measured
    argv += ["--max-per-address", "0", "--max-decodes-per-address", "0"]
    if not any(option.startswith("--workers") for option in options):
        argv += ["--workers", "1"]  # the single process every scenario but 9 measures
    server = ServerProcess([*argv, "--log-level", "info", *options], on_line=on_line)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@contextmanager
def sendfile_server(path: Path, mode: str, sha256: str = "") -> Iterator[ServerProcess]:
    """The baseline server (``raw``: the file, then close; ``framed``: musiclib frames)."""
    argv = [PYTHON, "-m", "bench.sendfile_server", "--file", str(path), "--mode", mode]
    server = ServerProcess([*argv, "--sha256", sha256], announce_on="stdout")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


async def wait_scanned(address: str, expected: int, timeout: float = 120.0) -> float:
    """Poll until the server's ``welcome`` says the scan is done with ``expected`` tracks.

    The server offers no "scan finished" notification, so this polls every 20 ms,
    bounded by ``timeout``. Each poll is a handshake only (``welcome`` carries ``tracks``
    and ``scanning``): a full ``list`` of thousands of tracks would load the server and
    slow the very scan being timed. Returns the seconds taken.
    """
    import trio

    from musiclib.client import open_client

    began = trio.current_time()
    with trio.fail_after(timeout):
        while True:
            async with open_client(address) as client:
                welcome = client.welcome
                assert welcome is not None
                if not welcome.scanning and welcome.tracks >= expected:
                    return trio.current_time() - began
            await trio.sleep(0.02)


async def wait_indexed(address: str, expected: int, timeout: float = 120.0) -> float:
    """:func:`wait_scanned`, then one ``list`` that must agree (``ListEnd.scanning`` false,
    ``count`` at least ``expected``); the seconds taken in all."""
    import trio

    from musiclib.client import open_client

    began = trio.current_time()
    with trio.fail_after(timeout):
        while True:
            await wait_scanned(address, expected, timeout)
            async with open_client(address) as client:
                _, end = await client.list()
            if not end.scanning and end.count >= expected:
                return trio.current_time() - began


# ---- nginx ----------------------------------------------------------------


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def curl_binary() -> str | None:
    return shutil.which("curl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nginx_conf(prefix: Path, root: Path, port: int) -> str:
    temp = "\n".join(
        f"  {kind}_temp_path {prefix}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
{temp}
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""


class NginxProcess:
    """nginx's master process and, once it runs, its one worker."""

    def __init__(self, process: subprocess.Popen[bytes], address: str) -> None:
        self.process = process
        self.address = address

    @property
    def pid(self) -> int:
        return self.process.pid

    def peak_rss_mib(self) -> float | None:
        """VmHWM of the master plus the worker(s)."""
        from bench.common import child_pids

        pids = [self.pid, *child_pids(self.pid)]
        values = [peak_rss_mib(p) for p in pids]
        return sum(v for v in values if v is not None) if any(values) else None


def _wait_connectable(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    """nginx prints no ready line: poll connect() every 10 ms, bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with status {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.01)
    raise RuntimeError("nginx did not accept connections in time")


@contextmanager
def nginx_server(root: Path) -> Iterator[NginxProcess | None]:
    """nginx serving ``root`` on a free port, or ``None`` if nginx is not installed."""
    binary = nginx_binary()
    if binary is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        prefix = Path(tmp)
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(_nginx_conf(prefix, root, port))
        argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed: {check.stderr.strip()}")
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            _wait_connectable(port, process, READY_TIMEOUT)
            yield NginxProcess(process, f"127.0.0.1:{port}")
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
