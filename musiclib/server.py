"""The musiclib server: a thin trio shell around :mod:`musiclib.protocol`.

One task per connection, all inside one nursery; a connection's failure is
logged as one line and closes that connection only. The protocol object
decides what is valid; this module moves bytes, applies the time limits,
tracks idleness and finds each request's handler in a table keyed by the
request's type. What a request means lives apart from the socket, so it can
be read and changed without the connection's loop: the library's requests in
:mod:`musiclib.library_requests`, the live ones in :mod:`musiclib.live.requests`,
both written against a small ``Session`` that :class:`_ConnectionHandler` is;
``status`` is about the server itself (uptime, connections) and is answered
here, by :meth:`Server.status`.
The catalog's upkeep (scans, watcher, background hashing) is a service of its
own, :class:`~musiclib.maintainer.Maintainer`, which the :class:`Server` holds
and starts: a library is maintained once however many sessions serve it.

Slow and greedy peers: the handshake timeout is a deadline from the accept to
the complete hello (TLS handshake included, as ``SSLStream`` does it on the
first read), and the idle timeout a deadline for the whole next request, so a
peer dribbling bytes gets no longer than a silent one. One client address
(:func:`address_key`) holds at most ``max_connections_per_address``
connections and a share of the decoders; a refusal is bounded (a second for
the hello) and takes none of the served slots; and when every slot is taken,
the connection that has waited longest for its hello gives up its slot to
the newcomer (slowloris from many addresses).

With ``serve --workers N`` (:mod:`musiclib.workers`) this module runs in each
worker process, told its :class:`WorkerRole`: the sockets come bound from the
supervisor; the primary worker runs the maintainer and the live channels, and
also serves a private Unix socket for the other workers; a secondary follows
the primary's index and, for a request that needs the live channels or a
rescan, hands the whole connection to the primary (:meth:`_ConnectionHandler.
forward`): it says hello there with the version already agreed, sends the
request, and splices bytes both ways until either side closes.

The socket is reached only through a :class:`~musiclib.transport.Transport`,
so the only transport errors seen here are musiclib's own (``ConnectionLost``,
``Timeout``); they end the connection with one log line saying why.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hmac
import ipaddress
import logging
import math
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from . import __version__
from .decode import DecodeSlots
from .errors import (
    Busy,
    ConnectionLost,
    ListenError,
    MessageError,
    RemoteProtocolError,
    ServerError,
    Timeout,
)
from .library import FollowSymlinks, Library
from .library_requests import (
    Services,
    Session,
    serve_info,
    serve_list,
    serve_rescan,
    serve_stream,
)
from .live.channels import Channel, Channels, ChannelSpec, channel_format, source_reader, tracks_for
from .live.hub import Hub
from .live.requests import PeerLeft, serve_channels, serve_listen, serve_publish
from .maintainer import PUBLISH_INTERVAL, CatalogState, Maintainer, StateBoard
from .protocol import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    ChannelsRequest,
    Closed,
    Connection,
    Data,
    Error,
    Event,
    Hello,
    InfoRequest,
    ListenRequest,
    ListRequest,
    Message,
    NeedData,
    PublishEnd,
    PublishRequest,
    RescanRequest,
    Role,
    ServerStatus,
    State,
    StatusRequest,
    StopRequest,
    StreamRequest,
    Welcome,
)
from .transport import Transport
from .wyoming import WyomingConfig, serve_wyoming

log = logging.getLogger("musiclib.server")

_T = TypeVar("_T")

DEFAULT_PORT = 7650


@dataclass
class ServerConfig:
    """Everything ``serve`` can be told; every value has a sane default."""

    root: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: payload bytes per data frame (read and sent: decoded streams, TLS, memory streams)
    chunk_size: int = 256 * 1024
    #: payload bytes per data frame of a file sent with zero-copy ``sendfile`` (plain
    #: TCP): no buffer holds it, so the protocol's largest frame costs no memory and a
    #: quarter of the per-frame work (a header send, a sendfile, two deadlines) of 256
    #: KiB frames; it moved 500 downloads' throughput 1.2-2x (BENCHMARKS.md, scenario 9)
    sendfile_frame_size: int = 1 << 20
    #: seconds from accepting a connection to its complete hello (TLS handshake included),
    #: in all: a peer that dribbles its hello a byte at a time gets no more
    handshake_timeout: float = 10.0
    #: seconds a connection may wait between requests, in all: the next request must
    #: arrive whole within it, however its bytes trickle in
    idle_timeout: float = 300.0
    #: seconds one chunk may take to be accepted by a peer that stopped reading
    send_timeout: float = 30.0
    #: seconds running replies get to finish when the server is asked to stop
    grace_period: float = 5.0
    #: seconds between background rescans of the library (``0`` disables them)
    rescan_interval: float = 300.0
    #: the SQLite index file (``None``: one per root in the user's cache directory)
    index: Path | None = None
    #: tag-reading processes for big scans (``None``: one per core, at most 4; ``0``: none)
    scan_workers: int | None = None
    #: compute every file's sha256 in the background after each scan
    background_checksums: bool = True
    #: rescan soon after the library changes (inotify, where available)
    watch: bool = True
    #: seconds of quiet after a change before that rescan (a burst gets one rescan)
    watch_settle: float = 1.0
    #: decoded streams (ffmpeg processes) running at once
    max_decodes: int = 32
    #: decoded streams one client address may run at once (``None``: a quarter of
    #: ``max_decodes``, at least 1; ``0``: no cap of its own)
    max_decodes_per_address: int | None = None
    #: seconds a decoded-stream request waits for a free decoder before "busy"
    decode_wait: float = 5.0
    #: the slowest a client may read a decoded stream, in seconds of audio per second spent
    #: sending it, averaged over ``min_decode_window``; slower is cut with ``too_slow``
    #: (``0``: no minimum)
    min_decode_rate: float = 0.5
    #: seconds of sending over which ``min_decode_rate`` is averaged
    min_decode_window: float = 30.0
    #: seconds of audio sent at once before real-time pacing sets in
    burst: float = 1.0
    #: seconds of audio in one paced data frame: the granularity of real-time pacing
    pacing_slice: float = 0.1
    #: ffmpeg binary; ``None``: MUSICLIB_FFMPEG, else the one in imageio-ffmpeg
    ffmpeg: str | None = None
    #: connections served at once; one more gets a fatal "busy" error
    max_connections: int = 1000
    #: connections one client address (an IPv4 address, an IPv6 /64) may hold at once;
    #: one more gets a fatal "busy" error (``None`` or ``0``: no cap of its own)
    max_connections_per_address: int | None = 64
    #: largest message frame a client may send, in bytes
    max_message_size: int = 64 * 1024
    #: shared secret every client must present in its hello (``None``: no check)
    token: str | None = None
    #: TLS for every connection (``None``: plain TCP)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    #: live channels read by the server itself (``--channel NAME=SOURCE``)
    channels: list[ChannelSpec] = field(default_factory=list)
    #: seconds a listener may keep losing audio (falling behind) before it is cut
    lag_limit: float = 10.0
    #: seconds of recent audio each channel keeps for listeners' preroll
    history: float = 10.0
    #: which symbolic links the library follows: ``inside`` the root (default), ``all``
    #: (MPD's ``follow_outside_symlinks``) or ``none``
    follow_symlinks: FollowSymlinks = "inside"
    #: the Wyoming microphone endpoint (``serve --wyoming``; ``None``: off), run by the
    #: process that runs the live channels
    wyoming: WyomingConfig | None = None


#: the client name in the hello of deploy/haproxy.cfg's health check: its connections
#: are logged at debug level (a replica would otherwise log two lines every 2 s)
HEALTH_CHECK_CLIENT = "haproxy-check"


class _PeerGone(PeerLeft):
    """Internal: the peer vanished or stalled; the connection just ends."""


@dataclass
class WorkerRole:
    """This process's part in ``serve --workers`` (:mod:`musiclib.workers`); absent
    when ``serve`` is one process."""

    #: the worker's number, 0 for the primary (log lines and ``status`` say it)
    number: int
    #: this worker's listening sockets, bound by the supervisor
    sockets: list[socket.socket]
    #: the private Unix socket: the primary accepts on it (``internal``), the others
    #: connect to it by its path
    internal_path: str
    internal: socket.socket | None
    #: the primary's state, shared with every worker
    board: StateBoard
    #: when the supervisor started (``time.monotonic()``, one clock for all processes)
    started: float

    @property
    def primary(self) -> bool:
        """The primary scans, writes the index and runs the live channels."""
        return self.internal is not None


#: the requests a secondary worker hands to the primary, with the rest of the connection
FORWARDED: frozenset[type[Event]] = frozenset(
    {ChannelsRequest, ListenRequest, PublishRequest, RescanRequest}
)
#: what a client hears when its request could not be handed to the primary worker
_PRIMARY_AWAY = "the worker that runs the live channels and scans is restarting; try again"
#: bytes read at a time by each direction of a forwarded connection
SPLICE_CHUNK = 64 * 1024


@dataclass
class Server:
    """State shared by every connection: the library, the limits, the shutdown flag."""

    library: Library
    config: ServerConfig
    #: set when the server should stop; idle connections close at once
    stopping: trio.Event = field(default_factory=trio.Event)
    _idle_scopes: set[trio.CancelScope] = field(default_factory=set)
    decode_slots: DecodeSlots = field(init=False)
    #: connections being served now (refused ones not counted)
    connections: int = 0
    #: connections being served now, by client address (see :func:`address_key`)
    by_address: dict[str, int] = field(default_factory=dict)
    #: refusals running now (each reads a hello for at most a second, then says busy)
    refusing: int = 0
    #: served connections still waiting for their hello, the longest-waiting first
    _handshaking: dict[_ConnectionHandler, trio.CancelScope] = field(default_factory=dict)
    #: connections counted in (``connections``, ``by_address``) and not yet counted out
    _counted: set[_ConnectionHandler] = field(default_factory=set)
    #: when a refusal was last logged, and how many were not logged since
    _refusal_logged_at: float = -math.inf
    _refusals_unlogged: int = 0
    #: turns at ``sendfile`` (see :data:`SEND_TURNS`)
    send_turns: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(SEND_TURNS)
    )
    #: the catalog's upkeep: scans, watcher, background hashing, index threads
    maintainer: Maintainer = field(init=False)
    #: the live channels and their sources
    channels: Channels = field(init=False)
    #: what the requests may use (all of the above but the connections)
    services: Services = field(init=False)
    #: when the server was made (``time.monotonic()``): its uptime counts from here
    started: float = field(default_factory=time.monotonic)
    #: this process's part among several workers (``None``: the only process)
    worker: WorkerRole | None = None

    def __post_init__(self) -> None:
        self.decode_slots = DecodeSlots(
            self.config.max_decodes,
            self.config.decode_wait,
            per_address=decode_share(self.config),
        )
        worker = self.worker
        if worker is None:
            self.maintainer = Maintainer(self.library, self.config)
        elif worker.primary:
            self.maintainer = Maintainer(self.library, self.config, on_change=self.publish_state)
            self.started = worker.started
            # the followers' caches of resolved names (TrackCache) are dropped at each
            # commit, told right after it; and now: a new primary may have rebuilt the index
            board = worker.board
            self.library.index.on_commit = lambda _generation: board.bump_generation()
            board.bump_generation()
        else:
            self.maintainer = Maintainer(
                self.library,
                self.config,
                follow=self._followed,
                generation=worker.board.generation,
            )
            self.started = worker.started
        self.channels = Channels(ffmpeg=self.config.ffmpeg, history_seconds=self.config.history)
        self.services = Services(
            self.library, self.maintainer, self.decode_slots, self.channels, self.config
        )

    def stop(self) -> None:
        """Stop taking requests: idle connections close now, running replies may finish."""
        self.stopping.set()
        self.channels.shutdown()
        for scope in self._idle_scopes:
            scope.cancel()

    @property
    def follower(self) -> bool:
        """A secondary worker: it reads the primary's index and forwards live requests."""
        return self.worker is not None and not self.worker.primary

    def _followed(self) -> CatalogState:
        assert self.worker is not None
        return self.worker.board.read()[0]

    def _live_channels(self) -> int:
        if self.worker is not None and not self.worker.primary:
            return self.worker.board.read()[1]
        return len(self.channels.infos(time.time_ns()))

    def publish_state(self) -> None:
        """The primary: put the catalog's state and the channel count on the board."""
        if self.worker is not None and self.worker.primary:
            self.worker.board.publish(self.maintainer.state(), self._live_channels())

    async def publish_periodically(self) -> None:
        """The primary: keep the board fresh (track counts grow during a scan, channels
        come and go) between the exact publications at each scan's start and end."""
        while True:
            self.publish_state()
            await trio.sleep(PUBLISH_INTERVAL)

    def status(self) -> ServerStatus:
        """How the server is now: the ``status`` request's reply.

        Every worker answers for the whole server (the primary's index, scans
        and channels) but for ``connections``, which are its own, and says
        which worker it is.
        """
        state = self.maintainer.state()
        last = state.last_scan
        return ServerStatus(
            server=f"musiclib/{__version__}",
            versions=tuple(sorted(SUPPORTED_VERSIONS)),
            tracks=state.tracks,
            uptime=max(time.monotonic() - self.started, 0.0),
            connections=self.connections,
            scanning=state.scanning,
            scans=state.scans,
            last_scan=None if last is None else max(last[0], 0.0),
            last_scan_took=None if last is None else max(last[1], 0.0),
            channels=self._live_channels(),
            worker=None if self.worker is None else self.worker.number,
            pid=None if self.worker is None else os.getpid(),
        )

    def channel_sources(self) -> list[tuple[Channel, Callable[[Hub], Awaitable[None]]]]:
        """Register the configured channels; each with the coroutine reading its source
        (none in a secondary worker: the primary runs them)."""
        sources: list[tuple[Channel, Callable[[Hub], Awaitable[None]]]] = []
        if self.follower:
            return sources
        for spec in self.config.channels:
            fmt = channel_format(spec)
            channel = self.channels.add(spec.name, spec.description, fmt)

            async def tracks(query: str = spec.arg) -> list[Path]:
                # the first scan must be done to find anything
                await self.maintainer.wait_for_first_scan()
                found = await self.maintainer.in_thread(tracks_for, self.library, query)
                return [self.library.track_path(t)[0] for t in found]

            read = source_reader(spec, fmt, ffmpeg=self.config.ffmpeg, tracks=tracks)
            sources.append((channel, read))
        return sources

    async def handle(
        self,
        stream: trio.abc.Stream,
        peer: str = "peer",
        address: str | None = None,
        *,
        trusted: bool = False,
    ) -> None:
        """Serve one connection until the peer leaves, misbehaves, or the server stops.

        ``address`` is what the per-address limits count the peer by
        (:func:`address_key`; ``None``: not counted, as for a memory stream).
        ``trusted``: a connection from another worker on the private socket,
        which needs no token (the client's was checked where it arrived).
        Never raises (except ``Cancelled``): one connection's trouble is logged
        and ends that connection only.
        """
        handler = _ConnectionHandler(self, stream, peer, address)
        handler.trusted = trusted
        try:
            refusal = self._admit(handler)
            if refusal is not None:
                await self._refuse(handler, refusal)
            else:
                await handler.run()
        except PeerLeft as exc:  # _PeerGone included
            log.log(handler.goodbye_level(exc), "%s: %s", peer, exc)
        except RemoteProtocolError as exc:
            log.warning("%s: protocol error: %s", peer, exc)
            await handler.try_send(Error("bad_request", str(exc), fatal=True))
        except Exception as exc:  # a bug: keep serving everyone else
            log.exception("%s: internal error: %s", peer, exc)
            await handler.try_send(Error("internal", "internal server error", fatal=True))
        finally:
            self._count_out(handler)
            await handler.transport.aclose()

    def _admit(self, handler: _ConnectionHandler) -> str | None:
        """Count a new connection in, or say why it is refused (the ``busy`` message).

        An address at its own cap is refused whatever the server's load. When
        every slot is taken, the connection that has waited longest for its
        hello (over :data:`EVICTABLE_AFTER` seconds, or half the handshake
        timeout if that is shorter) is closed to make room: a slot held by
        a peer that has not said hello yet is not worth keeping a real
        client out for (slowloris, from however many addresses).
        """
        cap = self.config.max_connections_per_address
        address = handler.address
        if cap and address is not None and self.by_address.get(address, 0) >= cap:
            return (
                f"this address already has {cap} connection{'s' if cap != 1 else ''} open, "
                "the most one address may have; close some and try again"
            )
        if self.connections >= self.config.max_connections and not self._evict_a_handshake():
            return "the server is busy (at its connection limit); try again later"
        self.connections += 1
        if address is not None:
            self.by_address[address] = self.by_address.get(address, 0) + 1
        self._counted.add(handler)
        return None

    def _count_out(self, handler: _ConnectionHandler) -> None:
        """Give back the slots ``handler`` holds (once; nothing if it was refused)."""
        if handler not in self._counted:
            return
        self._counted.discard(handler)
        self._handshaking.pop(handler, None)
        self.connections -= 1
        if handler.address is not None:
            left = self.by_address[handler.address] - 1
            if left:
                self.by_address[handler.address] = left
            else:
                del self.by_address[handler.address]

    def _evict_a_handshake(self) -> bool:
        """Close the connection waiting longest for its hello, if it waited long enough."""
        if not self._handshaking:
            return False
        oldest, scope = next(iter(self._handshaking.items()))
        patience = min(EVICTABLE_AFTER, self.config.handshake_timeout / 2)
        if trio.current_time() - oldest.accepted < patience:
            return False
        scope.cancel()
        self._count_out(oldest)
        return True

    def _log_refusal(self, peer: str, reason: str) -> None:
        """One line a second at most: a flood of refusals must not become a flood of log."""
        now = trio.current_time()
        if now - self._refusal_logged_at < 1.0:
            self._refusals_unlogged += 1
            return
        more = self._refusals_unlogged
        also = f" (and {more} more refusal{'s' if more != 1 else ''} not logged)" if more else ""
        log.warning("%s: refused: %s%s", peer, reason.split(";")[0], also)
        self._refusal_logged_at, self._refusals_unlogged = now, 0

    async def _refuse(self, handler: _ConnectionHandler, reason: str) -> None:
        """Say ``busy`` (fatal) and close: bounded in time and in how many run at once."""
        self._log_refusal(handler.peer, reason)
        if self.refusing >= MAX_REFUSING:  # a flood of refusals: no hello read, no message
            return
        self.refusing += 1
        try:
            await handler.refuse_busy(reason)
        finally:
            self.refusing -= 1


