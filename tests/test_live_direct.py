"""The live fast path (``_Listen.direct``) through the real server, over real sockets.

``test_server_live.py`` runs the server over memory streams, which have no
descriptor, so the direct path never runs there. Here the server gets one end
of a real socket pair (AF_UNIX from ``socket.socketpair()``, or TCP over
127.0.0.1 where TCP behaves differently: windows, resets), wrapped as a
``trio.SocketStream``, so ``raw_fd()`` hands the listener its descriptor and a
chunk for an idle listener is written by the publishing task itself.

Two spies tell which way each chunk went. ``writes`` stands in for ``os``
inside ``musiclib.live.requests`` only: it records every frame the direct path
tried, what the kernel took, and can be scripted to take only a prefix (a
partial write) or to refuse (``EAGAIN`` or another ``OSError``). ``task_writes``
records what the listener's own task wrote (a pending rest, or a batch).
Every listener's audio is checked byte for byte against what was published:
positions, time stamps, payloads, and the counts in ``listen_end``.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import live_support
import pytest
import trio
import trio.testing
from live_support import check_cover, frames, in_process_server

import musiclib.live.requests as requests
from musiclib.client import Client, ListenReader
from musiclib.decode import AudioFormat
from musiclib.errors import RemoteProtocolError
from musiclib.live.hub import Chunk, Hub
from musiclib.live.requests import _Listen
from musiclib.protocol import (
    AUDIO_HEADER,
    HEADER,
    KIND_AUDIO,
    KIND_MESSAGE,
    Audio,
    GapNotice,
    PublishDone,
    PublishEnd,
    PublishReady,
    PublishRequest,
    State,
)
from musiclib.server import Server

#: 8000 mono s16le frames a second: a frame is 2 bytes; a 20 ms chunk is 160 frames
FMT = AudioFormat("s16le", 8000, 1)
BPF = 2
CHUNK = 160
T0 = 1_700_000_000_000_000_000
#: bytes before the samples of an audio frame (kind, length, position, time)
AUDIO_HEAD = HEADER.size + AUDIO_HEADER.size
#: seconds after which a hanging test fails
TIMEOUT = 10
#: a latency no test reaches: nothing is dropped
NO_LOSS_MS = 60_000
KINDS = ["unix", "tcp"]


class Published(list[Audio]):
    """What a source published, as the listener should receive it."""

    def add(self, hub: Hub, n: int) -> Audio:
        chunk = hub.publish(frames(n, hub.position), T0 + len(self))
        audio = Audio(chunk.position, chunk.time_ns, chunk.data)
        self.append(audio)
        return audio

    @property
    def frames(self) -> int:
        return sum(len(a.payload) // BPF for a in self)


def wire_of(audio: Audio) -> bytes:
    """The audio frame (kind 3) carrying ``audio``, as PROTOCOL.md lays it out."""
    head = HEADER.pack(KIND_AUDIO, AUDIO_HEADER.size + len(audio.payload))
    return head + AUDIO_HEADER.pack(audio.position, audio.time_ns) + audio.payload


def frames_in_batch(data: bytes, published: list[Audio]) -> int:
    """How many published audio frames ``data`` is, back to back and whole (a gap message
    among them allowed); 0 when it is anything else (such as the rest of a frame)."""
    by_position = {a.position: wire_of(a) for a in published}
    count, at = 0, 0
    while at < len(data):
        if len(data) - at < AUDIO_HEAD:
            return 0
        kind, length = HEADER.unpack_from(data, at)
        if kind == KIND_AUDIO:
            (position, _) = AUDIO_HEADER.unpack_from(data, at + HEADER.size)
            if data[at : at + HEADER.size + length] != by_position.get(position):
                return 0
            count += 1
        elif kind != KIND_MESSAGE:
            return 0
        at += HEADER.size + length
    return count if at == len(data) else 0


class DirectWrites:
    """Stands in for the ``os`` module inside ``musiclib.live.requests``.

    ``attempts``: each frame the direct path tried to write; ``results``: what
    the kernel took (a byte count) or the ``OSError`` raised. ``script`` maps a
    call's index to a byte count (write only that prefix, as a full socket
    would) or an ``OSError`` to raise instead of writing.
    """

    def __init__(self) -> None:
        self.attempts: list[bytes] = []
        self.results: list[int | OSError] = []
        self.script: dict[int, int | OSError] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        action = self.script.get(len(self.attempts))
        self.attempts.append(bytes(data))
        try:
            if isinstance(action, OSError):
                raise action
            n = os.write(fd, data if action is None else data[:action])
        except OSError as exc:
            self.results.append(exc)
            raise
        self.results.append(n)
        return n

    @property
    def whole(self) -> int:
        """Direct writes the kernel took whole."""
        return sum(r == len(a) for a, r in zip(self.attempts, self.results, strict=True))

    @property
    def partial(self) -> int:
        """Direct writes the kernel took only part of."""
        return sum(
            isinstance(r, int) and r < len(a)
            for a, r in zip(self.attempts, self.results, strict=True)
        )

    @property
    def refused(self) -> int:
        """Direct writes that raised (the chunk went to the queue)."""
        return sum(isinstance(r, OSError) for r in self.results)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> DirectWrites:
    spy = DirectWrites()
    monkeypatch.setattr(requests, "os", spy)
    return spy


@pytest.fixture
def task_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Everything a listener's own task wrote (pending rests and batches), in order."""
    written: list[bytes] = []
    real = _Listen._write

    async def spy(self: _Listen, data: bytes) -> bool:
        written.append(bytes(data))
        return await real(self, data)

    monkeypatch.setattr(_Listen, "_write", spy)
    return written


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with in_process_server(tmp_path) as server:
        yield server


