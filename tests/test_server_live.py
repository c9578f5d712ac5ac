"""Live channels through the real server and client shells, over trio.testing streams.

The server's channel registry runs as ``serve()`` runs it; audio enters a channel by
hand (``channels.add(...)`` then ``hub.publish``) or from a publishing client, so
every sample a listener receives can be checked byte for byte, with its position and
its time stamp. Memory streams never block a sender; the tests about listeners that
stop reading use ``lockstep_stream_pair`` (a send waits for the reader) and
pytest-trio's ``autojump_clock``, so a second of audio takes no wall time.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import live_support
import pytest
import trio
import trio.testing
from live_support import check_cover, frames, in_process_server

from musiclib.client import Client
from musiclib.decode import AudioFormat
from musiclib.errors import (
    BadRequest,
    ChannelBusy,
    ConnectionLost,
    LocalProtocolError,
    NotFound,
    ShuttingDown,
    TooSlow,
)
from musiclib.live.hub import Hub
from musiclib.live.requests import CUT_GRACE
from musiclib.protocol import (
    Audio,
    GapNotice,
    ListenRequest,
    PublishReady,
    PublishRequest,
    State,
    encode_message,
)
from musiclib.server import Server

#: 8000 mono s16le frames a second: a frame is 2 bytes; a 20 ms chunk is 160 frames
FMT = AudioFormat("s16le", 8000, 1)
BPF = 2
CHUNK = 160
T0 = 1_700_000_000_000_000_000
#: seconds (real, or virtual on the mock clock) after which a hanging test fails
TIMEOUT = 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with in_process_server(tmp_path, {"song.flac": b"not really audio"}) as server:
        yield server


def running(server: Server) -> AbstractAsyncContextManager[trio.Nursery]:
    return live_support.running(server, TIMEOUT)


@asynccontextmanager
async def connected(
    server: Server, nursery: trio.Nursery, *, version: int = 2, lockstep: bool = False
) -> AsyncIterator[Client]:
    """A handshaken Client talking to ``server.handle`` through an in-memory stream pair."""
    pair = trio.testing.lockstep_stream_pair() if lockstep else trio.testing.memory_stream_pair()
    client_stream, server_stream = pair
    nursery.start_soon(server.handle, server_stream, "memory")
    client = Client(client_stream, timeout=1e6, version=version)
    await client.handshake()
    try:
        yield client
    finally:
        await client.aclose()


async def run_source(hub: Hub, count: int, size: int = CHUNK, close: bool = True) -> bytes:
    """Publish ``count`` chunks one every 20 ms, as a live source would; returns the audio."""
    sent = b""
    for _ in range(count):
        data = frames(size, hub.position)
        hub.publish(data)
        sent += data
        await trio.sleep(0.02)
    if close:
        hub.close("source_ended", "the source ended")
    return sent


# ---- channels and listening -------------------------------------------------------------


async def test_channels_lists_every_channel(server: Server) -> None:
    radio = server.channels.add("radio", "test:radio", FMT)
    server.channels.add("tv", "test:tv", AudioFormat("s16le", 48000, 2))
    radio.hub.publish(frames(CHUNK))
    async with running(server) as nursery, connected(server, nursery) as client:
        channels = await client.channels()
        assert [c.name for c in channels] == ["radio", "tv"]
        first, second = channels
        assert (first.source, first.state, first.position, first.listeners) == (
            "test:radio",
            "live",
            CHUNK,
            0,
        )
        assert (first.sample_format, first.sample_rate, first.channels) == ("s16le", 8000, 1)
        assert (second.state, second.sample_rate, second.channels) == ("waiting", 48000, 2)
        async with connected(server, nursery) as listener, listener.listen("radio"):
            (now_radio, _) = await client.channels()
            assert now_radio.listeners == 1
            radio.hub.close("source_ended", "over")
        (ended, _) = await client.channels()
        assert (ended.state, ended.listeners) == ("ended", 0)


async def test_listen_gets_exactly_the_published_samples(server: Server) -> None:
    hub = server.channels.add("radio", "test", FMT).hub
    hub.publish(frames(CHUNK))  # before the listener: not for it (no preroll asked)
    async with running(server) as nursery, connected(server, nursery) as client:
        async with client.listen("radio") as audio:
            assert audio.start is not None
            start = audio.start
            assert (start.channel, start.position, start.preroll) == ("radio", CHUNK, 0)
            assert (start.sample_format, start.sample_rate, start.channels) == ("s16le", 8000, 1)
            assert not start.converted and start.source == "test"
            sizes = [CHUNK, 1, 333, CHUNK]
            expected = []
            for i, n in enumerate(sizes):
                chunk = hub.publish(frames(n, hub.position), T0 + i)
                expected.append(Audio(chunk.position, T0 + i, chunk.data))
            hub.close("source_ended", "the source ended")
            got = [event async for event in audio]
        assert got == expected
        assert audio.end is not None
        assert (audio.end.reason, audio.end.frames, audio.end.lost) == (
            "source_ended",
            sum(sizes),
            0,
        )
        assert client._conn.state is State.IDLE
        assert [c.name for c in await client.channels()] == ["radio"]  # still usable
    assert hub.listeners == 0


async def test_listen_with_frames_ends_complete_with_the_exact_count(server: Server) -> None:
    hub = server.channels.add("radio", "test", FMT).hub
    async with running(server) as nursery, connected(server, nursery) as client:
        async with client.listen("radio", frames=250) as audio:
            for _ in range(4):
                hub.publish(frames(100, hub.position), T0)
            got = [event async for event in audio]
        assert [len(e.payload) // BPF for e in got if isinstance(e, Audio)] == [100, 100, 50]
        assert check_cover(got, 0) == (250, 0)
        assert audio.end is not None
        assert (audio.end.reason, audio.end.frames) == ("complete", 250)
        # and with a preroll: the last 25 ms (200 frames) of history first, then live
        async with client.listen("radio", frames=300, preroll_ms=25) as audio:
            assert audio.start is not None
            assert (audio.start.position, audio.start.preroll) == (200, 200)
            hub.publish(frames(100, hub.position), T0)
            got = [event async for event in audio]
        assert check_cover(got, 200) == (300, 0)
        assert audio.end is not None and audio.end.reason == "complete"
    assert hub.listeners == 0


async def test_stop_ends_the_listen_with_reason_stopped(server: Server) -> None:
    hub = server.channels.add("radio", "test", FMT).hub
    async with running(server) as nursery, connected(server, nursery) as client:
        async with client.listen("radio") as audio:
            hub.publish(frames(CHUNK), T0)
            got = [await audio.__anext__()]
            await audio.stop()
            await audio.stop()  # once is enough; a second call sends nothing
            hub.publish(frames(CHUNK, CHUNK), T0)  # may or may not make it before the end
            got += [event async for event in audio]
        assert audio.end is not None and audio.end.reason == "stopped"
        audio_frames, _ = check_cover(got, 0)
        assert audio.end.frames == audio_frames >= CHUNK
        await trio.testing.wait_all_tasks_blocked()
        assert hub.listeners == 0
        assert len(await client.channels()) == 1


async def test_a_stop_crossing_the_end_of_a_listen_is_ignored(server: Server) -> None:
    hub = server.channels.add("radio", "test", FMT).hub
    async with running(server) as nursery, connected(server, nursery) as client:
        async with client.listen("radio", frames=CHUNK) as audio:
            hub.publish(frames(CHUNK), T0)
            await trio.testing.wait_all_tasks_blocked()  # listen_end is on its way
            first = await audio.__anext__()
            assert client._conn.state is State.LISTENING  # not read yet
            await audio.stop()  # crosses listen_end on the wire
            rest = [event async for event in audio]
        assert first == Audio(0, T0, frames(CHUNK)) and rest == []
        assert audio.end is not None and audio.end.reason == "complete"
        assert len(await client.channels()) == 1  # the server ignored the late stop
        async with client.listen("radio", frames=1) as again:
            hub.publish(frames(5, CHUNK), T0)
            assert [e async for e in again] == [Audio(CHUNK, T0, frames(1, CHUNK))]


async def test_an_unknown_channel_is_not_found_and_the_connection_goes_on(
    server: Server,
) -> None:
    server.channels.add("radio", "test", FMT)
    async with running(server) as nursery, connected(server, nursery) as client:
        with pytest.raises(NotFound, match="channels: radio"):
            async with client.listen("nowhere"):
                pass
        assert client._conn.state is State.IDLE
        assert [c.name for c in await client.channels()] == ["radio"]


async def test_a_listener_hanging_up_frees_its_subscription(server: Server) -> None:
    hub = server.channels.add("radio", "test", FMT).hub
    async with running(server) as nursery:
        async with connected(server, nursery) as client, client.listen("radio") as audio:
            hub.publish(frames(CHUNK))
            await audio.__anext__()
            assert hub.listeners == 1
            # leaving the block mid-listen closes the connection
        await trio.testing.wait_all_tasks_blocked()
        assert hub.listeners == 0
        assert server.connections == 0
        hub.publish(frames(CHUNK, CHUNK))  # the source goes on


# ---- listeners that fall behind ----------------------------------------------------------


async def test_a_listener_that_stops_reading_gets_exact_gaps(
    server: Server, autojump_clock: object
) -> None:
    hub = server.channels.add("radio", "test", FMT).hub
    async with running(server) as nursery:
        async with (
            connected(server, nursery, lockstep=True) as client,
            client.listen("radio", max_latency_ms=50) as audio,  # 400 frames
        ):
            nursery.start_soon(run_source, hub, 100)  # 2 s of audio
            await trio.sleep(1.0)  # reads nothing for a second
            got = [event async for event in audio]
        assert audio.end is not None and audio.end.reason == "source_ended"
        gaps = [e for e in got if isinstance(e, GapNotice)]
        assert gaps, "a listener that stopped reading lost nothing"
        audio_frames, lost = check_cover(got, 0)
        assert audio_frames + lost == 100 * CHUNK
        assert (audio.end.frames, audio.end.lost) == (audio_frames, lost)
        assert lost >= 0.5 * 8000  # about a second, less its backlog


async def test_a_listener_that_stays_behind_is_cut_as_too_slow(
    server: Server, autojump_clock: object
) -> None:
    server.config.lag_limit = 0.5
    hub = server.channels.add("radio", "test", FMT).hub
    async with running(server) as nursery:
        async with connected(server, nursery, lockstep=True) as client:
            nursery.start_soon(run_source, hub, 150, CHUNK, False)  # 3 s, never closed
            got: list[Audio | GapNotice] = []
            with pytest.raises(TooSlow, match="fell behind"):
                async with client.listen("radio", max_latency_ms=50) as audio:
                    # reads nothing for longer than the lag limit, then again within the
                    # grace a cut listener gets to take the frame it is stuck in
                    await trio.sleep(0.2 + CUT_GRACE)
                    async for event in audio:
                        got.append(event)
            assert got and all(isinstance(e, Audio) for e in got)
            assert client._conn.state is State.IDLE
            (radio,) = await client.channels()  # the connection is still usable
            assert radio.listeners == 0 and radio.state == "live"
        assert hub.listeners == 0


async def test_a_listener_stuck_mid_frame_past_the_grace_is_closed(
    server: Server, autojump_clock: object
) -> None:
    """Cut while the server is stuck writing a frame to it, and still not reading after
    the grace: the connection is closed (half a frame cannot be taken back)."""
    server.config.lag_limit = 0.5
    hub = server.channels.add("radio", "test", FMT).hub
    async with running(server) as nursery:
        async with connected(server, nursery, lockstep=True) as client:
            nursery.start_soon(run_source, hub, 150, CHUNK, False)
            with pytest.raises(ConnectionLost):
                async with client.listen("radio", max_latency_ms=50) as audio:
                    await trio.sleep(1.0 + CUT_GRACE)
                    async for _ in audio:
                        pass
        assert hub.listeners == 0


async def test_a_listener_with_a_latency_below_one_chunk_gets_all_audio(
    server: Server, autojump_clock: object
) -> None:
    """max_latency_ms=1 on a channel of 20 ms chunks: every chunk still arrives whole."""
    server.config.lag_limit = 0.5
    hub = server.channels.add("radio", "test", FMT).hub
    async with running(server) as nursery, connected(server, nursery) as client:
        async with client.listen("radio", max_latency_ms=1) as audio:
            nursery.start_soon(run_source, hub, 100)  # 2 s: far beyond the lag limit
            got = [event async for event in audio]
        assert audio.end is not None and audio.end.reason == "source_ended"
        assert check_cover(got, 0) == (100 * CHUNK, 0)


# ---- publishing --------------------------------------------------------------------------


async def test_publish_from_one_client_and_listen_from_another(server: Server) -> None:
    sent = frames(4000)
    pieces = [sent[:1], sent[1:333], sent[333:4001], sent[4001:7999], sent[7999:]]  # straddling
    received: list[Audio | GapNotice] = []
    subscribed = trio.Event()
    begun = time.time_ns()
    async with (
        running(server) as nursery,
        connected(server, nursery) as pub,
        connected(server, nursery) as lis,
    ):

        async def listen() -> None:
            async with lis.listen("live") as audio:
                subscribed.set()
                async for event in audio:
                    received.append(event)
            assert audio.end is not None
            assert (audio.end.reason, audio.end.frames) == ("publisher_left", 4000)
            assert "the publisher ended" in audio.end.message

        async with trio.open_nursery() as listening:
            async with pub.publish("live", sample_rate=8000, channels=1, source="t") as p:
                (info,) = await lis.channels()
                assert (info.name, info.source, info.state) == ("live", "publish:t", "waiting")
                listening.start_soon(listen)
                await subscribed.wait()
                for piece in pieces:
                    await p.send(piece)
                assert p.sent == len(sent)
            # leaving the block sent publish_end and got the server's count
            assert p.done is not None and p.done.frames == 4000
        assert "live" not in server.channels  # the name is free again
        async with pub.publish("live", sample_rate=8000, channels=1) as again:
            await again.send(frames(10))
        assert again.done is not None and again.done.frames == 10
    assert check_cover(received, 0) == (4000, 0)
    assert b"".join(e.payload for e in received if isinstance(e, Audio)) == sent
    assert all(begun <= e.time_ns <= time.time_ns() for e in received)
    # a burst is forwarded in live-sized chunks (20 ms: 160 frames), not as it arrived
    assert max(len(e.payload) for e in received if isinstance(e, Audio)) == CHUNK * BPF


async def test_a_second_publisher_gets_channel_busy(server: Server) -> None:
    async with running(server) as nursery:
        async with connected(server, nursery) as first, connected(server, nursery) as second:
            async with first.publish("live", sample_rate=8000, channels=1) as publisher:
                with pytest.raises(ChannelBusy, match="a publisher"):
                    async with second.publish("live", sample_rate=16000, channels=2):
                        pass
                assert second._conn.state is State.IDLE
                (info,) = await second.channels()  # the second connection goes on
                assert (info.name, info.sample_rate, info.channels) == ("live", 8000, 1)
                await publisher.send(frames(10))
            assert first._conn.state is second._conn.state is State.IDLE
        configured = server.channels.add("radio", "mic", FMT)
        async with connected(server, nursery) as third:
            with pytest.raises(ChannelBusy, match="its source is mic"):
                async with third.publish("radio", sample_rate=8000, channels=1):
                    pass
        assert server.channels.get("radio") is configured


async def _raw_publish(client: Client, channel: str) -> None:
    """Start a publish through the client's protocol object, to leave it at will."""
    await client._send(PublishRequest(channel=channel, sample_rate=8000, channels=1))
    assert await client._reply_event() == PublishReady(channel=channel)


