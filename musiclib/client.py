"""The musiclib client: a thin trio shell around :mod:`musiclib.protocol`.

``open_client()`` connects and shakes hands (or, for ``get`` and ``play``, sends
its ``hello`` together with the first request: one round trip less); the
:class:`Client` it yields has one method per request. A stream is an async
context manager that hands out an async iterator of payload chunks (never an
async generator holding a cancel scope across ``yield``, which trio forbids). Bytes move through a
:class:`~musiclib.transport.Transport`, which raises only
:mod:`musiclib.errors`; :func:`~musiclib.transport.open_stream` connects.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar

import trio

from . import DEFAULT_SERVER, __version__
from .errors import (
    Busy,
    ConnectionLost,
    LocalProtocolError,
    RemoteProtocolError,
    Timeout,
    TransportError,
    UsageError,
    server_error,
    single_errors,
)
from .protocol import (
    EARLY_REQUESTS,
    Audio,
    ChannelInfo,
    ChannelList,
    ChannelsRequest,
    Closed,
    Connection,
    Data,
    Error,
    Event,
    GapNotice,
    Hello,
    InfoReply,
    InfoRequest,
    ListEnd,
    ListenEnd,
    ListenRequest,
    ListenStart,
    ListRequest,
    Message,
    NeedData,
    PublishDone,
    PublishEnd,
    PublishReady,
    PublishRequest,
    RescanRequest,
    RescanStatus,
    Role,
    ServerStatus,
    State,
    StatusRequest,
    StopRequest,
    StreamEnd,
    StreamRequest,
    StreamStart,
    TrackInfo,
    TrackPage,
    Welcome,
)
from .transport import Transport, open_stream

if TYPE_CHECKING:
    import ssl

#: failures worth reconnecting for (``get``, ``play``, ``listen``): the network, a peer
#: cut in the middle of a frame or otherwise confused, a full server
RETRYABLE: tuple[type[Exception], ...] = (TransportError, RemoteProtocolError, Busy)
#: bytes asked of the socket per read; data frames are handed out as they arrive
READ_SIZE = 256 * 1024
#: the most tracks one list reply may hold (PROTOCOL.md, Limits); ``ls`` asks for at
#: most this many, and a reply with more is a protocol error
MAX_LIST_TRACKS = 100_000
#: the most bytes (frames and all) one list reply may take
MAX_LIST_BYTES = 128 * 1024 * 1024
#: the longest wait for the answer to ``hello`` (a musiclib server answers at once, a busy
#: one within a second): a peer that says nothing is not a musiclib server
HELLO_TIMEOUT = 5.0
#: seconds of audio a decoded stream may carry beyond the ``duration`` asked for
DURATION_MARGIN = 1.0


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``HOST`` (port 7650) -> ``(host, port)``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")) or text.endswith("]"):
        host, port_text = text, "7650"  # no port, or a bare IPv6 address
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"bad server address {text!r}: expected HOST:PORT") from None
    if not host:
        raise UsageError(f"bad server address {text!r}: expected HOST:PORT")
    if not 0 < port < 65536:
        raise UsageError(f"bad server address {text!r}: the port must be 1-65535")
    return host, port


def _not_musiclib(first: bytes, tls: bool) -> str:
    """What the first bytes of a reply to ``hello`` that is not a musiclib frame say the
    peer is, and what to do."""
    if not tls and len(first) >= 2 and first[0] in (0x15, 0x16) and first[1] == 3:
        return "it answers in TLS: add --tls (or --cafile PEM)"
    if first.startswith(b"HTTP/"):
        line = first.split(b"\r\n", 1)[0].decode("ascii", "replace")
        return f"it is a web server ({line!r}): check the port"
    return f"it answered {first[:24]!r}: check the address and port"


class Client:
    """A handshaken connection to a musiclib server; one request at a time."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        timeout: float = 30.0,
        token: str | None = None,
        version: int = 1,
    ) -> None:
        #: the stream itself, for tests that write raw bytes or vanish without a word
        self._stream = stream
        self._transport = Transport(stream, peer="the server")
        self._conn = Connection(Role.CLIENT)
        self._token = token
        self._version = version
        self.timeout = timeout
        self.welcome: Welcome | None = None
        #: bytes received so far (a reply's size is the difference)
        self.received = 0
        #: the first bytes the server sent, to say what it is when it is not musiclib
        self._first = b""
        #: the hello waits for the first request (hello_with_first_request)...
        self._hello_due = False
        #: ...and then the welcome is read before that request's reply
        self._welcome_due = False

    async def handshake(self) -> Welcome:
        """Send ``hello`` and wait for ``welcome``; a refusal raises its ServerError.

        File requests need only version 1, so that a client keeps working with
        servers older than live audio; live requests ask for version 2.
        """
        self._hello_due = False
        await self._send_bytes(self._hello())
        return await self._receive_welcome()

    def _hello(self) -> bytes:
        client = f"musiclib/{__version__}"
        return self._conn.send(Hello(version=self._version, client=client, token=self._token))

    def hello_with_first_request(self) -> None:
        """Send no ``hello`` now: it goes out with the first request, which follows it
        without waiting for the ``welcome`` (PROTOCOL.md, "Conversation": early requests).

        One round trip less before the first reply. Only a request of version 1
        (``list``, ``info``, ``stream``, ``rescan``) goes early, since the server
        reads it in the conversation's version, which it picks; any other first
        request shakes hands first, as without this. ``welcome`` is set once that
        first reply begins, and a refused ``hello`` raises from there the same
        error :meth:`handshake` would.
        """
        if self._conn.state is not State.AWAIT_HELLO:
            raise LocalProtocolError("the hello has already been sent")
        self._hello_due = True

    async def _receive_welcome(self) -> Welcome:
        wait = min(self.timeout, HELLO_TIMEOUT)
        tls = isinstance(self._stream, trio.SSLStream)
        try:
            event = await self._reply_event(wait)
        except Timeout:
            raise Timeout(
                f"no complete answer to hello within {wait:g} s: is this a musiclib server "
                f"(musiclib serve){'' if tls else ', or one that wants TLS (--tls)'}?"
            ) from None
        except ConnectionLost:
            if tls or self._first:
                raise
            raise ConnectionLost(
                "the server closed the connection without answering hello: if it serves "
                "TLS, add --tls (or --cafile PEM); otherwise its log says why"
            ) from None
        except RemoteProtocolError:
            raise RemoteProtocolError(
                f"not a musiclib server: {_not_musiclib(self._first, tls)}"
            ) from None
        if not isinstance(event, Welcome):
            raise RemoteProtocolError(f"expected welcome, got {type(event).__name__}")
        self.welcome = event
        return event

    async def list(
        self,
        query: str | None = None,
        *,
        artist: str | None = None,
        album: str | None = None,
        format: str | None = None,
        sort: str = "path",
        offset: int = 0,
        limit: int | None = None,
    ) -> tuple[list[TrackInfo], ListEnd]:
        """The tracks matching ``query`` and the filters (see :class:`ListRequest`), and
        the reply's end marker.

        ``end.total`` counts every match; when it is ``None`` the server is
        older than the filters and paging, and sent every track of ``query``.
        A reply is bounded whatever the server does: more than ``limit`` tracks
        (from a server that states ``total``), more than :data:`MAX_LIST_TRACKS`
        tracks, more than :data:`MAX_LIST_BYTES` bytes, or a ``count`` that is
        not what arrived, is a :class:`RemoteProtocolError`.
        """
        request = _list_request(query, artist, album, format, sort, offset, limit)
        await self._send(request)
        tracks: list[TrackInfo] = []
        began = self.received
        while True:
            event = await self._reply_event()
            if isinstance(event, TrackPage):
                tracks.extend(event.tracks)
                _check_list_page(len(tracks), self.received - began)
            elif isinstance(event, ListEnd):
                _check_list_end(event, len(tracks), limit)
                return tracks, event
            else:
                raise RemoteProtocolError(f"unexpected {type(event).__name__} in a list reply")

    def list_pages(
        self,
        query: str | None = None,
        *,
        artist: str | None = None,
        album: str | None = None,
        format: str | None = None,
        sort: str = "path",
        offset: int = 0,
        limit: int | None = None,
    ) -> ListReader:
        """The same tracks as :meth:`list`, page by page as they arrive, however many:
        ``async with client.list_pages(...) as pages: async for page in pages``, then
        ``pages.end``. Only one page is held at a time (see :class:`ListReader`).
        """
        return ListReader(self, _list_request(query, artist, album, format, sort, offset, limit))

    async def rescan(self, *, wait: bool = False) -> RescanStatus:
        """Ask the server to re-read its library; with ``wait``, until the scan is done."""
        await self._send(RescanRequest(wait=wait))
        event = await self._reply_event()
        if not isinstance(event, RescanStatus):
            raise RemoteProtocolError(f"expected rescan_status, got {type(event).__name__}")
        return event

    async def info(self, track: str, *, checksum: bool = False) -> TrackInfo:
        """The track ``track`` resolves to (``NotFound``/``Ambiguous`` otherwise).

        ``checksum`` asks for its sha256 too (computed by the server if need be).
        """
        await self._send(InfoRequest(track=track, checksum=checksum))
        event = await self._reply_event()
        if not isinstance(event, InfoReply):
            raise RemoteProtocolError(f"expected track_info, got {type(event).__name__}")
        return event.track

    def stream(self, track: str, offset: int = 0) -> StreamReader:
        """Ask for ``track``'s original bytes from ``offset``: ``async with client.stream(...)``."""
        return StreamReader(self, StreamRequest(track=track, offset=offset))

    def decode(
        self,
        track: str,
        *,
        sample_format: str = "s16le",
        sample_rate: int | None = None,
        channels: int | None = None,
        start: float = 0.0,
        duration: float | None = None,
        realtime: bool = False,
        max_seconds: float | None = None,
    ) -> StreamReader:
        """Ask for ``track`` decoded to interleaved samples; rate and channels default to
        the source's. ``async with client.decode(...) as s``: ``s.start`` states the format.

        The stream may carry at most ``duration`` (plus :data:`DURATION_MARGIN`)
        or else ``max_seconds`` seconds of audio; more is a RemoteProtocolError.
        """
        return StreamReader(
            self,
            StreamRequest(
                track=track,
                mode="decoded",
                sample_format=sample_format,
                sample_rate=sample_rate,
                channels=channels,
                start=start,
                duration=duration,
                pacing="realtime" if realtime else "none",
            ),
            max_seconds=duration + DURATION_MARGIN if duration is not None else max_seconds,
        )

    async def status(self) -> ServerStatus:
        """How the server is: version, library, scans, uptime, connections (version 2).

        A server older than ``status`` answers ``bad_request`` (an unknown
        message type), which raises :class:`~musiclib.errors.BadRequest`.
        """
        await self._send(StatusRequest())
        event = await self._reply_event()
        if not isinstance(event, ServerStatus):
            raise RemoteProtocolError(f"expected server_status, got {type(event).__name__}")
        return event

    async def channels(self) -> tuple[ChannelInfo, ...]:
        """The server's live channels (protocol version 2)."""
        await self._send(ChannelsRequest())
        event = await self._reply_event()
        if not isinstance(event, ChannelList):
            raise RemoteProtocolError(f"expected channel_list, got {type(event).__name__}")
        return event.channels

    def listen(
        self,
        channel: str,
        *,
        sample_format: str | None = None,
        sample_rate: int | None = None,
        channels: int | None = None,
        max_latency_ms: int = 500,
        preroll_ms: int = 0,
        frames: int | None = None,
    ) -> ListenReader:
        """Receive ``channel`` live: ``async with client.listen(...) as audio``, then
        ``async for event in audio`` gives :class:`Audio` chunks and gaps (:class:`GapNotice`).
        """
        request = ListenRequest(
            channel=channel,
            sample_format=sample_format,
            sample_rate=sample_rate,
            channels=channels,
            max_latency_ms=max_latency_ms,
            preroll_ms=preroll_ms,
            frames=frames,
        )
        return ListenReader(self, _checked(request))

    @asynccontextmanager
    async def publish(
        self,
        channel: str,
        *,
        sample_rate: int,
        channels: int,
        sample_format: str = "s16le",
        source: str | None = None,
    ) -> AsyncIterator[Publisher]:
        """Become the source of ``channel``; send samples with ``await pub.send(data)``.

        The server may end the publish at any time (it is shutting down): the
        block is then interrupted with that error. Leaving the block normally
        sends ``publish_end`` and waits for the server's count.
        """
        request = PublishRequest(
            channel=channel,
            sample_rate=sample_rate,
            channels=channels,
            sample_format=sample_format,
            source=source,
        )
        await self._send(_checked(request))
        event = await self._reply_event()
        if not isinstance(event, PublishReady):
            raise RemoteProtocolError(f"expected publish_ready, got {type(event).__name__}")
        publisher = Publisher(self, request)
        try:
            with single_errors():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publisher._watch)
                    yield publisher
                    await publisher._end()
                    nursery.cancel_scope.cancel()
        finally:
            await self._settle_publish()

    async def _settle_publish(self) -> None:
        """After a publish that did not end cleanly: owe the server nothing.

        The server ended it with an error: ``publish_end`` returns the
        connection to idle (PROTOCOL.md). Anything else unfinished (we were
        interrupted mid-publish) cannot be resumed: close the connection.
        """
        state = self._conn.state
        if state is State.PUBLISH_ABORTED:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self._send(PublishEnd(sent=self._conn.payload_sent))
                    return
                except (ConnectionLost, Timeout, LocalProtocolError):
                    pass
        if state is not State.IDLE:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (also in the middle of a stream)."""
        await self._transport.aclose()

    # ---- I/O boundary ---------------------------------------------------

    async def _send(self, msg: Message) -> None:
        if self._hello_due:
            self._hello_due = False
            if type(msg) in EARLY_REQUESTS:  # hello and request in one write
                hello = self._hello()
                await self._send_bytes(hello + self._conn.send(msg))
                self._welcome_due = True
                return
            await self.handshake()
        idle = self._conn.state is State.IDLE or isinstance(msg, (Hello, StopRequest, PublishEnd))
        if not idle:
            raise LocalProtocolError(
                "the previous reply is unfinished; the connection cannot take a request"
            )
        await self._send_bytes(self._conn.send(msg))

    async def _send_bytes(self, data: bytes) -> None:
        await self._transport.send(data, self.timeout)

    async def _next_event(self, timeout: float | None = None) -> Event:
        """The next event, which must arrive whole within ``timeout`` seconds.

        One deadline for the whole event, not for each read: a server that
        dribbles a message a byte at a time cannot hold the client forever.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = trio.current_time() + timeout
        while True:
            event = self._conn.next_event()
            if not isinstance(event, NeedData):
                return event
            left = max(deadline - trio.current_time(), 0.0)
            try:
                data = await self._transport.receive(READ_SIZE, left)
            except Timeout:
                raise Timeout(f"the server sent no complete message for {timeout:g} s") from None
            if len(self._first) < 32:
                self._first += data[: 32 - len(self._first)]
            self.received += len(data)
            self._conn.receive_data(data)

    async def _reply_event(self, timeout: float | None = None) -> Event:
        """The next event of a reply; errors and a closed connection become exceptions."""
        if self._welcome_due:  # the request went out right behind the hello
            self._welcome_due = False
            await self._receive_welcome()
        event = await self._next_event(timeout)
        if isinstance(event, Error):
            raise server_error(event.code, event.message, event.candidates)
        if isinstance(event, Closed):
            raise ConnectionLost("the server closed the connection")
        return event