def running(server: Server) -> AbstractAsyncContextManager[trio.Nursery]:
    return live_support.running(server, TIMEOUT)


def socket_pair(kind: str, *, tiny: bool) -> tuple[socket.socket, socket.socket]:
    """(server's end, client's end), connected; ``tiny``: the server's send buffer and
    the client's receive buffer as small as the kernel allows (about 4.5 and 2.3 KB)."""
    if kind == "unix":
        server_sock, client_sock = socket.socketpair()
    else:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client_sock = socket.socket()
            if tiny:  # before connect, so the window is small from the start
                client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            client_sock.connect(listener.getsockname())
            server_sock, _ = listener.accept()
    if tiny:
        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    return server_sock, client_sock


@asynccontextmanager
async def connected(
    server: Server, nursery: trio.Nursery, kind: str = "unix", *, tiny: bool = False
) -> AsyncIterator[Client]:
    """A handshaken Client talking to ``server.handle`` over a real socket pair."""
    server_sock, client_sock = socket_pair(kind, tiny=tiny)
    server_stream = trio.SocketStream(trio.socket.from_stdlib_socket(server_sock))
    client_stream = trio.SocketStream(trio.socket.from_stdlib_socket(client_sock))
    nursery.start_soon(server.handle, server_stream, kind)
    client = Client(client_stream, timeout=TIMEOUT, version=2)
    await client.handshake()
    try:
        yield client
    finally:
        await client.aclose()


def raw_socket(client: Client) -> trio.socket.SocketType:
    """The client's end of its socket pair."""
    stream = client._stream
    assert isinstance(stream, trio.SocketStream)
    return stream.socket


async def listening(audio: ListenReader) -> None:
    """Wait until the server's listener task waits on its empty queue (direct path on)."""
    await trio.testing.wait_all_tasks_blocked()
    assert audio.start is not None


