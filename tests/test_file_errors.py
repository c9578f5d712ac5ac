"""Every way a request on a file can fail ends in its documented error, never ``internal``.

Issue 12, items 5 to 7. The walk (:func:`test_every_file_error_path`) runs each
request on a file (``info``, ``info`` with its checksum, ``stream`` original
and decoded) against each thing that can happen to the file after it was
indexed, over memory streams with a real :class:`Server`; then the server
must answer the next request on the same connection and must have logged no
error. Changes while a file is sent are driven step by step: the reader
stops, the file changes, the reader goes on, so the outcome does not depend
on who runs first. The end-to-end tests run the real CLI against a real
server: an unreadable file (as root, the server runs without the capability
that lets root read any file), and sources whose rate or channels lie outside
what the protocol can carry.
"""

from __future__ import annotations

import array
import io
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from conftest import ServerProcess, run_cli, running_server

from musiclib.client import Client
from musiclib.errors import Changed, ServerError
from musiclib.library import Library
from musiclib.protocol import HEADER, KIND_MESSAGE, StreamEnd, StreamRequest, StreamStart
from musiclib.server import Server, ServerConfig
from musiclib.transport import Transport

#: seconds any wait of a client here may take before the test fails (never reached when it passes)
TIMEOUT = 30.0
CHUNK = 64 * 1024


def wav_bytes(rate: int, channels: int, seconds: float) -> bytes:
    """A 16-bit PCM WAV of a 440 Hz square-ish wave on every channel."""
    frames = round(rate * seconds)
    period = max(2, rate // 440)
    one = array.array("h", [3000 if (i % period) < period // 2 else -3000 for i in range(frames)])
    samples = array.array("h", (v for v in one for _ in range(channels)))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


GOOD = wav_bytes(8000, 1, 0.5)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "good.wav").write_bytes(GOOD)
    (lib / "victim.wav").write_bytes(wav_bytes(8000, 2, 0.5))
    (lib / "big.mp3").write_bytes(os.urandom(2 * 1024 * 1024))
    (tmp_path / "outside.wav").write_bytes(GOOD)
    return lib


@pytest.fixture
def server(root: Path) -> Server:
    library = Library(root, workers=0)
    library.rescan()
    return Server(library, ServerConfig(root=root, chunk_size=CHUNK))


@asynccontextmanager
async def connected(
    server: Server, pair: Callable[[], tuple[Any, Any]] = trio.testing.memory_stream_pair
) -> AsyncIterator[Client]:
    """A handshaken Client talking to ``server.handle`` through an in-memory stream pair."""
    client_stream, server_stream = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, server_stream, "memory")
        client = Client(client_stream, timeout=TIMEOUT)
        await client.handshake()
        try:
            yield client
        finally:
            await client.aclose()


@pytest.fixture
def no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail the test if the server logged an error (an ``internal`` always logs one)."""
    with caplog.at_level(logging.INFO, logger="musiclib"):
        yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or "internal" in r.getMessage()]
    assert not bad, "\n".join(r.getMessage() for r in bad)


async def outcome(client: Client, request: str, track: str) -> str:
    """``"ok"`` or the error code the server answered ``request`` on ``track`` with."""
    try:
        if request == "info":
            await client.info(track)
        elif request == "info checksum":
            await client.info(track, checksum=True)
        else:
            reader = client.stream(track) if request == "original" else client.decode(track)
            async with reader as stream:
                async for _ in stream:
                    pass
                assert stream.end is not None
    except ServerError as exc:
        return exc.code
    return "ok"


async def still_serves(server: Server, client: Client) -> None:
    """The same connection and a new one both get good.wav's bytes."""
    async with client.stream("good.wav") as stream:
        assert b"".join([chunk async for chunk in stream]) == GOOD
    async with connected(server) as fresh:
        assert (await fresh.info("good.wav")).path == "good.wav"


def _unlink(path: Path) -> None:
    path.unlink()


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _socket(path: Path) -> None:
    path.unlink()
    with socket.socket(socket.AF_UNIX) as sock:  # opening it: ENXIO
        sock.bind(str(path))


def _symlink_loop(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.name)


def _symlink_outside(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.parent.parent / "outside.wav")


def _unreadable(path: Path) -> None:
    path.chmod(0)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _not_audio(path: Path) -> None:
    path.write_bytes(os.urandom(20_000))


def _truncated_audio(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:100])  # the header and a few samples: decodes to what is there