_Start = TypeVar("_Start", StreamStart, ListenStart)
_Request = TypeVar("_Request", StreamRequest, ListenRequest)


class _Reply(Generic[_Request, _Start]):
    """A reply that starts with one message and then flows (a stream, a listen).

    Entering sends the request and waits for the start; leaving the ``async
    with`` block before the reply ends closes the connection, because the
    rest of the reply cannot be skipped; a reply that ended (also with an
    error) leaves the connection usable.
    """

    _START: type[_Start]

    def __init__(self, client: Client, request: _Request) -> None:
        self._client = client
        self._request: _Request = request
        self.start: _Start | None = None

    async def _begin(self) -> None:
        await self._client._send(self._request)
        event = await self._client._reply_event()
        if not isinstance(event, self._START):
            raise RemoteProtocolError(f"expected {self._START.TYPE}, got {type(event).__name__}")
        self.start = event

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client._conn.state is not State.IDLE:  # reply unfinished: cannot skip it
            await self._client.aclose()


def _list_request(
    query: str | None,
    artist: str | None,
    album: str | None,
    format: str | None,
    sort: str,
    offset: int,
    limit: int | None,
) -> ListRequest:
    """The ``list`` request :meth:`Client.list` and :meth:`Client.list_pages` send;
    ``ValueError`` saying why when the protocol would refuse it."""
    request = ListRequest(
        query=query or None,
        artist=artist or None,
        album=album or None,
        format=format or None,
        sort=sort,
        offset=offset,
        limit=limit,
    )
    problem = request.problem()
    if problem:
        raise ValueError(problem)
    return request


