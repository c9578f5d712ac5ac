"""The play gateway (musiclib.gateway): the Range parser, and the HTTP endpoint driven over
trio memory streams with a scripted musiclib server behind it (no sockets)."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import musiclib.gateway as gateway_module
from musiclib.errors import ConnectionLost, NotFound
from musiclib.gateway import (
    PROC_NET_TCP,
    ByteRange,
    Gateway,
    RangeNotSatisfiable,
    content_type,
    parse_range,
    socket_owner,
)
from musiclib.protocol import TrackInfo
from musiclib.transport import Transport

DATA = bytes(range(256)) * 40  # 10 240 bytes, every position distinguishable
TRACKS = [
    TrackInfo(path="Album/01 - One.flac", title="One", format="flac", size=len(DATA)),
    TrackInfo(path="Album/02 - Two.m4a", title="Two", format="m4a", size=len(DATA)),
    TrackInfo(path="Album/03 - Gone.mp3", title="Gone", format="mp3", size=len(DATA)),
]
TOKEN = "s3cret-token"


# ---- the Range header ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-", 100, ByteRange(0, 100)),
        ("bytes=0-0", 100, ByteRange(0, 1)),
        ("bytes=10-19", 100, ByteRange(10, 20)),
        ("bytes=90-1000", 100, ByteRange(90, 100)),  # clipped to the end
        ("bytes=99-", 100, ByteRange(99, 100)),
        ("bytes=-500", 1000, ByteRange(500, 1000)),  # suffix
        ("bytes=-500", 100, ByteRange(0, 100)),  # a suffix longer than the file: all of it
        ("BYTES = 5-6", 100, ByteRange(5, 7)),  # the unit ignores case; spaces around
        ("bytes=5-6,", 100, ByteRange(5, 7)),  # an empty list element is allowed
        ("bytes=0-1,5-6", 100, None),  # several ranges: the whole file (200)
        ("bytes=0-0,-1", 100, None),
        ("bytes=19-10", 100, None),  # last before first: invalid, ignored
        ("bytes=", 100, None),
        ("bytes=-", 100, None),
        ("bytes=a-b", 100, None),
        ("bytes=\u0661-\u0662", 100, None),  # Arabic-Indic digits are not digits here
        ("items=0-5", 100, None),  # another unit
        ("0-5", 100, None),
        ("bytes=0-" + "9" * 5000, 100, ByteRange(0, 100)),  # a huge last position
    ],
)
def test_parse_range(header: str | None, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=100-", 100),  # starts at the end
        ("bytes=100-200", 100),
        ("bytes=" + "9" * 5000 + "-", 100),  # starts far past it
        ("bytes=-0", 100),  # an empty suffix
        ("bytes=0-", 0),  # nothing of an empty file can be asked for
        ("bytes=-5", 0),
    ],
)
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


def reference(first: int | None, last: int | None, size: int) -> ByteRange | str:
    """RFC 9110's rule for one range-spec, written out plainly."""
    if first is None:
        assert last is not None
        if last == 0 or size == 0:
            return "416"
        return ByteRange(max(0, size - last), size)
    if last is not None and last < first:
        return "ignored"
    if first >= size:
        return "416"
    return ByteRange(first, size if last is None else min(last, size - 1) + 1)


@given(
    first=st.none() | st.integers(0, 10**6),
    last=st.none() | st.integers(0, 10**6),
    size=st.integers(0, 10**6),
    zeros=st.integers(0, 3),
)
def test_one_range_spec_follows_the_rfc(
    first: int | None, last: int | None, size: int, zeros: int
) -> None:
    if first is None and last is None:
        return
    pad = "0" * zeros  # leading zeros change nothing
    spec = f"{'' if first is None else pad + str(first)}-{'' if last is None else pad + str(last)}"
    want = reference(first, last, size)
    if want == "416":
        with pytest.raises(RangeNotSatisfiable):
            parse_range(f"bytes={spec}", size)
        return
    got = parse_range(f"bytes={spec}", size)
    assert got == (None if want == "ignored" else want)
    if got is not None:
        assert 0 <= got.start < got.stop <= size


@given(header=st.text(max_size=60), size=st.integers(0, 10**12))
def test_any_header_parses_to_a_range_inside_the_file_or_is_refused(header: str, size: int) -> None:
    try:
        got = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    assert got is None or 0 <= got.start < got.stop <= size


@given(header=st.from_regex(r"bytes=[0-9 ,-]{0,30}", fullmatch=True), size=st.integers(0, 999))
def test_range_like_headers_never_fail_otherwise(header: str, size: int) -> None:
    try:
        got = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    assert got is None or 0 <= got.start < got.stop <= size