#: what happens to victim.wav after it was indexed, and the outcome of each request on it:
#: info (the index only), info checksum, stream original, stream decoded
CASES: dict[str, tuple[Callable[[Path], None] | None, tuple[str, str, str, str]]] = {
    "never existed": (None, ("not_found",) * 4),
    "deleted": (_unlink, ("ok", "not_found", "not_found", "not_found")),
    "replaced by a directory": (_directory, ("ok", "not_found", "not_found", "not_found")),
    "replaced by a FIFO": (_fifo, ("ok", "not_found", "not_found", "not_found")),
    "replaced by a socket": (_socket, ("ok", "not_found", "not_found", "not_found")),
    "replaced by a symlink loop": (_symlink_loop, ("ok", "not_found", "not_found", "not_found")),
    "replaced by a symlink out of the root": (
        _symlink_outside,
        ("ok", "not_found", "not_found", "not_found"),
    ),
    "unreadable": (_unreadable, ("ok", "unreadable", "unreadable", "unreadable")),
    "emptied": (_empty, ("ok", "ok", "ok", "decode_failed")),
    "overwritten with noise": (_not_audio, ("ok", "ok", "ok", "decode_failed")),
    "truncated inside its samples": (_truncated_audio, ("ok", "ok", "ok", "ok")),
}


def _chmod_denies() -> bool:
    """Whether a file with mode 000 is really unreadable to this process: not as root
    (unless run without CAP_DAC_OVERRIDE, e.g. under ``setpriv``)."""
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe"
        probe.write_bytes(b"x")
        probe.chmod(0)
        try:
            with open(probe, "rb"):
                return False
        except PermissionError:
            return True


CHMOD_DENIES = _chmod_denies()


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            case,
            marks=pytest.mark.skipif(
                case == "unreadable" and not CHMOD_DENIES,
                reason="root reads a file of mode 000; test_an_unreadable_file_e2e runs the "
                "server without that capability",
            ),
        )
        for case in CASES
    ],
)
async def test_every_file_error_path(
    case: str, server: Server, root: Path, no_server_errors: None
) -> None:
    change, expected = CASES[case]
    track = "victim.wav" if change is not None else "nothing-like-this.wav"
    if change is not None:
        change(root / "victim.wav")
    requests = ("info", "info checksum", "original", "decoded")
    async with connected(server) as client:
        got = tuple([await outcome(client, request, track) for request in requests])
        assert got == expected
        await still_serves(server, client)


async def test_a_decode_that_starts_past_the_end_is_an_empty_stream(
    server: Server, no_server_errors: None
) -> None:
    async with connected(server) as client:
        async with client.decode("good.wav", start=3600.0) as stream:
            assert [chunk async for chunk in stream] == []
            assert stream.end is not None and (stream.end.sent, stream.end.frames) == (0, 0)
        await still_serves(server, client)


#: a stream request's fields, each out of its range (PROTOCOL.md, ``stream``)
BAD_FIELDS: list[dict[str, Any]] = [
    {"offset": -1},
    {"offset": 2**64 - 1},
    {"mode": "backwards"},
    {"mode": "decoded", "offset": 5},
    {"mode": "decoded", "sample_format": "s24le"},
    {"mode": "decoded", "sample_rate": 999},
    {"mode": "decoded", "sample_rate": 384_001},
    {"mode": "decoded", "channels": 0},
    {"mode": "decoded", "channels": 9},
    {"mode": "decoded", "start": -1.0},
    {"mode": "decoded", "start": math.nan},
    {"mode": "decoded", "start": math.inf},
    {"mode": "decoded", "duration": 0.0},
    {"mode": "decoded", "duration": -2.0},
    {"mode": "decoded", "duration": math.inf},
    {"mode": "decoded", "pacing": "fast"},
    {"track": 7},
    {"track": ["good.wav"]},
]