def _check_list_page(tracks: int, size: int) -> None:
    """A list reply that has brought ``tracks`` tracks in ``size`` bytes so far may go on."""
    if tracks > MAX_LIST_TRACKS or size > MAX_LIST_BYTES:
        raise RemoteProtocolError(
            f"the list reply exceeds {MAX_LIST_TRACKS} tracks "
            f"or {MAX_LIST_BYTES // (1024 * 1024)} MiB"
        )


def _check_list_end(end: ListEnd, tracks: int, limit: int | None) -> None:
    """``end`` may end a reply of ``tracks`` tracks to a request of ``limit``."""
    if end.count != tracks:
        raise RemoteProtocolError(f"list_end says {end.count} tracks, {tracks} were sent")
    if end.total is not None and limit is not None and tracks > limit:
        raise RemoteProtocolError(f"{tracks} tracks sent for a limit of {limit}")


class ListReader:
    """A listing handed out page by page as it arrives, held one page at a time.

    The caps on one reply (:data:`MAX_LIST_TRACKS` tracks, :data:`MAX_LIST_BYTES`
    bytes, at most the ``limit`` asked for) stay what they are: they bound what a
    server can make a client receive for one request, and they stop an endless
    reply. What they must not do is bound the *library*: so a listing longer
    than one reply may hold is asked for in several, each of at most
    :data:`MAX_LIST_TRACKS` tracks and continuing at the offset where the last
    one ended, until a reply comes back short, the ``total`` the server stated
    is reached, or the caller's ``limit`` is. What passes through is then as
    long as the library (or as the total a lying server states); what is held
    is one ``tracks`` message (under 64 KiB from the reference server, at most
    the protocol's frame limit from any). A server that states no ``total``
    (older than paging) ignored ``offset`` and ``limit`` and sent everything in
    one reply: the listing ends there.

    Paging by offset shares the protocol's rule (PROTOCOL.md, ``list``): with no
    change to the library in between every track comes once; a scan committing
    meanwhile may make a track come twice or not at all, and :attr:`end` then
    says ``scanning``. Leaving the ``async with`` block before the listing ends
    closes the connection (the rest of a reply cannot be skipped).
    """

    def __init__(self, client: Client, request: ListRequest) -> None:
        self._client = client
        self._request = request
        #: the listing's end once it has ended: ``count`` every track listed, ``total``
        #: as the last reply stated it, ``scanning`` if any reply said so
        self.end: ListEnd | None = None
        self._listed = 0  # tracks handed out, over every reply
        self._asked = 0  # the limit of the reply in progress
        self._got = 0  # tracks in the reply in progress
        self._began = 0  # client.received when the reply in progress was asked for
        self._scanning = False

    async def __aenter__(self) -> ListReader:
        await self._ask()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client._conn.state is not State.IDLE:  # reply unfinished: cannot skip it
            await self._client.aclose()

    async def _ask(self) -> None:
        """Send the request for the next reply: from where the last one ended."""
        limit = self._request.limit
        left = MAX_LIST_TRACKS if limit is None else limit - self._listed
        self._asked = min(left, MAX_LIST_TRACKS)
        self._got = 0
        self._began = self._client.received
        request = dataclasses.replace(
            self._request, offset=self._request.offset + self._listed, limit=self._asked
        )
        await self._client._send(request)

    def __aiter__(self) -> AsyncIterator[tuple[TrackInfo, ...]]:
        return self

    async def __anext__(self) -> tuple[TrackInfo, ...]:
        while self.end is None:
            event = await self._client._reply_event()
            if isinstance(event, TrackPage):
                self._got += len(event.tracks)
                _check_list_page(self._got, self._client.received - self._began)
                self._listed += len(event.tracks)
                if event.tracks:
                    return event.tracks
            elif isinstance(event, ListEnd):
                await self._ended(event)
            else:
                raise RemoteProtocolError(f"unexpected {type(event).__name__} in a list reply")
        raise StopAsyncIteration

    async def _ended(self, reply: ListEnd) -> None:
        """One reply ended: ask for the next one, or end the listing."""
        _check_list_end(reply, self._got, self._asked)
        self._scanning = self._scanning or reply.scanning
        limit = self._request.limit
        if (
            reply.total is None  # an older server: it sent everything it would
            or self._got < self._asked  # short: nothing more matches
            or self._request.offset + self._listed >= reply.total
            or (limit is not None and self._listed >= limit)
        ):
            self.end = ListEnd(count=self._listed, total=reply.total, scanning=self._scanning)
            return
        await self._ask()