class _ConnectionHandler:
    """The conversation on one connection; exists only while it runs."""

    def __init__(
        self, server: Server, stream: trio.abc.Stream, peer: str, address: str | None = None
    ) -> None:
        self.server = server
        self.config = server.config
        self.library = server.library
        self.transport = Transport(stream, peer=peer)
        self.peer = peer
        #: what the per-address limits count this peer by (``None``: not counted)
        self.address = address
        #: when the connection was accepted: the handshake timeout runs from here
        self.accepted = trio.current_time()
        self.conn = Connection(Role.SERVER, max_message_size=server.config.max_message_size)
        #: came from another worker over the private socket: no token asked
        self.trusted = False
        #: handed to the primary worker (:meth:`forward`): this loop has nothing left to do
        self.forwarded = False
        #: said hello as deploy/haproxy.cfg's health check does (HEALTH_CHECK_CLIENT)
        self.health_check = False
        #: whether the welcome went out, and the requests read since
        self.welcomed = False
        self.requests = 0
        #: reads and sends left that may skip the event loop's turn (see _read_nowait)
        self._eager_reads = self._eager_sends = EAGER_STEPS
        #: no send_file yet: the first one does not wait for a turn
        self._first_file = True
        #: bytes that go out in front of the next send: the ``welcome``, while a
        #: request that came with the ``hello`` is answered (:func:`_answered_at_once`),
        #: so that both leave in one write; sent before anything waits for the peer
        self._held = b""

    def goodbye_level(self, exc: PeerLeft) -> int:
        """The log level of the line saying why the peer left: ``DEBUG`` for a health
        check, and for a peer that dropped the connection right after its welcome
        without asking anything (what a load balancer's check does, whatever it
        calls itself: HAProxy's ``tcp-check`` resets the connection once its
        expected reply came), so that checks every 2 s do not fill the log;
        ``INFO`` otherwise."""
        dropped = isinstance(exc.__cause__, ConnectionLost)
        if self.health_check or (self.welcomed and not self.requests and dropped):
            return logging.DEBUG
        return logging.INFO

    async def refuse_busy(self, reason: str) -> None:
        """Refused: read the hello (so the close is clean), say busy; a second at most for each."""
        with trio.move_on_after(REFUSE_HELLO_WAIT):
            await self._next_event(REFUSE_HELLO_WAIT)
        await self.try_send(Error("busy", reason, fatal=True))

    async def run(self) -> None:
        timeout = self.config.handshake_timeout
        with trio.CancelScope() as evicted:
            self.server._handshaking[self] = evicted
            try:
                hello = await self._next_event(timeout, since=self.accepted, hello=True)
            finally:
                self.server._handshaking.pop(self, None)
        if evicted.cancel_called:  # (even if the hello came in the same moment: not counted now)
            raise _PeerGone(
                "closed to make room: every connection was taken and this one had not said "
                f"hello after {trio.current_time() - self.accepted:.1f} s"
            )
        if not isinstance(hello, Hello):
            raise _PeerGone("closed before the handshake")
        self.health_check = hello.client == HEALTH_CHECK_CLIENT
        token = None if self.trusted else self.config.token
        if token is not None and not _token_matches(hello.token, token):
            # a health check's hello carries no token: its "unauthorized" is its pass
            level = logging.DEBUG if self.health_check else logging.WARNING
            log.log(level, "%s: refused: %s token", self.peer, "wrong" if hello.token else "no")
            await self.try_send(
                Error("unauthorized", "this server needs a valid token (--token)", fatal=True)
            )
            return
        if hello.version not in SUPPORTED_VERSIONS:
            log.warning("%s: refused: protocol version %d", self.peer, hello.version)
            await self.try_send(
                Error(
                    "unsupported_version",
                    f"protocol version {hello.version} is not supported; this server speaks "
                    + ", ".join(str(v) for v in sorted(SUPPORTED_VERSIONS)),
                    fatal=True,
                    versions=tuple(sorted(SUPPORTED_VERSIONS)),
                )
            )
            return
        state = self.server.maintainer.state()
        # held until the first reply's first send, or until the loop waits for the
        # peer (see _held): a request sent with the hello gets one write, not two
        self._held = self.conn.send(
            Welcome(
                version=min(hello.version, PROTOCOL_VERSION),
                server=f"musiclib/{__version__}",
                tracks=state.tracks,
                scanning=state.scanning,
                versions=tuple(sorted(SUPPORTED_VERSIONS)),
                max_message_size=self.config.max_message_size,
            )
        )
        self.welcomed = True
        while not self.server.stopping.is_set():
            with trio.CancelScope() as idle:
                self.server._idle_scopes.add(idle)
                try:
                    event = await self._next_event(self.config.idle_timeout, idle=True)
                except MessageError as exc:
                    log.info("%s: bad request: %s", self.peer, exc)
                    await self._send(Error("bad_request", str(exc)))
                    continue
                finally:
                    self.server._idle_scopes.discard(idle)
            if idle.cancelled_caught:
                return  # the server is stopping
            if isinstance(event, Closed):
                return
            if self._held and not _answered_at_once(event):
                await self._flush()
            self.requests += 1
            try:
                await self._dispatch(event)
            except ServerError as exc:
                await self._send(Error(exc.code, exc.message, candidates=exc.candidates))
            if self.forwarded:
                return

    async def _dispatch(self, event: Event) -> None:
        if isinstance(event, StopRequest) or (
            isinstance(event, (Data, PublishEnd))
            and self.conn.state in (State.PUBLISH_ABORTED, State.IDLE)
        ):
            # a stop that crossed the end of its listen, or what a publisher sent after
            # the server ended its publish (up to its publish_end): nothing to do
            return
        if self.server.follower and type(event) in FORWARDED:
            assert isinstance(event, Message)
            await self.forward(event)
            return
        serve_request = _REQUESTS.get(type(event))
        if serve_request is None:  # the state machine lets nothing else through in this state
            raise RemoteProtocolError(f"unexpected {type(event).__name__}")
        await serve_request(self, self.server.services, event)

    async def forward(self, request: Message) -> None:
        """Hand this connection to the primary worker, from ``request`` on, and relay it.

        The primary alone runs the live channels and the scans, so a secondary
        connects to its private socket, says hello with the version agreed
        with the client (no token: the socket is trusted, the client's token
        was checked here), sends ``request`` and whatever the client sent
        after it, then copies bytes both ways: the client is served by the
        primary from now on, as if it had connected there (positions, epochs
        and preroll are the primary's, the same on every worker). One chunk
        in flight each way, so a slow client slows the primary's writes to
        it, which the primary's own rules then handle. Closing either side
        closes both. Before the request is sent, a primary that cannot be
        reached is ``busy`` (a restart); after it, a failure just ends the
        connection.
        """
        worker = self.server.worker
        assert worker is not None
        await self._flush()  # (the request was not one answered at once: nothing held)
        stream: trio.SocketStream | None = None
        with trio.move_on_after(self.config.handshake_timeout):
            try:
                stream = await trio.open_unix_socket(worker.internal_path)
            except OSError as exc:
                log.warning("%s: cannot reach the primary worker: %s", self.peer, exc)
        if stream is None:
            raise Busy(_PRIMARY_AWAY)
        upstream = Transport(stream, peer="the primary worker")
        try:
            link = Connection(Role.CLIENT)
            try:
                hello = Hello(version=self.conn.version, client=f"worker {worker.number}")
                await upstream.send(link.send(hello), self.config.send_timeout)
                welcome = await _upstream_event(upstream, link, self.config.handshake_timeout)
                if not isinstance(welcome, Welcome):
                    raise Busy(_PRIMARY_AWAY)
                trailing, eof = self.conn.trailing_data
                await upstream.send(link.send(request) + trailing, self.config.send_timeout)
            except (ConnectionLost, Timeout) as exc:
                log.warning("%s: the primary worker did not answer: %s", self.peer, exc)
                raise Busy(_PRIMARY_AWAY) from exc
            self.forwarded = True
            log.debug("%s: %s handed to the primary worker", self.peer, request.TYPE)
            early, _ = link.trailing_data
            if early:
                await self._send_bytes(early)
            if not eof:
                await self._splice(upstream)
        finally:
            await upstream.aclose()

    async def _splice(self, upstream: Transport) -> None:
        """Copy bytes both ways between the client and the primary until one side ends."""
        timeout = self.config.send_timeout

        async def pump(source: Transport, sink: Transport, done: trio.CancelScope) -> None:
            try:
                while data := await source.receive(SPLICE_CHUNK, math.inf):
                    await sink.send(data, timeout)
            except (ConnectionLost, Timeout) as exc:
                log.info("%s: %s", self.peer, exc)
            done.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, self.transport, upstream, nursery.cancel_scope)
            nursery.start_soon(pump, upstream, self.transport, nursery.cancel_scope)

    # ---- I/O boundary ---------------------------------------------------
    # (the Session interface of musiclib.live.requests: send, send_bytes, next_event)

    async def send(self, msg: Message) -> None:
        """Send one message under the send deadline."""
        await self._send(msg)

    async def send_bytes(self, data: bytes) -> None:
        """Send bytes the protocol object produced, under the send deadline."""
        await self._send_bytes(data)

    async def next_event(self, timeout: float) -> Event:
        """The next event from the peer within ``timeout`` s, else ``_PeerGone``.

        A message must arrive whole within it; a data frame's payload is handed
        on as it arrives, each piece an event (a publisher's audio), so for a
        publisher this is a silence timeout.
        """
        return await self._next_event(timeout)

    def raw_fd(self) -> int | None:
        """The plain TCP socket's descriptor (``None`` under TLS or on a memory stream)."""
        return self.transport.raw_fd()

    # (and what musiclib.library_requests adds: send_data, send_file, peer_hung_up)

    @property
    def can_sendfile(self) -> bool:
        """Whether :meth:`send_file` is zero-copy (plain TCP, not TLS or memory)."""
        return self.transport.can_sendfile

    async def send_data(self, payload: bytes) -> None:
        """Send one data frame (header and payload) under the send deadline."""
        await self._send_data(payload)

    async def send_file(self, fd: int, offset: int, count: int, head: bytes = b"") -> int:
        """Send ``head``, then ``count`` raw bytes of ``fd`` from ``offset`` (zero-copy
        on plain TCP).

        The sends take turns with the other streams (:data:`SEND_TURNS`), but for
        the connection's first :data:`FIRST_PIECE` bytes, which go out at once: a
        new client's first byte does not queue behind the streams already
        running, and a burst of new clients each sends a little before any
        sends much.
        """
        timeout = self.config.send_timeout
        head = self._with_held(head)
        sent = 0
        if self._first_file:
            self._first_file = False
            if head:
                await self._send_bytes(head)  # tried at once (the connection's first sends)
                head = b""
            piece = min(count, FIRST_PIECE)
            sent = await self._sending(self.transport.sendfile(fd, offset, piece, timeout))
            if sent < piece or sent == count:  # (short: the file ended; the caller says why)
                return sent
        turns = self.server.send_turns
        rest = self.transport.sendfile(fd, offset + sent, count - sent, timeout, turns, head)
        return sent + await self._sending(rest)

    async def peer_hung_up(self) -> bool:
        """Wait for the peer during a reply: ``True`` once it closed its end.

        A client may not speak during a reply, so anything read here is an
        early next request: it is kept for later and ``False`` returned
        (bounded: one read).
        """
        try:
            data = await self.transport.receive(64 * 1024, math.inf)
        except ConnectionLost:
            data = b""
        if data:
            self.conn.receive_data(data)
            return False
        return True

    async def _next_event(
        self, timeout: float, *, since: float | None = None, idle: bool = False, hello: bool = False
    ) -> Event:
        """The next complete event, within ``timeout`` s from ``since`` (default: now).

        The time bounds the whole wait, not each read: a peer that dribbles a
        byte now and then gets no longer than a silent one (slowloris).
        """
        deadline = (trio.current_time() if since is None else since) + timeout
        received = False
        while True:
            event = self.conn.next_event()
            if not isinstance(event, NeedData):
                return event
            try:
                data = self._read_nowait()
                if data is None:
                    if self._held:  # the peer may be waiting for it
                        await self._flush()
                    left = max(0.0, deadline - trio.current_time())
                    data = await self.transport.receive(64 * 1024, left)
            except Timeout as exc:
                if not received:
                    what = "idle" if idle else "silent"
                    raise _PeerGone(f"{what} for {timeout:g} s; closing") from exc
                what = "hello" if hello else "message"
                raise _PeerGone(f"no complete {what} within {timeout:g} s; closing") from exc
            except ConnectionLost as exc:
                raise _PeerGone(str(exc)) from exc
            received = received or bool(data)
            self.conn.receive_data(data)

    async def _send(self, msg: Message) -> None:
        await self._send_bytes(self.conn.send(msg))

    async def _send_data(self, chunk: bytes) -> None:
        await self._send_bytes(self.conn.send_data_header(len(chunk)))
        await self._send_bytes(chunk)

    async def _flush(self) -> None:
        """Send what is held (the ``welcome``) now."""
        await self._send_bytes(b"")

    def _with_held(self, data: bytes) -> bytes:
        """``data`` behind what is held (the ``welcome``), which is then no longer held."""
        if not self._held:
            return data
        held, self._held = self._held, b""
        return held + data

    async def _send_bytes(self, data: bytes) -> None:
        data = self._with_held(data)
        view: bytes | memoryview = data
        if self._eager_sends:
            self._eager_sends -= 1
            try:
                taken = self.transport.send_nowait(data)
            except ConnectionLost as exc:  # as in _sending
                raise _PeerGone(str(exc)) from exc
            if taken == len(data):
                return
            view = memoryview(data)[taken:]
        await self._sending(self.transport.send(view, self.config.send_timeout))

    def _read_nowait(self) -> bytes | None:
        """What the peer sent that is already here, while this connection is new.

        Each trio receive or send yields to the event loop once done, and with
        hundreds of streams running a turn of the loop takes milliseconds. A
        client that sends its ``hello`` and first request together (``get``,
        ``play``) would wait one turn for each step: reading them, the
        ``welcome``, the reply's first frame. So the first :data:`EAGER_STEPS`
        reads and sends of a connection are tried at once
        (:meth:`Transport.receive_nowait <musiclib.transport.Transport.receive_nowait>`),
        and only what cannot be done at once waits; its first byte then leaves
        in the turn it was accepted (BENCHMARKS.md, scenario 9). Bounded, so
        that no peer keeps the loop to itself: after that every step yields.
        """
        if not self._eager_reads:
            return None
        self._eager_reads -= 1
        return self.transport.receive_nowait(64 * 1024)

    async def _sending(self, send: Awaitable[_T]) -> _T:
        """Await a transport send; its errors end the connection (``_PeerGone``, one log line).

        A send cancelled part way (a live listener cut while stuck, a hang-up
        during a decoded stream) leaves part of a frame out and the connection
        open for a moment: the protocol object is told, so nothing else may
        follow. After a transport error the connection just ends; the
        protocol object is left alone, so that a task still reading reports
        the hang-up rather than a failed connection.
        """
        try:
            return await send
        except Timeout as exc:
            raise _PeerGone(f"stopped reading for {self.config.send_timeout:g} s") from exc
        except ConnectionLost as exc:
            raise _PeerGone(str(exc)) from exc
        except BaseException:  # cancelled (re-raised as it is)
            if self.transport.broken:
                self.conn.send_failed()
            raise

    async def try_send(self, msg: Message) -> None:
        """Send a last message if the connection still allows it; never raises."""
        with contextlib.suppress(Exception):  # best effort: the peer or the state may be gone
            await self.transport.send(self._with_held(self.conn.send(msg)), 1)


