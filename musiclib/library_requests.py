"""The library's requests (protocol version 1: ``list``, ``info``, ``rescan``,
``stream``), apart from the socket.

Each function serves one request over a :class:`Session`, the connection
handler's small interface, and is given the :class:`Services` it may use (the
library, the maintainer, the decode slots, a few settings), nothing of the
server's connection registry. The session owns the socket, the protocol
object and the deadlines; this module owns what a request means: which file,
which checksum, which decoder, how fast, and when a stream has ended.

This is the same split as :mod:`musiclib.live.requests` for the live
requests, so that a request's logic can be read, tested and changed without
reading the connection's loop, and the catalog's upkeep
(:mod:`musiclib.maintainer`) is reached only through the few calls a request
needs.

Files are read with plain blocking reads on the event loop thread: reading
page-cached data that way measured 2-3x faster than a thread per read
(STYLE.md), and a chunk is small enough not to stall other connections.
Log lines are the server's (the ``musiclib.server`` logger), as they were when
this code lived in :mod:`musiclib.server`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from .decode import DecodeSlots, open_decoder, output_format
from .errors import Changed, ServerError, TooSlow, Unreadable, single_errors
from .library import Library
from .live.channels import Channels
from .live.pacing import Pacer
from .live.requests import PeerLeft
from .live.requests import Session as LiveSession
from .maintainer import Maintainer
from .protocol import (
    InfoReply,
    InfoRequest,
    ListEnd,
    ListRequest,
    RescanRequest,
    RescanStatus,
    StreamEnd,
    StreamRequest,
    StreamStart,
    TrackInfo,
    paginate,
)

log = logging.getLogger("musiclib.server")


class Session(LiveSession, Protocol):
    """What a library request needs of the connection serving it (the live
    requests' :class:`~musiclib.live.requests.Session`, and a file and a hang-up)."""

    @property
    def can_sendfile(self) -> bool:
        """Whether :meth:`send_file` is zero-copy (plain TCP, not TLS or memory)."""

    async def send_data(self, payload: bytes) -> None:
        """Send one data frame (header and payload) under the send deadline."""

    async def send_file(self, fd: int, offset: int, count: int, head: bytes = b"") -> int:
        """Send ``head``, then ``count`` raw bytes of ``fd`` from ``offset`` under the
        send deadline (zero-copy where :attr:`can_sendfile`); fewer only if the file
        ended first or a read of it failed."""

    async def peer_hung_up(self) -> bool:
        """Wait for the peer during a reply: ``True`` when it closed its end or the
        connection broke; ``False`` when it sent bytes (kept for its next request)."""

    @property
    def address(self) -> str | None:
        """What per-address limits count this peer by (``None``: not counted)."""


class RequestConfig(Protocol):
    """The settings requests read (``ServerConfig`` has them); read when used."""

    #: payload bytes per data frame
    chunk_size: int
    #: payload bytes per data frame of a file sent with zero-copy ``sendfile``
    sendfile_frame_size: int
    #: seconds one send may take (a publisher's silence ends its publish after as long)
    send_timeout: float
    #: seconds a listener may keep losing audio before it is cut
    lag_limit: float
    #: ffmpeg binary; ``None``: MUSICLIB_FFMPEG, else the one in imageio-ffmpeg
    ffmpeg: str | None
    #: seconds of audio sent at once before real-time pacing sets in
    burst: float
    #: seconds of audio in one paced data frame
    pacing_slice: float
    #: the slowest a decoded stream may be read, in seconds of audio per second of sending
    min_decode_rate: float
    #: seconds of sending over which ``min_decode_rate`` is averaged
    min_decode_window: float


@dataclass(frozen=True)
class Services:
    """What a request may use: the per-process context the server builds once.

    Not in it: the server's connection registry, its limits and its stop flag,
    which belong to the sessions, not to what a request means.
    """

    library: Library
    maintainer: Maintainer
    decode_slots: DecodeSlots
    #: the live channels (for the live requests, :mod:`musiclib.live.requests`)
    channels: Channels
    config: RequestConfig


#: tracks read from the index per batch of a list reply: what a peer that stops
#: reading keeps in memory (a few dozen KiB), with no index connection held
LIST_BATCH = 128


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``; ``None`` where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return functools.partial(trim, 0)


class HeapTrim:
    """Gives the memory freed by list replies back to the system when the last one ends.

    500 peers that ask for a 20 000-track list and stop reading hold their
    replies' buffers; when they leave, glibc keeps the freed arenas (RSS stayed
    up by what they had held). When the number of list replies in progress
    drops to zero, ``trim`` (``malloc_trim(0)``) runs in a worker thread, at
    most once per ``interval`` seconds (a later one waits for its turn).
    """

    def __init__(self, trim: Callable[[], object] | None, interval: float = 5.0) -> None:
        self.trim = trim
        self.interval = interval
        self.replies = 0  #: list replies in progress
        self._last = -math.inf
        self._pending = False

    @contextlib.contextmanager
    def reply(self) -> Iterator[None]:
        """Count one list reply in progress while the block runs."""
        self.replies += 1
        try:
            yield
        finally:
            self.replies -= 1
            if not self.replies and self.trim is not None and not self._pending:
                self._pending = True
                trio.lowlevel.spawn_system_task(self._trim_when_due)

    async def _trim_when_due(self) -> None:
        try:
            # time.monotonic, not trio's clock: the instance outlives one trio.run
            await trio.sleep(max(0.0, self._last + self.interval - time.monotonic()))
            if not self.replies and self.trim is not None:
                self._last = time.monotonic()
                await trio.to_thread.run_sync(self.trim)
        finally:
            self._pending = False


#: the server's list replies (a test may replace ``trim``)
LIST_REPLIES = HeapTrim(_malloc_trim())


async def serve_list(session: Session, services: Services, request: ListRequest) -> None:
    """The matches as pages of at most :data:`PAGE_BUDGET` bytes, then ``list_end``.

    The index is read :data:`LIST_BATCH` tracks at a time, each batch in its own
    short read transaction (see :class:`musiclib.index.Listing`) and encoded
    before it is sent: a peer that stops reading holds one batch's bytes (some
    30 KiB) and no index connection. The reply says ``scanning`` if a scan ran
    when it started or committed while it was sent (it may then miss or repeat
    a track the scan moved). When the last list reply in progress ends, the
    memory the replies freed is given back (:class:`HeapTrim`).
    """
    with LIST_REPLIES.reply():
        await _serve_list(session, services, request)


async def _serve_list(session: Session, services: Services, request: ListRequest) -> None:
    library, in_thread = services.library, services.maintainer.in_thread
    scanning = services.maintainer.state().scanning  # before the snapshot: a scan may end
    listing = await in_thread(library.listing, request, LIST_BATCH)
    sent = 0
    while batch := await in_thread(listing.fetch, LIST_BATCH):
        sent += len(batch)
        # encoded before the send, so a peer that stops reading holds these bytes only
        frames = b"".join(session.conn.send(page) for page in paginate(batch))
        del batch
        await session.send_bytes(frames)
    end = ListEnd(count=sent, total=listing.total, scanning=scanning or listing.changed)
    await session.send(end)


async def serve_rescan(session: Session, services: Services, request: RescanRequest) -> None:
    """Ask the maintainer for a scan (and wait for it, if asked); say how the index is."""
    await services.maintainer.request_rescan(wait=request.wait)
    library = services.library
    await session.send(RescanStatus(tracks=library.count, scanning=library.scanning))


async def serve_info(session: Session, services: Services, request: InfoRequest) -> None:
    """One track's description, with its sha256 if asked (computed now if unknown)."""
    track = await _resolve(services, request.track)
    if request.checksum:
        with services.library.open_track(track) as f:
            st = os.fstat(f.fileno())
            digest = await _sha256(services, track, f.fileno(), st)
        track = dataclasses.replace(track, sha256=digest)
    await session.send(InfoReply(track))


async def serve_stream(session: Session, services: Services, request: StreamRequest) -> None:
    """A track's original bytes, or its samples decoded, as the request says."""
    if request.mode == "decoded":
        await _stream_decoded(session, services, request)
    else:
        await _stream_original(session, services, request)


async def _resolve(services: Services, name: str) -> TrackInfo:
    return await services.maintainer.in_thread(services.library.resolve, name)


async def _known_sha256(services: Services, track: TrackInfo, st: os.stat_result) -> str | None:
    """The sha256 of this version of ``track`` if computed before (memory, then index)."""
    known = services.maintainer.checksums.known(st)
    if known is None:
        known = await services.maintainer.stored_sha256(track, st)
    return known


async def _sha256(services: Services, track: TrackInfo, fd: int, st: os.stat_result) -> str:
    """The sha256 of this version of ``track``: known, or computed now and stored."""
    known = await _known_sha256(services, track, st)
    return known or await _compute_sha256(services, track, fd, st)


async def _compute_sha256(services: Services, track: TrackInfo, fd: int, st: os.stat_result) -> str:
    """Hash this version of ``track`` (shared with any request already hashing it)
    and store the digest in the index.

    A secondary worker (``serve --workers``) does not write the index: it keeps
    the digest in its memory (the maintainer's
    :class:`~musiclib.checksums.ChecksumCache`, which
    answers the next stream of this version at once) and leaves storing to
    the primary, whose background hasher stores every file's after its scans.
    One writer means no lock held across processes and no write that waits
    on another process's scan; the cost is that a file streamed from a
    secondary before the primary hashed it is hashed twice (once per process).

    ``Changed`` if the file moves meanwhile, ``Unreadable`` if a read fails.
    """
    try:
        digest = await services.maintainer.checksums.sha256(fd, st)
    except OSError as exc:  # EIO and the like, in the hashing thread
        raise _unreadable(track.path, exc) from exc
    if services.maintainer.writes_index:
        await services.maintainer.in_thread(services.library.store_sha256, track, st, digest)
    return digest


async def _stream_original(session: Session, services: Services, request: StreamRequest) -> None:
    """A file's bytes from ``offset``, then the whole file's sha256.

    The checksum comes from the maintainer's cache, or is computed in a worker
    thread while the event loop sends (see :mod:`musiclib.checksums`). The
    file is sent with zero-copy ``sendfile`` on plain TCP, by reads
    otherwise (TLS, memory streams in tests).

    The name and the stored sha256 usually come from the maintainer's memory
    (:class:`~musiclib.maintainer.TrackCache`), so the stream starts without
    waiting for a worker thread: with hundreds of streams starting at once, each
    thread hop waited for a loop busy sending (BENCHMARKS.md, scenario 9).
    """
    track, _ = await services.maintainer.locate(request.track)
    f = services.library.open_track(track)
    with f:
        st = os.fstat(f.fileno())
        offset = min(request.offset, st.st_size)
        known = await _known_sha256(services, track, st)
        # sent with the first frame's header (see _send_file's ``head``)
        start = session.conn.send(
            StreamStart(
                path=track.path,
                size=st.st_size,
                version=f"{st.st_size:x}-{st.st_mtime_ns:x}",
                offset=offset,
                length=st.st_size - offset,
                sha256=known,
            )
        )
        digest: list[str] = []
        failed: list[ServerError] = []

        async def checksum() -> None:
            # the index was asked for the header already: only compute what it lacked
            try:
                digest.append(await _compute_sha256(services, track, f.fileno(), st))
            except (Changed, Unreadable) as exc:
                # not a cancellation of the sender, which may be in the middle of a
                # frame: it ends the stream with this error at its next frame boundary
                failed.append(exc)

        send = functools.partial(
            _send_file,
            session,
            services,
            f.fileno(),
            offset,
            st.st_size - offset,
            track.path,
            failed,
            head=start,
            # logged once the first bytes are out: a line costs about as much as a
            # tenth of a new stream's start, and under a burst of new clients every
            # start waits for those before it (BENCHMARKS.md, scenario 9)
            started=lambda: log.info(
                "%s: stream %s from byte %d", session.peer, track.path, offset
            ),
        )
        if known is not None:  # nothing to compute: no task for it
            digest.append(known)
            await send()
        else:
            with single_errors():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(checksum)
                    await send()
        if failed:  # the checksum failed after the last frame went out
            raise failed[0]
        now = os.fstat(f.fileno())
        if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise Changed(f"{track.path} changed while it was being sent")
    await session.send(StreamEnd(sent=st.st_size - offset, sha256=digest[0]))


async def _send_file(
    session: Session,
    services: Services,
    fd: int,
    offset: int,
    length: int,
    name: str,
    failed: Sequence[ServerError] = (),
    *,
    head: bytes = b"",
    started: Callable[[], object] | None = None,
) -> None:
    """Send ``head`` (the ``stream_start`` already encoded), then ``length`` bytes of
    ``fd`` from ``offset`` as data frames; call ``started`` once the first frame (or,
    for nothing to send, ``head``) has gone out, whatever became of it.

    ``head`` goes out in the same send as the first frame's header: every send
    is a turn of the event loop, and with hundreds of streams running a turn
    takes tens of milliseconds, so a new stream's first byte leaves one turn
    sooner than if ``stream_start`` had a send of its own (BENCHMARKS.md,
    scenario 9).

    The frame header goes out before the file's bytes, so a file that
    shrinks (or cannot be read) now cannot end the frame early: the rest is
    padded with zeros and the stream then ends with ``changed`` (or
    ``unreadable``), which makes the client discard what it got. Without
    zero-copy each chunk is read first, and a short read ends the stream
    before its frame starts. An error another task puts in ``failed`` (the
    checksum's) ends the stream at the next frame boundary; nothing ever
    stops in the middle of a frame, so the error can always be sent.
    """
    zero_copy = session.can_sendfile
    frame = services.config.sendfile_frame_size if zero_copy else services.config.chunk_size
    if head and (failed or not zero_copy or not length):  # nothing to join it with
        await session.send_bytes(head)
        head = b""
    if started is not None and not length:
        started()
    while length:
        if failed:
            raise failed[0]
        n = min(frame, length)
        if not zero_copy:
            try:
                chunk = os.pread(fd, n, offset)
            except OSError as exc:
                raise _unreadable(name, exc) from exc
            if len(chunk) < n:
                raise Changed(f"{name} shrank while it was being sent")
            await session.send_data(chunk)
            if started is not None:
                started()
                started = None
        else:
            header = head + session.conn.send_data_header(n)
            head = b""
            sent = await session.send_file(fd, offset, n, header)
            if started is not None:
                started()
                started = None
            if sent < n:  # the file ended, or a read failed: say which after the frame
                await session.send_bytes(bytes(n - sent))
                raise _short_read(fd, offset + sent, name)
        offset += n
        length -= n


def _short_read(fd: int, position: int, name: str) -> ServerError:
    """Why the file ``fd`` gave no more bytes at ``position``: it shrank, or it failed."""
    try:
        more = os.pread(fd, 1, position)
    except OSError as exc:
        return _unreadable(name, exc)
    if not more:
        return Changed(f"{name} shrank while it was being sent")
    return Unreadable(f"the server could not read {name!r} past byte {position}")


def _unreadable(name: str, exc: OSError) -> Unreadable:
    reason = (exc.strerror or type(exc).__name__).lower()
    return Unreadable(f"the server cannot read {name!r}: {reason}")


async def _stream_decoded(session: Session, services: Services, request: StreamRequest) -> None:
    """Decoded samples through one ffmpeg process, paced if asked.

    The first chunk is read before ``stream_start`` goes out, so a file
    that cannot be decoded at all gets a plain error instead of a started
    stream; a failure later ends the stream with an error, never silently.

    The name is resolved through the maintainer's memory
    (:class:`~musiclib.maintainer.TrackCache`), like an original stream's. A
    hundred streams of one track starting at once used to make a hundred
    worker-thread lookups, queued behind the index's few threads while their
    ffmpegs held the CPUs: the longest wait of the last streams to start
    (BENCHMARKS.md, "Issue 15, item 4"). Now they share one, and a name seen
    before costs none until the index changes.
    """
    config = services.config
    track, _ = await services.maintainer.locate(request.track)
    source, st = services.library.track_path(track)
    fmt = output_format(
        request.sample_format,
        request.sample_rate,
        request.channels,
        source_rate=track.sample_rate,
        source_channels=track.channels,
    )
    async with (
        services.decode_slots.acquire(session.address),
        open_decoder(
            source,
            fmt,
            start=request.start,
            duration=request.duration,
            ffmpeg=config.ffmpeg,
            chunk_size=config.chunk_size,
            source_channels=track.channels,
        ) as decoder,
    ):
        chunks = decoder.__aiter__()
        first = await _next_chunk(chunks)
        log.info(
            "%s: decode %s to %s %d Hz %d ch from %gs%s",
            session.peer,
            track.path,
            fmt.sample_format,
            fmt.sample_rate,
            fmt.channels,
            request.start,
            ", real time" if request.pacing == "realtime" else "",
        )
        await session.send(
            StreamStart(
                path=track.path,
                size=st.st_size,
                version=f"{st.st_size:x}-{st.st_mtime_ns:x}",
                mode="decoded",
                sample_format=fmt.sample_format,
                sample_rate=fmt.sample_rate,
                channels=fmt.channels,
                start=request.start,
            )
        )
        sent = 0
        # never more than burst + t seconds of audio after t seconds: the live channels' clock
        pacer = Pacer(fmt.sample_rate, burst=config.burst)
        send = _RateFloor(session, fmt.bytes_per_second, config)
        bpf = fmt.bytes_per_frame
        chunk = first
        slice_bytes = max(
            1, round(fmt.bytes_per_second * config.pacing_slice) // fmt.bytes_per_frame
        )
        slice_bytes *= fmt.bytes_per_frame
        with single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_for_hangup, session, nursery.cancel_scope)
                while chunk:
                    if request.pacing != "realtime":
                        await send(chunk)
                        sent += len(chunk)
                    else:  # in slices, so no chunk runs ahead of the clock
                        for piece in _slices(chunk, slice_bytes):
                            await pacer.wait_for(-(-(sent + len(piece)) // bpf))
                            await send(piece)
                            sent += len(piece)
                    chunk = await _next_chunk(chunks)
                nursery.cancel_scope.cancel()  # done: stop watching
        if chunk:  # the watcher cancelled the stream
            raise PeerLeft("hung up during a decoded stream")
    await session.send(StreamEnd(sent=sent, frames=sent // fmt.bytes_per_frame))


class _RateFloor:
    """Sends a decoded stream's data frames, and cuts a client that reads them far
    below real time (``too_slow``), so that it cannot hold a decoder for hours.

    Only the time spent in sends counts: waiting for ffmpeg or for the real-time
    clock is the server's doing, not the client's. Over each
    ``min_decode_window`` seconds of it, the client must have taken at least
    ``min_decode_rate`` times as many seconds of audio. A paced stream read as
    it comes (1x) always passes; so does any client that reads.
    """

    def __init__(self, session: Session, bytes_per_second: int, config: RequestConfig) -> None:
        self.session = session
        self.bytes_per_second = bytes_per_second
        self.rate = config.min_decode_rate
        self.window = config.min_decode_window
        self._spent = 0.0
        self._taken = 0

    async def __call__(self, payload: bytes) -> None:
        began = trio.current_time()
        await self.session.send_data(payload)
        self._spent += trio.current_time() - began
        self._taken += len(payload)
        if self.rate <= 0 or self._spent < self.window:
            return
        speed = self._taken / self.bytes_per_second / self._spent
        if speed < self.rate:
            raise TooSlow(
                f"the decoded stream was read at {speed:.2g}x real time for "
                f"{self._spent:.0f} s; this server needs at least {self.rate:g}x"
            )
        self._spent, self._taken = 0.0, 0


async def _watch_for_hangup(session: Session, stream_scope: trio.CancelScope) -> None:
    """Cancel the running stream as soon as the peer closes its end.

    A paced stream may not send for seconds, so a send error would notice
    a vanished client late, while its ffmpeg keeps running. A client may
    not speak during a reply, so anything it sends is an early next request:
    the session keeps it for later and the watch ends.
    """
    if await session.peer_hung_up():
        stream_scope.cancel()


def _slices(chunk: bytes, size: int) -> list[bytes]:
    """``chunk`` cut into pieces of at most ``size`` bytes."""
    if len(chunk) <= size:
        return [chunk]
    view = memoryview(chunk)
    return [bytes(view[i : i + size]) for i in range(0, len(chunk), size)]


async def _next_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    """The next chunk, or ``b""`` at the end (decode errors propagate)."""
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return b""