class StreamReader(_Reply[StreamRequest, StreamStart]):
    """One stream reply: ``start`` once entered, then chunks, then ``end``.

    What a server may send is bounded here, whoever reads the chunks: an
    original stream at most ``size - offset`` bytes (the protocol object holds
    it to ``length`` when that is stated), a decoded one at most
    ``max_seconds`` of audio; and the start must answer the request (its mode,
    its sample format, rate and channels when they were asked for, an offset
    no later than asked). Anything else is a :class:`RemoteProtocolError`.
    """

    _START = StreamStart

    def __init__(
        self, client: Client, request: StreamRequest, *, max_seconds: float | None = None
    ) -> None:
        super().__init__(client, request)
        self.end: StreamEnd | None = None
        self.max_seconds = max_seconds
        #: payload bytes received so far, and the most the stream may carry
        self.received = 0
        self.max_bytes: int | None = None

    async def __aenter__(self) -> StreamReader:
        await self._begin()
        assert self.start is not None
        self.max_bytes = _stream_bound(self._request, self.start, self.max_seconds)
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self.end is not None:
            raise StopAsyncIteration
        event = await self._client._reply_event()
        if isinstance(event, Data):
            self.received += len(event.payload)
            if self.max_bytes is not None and self.received > self.max_bytes:
                raise RemoteProtocolError(
                    f"the stream goes on past {self.max_bytes} bytes, the most it may carry"
                )
            return event.payload
        if isinstance(event, StreamEnd):
            self.end = event
            raise StopAsyncIteration
        raise RemoteProtocolError(f"unexpected {type(event).__name__} in a stream")