def _answered_at_once(event: Event) -> bool:
    """Whether the reply to ``event`` starts without waiting on anything but this
    process (a name lookup, the index): the held ``welcome`` may then go out with
    its first bytes. Not a decoded stream (a decoder slot, ffmpeg's start), a
    rescan (a scan), a live request or anything forwarded to another worker."""
    if isinstance(event, StreamRequest):
        return event.mode != "decoded"
    return isinstance(event, (InfoRequest, ListRequest))


async def _serve_channels(session: Session, services: Services, request: ChannelsRequest) -> None:
    await serve_channels(session, services.channels, request)


async def _serve_listen(session: Session, services: Services, request: ListenRequest) -> None:
    lag = services.config.lag_limit
    await serve_listen(session, services.channels, request, lag_limit=lag)


async def _serve_publish(session: Session, services: Services, request: PublishRequest) -> None:
    silence = services.config.send_timeout
    await serve_publish(session, services.channels, request, silence_timeout=silence)


async def _serve_status(session: Session, services: Services, request: StatusRequest) -> None:
    assert isinstance(session, _ConnectionHandler)  # the status is the server's, not the library's
    await session.send(session.server.status())


#: each request's handler, by the request's type: ``await handler(session, services, request)``
_REQUESTS: dict[type[Event], Callable[[Session, Services, Any], Awaitable[None]]] = {
    ListRequest: serve_list,
    InfoRequest: serve_info,
    RescanRequest: serve_rescan,
    StreamRequest: serve_stream,
    ChannelsRequest: _serve_channels,
    StatusRequest: _serve_status,
    ListenRequest: _serve_listen,
    PublishRequest: _serve_publish,
}