# ---- 1. an up-to-date listener -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_an_up_to_date_listener_gets_every_chunk_by_the_direct_path(
    server: Server, writes: DirectWrites, task_writes: list[bytes], kind: str
) -> None:
    hub = server.channels.add("radio", "test", FMT).hub
    sizes = [CHUNK, 1, 333, CHUNK, 7, 4000, CHUNK] * 3
    published = Published()
    async with running(server) as nursery, connected(server, nursery, kind) as client:
        async with client.listen("radio") as audio:
            await listening(audio)
            got: list[Audio | GapNotice] = []
            for i, n in enumerate(sizes):
                published.add(hub, n)
                if i % 3 == 2:  # read at once, or let a few wait in the socket
                    while len(got) < len(published):
                        got.append(await audio.__anext__())
            hub.close("source_ended", "the source ended")
            got += [event async for event in audio]
        assert got == published
        assert audio.end is not None
        assert (audio.end.reason, audio.end.frames, audio.end.lost) == (
            "source_ended",
            sum(sizes),
            0,
        )
        # each chunk was written whole by the source's task; the listener's never wrote
        assert writes.attempts == [wire_of(a) for a in published]
        assert writes.whole == len(sizes)
        assert task_writes == []
        assert client._conn.state is State.IDLE
        assert [c.name for c in await client.channels()] == ["radio"]
        await trio.testing.wait_all_tasks_blocked()
        assert hub.listeners == 0


# ---- 2. partial writes ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_frames_larger_than_the_socket_buffers_arrive_whole_and_in_order(
    server: Server, writes: DirectWrites, task_writes: list[bytes], kind: str
) -> None:
    """16 KB frames into a 4.5 KB send buffer and a 2.3 KB receive buffer, read slowly:
    direct writes go out part way, the listener's task finishes them before anything else."""
    hub = server.channels.add("radio", "test", FMT).hub
    sizes = [8000, 1, 8000, 5000, 3, CHUNK, 8000, 8000, 2, 6000] * 3
    published = Published()
    async with running(server) as nursery, connected(server, nursery, kind, tiny=True) as client:
        async with client.listen("radio", max_latency_ms=NO_LOSS_MS) as audio:
            await listening(audio)

            async def source() -> None:
                for n in sizes:
                    published.add(hub, n)
                    await trio.sleep(0.002)
                hub.close("source_ended", "the source ended")

            nursery.start_soon(source)
            got = []
            async for event in audio:  # the client's protocol object checks every frame
                got.append(event)
                await trio.sleep(0.001)
        assert got == published
        assert audio.end is not None
        assert (audio.end.reason, audio.end.frames, audio.end.lost) == (
            "source_ended",
            sum(sizes),
            0,
        )
        assert writes.partial >= 1, "no direct write went out part way"
        assert task_writes, "no rest was finished by the listener's task"
        assert [c.name for c in await client.channels()] == ["radio"]


#: bytes of a frame the scripted partial writes let out: inside the kind/length header,
#: right after it, inside the position/time, right after the whole header, inside the
#: samples, all but the last byte
CUTS = [1, HEADER.size, HEADER.size + 3, AUDIO_HEAD, AUDIO_HEAD + 1, -1]


async def test_a_scripted_partial_direct_write_is_finished_by_the_listener_task(
    server: Server, writes: DirectWrites, task_writes: list[bytes]
) -> None:
    hub = server.channels.add("radio", "test", FMT).hub
    published = Published()
    async with running(server) as nursery, connected(server, nursery) as client:
        async with client.listen("radio") as audio:
            await listening(audio)
            # each partial write, then the task finishes it and waits again (direct path on)
            expected_rests = []
            for cut in CUTS:
                frame = wire_of(published.add(hub, CHUNK))  # a whole frame first
                assert writes.results[-1] == len(frame)
                n = len(frame) + cut if cut < 0 else cut
                writes.script[len(writes.attempts)] = n
                frame = wire_of(published.add(hub, CHUNK))
                assert writes.results[-1] == n
                expected_rests.append(frame[n:])
                await trio.testing.wait_all_tasks_blocked()
            assert task_writes == expected_rests
            # a partial write, then a burst before the task ran: the burst waits behind the
            # rest and goes out as one batch after it
            writes.script[len(writes.attempts)] = 10
            frame = wire_of(published.add(hub, CHUNK))
            burst = [published.add(hub, n) for n in (1, CHUNK, 50)]
            attempts = len(writes.attempts)
            await trio.testing.wait_all_tasks_blocked()
            assert task_writes[-2:] == [frame[10:], b"".join(wire_of(a) for a in burst)]
            published.add(hub, CHUNK)  # and then the direct path again
            assert len(writes.attempts) == attempts + 1 and writes.whole == len(CUTS) + 1
            hub.close("source_ended", "the source ended")
            got = [event async for event in audio]
        assert got == published
        assert audio.end is not None
        assert (audio.end.reason, audio.end.frames) == ("source_ended", published.frames)


