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

import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import trio

from .decode import AudioFormat, DecodeSlots, open_decoder
from .errors import Changed, single_errors
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

    async def send_file(self, fd: int, offset: int, count: int) -> int:
        """Send ``count`` raw bytes of ``fd`` from ``offset`` under the send deadline
        (zero-copy where :attr:`can_sendfile`); fewer only if the file ended first."""

    async def peer_hung_up(self) -> bool:
        """Wait for the peer during a reply: ``True`` when it closed its end or the
        connection broke; ``False`` when it sent bytes (kept for its next request)."""


class RequestConfig(Protocol):
    """The settings requests read (``ServerConfig`` has them); read when used."""

    #: payload bytes per data frame
    chunk_size: int
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


async def serve_list(session: Session, services: Services, request: ListRequest) -> None:
    """The matches as pages of at most :data:`PAGE_BUDGET` bytes, then ``list_end``.

    The index is read a batch at a time inside one read transaction (see
    :class:`musiclib.index.Listing`), so a list of any length needs memory
    for one batch only and is consistent even while a scan commits.
    """
    library, in_thread = services.library, services.maintainer.in_thread
    scanning = library.scanning  # before the snapshot: a scan may end meanwhile
    listing = await in_thread(library.listing, request)
    sent = 0
    try:
        while batch := await in_thread(listing.fetch, 512):
            for page in paginate(batch):
                await session.send(page)
            sent += len(batch)
    finally:
        listing.close()
    end = ListEnd(count=sent, total=listing.total, scanning=scanning)
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
        known = await services.maintainer.in_thread(services.library.stored_sha256, track, st)
    return known


async def _sha256(services: Services, track: TrackInfo, fd: int, st: os.stat_result) -> str:
    """The sha256 of this version of ``track``: known, or computed now and stored."""
    known = await _known_sha256(services, track, st)
    return known or await _compute_sha256(services, track, fd, st)


async def _compute_sha256(services: Services, track: TrackInfo, fd: int, st: os.stat_result) -> str:
    """Hash this version of ``track`` (shared with any request already hashing it)
    and store the digest in the index."""
    digest = await services.maintainer.checksums.sha256(fd, st)
    await services.maintainer.in_thread(services.library.store_sha256, track, st, digest)
    return digest


async def _stream_original(session: Session, services: Services, request: StreamRequest) -> None:
    """A file's bytes from ``offset``, then the whole file's sha256.

    The checksum comes from the maintainer's cache, or is computed in a worker
    thread while the event loop sends (see :mod:`musiclib.checksums`). The
    file is sent with zero-copy ``sendfile`` on plain TCP, by reads
    otherwise (TLS, memory streams in tests).
    """
    track = await _resolve(services, request.track)
    f = services.library.open_track(track)
    with f:
        st = os.fstat(f.fileno())
        offset = min(request.offset, st.st_size)
        known = await _known_sha256(services, track, st)
        log.info("%s: stream %s from byte %d", session.peer, track.path, offset)
        await session.send(
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

        async def checksum() -> None:
            # the index was asked for the header already: only compute what it lacked
            digest.append(known or await _compute_sha256(services, track, f.fileno(), st))

        with single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(checksum)
                await _send_file(
                    session, services, f.fileno(), offset, st.st_size - offset, track.path
                )
        now = os.fstat(f.fileno())
        if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise Changed(f"{track.path} changed while it was being sent")
    await session.send(StreamEnd(sent=st.st_size - offset, sha256=digest[0]))


async def _send_file(
    session: Session, services: Services, fd: int, offset: int, length: int, name: str
) -> None:
    """Send ``length`` bytes of ``fd`` from ``offset`` as data frames.

    The frame header goes out before the file's bytes, so a file that
    shrinks now cannot end the frame early: the rest is padded with zeros
    and the stream then ends with ``changed``, which makes the client
    discard what it got. Without zero-copy each chunk is read first, and a
    short read ends the stream before its frame starts.
    """
    frame = services.config.chunk_size
    zero_copy = session.can_sendfile
    while length:
        n = min(frame, length)
        if not zero_copy:
            chunk = os.pread(fd, n, offset)
            if len(chunk) < n:
                raise Changed(f"{name} shrank while it was being sent")
            await session.send_data(chunk)
        else:
            await session.send_bytes(session.conn.send_data_header(n))
            sent = await session.send_file(fd, offset, n)
            if sent < n:
                await session.send_bytes(bytes(n - sent))
                raise Changed(f"{name} shrank while it was being sent")
        offset += n
        length -= n


async def _stream_decoded(session: Session, services: Services, request: StreamRequest) -> None:
    """Decoded samples through one ffmpeg process, paced if asked.

    The first chunk is read before ``stream_start`` goes out, so a file
    that cannot be decoded at all gets a plain error instead of a started
    stream; a failure later ends the stream with an error, never silently.
    """
    config = services.config
    track = await _resolve(services, request.track)
    source, st = services.library.track_path(track)
    fmt = AudioFormat(
        request.sample_format or "s16le",
        request.sample_rate or track.sample_rate or 48000,
        request.channels or track.channels or 2,
    )
    async with (
        services.decode_slots.acquire(),
        open_decoder(
            source,
            fmt,
            start=request.start,
            duration=request.duration,
            ffmpeg=config.ffmpeg,
            chunk_size=config.chunk_size,
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
                        await session.send_data(chunk)
                        sent += len(chunk)
                    else:  # in slices, so no chunk runs ahead of the clock
                        for piece in _slices(chunk, slice_bytes):
                            await pacer.wait_for(-(-(sent + len(piece)) // bpf))
                            await session.send_data(piece)
                            sent += len(piece)
                    chunk = await _next_chunk(chunks)
                nursery.cancel_scope.cancel()  # done: stop watching
        if chunk:  # the watcher cancelled the stream
            raise PeerLeft("hung up during a decoded stream")
    await session.send(StreamEnd(sent=sent, frames=sent // fmt.bytes_per_frame))


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
