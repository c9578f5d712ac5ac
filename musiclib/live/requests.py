"""The live requests (``channels``, ``listen``, ``publish``), apart from the socket.

Each function serves one request over a :class:`Session`: the connection
handler's small interface (send a message or raw bytes under its deadline,
read the next event). The session owns the socket and the protocol object;
this module owns what a request means: which hub, which format, when a
listen ends, how a publisher's bytes become chunks.

A listen runs two tasks: the sender takes the listener's subscription item
by item and writes it (audio frames, gaps, the end), and the reader waits for
the listener's ``stop`` or its hang-up. A stop interrupts only a *wait* for
audio, never a write, so a frame is never cut in half.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Protocol

import trio

from ..decode import AudioFormat
from ..errors import (
    LocalProtocolError,
    MessageError,
    RemoteProtocolError,
    ShuttingDown,
    TooSlow,
    single_errors,
)
from ..protocol import (
    ChannelList,
    ChannelsRequest,
    Closed,
    Connection,
    Data,
    Error,
    Event,
    GapNotice,
    ListenEnd,
    ListenRequest,
    ListenStart,
    Message,
    PublishDone,
    PublishEnd,
    PublishReady,
    PublishRequest,
    StopRequest,
)
from .channels import Channels
from .hub import Chunk, End, Gap, Subscription
from .sources import default_chunk_frames

log = logging.getLogger("musiclib.live")

#: seconds a cut listener gets to take the frame being written to it and the error
CUT_GRACE = 1.0
#: queued audio a listener's task writes at once, at most (about 1 s of 16 kHz stereo)
BATCH_BYTES = 64 * 1024


class Session(Protocol):
    """What a live request needs of the connection serving it."""

    peer: str
    conn: Connection

    async def send(self, msg: Message) -> None:
        """Send one message under the send deadline."""

    async def send_bytes(self, data: bytes) -> None:
        """Send raw bytes (a frame the protocol object produced) under the send deadline."""

    def raw_fd(self) -> int | None:
        """The plain TCP socket's descriptor, for non-blocking writes; ``None`` under TLS
        or on another kind of stream."""

    async def next_event(self, timeout: float) -> Event:
        """The next event from the peer; the peer silent for ``timeout`` s ends the session."""


class PeerLeft(Exception):
    """The listener or publisher closed its connection during the request."""


async def serve_channels(session: Session, channels: Channels, request: ChannelsRequest) -> None:
    """Answer ``channels`` with every channel's description."""
    await session.send(ChannelList(tuple(channels.infos(time.time_ns()))))