@pytest.mark.parametrize("fields", BAD_FIELDS, ids=lambda f: repr(f).replace(" ", ""))
async def test_stream_fields_out_of_range_are_bad_requests(
    fields: dict[str, Any], server: Server, no_server_errors: None
) -> None:
    body = msgpack.packb({"type": "stream", "track": "good.wav", **fields})
    async with connected(server) as client:
        await client._stream.send_all(HEADER.pack(KIND_MESSAGE, len(body)) + body)
        client._conn.send(StreamRequest(track="good.wav"))  # the client now awaits a reply
        with pytest.raises(ServerError) as caught:
            await client._reply_event()
        assert caught.value.code == "bad_request"
        await still_serves(server, client)


# ------------------------------------------------------------------ changes while sent


async def _stream_while(
    client: Client, track: str, change: Callable[[], None], *, wait: bool = False
) -> list[bytes]:
    """Stream ``track``; after the first data frame, ``change`` the file, then read on.
    With ``wait``, every other task has blocked (the server's sender too, the reader
    having stopped) before the change and again after it. The chunks if no error."""
    async with client.stream(track) as stream:
        chunks = [await stream.__anext__()]
        if wait:
            await trio.testing.wait_all_tasks_blocked()
        change()
        if wait:
            await trio.testing.wait_all_tasks_blocked()
        chunks += [chunk async for chunk in stream]
    return chunks


def _append(path: Path) -> Callable[[], None]:
    def change() -> None:
        with open(path, "ab") as f:
            f.write(b"more")

    return change


def _rewrite_same_size(path: Path) -> Callable[[], None]:
    def change() -> None:
        st = path.stat()
        path.write_bytes(os.urandom(st.st_size))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    return change


def _truncate(path: Path, size: int) -> Callable[[], None]:
    return lambda: os.truncate(path, size)


MID_STREAM: dict[str, Callable[[Path], Callable[[], None]]] = {
    "shrank into the part already sent": lambda p: _truncate(p, 1000),
    "shrank ahead of the reader": lambda p: _truncate(p, 1024 * 1024),
    "emptied": lambda p: _truncate(p, 0),
    "grew": _append,
    "rewritten, same size": _rewrite_same_size,
}


@pytest.mark.parametrize("hashing", ["digest known", "digest computed meanwhile"])
@pytest.mark.parametrize("what", list(MID_STREAM))
async def test_a_file_changed_while_sent_ends_with_changed(
    what: str, hashing: str, server: Server, root: Path, no_server_errors: None
) -> None:
    path = root / "big.mp3"
    async with connected(server) as client:
        if hashing == "digest known":  # only the sender can notice
            await client.info("big.mp3", checksum=True)
        with pytest.raises(Changed):
            await _stream_while(client, "big.mp3", MID_STREAM[what](path))
        await still_serves(server, client)


