"""A loopback HTTP endpoint that serves the tracks being played, with ``Range``.

Why: a player given a URL with ``Content-Length`` and byte ranges can do what
a pipe never allows. It seeks anywhere (a new request from that byte), it
reads an MP4 whose ``moov`` atom sits at the end of the file (it asks for the
end first), and it knows a track's true length (a long WAV's duration from
its size). So ``play`` hands mpv, vlc and ffplay URLs of this endpoint, and
keeps the pipe for players that only read standard input (``--pipe``).

Shape (see STYLE.md, h11 and hypercorn): h11 is the HTTP state machine; this
module only moves bytes, through :class:`~musiclib.transport.Transport` (the
one place that sees trio's stream errors). Each HTTP request for a track
becomes one ``stream`` request to the musiclib server from the range's first
byte, over a connection of its own (:data:`Connector`), cut short at the
range's last byte: the server's offset streams are exactly what ``Range``
needs. A dropped server connection is resumed from the byte reached, so a
player paused long enough for the server to give up on us (its send timeout)
goes on where it stopped.

What it answers:

- ``GET`` and ``HEAD`` of ``/TOKEN/INDEX/NAME`` (INDEX in the queue, NAME
  only for people reading a playlist); anything else with the right token:
  ``404``; another method: ``405``; a wrong or missing token: ``404`` (it
  says nothing about what exists).
- ``Range: bytes=A-B``, ``bytes=A-`` and ``bytes=-N`` (suffix): ``206`` with
  ``Content-Range``; a range starting past the end (or ``bytes=-0``): ``416``
  with ``Content-Range: bytes */SIZE``. A header that does not parse, another
  unit, or **several ranges** are ignored, as RFC 9110 allows: ``200`` with
  the whole file (multipart/byteranges is not worth it for a player).
- Always ``Accept-Ranges: bytes``, ``Content-Length``, and ``Content-Type``
  by the track's format.

Who may use it: it binds 127.0.0.1 on a port of the kernel's choosing, and
every URL carries a random token (:func:`secrets.token_urlsafe`, 128 bits)
compared in constant time; ``play`` hands the URLs over in a private playlist
file where it can, so the token is not in the process list. On Linux a
connection is also refused when ``/proc/net/tcp`` says another user owns the
connecting socket (:func:`socket_owner`), which covers ffplay, whose one URL
is on its command line. Connections are
capped (:data:`MAX_CONNECTIONS`); a request head must arrive whole within
:data:`HEAD_TIMEOUT` once it has begun. An idle kept-alive connection and a
player that stops reading (paused) are waited for without limit: the player
is ours, and the endpoint lives only as long as the ``play`` command.

Bytes served here are not checksummed (a range cannot be); ``--save`` runs
its own verified download of each track (see :mod:`musiclib.playing`).
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import re
import secrets
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import h11
import trio

from .client import RETRYABLE, Client
from .errors import ConnectionLost, MusiclibError, NotFound, Timeout
from .protocol import TrackInfo
from .transport import Transport

log = logging.getLogger("musiclib.gateway")

Connector = Callable[[], AbstractAsyncContextManager[Client]]

#: connections served at once; more are closed at once
MAX_CONNECTIONS = 32
#: seconds a request head may take once its first byte arrived
HEAD_TIMEOUT = 10.0
#: the longest request head accepted (h11's limit on an incomplete event)
MAX_HEAD_BYTES = 16 * 1024
#: bytes read from the player's socket at a time
READ_SIZE = 16 * 1024
#: requests remembered in :attr:`Gateway.requests`
LOG_LENGTH = 1000
#: failed server connections in a row (with no byte of progress) before a body is cut
UPSTREAM_ATTEMPTS = 3
#: seconds between those attempts
UPSTREAM_DELAY = 0.5

#: Content-Type by format (the file's extension); anything else is octet-stream
CONTENT_TYPES: dict[str, str] = {
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "oga": "audio/ogg",
    "opus": "audio/ogg",
    "spx": "audio/ogg",
    "m4a": "audio/mp4",
    "m4b": "audio/mp4",
    "mp4": "audio/mp4",
    "aac": "audio/aac",
    "wav": "audio/wav",
    "aif": "audio/aiff",
    "aiff": "audio/aiff",
    "aifc": "audio/aiff",
    "wv": "audio/x-wavpack",
    "wma": "audio/x-ms-wma",
    "ape": "audio/x-ape",
    "mka": "audio/x-matroska",
}


def content_type(fmt: str) -> str:
    """The media type a track of format ``fmt`` is served as."""
    return CONTENT_TYPES.get(fmt.lower(), "application/octet-stream")


# ---- Range (RFC 9110, section 14) ----------------------------------------------------


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start`` up to (not including) ``stop`` of a representation."""

    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.stop - 1}/{size}"