async def _upstream_event(upstream: Transport, link: Connection, timeout: float) -> Event:
    """The primary's next event on a link, within ``timeout`` s in all."""
    deadline = trio.current_time() + timeout
    while isinstance(event := link.next_event(), NeedData):
        left = max(0.0, deadline - trio.current_time())
        link.receive_data(await upstream.receive(64 * 1024, left))
    return event


def _token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so response timing reveals nothing about the token."""
    return hmac.compare_digest((given or "").encode(), expected.encode())


def _raise_open_file_limit() -> None:
    """Each connection and each ffmpeg pipe is a descriptor; 1024 is a common soft limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _peer_of(stream: trio.abc.Stream) -> tuple[str | None, str]:
    """The peer's host (``None`` if unknown) and its name for log lines ("host:port")."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None, "?:0"
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return None, "peer"
    return str(host), f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@functools.lru_cache(maxsize=4096)  # per connection, and the same few clients come back
def address_key(host: str) -> str:
    """What the per-address limits count a peer by: one key per client machine, roughly.

    An IPv4 address as it is, also when it arrives IPv4-mapped on an IPv6
    socket (``::ffff:1.2.3.4`` is ``1.2.3.4``); an IPv6 address by its /64,
    the block one machine or one home is usually given, so that hopping
    through the addresses of one's own /64 gains nothing.
    """
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def decode_share(config: ServerConfig) -> int | None:
    """Decoded streams one address may run at once (``None``: no cap of its own)."""
    share = config.max_decodes_per_address
    if share is None:
        return max(1, config.max_decodes // 4)
    return share or None


def open_library(config: ServerConfig, *, read_only: bool = False) -> Library:
    """The library ``config`` names, its index open (close it, or use ``with``);
    ``read_only``: another process keeps the index (a secondary worker)."""
    return Library(
        config.root,
        config.index,
        workers=config.scan_workers,
        follow_symlinks=config.follow_symlinks,
        ffmpeg=config.ffmpeg,
        read_only=read_only,
    )


async def serve(
    config: ServerConfig,
    *,
    server: Server | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Index ``config.root`` and serve it until ``server.stop()`` is called.

    ``task_status.started`` receives the bound ``(host, port)`` addresses, so
    ``await nursery.start(serve, config)`` learns the port chosen for
    ``port=0``. Shutdown stops accepting at once, closes idle connections,
    gives running replies ``grace_period`` seconds, then cancels the rest.
    A worker of ``serve --workers`` (``server.worker``) binds nothing: it
    accepts on the sockets its supervisor bound.
    """
    if server is None:
        with open_library(config) as library:
            await serve(config, server=Server(library, config), task_status=task_status)
        return
    _raise_open_file_limit()
    worker = server.worker
    if worker is not None:
        sockets = list(worker.sockets)
    else:
        try:
            trio_listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        except OSError as exc:
            where = f"{config.host}:{config.port}"
            raise ListenError(f"cannot listen on {where}: {listen_reason(exc)}") from None
        # trio bound them (addresses, IPv6-only flags, one port for all); we accept from
        # the plain sockets, in batches (see _accept_batches).
        sockets = [socket.socket(fileno=lst.socket.detach()) for lst in trio_listeners]
    addresses = [_address(sock) for sock in sockets]
    internal = [] if worker is None or worker.internal is None else [worker.internal]
    links = 0
    if (
        (worker is None or worker.primary)
        and config.token is None
        and not all(ipaddress.ip_address(h).is_loopback for h, _ in addresses)
    ):
        log.warning(
            "listening beyond this machine without a token: anyone who can reach "
            "%s may read the library (use --token)",
            config.host,
        )

    async def handler(stream: trio.abc.Stream) -> None:
        host, name = _peer_of(stream)
        await server.handle(stream, name, address_key(host) if host is not None else None)

    async def link_handler(stream: trio.abc.Stream) -> None:
        # another worker, handing over a client's connection (see _ConnectionHandler.forward)
        nonlocal links
        links += 1
        await server.handle(stream, f"worker link {links}", None, trusted=True)

    try:
        async with trio.open_nursery() as background:
            await background.start(server.maintainer.run)
            await background.start(server.channels.run, server.channel_sources())
            wyoming = config.wyoming
            if wyoming is not None and (worker is None or worker.primary):
                first = config.channels[0].name if config.channels else None
                await background.start(
                    lambda task_status: serve_wyoming(
                        server.channels,
                        wyoming,
                        default_channel=first,
                        lag_limit=config.lag_limit,
                        task_status=task_status,
                    )
                )
            if worker is not None and worker.primary:
                background.start_soon(server.publish_periodically)
            async with trio.open_nursery() as connections:
                # one scope per listening socket (a scope is entered once); cancelled together
                accept_scopes: list[trio.CancelScope] = []

                def accept(
                    sock: socket.socket,
                    serve_one: Callable[[trio.abc.Stream], Awaitable[None]] = handler,
                    tls: ssl.SSLContext | None = config.ssl_context,
                ) -> None:
                    scope = trio.CancelScope()
                    accept_scopes.append(scope)

                    async def run() -> None:
                        with scope:
                            await _accept_batches(sock, serve_one, connections, tls)

                    connections.start_soon(run)

                for sock in sockets:
                    accept(sock)
                for sock in internal:
                    accept(sock, link_handler, None)
                # a worker's listening is announced by its supervisor, once for all
                what = "listening" if worker is None else "accepting"
                for host, port in addresses:
                    log.info("%s on %s:%d", what, f"[{host}]" if ":" in host else host, port)
                task_status.started(addresses)
                await server.stopping.wait()
                log.info(
                    "shutting down: no new connections, %g s for running streams",
                    config.grace_period,
                )
                for scope in accept_scopes:
                    scope.cancel()
                for sock in sockets + internal:
                    sock.close()
                connections.cancel_scope.deadline = trio.current_time() + config.grace_period
            background.cancel_scope.cancel()
    finally:
        for sock in sockets + internal:
            sock.close()
    log.info("stopped")


