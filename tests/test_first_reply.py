"""A new connection's first reply: how it leaves the server, and the send turns.

The server answers a request that came with the ``hello`` (``get`` and ``play`` send
them together) in as few writes and as few turns of its event loop as it can: the
``welcome`` is held and goes out with the first bytes of that reply, the connection's
first reads and sends are tried at once (``Transport.receive_nowait`` and
``send_nowait``), and the streams already running take turns at ``sendfile``
(``Server.send_turns``). These tests pin what that may never change: the order of the
bytes, a welcome that is never held while the server waits for anything else, and
every byte of every stream.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import msgpack
import pytest
import trio
import trio.testing
from conftest import library_server

from musiclib.client import open_client
from musiclib.errors import ConnectionLost
from musiclib.protocol import (
    HEADER,
    KIND_MESSAGE,
    Connection,
    Hello,
    ListRequest,
    Message,
    RescanRequest,
    Role,
    StreamRequest,
    encode_message,
)
from musiclib.server import Server, serve
from musiclib.transport import Transport

TRACKS = {"a/one.mp3": os.urandom(300_000), "a/two.flac": os.urandom(5000)}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "lib"


@pytest.fixture
def server(root: Path) -> Server:
    return cast(Server, library_server(root, TRACKS, chunk_size=64 * 1024))


class RecordingStream(trio.abc.Stream):
    """A memory stream's server end that keeps each ``send_all`` as one write."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []
        self.wrote = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self.wrote.set()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def served(server: Server) -> AsyncIterator[tuple[trio.abc.Stream, RecordingStream]]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    recorder = RecordingStream(server_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, recorder, "memory")
        yield client_stream, recorder
        await client_stream.aclose()


async def _first_write(server: Server, *requests: Message) -> bytes:
    """What the server's first write carries when ``requests`` come with the hello."""
    hello = Connection(Role.CLIENT)
    data = hello.send(Hello(version=1)) + b"".join(encode_message(r) for r in requests)
    async with served(server) as (client, recorder):
        await client.send_all(data)
        with trio.fail_after(10):
            await recorder.wrote.wait()
        return recorder.writes[0]


def _kinds(data: bytes) -> list[str]:
    """The message types of the complete message frames at the start of ``data``."""
    kinds = []
    while len(data) >= HEADER.size:
        kind, length = HEADER.unpack_from(data)
        if len(data) < HEADER.size + length:
            break
        if kind == KIND_MESSAGE:
            kinds.append(msgpack.unpackb(data[HEADER.size : HEADER.size + length])["type"])
        else:
            kinds.append("data")
        data = data[HEADER.size + length :]
    return kinds


async def test_a_stream_sent_with_the_hello_gets_its_welcome_in_the_same_write(
    server: Server,
) -> None:
    first = await _first_write(server, StreamRequest(track="a/two.flac"))
    assert _kinds(first)[:2] == ["welcome", "stream_start"]


async def test_a_list_sent_with_the_hello_gets_its_welcome_in_the_same_write(
    server: Server,
) -> None:
    first = await _first_write(server, ListRequest())
    assert _kinds(first)[:2] == ["welcome", "tracks"]


async def test_a_rescan_sent_with_the_hello_gets_its_welcome_before_the_scan(
    server: Server,
) -> None:
    """A reply that waits for something (a scan) does not hold the welcome."""
    first = await _first_write(server, RescanRequest())
    assert _kinds(first) == ["welcome"]


async def test_a_hello_alone_is_welcomed_at_once(server: Server) -> None:
    """Nothing came with the hello: the welcome is not held while the server waits
    for the client's request (which would wait for the welcome)."""
    first = await _first_write(server)
    assert _kinds(first) == ["welcome"]


async def test_a_missing_track_sent_with_the_hello_gets_welcome_then_error(
    server: Server,
) -> None:
    first = await _first_write(server, StreamRequest(track="nothing-like-it.mp3"))
    assert _kinds(first) == ["welcome", "error"]


# --------------------------------------------------------------- the transport, at once


@asynccontextmanager
async def socket_pair() -> AsyncIterator[tuple[Transport, socket.socket]]:
    """A Transport on one end of a real TCP connection on loopback, the plain other end."""
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    transport = Transport(stream, peer="test peer")
    try:
        yield transport, peer
    finally:
        peer.close()
        await transport.aclose()


async def readable(transport: Transport) -> None:
    assert isinstance(transport.stream, trio.SocketStream)
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(transport.stream.socket)


async def test_receive_nowait_gives_what_is_there_and_never_waits() -> None:
    async with socket_pair() as (transport, peer):
        assert transport.receive_nowait(1024) is None  # nothing yet: no wait
        peer.sendall(b"hello")
        await readable(transport)
        assert transport.receive_nowait(1024) == b"hello"
        peer.shutdown(socket.SHUT_WR)
        await readable(transport)
        assert transport.receive_nowait(1024) == b""  # the peer's end of file


async def test_send_nowait_takes_what_fits_and_says_zero_when_full() -> None:
    async with socket_pair() as (transport, peer):
        assert transport.send_nowait(b"abc") == 3
        assert peer.recv(3) == b"abc"
        block = b"x" * (1 << 20)
        taken = [transport.send_nowait(block) for _ in range(64)]  # far beyond any buffer
        assert taken[-1] == 0 and sum(taken) > 0
        assert not transport.broken  # full is not broken


async def test_send_nowait_to_a_reset_peer_is_connection_lost() -> None:
    async with socket_pair() as (transport, peer):
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # with a zero linger: a reset
        with pytest.raises(ConnectionLost), trio.fail_after(5):
            for _ in range(1000):  # the reset may take a moment to arrive
                transport.send_nowait(b"x" * 4096)
                await trio.sleep(0.001)
        assert transport.broken


async def test_the_nowait_calls_do_nothing_on_a_memory_stream() -> None:
    a, b = trio.testing.memory_stream_pair()
    transport = Transport(a)
    await b.send_all(b"waiting")
    assert transport.receive_nowait(100) is None  # not a socket: receive() is the way
    assert transport.send_nowait(b"data") == 0


# --------------------------------------------------------------- send turns, end to end


async def test_streams_taking_one_turn_at_a_time_all_arrive_whole(root: Path) -> None:
    """With a single send turn, twenty concurrent downloads over TCP still arrive byte
    for byte (the turns order the sendfile calls; they never drop or mix a byte)."""
    server = cast(Server, library_server(root, TRACKS, port=0, host="127.0.0.1", watch=False))
    config = server.config
    server.send_turns = trio.CapacityLimiter(1)
    name = "a/one.mp3"
    want = hashlib.sha256(TRACKS[name]).hexdigest()
    got: list[str] = []

    async def download(address: str) -> None:
        async with open_client(address, early=True) as client:
            async with client.stream(name) as stream:
                digest = hashlib.sha256()
                async for chunk in stream:
                    digest.update(chunk)
                assert stream.end is not None and stream.end.sha256 == want
            got.append(digest.hexdigest())

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(
                lambda task_status: serve(config, server=server, task_status=task_status)
            )
            host, port = addresses[0]
            async with trio.open_nursery() as clients:
                for _ in range(20):
                    clients.start_soon(download, f"{host}:{port}")
            server.stop()
    assert got == [want] * 20
    assert server.send_turns.borrowed_tokens == 0