def test_content_types() -> None:
    assert content_type("mp3") == "audio/mpeg"
    assert content_type("FLAC") == "audio/flac"
    assert content_type("m4a") == "audio/mp4"
    assert content_type("xyz") == "application/octet-stream"


# ---- a scripted server behind the gateway ---------------------------------------------


@dataclass
class Start:
    size: int
    offset: int


@dataclass
class Upstream:
    """What the scripted musiclib server does, and what it was asked."""

    #: byte positions at which a stream breaks (once each), as a dropped connection would
    break_at: list[int] = field(default_factory=list)
    #: stream requests: (path, offset)
    asked: list[tuple[str, int]] = field(default_factory=list)
    #: streams left before their end (the gateway stopped reading)
    closed_early: int = 0
    chunk: int = 1000


class FakeStream:
    def __init__(self, upstream: Upstream, path: str, offset: int) -> None:
        self.upstream, self.path, self.offset = upstream, path, offset
        self.start: Start | None = None
        self.position = offset

    async def __aenter__(self) -> FakeStream:
        if self.path.endswith("Gone.mp3"):
            raise NotFound(f"no track {self.path!r}")
        self.start = Start(size=len(DATA), offset=self.offset)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.position < len(DATA):
            self.upstream.closed_early += 1

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.position >= len(DATA):
            raise StopAsyncIteration
        for at in self.upstream.break_at:
            if at == self.position:
                self.upstream.break_at.remove(at)
                raise ConnectionLost("connection lost: the test cut it")
            if self.position < at < self.position + self.upstream.chunk:
                piece = DATA[self.position : at]
                self.position = at
                return piece
        piece = DATA[self.position : self.position + self.upstream.chunk]
        self.position += len(piece)
        return piece


class FakeClient:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def stream(self, path: str, offset: int = 0) -> FakeStream:
        self.upstream.asked.append((path, offset))
        return FakeStream(self.upstream, path, offset)


def make_gateway(upstream: Upstream, opened: list[int] | None = None) -> Gateway:
    @asynccontextmanager
    async def connect() -> AsyncIterator[Any]:
        yield FakeClient(upstream)

    gateway = Gateway(
        connect,
        TRACKS,
        token=TOKEN,
        on_open=opened.append if opened is not None else None,
    )
    gateway.port = 1234
    return gateway


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool


async def read_response(stream: trio.abc.Stream, conn: h11.Connection) -> Response:
    """One response, read with h11's client side (bounded: the stream ends)."""
    status, headers, body = 0, {}, bytearray()
    for _ in range(100_000):
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:  # the connection closed in the middle of the body
            return Response(status, headers, bytes(body), False)
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return Response(status, headers, bytes(body), True)
        elif isinstance(event, h11.ConnectionClosed):
            return Response(status, headers, bytes(body), False)
    raise AssertionError("the response never ended")


async def exchange(gateway: Gateway, *requests: tuple[str, str, dict[str, str]]) -> list[Response]:
    """Send each (method, target, headers) in turn on one connection; their responses."""
    ours, theirs = trio.testing.memory_stream_pair()
    responses: list[Response] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle, Transport(theirs, peer="the player"))
        conn = h11.Connection(h11.CLIENT)
        for method, target, headers in requests:
            fields = [("Host", "127.0.0.1"), *headers.items()]
            await ours.send_all(
                conn.send(h11.Request(method=method, target=target, headers=fields))
            )
            await ours.send_all(conn.send(h11.EndOfMessage()))
            responses.append(await read_response(ours, conn))
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
        await ours.aclose()
    return responses


def url_path(index: int) -> str:
    return f"/{TOKEN}/{index}/x"


async def get(gateway: Gateway, index: int = 0, **headers: str) -> Response:
    (response,) = await exchange(gateway, ("GET", url_path(index), headers))
    return response


# ---- the endpoint -------------------------------------------------------------------------


async def test_whole_track_without_range() -> None:
    upstream = Upstream()
    response = await get(make_gateway(upstream))
    assert response.status == 200
    assert response.body == DATA
    assert response.headers["content-length"] == str(len(DATA))
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-type"] == "audio/flac"
    assert "content-range" not in response.headers
    assert upstream.asked == [(TRACKS[0].path, 0)]


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=10-19", 10, 20),
        ("bytes=5000-", 5000, len(DATA)),  # open range
        ("bytes=-500", len(DATA) - 500, len(DATA)),  # suffix
        ("bytes=0-0", 0, 1),
        ("bytes=10000-99999", 10000, len(DATA)),
    ],
)
async def test_a_range_is_206_with_exactly_those_bytes(header: str, start: int, stop: int) -> None:
    upstream = Upstream()
    response = await get(make_gateway(upstream), 1, Range=header)
    assert response.status == 206
    assert response.body == DATA[start:stop]
    assert response.headers["content-range"] == f"bytes {start}-{stop - 1}/{len(DATA)}"
    assert response.headers["content-length"] == str(stop - start)
    assert response.headers["content-type"] == "audio/mp4"
    assert upstream.asked == [(TRACKS[1].path, start)]  # the server's offset stream
    if stop < len(DATA):
        assert upstream.closed_early == 1  # cut at the range's end