class RangeNotSatisfiable(Exception):
    """A valid ``Range`` that selects nothing of the representation (answer ``416``)."""


_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")
_WHITESPACE = " \t"
#: a number with more digits than this is larger than any file
_MAX_DIGITS = 18


def _number(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def parse_range(value: str | None, size: int) -> ByteRange | None:
    """The one range of ``size`` bytes a ``Range`` header asks for, or ``None``: serve
    the whole representation (no header, one that does not parse, another unit than
    ``bytes``, or several ranges). ``RangeNotSatisfiable`` when the range starts at or
    past the end (``bytes=-0`` too; every range of an empty file).

    The result is clipped to the representation: ``bytes=0-999999`` of a 10-byte
    file is ``0-9``, and a suffix longer than the file is the whole file.
    """
    if value is None:
        return None
    unit, sep, ranges = value.strip(_WHITESPACE).partition("=")
    if not sep or unit.strip(_WHITESPACE).lower() != "bytes":
        return None
    specs = [s.strip(_WHITESPACE) for s in ranges.split(",")]
    specs = [s for s in specs if s]  # the list rule allows empty elements
    if len(specs) != 1:
        return None  # none, or several: RFC 9110 lets a server ignore the header
    match = _RANGE_SPEC.fullmatch(specs[0])
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None  # "bytes=-" is no range at all
        suffix = _number(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return ByteRange(max(size - suffix, 0), size)
    start = _number(first)
    if last and _number(last) < start:
        return None  # an invalid range-spec: the header is ignored
    if start >= size:
        raise RangeNotSatisfiable
    stop = size if not last else min(_number(last) + 1, size)
    return ByteRange(start, stop)


# ---- the endpoint -------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request as the gateway saw it (for tests and ``--log-level debug``)."""

    method: str
    index: int | None
    range: str | None
    status: int
    #: body bytes that reached the player
    sent: int = 0
    #: the whole body was sent
    complete: bool = False


class Gateway:
    """Serves ``tracks`` (a play queue) to a local player; see the module docstring.

    ``on_open(index)`` is called when a request for a track other than the
    last one asked for arrives: the player moved on to that track.
    """

    def __init__(
        self,
        connect: Connector,
        tracks: Sequence[TrackInfo],
        *,
        token: str | None = None,
        on_open: Callable[[int], None] | None = None,
        upstream_attempts: int = UPSTREAM_ATTEMPTS,
    ) -> None:
        self.connect = connect
        self.tracks = list(tracks)
        self.token = token or secrets.token_urlsafe(16)
        self.on_open = on_open
        self.upstream_attempts = upstream_attempts
        self.port = 0
        #: the last requests, oldest first
        self.requests: deque[RequestRecord] = deque(maxlen=LOG_LENGTH)
        self._current: int | None = None
        self._connections = 0

    def url(self, index: int) -> str:
        """The URL of the queue's track ``index``."""
        name = self.tracks[index].path.rsplit("/", 1)[-1]
        return f"http://127.0.0.1:{self.port}/{self.token}/{index}/{quote(name)}"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 (any free port, or :attr:`port` if set) until cancelled;
        ``await nursery.start(gateway.serve)`` returns the port."""
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._accepted, listeners)
            task_status.started(self.port)

    async def _accepted(self, stream: trio.abc.Stream) -> None:
        transport = Transport(stream, peer="the player")
        if self._connections >= MAX_CONNECTIONS:
            log.warning("gateway: more than %d connections; closing one", MAX_CONNECTIONS)
            await transport.aclose()
            return
        if isinstance(stream, trio.SocketStream):
            try:
                ours, peer = stream.socket.getsockname(), stream.socket.getpeername()
            except OSError:  # gone already
                await transport.aclose()
                return
            owner = await trio.to_thread.run_sync(_owner_of, peer, ours)
            if owner is not None and owner != _our_uid():
                log.warning("gateway: refused a connection from user %d", owner)
                await transport.aclose()
                return
        self._connections += 1
        try:
            await self.handle(transport)
        finally:
            self._connections -= 1

    async def handle(self, transport: Transport) -> None:
        """Serve one HTTP connection until either side closes it; never raises
        musiclib's errors (each connection decides alone what went wrong)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            while True:
                request = await self._next_request(transport, conn)
                if request is None:
                    return
                await self._respond(transport, conn, request)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # h11 decided the connection closes (or the body was cut)
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await self._bad_request(transport, conn, exc)
        except (ConnectionLost, Timeout, _PlayerGone) as exc:
            log.debug("gateway: the player's connection ended: %s", exc)
        finally:
            await transport.aclose()

    async def _next_request(self, transport: Transport, conn: h11.Connection) -> h11.Request | None:
        """The next request (its body, if any, read and dropped), or None at the end."""
        request: h11.Request | None = None
        deadline = math.inf
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                left = max(deadline - trio.current_time(), 0.0)
                data = await transport.receive(READ_SIZE, left)
                if deadline == math.inf:  # the head began: it gets HEAD_TIMEOUT, whole
                    deadline = trio.current_time() + HEAD_TIMEOUT
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, (h11.ConnectionClosed, h11.PAUSED)):
                return None
            # h11.Data of a request body: dropped

    async def _respond(
        self, transport: Transport, conn: h11.Connection, request: h11.Request
    ) -> None:
        method = request.method.decode("latin-1")
        headers = {name.decode("latin-1"): value for name, value in request.headers}
        range_header = headers.get("range")
        record = RequestRecord(
            method,
            None,
            range_header.decode("latin-1") if range_header is not None else None,
            404,
        )
        self.requests.append(record)
        index = self._index(request.target)
        if index is None:
            await self._simple(transport, conn, record, 404, "no such track here\n")
            return
        record.index = index
        if method not in ("GET", "HEAD"):
            await self._simple(transport, conn, record, 405, "only GET and HEAD\n", allow=True)
            return
        track = self.tracks[index]
        size = track.size
        try:
            chosen = parse_range(record.range, size)
        except RangeNotSatisfiable:
            extra = [("Content-Range", f"bytes */{size}")]
            await self._simple(transport, conn, record, 416, "range not satisfiable\n", extra)
            return
        if method == "GET" and index != self._current:
            self._current = index
            if self.on_open is not None:
                self.on_open(index)
        span = chosen or ByteRange(0, size)
        head = [
            ("Content-Type", content_type(track.format)),
            ("Content-Length", str(span.length)),
            ("Accept-Ranges", "bytes"),
            ("Cache-Control", "no-store"),
        ]
        if chosen is not None:
            head.append(("Content-Range", chosen.content_range(size)))
        record.status = 206 if chosen is not None else 200
        if method == "HEAD" or span.length == 0:
            await self._send(transport, conn, h11.Response(status_code=record.status, headers=head))
            await self._send(transport, conn, h11.EndOfMessage())
            record.complete = True
            self._log(record)
            return
        await self._send_body(transport, conn, record, track, span, head)

    async def _send_body(
        self,
        transport: Transport,
        conn: h11.Connection,
        record: RequestRecord,
        track: TrackInfo,
        span: ByteRange,
        head: list[tuple[str, str]],
    ) -> None:
        """The server's stream of ``track`` from ``span.start``, cut at ``span.stop``.

        The status line waits for the server's first answer, so a track that
        is gone is a 404 and an unreachable server a 502. Once the head is
        out, a server connection that drops is opened again from the byte
        reached; if that keeps failing, the body is cut short and the
        connection closed (the player sees a short read and may retry).
        """
        position = span.start
        head_sent = False
        failures = 0
        try:
            while position < span.stop:
                try:
                    async with (
                        self.connect() as client,
                        client.stream(track.path, position) as stream,
                    ):
                        start = stream.start
                        assert start is not None
                        if start.size != track.size or start.offset != position:
                            raise _Mismatch(
                                f"{track.path} is now {start.size} bytes (was {track.size})"
                            )
                        if not head_sent:
                            response = h11.Response(status_code=record.status, headers=head)
                            await self._send(transport, conn, response)
                            head_sent = True
                        async for chunk in stream:
                            piece = chunk[: span.stop - position]
                            await self._send(transport, conn, h11.Data(data=piece))
                            position += len(piece)
                            record.sent += len(piece)
                            failures = 0
                            if position >= span.stop:
                                break  # leaving the stream early closes its connection
                except RETRYABLE as exc:
                    failures += 1
                    if failures >= self.upstream_attempts:
                        raise
                    log.debug("gateway: %s: %s; again from byte %d", track.path, exc, position)
                    await trio.sleep(UPSTREAM_DELAY)
            await self._send(transport, conn, h11.EndOfMessage())
            record.complete = True
        except MusiclibError as exc:  # the server's side; the player's is _PlayerGone
            if head_sent:
                log.warning(
                    "gateway: %s: %s; the player got %d bytes", track.path, exc, record.sent
                )
                raise _PlayerGone("the body was cut short") from None
            await self._upstream_failed(transport, conn, record, exc)
        finally:
            self._log(record)

    async def _upstream_failed(
        self, transport: Transport, conn: h11.Connection, record: RequestRecord, exc: Exception
    ) -> None:
        """Before any body byte: say what went wrong as a status (404 or 502)."""
        log.warning("gateway: %s", exc)
        status = 404 if isinstance(exc, NotFound) else 502
        await self._simple(transport, conn, record, status, f"{exc}\n")

    async def _simple(
        self,
        transport: Transport,
        conn: h11.Connection,
        record: RequestRecord,
        status: int,
        text: str,
        extra: Sequence[tuple[str, str]] = (),
        *,
        allow: bool = False,
    ) -> None:
        """A short text answer (an error); HEAD gets its head only."""
        record.status = status
        body = text.encode("utf-8", "replace")
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            *extra,
        ]
        if allow:
            headers.append(("Allow", "GET, HEAD"))
        try:
            await self._send(transport, conn, h11.Response(status_code=status, headers=headers))
            if record.method != "HEAD":
                await self._send(transport, conn, h11.Data(data=body))
            await self._send(transport, conn, h11.EndOfMessage())
        finally:
            self._log(record)

    async def _bad_request(
        self, transport: Transport, conn: h11.Connection, exc: h11.RemoteProtocolError
    ) -> None:
        """Bytes that are not HTTP: a 400 if h11 still lets us answer, then close."""
        log.debug("gateway: bad request: %s", exc)
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = exc.error_status_hint
        body = b"bad request\n"
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        try:
            await self._send(transport, conn, h11.Response(status_code=status, headers=headers))
            await self._send(transport, conn, h11.Data(data=body))
            await self._send(transport, conn, h11.EndOfMessage())
        except (_PlayerGone, h11.LocalProtocolError):
            pass

    async def _send(self, transport: Transport, conn: h11.Connection, event: h11.Event) -> None:
        """``event`` to the player; its failures are :class:`_PlayerGone` (so that they are
        never mistaken for the server's, which are retried)."""
        pieces = conn.send_with_data_passthrough(event) or []
        try:
            for piece in pieces:
                await transport.send(piece, math.inf)  # a paused player may not read for hours
        except (ConnectionLost, Timeout) as exc:
            raise _PlayerGone(str(exc)) from None

    def _index(self, target: bytes) -> int | None:
        """The queue index of ``/TOKEN/INDEX[/NAME]``, or None (wrong token, no such index)."""
        parts = target.decode("latin-1").split("?", 1)[0].split("/")
        if len(parts) < 3 or parts[0] != "":
            return None
        token = unquote(parts[1])
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return None
        if not parts[2].isascii() or not parts[2].isdigit() or len(parts[2]) > 9:
            return None
        index = int(parts[2])
        return index if index < len(self.tracks) else None

    def _log(self, record: RequestRecord) -> None:
        log.debug(
            "gateway: %s %s %s -> %d, %d bytes%s",
            record.method,
            record.index,
            record.range or "(whole)",
            record.status,
            record.sent,
            "" if record.complete else " (cut short)",
        )


