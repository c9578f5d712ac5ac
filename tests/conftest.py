"""Shared fixtures: the real server as a subprocess, the real CLI, the shipped tracks.

Everything here talks over 127.0.0.1 only. Every wait has a deadline and every
process started here is reaped: servers get SIGTERM (and must exit 0, as the
spec says), then SIGKILL if they ignore it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Property tests run a few hundred cases in the normal suite; `make fuzz` selects the
# "fuzz" profile (pytest --hypothesis-profile=fuzz): 40 000 cases for each of the three
# protocol properties, 120 000 in all, in about four minutes on two cores.
settings.register_profile("musiclib", max_examples=300, deadline=None)
settings.register_profile(
    "fuzz",
    max_examples=40_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("musiclib")

REPO = Path(__file__).resolve().parent.parent
LIBRARY = REPO / "library"
MEDIA_EXTENSIONS = frozenset(
    {"wav", "mp3", "ogg", "opus", "flac", "m4a", "aac", "aif", "aiff", "wv"}
)

#: seconds a server gets to say it listens (and has indexed its root)
STARTUP_TIMEOUT = 15.0
#: seconds a server gets to exit after SIGTERM
STOP_TIMEOUT = 10.0

# any bound address (127.0.0.1, 0.0.0.0, [::1]); clients always connect to 127.0.0.1
_LISTENING = re.compile(r"listening on \[?[0-9A-Fa-f.:]+\]?:(\d+)")
_INDEXED = re.compile(r"indexed \d+ tracks")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every index (ours and the servers' we start) goes to a cache folder of this run,
    never to the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield cache
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous


def library_server(root: Path, files: dict[str, bytes], **config: Any) -> Any:
    """A ``musiclib.server.Server`` (not listening: tests hand its ``handle`` a stream)
    of ``files`` written under ``root`` and scanned, with ``config`` for its settings."""
    from musiclib.library import Library
    from musiclib.server import Server, ServerConfig

    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    library = Library(root)
    library.rescan()
    return Server(library, ServerConfig(root=root, **config))


def serve_on_taken_port(
    args: Callable[[int], Sequence[str | os.PathLike[str]]],
) -> subprocess.CompletedProcess[str]:
    """Run ``musiclib serve`` with ``args(port)`` while ``port`` is held by a plain
    listener of this process (a server it must not share the port with); its result."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        return subprocess.run(
            [sys.executable, "-m", "musiclib", "serve", *args(port)],
            cwd=REPO,
            env=client_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def media_files(root: Path) -> list[str]:
    """Every media file under ``root`` as a sorted list of relative posix paths."""
    found = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix[1:].lower() in MEDIA_EXTENSIONS
    ]
    return sorted(found)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``shipped_track`` parametrizes a test over every media file under library/."""
    if "shipped_track" in metafunc.fixturenames:
        tracks = media_files(LIBRARY) if LIBRARY.is_dir() else []
        metafunc.parametrize("shipped_track", tracks, ids=tracks)


@pytest.fixture(scope="session")
def shipped_tracks() -> list[str]:
    """The shipped demo library's media files, relative to library/, as posix paths."""
    tracks = media_files(LIBRARY) if LIBRARY.is_dir() else []
    if not tracks:
        pytest.skip("the demo library has not been generated (python library/generate.py)")
    return tracks


def client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: ours minus any MUSICLIB_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICLIB_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ServerProcess:
    """A running ``musiclib serve``; its stderr is drained by a thread into :meth:`log`."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.address = ""
        self.port = 0
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str] | None = None) -> ServerProcess:
        """Start ``argv`` (a ``musiclib serve``) from the repository, as the tests' client
        environment (plus ``env``), its stderr drained into :meth:`log`."""
        process = subprocess.Popen(
            argv,
            cwd=REPO,
            env=client_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        return cls(process)

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for raw in iter(self.process.stderr.readline, b""):
            with self._changed:
                self._lines.append(raw.decode("utf-8", "replace"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def log(self) -> str:
        """Everything the server wrote to stderr so far."""
        with self._changed:
            return "".join(self._lines)

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 15.0) -> re.Match[str]:
        """Wait until the log matches ``pattern``; fail the test after ``timeout`` seconds."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = regex.search("".join(self._lines))
                if match:
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    pytest.fail(
                        f"server log never matched {regex.pattern!r} "
                        f"(exit status {self.process.poll()}); log:\n{''.join(self._lines)}"
                    )
                self._changed.wait(min(left, 0.5))

    def stop(self) -> int:
        """SIGTERM, wait up to STOP_TIMEOUT, SIGKILL if needed; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
            pytest.fail(f"server ignored SIGTERM for {STOP_TIMEOUT:g} s; log:\n{self.log()}")
        self._reader.join(timeout=5)
        return self.process.returncode


@contextmanager
def running_server(
    root: Path,
    *extra_args: str,
    log_level: str = "debug",
    wait_indexed: bool = True,
    wrapper: Sequence[str] = (),
) -> Iterator[ServerProcess]:
    """Start ``musiclib serve --root ROOT --port 0``, wait until it has indexed (or only
    until it listens: ``wait_indexed=False``), stop it after. ``wrapper`` runs before
    the interpreter (e.g. ``setpriv`` to drop a capability).

    On the way out the server must exit 0 on SIGTERM (unless the test stopped it
    already) and must not have logged a traceback (always a bug).
    """
    argv = [*wrapper, sys.executable, "-m", "musiclib", "serve", "--root", str(root)]
    argv += ["--port", "0", "--log-level", log_level, *extra_args]
    if not any(arg.startswith("--workers") for arg in extra_args):
        # one process, as the tests were written for (its limits, its log lines);
        # `serve`'s default is one worker per core (tests/test_workers.py covers that)
        argv += ["--workers", "1"]
    server = ServerProcess.start(argv)
    try:
        match = server.wait_for_log(_LISTENING, timeout=STARTUP_TIMEOUT)
        server.port = int(match.group(1))
        server.address = f"127.0.0.1:{server.port}"
        # The index is built in the background after the listener opens; a list
        # taken before it is done may be partial (the reply says so).
        if wait_indexed:
            server.wait_for_log(_INDEXED, timeout=STARTUP_TIMEOUT)
        yield server
    finally:
        status = server.stop()
    assert status == 0, f"server exited with status {status}; log:\n{server.log()}"
    assert "Traceback" not in server.log(), server.log()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One server over the shipped library/, shared by the tests that only read from it."""
    if not media_files(LIBRARY):
        pytest.skip("the demo library has not been generated (python library/generate.py)")
    with running_server(LIBRARY) as srv:
        yield srv