async def test_several_ranges_get_the_whole_track() -> None:
    response = await get(make_gateway(Upstream()), Range="bytes=0-9,20-29")
    assert response.status == 200
    assert response.body == DATA


@pytest.mark.parametrize("header", [f"bytes={len(DATA)}-", "bytes=-0", "bytes=99999-100000"])
async def test_a_range_past_the_end_is_416(header: str) -> None:
    upstream = Upstream()
    response = await get(make_gateway(upstream), Range=header)
    assert response.status == 416
    assert response.headers["content-range"] == f"bytes */{len(DATA)}"
    assert upstream.asked == []


async def test_head_has_the_headers_and_no_body() -> None:
    upstream = Upstream()
    gateway = make_gateway(upstream)
    (whole, part) = await exchange(
        gateway, ("HEAD", url_path(0), {}), ("HEAD", url_path(0), {"Range": "bytes=100-"})
    )
    assert (whole.status, whole.body) == (200, b"")
    assert whole.headers["content-length"] == str(len(DATA))
    assert (part.status, part.body) == (206, b"")
    assert part.headers["content-range"] == f"bytes 100-{len(DATA) - 1}/{len(DATA)}"
    assert upstream.asked == []  # no stream opened for a HEAD


async def test_keep_alive_serves_requests_in_turn_and_tells_track_changes() -> None:
    opened: list[int] = []
    gateway = make_gateway(Upstream(), opened)
    responses = await exchange(
        gateway,
        ("GET", url_path(0), {"Range": "bytes=0-99"}),
        ("GET", url_path(0), {"Range": "bytes=200-299"}),
        ("GET", url_path(1), {"Range": "bytes=0-9"}),
        ("GET", url_path(0), {}),
    )
    assert [r.status for r in responses] == [206, 206, 206, 200]
    assert responses[1].body == DATA[200:300]
    assert opened == [0, 1, 0]  # once per change of track, not per request
    assert [(r.method, r.index, r.status, r.complete) for r in gateway.requests] == [
        ("GET", 0, 206, True),
        ("GET", 0, 206, True),
        ("GET", 1, 206, True),
        ("GET", 0, 200, True),
    ]


@pytest.mark.parametrize(
    "target",
    [
        "/wrong-token/0/x",
        f"/{TOKEN[:-1]}/0/x",
        "/0/x",
        "/",
        f"/{TOKEN}/3/x",  # past the queue
        f"/{TOKEN}/-1/x",
        f"/{TOKEN}/1e3/x",
        f"/{TOKEN}/%D9%A3/x",
    ],
)
async def test_a_wrong_token_or_index_is_404_and_reveals_nothing(target: str) -> None:
    upstream = Upstream()
    (response,) = await exchange(make_gateway(upstream), ("GET", target, {}))
    assert response.status == 404
    assert response.body == b"no such track here\n"
    assert upstream.asked == []


async def test_other_methods_are_405() -> None:
    (response,) = await exchange(make_gateway(Upstream()), ("DELETE", url_path(0), {}))
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"


async def test_a_track_the_server_does_not_have_is_404() -> None:
    response = await get(make_gateway(Upstream()), 2)
    assert response.status == 404
    assert "Gone.mp3" in response.body.decode()


async def test_a_dropped_server_connection_is_resumed_from_the_byte_reached() -> None:
    upstream = Upstream(break_at=[3500, 7001])
    response = await get(make_gateway(upstream))
    assert response.status == 200
    assert response.body == DATA  # exact, seamless
    assert upstream.asked == [(TRACKS[0].path, 0), (TRACKS[0].path, 3500), (TRACKS[0].path, 7001)]


async def test_a_server_that_keeps_failing_cuts_the_body_short() -> None:
    upstream = Upstream(break_at=[3500, 3500, 3500, 3500])
    gateway = make_gateway(upstream)
    gateway.upstream_attempts = 2
    response = await get(gateway)
    assert response.status == 200
    assert not response.complete  # the connection closed before Content-Length bytes
    assert response.body == DATA[:3500]
    assert gateway.requests[-1].complete is False