@asynccontextmanager
async def gated_checksum(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[trio.Event]:
    """The server's hashing reports the file changed, once the yielded event is set:
    what the hashing thread does when the file moves under it, at a moment we choose."""
    gate = trio.Event()

    async def changed_while_hashed(fd: int, st: os.stat_result) -> str:
        await gate.wait()
        raise Changed("the file changed while it was being hashed")

    monkeypatch.setattr(server.maintainer.checksums, "sha256", changed_while_hashed)
    yield gate
    monkeypatch.undo()


async def test_the_checksum_noticing_first_never_cuts_a_frame(
    server: Server, monkeypatch: pytest.MonkeyPatch, no_server_errors: None
) -> None:
    """The sender is blocked in the middle of a frame (lock-step streams: a send waits
    for the reader) when the hashing reports the change. It used to cancel the send:
    half a frame out, then ``internal`` (the error could no longer be framed) and a
    closed connection. Now the frame finishes and the stream ends with ``changed``."""
    async with connected(server, trio.testing.lockstep_stream_pair) as client:
        async with gated_checksum(server, monkeypatch) as gate:
            with pytest.raises(Changed, match="changed while it was being hashed"):
                await _stream_while(client, "big.mp3", gate.set, wait=True)
        await still_serves(server, client)


# ------------------------------------------------------------------ over TCP (sendfile)


#: bytes of the file streamed over TCP: more than the loopback socket buffers hold, so
#: that the server is still sending when the reader stops (sparse: costs no disk)
HUGE = 64 * 1024 * 1024


@pytest.fixture
def tcp_server(root: Path) -> Server:
    with open(root / "huge.mp3", "wb") as f:
        f.truncate(HUGE)
    library = Library(root, workers=0)
    library.rescan()
    return Server(library, ServerConfig(root=root, chunk_size=CHUNK))


@asynccontextmanager
async def tcp_connected(server: Server) -> AsyncIterator[Client]:
    """A Client talking to ``server.handle`` over a real loopback TCP connection, so that
    the server sends files with zero-copy ``sendfile``."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:

        async def handle(stream: trio.SocketStream) -> None:
            await server.handle(stream, "tcp")

        await nursery.start(trio.serve_listeners, handle, listeners)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = Client(stream, timeout=TIMEOUT)
        await client.handshake()
        try:
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("what", ["shrank ahead of the reader", "emptied", "grew"])
async def test_over_tcp_a_file_changed_while_sent_ends_with_changed(
    what: str, tcp_server: Server, root: Path, no_server_errors: None
) -> None:
    """The sender is blocked in ``sendfile`` (the reader stopped, the socket buffers are
    full) when the file changes; the reader then reads on and gets ``changed`` at once,
    not after its timeout."""
    path = root / "huge.mp3"
    async with tcp_connected(tcp_server) as client:
        await client.info("huge.mp3", checksum=True)
        with pytest.raises(Changed):
            await _stream_while(client, "huge.mp3", MID_STREAM[what](path), wait=True)
        async with client.stream("good.wav") as stream:
            assert b"".join([c async for c in stream]) == GOOD


async def test_over_tcp_the_checksum_noticing_first_never_cuts_a_frame(
    tcp_server: Server, monkeypatch: pytest.MonkeyPatch, no_server_errors: None
) -> None:
    server = tcp_server
    async with tcp_connected(server) as client:
        async with gated_checksum(server, monkeypatch) as gate:
            with pytest.raises(Changed, match="changed while it was being hashed"):
                await _stream_while(client, "huge.mp3", gate.set, wait=True)
        async with client.stream("good.wav") as stream:
            assert b"".join([c async for c in stream]) == GOOD


async def test_a_file_that_cannot_be_read_stops_sendfile_not_the_connection(
    tmp_path: Path,
) -> None:
    """``sendfile`` from a descriptor that fails to read (a directory: EINVAL for
    ``os.sendfile``, EISDIR for ``pread``, as EIO would on a failing disk) returns the
    bytes sent so far; the transport stays usable and the caller says why."""
    fd = os.open(tmp_path, os.O_RDONLY)
    a, b = trio.socket.socketpair()
    try:
        for stream in (trio.SocketStream(a), trio.testing.memory_stream_pair()[0]):
            transport = Transport(stream)
            assert await transport.sendfile(fd, 0, 100, TIMEOUT) == 0
            assert not transport.broken
    finally:
        os.close(fd)
        a.close()
        b.close()


# ------------------------------------------------------------------ odd sources decode


#: (rate, channels) of a source -> (rate, channels) it decodes to by default
ODD_SOURCES = {
    (48000, 12): (48000, 2),
    (48000, 9): (48000, 2),
    (8000, 11): (8000, 2),
    (768_000, 2): (384_000, 2),
    (800, 1): (1000, 1),
    (400_000, 10): (384_000, 2),
}


@pytest.mark.parametrize(("source", "expected"), list(ODD_SOURCES.items()), ids=str)
async def test_sources_outside_the_protocol_ranges_decode_by_default(
    source: tuple[int, int],
    expected: tuple[int, int],
    root: Path,
    tmp_path: Path,
    no_server_errors: None,
) -> None:
    seconds = 0.25 if source[0] < 100_000 else 0.05
    (root / "odd.wav").write_bytes(wav_bytes(*source, seconds))
    library = Library(root, workers=0)
    library.rescan()
    server = Server(library, ServerConfig(root=root, chunk_size=CHUNK))
    async with connected(server) as client:
        async with client.decode("odd.wav") as stream:
            data = b"".join([chunk async for chunk in stream])
            start, end = stream.start, stream.end
        assert isinstance(start, StreamStart) and isinstance(end, StreamEnd)
        assert (start.sample_rate, start.channels) == expected
        frames = len(data) // (2 * expected[1])
        assert end.sent == len(data) and end.frames == frames
        want = seconds * expected[0]
        assert abs(frames - want) <= want * 0.02 + 64, (frames, want)
        assert any(data), "all silence: the mix lost the signal"
        # an explicit request for 2 channels works too, also where ffmpeg knows no layout
        async with client.decode("odd.wav", channels=2, sample_rate=8000) as stream:
            assert stream.start is not None and stream.start.channels == 2
            assert any(b"".join([chunk async for chunk in stream]))
        await still_serves(server, client)


# ------------------------------------------------------------------ end to end


def _capability_dropper() -> list[str]:
    """The command prefix that makes a root process subject to file permissions
    (``setpriv`` without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH); ``[]`` for others."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, and no setpriv to drop the capability to read any file")
    caps = "-dac_override,-dac_read_search"
    prefix = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]
    if subprocess.run([*prefix, "true"], check=False).returncode != 0:
        pytest.skip("running as root, and setpriv cannot drop capabilities here")
    return prefix