# ---- 3. a socket that refuses ----------------------------------------------------------------


def eagain() -> OSError:
    return BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))


async def test_a_refused_direct_write_sends_the_chunk_through_the_queue(
    server: Server, writes: DirectWrites, task_writes: list[bytes]
) -> None:
    """EAGAIN (or another error) from the direct write: nothing of the frame went out and
    nothing was counted; the chunk is queued and the listener's task sends it."""
    hub = server.channels.add("radio", "test", FMT).hub
    published = Published()
    refused = {1: eagain(), 4: eagain(), 5: eagain(), 7: OSError(errno.ENOBUFS, "no buffers")}
    async with running(server) as nursery, connected(server, nursery) as client:
        async with client.listen("radio") as audio:
            await listening(audio)
            writes.script.update(refused)
            for i in range(10):
                published.add(hub, CHUNK + i)
                await trio.testing.wait_all_tasks_blocked()  # the task sends it, waits again
            assert len(writes.attempts) == 10  # every chunk was offered to the direct path
            assert writes.refused == len(refused) and writes.whole == 10 - len(refused)
            assert task_writes == [wire_of(published[i]) for i in sorted(refused)]
            # refused, then a burst before the task ran: the burst queues behind it, and the
            # task sends all of it in one write
            writes.script[len(writes.attempts)] = eagain()
            burst = [published.add(hub, n) for n in (3, CHUNK, 1, 999)]
            assert len(writes.attempts) == 11
            await trio.testing.wait_all_tasks_blocked()
            assert task_writes[-1] == b"".join(wire_of(a) for a in burst)
            published.add(hub, CHUNK)  # the direct path again
            assert len(writes.attempts) == 12 and writes.results[-1] == len(writes.attempts[-1])
            hub.close("source_ended", "the source ended")
            got = [event async for event in audio]
        assert got == published
        assert audio.end is not None
        assert (audio.end.reason, audio.end.frames, audio.end.lost) == (
            "source_ended",
            published.frames,
            0,
        )