async def serve_listen(
    session: Session, channels: Channels, request: ListenRequest, *, lag_limit: float
) -> None:
    """Send a channel live until it ends, the listener stops, or has its ``frames``.

    Raises ``TooSlow`` (sent as an error) when the hub cut the listener, and
    ``PeerLeft`` when the listener hung up.
    """
    channel = channels.get(request.channel)
    own = channel.format
    fmt = AudioFormat(
        request.sample_format or own.sample_format,
        request.sample_rate or own.sample_rate,
        request.channels or own.channels,
    )
    async with channels.feed(channel, fmt) as hub:
        rate = fmt.sample_rate
        backlog = max(1, request.max_latency_ms * rate // 1000)
        preroll = request.preroll_ms * rate // 1000
        with hub.subscribe(
            max_backlog_frames=backlog, preroll_frames=preroll, lag_limit=lag_limit
        ) as sub:
            start = sub.start_position
            await session.send(
                ListenStart(
                    channel=channel.name,
                    sample_format=fmt.sample_format,
                    sample_rate=rate,
                    channels=fmt.channels,
                    position=start,
                    preroll=hub.position - start,
                    converted=fmt != own,
                    source=channel.source,
                    epoch=channel.epoch,
                )
            )
            log.info(
                "%s: listen %s as %s %d Hz %d ch (max latency %d ms, preroll %d ms)",
                session.peer,
                channel.name,
                fmt.sample_format,
                rate,
                fmt.channels,
                request.max_latency_ms,
                request.preroll_ms,
            )
            listen = _Listen(session, sub, fmt, request.frames)
            sub.on_cut = listen.cut
            with single_errors():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(listen.watch_for_stop, nursery.cancel_scope)
                    try:
                        end = await listen.send_items()
                    finally:
                        sub.direct = None
                    nursery.cancel_scope.cancel()
            if listen.hung_up:
                raise PeerLeft("hung up during a listen")
            if listen.write_cut:
                log.warning("%s: cut from %s: stuck mid-frame; closing", session.peer, channel.name)
                raise PeerLeft("fell behind and stopped reading; closed")
            if end.reason == "too_slow":
                log.warning("%s: cut from %s: %s", session.peer, channel.name, end.message)
                with trio.move_on_after(CUT_GRACE) as sending:  # a peer that reads so little
                    await session.send(Error(TooSlow.code, end.message))  # gets little time
                if sending.cancelled_caught:
                    raise PeerLeft("fell behind and stopped reading; closed")
                return
            if end.reason == "shutdown" and channels.stopping:
                end = End("shutdown", "the server is shutting down")
            await session.send(
                ListenEnd(
                    reason=end.reason, message=end.message, frames=listen.sent, lost=listen.lost
                )
            )
            log.info(
                "%s: listen %s ended (%s): %d frames, %d lost",
                session.peer,
                channel.name,
                end.reason,
                listen.sent,
                listen.lost,
            )


class _Listen:
    """One listen's sending loop, its direct path, and its listener watch.

    Two ways out for a chunk. Usually the listener is up to date: its task
    waits with nothing queued, and the source's own task writes the frame
    straight into the socket with one non-blocking write (:meth:`direct`),
    without waking anybody: 1000 listeners cost 1000 writes per chunk, not
    1000 task switches and deadlines. Otherwise (TLS, a full socket buffer, a
    backlog, a gap to tell) the chunk is queued and the listener's task sends
    it under the send deadline. The order holds because the hub offers the
    direct path only while the task waits with nothing queued or taken, and a
    half-written direct frame is finished by the task before anything else.
    """

    def __init__(
        self, session: Session, sub: Subscription, fmt: AudioFormat, frames: int | None
    ) -> None:
        self.session = session
        self.sub = sub
        self.bpf = fmt.bytes_per_frame
        self.left = frames  # positions still to cover (audio and gaps), if limited
        self.sent = 0
        self.lost = 0
        self.stopped = False
        self.hung_up = False
        #: the hub cut this listener while a frame was being written to it
        self.write_cut = False
        self._writing: trio.CancelScope | None = None
        self._pending = b""  # the rest of a frame the direct path could not write whole
        self._fd = session.raw_fd()
        if self._fd is not None:
            sub.direct = self.direct

    def cut(self) -> None:
        """The hub cut this listener. Waiting for audio, it finds the end next. Stuck
        writing a frame to a peer that stopped reading, the write gets :data:`CUT_GRACE`
        more seconds; after that it is abandoned, and the connection with it (half a
        frame cannot be taken back)."""
        if self._writing is not None:
            self._writing.deadline = min(self._writing.deadline, trio.current_time() + CUT_GRACE)

    def direct(self, chunk: Chunk) -> bool:
        """Write ``chunk`` now, from the source's task, if the socket takes it at once."""
        frames = len(chunk.data) // self.bpf
        if self.stopped or self.hung_up or self._pending or self._fd is None:
            return False
        if self.left is not None and frames >= self.left:
            return False  # the last one: the task ends the listen after it
        conn = self.session.conn
        try:
            frame = conn.send_audio_header(
                chunk.position, chunk.time_ns, len(chunk.data), commit=False
            )
        except LocalProtocolError:  # the listen is failing (the peer broke the protocol and
            return False  # its task is being cancelled): never raise into the source's task
        frame += chunk.data
        try:
            written = os.write(self._fd, frame)
        except OSError:  # full (EAGAIN), or broken: the task's own send finds out which
            return False
        conn.commit_audio(chunk.position, len(chunk.data))
        self.sent += frames
        if self.left is not None:
            self.left -= frames
        if written < len(frame):
            self._pending = frame[written:]
            self.sub.wake()
        return True

    async def _write(self, data: bytes) -> bool:
        """Write under the send deadline; False when a cut ran out of grace meanwhile."""
        with trio.CancelScope() as writing:
            self._writing = writing
            await self.session.send_bytes(data)
        self._writing = None
        if writing.cancelled_caught:
            self.write_cut = True
            return False
        return True

    async def send_items(self) -> End:
        """Write the subscription's items until an end; returns why it ended.

        Whatever is queued goes out in one write (up to :data:`BATCH_BYTES`): a
        listener that fell behind catches up in one wake-up instead of one per
        chunk, which is what keeps an overloaded server from sliding further.
        """
        sub, conn = self.sub, self.session.conn
        held: Chunk | Gap | End | None = None
        while True:
            if self._pending:
                pending, self._pending = self._pending, b""
                if not await self._write(pending):
                    return End("too_slow", "cut while writing")
            if self.hung_up:
                return End("closed", "the listener hung up")
            if self.stopped:
                return End("stopped", "stopped by the listener")
            item, held = held or sub.next_nowait(), None
            if item is None:
                await sub.wait()
                continue
            batch: list[bytes] = []
            size = sent = lost = 0
            end: End | None = None
            while item is not None:
                if isinstance(item, End):
                    end = item
                    break
                if size >= BATCH_BYTES:
                    held = item
                    break
                frames = len(item.data) // self.bpf if isinstance(item, Chunk) else item.frames
                if self.left is not None and frames > self.left:
                    frames = self.left
                    if isinstance(item, Chunk):
                        item = Chunk(item.position, item.time_ns, item.data[: frames * self.bpf])
                    else:
                        item = Gap(item.position, frames)
                if isinstance(item, Chunk):
                    data = item.data
                    batch.append(conn.send_audio_header(item.position, item.time_ns, len(data)))
                    batch.append(data)
                    size += len(data) + 21
                    sent += frames
                else:
                    batch.append(conn.send(GapNotice(position=item.position, frames=item.frames)))
                    lost += frames
                if self.left is not None:
                    self.left -= frames
                    if not self.left:
                        end = End("complete", "the requested frames were sent")
                        break
                item = sub.next_nowait()
            if batch and not await self._write(b"".join(batch)):
                return End("too_slow", "cut while writing")
            self.sent += sent
            self.lost += lost
            if end is not None:
                return end

    async def watch_for_stop(self, scope: trio.CancelScope) -> None:
        """Read the listener's side: a ``stop`` ends the listen, end of file ends all."""
        while True:
            try:
                event = await self.session.next_event(float("inf"))
            except MessageError as exc:
                raise RemoteProtocolError(str(exc)) from None
            except PeerLeft:  # reset or closed under us: the same as a hang-up
                event = Closed()
            if isinstance(event, StopRequest):
                self.stopped = True
                self.sub.wake()
                return
            if isinstance(event, Closed):
                self.hung_up = True
                scope.cancel()
                return
            raise RemoteProtocolError(f"unexpected {type(event).__name__} during a listen")


async def serve_publish(
    session: Session, channels: Channels, request: PublishRequest, *, silence_timeout: float
) -> None:
    """Take a client's samples as the source of a new channel until ``publish_end``.

    The channel ends for its listeners when the publisher ends or leaves
    (``publisher_left``), and its name is free again.
    """
    fmt = AudioFormat(request.sample_format, request.sample_rate, request.channels)
    source = f"publish:{request.source}" if request.source else "publish"
    channel = channels.add(request.channel, source, fmt, publisher=session.peer)
    hub = channel.hub
    bpf = fmt.bytes_per_frame
    chunk_bytes = default_chunk_frames(fmt) * bpf
    frames = 0
    pending = bytearray()
    reason = "the publisher disconnected"
    try:
        await session.send(PublishReady(channel=channel.name))
        log.info(
            "%s: publishes %s as %s %d Hz %d ch",
            session.peer,
            channel.name,
            fmt.sample_format,
            fmt.sample_rate,
            fmt.channels,
        )
        with trio.CancelScope() as reading:
            channel.on_shutdown = reading.cancel  # a read cancelled between frames loses nothing
            while True:
                event = await session.next_event(silence_timeout)
                if isinstance(event, Data):
                    pending += event.payload
                    whole = len(pending) - len(pending) % bpf
                    for i in range(0, whole, chunk_bytes):  # a flood still goes out in live chunks
                        piece = bytes(pending[i : min(i + chunk_bytes, whole)])
                        hub.publish(piece)
                        frames += len(piece) // bpf
                    del pending[:whole]
                elif isinstance(event, PublishEnd):
                    reason = "the publisher ended"
                    break
                elif isinstance(event, Closed):
                    raise PeerLeft("hung up while publishing")
                else:
                    raise RemoteProtocolError(f"unexpected {type(event).__name__} while publishing")
        if reading.cancelled_caught:
            reason = "the server is shutting down"
            raise ShuttingDown("the server is shutting down")
        await session.send(PublishDone(frames=frames))
    finally:
        log.info("%s: publish %s ended: %d frames", session.peer, channel.name, frames)
        hub.close("publisher_left", f"channel {channel.name!r}: {reason}")
        channels.remove(channel)
