"""Relays (``--channel NAME=relay:HOST:PORT[/CHANNEL]``): parsing, the position mapping, and
end to end with real servers on 127.0.0.1.

The origin's channel is published by the test itself with numbered samples
(:func:`live_support.frames`: each frame's value is its position, plus a base
that tells one origin run from another), paced in real time, so any listener
anywhere in a chain can check that every frame it got is the one its position
names: identical audio, identical positions, no duplicate and no hole but the
gaps it was told about.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import STARTUP_TIMEOUT, ServerProcess
from live_support import (
    IO_TIMEOUT,
    POLL,
    Heard,
    channel_infos,
    frames,
    hear,
    run_cli_async,
    wait_for_channel,
)

from musiclib.client import open_client
from musiclib.decode import AudioFormat
from musiclib.errors import MusiclibError, UsageError
from musiclib.live.channels import channel_format, parse_channel
from musiclib.live.hub import Chunk, Gap, Hub
from musiclib.live.relay import DEFAULT_LATENCY_MS, RelayMapping
from musiclib.protocol import Audio, GapNotice, ListenStart

RATE = 16000
#: frames in one published chunk (20 ms), the origin's chunk size too
CHUNK = RATE // 50
FMT = AudioFormat("s16le", RATE, 1)
#: a test whose servers and listens hang fails after this many seconds
TEST_TIMEOUT = 90.0


# ============================================================================ parsing


def test_a_relay_spec_names_its_origin_and_its_channel() -> None:
    spec = parse_channel("kitchen=relay:10.0.0.5:7650")
    assert (spec.kind, spec.description) == ("relay", "relay:10.0.0.5:7650/kitchen")
    assert spec.relay is not None
    assert (spec.relay.host, spec.relay.port, spec.relay.channel) == ("10.0.0.5", 7650, "kitchen")
    assert spec.relay.max_latency_ms == DEFAULT_LATENCY_MS and not spec.relay.tls

    spec = parse_channel("hall=relay:[::1]:7651/mic?rate=16000&channels=1&latency=250&tls=1")
    assert spec.description == "relay:[::1]:7651/mic"
    assert spec.relay is not None
    assert (spec.relay.host, spec.relay.port, spec.relay.channel) == ("::1", 7651, "mic")
    assert (spec.relay.max_latency_ms, spec.relay.tls) == (250, True)
    assert channel_format(spec) == AudioFormat("s16le", 16000, 1)

    spec = parse_channel("a=relay:origin.lan:7650/b?token-file=/etc/t&cafile=/etc/ca.pem")
    assert spec.relay is not None
    assert (spec.relay.token_file, spec.relay.cafile, spec.relay.tls) == (
        "/etc/t",
        "/etc/ca.pem",
        True,
    )
    assert "token" not in repr(spec).replace("token_file", "")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("a=relay:", "needs an argument"),
        ("a=relay:origin", "expected HOST:PORT"),
        ("a=relay:origin:notaport", "expected HOST:PORT"),
        ("a=relay:origin:70000", "1-65535"),
        ("a=relay:origin:7650/bad name", "a channel name is"),
        ("a=relay:origin:7650?latency=0", "latency is 1..60000"),
        ("a=relay:origin:7650?tls=yes", "tls is 1"),
        ("a=relay:origin:7650?colour=blue", "bad option 'colour'"),
        ("a=relay:origin:7650?rate", "bad option 'rate'"),
        ("a=relay:origin:7650?rate=fast", "whole numbers"),
    ],
)
def test_a_bad_relay_spec_is_a_usage_error_saying_why(text: str, says: str) -> None:
    with pytest.raises(UsageError, match="--channel") as caught:
        parse_channel(text)
    assert says in str(caught.value)


def test_a_relay_without_a_known_format_names_the_fix() -> None:
    spec = parse_channel("a=relay:origin:7650")
    with pytest.raises(UsageError, match=r"\?rate=R&channels=C"):
        channel_format(spec)


# ============================================================================ the mapping


def _start(position: int, epoch: int) -> ListenStart:
    return ListenStart(
        channel="mic",
        sample_format="s16le",
        sample_rate=RATE,
        channels=1,
        position=position,
        preroll=0,
        epoch=epoch,
    )


def _audio(position: int, n: int = CHUNK, *, t: int = 0, base: int = 0) -> Audio:
    return Audio(position, t or 10**18 + position * 10**9 // RATE, frames(n, base + position))


async def test_the_mapping_mirrors_resumes_and_measures_a_restart() -> None:
    """Sans-IO: adopt the origin's numbering, skip what a resumed listen repeats, leave the
    origin's gaps in place, and turn a new origin run into a gap measured from the stamps."""
    hub = Hub(FMT)
    mapping = RelayMapping(hub)
    assert mapping.begin(_start(5000, epoch=7)) == "mirroring"
    assert (hub.position, hub.epoch) == (5000, 7)
    with hub.subscribe(max_backlog_frames=10**6) as sub:
        mapping.audio(_audio(5000))
        mapping.gap(GapNotice(5000 + CHUNK, CHUNK))  # the origin lost a chunk for us
        mapping.audio(_audio(5000 + 2 * CHUNK))
        # the connection drops; the same run again, with a preroll that repeats a chunk
        assert mapping.begin(_start(5000 + 2 * CHUNK, epoch=7)) == "resumed"
        mapping.audio(_audio(5000 + 2 * CHUNK))
        mapping.audio(_audio(5000 + 3 * CHUNK + CHUNK // 2, CHUNK // 2))  # a hole while away
        last = hub.last_time_ns
        # the origin restarts: 1.5 s later its first chunk (stamped at its last frame)
        assert mapping.begin(_start(0, epoch=8)) == "new run"
        mapping.audio(_audio(0, t=last + 1_500_000_000 + CHUNK * 10**9 // RATE, base=40000))
        mapping.audio(_audio(CHUNK, t=last + 1_500_000_000 + 2 * CHUNK * 10**9 // RATE, base=40000))
        got = []
        while isinstance(item := sub.next_nowait(), (Chunk, Gap)):
            got.append(item)
    end_old = 5000 + 4 * CHUNK
    kinds = [
        (type(i).__name__, i.position, len(i.data) // 2 if isinstance(i, Chunk) else i.frames)
        for i in got
    ]
    assert kinds == [
        ("Chunk", 5000, CHUNK),
        ("Gap", 5000 + CHUNK, CHUNK),
        ("Chunk", 5000 + 2 * CHUNK, CHUNK),
        ("Gap", 5000 + 3 * CHUNK, CHUNK // 2),
        ("Chunk", 5000 + 3 * CHUNK + CHUNK // 2, CHUNK // 2),
        ("Gap", end_old, RATE * 3 // 2),
        ("Chunk", end_old + RATE * 3 // 2, CHUNK),
        ("Chunk", end_old + RATE * 3 // 2 + CHUNK, CHUNK),
    ]
    assert hub.epoch == 7, "a relay keeps its numbering when its origin starts anew"
    new = [i for i in got if isinstance(i, Chunk) and i.position >= end_old]
    assert new[0].data == frames(CHUNK, 40000) and new[1].data == frames(CHUNK, 40000 + CHUNK)


async def test_a_relay_heard_before_it_connects_keeps_its_own_numbering() -> None:
    """A listener told "position 0" while the relay waited must not get a hole of the
    origin's whole past: the relay keeps its numbering, offset from the origin's."""
    hub = Hub(FMT)
    with hub.subscribe(max_backlog_frames=10**6) as sub:
        mapping = RelayMapping(hub)
        assert mapping.begin(_start(123_456, epoch=7)) == "new run"
        mapping.audio(_audio(123_456))
        item = sub.next_nowait()
    assert isinstance(item, Chunk) and (item.position, item.data) == (0, frames(CHUNK, 123_456))
    assert hub.epoch != 7


def test_the_hub_refuses_a_new_numbering_once_in_use() -> None:
    hub = Hub(FMT)
    hub.publish(frames(CHUNK))
    assert not hub.start_at(1000, 1)
    assert hub.position == CHUNK
    fresh = Hub(FMT)
    with fresh.subscribe(max_backlog_frames=1):
        assert not fresh.start_at(1000, 1)
    assert fresh.start_at(1000, 1) and (fresh.position, fresh.epoch) == (1000, 1)


# ============================================================================ end to end


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_on(root: Path, port: int, *args: str) -> Iterator[ServerProcess]:
    """``musiclib serve`` on a fixed port (a restarted origin comes back where it was)."""
    argv = [sys.executable, "-m", "musiclib", "serve", "--root", str(root), "--port", str(port)]
    argv += ["--index", str(root.parent / f"index-{port}.db"), "--log-level", "debug", *args]
    server = ServerProcess.start(argv)
    try:
        server.wait_for_log(r"listening on 127\.0\.0\.1:\d+", timeout=STARTUP_TIMEOUT)
        server.port, server.address = port, f"127.0.0.1:{port}"
        yield server
    finally:
        status = server.stop()
    assert status == 0, f"server exited with status {status}; log:\n{server.log()}"
    assert "Traceback" not in server.log(), server.log()


class Feeder:
    """Publishes numbered 20 ms chunks (value = ``base`` + position) in real time until
    cancelled or until the origin goes away; remembers when it sent what."""

    def __init__(self, address: str, base: int = 0) -> None:
        self.address = address
        self.base = base
        self.sent = 0

    async def run(self) -> None:
        try:
            async with (
                open_client(self.address, timeout=IO_TIMEOUT, version=2) as client,
                client.publish("mic", sample_rate=RATE, channels=1) as pub,
            ):
                start = trio.current_time()
                while True:
                    await pub.send(frames(CHUNK, self.base + self.sent))
                    self.sent += CHUNK
                    await trio.sleep_until(start + self.sent / RATE)
        except MusiclibError:  # the origin stopped under us: the test's doing
            pass


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Awaitable[ServerProcess]]]:
    """``await servers(port, *args)``: a server on ``port`` over an empty root, started in a
    thread (the test's publishers keep their pace meanwhile), stopped after the test."""
    root = tmp_path / "root"
    root.mkdir()
    with ExitStack() as stack:

        async def start(port: int, *args: str) -> ServerProcess:
            return await trio.to_thread.run_sync(
                lambda: stack.enter_context(server_on(root, port, *args))
            )

        yield start


async def wait_live(address: str, name: str) -> None:
    """Poll ``channels`` until ``name`` is ``live``."""
    while True:
        info = (await channel_infos(address)).get(name)
        if info is not None and info.state == "live":
            return
        await trio.sleep(POLL)


class Listens(dict[str, Heard]):
    """The listens of a test by name; :meth:`ended` waits for some of them to end (then
    the publishers may be cancelled)."""

    def __init__(self) -> None:
        super().__init__()
        self._ended: collections.defaultdict[str, trio.Event] = collections.defaultdict(trio.Event)

    async def run(self, key: str, address: str, channel: str, **request: Any) -> None:
        self[key] = await hear(address, channel, **request)
        self._ended[key].set()

    async def ended(self, *keys: str) -> None:
        for key in keys:
            await self._ended[key].wait()


def check_numbered(heard: Heard, base: int = 0) -> int:
    """Every chunk holds the frames its position names (value = ``base`` + position), from
    the start's position on, each once, gaps only as told; the audio frames heard."""
    heard.assert_contiguous()
    for chunk in heard.chunks:
        n = len(chunk.payload) // 2
        assert chunk.payload == frames(n, base + chunk.position), f"at {chunk.position}"
    return sum(len(c.payload) // 2 for c in heard.chunks)


async def test_a_chain_of_relays_hears_the_origins_samples_at_its_positions(servers):
    """origin -> relay -> relay (formats asked of each origin at start): listeners at each
    hop hear the same samples at the same positions, in the origin's epoch, contiguous."""
    with trio.fail_after(TEST_TIMEOUT):
        origin = await servers(free_port())
        feeder = Feeder(origin.address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feeder.run)
            await wait_for_channel(origin.address, "mic", position=CHUNK)
            relay = await servers(free_port(), "--channel", f"mic=relay:{origin.address}")
            relay2 = await servers(free_port(), "--channel", f"hall=relay:{relay.address}/mic")
            await wait_live(relay2.address, "hall")
            stop = trio.Event()
            heard = Listens()
            where = {"origin": (origin, "mic"), "relay": (relay, "mic"), "relay2": (relay2, "hall")}

            async def listen(key: str, joined: trio.Event) -> None:
                server, name = where[key]
                await heard.run(key, server.address, name, until=stop, joined=joined)

            for key in where:
                joined = trio.Event()
                nursery.start_soon(listen, key, joined)
                await joined.wait()
            await trio.sleep(1.0)
            stop.set()
            infos = {key: (await channel_infos(s.address))[n] for key, (s, n) in where.items()}
            await heard.ended(*where)
            nursery.cancel_scope.cancel()
    for key, one in heard.items():
        assert one.end is not None and one.end.reason == "stopped", (key, one.end)
        assert check_numbered(one) >= RATE // 2, key
        assert one.gaps == [], (key, one.gaps[:3])
    assert heard["relay"].start.epoch == heard["relay2"].start.epoch == heard["origin"].start.epoch
    assert (infos["relay"].source, infos["relay2"].source) == (
        f"relay:{origin.address}/mic",
        f"relay:{relay.address}/mic",
    )
    for info in infos.values():
        assert (info.sample_format, info.sample_rate, info.channels) == ("s16le", RATE, 1)
        assert info.state == "live"
    # the same positions everywhere: a listener of one relay could go on at another
    at_origin = {c.position for c in heard["origin"].chunks}
    assert at_origin & {c.position for c in heard["relay2"].chunks}, (
        "the listeners heard no position in common"
    )


async def test_a_relay_outlives_its_origins_restart_with_a_gap_of_the_time_away(servers):
    """The origin stopped and started anew on its port: the relay's listener hears the old
    run, one gap exactly as long as the time between the old run's last frame and the new
    run's first (from the origin's stamps), then the new run, and no error; the relay logs
    each state once, not each attempt."""
    port = free_port()
    heard = Listens()
    with trio.fail_after(TEST_TIMEOUT):
        origin = await servers(port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Feeder(origin.address).run)
            await wait_for_channel(origin.address, "mic", position=CHUNK)
            relay = await servers(
                free_port(), "--channel", f"mic=relay:127.0.0.1:{port}?rate={RATE}&channels=1"
            )
            await wait_live(relay.address, "mic")
            stop = trio.Event()

            async def listen(key: str, address: str, joined: trio.Event, **request: Any) -> None:
                await heard.run(key, address, "mic", joined=joined, **request)

            for key, address, request in [
                # a latency bound that takes the new run's first seconds, which the relay
                # gets as one burst (its preroll) when it reconnects
                ("relay", relay.address, {"until": stop, "max_latency_ms": 10_000}),
                ("old", origin.address, {}),  # to its end: the origin's shutdown
            ]:
                joined = trio.Event()
                nursery.start_soon(functools.partial(listen, key, address, joined, **request))
                await joined.wait()
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(origin.stop)
            down = trio.current_time()
            await trio.sleep(1.0)
            origin2 = await servers(port)
            up = trio.current_time()  # before the new run's first frame
            nursery.start_soon(Feeder(origin2.address, base=30000).run)
            joined = trio.Event()
            request = {"until": stop, "retry": True, "preroll_ms": 10_000}
            nursery.start_soon(functools.partial(listen, "new", origin2.address, joined, **request))
            await joined.wait()
            await heard.ended("old")
            await wait_for_channel(relay.address, "mic", position=heard["old"].stop_position + RATE)
            await trio.sleep(0.5)
            stop.set()
            await heard.ended("relay", "old", "new")
            nursery.cancel_scope.cancel()
    old, new, got = heard["old"], heard["new"], heard["relay"]
    assert old.end is not None and old.end.reason == "shutdown"
    assert new.chunks[0].position == 0, "the new run's first chunk"
    assert got.end is not None and got.end.reason == "stopped", got.end
    assert len(got.gaps) == 1, got.gaps
    gap = got.gaps[0]
    first_new = new.chunks[0]
    elapsed = round((first_new.time_ns - old.chunks[-1].time_ns) * RATE / 1e9)
    expected = elapsed - len(first_new.payload) // 2
    assert gap.position == old.stop_position, "the gap starts after the old run's last frame"
    assert abs(gap.frames - expected) <= CHUNK, (gap.frames, expected)
    assert gap.frames >= (up - down) * RATE - 2 * CHUNK, "shorter than the time it was down"
    at = got.events.index(gap)
    before = Heard(got.start, got.events[:at])
    after = Heard(got.start, got.events[at + 1 :])
    assert before.gaps == []
    assert check_numbered(before) >= RATE // 4  # the old run, at the origin's own positions
    resumed = gap.position + gap.frames
    assert after.chunks[0].position == resumed
    after = Heard(dataclasses.replace(got.start, position=resumed), after.events)
    assert after.gaps == []
    assert check_numbered(after, base=30000 - resumed) >= RATE // 2  # the new run, from its start
    log = relay.log()
    assert log.count("the origin's channel ended (shutdown)") == 1, log
    assert log.count("cannot connect") <= 1, log
    assert log.count("relaying, in") == 2, log


async def test_a_relay_whose_origin_is_down_waits_and_connects_when_it_appears(servers):
    port = free_port()
    with trio.fail_after(TEST_TIMEOUT):
        relay = await servers(
            free_port(), "--channel", f"mic=relay:127.0.0.1:{port}/mic?rate={RATE}&channels=1"
        )
        info = (await channel_infos(relay.address))["mic"]
        assert (info.state, info.source, info.sample_rate, info.channels) == (
            "waiting",
            f"relay:127.0.0.1:{port}/mic",
            RATE,
            1,
        )
        origin = await servers(port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Feeder(origin.address).run)
            await wait_live(relay.address, "mic")
            stop = trio.Event()
            heard = Listens()

            async def listen(key: str, address: str, joined: trio.Event) -> None:
                await heard.run(key, address, "mic", until=stop, joined=joined)

            for key, address in [("relay", relay.address), ("origin", origin.address)]:
                joined = trio.Event()
                nursery.start_soon(listen, key, address, joined)
                await joined.wait()
            await trio.sleep(0.5)
            stop.set()
            await heard.ended("relay", "origin")
            nursery.cancel_scope.cancel()
    assert check_numbered(heard["relay"]) >= RATE // 4
    assert heard["relay"].gaps == []
    assert heard["relay"].start.epoch == heard["origin"].start.epoch


async def test_serve_refuses_a_relay_whose_format_it_cannot_learn(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    spec = f"mic=relay:127.0.0.1:{free_port()}"
    done = await run_cli_async(
        "serve", "--root", root, "--port", "0", "--channel", spec, server="127.0.0.1:1"
    )
    assert done.returncode == 2, done.stderr
    assert "cannot ask the origin for its format" in done.stderr
    assert "?rate=R&channels=C" in done.stderr
