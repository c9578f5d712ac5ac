"""The transport boundary: trio's exceptions in, musiclib's out.

Over trio's memory and lockstep streams (timeouts in zero wall time with the
autojump clock) and over real sockets (a socketpair for ``sendfile``, TCP on
loopback for a reset and for connecting).
"""

from __future__ import annotations

import ast
import os
import socket
import ssl
import struct
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from musiclib.errors import ConnectError, ConnectionLost, Timeout
from musiclib.transport import Transport, open_stream

DATA = os.urandom(3 * 1024 * 1024 + 123)


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[int]:
    """A descriptor of a file holding :data:`DATA`."""
    path = tmp_path / "data.bin"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def socket_transport_pair() -> tuple[Transport, trio.SocketStream]:
    """A Transport over a real (unix) socket, and a plain stream on the other end."""
    a, b = trio.socket.socketpair()
    return Transport(trio.SocketStream(a), peer="the other end"), trio.SocketStream(b)


async def receive_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    got = bytearray()
    while len(got) < count:
        chunk = await stream.receive_some(count - len(got))
        assert chunk, "end of file before the expected bytes"
        got += chunk
    return bytes(got)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of plain TCP sockets on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset (linger 0) instead of an orderly end."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ---- receive ---------------------------------------------------------------------------


async def test_receive_gives_the_bytes_then_empty_at_end_of_file() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    transport = Transport(ours)
    await theirs.send_all(b"hello")
    assert await transport.receive(1024, 5) == b"hello"
    await theirs.aclose()
    assert await transport.receive(1024, 5) == b""
    assert await transport.receive(1024, 5) == b""  # and stays at the end


async def test_receive_returns_bytes_even_from_a_memory_stream() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(b"abc")
    data = await Transport(ours).receive(1024, 5)
    assert type(data) is bytes


async def test_receive_times_out_as_musiclib_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, _theirs = trio.testing.memory_stream_pair()
    transport = Transport(ours, peer="the server")
    start = trio.current_time()
    with pytest.raises(Timeout, match=r"^the server sent nothing for 7\.5 s$") as caught:
        await transport.receive(1024, 7.5)
    assert trio.current_time() - start == pytest.approx(7.5)
    assert not isinstance(caught.value, trio.TooSlowError)
    assert not transport.broken  # a read that timed out sent nothing


async def test_receive_waits_for_ever_with_an_infinite_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    transport = Transport(ours)

    async def later() -> None:
        await trio.sleep(3600)
        await theirs.send_all(b"late")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        assert await transport.receive(1024, float("inf")) == b"late"


async def test_receive_after_our_own_close_is_connection_lost() -> None:
    ours, _theirs = trio.testing.memory_stream_pair()
    transport = Transport(ours)
    await transport.aclose()
    with pytest.raises(ConnectionLost, match=r"^connection lost: "):
        await transport.receive(1024, 5)


async def test_a_reset_while_receiving_is_connection_lost() -> None:
    mine, peer = tcp_pair()
    transport = Transport(trio.SocketStream(trio.socket.from_stdlib_socket(mine)))
    try:
        reset(peer)
        with pytest.raises(ConnectionLost, match=r"^connection lost: .*reset") as caught:
            await transport.receive(1024, 5)
        assert isinstance(caught.value.__cause__, trio.BrokenResourceError)
    finally:
        await transport.aclose()


# ---- send ------------------------------------------------------------------------------


async def test_send_delivers_everything() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    transport = Transport(ours)
    await transport.send(b"one ", 5)
    await transport.send(memoryview(b"two"), 5)
    assert await theirs.receive_some() == b"one two"
    assert not transport.broken


async def test_a_peer_that_stops_reading_times_out_and_breaks_the_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, _theirs = trio.testing.lockstep_stream_pair()  # a send waits for a reader
    transport = Transport(ours, peer="the server")
    start = trio.current_time()
    with pytest.raises(Timeout, match=r"^the server did not accept data for 30 s$"):
        await transport.send(b"x" * 1000, 30)
    assert trio.current_time() - start == pytest.approx(30)
    assert transport.broken
    with pytest.raises(ConnectionLost, match="an earlier send stopped part way"):
        await transport.send(b"more", 30)


async def test_a_cancelled_send_marks_the_stream_broken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = trio.testing.lockstep_stream_pair()
    transport = Transport(ours)
    with trio.move_on_after(1) as scope:
        await transport.send(b"half a frame", 30)
    assert scope.cancelled_caught  # the cancellation itself passed through untranslated
    assert transport.broken
    with pytest.raises(ConnectionLost, match="an earlier send stopped part way"):
        await transport.send(b"the next frame", 30)
    await theirs.aclose()


