"""The server and client shells over trio.testing memory streams: no port, no wall time.

Each test wires a real :class:`Server` handler to a real :class:`Client`
through an in-memory stream pair, so everything but the socket is exercised;
timeouts run on pytest-trio's ``autojump_clock``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import msgpack
import pytest
import trio
import trio.testing
from conftest import library_server

from musiclib.client import Client
from musiclib.decode import AudioFormat, decode_command, ffmpeg_executable
from musiclib.errors import (
    Ambiguous,
    BadRequest,
    Changed,
    ConnectionLost,
    DecodeFailed,
    InternalError,
    NotFound,
    UnsupportedVersion,
)
from musiclib.library import Library
from musiclib.protocol import (
    HEADER,
    KIND_MESSAGE,
    Connection,
    Error,
    Event,
    Hello,
    ListRequest,
    NeedData,
    Role,
    Welcome,
    encode_message,
)
from musiclib.server import Server, ServerConfig

CONTENT = {
    "Artist/Album/01 - One.mp3": os.urandom(700_000),
    "Artist/Album/02 - Two.flac": os.urandom(1000),
    "Other/three.ogg": b"",
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "lib"


@pytest.fixture
def server(root: Path) -> Server:
    return cast(Server, library_server(root, CONTENT, chunk_size=64 * 1024))


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 0.3 s of real idleness.

    A jump-at-once clock would also jump while ffmpeg is busy producing
    samples; waiting a little real time first lets only the pacing sleeps
    (everything else here has huge timeouts) make virtual time pass.
    """
    return trio.testing.MockClock(autojump_threshold=0.3)