async def _raw_send(client: Client, data: bytes) -> None:
    await client._send_bytes(client._conn.send_data_header(len(data)) + data)


async def test_the_publisher_hanging_up_ends_the_channel(server: Server) -> None:
    async with (
        running(server) as nursery,
        connected(server, nursery) as pub,
        connected(server, nursery) as lis,
    ):
        await _raw_publish(pub, "live")
        async with lis.listen("live") as audio:
            await _raw_send(pub, frames(100) + b"\x00")  # and half a frame
            first = await audio.__anext__()
            await pub.aclose()  # gone without publish_end
            rest = [event async for event in audio]
        assert [first, *rest] == [Audio(0, first.time_ns, frames(100))]
        assert audio.end is not None
        assert (audio.end.reason, audio.end.frames) == ("publisher_left", 100)
        assert "disconnected" in audio.end.message
        assert await lis.channels() == ()  # the channel is gone
    assert server.connections == 0


async def test_stop_ends_listens_with_shutdown_and_publishes_with_an_error(
    server: Server,
) -> None:
    hub = server.channels.add("radio", "test", FMT).hub
    async with (
        running(server) as nursery,
        connected(server, nursery) as lis,
        connected(server, nursery) as pub,
        connected(server, nursery) as idle,
    ):
        published: list[int] = []

        async def publish() -> None:
            with pytest.raises(ShuttingDown):  # the block is interrupted at once
                async with pub.publish("live", sample_rate=8000, channels=1) as publisher:
                    await publisher.send(frames(10))
                    published.append(publisher.sent)
                    await trio.sleep_forever()  # a publisher with nothing more to say

        async with trio.open_nursery() as publishing:
            publishing.start_soon(publish)
            async with lis.listen("radio") as audio:
                hub.publish(frames(CHUNK), T0)
                assert await audio.__anext__() == Audio(0, T0, frames(CHUNK))
                await trio.testing.wait_all_tasks_blocked()
                assert published == [20]
                server.stop()
                assert [event async for event in audio] == []
        assert audio.end is not None
        assert (audio.end.reason, audio.end.frames) == ("shutdown", CHUNK)
        assert audio.end.message == "the server is shutting down"
        assert pub._conn.state is State.IDLE  # the client settled with publish_end
        for client in (lis, pub, idle):  # and the server closes every connection
            with pytest.raises(ConnectionLost):
                await client._reply_event()
    assert server.connections == 0


