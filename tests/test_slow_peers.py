"""Slow and greedy peers (issue 12, items 1, 2, 11 and 19): none may lock others out.

Each test reproduces an attack with small numbers and short limits configured:
slowloris (a hello or a request dribbled a byte at a time, faster than any
per-read timeout, in plain TCP and in TLS), one address taking every
connection or every decoder, a reader keeping a decoded stream far below real
time. The attackers' sockets are real (loopback; 127.0.0.0/8 gives as many
source addresses as wanted) where the server counts by address; the rest run
over memory streams, on a virtual clock where nothing else needs real time.
Every wait is bounded by a generous functional timeout, never a threshold on
how fast the server was. The last tests run the real ``musiclib serve``.
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing
import trustme
from conftest import run_cli, running_server, serve_on_taken_port

from musiclib.client import Client, open_client
from musiclib.decode import DecodeSlots, ffmpeg_executable
from musiclib.errors import Busy, TooSlow
from musiclib.library import Library
from musiclib.protocol import (
    PROTOCOL_VERSION,
)
from musiclib.server import Server, ServerConfig, address_key, decode_share, serve

#: seconds any one attacker keeps dribbling before the test calls it "never cut"
ATTACK_BOUND = 15.0
#: seconds between two bytes of a dribbling attacker: far shorter than any timeout here
DRIBBLE = 0.1
#: seconds a legitimate client may take for anything (a functional bound, not a measure)
IO_TIMEOUT = 10.0


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def root(tmp_path: Path) -> Path:
    lib = tmp_path / "lib"
    (lib / "Album").mkdir(parents=True)
    (lib / "Album" / "one.mp3").write_bytes(os.urandom(2000))
    (lib / "two.flac").write_bytes(os.urandom(1000))
    return lib


def frame(**message: object) -> bytes:
    """One message frame (kind 1, length, msgpack), whatever the state."""
    body = msgpack.packb(message)
    return struct.pack(">BI", 1, len(body)) + body


def big_hello() -> bytes:
    """A valid hello frame of about 60 KB: a slowloris never gets to its end."""
    return frame(type="hello", version=PROTOCOL_VERSION, client="x" * 60_000)


def errors_in(data: bytes) -> list[dict[str, object]]:
    """The error messages among the frames in ``data`` (kind 1: a message)."""
    found = []
    while len(data) >= 5:
        kind, length = struct.unpack(">BI", data[:5])
        body, data = data[5 : 5 + length], data[5 + length :]
        if kind == 1 and len(body) == length:
            msg = msgpack.unpackb(body)
            if isinstance(msg, dict) and msg.get("type") == "error":
                found.append(msg)
    return found


@dataclass
class Attacker:
    """One slowloris connection: what it was told, and whether the server closed it."""

    source: str
    received: bytes = b""
    closed: bool = False
    sent: int = 0
    errors: list[dict[str, object]] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return any(e.get("code") == "busy" for e in self.errors)


async def dribble(stream: trio.abc.Stream, data: bytes, attacker: Attacker) -> None:
    """Send ``data`` a byte every DRIBBLE s, reading what comes back, until the server
    closes the connection or ATTACK_BOUND s have passed."""
    with trio.move_on_after(ATTACK_BOUND):
        for i in range(len(data)):
            try:
                await stream.send_all(data[i : i + 1])
                attacker.sent += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the server is gone: the read below says so
            with trio.move_on_after(DRIBBLE):
                try:
                    got = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    got = b""
                attacker.received += got
                if not got:
                    attacker.closed = True
                    break
    attacker.errors = errors_in(attacker.received)
    await trio.aclose_forcefully(stream)


async def connect_from(source: str, port: int) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:port from the loopback address ``source``."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def slowloris(port: int, source: str, attackers: list[Attacker]) -> None:
    attacker = Attacker(source)
    attackers.append(attacker)
    stream = await connect_from(source, port)
    await dribble(stream, big_hello(), attacker)


@asynccontextmanager
async def serving(config: ServerConfig) -> AsyncIterator[tuple[Server, int]]:
    """The real server (accept loop and all) on 127.0.0.1, port 0, in this trio run."""
    config.port = 0
    library = Library(config.root)
    library.rescan()
    server = Server(library, config)
    try:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(functools.partial(serve, config, server=server))
            yield server, addresses[0][1]
            server.stop()
    finally:
        library.close()


async def wait_for(condition: object, what: str) -> None:
    """Poll ``condition()`` until true; fail after IO_TIMEOUT s (a bounded loop)."""
    assert callable(condition)
    for _ in range(int(IO_TIMEOUT / 0.01)):
        if condition():
            return
        await trio.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


async def listed(port: int, ssl_context: ssl.SSLContext | None = None) -> int:
    """A legitimate client from 127.0.0.1: hello, then the whole list; its length."""
    address = f"127.0.0.1:{port}"
    async with open_client(address, timeout=IO_TIMEOUT, ssl_context=ssl_context) as client:
        tracks, _end = await client.list()
        return len(tracks)


# ---------------------------------------------------------------------------- 1. slowloris


def test_address_keys() -> None:
    assert address_key("127.0.0.5") == "127.0.0.5"
    assert address_key("::ffff:10.1.2.3") == "10.1.2.3"  # IPv4-mapped: the IPv4 address
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1:2")  # one /64
    assert address_key("2001:db8::1") != address_key("2001:db8:0:1::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"


async def test_slowloris_from_one_address_is_capped_and_cut_at_the_handshake_deadline(
    root: Path,
) -> None:
    """20 connections from one address dribble a 60 KB hello a byte every 0.1 s (a
    per-read timeout of 1 s never fires): 5 are served and cut when their 3 s to say
    hello are over, the other 15 are refused "busy" at once without taking a slot of
    the 7, and a client from another address is served meanwhile."""
    config = ServerConfig(
        root=root, handshake_timeout=3.0, max_connections=7, max_connections_per_address=5
    )
    attackers: list[Attacker] = []
    async with serving(config) as (server, port), trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(slowloris, port, "127.0.0.2", attackers)
        await wait_for(lambda: server.by_address.get("127.0.0.2") == 5, "5 attackers served")
        await wait_for(lambda: len(attackers) == 20, "20 attackers connected")
        assert await listed(port) == 2  # 5 + 1 of 7 slots: the refused took none
        # (the attackers go on until the server closes them, or ATTACK_BOUND)
    assert all(a.closed for a in attackers), "attackers never cut: " + ", ".join(
        f"{a.sent} bytes" for a in attackers if not a.closed
    )
    refused = [a for a in attackers if a.refused]
    assert len(refused) == 15, [a.errors for a in attackers]
    for attacker in refused:
        (error,) = attacker.errors
        assert error["fatal"] is True
        assert "this address already has 5 connections" in str(error["message"])
    cut = [a for a in attackers if not a.refused]
    assert all(not a.errors for a in cut)  # a slowloris is closed, not answered
    assert all(a.sent < 1000 for a in attackers)


async def test_slowloris_from_many_addresses_cannot_fill_the_server(root: Path) -> None:
    """20 addresses with one dribbling connection each fill all 10 slots (10 more
    are refused): a legitimate client still gets in, in the slot of the connection
    that has waited longest for its hello, and every attacker is cut at its deadline."""
    config = ServerConfig(
        root=root, handshake_timeout=6.0, max_connections=10, max_connections_per_address=5
    )
    attackers: list[Attacker] = []
    async with serving(config) as (server, port), trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(slowloris, port, f"127.0.0.{10 + n}", attackers)
        await wait_for(lambda: server.connections == 10, "10 attackers served")
        await trio.sleep(2.0)  # past EVICTABLE_AFTER (1 s), well before their 6 s deadline
        still_open = sum(not a.closed for a in attackers)
        assert still_open >= 10, "the attack should still be on"
        assert await listed(port) == 2
        assert server.connections <= 10
    assert all(a.closed for a in attackers)
    assert sum(a.refused for a in attackers) == 10
    evicted = [a for a in attackers if not a.refused]
    assert len(evicted) == 10


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context and a client context that trusts it (trustme)."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


def tls_client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello), made in memory."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def test_tls_slowloris_is_cut_at_the_handshake_deadline(
    root: Path, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """Under TLS the deadline runs from the accept: it covers a ClientHello dribbled a
    byte at a time, and a hello sent after the TLS handshake as 1-byte TLS records."""
    server_ctx, client_ctx = tls
    config = ServerConfig(root=root, handshake_timeout=1.0, ssl_context=server_ctx)
    raw, records = Attacker("127.0.0.2"), Attacker("127.0.0.3")

    async def in_records() -> None:
        stream = trio.SSLStream(
            await connect_from(records.source, port), client_ctx, server_hostname="127.0.0.1"
        )
        await stream.do_handshake()
        await dribble(stream, big_hello(), records)  # one TLS record per byte

    async def raw_client_hello() -> None:
        await dribble(await connect_from(raw.source, port), tls_client_hello() * 20, raw)

    async with serving(config) as (_server, port), trio.open_nursery() as nursery:
        nursery.start_soon(in_records)
        nursery.start_soon(raw_client_hello)
        await wait_for(lambda: records.sent > 0 and raw.sent > 0, "both dribbling")
        assert await listed(port, ssl_context=client_ctx) == 2
    assert raw.closed, f"a dribbled ClientHello kept its connection ({raw.sent} bytes)"
    assert records.closed, f"a hello in 1-byte records kept its connection ({records.sent})"


async def test_a_request_dribbled_after_hello_is_cut_at_the_idle_deadline(
    root: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The idle timeout bounds the whole wait for the next complete request."""
    library = Library(root)
    library.rescan()
    server = Server(library, ServerConfig(root=root, idle_timeout=5.0))
    client_stream, server_stream = trio.testing.memory_stream_pair()
    attacker = Attacker("memory")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle, server_stream, "memory")
            await client_stream.send_all(frame(type="hello", version=PROTOCOL_VERSION))
            await dribble(client_stream, frame(type="list", query="y" * 30_000), attacker)
    finally:
        library.close()
    assert attacker.closed, f"never cut: {attacker.sent} bytes of the request sent"
    assert attacker.sent < 200  # about 5 s at 10 bytes a second