@asynccontextmanager
async def connected(server: Server, *, handshake: bool = True) -> AsyncIterator[Client]:
    """A Client talking to ``server.handle`` through a memory stream pair."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, server_stream, "memory")
        client = Client(client_stream, timeout=60)
        if handshake:
            await client.handshake()
        try:
            yield client
        finally:
            await client.aclose()


async def download(client: Client, track: str, offset: int = 0) -> tuple[bytes, str | None]:
    async with client.stream(track, offset) as stream:
        data = b"".join([chunk async for chunk in stream])
        assert stream.end is not None
        return data, stream.end.sha256


async def test_handshake_states_the_library(server: Server) -> None:
    async with connected(server) as client:
        assert client.welcome == Welcome(
            version=1,
            server=client.welcome.server if client.welcome else "",
            tracks=3,
            versions=(1, 2),
            max_message_size=server.config.max_message_size,
        )
        assert client.welcome is not None and client.welcome.server.startswith("musiclib/")


async def test_list_and_query(server: Server) -> None:
    async with connected(server) as client:
        tracks, end = await client.list()
        assert [t.path for t in tracks] == sorted(CONTENT)
        assert end.count == 3 and not end.scanning
        sizes = {t.path: t.size for t in tracks}
        assert sizes == {k: len(v) for k, v in CONTENT.items()}
        assert all(t.error for t in tracks)  # random bytes: listed with a reason
        tracks, end = await client.list("album")
        assert [t.path for t in tracks] == sorted(CONTENT)[:2]


async def test_stream_whole_file_and_several_requests_on_one_connection(server: Server) -> None:
    async with connected(server) as client:
        for name, data in CONTENT.items():
            got, sha = await download(client, name)
            assert got == data
            assert sha == hashlib.sha256(data).hexdigest()
        tracks, _ = await client.list()
        assert len(tracks) == 3


async def test_stream_from_an_offset_reports_the_whole_file_checksum(server: Server) -> None:
    data = CONTENT["Artist/Album/01 - One.mp3"]
    async with connected(server) as client:
        async with client.stream("One", 123_457) as stream:
            assert stream.start is not None
            assert (stream.start.offset, stream.start.length) == (123_457, len(data) - 123_457)
            got = b"".join([c async for c in stream])
        assert got == data[123_457:]
        assert stream.end is not None
        assert stream.end.sha256 == hashlib.sha256(data).hexdigest()
        got, _ = await download(client, "One", len(data) + 10)  # past the end: nothing
        assert got == b""


async def test_name_errors_leave_the_connection_usable(server: Server) -> None:
    async with connected(server) as client:
        with pytest.raises(NotFound):
            await client.info("nothing like it")
        with pytest.raises(Ambiguous) as info:
            await client.info("Artist/Album")
        assert info.value.candidates == tuple(sorted(CONTENT)[:2])
        with pytest.raises(NotFound):
            await download(client, "../lib/Other/three.ogg")
        with pytest.raises(NotFound):
            await download(client, "/etc/passwd")
        track = await client.info("two.flac")
        assert track.path == "Artist/Album/02 - Two.flac"


async def test_malformed_request_gets_bad_request_and_the_connection_goes_on(
    server: Server,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, server_stream, "memory")
        conn = Connection(Role.CLIENT)
        await client_stream.send_all(conn.send(Hello(version=1)))
        body = msgpack.packb({"type": "stream", "track": 17})
        await client_stream.send_all(HEADER.pack(KIND_MESSAGE, len(body)) + body)
        events = await _read_events(client_stream, conn, 2)
        assert isinstance(events[0], Welcome)
        assert isinstance(events[1], Error) and events[1].code == "bad_request"
        assert not events[1].fatal
        # the server's state went back to idle: a valid request is served
        client = Client(client_stream)
        client._conn = conn
        tracks, _ = await client.list()
        assert len(tracks) == 3
        await client.aclose()


async def _read_events(stream: trio.abc.Stream, conn: Connection, n: int) -> list[object]:
    out: list[object] = []
    while len(out) < n:
        event = conn.next_event()
        if type(event).__name__ == "NeedData":
            conn.receive_data(await stream.receive_some(65536))
        else:
            out.append(event)
    return out


@pytest.mark.parametrize(
    "garbage",
    [
        b"LIST\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        HEADER.pack(KIND_MESSAGE, 0xFFFFFFF0),
        HEADER.pack(2, 5) + b"hello",
    ],
    ids=["course-text-protocol", "http", "giant-length", "data-from-client"],
)
async def test_garbage_gets_a_fatal_error_and_a_closed_connection(
    server: Server, garbage: bytes
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, server_stream, "memory")
        await client_stream.send_all(garbage)
        received = b""
        with trio.fail_after(5):
            while chunk := await client_stream.receive_some(65536):
                received += chunk
    conn = Connection(Role.CLIENT)
    conn.send(Hello(version=1))
    conn.receive_data(received)
    event = conn.next_event()
    assert isinstance(event, Error) and event.fatal and event.code == "bad_request"


async def test_unsupported_version_is_refused(server: Server) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, server_stream, "memory")
        client = Client(client_stream)
        await client._stream.send_all(encode_message(Hello(version=99)))
        client._conn.send(Hello(version=99))
        with pytest.raises(UnsupportedVersion, match="version 99"):
            await client._reply_event()


async def test_idle_and_handshake_timeouts(server: Server, autojump_clock: object) -> None:
    server.config.idle_timeout = 30
    server.config.handshake_timeout = 5
    async with connected(server) as client:
        start = trio.current_time()
        await trio.sleep(31)
        with pytest.raises(ConnectionLost):
            await client.list()
        assert trio.current_time() - start >= 30
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, server_stream, "memory")
        start = trio.current_time()
        assert await client_stream.receive_some(10) == b""  # closed without a hello
        assert 5 <= trio.current_time() - start < 6


async def test_a_reader_that_stops_is_dropped_after_the_send_timeout(
    server: Server, patient_clock: object
) -> None:
    # patient: a jump-at-once clock would also jump while the server resolves the
    # name in a worker thread, and fire the client's own timeout
    server.config.send_timeout = 10
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    done = trio.Event()

    async def serve_one() -> None:
        await server.handle(server_stream, "memory")
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one)
        client = Client(client_stream)
        await client.handshake()
        async with client.stream("One") as stream:
            await stream.__anext__()  # one chunk, then stop reading
            start = trio.current_time()
            await done.wait()
            assert trio.current_time() - start >= 10


async def test_a_file_that_shrinks_mid_stream_ends_with_changed(server: Server) -> None:
    path = server.library.root / "Artist/Album/01 - One.mp3"
    async with connected(server) as client:
        with pytest.raises(Changed, match=r"shrank|changed while it was being hashed"):
            async with client.stream("One") as stream:
                async for _ in stream:
                    os.truncate(path, 100_000)
        got, _ = await download(client, "Two")  # the connection is still usable
        assert got == CONTENT["Artist/Album/02 - Two.flac"]


async def test_a_bug_in_a_handler_reaches_the_client_as_internal_error(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(query: object) -> list[object]:
        raise RuntimeError("boom")

    async with connected(server) as good:
        monkeypatch.setattr(server.library, "listing", broken)
        async with connected(server) as victim:
            with pytest.raises(InternalError):
                await victim.list()
        monkeypatch.undo()
        tracks, _ = await good.list()  # everyone else is still served
        assert len(tracks) == 3


async def test_clients_are_served_concurrently(server: Server) -> None:
    data = CONTENT["Artist/Album/01 - One.mp3"]
    results: list[bytes] = []

    async def fetch() -> None:
        async with connected(server) as client:
            results.append((await download(client, "One"))[0])

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(fetch)
    assert results == [data] * 5


async def test_stop_closes_idle_connections_and_lets_streams_finish(server: Server) -> None:
    data = CONTENT["Artist/Album/01 - One.mp3"]
    async with connected(server) as idle, connected(server) as busy:
        async with busy.stream("One") as stream:
            first = await stream.__anext__()
            server.stop()
            rest = b"".join([c async for c in stream])
        assert first + rest == data  # the running stream finished
        with pytest.raises(ConnectionLost):
            await idle.list()


async def test_bad_request_error_class(server: Server) -> None:
    async with connected(server) as client:
        await client._stream.send_all(HEADER.pack(KIND_MESSAGE, 1) + b"\xc1")
        client._conn.send(__import__("musiclib.protocol").protocol.ListRequest())
        with pytest.raises(BadRequest):
            await client._reply_event()


# ---- decoded streams (a real ffmpeg, memory streams, a mock clock) ----------


@pytest.fixture(scope="module")
def audio_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10 s stereo sine WAV, a 2-minute mono FLAC and an undecodable file."""
    root = tmp_path_factory.mktemp("audio")
    ffmpeg = ffmpeg_executable()
    cmd = [ffmpeg, "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=10"]
    subprocess.run([*cmd, "-ac", "2", "-ar", "22050", str(root / "tone.wav")], check=True)
    long = [ffmpeg, "-v", "error", "-f", "lavfi", "-i", "sine=frequency=300:duration=120"]
    subprocess.run([*long, "-ac", "1", "-ar", "8000", str(root / "long.flac")], check=True)
    (root / "broken.mp3").write_bytes(os.urandom(5000))
    return root