# ---- versions ------------------------------------------------------------------------------


async def test_a_v1_client_gets_bad_request_for_listen_and_goes_on(server: Server) -> None:
    server.channels.add("radio", "test", FMT)
    async with running(server) as nursery, connected(server, nursery, version=1) as client:
        assert client.welcome is not None and client.welcome.version == 1
        with pytest.raises(LocalProtocolError, match="version 2"):
            await client.channels()  # refused before anything is sent
        assert client._conn.state is State.IDLE
        # what an older client would send anyway
        await client._stream.send_all(encode_message(ListenRequest(channel="radio")))
        with pytest.raises(BadRequest, match="unknown message type 'listen'"):
            await client._reply_event()
        tracks, end = await client.list()
        assert [t.path for t in tracks] == ["song.flac"] and end.count == 1


async def test_a_v2_client_gets_a_v2_welcome_and_file_requests_still_work(server: Server) -> None:
    async with running(server) as nursery, connected(server, nursery) as client:
        assert client.welcome is not None and client.welcome.version == 2
        async with client.stream("song") as stream:
            data = b"".join([chunk async for chunk in stream])
        assert data == b"not really audio"


# ---- the CLI's listen across reconnections ------------------------------------------------


class _CollectingSink:
    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, data: bytes) -> bool:
        self.data += data
        return True

    async def close(self) -> None:
        pass