# ---------------------------------------------------------------------------- 2. decoders


@pytest.fixture(scope="module")
def audio_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 30 s 48 kHz stereo tone (192 KB of samples a second)."""
    root = tmp_path_factory.mktemp("audio")
    cmd = [ffmpeg_executable(), "-v", "error", "-f", "lavfi", "-i"]
    subprocess.run(
        [*cmd, "sine=frequency=440:duration=30", "-ac", "2", "-ar", "48000", str(root / "t.wav")],
        check=True,
    )
    return root


def test_decode_share_defaults_to_a_quarter() -> None:
    config = ServerConfig(root=Path("."))
    assert decode_share(config) == 8  # of 32
    config.max_decodes = 3
    assert decode_share(config) == 1
    config.max_decodes_per_address = 0
    assert decode_share(config) is None


@asynccontextmanager
async def session_from(server: Server, address: str) -> AsyncIterator[Client]:
    """A client over a memory stream that the server counts as coming from ``address``."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, server_stream, address, address)
        client = Client(client_stream, timeout=IO_TIMEOUT)
        await client.handshake()
        try:
            yield client
        finally:
            await client.aclose()


async def test_one_address_holds_no_more_than_its_share_of_decoders(audio_root: Path) -> None:
    """Two paced decodes of a long track hold address A's share (2 of 3 decoders):
    A's third is "busy" at once, saying why, while address B still gets the last."""
    library = Library(audio_root)
    library.rescan()
    config = ServerConfig(
        root=audio_root, max_decodes=3, max_decodes_per_address=2, decode_wait=0.5
    )
    server = Server(library, config)
    try:
        async with (
            session_from(server, "10.0.0.1") as a1,
            session_from(server, "10.0.0.1") as a2,
            session_from(server, "10.0.0.1") as a3,
            session_from(server, "10.0.0.2") as b,
            a1.decode("t.wav", realtime=True) as held1,
            a2.decode("t.wav", realtime=True) as held2,
        ):
            assert held1.start is not None and held2.start is not None
            assert server.decode_slots.used_by("10.0.0.1") == 2
            with pytest.raises(
                Busy,
                match=r"^busy: this address already runs 2 decoded streams, its share of the "
                r"server's 3; try again when one ends$",
            ):
                async with a3.decode("t.wav", realtime=True):
                    pass
            async with b.decode("t.wav", duration=0.5) as other:
                assert other.start is not None
                assert sum([len(c) async for c in other]) > 0
    finally:
        library.close()