@pytest.fixture
def audio_server(audio_root: Path) -> Server:
    library = Library(audio_root)
    library.rescan()
    # huge timeouts: on a mock clock only the pacing sleeps should make time pass
    config = ServerConfig(
        root=audio_root, chunk_size=16 * 1024, send_timeout=1e6, idle_timeout=1e6, burst=1.0
    )
    return Server(library, config)


def _reference(path: Path, fmt: AudioFormat, **kw: float) -> bytes:
    cmd = decode_command(ffmpeg_executable(), path, fmt, **kw)
    return subprocess.run(cmd, capture_output=True, check=True).stdout


def _ffmpeg_children() -> list[int]:
    """Our ffmpeg child processes, zombies included, from the process table."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == os.getpid() and comm.startswith("ffmpeg"):
            pids.append(int(entry))
    return pids


async def test_decoded_stream_is_exact_and_states_its_format(audio_server: Server) -> None:
    fmt = AudioFormat("s16le", 16000, 1)
    async with connected(audio_server) as client:
        async with client.decode("tone", sample_rate=16000, channels=1) as stream:
            start = stream.start
            data = b"".join([c async for c in stream])
        assert start is not None
        assert (start.mode, start.sample_format, start.sample_rate, start.channels) == (
            "decoded",
            "s16le",
            16000,
            1,
        )
        assert data == _reference(audio_server.library.root / "tone.wav", fmt)
        assert stream.end is not None and stream.end.frames == len(data) // 2
        # the source's own rate and channels by default, f32le, and a start offset
        async with client.decode("tone", sample_format="f32le", start=2.5) as stream:
            assert stream.start is not None
            assert (stream.start.sample_rate, stream.start.channels) == (22050, 2)
            data = b"".join([c async for c in stream])
        ref = _reference(
            audio_server.library.root / "tone.wav", AudioFormat("f32le", 22050, 2), start=2.5
        )
        assert data == ref


async def test_undecodable_file_fails_cleanly_and_the_connection_goes_on(
    audio_server: Server,
) -> None:
    async with connected(audio_server) as client:
        with pytest.raises(DecodeFailed, match=r"cannot decode broken\.mp3") as info:
            async with client.decode("broken.mp3") as stream:
                async for _ in stream:
                    pass
        assert str(audio_server.library.root) not in str(info.value)
        tracks, _ = await client.list()
        assert {t.path for t in tracks} == {"broken.mp3", "long.flac", "tone.wav"}
        async with client.decode("tone", duration=0.5) as stream:
            assert len(b"".join([c async for c in stream])) == 22050 * 2 * 2 // 2
    assert audio_server.decode_slots.in_use == 0


@pytest.fixture
def frozen_clock() -> trio.testing.MockClock:
    """Virtual time that never moves: a paced stream's next send never comes."""
    return trio.testing.MockClock()


