"""What the end-to-end tests of live audio share: the server, the CLI and the API client.

A plain module next to the tests (like ``audio_env``), imported by
tests/test_e2e_live.py and tests/test_e2e_devices.py: a fresh server with
channels (:func:`live_server`), the real CLI run to its end (:func:`run_cli_async`)
or in the background (:func:`cli_process`, :func:`finish`), a listen through the
library's own client (:func:`hear`, :class:`Heard`), the server's channels
(:func:`channel_infos`, :func:`wait_for_channel`) and its ffmpeg children.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import REPO, ServerProcess, children_of, client_env

from musiclib.client import open_client
from musiclib.decode import ffmpeg_executable
from musiclib.errors import NotFound
from musiclib.library import Library
from musiclib.protocol import Audio, ChannelInfo, GapNotice, ListenEnd, ListenStart
from musiclib.server import Server, ServerConfig

#: the ffmpeg the server runs for its sources and converters (conftest strips
#: MUSICLIB_FFMPEG from its environment)
FFMPEG = ffmpeg_executable({})
#: seconds any CLI run, listen or local ffmpeg run may take before the test fails
IO_TIMEOUT = 30.0
#: how often a waiting test looks again (channels, /proc)
POLL = 0.02


def assert_same_bytes(got: bytes, want: bytes, what: str) -> None:
    """Byte-for-byte equality, reported as sizes and the first differing offset."""
    if got == want:
        return
    if len(got) < len(want) and want.startswith(got):
        pytest.fail(f"{what}: got only the first {len(got)} of {len(want)} bytes")
    first = next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
        min(len(got), len(want)),
    )
    pytest.fail(f"{what}: got {len(got)} bytes, want {len(want)}; first difference at {first}")


# ---------------------------------------------------------------------------- numbered samples

#: bytes per frame of the numbered samples (s16le, mono)
NUMBERED_BPF = 2


def frames(n: int, first: int = 0) -> bytes:
    """Frames ``first`` .. ``first + n``: each frame's two bytes name its position."""
    return b"".join((p % 65536).to_bytes(2, "little") for p in range(first, first + n))


def check_cover(events: list[Audio | GapNotice], start: int) -> tuple[int, int]:
    """Audio and gaps continue each other from ``start`` and each audio frame carries its
    own position's samples (:func:`frames`). Returns (audio frames, gap frames)."""
    position, audio, lost = start, 0, 0
    for event in events:
        assert event.position == position, f"{event!r} where {position} was due"
        if isinstance(event, Audio):
            n = len(event.payload) // NUMBERED_BPF
            assert event.payload == frames(n, position)
            audio += n
        else:
            n = event.frames
            lost += n
        position += n
    return audio, lost


# ---------------------------------------------------------------------------- servers


def live_server(
    start_server: Callable[..., ServerProcess],
    tmp_path: Path,
    *channels: str,
    args: Sequence[str] = (),
) -> ServerProcess:
    """A fresh server over an empty root (or ``tmp_path/root`` if present) with
    ``--channel`` for each of ``channels``, then ``args``.

    Started after the fixtures set the environment, so its PortAudio sees their devices.
    """
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    extra = [a for spec in channels for a in ("--channel", spec)]
    return start_server(root, *extra, *args)


# ---------------------------------------------------------------------------- the CLI


def cli_argv(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "musiclib", *(os.fspath(a) for a in args)]


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: bytes
    stderr: str

    def lines(self) -> list[str]:
        """Standard error's lines (never a traceback)."""
        assert "Traceback" not in self.stderr, self.stderr
        return self.stderr.strip().splitlines()

    def summary(self) -> str:
        """The one line a listen or publish writes on standard error (no traceback)."""
        lines = self.lines()
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("musiclib: "), self.stderr
        return lines[0]