#: a new connection's reads and sends that may skip the loop's turn: its hello and first
#: request (usually one read), its welcome and the first send of its first reply
EAGER_STEPS = 2
#: bytes of a connection's first ``sendfile`` that do not wait for a turn
FIRST_PIECE = 64 * 1024
#: ``sendfile`` calls one worker makes in one turn of its event loop, at most: each
#: sends up to a frame (1 MiB), so a turn stays a few milliseconds long however many
#: streams run, and a new connection waits that long to be read
SEND_TURNS = 16
#: seconds a connection must have waited for its hello before a newcomer may take its slot
EVICTABLE_AFTER = 1.0
#: seconds a refused connection's hello is waited for (so the ``busy`` is read, not reset)
REFUSE_HELLO_WAIT = 1.0
#: refusals that wait for a hello at once; beyond that a refused connection is just closed
MAX_REFUSING = 256

#: connections accepted per wake-up of the accept loop
ACCEPT_BATCH = 256
_ACCEPT_RETRY = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
_ACCEPT_PAUSE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


async def _accept_batches(
    sock: socket.socket,
    handler: Callable[[trio.abc.Stream], Awaitable[None]],
    nursery: trio.Nursery,
    ssl_context: ssl.SSLContext | None,
) -> None:
    """Accept every pending connection each time the listener is readable.

    trio's ``serve_listeners`` accepts one connection per scheduling pass; with
    hundreds of busy streams a pass takes long, and new clients waited seconds
    in the kernel's queue (BENCHMARKS.md). Draining the queue per wake-up
    keeps a new client's wait to one pass.
    """
    sock.setblocking(False)
    while True:
        await trio.lowlevel.wait_readable(sock)
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY:
                    continue
                if exc.errno in _ACCEPT_PAUSE:
                    log.error("cannot accept connections: %s; pausing 0.1 s", exc.strerror)
                    await trio.sleep(0.1)
                    break
                raise
            stream: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
            if ssl_context is not None:
                stream = trio.SSLStream(stream, ssl_context, server_side=True)
            nursery.start_soon(handler, stream)
        await trio.lowlevel.checkpoint()