@pytest.fixture
def start_server() -> Iterator[Callable[[Path], ServerProcess]]:
    """Factory: ``start_server(root)`` runs a fresh server over ``root`` for this test only."""
    with ExitStack() as stack:

        def start(root: Path, *extra_args: str) -> ServerProcess:
            return stack.enter_context(running_server(root, *extra_args))

        yield start


def _cli_argv(args: tuple[str | os.PathLike[str], ...]) -> list[str]:
    return [sys.executable, "-m", "musiclib", *(os.fspath(a) for a in args)]


def run_cli(
    *args: str | os.PathLike[str],
    server: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[Any]:
    """Run the real CLI; ``stdout`` comes back as bytes, ``stderr`` as text.

    ``server`` becomes MUSICLIB_SERVER. A run that outlives ``timeout`` is
    killed by ``subprocess.run`` and fails the test.
    """
    extra = dict(env or {})
    if server is not None:
        extra.setdefault("MUSICLIB_SERVER", server)
    result = subprocess.run(
        _cli_argv(args),
        cwd=cwd or REPO,
        env=client_env(extra),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout, result.stderr.decode("utf-8", "replace")
    )


@pytest.fixture
def cli(server: ServerProcess) -> Callable[..., subprocess.CompletedProcess[Any]]:
    """``run_cli`` aimed at the shared server (``server=`` still overrides it)."""

    def run(*args: str | os.PathLike[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        kwargs.setdefault("server", server.address)
        return run_cli(*args, **kwargs)

    return run


@pytest.fixture
def cli_popen() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Factory for CLI runs in the background; any still running at teardown is killed."""
    started: list[subprocess.Popen[bytes]] = []

    def popen(
        *args: str | os.PathLike[str], server: str, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            _cli_argv(args),
            cwd=cwd or REPO,
            env=client_env({"MUSICLIB_SERVER": server}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        started.append(process)
        return process

    try:
        yield popen
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()


# ---------------------------------------------------------------------------------------------
# Sound devices without a sound card (musiclib.devices, issue 11). The machinery, and what
# PulseAudio and PortAudio preserve, is in tests/audio_env.py; these fixtures only call it.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Child:
    """A process, as /proc shows it."""

    pid: int
    name: str  # the kernel's comm: the executable's name, cut to 15 characters
    state: str  # "R", "S", ... "Z" for a zombie
    exe: str | None  # None for a zombie, or when it exited while we looked


def children_of(ppid: int) -> list[Child]:
    """Every process whose parent is ``ppid`` right now, zombies included."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:  # it went away meanwhile
            continue
        head, _, rest = stat.rpartition(")")  # the name may hold spaces and parentheses
        fields = rest.split()
        if int(fields[1]) != ppid:
            continue
        try:
            exe: str | None = os.readlink(f"/proc/{entry}/exe")
        except OSError:
            exe = None
        found.append(Child(int(entry), head.split("(", 1)[1], fields[0], exe))
    return found


def count_locates(lib: Any) -> list[str]:
    """Make a Library's ``locate`` record its calls (before a Maintainer takes the method):
    the names asked, in order, for tests of the name cache."""
    asked: list[str] = []
    real = lib.locate

    def locate(name: str) -> Any:
        asked.append(name)
        return real(name)

    lib.locate = locate
    return asked


import audio_env  # noqa: E402  (a plain module next to this file)


@pytest.fixture(scope="session")
def pulse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[audio_env.Pulse]:
    """A private PulseAudio daemon for the rest of the session: paplay into ``mic`` is the
    default input, the default output is heard on ``spk.monitor``. Sets XDG_RUNTIME_DIR,
    HOME and PULSE_SERVER for this process and its children; skips if a part is missing."""
    problem = audio_env.pulse_problem()
    if problem is not None:
        pytest.skip(problem)
    with audio_env.running_pulse(tmp_path_factory.mktemp("pulse")) as daemon:
        yield daemon


@pytest.fixture
def alsa_file_input(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., audio_env.FileInput]]:
    """Factory: ``alsa_file_input(data, paced=False)`` defines an ALSA input device that
    yields ``data`` byte for byte, for this test (one at a time); ``paced`` needs ``pulse``."""
    problem = audio_env.portaudio_problem()
    if problem is not None:
        pytest.skip(problem)
    with ExitStack() as stack:

        def make(data: bytes, *, paced: bool = False) -> audio_env.FileInput:
            if paced:
                problem = audio_env.pulse_problem()
                if problem is not None:
                    pytest.skip(problem)
                request.getfixturevalue("pulse")
            stack.close()  # the previous one, if any: the environment holds one device
            return stack.enter_context(audio_env.file_input(tmp_path, data, paced=paced))

        yield make