async def test_a_send_to_a_closed_peer_is_connection_lost_and_broken() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    transport = Transport(ours)
    await theirs.aclose()
    with pytest.raises(ConnectionLost, match=r"^connection lost: ") as caught:
        await transport.send(b"anyone?", 5)
    assert isinstance(caught.value.__cause__, trio.BrokenResourceError)
    assert transport.broken


async def test_a_reset_while_sending_is_connection_lost() -> None:
    mine, peer = tcp_pair()
    transport = Transport(trio.SocketStream(trio.socket.from_stdlib_socket(mine)))
    try:
        reset(peer)
        await trio.sleep(0.05)  # the reset arrives
        with pytest.raises(ConnectionLost, match=r"^connection lost: "):
            for _ in range(100):  # the first write may still be taken by the kernel
                await transport.send(b"x" * 65536, 5)
        assert transport.broken
    finally:
        await transport.aclose()


async def test_send_after_our_own_close_is_connection_lost() -> None:
    ours, _theirs = trio.testing.memory_stream_pair()
    transport = Transport(ours)
    await transport.aclose()
    with pytest.raises(ConnectionLost, match=r"^connection lost: "):
        await transport.send(b"x", 5)


# ---- sendfile --------------------------------------------------------------------------


async def test_sendfile_on_a_socket_is_zero_copy_and_exact(data_file: int) -> None:
    transport, peer = socket_transport_pair()
    assert transport.can_sendfile
    assert isinstance(transport.stream, trio.SocketStream)
    assert transport.raw_fd() == transport.stream.socket.fileno()
    offset, count = 1000, len(DATA) - 5000  # larger than the socket's buffer
    async with trio.open_nursery() as nursery:
        got: list[bytes] = []

        async def read() -> None:
            got.append(await receive_exactly(peer, count))

        nursery.start_soon(read)
        assert await transport.sendfile(data_file, offset, count, 5) == count
    assert got == [DATA[offset : offset + count]]
    assert not transport.broken
    await transport.send(b"after", 5)  # the stream goes on
    assert await receive_exactly(peer, 5) == b"after"
    await transport.aclose()
    await peer.aclose()


async def test_sendfile_stops_short_at_the_end_of_the_file(data_file: int) -> None:
    transport, peer = socket_transport_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_exactly, peer, 100)
        assert await transport.sendfile(data_file, len(DATA) - 100, 5000, 5) == 100
    assert not transport.broken  # what was asked for is the caller's problem, not the stream's
    await transport.aclose()
    await peer.aclose()


async def test_sendfile_falls_back_to_reads_on_other_streams(data_file: int) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    transport = Transport(ours)
    assert not transport.can_sendfile
    assert transport.raw_fd() is None
    count = len(DATA) - 10
    async with trio.open_nursery() as nursery:
        got: list[bytes] = []

        async def read() -> None:
            got.append(await receive_exactly(theirs, count))

        nursery.start_soon(read)
        assert await transport.sendfile(data_file, 10, count, 5) == count
    assert got == [DATA[10:]]
    assert await transport.sendfile(data_file, len(DATA) - 3, 10, 5) == 3
    assert await receive_exactly(theirs, 3) == DATA[-3:]


async def test_sendfile_to_a_peer_that_stops_reading_times_out(
    data_file: int, autojump_clock: trio.testing.MockClock
) -> None:
    transport, peer = socket_transport_pair()
    with pytest.raises(Timeout, match=r"^the other end did not accept data for 30 s$"):
        await transport.sendfile(data_file, 0, len(DATA), 30)
    assert transport.broken
    with pytest.raises(ConnectionLost, match="an earlier send stopped part way"):
        await transport.sendfile(data_file, 0, 10, 30)
    await transport.aclose()
    await peer.aclose()


async def test_a_cancelled_sendfile_marks_the_stream_broken(
    data_file: int, autojump_clock: trio.testing.MockClock
) -> None:
    transport, peer = socket_transport_pair()
    with trio.move_on_after(1) as scope:
        await transport.sendfile(data_file, 0, len(DATA), 30)
    assert scope.cancelled_caught
    assert transport.broken
    await transport.aclose()
    await peer.aclose()


async def test_sendfile_to_a_vanished_peer_is_connection_lost(data_file: int) -> None:
    transport, peer = socket_transport_pair()
    await peer.aclose()
    with pytest.raises(ConnectionLost, match=r"^connection lost: .*Broken pipe") as caught:
        await transport.sendfile(data_file, 0, len(DATA), 5)
    assert isinstance(caught.value.__cause__, BrokenPipeError)
    assert transport.broken
    await transport.aclose()