# ---- 4. backlog, batch, direct again ---------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "max_latency_ms"),
    [(1, NO_LOSS_MS), (2, NO_LOSS_MS), (3, NO_LOSS_MS), (4, 50), (5, 50)],
)
async def test_random_interleavings_of_publishing_and_reading_lose_and_repeat_nothing(
    server: Server,
    writes: DirectWrites,
    task_writes: list[bytes],
    seed: int,
    max_latency_ms: int,
) -> None:
    """A listener that reads in fits (tiny socket buffers): backlogs build, real EAGAIN and
    partial writes, a batch of the backlog, then the direct path again, in random order.
    Every position arrives once, in order, as audio or (with a short latency) a gap."""
    rng = random.Random(seed)
    hub = server.channels.add("radio", "test", FMT).hub
    published = Published()
    got: list[Audio | GapNotice] = []
    covered = 0  # the position after the last event received

    async with running(server) as nursery, connected(server, nursery, tiny=True) as client:
        async with client.listen("radio", max_latency_ms=max_latency_ms) as audio:
            await listening(audio)
            for _ in range(150):
                op = rng.random()
                if op < 0.45:
                    for _ in range(rng.randint(1, 4)):
                        published.add(hub, rng.choice([1, 7, CHUNK, 1000, 3000]))
                elif op < 0.8:
                    # the newest chunk is never dropped: until it arrived, more is on its way
                    for _ in range(rng.randint(1, 8)):
                        if covered == hub.position:
                            break
                        event = await audio.__anext__()
                        got.append(event)
                        covered = event.position + (
                            len(event.payload) // BPF if isinstance(event, Audio) else event.frames
                        )
                elif op < 0.9:
                    await trio.testing.wait_all_tasks_blocked()
                else:
                    await trio.lowlevel.checkpoint()
            hub.close("source_ended", "the source ended")
            got += [event async for event in audio]
        assert audio.end is not None and audio.end.reason == "source_ended"
        audio_frames, lost = check_cover(got, 0)
        assert audio_frames + lost == published.frames == hub.position
        assert (audio.end.frames, audio.end.lost) == (audio_frames, lost)
        received = [e for e in got if isinstance(e, Audio)]
        assert all(e in published for e in received)  # with its own time stamp, whole
        if max_latency_ms == NO_LOSS_MS:
            assert got == published
        else:
            assert lost > 0, "a listener reading in fits with 50 ms of latency lost nothing"
        # the run went every way: whole, partial and refused direct writes, and batches
        assert writes.whole and writes.partial and writes.refused
        batches = [w for w in task_writes if frames_in_batch(w, published) > 1]
        assert batches, "no backlog was written as one batch"
        # a batch stops once BATCH_BYTES are reached: one chunk (and one gap message) more
        assert max(map(len, task_writes)) <= requests.BATCH_BYTES + 3000 * BPF + AUDIO_HEAD + 64


async def test_a_backlog_beyond_batch_bytes_goes_out_in_batches_of_about_that_size(
    server: Server, writes: DirectWrites, task_writes: list[bytes]
) -> None:
    """A listener that reads nothing while 120 KB are published, then reads: its task writes
    the backlog in batches that stop at BATCH_BYTES (the chunk that would go beyond waits
    for the next one), then the direct path takes over again."""
    hub = server.channels.add("radio", "test", FMT).hub
    published = Published()
    size = 1000  # frames: a 2021-byte audio frame
    async with running(server) as nursery, connected(server, nursery, tiny=True) as client:
        async with client.listen("radio", max_latency_ms=NO_LOSS_MS) as audio:
            await listening(audio)
            for _ in range(60):
                published.add(hub, size)
            # the socket filled (a refused or partial write): from then on, the queue
            assert writes.refused + writes.partial == 1
            got = [await audio.__anext__() for _ in range(60)]
            await trio.testing.wait_all_tasks_blocked()
            attempts = len(writes.attempts)
            published.add(hub, size)  # caught up: the direct way again
            assert len(writes.attempts) == attempts + 1 and writes.results[-1] == 2021
            hub.close("source_ended", "the source ended")
            got += [event async for event in audio]
        assert got == published
        counts = [frames_in_batch(w, published) for w in task_writes]
        assert max(counts) == -(-requests.BATCH_BYTES // 2021)  # the first to reach the limit
        assert all(len(w) < requests.BATCH_BYTES + 2021 for w in task_writes)
        assert sum(counts) == 60 - attempts + writes.refused  # each queued chunk written once


# ---- 5. the frames limit ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "limit",
    [3 * CHUNK, 2 * CHUNK + 50, 50, CHUNK],
    ids=["on-a-chunk", "inside-a-chunk", "inside-the-first", "the-first"],
)
async def test_a_frames_limit_ends_complete_with_the_last_chunk_trimmed(
    server: Server, writes: DirectWrites, task_writes: list[bytes], limit: int
) -> None:
    hub = server.channels.add("radio", "test", FMT).hub
    whole, rest = divmod(limit, CHUNK)
    async with running(server) as nursery, connected(server, nursery) as client:
        async with client.listen("radio", frames=limit) as audio:
            await listening(audio)
            published = Published()
            for _ in range(5):
                published.add(hub, CHUNK)
                await trio.testing.wait_all_tasks_blocked()
            got = [event async for event in audio]
        assert audio.end is not None
        assert (audio.end.reason, audio.end.frames, audio.end.lost) == ("complete", limit, 0)
        assert check_cover(got, 0) == (limit, 0)
        last = (whole if rest else whole - 1) + 1  # chunks that carried audio to this listener
        assert got[: last - 1] == published[: last - 1]
        trimmed = published[last - 1]
        trimmed = Audio(trimmed.position, trimmed.time_ns, trimmed.payload[: (rest or CHUNK) * BPF])
        assert got[last - 1 :] == [trimmed]
        # the chunks before the last went the direct way; the last one, the task's, and
        # nothing after the end
        assert writes.attempts == [wire_of(a) for a in published[: last - 1]]
        assert task_writes == [wire_of(trimmed)]
        await trio.testing.wait_all_tasks_blocked()
        assert hub.listeners == 0
        published.add(hub, CHUNK)
        assert [c.name for c in await client.channels()] == ["radio"]  # no stray frame came