async def run_cli_async(
    *args: str | os.PathLike[str], server: str, stdin: bytes | None = None
) -> Finished:
    """The real CLI to its end (killed and failed after IO_TIMEOUT)."""
    with trio.fail_after(IO_TIMEOUT):
        done = await trio.run_process(
            cli_argv(*args),
            cwd=REPO,
            env=client_env({"MUSICLIB_SERVER": server}),
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return Finished(done.returncode, done.stdout, done.stderr.decode("utf-8", "replace"))


@asynccontextmanager
async def cli_process(
    *args: str | os.PathLike[str], server: str, stdin: int = subprocess.DEVNULL
) -> AsyncIterator[trio.Process]:
    """The real CLI in the background; killed (if it still runs) and reaped on the way out."""
    process = await trio.lowlevel.open_process(
        cli_argv(*args),
        cwd=REPO,
        env=client_env({"MUSICLIB_SERVER": server}),
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            with trio.move_on_after(10):
                await process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()


async def read_all(stream: trio.abc.ReceiveStream | None) -> bytes:
    assert stream is not None
    data = bytearray()
    while chunk := await stream.receive_some(256 * 1024):
        data += chunk
    return bytes(data)


async def finish(process: trio.Process, timeout: float = IO_TIMEOUT) -> Finished:
    """Everything the process writes, and its exit status (failing after ``timeout``)."""
    out: dict[str, bytes] = {}

    async def drain(name: str, stream: trio.abc.ReceiveStream | None) -> None:
        out[name] = await read_all(stream)

    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, "stdout", process.stdout)
            nursery.start_soon(drain, "stderr", process.stderr)
        status = await process.wait()
    return Finished(status, out["stdout"], out["stderr"].decode("utf-8", "replace"))


# ---------------------------------------------------------------------------- the API client


@dataclass
class Heard:
    """One listen through the library's client: its start, every event in order, its end."""

    start: ListenStart
    events: list[Audio | GapNotice] = field(default_factory=list)
    end: ListenEnd | None = None

    @property
    def bpf(self) -> int:
        return self.start.bytes_per_frame

    def frames_of(self, event: Audio | GapNotice) -> int:
        return event.frames if isinstance(event, GapNotice) else len(event.payload) // self.bpf

    @property
    def chunks(self) -> list[Audio]:
        return [e for e in self.events if isinstance(e, Audio)]

    @property
    def gaps(self) -> list[GapNotice]:
        return [e for e in self.events if isinstance(e, GapNotice)]

    @property
    def stop_position(self) -> int:
        """The position after the last event."""
        if not self.events:
            return self.start.position
        last = self.events[-1]
        return last.position + self.frames_of(last)

    def samples(self) -> bytes:
        return b"".join(c.payload for c in self.chunks)

    def assert_contiguous(self) -> None:
        """Every event starts where the previous one ended, from the start's position on."""
        position = self.start.position
        for event in self.events:
            assert event.position == position, (
                f"{type(event).__name__} at {event.position}, expected {position}"
            )
            if isinstance(event, Audio):
                assert event.payload and len(event.payload) % self.bpf == 0
            position += self.frames_of(event)

    def assert_contiguous_audio(self) -> None:
        """Audio only (no gap), each chunk starting where the one before ended."""
        assert self.gaps == [], f"gaps: {self.gaps[:3]}"
        self.assert_contiguous()

    def assert_matches(self, reference: bytes, what: str) -> None:
        """Each chunk is the reference's frames at the chunk's position (reference = position 0)."""
        for chunk in self.chunks:
            at = chunk.position * self.bpf
            want = reference[at : at + len(chunk.payload)]
            assert len(want) == len(chunk.payload), f"{what}: the reference ends before {at}"
            assert_same_bytes(chunk.payload, want, f"{what} at position {chunk.position}")


async def hear(
    address: str,
    channel: str,
    *,
    until: trio.Event | None = None,
    joined: trio.Event | None = None,
    retry: bool = False,
    **request: Any,
) -> Heard:
    """Listen to ``channel`` until it ends (or ``until`` is set: then stop the listen).

    ``retry``: while the channel does not exist yet, ask again every few
    milliseconds. ``joined`` is set once the server accepted the listen.
    """
    async with open_client(address, timeout=IO_TIMEOUT, version=2) as client:
        while True:
            try:
                async with client.listen(channel, **request) as audio:
                    assert audio.start is not None
                    heard = Heard(audio.start)
                    if joined is not None:
                        joined.set()
                    async with trio.open_nursery() as nursery:
                        if until is not None:

                            async def stop_when_told(event: trio.Event = until) -> None:
                                await event.wait()
                                await audio.stop()

                            nursery.start_soon(stop_when_told)
                        async for event in audio:
                            heard.events.append(event)
                        nursery.cancel_scope.cancel()
                    heard.end = audio.end
                return heard
            except NotFound:
                if not retry:
                    raise
                await trio.sleep(0.002)


async def channel_infos(address: str) -> dict[str, ChannelInfo]:
    async with open_client(address, timeout=IO_TIMEOUT, version=2) as client:
        return {c.name: c for c in await client.channels()}


async def wait_for_channel(
    address: str,
    name: str,
    *,
    listeners: int = 0,
    position: int = 0,
    timeout: float = IO_TIMEOUT,
) -> ChannelInfo:
    """Poll until channel ``name`` exists with at least ``listeners`` listeners and
    ``position`` frames published."""
    with trio.fail_after(timeout):
        async with open_client(address, timeout=IO_TIMEOUT, version=2) as client:
            while True:
                info = {c.name: c for c in await client.channels()}.get(name)
                if info is not None and info.listeners >= listeners and info.position >= position:
                    return info
                await trio.sleep(POLL)


# ---------------------------------------------------------------------------- processes


def ffmpeg_children(pid: int) -> list[int]:
    """The pids of ``pid``'s children that run the bundled ffmpeg (zombies included)."""
    ffmpeg = os.path.realpath(FFMPEG)
    return [c.pid for c in children_of(pid) if c.state == "Z" or c.exe == ffmpeg]


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie does not)."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# ---- the real Server in the test's own process (no socket of its own) -------------------


@contextmanager
def in_process_server(tmp_path: Path, files: dict[str, bytes] | None = None) -> Iterator[Server]:
    """A real :class:`Server` on an indexed folder of ``files``, with time limits so large
    that on a mock clock only the sources' sleeps make time pass; connections are handed
    to ``server.handle`` by the test (memory streams or socket pairs)."""
    root = tmp_path / "lib"
    root.mkdir()
    for name, data in (files or {}).items():
        (root / name).write_bytes(data)
    config = ServerConfig(
        root=root, index=tmp_path / "index.db", send_timeout=1e6, idle_timeout=1e6
    )
    with Library(root, config.index) as library:
        library.rescan()
        yield Server(library, config)


@asynccontextmanager
async def running(server: Server, timeout: float) -> AsyncIterator[trio.Nursery]:
    """The server's channel registry running as ``serve()`` starts it; a nursery for
    connection handlers and sources. A test that hangs fails after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.channels.run, [])
            yield nursery
            nursery.cancel_scope.cancel()