async def test_a_reader_far_below_real_time_is_cut_with_too_slow(audio_root: Path) -> None:
    """A client taking 16 KiB of a 192 KB/s stream every 0.5 s (0.17x real time) is cut
    once a 1 s window of sending averages below 0.5x; its decoder is free again."""
    library = Library(audio_root)
    library.rescan()
    config = ServerConfig(
        root=audio_root, chunk_size=16 * 1024, min_decode_rate=0.5, min_decode_window=1.0
    )
    server = Server(library, config)
    client_stream, server_stream = trio.testing.lockstep_stream_pair()  # no buffering
    chunks = 0
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle, server_stream, "slow")
            client = Client(client_stream, timeout=IO_TIMEOUT)
            await client.handshake()
            with pytest.raises(TooSlow, match=r"read at .*x real time.* at least 0\.5x"):
                async with client.decode("t.wav") as stream:
                    async for _ in stream:
                        chunks += 1
                        assert chunks < 40, "a reader at 0.17x real time was never cut"
                        await trio.sleep(0.5)
            assert server.decode_slots.in_use == 0
            # the connection goes on: a reader that keeps up is not cut
            async with client.decode("t.wav", duration=5) as stream:
                assert sum([len(c) async for c in stream]) == 5 * 48000 * 4
            await client.aclose()
    finally:
        library.close()