#: where Linux lists IPv4 TCP sockets with their owners
PROC_NET_TCP = Path("/proc/net/tcp")


def socket_owner(table: str, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The uid owning the IPv4 TCP socket from ``local`` to ``remote`` in ``table`` (the
    text of ``/proc/net/tcp``), or ``None`` when it is not listed."""
    want = (_proc_address(*local), _proc_address(*remote))
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and (fields[1], fields[2]) == want and fields[7].isdigit():
            return int(fields[7])
    return None


def _proc_address(host: str, port: int) -> str:
    """``127.0.0.1``, 8080 as ``/proc/net/tcp`` writes it: ``0100007F:1F90`` (the address
    as a 32-bit number in the machine's byte order, the port big-endian, both hex)."""
    number = int.from_bytes(socket.inet_aton(host), sys.byteorder)
    return f"{number:08X}:{port:04X}"


def _owner_of(player_end: tuple[str, int], our_end: tuple[str, int]) -> int | None:
    """The uid of the process side of a connection to us (``None``: cannot tell, e.g. not
    Linux). Blocking: run in a thread (the table may be long)."""
    try:
        table = PROC_NET_TCP.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return socket_owner(table, player_end[:2], our_end[:2])


def _our_uid() -> int:
    return os.getuid()


class _Mismatch(MusiclibError):
    """The track is not what the queue says any more (its size changed)."""


class _PlayerGone(Exception):
    """The player's connection failed or was cut: nothing more can be said on it."""


@asynccontextmanager
async def open_gateway(
    connect: Connector,
    tracks: Sequence[TrackInfo],
    *,
    on_open: Callable[[int], None] | None = None,
) -> AsyncIterator[Gateway]:
    """Run a :class:`Gateway` for ``tracks`` on 127.0.0.1 while the block runs."""
    gateway = Gateway(connect, tracks, on_open=on_open)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        try:
            yield gateway
        finally:
            nursery.cancel_scope.cancel()