async def test_holes_in_the_source_go_through_the_queue_and_the_direct_path_resumes(
    server: Server, writes: DirectWrites, task_writes: list[bytes]
) -> None:
    """A hole is told as a gap, which only the listener's task sends: the chunk after the
    hole waits behind it, and the chunk after that goes the direct way again. A frames
    limit that ends inside a hole trims the gap."""
    hub = server.channels.add("radio", "test", FMT).hub
    async with running(server) as nursery, connected(server, nursery) as client:
        async with client.listen("radio") as audio:
            await listening(audio)
            first = hub.publish(frames(CHUNK), T0)
            hub.publish_chunk(Chunk(CHUNK + 40, T0 + 1, frames(CHUNK, CHUNK + 40)))
            assert len(writes.attempts) == 1  # the gap, and the chunk behind it: queued
            await trio.testing.wait_all_tasks_blocked()
            last = hub.publish(frames(7, hub.position), T0 + 2)
            assert len(writes.attempts) == 2 and writes.whole == 2
            hub.close("source_ended", "the source ended")
            got = [event async for event in audio]
        behind = Audio(CHUNK + 40, T0 + 1, frames(CHUNK, CHUNK + 40))
        assert got == [
            Audio(0, T0, first.data),
            GapNotice(position=CHUNK, frames=40),
            behind,
            Audio(last.position, T0 + 2, last.data),
        ]
        assert audio.end is not None
        assert (audio.end.frames, audio.end.lost) == (2 * CHUNK + 7, 40)
        # the task's one write: the gap message, then the chunk behind it
        (batch,) = task_writes
        assert batch[0] == KIND_MESSAGE and batch.endswith(wire_of(behind))

        hub = server.channels.add("tv", "test", FMT).hub
        async with client.listen("tv", frames=CHUNK + 50) as limited:
            await listening(limited)
            hub.publish(frames(CHUNK), T0)
            hub.publish_chunk(Chunk(CHUNK + 100, T0, frames(CHUNK, CHUNK + 100)))
            got = [event async for event in limited]
        assert got == [Audio(0, T0, frames(CHUNK)), GapNotice(position=CHUNK, frames=50)]
        assert limited.end is not None
        assert (limited.end.reason, limited.end.frames, limited.end.lost) == (
            "complete",
            CHUNK,
            50,
        )
        assert len(writes.attempts) == 3  # the first chunk only, the direct way


# ---- 6. stop -------------------------------------------------------------------------------