async def _reconnecting_listen(
    server: Server, nursery: trio.Nursery, *, cut_after: int, between: Any
) -> tuple[_CollectingSink, Any]:
    """``liveclient.listen`` of channel radio for 2 s of positions through connections
    to ``server``; the first one is cut (its server side closed) after ``cut_after``
    bytes have reached the client, then ``between()`` runs before the reconnection."""
    from musiclib import liveclient

    sink = _CollectingSink()
    made = 0

    @asynccontextmanager
    async def connect() -> AsyncIterator[Client]:
        nonlocal made
        made += 1
        client_stream, server_stream = trio.testing.memory_stream_pair()
        if made == 1:
            passed = 0
            receive = client_stream.receive_some

            async def cutting_receive(max_bytes: int | None = None) -> bytes:
                nonlocal passed
                data = await receive(max_bytes)
                passed += len(data)
                if passed > cut_after:
                    await between()
                    raise trio.BrokenResourceError("cut by the test")
                return bytes(data)

            client_stream.receive_some = cutting_receive  # type: ignore[method-assign]
        nursery.start_soon(server.handle, server_stream, f"memory-{made}")
        client = Client(client_stream, timeout=1e6, version=2)
        await client.handshake()
        try:
            yield client
        finally:
            await client.aclose()

    @asynccontextmanager
    async def open_sink(fmt: AudioFormat, total: int | None) -> AsyncIterator[_CollectingSink]:
        assert total == 2 * FMT.sample_rate
        yield sink

    options = liveclient.ListenOptions(duration=2.0, sample_rate=FMT.sample_rate)
    stats = await liveclient.listen(connect, "radio", options, open_sink, retry_delays=[0.1])
    assert made == 2
    return sink, stats