async def test_a_paced_stream_read_as_it_comes_is_never_too_slow(audio_root: Path) -> None:
    library = Library(audio_root)
    library.rescan()
    config = ServerConfig(root=audio_root, burst=0.5, min_decode_rate=0.9, min_decode_window=0.5)
    server = Server(library, config)
    try:
        async with (
            session_from(server, "10.0.0.3") as client,
            client.decode("t.wav", duration=2.0, realtime=True) as stream,
        ):
            assert sum([len(c) async for c in stream]) == 2 * 48000 * 4
    finally:
        library.close()


# ---------------------------------------------------------------------------- 3. the CLI


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_serve_with_an_unknown_log_level_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("serve", "--root", tmp_path, "--port", "0", "--log-level", "verbose")
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert "verbose" in line and "debug, info, warning, error" in line, line
    env = {"MUSICLIB_LOG_LEVEL": "verbose"}
    result = run_cli("ls", server="127.0.0.1:9", env=env)
    assert result.returncode == 2, result.stderr
    assert "debug, info, warning, error" in one_line(result.stderr)


def test_a_second_server_on_a_used_port_says_so_and_hints_at_port(tmp_path: Path) -> None:
    result = serve_on_taken_port(lambda port: ["--root", str(tmp_path), "--port", str(port)])
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert "address already in use" in line and "--port" in line, line


# ---------------------------------------------------------------------------- 4. --token-file


def test_token_file_for_serve_and_clients_keeps_the_token_off_the_command_line(
    root: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret-from-a-file\n")
    with running_server(root, "--token-file", str(secret)) as srv:
        cmdline = Path(f"/proc/{srv.process.pid}/cmdline").read_bytes()
        assert b"s3cret" not in cmdline
        ok = run_cli("ls", "--token-file", secret, server=srv.address)
        assert ok.returncode == 0, ok.stderr
        env = run_cli("ls", server=srv.address, env={"MUSICLIB_TOKEN": "s3cret-from-a-file"})
        assert env.returncode == 0, env.stderr
        refused = run_cli("ls", server=srv.address)
        assert refused.returncode == 3, refused.stderr
        assert "token" in one_line(refused.stderr)
    assert "s3cret" not in srv.log()


@pytest.mark.parametrize(
    ("problem", "said"),
    [("missing", "no such file"), ("empty", "empty"), ("both", "one way")],
)
def test_a_bad_token_file_is_a_usage_error(tmp_path: Path, problem: str, said: str) -> None:
    path = tmp_path / "token"
    if problem == "empty":
        path.write_text("\n")
    extra = ["--token", "x"] if problem == "both" else []
    if problem == "both":
        path.write_text("y")
    for command in (["serve", "--root", str(tmp_path), "--port", "0"], ["ls"]):
        result = run_cli(*command, "--token-file", path, *extra, server="127.0.0.1:9")
        assert result.returncode == 2, (command, result.stderr)
        line = one_line(result.stderr)
        assert line.startswith(f"musiclib: --token-file {path}: ") or said == "one way", line
        assert said in line.lower(), line


async def test_decode_slots_count_each_address_apart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = DecodeSlots(4, 1.0, per_address=2)
    async with slots.acquire("a"), slots.acquire("a"):
        with pytest.raises(Busy, match=r"^busy: this address already runs 2 decoded streams"):
            async with slots.acquire("a"):
                pass
        async with slots.acquire("b"), slots.acquire(None):
            assert (slots.in_use, slots.used_by("a"), slots.used_by("b")) == (4, 2, 1)
    assert (slots.in_use, slots.used_by("a")) == (0, 0)
    assert not slots._shares  # an address is forgotten once it holds nothing


def test_serve_max_per_address_refuses_one_more_from_that_address(root: Path) -> None:
    with running_server(root, "--max-per-address", "1") as srv:
        held = socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT)
        try:
            held.sendall(frame(type="hello", version=PROTOCOL_VERSION))
            assert held.recv(65536)  # welcome: the address's one connection is served
            refused = run_cli("ls", server=srv.address)
            assert refused.returncode == 3, refused.stderr
            line = one_line(refused.stderr)
            assert "this address already has 1 connection open" in line, line
        finally:
            held.close()
        for _ in range(100):  # a bound: the server notices the close at once
            if run_cli("ls", server=srv.address).returncode == 0:
                break
        else:
            pytest.fail("the address stayed refused after its connection closed")