def _stream_bound(
    request: StreamRequest, start: StreamStart, max_seconds: float | None
) -> int | None:
    """The most payload bytes ``start`` may be followed by; RemoteProtocolError when the
    start does not answer ``request``."""
    if start.mode != request.mode:
        raise RemoteProtocolError(f"asked for a {request.mode} stream, got {start.mode}")
    if start.mode == "original":
        if start.offset > request.offset:
            raise RemoteProtocolError(
                f"asked for bytes from {request.offset}, the stream starts at {start.offset}"
            )
        return start.size - start.offset
    asked = (request.sample_format, request.sample_rate, request.channels)
    got = (start.sample_format, start.sample_rate, start.channels)
    if any(a is not None and a != g for a, g in zip(asked, got, strict=True)):
        raise RemoteProtocolError(f"asked for samples as {asked}, the stream states {got}")
    if max_seconds is None or not math.isfinite(max_seconds):
        return None
    assert start.sample_rate is not None and start.bytes_per_frame is not None
    return math.ceil(max(max_seconds, 0.0) * start.sample_rate) * start.bytes_per_frame


_M = TypeVar("_M", ListenRequest, PublishRequest)


def _checked(request: _M) -> _M:
    """``request``, or ``UsageError`` saying why its values cannot be sent."""
    problem = request.problem()
    if problem:
        raise UsageError(problem)
    return request