def subject_to_permissions_server(root: Path) -> AbstractContextManager[ServerProcess]:
    """``musiclib serve`` over ``root`` that chmod can deny (as root: capability dropped)."""
    return running_server(root, "--no-watch", wrapper=_capability_dropper())


def test_an_unreadable_file_e2e(tmp_path: Path) -> None:
    """info, get and get --decode of a file the server may not read: exit 4 and one line
    saying so (was ``internal``, exit 3, and a traceback in the server's log)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "good.wav").write_bytes(GOOD)
    locked = root / "locked.wav"
    locked.write_bytes(GOOD)
    work = tmp_path / "work"
    work.mkdir()
    with subject_to_permissions_server(root) as srv:
        locked.chmod(0)  # after indexing: the scan could read it, the requests cannot
        try:
            status = Path(f"/proc/{srv.process.pid}/status").read_text()
            caps = int(re.search(r"CapEff:\s*([0-9a-f]+)", status)[1], 16)  # type: ignore[index]
            assert not caps & 0b110, "the server can still read any file"
            for args in (
                ["info", "locked.wav"],
                ["get", "locked.wav", "--save"],
                ["get", "locked.wav", "--decode", "--save"],
            ):
                run = run_cli(*args, server=srv.address, cwd=work)
                assert run.returncode == 4, (args, run.stderr)
                lines = run.stderr.strip().splitlines()
                assert len(lines) == 1 and "cannot read" in lines[0], (args, run.stderr)
                assert "permission denied" in lines[0]
                assert os.listdir(work) == []
            assert run_cli("info", "good.wav", server=srv.address, cwd=work).returncode == 0
        finally:
            locked.chmod(0o644)
        assert "internal" not in srv.log()


def test_odd_sources_decode_e2e(tmp_path: Path) -> None:
    """get --decode of a 12-channel, a 9-channel, a 768 kHz and an 800 Hz WAV through
    the real server and CLI: each saves a WAV in the nearest format the protocol has."""
    root = tmp_path / "root"
    root.mkdir()
    sources = {"ch12.wav": (48000, 12), "ch9.wav": (48000, 9), "r768k.wav": (768_000, 2)}
    sources["r800.wav"] = (800, 1)
    for name, (rate, channels) in sources.items():
        (root / name).write_bytes(wav_bytes(rate, channels, 0.2 if rate < 100_000 else 0.05))
    work = tmp_path / "work"
    work.mkdir()
    with subject_to_permissions_server(root) as srv:
        for name, (rate, channels) in sources.items():
            run = run_cli(
                "get", name, "--decode", "-o", f"out-{name}", server=srv.address, cwd=work
            )
            assert run.returncode == 0, (name, run.stderr)
            with wave.open(str(work / f"out-{name}"), "rb") as w:
                got = (w.getframerate(), w.getnchannels())
                assert w.getnframes() > 0
            assert got == (min(max(rate, 1000), 384_000), channels if channels <= 8 else 2)
        assert "internal" not in srv.log()