async def test_a_player_vanishing_mid_body_ends_only_its_connection() -> None:
    upstream = Upstream()
    gateway = make_gateway(upstream)
    ours, theirs = trio.testing.memory_stream_pair()
    with trio.fail_after(10):  # a hang is a failure, not a stuck suite
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gateway.handle, Transport(theirs, peer="the player"))
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method="GET", target=url_path(0), headers=[("Host", "x")])
            await ours.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
            got = b""
            while b"\r\n\r\n" not in got:
                got += await ours.receive_some(100)
            await ours.aclose()  # gone, a few bytes into the body
    record = gateway.requests[-1]
    assert (record.status, record.complete) == (200, False)
    assert record.sent < len(DATA)
    assert upstream.closed_early == 1  # the server's stream was let go


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"\x00" * 64 + b"\r\n\r\n",
    ],
)
async def test_garbage_gets_400_and_a_close(raw: bytes) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(make_gateway(Upstream()).handle, Transport(theirs))
            await ours.send_all(raw)
            reply = b""
            for _ in range(1000):
                data = await ours.receive_some(1000)
                if not data:
                    break
                reply += data
    assert reply.startswith(b"HTTP/1.1 400 "), reply


async def test_a_head_that_never_ends_is_cut(autojump_clock: trio.testing.MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(make_gateway(Upstream()).handle, Transport(theirs))
        await ours.send_all(b"GET /")
        start = trio.current_time()
        assert await ours.receive_some(100) == b""  # closed, at the deadline
        assert trio.current_time() - start == pytest.approx(10.0)


async def test_it_serves_loopback_only_and_every_url_names_the_token() -> None:
    gateway = make_gateway(Upstream())
    gateway.port = 0
    async with trio.open_nursery() as nursery:
        port = await nursery.start(gateway.serve)
        assert gateway.url(0) == f"http://127.0.0.1:{port}/{TOKEN}/0/01%20-%20One.flac"
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET", target=url_path(0), headers=[("Host", "x"), ("Range", "bytes=-16")]
        )
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        response = await read_response(stream, conn)
        assert (response.status, response.body) == (206, DATA[-16:])
        await stream.aclose()
        nursery.cancel_scope.cancel()


def test_the_default_token_is_long_and_random() -> None:
    async def connect() -> Any:  # never called
        raise AssertionError

    tokens = {Gateway(connect, TRACKS).token for _ in range(20)}  # type: ignore[arg-type]
    assert len(tokens) == 20
    assert all(len(t) >= 22 for t in tokens)  # 16 random bytes, base64url


# ---- who may connect -------------------------------------------------------------------

TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1E09 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:D431 0100007F:1E09 01 00000000:00000000 00:00000000 00000000  1001        0 2 1
   2: 0100007F:1E09 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 3 1
"""


@pytest.mark.skipif(sys.byteorder != "little", reason="the sample table is a little-endian one")
def test_socket_owner_reads_proc_net_tcp() -> None:
    # the player's end (port 0xD431 = 54321) to ours (0x1E09 = 7689) belongs to user 1001
    assert socket_owner(TCP_TABLE, ("127.0.0.1", 54321), ("127.0.0.1", 7689)) == 1001
    assert socket_owner(TCP_TABLE, ("127.0.0.1", 7689), ("127.0.0.1", 54321)) == 1000
    assert socket_owner(TCP_TABLE, ("127.0.0.1", 1), ("127.0.0.1", 7689)) is None
    assert socket_owner("", ("127.0.0.1", 1), ("127.0.0.1", 2)) is None


async def serve_and_get(gateway: Gateway) -> bytes:
    """One GET to a gateway listening on loopback; whatever came back before the close."""
    gateway.port = 0
    async with trio.open_nursery() as nursery:
        port = await nursery.start(gateway.serve)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        request = f"GET {url_path(0)} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-3\r\n\r\n"
        await stream.send_all(request.encode())
        got = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in got:
                try:
                    data = await stream.receive_some(1000)
                except trio.BrokenResourceError:  # reset: closed with our request unread
                    break
                if not data:
                    break
                got += data
        await stream.aclose()
        nursery.cancel_scope.cancel()
    return got


@pytest.mark.skipif(not PROC_NET_TCP.exists(), reason="needs Linux's /proc/net/tcp")
async def test_connections_of_another_user_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (await serve_and_get(make_gateway(Upstream()))).startswith(b"HTTP/1.1 206 ")
    monkeypatch.setattr(gateway_module, "_our_uid", lambda: os.getuid() + 1)
    assert await serve_and_get(make_gateway(Upstream())) == b""  # closed without a word