class ListenReader(_Reply[ListenRequest, ListenStart]):
    """One listen: ``start`` once entered, then :class:`Audio` and :class:`GapNotice`
    events, then ``end`` (a :class:`ListenEnd`).

    :meth:`stop` asks the server to end the listen; the events already on
    their way still arrive, then the iteration ends.
    """

    _START = ListenStart

    def __init__(self, client: Client, request: ListenRequest) -> None:
        super().__init__(client, request)
        self.end: ListenEnd | None = None

    async def __aenter__(self) -> ListenReader:
        await self._begin()
        return self

    async def stop(self) -> None:
        """Ask the server to end the listen (once; later calls do nothing)."""
        if self._client._conn.state is State.LISTENING:
            await self._client._send(StopRequest())

    def __aiter__(self) -> AsyncIterator[Audio | GapNotice]:
        return self

    async def __anext__(self) -> Audio | GapNotice:
        if self.end is not None:
            raise StopAsyncIteration
        event = await self._client._reply_event()
        if isinstance(event, (Audio, GapNotice)):
            return event
        if isinstance(event, ListenEnd):
            self.end = event
            raise StopAsyncIteration
        raise RemoteProtocolError(f"unexpected {type(event).__name__} in a listen")


class Publisher:
    """The sending side of a publish; get one from :meth:`Client.publish`."""

    def __init__(self, client: Client, request: PublishRequest) -> None:
        self._client = client
        self.request = request
        #: payload bytes sent so far
        self.sent = 0
        self.done: PublishDone | None = None
        self._done = trio.Event()

    async def send(self, data: bytes) -> None:
        """Send samples (any number of bytes; frames may straddle calls)."""
        if not data:
            return
        conn = self._client._conn
        view = memoryview(data)
        for i in range(0, len(data), 256 * 1024):
            piece = view[i : i + 256 * 1024]
            await self._client._send_bytes(conn.send_data_header(len(piece)) + piece)
            self.sent += len(piece)

    async def _end(self) -> None:
        await self._client._send(PublishEnd(sent=self.sent))
        await self._done.wait()

    async def _watch(self) -> None:
        """The only reader while publishing: the server's count, or its error."""
        # no deadline: a publisher hears nothing until it ends, unless the server ends it
        event = await self._client._reply_event(math.inf)  # an error or a close raises here
        if not isinstance(event, PublishDone):
            raise RemoteProtocolError(f"unexpected {type(event).__name__} while publishing")
        self.done = event
        self._done.set()