async def test_a_reconnected_listen_skips_what_it_has_and_misses_nothing(
    server: Server, autojump_clock: object
) -> None:
    hub = server.channels.add("radio", "test", FMT).hub
    async with running(server) as nursery:

        async def nothing() -> None:
            await trio.sleep(0.3)  # away for a while: the preroll must cover it

        nursery.start_soon(run_source, hub, 200)
        await trio.sleep(0.5)
        sink, stats = await _reconnecting_listen(server, nursery, cut_after=3000, between=nothing)
    start = int.from_bytes(sink.data[:2], "little")
    assert bytes(sink.data) == frames(2 * FMT.sample_rate, start)  # every position once
    assert stats.lost == 0 and stats.frames == 2 * FMT.sample_rate


async def test_a_channel_started_anew_while_away_continues_from_its_new_start(
    server: Server, autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    channels = server.channels
    first = channels.add("radio", "test", FMT)
    async with running(server) as nursery:

        async def restart() -> None:  # the channel's run ends; a new one takes the name
            channels.remove(first)
            nursery.start_soon(run_source, channels.add("radio", "test", FMT).hub, 200)
            await trio.sleep(0.2)

        nursery.start_soon(run_source, first.hub, 200, CHUNK, False)
        await trio.sleep(0.5)
        sink, stats = await _reconnecting_listen(server, nursery, cut_after=3000, between=restart)
    got = bytes(sink.data)
    before = int.from_bytes(got[:2], "little")
    # the first run's frames up to the cut, then the new run from its own start (its
    # preroll covers the 0.2 s it ran before the reconnection), no hole reported
    cut = next(i for i in range(0, len(got), 2) if got[i : i + 2] == frames(1, 0) and i)
    assert got[:cut] == frames(cut // 2, before)
    assert got[cut:] == frames((len(got) - cut) // 2, 0)
    assert len(got) == 2 * FMT.sample_rate * BPF and stats.lost == 0
    assert "started anew" in caplog.text