def listen_reason(exc: OSError, option: str = "--port") -> str:
    """Why listening failed, with a hint at the option that fixes it (``--port``, or
    the option that named the address, e.g. ``--wyoming``)."""
    if exc.errno == errno.EADDRINUSE:
        return f"address already in use (another server? choose another port with {option})"
    if exc.errno == errno.EACCES:
        return f"permission denied (ports below 1024 need privileges; choose one with {option})"
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return f"{str(exc.strerror or exc).lower()} (not an address of this machine? see --host)"
    return str(exc.strerror or exc)


def _address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


async def run_until_signalled(
    config: ServerConfig,
    on_ready: Callable[[list[tuple[str, int]]], None] | None = None,
    *,
    worker: WorkerRole | None = None,
    stop_when: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (what ``musiclib serve`` runs).

    A second signal during the grace period cancels everything at once.
    ``worker``: run as that worker of ``serve --workers``; ``stop_when``: shut
    down gracefully also when this returns (a worker whose supervisor is gone).
    """
    with (
        open_library(config, read_only=worker is not None and not worker.primary) as library,
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
    ):
        server = Server(library, config, worker=worker)
        async with trio.open_nursery() as nursery:
            if stop_when is not None:

                async def stop_then() -> None:
                    await stop_when()
                    server.stop()

                nursery.start_soon(stop_then)

            async def watch() -> None:
                async for signum in signals:
                    log.info("received %s", signal.Signals(signum).name)
                    if server.stopping.is_set():
                        nursery.cancel_scope.cancel()
                    server.stop()

            async def run(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
                await serve(config, server=server, task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            addresses = await nursery.start(run)
            if on_ready is not None:
                on_ready(addresses)