async def test_a_stop_while_idle_ends_the_listen_and_the_connection_goes_on(
    server: Server, writes: DirectWrites, task_writes: list[bytes]
) -> None:
    hub = server.channels.add("radio", "test", FMT).hub
    async with running(server) as nursery, connected(server, nursery) as client:
        async with client.listen("radio") as audio:
            await listening(audio)
            published = Published()
            for n in (CHUNK, 1, 77):
                published.add(hub, n)
            got = [await audio.__anext__() for _ in range(3)]
            await audio.stop()
            await trio.testing.wait_all_tasks_blocked()  # the server read it; the listen ended
            attempts = len(writes.attempts)
            hub.publish(frames(CHUNK, hub.position), T0)  # for nobody
            rest = [event async for event in audio]
        assert got == published and rest == []
        assert audio.end is not None
        assert (audio.end.reason, audio.end.frames, audio.end.lost) == ("stopped", CHUNK + 78, 0)
        assert len(writes.attempts) == attempts == 3 and task_writes == []
        await trio.testing.wait_all_tasks_blocked()
        assert hub.listeners == 0
        assert [c.name for c in await client.channels()] == ["radio"]  # no stray frame came

        # a stop crossing chunks written directly: what went out before listen_end is counted
        for round_ in range(5):
            async with client.listen("radio") as again:
                await listening(again)
                start = hub.position
                for _ in range(round_):
                    hub.publish(frames(CHUNK, hub.position), T0)
                await again.stop()
                for _ in range(3):  # before the server has read the stop: still direct
                    hub.publish(frames(CHUNK, hub.position), T0)
                got = [event async for event in again]
            assert again.end is not None and again.end.reason == "stopped"
            assert check_cover(got, start) == (again.end.frames, 0)
            assert again.end.frames >= round_ * CHUNK
            assert client._conn.state is State.IDLE
        assert task_writes == []  # all of it went the direct way
        await trio.testing.wait_all_tasks_blocked()
        assert hub.listeners == 0
        assert [c.name for c in await client.channels()] == ["radio"]


# ---- 7. a peer that resets ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_listener_resetting_mid_stream_leaves_quietly_and_others_go_on(
    server: Server, writes: DirectWrites, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """The leaver closes its socket abruptly (TCP: SO_LINGER 0, a reset), with audio unread,
    while the source keeps writing to it directly."""
    caplog.set_level(logging.DEBUG, logger="musiclib")
    hub = server.channels.add("radio", "test", FMT).hub
    published = Published()
    async with (
        running(server) as nursery,
        connected(server, nursery, kind) as stayer,
        connected(server, nursery, kind) as leaver,
    ):
        async with stayer.listen("radio") as kept, leaver.listen("radio") as gone:
            await listening(kept)
            assert hub.listeners == 2
            for _ in range(3):
                published.add(hub, CHUNK)
            assert [await gone.__anext__() for _ in range(2)] == published[:2]
            sock = raw_socket(leaver)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            before = len(writes.results)
            for _ in range(3):  # at once: the direct path meets the dead socket
                published.add(hub, CHUNK)
            failed = [r for r in writes.results[before:] if isinstance(r, OSError)]
            assert [e.errno for e in failed] in (
                [errno.EPIPE],
                [errno.ECONNRESET],
            ), f"the direct write to the dead socket gave {writes.results[before:]}"
            with trio.fail_after(2):
                while hub.listeners > 1 or server.connections > 1:
                    published.add(hub, CHUNK)
                    await trio.sleep(0.002)
            for _ in range(5):
                published.add(hub, CHUNK)
                await trio.sleep(0.002)
            hub.close("source_ended", "the source ended")
            got = [event async for event in kept]
        assert got == published
        assert kept.end is not None
        assert (kept.end.reason, kept.end.frames) == ("source_ended", published.frames)
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert problems == [], [r.getMessage() for r in problems]
    # the hang-up is noticed by the listener's task (its send breaks) or by its watch (the
    # read sees the reset or the end), whichever runs first
    left = [r.getMessage() for r in caplog.records if r.name == "musiclib.server"]
    assert len(left) == 1 and ("connection lost" in left[0] or "hung up" in left[0]), left