async def test_a_client_that_vanishes_mid_stream_leaves_no_ffmpeg(
    audio_server: Server, frozen_clock: trio.testing.MockClock
) -> None:
    # With the clock frozen the server sends its burst, then sleeps for ever before its
    # next chunk, so a send error can never reveal the hang-up: only watching can.
    audio_server.config.burst = 0.5
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def watchdog() -> None:  # virtual time never fires: guard in real time
            await trio.to_thread.run_sync(time.sleep, 20, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()
            raise AssertionError("the test hung")

        nursery.start_soon(watchdog)
        nursery.start_soon(audio_server.handle, server_stream, "memory")
        client = Client(client_stream, timeout=1e6)
        await client.handshake()
        async with client.decode("long", sample_rate=8000, channels=1, realtime=True) as s:
            await s.__anext__()
            assert len(_ffmpeg_children()) == 1  # so the check below can fail
            await client._stream.aclose()  # vanish without a word
        for _ in range(100):  # the spec: gone within a second (real time, process table)
            if not _ffmpeg_children():
                break
            await trio.to_thread.run_sync(time.sleep, 0.01)
        gone = not _ffmpeg_children()
        nursery.cancel_scope.cancel()  # whatever happened, end the handler
    assert gone
    assert audio_server.decode_slots.in_use == 0


async def test_realtime_pacing_sends_a_burst_then_playback_speed(
    audio_server: Server, patient_clock: trio.testing.MockClock
) -> None:
    rate, bps = 8000, 8000 * 2  # mono s16le: 16 000 bytes a second of audio
    audio_server.config.pacing_slice = 1.0  # ten paced sends, not a hundred: faster test
    arrivals: list[tuple[float, int]] = []  # (virtual seconds, bytes received by then)
    async with connected(audio_server) as client:
        client.timeout = 1e6
        async with client.decode("tone", sample_rate=rate, channels=1, realtime=True) as s:
            began = trio.current_time()
            received = 0
            async for chunk in s:
                received += len(chunk)
                arrivals.append((trio.current_time() - began, received))
    assert received == 10 * bps
    assert len(arrivals) >= 9  # paced in pieces, not one lump
    for at, total in arrivals:  # the rule: never more than burst + t seconds of audio
        assert total / bps <= 1.0 + at + 1e-6
    # and no slower than needed: the whole 10 s arrive after about 10 s minus the burst
    last_at, _ = arrivals[-1]
    assert 9.0 - 1e-6 <= last_at <= 9.0 + 0.5


# ---------------------------------------------------------------- load balancers' health checks


async def _visit(
    server: Server, hello: Hello, request: ListRequest | None = None
) -> tuple[Event, list[logging.LogRecord]]:
    """Over real loopback TCP: say ``hello``, read the answer, ask ``request`` (if any)
    and read its first reply, then reset the connection as HAProxy's ``tcp-check`` does
    (SO_LINGER 0). The answer, and what the server logged about this peer."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("visitor:"):
                seen.append(record)

    keep = Keep(logging.DEBUG)
    logger = logging.getLogger("musiclib.server")
    logger.addHandler(keep)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        async with trio.open_nursery() as nursery:

            async def serve_one() -> None:
                stream = await listeners[0].accept()
                await server.handle(stream, "visitor", "127.0.0.1")

            nursery.start_soon(serve_one)
            client = await trio.open_tcp_stream("127.0.0.1", port)
            conn = Connection(Role.CLIENT)

            async def answer() -> Event:
                while isinstance(event := conn.next_event(), NeedData):
                    conn.receive_data(await client.receive_some(65536))
                return event

            await client.send_all(conn.send(hello))
            first = await answer()
            if request is not None and isinstance(first, Welcome):
                await client.send_all(conn.send(request))
                await answer()
            client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.socket.close()  # a reset, not a clean close
    finally:
        logger.removeHandler(keep)
        logger.setLevel(old_level)
        for listener in listeners:
            await listener.aclose()
    return first, seen


async def test_a_health_check_is_logged_at_debug_level_and_a_client_at_info(
    server: Server,
) -> None:
    """deploy/haproxy.cfg's check (hello as ``haproxy-check``, reset after the welcome)
    made every replica log a line every 2 s; such a goodbye is a debug line now, and so
    is any peer's that drops the connection right after its welcome without asking
    anything. A peer that asked something and then dropped the connection is still
    worth an info line."""
    welcome, check = await _visit(server, Hello(version=1, client="haproxy-check"))
    assert isinstance(welcome, Welcome)
    assert check and {r.levelno for r in check} == {logging.DEBUG}, check
    _, anonymous = await _visit(server, Hello(version=1, client="probe"))
    assert anonymous and {r.levelno for r in anonymous} == {logging.DEBUG}, anonymous
    _, client = await _visit(server, Hello(version=1, client="a player"), ListRequest())
    assert [r.levelno for r in client] == [logging.INFO], client
    assert "reset" in client[0].getMessage() or "lost" in client[0].getMessage()


async def test_a_health_check_refused_for_its_missing_token_is_a_debug_line(
    server: Server,
) -> None:
    """With ``--token``, the check's hello (no token) gets ``unauthorized``, which the
    check accepts as a pass: logged at debug level. Any other client refused for its
    token is still a warning."""
    server.config.token = "s3cret"
    refused, check = await _visit(server, Hello(version=1, client="haproxy-check"))
    assert isinstance(refused, Error) and refused.code == "unauthorized"
    assert [r.levelno for r in check] == [logging.DEBUG], check
    refused, other = await _visit(server, Hello(version=1, client="a player"))
    assert isinstance(refused, Error) and refused.code == "unauthorized"
    assert [r.levelno for r in other] == [logging.WARNING], other
    assert "refused: no token" in other[0].getMessage()