async def test_sendfile_after_a_reset_is_connection_lost(data_file: int) -> None:
    mine, peer = tcp_pair()
    transport = Transport(trio.SocketStream(trio.socket.from_stdlib_socket(mine)))
    reset(peer)
    await trio.sleep(0.05)
    with pytest.raises(ConnectionLost, match=r"^connection lost: "):
        for _ in range(100):
            await transport.sendfile(data_file, 0, 65536, 5)
    await transport.aclose()


# ---- aclose ----------------------------------------------------------------------------


async def test_aclose_is_shielded_bounded_and_never_raises() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    transport = Transport(ours)
    with trio.CancelScope() as scope:
        scope.cancel()
        await transport.aclose()  # runs although cancelled
    await transport.aclose()  # twice is fine
    assert await theirs.receive_some() == b""  # the peer saw the end

    with trio.fail_after(5):
        await Transport(_BadClose(stuck=True)).aclose(0.01)  # bounded
    await Transport(_BadClose(stuck=False)).aclose()  # silent


class _BadClose(trio.abc.Stream):
    """A stream whose close hangs for ever, or fails as a broken TLS stream's may."""

    def __init__(self, *, stuck: bool) -> None:
        self.stuck = stuck

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return b""

    async def aclose(self) -> None:
        if self.stuck:
            await trio.sleep_forever()
        raise trio.BrokenResourceError("the close_notify could not be sent")


# ---- connecting ------------------------------------------------------------------------


async def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on: bound, then closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectError, match=rf"^cannot connect to 127\.0\.0\.1:{port}: .*refused"):
        await open_stream("127.0.0.1", port, timeout=5)


async def test_a_tls_handshake_nobody_answers_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, says nothing
        port = listener.getsockname()[1]
        with pytest.raises(ConnectError, match=r"^cannot connect to here: timed out after 4 s$"):
            await open_stream(
                "127.0.0.1",
                port,
                timeout=4,
                ssl_context=ssl.create_default_context(),
                address="here",
            )


async def test_tls_to_a_plain_server_is_a_connect_error() -> None:
    async def plain(stream: trio.SocketStream) -> None:
        await stream.send_all(b"hello, this is not TLS\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, plain, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with pytest.raises(ConnectError, match=rf"^TLS with 127\.0\.0\.1:{port} failed: "):
            await open_stream(
                "127.0.0.1", port, timeout=5, ssl_context=ssl.create_default_context()
            )
        nursery.cancel_scope.cancel()


async def test_a_plain_connection_is_a_socket_stream() -> None:
    async def echo(stream: trio.SocketStream) -> None:
        await stream.send_all(await stream.receive_some())

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        stream = await open_stream("127.0.0.1", port, timeout=5)
        transport = Transport(stream)
        assert transport.can_sendfile
        await transport.send(b"ping", 5)
        assert await transport.receive(100, 5) == b"ping"
        await transport.aclose()
        nursery.cancel_scope.cancel()


# ---- the boundary is the only one --------------------------------------------------------

#: trio's stream exceptions, which only the transport may catch on a network connection
TRIO_STREAM_ERRORS = {"TooSlowError", "BrokenResourceError", "ClosedResourceError"}
#: the other modules that name them, and why (see transport.py's docstring)
OTHER_BOUNDARIES = {
    "decode.py": 1,  # ffmpeg's standard error pipe
    "player.py": 3,  # the player's standard input pipe
    "live/convert.py": 1,  # a converter ffmpeg's standard input pipe
    "fetch.py": 1,  # a memory channel between two of its own tasks
    "live/relay.py": 1,  # fail_after's TooSlowError: a deadline on asking the origin's format
    "workers.py": 2,  # a worker's standard input and output pipes
    "wyoming.py": 4,  # two memory channels between its tasks, two fail_after deadlines
}


def catches_trio_stream_errors(tree: ast.AST) -> int:
    """How many ``except`` clauses and ``suppress(...)`` calls in ``tree`` name one of them."""
    count = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            caught: ast.AST = node.type
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("suppress"):
            caught = node
        else:
            continue
        count += any(
            isinstance(n, ast.Attribute) and n.attr in TRIO_STREAM_ERRORS for n in ast.walk(caught)
        )
    return count


def test_only_the_transport_catches_trio_stream_errors_on_a_connection() -> None:
    """server.py and client.py (and everything else) reach the network through Transport."""
    package = Path(__file__).resolve().parent.parent / "musiclib"
    found = {
        path.relative_to(package).as_posix(): count
        for path in sorted(package.rglob("*.py"))
        if (count := catches_trio_stream_errors(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert found.pop("transport.py") > 0
    assert found == OTHER_BOUNDARIES