# ---- a listener that breaks the protocol ------------------------------------------------------


async def test_a_listener_breaking_the_protocol_cannot_break_the_source(
    server: Server,
    writes: DirectWrites,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A listener sends nonsense while its task waits: its watch fails (its connection is in
    error from then on) and the listen is cancelled, but until its task runs again the
    direct path is still on. A source that runs in that window (a task woken in the same
    batch) publishes: the chunk must neither raise into the source nor skip anybody."""
    caplog.set_level(logging.DEBUG, logger="musiclib")
    hub = server.channels.add("radio", "test", FMT).hub
    published = Published()
    raised: list[Exception] = []
    real_watch = _Listen.watch_for_stop

    async def watch(self: _Listen, scope: trio.CancelScope) -> None:
        try:
            await real_watch(self, scope)
        except RemoteProtocolError:
            try:  # the source, scheduled before this listen's task is cancelled
                published.add(hub, CHUNK)
            except Exception as exc:
                raised.append(exc)
            raise

    monkeypatch.setattr(_Listen, "watch_for_stop", watch)
    async with (
        running(server) as nursery,
        connected(server, nursery) as good,
        connected(server, nursery) as bad,
    ):
        async with good.listen("radio") as kept:
            async with bad.listen("radio") as broken:
                await listening(broken)
                published.add(hub, CHUNK)
                await bad._stream.send_all(HEADER.pack(9, 0))  # a frame of no known kind
                await trio.testing.wait_all_tasks_blocked()
            assert raised == []
            assert len(published) == 2 and not hub.closed
            published.add(hub, CHUNK)
            hub.close("source_ended", "the source ended")
            got = [event async for event in kept]
        assert got == published
        assert kept.end is not None and kept.end.frames == published.frames
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == ["unix: protocol error: unknown frame kind 9"]


async def test_nonsense_from_a_listener_arriving_with_published_audio_ends_nothing_else(
    server: Server, writes: DirectWrites, caplog: pytest.LogCaptureFixture
) -> None:
    """The same without any patch: a publisher's audio and a listener's nonsense arrive in
    the same instant, so the publisher's task and the listener's watch wake in one batch,
    in either order. Whatever the order, the publisher and the other listener go on.
    (Before the fix, about every other round the publisher's connection died with an
    internal error and the channel ended for everybody.)"""
    caplog.set_level(logging.DEBUG, logger="musiclib")
    async with running(server) as nursery:
        for round_ in range(12):
            async with (
                connected(server, nursery) as pub,
                connected(server, nursery) as bad,
                connected(server, nursery) as good,
            ):
                await pub._send(PublishRequest(channel="live", sample_rate=8000, channels=1))
                assert await pub._reply_event() == PublishReady(channel="live")
                async with good.listen("live") as kept:
                    async with bad.listen("live"):
                        await trio.testing.wait_all_tasks_blocked()
                        payload = frames(CHUNK)
                        os.write(
                            raw_socket(pub).fileno(),
                            pub._conn.send_data_header(len(payload)) + payload,
                        )
                        os.write(raw_socket(bad).fileno(), HEADER.pack(9, 0))
                        await trio.testing.wait_all_tasks_blocked()
                    await pub._send(PublishEnd(sent=pub._conn.payload_sent))
                    assert await pub._reply_event() == PublishDone(frames=CHUNK), round_
                    got = [event async for event in kept]
                (first,) = got
                assert isinstance(first, Audio)
                assert first == Audio(0, first.time_ns, frames(CHUNK))
                assert kept.end is not None
                assert (kept.end.reason, kept.end.frames) == ("publisher_left", CHUNK)
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == ["unix: protocol error: unknown frame kind 9"] * 12