@asynccontextmanager
async def open_client(
    address: str = DEFAULT_SERVER,
    *,
    timeout: float = 30.0,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    version: int = 1,
    early: bool | None = None,
) -> AsyncIterator[Client]:
    """Connect to ``HOST:PORT`` (over TLS with ``ssl_context``), shake hands, yield a Client.

    With ``early`` the ``hello`` goes out with the first request instead
    (:meth:`Client.hello_with_first_request`); ``None`` (the default): only
    inside :func:`early_requests`. The connection is closed when the block ends.
    """
    host, port = parse_address(address)
    stream = await open_stream(
        host, port, timeout=timeout, ssl_context=ssl_context, address=address
    )
    client = Client(stream, timeout=timeout, token=token, version=version)
    try:
        if early or (early is None and _EARLY.get()):
            client.hello_with_first_request()
        else:
            await client.handshake()
        yield client
    finally:
        await client.aclose()


#: whether open_client sends its hello with the first request (see early_requests)
_EARLY: contextvars.ContextVar[bool] = contextvars.ContextVar("musiclib_early", default=False)


@contextmanager
def early_requests() -> Iterator[None]:
    """Within this block (and the tasks it starts), :func:`open_client` sends its
    ``hello`` with the first request: ``get`` and ``play`` use it around their
    connections, whose first request is an ``info`` or a ``stream``, so that a
    caller's connector (a plain ``open_client``) needs no argument for it."""
    token = _EARLY.set(True)
    try:
        yield
    finally:
        _EARLY.reset(token)


def tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """A client TLS context: the system's trust store, or only ``cafile`` when given."""
    import ssl  # only TLS needs it: 12 ms of start-up

    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use --cafile {cafile}: {exc}") from None
