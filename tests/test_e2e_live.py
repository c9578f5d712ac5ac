"""End to end: live audio (channels, listen, publish) from the real server through the real CLI.

No mocks: every test runs ``python -m musiclib serve --channel ...`` on
127.0.0.1, listens and publishes with ``python -m musiclib listen/publish``
and with the library's own client (``open_client(version=2)``), which also
shows each chunk's position. The server runs the ffmpeg bundled with
imageio-ffmpeg, and every sample is compared byte for byte with what a local
run of that same binary makes: a channel's position p is frame p of its
source, so a listener's bytes are checked against the source itself, not only
against another listener. No sound device is used (the microphone and the
speaker have tests of their own).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import random
import re
import shlex
import signal
import socket
import struct
import subprocess
import time
import wave
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import LIBRARY
from live_support import (
    FFMPEG,
    IO_TIMEOUT,
    POLL,
    Finished,
    Heard,
    alive,
    assert_same_bytes,
    channel_infos,
    cli_process,
    ffmpeg_children,
    finish,
    hear,
    live_server,
    run_cli_async,
    wait_for_channel,
)

from musiclib.client import open_client
from musiclib.decode import AudioFormat, decode_command
from musiclib.live.sources import ffmpeg_input_command
from musiclib.protocol import (
    Audio,
    Connection,
    Error,
    GapNotice,
    Hello,
    ListenRequest,
    ListenStart,
    NeedData,
    Role,
    Welcome,
)

pytestmark = pytest.mark.e2e


#: a deterministic endless source: white noise from a fixed seed. Noise (unlike a sine)
#: never repeats, so where a stretch of it occurs in the source is unambiguous.
NOISE_ARGS = "-f lavfi -i anoisesrc=seed=7:sample_rate=48000:amplitude=0.5"
NOISE = AudioFormat("s16le", 48000, 1)
NOISE_CHANNEL = f"noise=ffmpeg:{NOISE_ARGS}?rate=48000&channels=1"
#: seconds of the noise source computed locally; no test runs its server longer
NOISE_SECONDS = 60

#: a shipped 44.1 kHz stereo track, the material of the published files and track channels
SHIPPED = LIBRARY / "Aurora Kettle" / "Tin Lanterns" / "01 - Lantern Walk.mp3"


# ---------------------------------------------------------------------------- references


def ffmpeg_output(cmd: Sequence[str], stdin: bytes | None = None) -> bytes:
    """Run the bundled ffmpeg locally; its standard output."""
    done = subprocess.run(
        list(cmd),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=IO_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    return done.stdout


@functools.cache
def noise_reference(fmt: AudioFormat = NOISE) -> bytes:
    """A noise channel's first NOISE_SECONDS in ``fmt``, as the server's ffmpeg makes them."""
    args = [*shlex.split(NOISE_ARGS), "-t", str(NOISE_SECONDS)]
    return ffmpeg_output(ffmpeg_input_command(FFMPEG, args, fmt))


def decoded(path: Path, fmt: AudioFormat) -> bytes:
    """``path`` decoded to ``fmt`` with the server's own command line."""
    return ffmpeg_output(decode_command(FFMPEG, path, fmt))


def cut_wav(dest: Path, seconds: float, source: Path = SHIPPED) -> Path:
    """The first ``seconds`` of a shipped track as a 16-bit WAV file (its rate and layout)."""
    if not source.is_file():
        pytest.skip("the demo library has not been generated (python library/generate.py)")
    cmd = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(source)]
    cmd += ["-t", str(seconds), "-map", "0:a:0", "-c:a", "pcm_s16le", "-y", str(dest)]
    ffmpeg_output(cmd)
    return dest


def wav_format(path: Path) -> AudioFormat:
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2
        return AudioFormat("s16le", w.getframerate(), w.getnchannels())


def locate(reference: bytes, got: bytes, bpf: int, what: str) -> int:
    """The frame position of the source (``reference``) at which ``got`` starts.

    Its first 4 KiB of noise occur only once in the source."""
    assert len(got) >= 4096, f"{what}: only {len(got)} bytes"
    at = reference.find(got[:4096])
    assert at >= 0, f"{what}: its first bytes occur nowhere in the source"
    assert at % bpf == 0, f"{what}: found at byte {at}, not on a frame boundary"
    return at // bpf


def place_in(reference: bytes, got: bytes, bpf: int, what: str) -> int:
    """Like :func:`locate`, and all of ``got`` is the source's from there on."""
    at = locate(reference, got, bpf, what)
    assert_same_bytes(got, reference[at * bpf : at * bpf + len(got)], what)
    return at


# ---------------------------------------------------------------------------- servers


# ---------------------------------------------------------------------------- the CLI


def reported_losses(stderr: str, channel: str, frames: int) -> list[tuple[int, int]]:
    """(position, frames) of each loss a ``listen --duration`` of ``frames`` frames reported,
    checked against its summary line."""
    lines = stderr.strip().splitlines()
    warning = re.compile(
        r"musiclib: lost (\d+) frames \(\d+ ms\) at frame (\d+): this listener fell behind"
    )
    losses = []
    for line in lines[:-1]:
        m = warning.fullmatch(line)
        assert m, stderr
        losses.append((int(m[2]), int(m[1])))
    lost = sum(n for _, n in losses)
    summary = rf"musiclib: {channel}: {frames - lost} frames \([\d.]+ s\), "
    if losses:
        summary += rf"{lost} lost in {len(losses)} gaps, "
    summary += r"latency median [\d.]+ ms, p99 [\d.]+ ms \(the requested frames were sent\)"
    assert re.fullmatch(summary, lines[-1]), lines[-1]
    return losses


# ---------------------------------------------------------------------------- the API client


async def wait_for_no_channel(address: str, name: str, timeout: float = IO_TIMEOUT) -> None:
    async def gone() -> bool:
        return name not in await channel_infos(address)

    await poll(gone, timeout)


async def wait_for_position(address: str, name: str, position: int) -> None:
    """Poll until channel ``name`` has published ``position`` frames."""

    async def there() -> bool:
        return (await channel_infos(address))[name].position >= position

    await poll(there)


async def nobody_listens(address: str, name: str) -> bool:
    return (await channel_infos(address))[name].listeners == 0


async def poll(check: Callable[[], Awaitable[bool]], timeout: float = IO_TIMEOUT) -> None:
    """Wait until ``check()`` is true, looking every POLL seconds; fail after ``timeout``."""
    with trio.fail_after(timeout):
        while True:
            if await check():
                return
            await trio.sleep(POLL)


# ---------------------------------------------------------------------------- processes


# ============================================================================ 1. many listeners


async def test_fifty_listeners_hear_the_same_samples(start_server, tmp_path):
    """40 API listeners and 10 CLI listeners at once, joining at different moments.

    Every one gets contiguous positions with no gap, and every byte at every
    position is the source's (so all of them agree wherever they overlap).
    """
    srv = live_server(start_server, tmp_path, NOISE_CHANNEL)
    reference = await trio.to_thread.run_sync(noise_reference)
    api_count, cli_count = 40, 10
    done = trio.Event()
    heard: list[Heard] = []
    outputs: list[Finished] = []
    most = 0

    async def api_listener(i: int) -> None:
        await trio.sleep(i * 0.02)
        heard.append(await hear(srv.address, "noise", until=done))

    async def cli_listener() -> None:
        args = ("listen", "noise", "--duration", "2", "--format", "s16le")
        outputs.append(await run_cli_async(*args, server=srv.address))

    async def count_listeners() -> None:
        nonlocal most
        async with open_client(srv.address, timeout=IO_TIMEOUT, version=2) as client:
            while True:
                (info,) = await client.channels()
                most = max(most, info.listeners)
                await trio.sleep(POLL)

    with trio.fail_after(IO_TIMEOUT * 2):
        async with trio.open_nursery() as outer:
            outer.start_soon(count_listeners)
            async with trio.open_nursery() as nursery:
                for i in range(api_count):
                    nursery.start_soon(api_listener, i)
                await trio.sleep(api_count * 0.02 + 0.2)
                async with trio.open_nursery() as clis:
                    for _ in range(cli_count):
                        clis.start_soon(cli_listener)
                await trio.sleep(0.2)  # the API listeners go on after the last CLI one
                done.set()
            outer.cancel_scope.cancel()

    assert len(heard) == api_count and len(outputs) == cli_count
    assert most >= api_count + cli_count, f"at most {most} listeners at once"
    for n, listen in enumerate(heard):
        assert listen.end is not None and listen.end.reason == "stopped", listen.end
        assert listen.start.converted is False and listen.start.preroll == 0
        assert listen.gaps == [] and listen.end.lost == 0
        listen.assert_contiguous()
        assert listen.end.frames == listen.stop_position - listen.start.position
        listen.assert_matches(reference, f"API listener {n}")
    # they did join at different moments, and all of them heard the same common stretch
    starts = sorted(h.start.position for h in heard)
    common = (starts[-1], min(h.stop_position for h in heard))
    assert starts[0] < starts[-1] and common[0] < common[1]
    stretches = {
        h.samples()[(common[0] - h.start.position) * h.bpf : (common[1] - h.start.position) * h.bpf]
        for h in heard
    }
    assert len(stretches) == 1, f"{len(stretches)} different versions of the common stretch"

    places = []
    for n, out in enumerate(outputs):
        assert out.returncode == 0, out.stderr
        assert reported_losses(out.stderr, "noise", 2 * NOISE.sample_rate) == []
        assert len(out.stdout) == 2 * NOISE.bytes_per_second
        places.append(place_in(reference, out.stdout, NOISE.bytes_per_frame, f"CLI listener {n}"))
    # the CLI listeners were there while the API listeners were
    assert all(starts[-1] <= p for p in places)
    assert max(places) + 2 * NOISE.sample_rate <= common[1]


# ============================================================================ 2. exact publishing


async def test_a_published_wav_file_arrives_whole_and_exact(start_server, tmp_path):
    """A listener waiting for the channel, and a CLI listener joining with preroll, both get
    the file's samples exactly, and hear that the publisher left."""
    srv = live_server(start_server, tmp_path)
    wav = cut_wav(tmp_path / "x.wav", 2.0)
    fmt = wav_format(wav)
    want = await trio.to_thread.run_sync(decoded, wav, fmt)
    assert len(want) == 2 * fmt.bytes_per_second

    results: dict[str, Any] = {}
    waiting = trio.Event()

    async def api_listener() -> None:
        waiting.set()
        results["api"] = await hear(srv.address, "hall", retry=True, preroll_ms=10_000)

    async def cli_listener() -> None:
        await wait_for_channel(srv.address, "hall")
        args = ("listen", "hall", "--preroll", "10000")
        results["cli"] = await run_cli_async(*args, server=srv.address)

    async def publisher() -> None:
        await waiting.wait()
        results["pub"] = await run_cli_async("publish", "hall", "--from", wav, server=srv.address)

    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(api_listener)
            nursery.start_soon(cli_listener)
            nursery.start_soon(publisher)

    pub = results["pub"]
    assert pub.returncode == 0, pub.stderr
    assert pub.summary() == "musiclib: hall: published 88200 frames (2.00 s) from x.wav"

    heard: Heard = results["api"]
    assert (heard.start.sample_format, heard.start.sample_rate, heard.start.channels) == (
        fmt.sample_format,
        fmt.sample_rate,
        fmt.channels,
    )
    assert heard.start.position == 0 and heard.start.source == "publish:x.wav"
    heard.assert_contiguous()
    assert heard.gaps == []
    assert_same_bytes(heard.samples(), want, "the API listener")
    assert heard.end is not None
    assert (heard.end.reason, heard.end.frames, heard.end.lost) == ("publisher_left", 88200, 0)
    assert heard.end.message == "channel 'hall': the publisher ended"

    cli = results["cli"]
    assert cli.returncode == 0, cli.stderr
    assert_same_bytes(cli.stdout, want, "the CLI listener")
    line = cli.summary()
    assert line.startswith("musiclib: hall: 88200 frames (2.00 s), latency median "), line
    assert line.endswith("(channel 'hall': the publisher ended)"), line
    await wait_for_no_channel(srv.address, "hall")


async def test_published_standard_input_arrives_exact(start_server, tmp_path):
    """Bytes piped into ``publish --from -`` in uneven pieces reach two listeners unchanged.

    (Written ``--from=-``: see test_publish_from_a_lone_dash_parses for ``--from -``.)
    """
    srv = live_server(start_server, tmp_path)
    data = random.Random(11).randbytes(2 * 16000 * 2)  # 2 s of 16 kHz mono s16le
    args = ("--from=-", "--format", "s16le", "--rate", "16000", "--channels", "1")
    results: dict[str, Any] = {}
    with trio.fail_after(IO_TIMEOUT):
        async with (
            cli_process("publish", "hall", *args, server=srv.address, stdin=subprocess.PIPE) as pub,
            trio.open_nursery() as nursery,
        ):
            info = await wait_for_channel(srv.address, "hall")
            assert (info.state, info.source, info.position) == ("waiting", "publish:stdin", 0)

            async def api_listener() -> None:
                results["api"] = await hear(srv.address, "hall", max_latency_ms=10_000)

            async def cli_listener() -> None:
                listen = ("listen", "hall", "--format", "s16le", "--max-latency", "10000")
                results["cli"] = await run_cli_async(*listen, server=srv.address)

            nursery.start_soon(api_listener)
            nursery.start_soon(cli_listener)
            await wait_for_channel(srv.address, "hall", listeners=2)
            assert pub.stdin is not None
            cuts = [0, 1, 1001, 7777, 40_000, len(data)]  # frames straddle the pieces
            for a, b in itertools.pairwise(cuts):
                await pub.stdin.send_all(data[a:b])
                await trio.sleep(0.05)
            await pub.stdin.aclose()
            published = await finish(pub)

    assert published.returncode == 0, published.stderr
    assert published.summary() == "musiclib: hall: published 32000 frames (2.00 s) from stdin"
    heard: Heard = results["api"]
    assert heard.start.position == 0 and heard.gaps == []
    heard.assert_contiguous()
    assert_same_bytes(heard.samples(), data, "the API listener")
    assert heard.end is not None and heard.end.reason == "publisher_left"
    cli = results["cli"]
    assert cli.returncode == 0, cli.stderr
    assert_same_bytes(cli.stdout, data, "the CLI listener")
    assert cli.summary().endswith("(channel 'hall': the publisher ended)")


async def test_publish_from_a_lone_dash_parses(start_server, tmp_path):
    """``publish NAME --from -``, as the help writes it, reads standard input."""
    srv = live_server(start_server, tmp_path)
    data = bytes(range(256)) * 10
    args = ("--from", "-", "--rate", "16000", "--channels", "1")
    done = await run_cli_async("publish", "hall", *args, server=srv.address, stdin=data)
    assert done.returncode == 0, done.stderr
    assert done.summary() == "musiclib: hall: published 1280 frames (0.08 s) from stdin"


# ============================================================================ 3. conversion

#: what the converted listeners ask for, and the plain ffmpeg command that makes it
CONVERTED = AudioFormat("f32le", 16000, 1)
MUSIC = AudioFormat("s16le", 48000, 2)


def converted(native: bytes) -> bytes:
    """The channel's own samples (48 kHz stereo s16le) as ffmpeg converts them, all at once."""
    cmd = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error"]
    cmd += ["-f", "s16le", "-ar", "48000", "-ac", "2", "-i", "-"]
    cmd += ["-f", "f32le", "-ar", "16000", "-ac", "1", "-"]
    return ffmpeg_output(cmd, stdin=native)


def check_converted(native: Heard, other: Heard, cli: Finished, what: str) -> None:
    """Both converted listeners got exactly ffmpeg's conversion of the native listener's
    samples, which cover the whole channel from position 0.

    Exact, not approximately: one ffmpeg converting the whole stream, fed in live 20 ms
    chunks, makes the very bytes of one run over all of it at once, its resampler's
    flush at the end included, as long as the converter is left to finish when its
    source ends.
    """
    assert native.start.position == 0 and not native.start.converted
    native.assert_contiguous()
    assert native.gaps == []
    want = converted(native.samples())
    assert other.start.converted
    assert (other.start.sample_format, other.start.sample_rate, other.start.channels) == (
        CONVERTED.sample_format,
        CONVERTED.sample_rate,
        CONVERTED.channels,
    )
    assert other.start.position == 0
    other.assert_contiguous()
    assert other.gaps == []
    assert_same_bytes(other.samples(), want, f"{what}: the API listener's conversion")
    assert cli.returncode == 0, cli.stderr
    assert_same_bytes(cli.stdout, want, f"{what}: the CLI listener's conversion")


async def test_a_converted_listener_gets_ffmpegs_conversion_of_a_source(start_server, tmp_path):
    """A configured source that ends: listeners with preroll cover it from position 0, and
    the 16 kHz mono f32le listeners get exactly what ffmpeg makes of the native samples."""
    wav = cut_wav(tmp_path / "x.wav", 2.0)
    srv = live_server(start_server, tmp_path, f"music=ffmpeg:-i {shlex.quote(str(wav))}")
    results: dict[str, Any] = {}
    fmt = ("--rate", "16000", "--channels", "1", "--format", "f32le")

    async def native() -> None:
        results["native"] = await hear(srv.address, "music", preroll_ms=10_000)

    async def other() -> None:
        request = {"sample_format": "f32le", "sample_rate": 16000, "channels": 1}
        results["other"] = await hear(srv.address, "music", preroll_ms=10_000, **request)

    async def cli() -> None:
        args = ("listen", "music", "--preroll", "10000", *fmt)
        results["cli"] = await run_cli_async(*args, server=srv.address)

    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(native)
            nursery.start_soon(other)
            nursery.start_soon(cli)
    for heard in (results["native"], results["other"]):
        assert heard.end is not None and heard.end.reason == "source_ended", heard.end
    assert results["native"].stop_position == 2 * MUSIC.sample_rate
    check_converted(results["native"], results["other"], results["cli"], "a configured source")


async def test_a_converted_listener_of_a_published_channel_gets_all_of_it(start_server, tmp_path):
    """Listeners waiting before the publisher sends: the converted ones get ffmpeg's whole
    conversion, its tail included, when the publisher ends the channel."""
    srv = live_server(start_server, tmp_path)
    data = await trio.to_thread.run_sync(decoded, cut_wav(tmp_path / "x.wav", 1.5), MUSIC)
    args = ("--from=-", "--rate", "48000", "--channels", "2", "--realtime")
    results: dict[str, Any] = {}
    request = {"sample_format": "f32le", "sample_rate": 16000, "channels": 1}
    fmt = ("--rate", "16000", "--channels", "1", "--format", "f32le")
    with trio.fail_after(IO_TIMEOUT):
        async with (
            cli_process("publish", "hall", *args, server=srv.address, stdin=subprocess.PIPE) as pub,
            trio.open_nursery() as nursery,
        ):
            await wait_for_channel(srv.address, "hall")

            async def native() -> None:
                results["native"] = await hear(srv.address, "hall")

            async def other() -> None:
                results["other"] = await hear(srv.address, "hall", **request)

            async def cli() -> None:
                results["cli"] = await run_cli_async("listen", "hall", *fmt, server=srv.address)

            nursery.start_soon(native)
            nursery.start_soon(other)
            nursery.start_soon(cli)
            # the native listener, the converter, and the two converted listeners
            await wait_for_channel(srv.address, "hall", listeners=4)
            assert pub.stdin is not None
            await pub.stdin.send_all(data)
            await pub.stdin.aclose()
            published = await finish(pub)
    assert published.returncode == 0, published.stderr
    for heard in (results["native"], results["other"]):
        assert heard.end is not None and heard.end.reason == "publisher_left", heard.end
    assert_same_bytes(results["native"].samples(), data, "the native listener")
    check_converted(results["native"], results["other"], results["cli"], "a published channel")


# ============================================================================ 4. stalled listeners


#: a fat noise channel (375 KiB/s), so a listener that stops reading fills the socket
#: buffers between it and the server quickly and the server has to drop its audio
FAT = AudioFormat("f32le", 48000, 2)
FAT_CHANNEL = f"fat=ffmpeg:{NOISE_ARGS}?rate=48000&channels=2&format=f32le"


class RawListener:
    """A listen spoken by hand over a plain socket with a tiny receive buffer, so that a
    test can stop reading and the server notices at once."""

    def __init__(self, port: int, channel: str, **request: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(IO_TIMEOUT)
        self.conn = Connection(Role.CLIENT)
        self.closed = False
        try:
            self.sock.connect(("127.0.0.1", port))
            self.sock.sendall(self.conn.send(Hello(version=2, client="test_e2e_live")))
            assert isinstance(self.next_event(), Welcome)
            self.sock.sendall(self.conn.send(ListenRequest(channel=channel, **request)))
            start = self.next_event()
            assert isinstance(start, ListenStart), start
            self.heard = Heard(start)
        except BaseException:
            self.sock.close()
            raise

    def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if not isinstance(event, NeedData):
                return event
            data = self.sock.recv(256 * 1024)
            self.closed = not data
            self.conn.receive_data(data)

    def read_until(self, position: int) -> None:
        """Read audio and gaps until the listen has reached ``position``."""
        deadline = time.monotonic() + IO_TIMEOUT
        while self.heard.stop_position < position:
            assert time.monotonic() < deadline
            event = self.next_event()
            assert isinstance(event, (Audio, GapNotice)), event
            self.heard.events.append(event)

    def close(self) -> None:
        self.sock.close()


async def test_a_stalled_listener_loses_audio_and_the_others_do_not(start_server, tmp_path):
    """Three listeners stop reading for 2 s (a raw socket, and two CLI listeners whose
    standard output nobody reads): each is told exactly which frames it lost and gets the
    rest intact; the CLI fills the loss with silence (or leaves it out with
    --no-fill-gaps). Two listeners that keep reading lose nothing meanwhile."""
    srv = live_server(start_server, tmp_path, FAT_CHANNEL)
    reference = await trio.to_thread.run_sync(noise_reference, FAT)
    bpf = FAT.bytes_per_frame
    seconds = 5
    results: dict[str, Any] = {}
    stalled = trio.Event()
    listen = ("listen", "fat", "--format", "f32le", "--max-latency", "100")
    listen += ("--duration", str(seconds))
    with trio.fail_after(IO_TIMEOUT):
        async with (
            cli_process(*listen, server=srv.address) as filled,
            cli_process(*listen, "--no-fill-gaps", server=srv.address) as unfilled,
            trio.open_nursery() as nursery,
        ):

            async def healthy_api() -> None:
                results["api"] = await hear(srv.address, "fat", until=stalled)

            async def healthy_cli() -> None:
                results["cli"] = await run_cli_async(
                    *listen[:4], "--duration", "3", server=srv.address
                )

            raw = await trio.to_thread.run_sync(
                lambda: RawListener(srv.port, "fat", max_latency_ms=100)
            )
            try:
                await wait_for_channel(srv.address, "fat", listeners=3)  # the raw and the CLIs
                nursery.start_soon(healthy_api)
                nursery.start_soon(healthy_cli)
                await trio.sleep(2)  # nobody reads the raw socket nor the CLI outputs
                end = raw.heard.start.position + 3 * FAT.sample_rate
                await trio.to_thread.run_sync(raw.read_until, end)
            finally:
                raw.close()
            done_filled, done_unfilled = await finish(filled), await finish(unfilled)
            stalled.set()

    # the raw listener: told exactly what it lost, everything else intact
    heard = raw.heard
    heard.assert_contiguous()
    assert heard.gaps, "a listener that read nothing for 2 s lost nothing"
    assert sum(g.frames for g in heard.gaps) >= FAT.sample_rate  # over a second of its 2
    heard.assert_matches(reference, "the stalled raw listener")

    # the CLI listeners: --duration of the channel, each loss reported exactly where it is
    # and filled with silence (or, with --no-fill-gaps, left out)
    for done, fill in ((done_filled, True), (done_unfilled, False)):
        what = "the CLI listener" + ("" if fill else " with --no-fill-gaps")
        assert done.returncode == 0, done.stderr
        losses = reported_losses(done.stderr, "fat", seconds * FAT.sample_rate)
        assert losses, f"{what} lost nothing: {done.stderr}"
        first = locate(reference, done.stdout, bpf, what)
        want = bytearray()
        position = first
        for at, frames in [*losses, (first + seconds * FAT.sample_rate, 0)]:
            want += reference[position * bpf : at * bpf]
            if fill:
                want += bytes(frames * bpf)
            position = at + frames
        assert_same_bytes(done.stdout, bytes(want), what)

    # the healthy ones
    api = results["api"]
    api.assert_contiguous()
    assert api.gaps == [] and api.end.lost == 0
    api.assert_matches(reference, "the healthy API listener")
    assert api.stop_position >= heard.stop_position  # it was there the whole window
    cli = results["cli"]
    assert cli.returncode == 0, cli.stderr
    assert " lost " not in cli.summary(), cli.stderr
    place_in(reference, cli.stdout, bpf, "the healthy CLI listener")


async def test_a_listener_that_keeps_falling_behind_is_cut_after_the_lag_limit(
    start_server, tmp_path
):
    """With --lag-limit 2, a listener reading at about half the channel's rate is cut
    ("cut from", and a too_slow error) within a few seconds; another keeps every frame."""
    srv = live_server(start_server, tmp_path, FAT_CHANNEL, args=("--lag-limit", "2"))
    reference = await trio.to_thread.run_sync(noise_reference, FAT)
    stop = trio.Event()
    results: dict[str, Any] = {}

    async def healthy() -> None:
        results["api"] = await hear(srv.address, "fat", until=stop)

    def read_slowly(raw: RawListener) -> Any:
        """Read 64 KiB every 0.3 s (about 210 KiB/s of a 375 KiB/s channel) until an error."""
        deadline = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < deadline:
            event = raw.conn.next_event()
            if isinstance(event, NeedData):
                time.sleep(0.3)
                data = raw.sock.recv(64 * 1024)
                raw.conn.receive_data(data)
                if not data:
                    return None
            elif not isinstance(event, (Audio, GapNotice)):
                return event
        pytest.fail("the slow listener was never cut")

    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(healthy)
            raw = await trio.to_thread.run_sync(
                lambda: RawListener(srv.port, "fat", max_latency_ms=100)
            )
            try:
                began = time.monotonic()
                last = await trio.to_thread.run_sync(read_slowly, raw)
                took = time.monotonic() - began
            finally:
                raw.close()
            stop.set()
    assert isinstance(last, Error) and last.code == "too_slow", last
    assert "fell behind" in last.message
    assert 2.0 <= took <= 6.0, f"cut after {took:.1f} s"
    srv.wait_for_log(r"cut from fat", timeout=1)
    api = results["api"]
    api.assert_contiguous()
    assert api.gaps == []
    api.assert_matches(reference, "the healthy listener")


async def test_a_listener_that_never_reads_is_cut_after_the_lag_limit(start_server, tmp_path):
    """With --lag-limit 2 a listener that stopped reading altogether (its socket full, the
    server's send blocked) is cut too ("cut from" in the log) within a few seconds, not
    only when the send deadline (--send-timeout, 30 s) expires."""
    srv = live_server(start_server, tmp_path, FAT_CHANNEL, args=("--lag-limit", "2"))
    raw = await trio.to_thread.run_sync(lambda: RawListener(srv.port, "fat", max_latency_ms=100))
    try:
        await trio.to_thread.run_sync(srv.wait_for_log, r"cut from fat", 6.0)
        assert (await channel_infos(srv.address))["fat"].listeners == 0
    finally:
        raw.close()


async def test_listeners_that_hang_up_mid_listen_are_no_internal_error(start_server, tmp_path):
    """120 listeners that close their connection mid-listen without a stop (a program that
    quits, a killed CLI) are each logged as hung up, never as an internal error."""
    srv = live_server(start_server, tmp_path, FAT_CHANNEL)
    rng = random.Random(5)

    async def hang_up_while_reading() -> None:
        async with (
            open_client(srv.address, timeout=IO_TIMEOUT, version=2) as client,
            client.listen("fat", max_latency_ms=100) as audio,
        ):
            with trio.move_on_after(rng.uniform(0.05, 0.4)):
                async for _ in audio:
                    pass

    with trio.fail_after(IO_TIMEOUT):
        for _ in range(3):
            async with trio.open_nursery() as nursery:
                for _ in range(40):
                    nursery.start_soon(hang_up_while_reading)
        await poll(functools.partial(nobody_listens, srv.address, "fat"))
    log = srv.log()
    assert "internal error" not in log and "Traceback" not in log, log
    assert log.count("hung up during a listen") == 120, log


async def test_stalled_listeners_that_hang_up_are_no_internal_error(start_server, tmp_path):
    """Listeners that stopped reading (the server's send blocked) and then close, with a
    FIN or a reset, are logged as hung up, never as an internal error."""
    srv = live_server(start_server, tmp_path, FAT_CHANNEL)

    def hang_up_while_stalled(reset: bool) -> None:
        raw = RawListener(srv.port, "fat", max_latency_ms=100)
        time.sleep(0.5)  # the server's send is blocked by now
        if reset:  # as from a crashed client
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()

    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for reset in (False, True) * 6:
                nursery.start_soon(trio.to_thread.run_sync, hang_up_while_stalled, reset)
        await poll(functools.partial(nobody_listens, srv.address, "fat"))
    log = srv.log()
    assert "internal error" not in log and "Traceback" not in log, log
    assert log.count("hung up during a listen") + log.count("connection lost") == 12, log


# ============================================================================ 5. preroll


async def test_preroll_gives_the_last_second_then_live_without_a_seam(start_server, tmp_path):
    """``--preroll 1000`` on a running channel: exactly 1 s of history, then live audio, with
    neither a duplicate nor a hole, and the same bytes a listener there before heard."""
    srv = live_server(start_server, tmp_path, NOISE_CHANNEL)
    reference = await trio.to_thread.run_sync(noise_reference)
    rate = NOISE.sample_rate
    done = trio.Event()
    results: dict[str, Any] = {}

    async def early() -> None:
        results["early"] = await hear(srv.address, "noise", until=done)

    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(early)
            await wait_for_channel(srv.address, "noise", listeners=1)
            await wait_for_position(srv.address, "noise", 2 * rate)
            cli = cli_process(
                *("listen", "noise", "--preroll", "1000", "--duration", "2", "--format", "s16le"),
                server=srv.address,
            )
            async with cli as process:
                joined_at = time.time_ns()
                late = await hear(srv.address, "noise", preroll_ms=1000, frames=2 * rate)
                done_cli = await finish(process)
            done.set()
    heard, early_heard = late, results["early"]
    assert heard.start.preroll == rate, heard.start
    assert heard.start.position >= early_heard.start.position
    heard.assert_contiguous()
    assert heard.gaps == []
    assert heard.end is not None and heard.end.reason == "complete"
    assert heard.stop_position - heard.start.position == 2 * rate
    # the history is from the past: its first chunk was captured about 1 s before the join
    age = (joined_at - heard.chunks[0].time_ns) / 1e9
    assert 0.7 <= age <= 1.5, f"the preroll's first chunk is {age:.2f} s old"
    # the same bytes as the listener that was there all along, and as the source
    early_heard.assert_contiguous()
    offset = (heard.start.position - early_heard.start.position) * heard.bpf
    assert_same_bytes(
        heard.samples(),
        early_heard.samples()[offset : offset + len(heard.samples())],
        "the late listener against the early one",
    )
    heard.assert_matches(reference, "the late listener")

    assert done_cli.returncode == 0, done_cli.stderr
    assert len(done_cli.stdout) == 2 * NOISE.bytes_per_second
    at = place_in(reference, done_cli.stdout, NOISE.bytes_per_frame, "the CLI preroll listener")
    assert early_heard.start.position <= at <= heard.start.position + rate


# ============================================================================ 6. endings


async def test_a_vanished_publisher_ends_the_channel_and_frees_its_name(start_server, tmp_path):
    """SIGKILL to the publisher: listeners end with publisher_left (the CLI exits 0 and says
    so), the name is free again; a second publisher meanwhile is refused with channel_busy,
    and so is a publisher taking a configured channel's name."""
    srv = live_server(start_server, tmp_path, NOISE_CHANNEL)
    wav = cut_wav(tmp_path / "x.wav", 8.0)
    fmt = wav_format(wav)
    want = await trio.to_thread.run_sync(decoded, wav, fmt)
    results: dict[str, Any] = {}
    with trio.fail_after(IO_TIMEOUT):
        async with (
            cli_process("publish", "hall", "--from", wav, server=srv.address) as pub,
            trio.open_nursery() as nursery,
        ):

            async def api() -> None:
                results["api"] = await hear(srv.address, "hall", retry=True)

            nursery.start_soon(api)
            await wait_for_channel(srv.address, "hall", listeners=1)
            listen = ("listen", "hall", "--preroll", "10000")
            async with cli_process(*listen, server=srv.address) as listener:
                await wait_for_channel(srv.address, "hall", listeners=2)

                for name in ("hall", "noise"):
                    busy = await run_cli_async(
                        "publish", name, "--from=-", server=srv.address, stdin=b""
                    )
                    assert busy.returncode == 3, busy.stderr
                    line = busy.summary()
                    who = (
                        r"a publisher \(127\.0\.0\.1:\d+\)" if name == "hall" else "ffmpeg:-f lavfi"
                    )
                    assert re.match(
                        rf"musiclib: channel '{name}' is busy: its source is {who}", line
                    ), line

                await wait_for_position(srv.address, "hall", fmt.sample_rate)
                pub.kill()  # SIGKILL
                with trio.fail_after(5):
                    assert await pub.wait() == -signal.SIGKILL
                listened = await finish(listener)
    assert listened.returncode == 0, listened.stderr
    assert listened.summary().endswith("(channel 'hall': the publisher disconnected)")
    frames = len(listened.stdout) // fmt.bytes_per_frame
    assert frames >= fmt.sample_rate
    assert_same_bytes(listened.stdout, want[: len(listened.stdout)], "the CLI listener")
    heard = results["api"]
    assert heard.end is not None
    assert (heard.end.reason, heard.end.message) == (
        "publisher_left",
        "channel 'hall': the publisher disconnected",
    )
    heard.assert_contiguous()
    heard.assert_matches(want, "the API listener")

    await wait_for_no_channel(srv.address, "hall")
    again = await run_cli_async(
        "publish", "hall", "--from=-", "--rate", "8000", server=srv.address, stdin=bytes(1600)
    )
    assert again.returncode == 0, again.stderr
    assert again.summary() == "musiclib: hall: published 800 frames (0.10 s) from stdin"


async def test_sigterm_ends_every_listen_and_leaves_no_ffmpeg(start_server, tmp_path):
    """SIGTERM with listeners (native and converted, API and CLI), a publisher and a
    converter running: the server exits 0, the listens end with ``shutdown``, and every
    ffmpeg it ran (the source's, the converter's) is gone."""
    srv = live_server(start_server, tmp_path, NOISE_CHANNEL)
    wav = cut_wav(tmp_path / "x.wav", 8.0)
    results: dict[str, Any] = {}
    converted_request = {"sample_format": "f32le", "sample_rate": 16000, "channels": 1}
    with trio.fail_after(IO_TIMEOUT):
        async with cli_process("publish", "hall", "--from", wav, server=srv.address) as pub:
            await wait_for_channel(srv.address, "hall")
            async with (
                cli_process("listen", "noise", "--format", "s16le", server=srv.address) as noise,
                cli_process("listen", "hall", "--rate", "16000", server=srv.address) as hall,
                trio.open_nursery() as nursery,
            ):

                async def api(name: str, channel: str, **request: Any) -> None:
                    results[name] = await hear(srv.address, channel, retry=True, **request)

                async def cli(name: str, process: trio.Process) -> None:
                    results[name] = await finish(process)

                for name, process in (("cli_noise", noise), ("cli_hall", hall), ("pub", pub)):
                    nursery.start_soon(cli, name, process)
                nursery.start_soon(api, "noise", "noise")
                nursery.start_soon(
                    functools.partial(api, "converted", "noise", **converted_request)
                )
                nursery.start_soon(api, "hall", "hall")
                # noise: CLI, API, converter, converted API; hall: CLI's converter and CLI, API
                await wait_for_channel(srv.address, "noise", listeners=4)
                await wait_for_channel(srv.address, "hall", listeners=3)

                async def three_ffmpegs() -> bool:  # the noise source, and two converters
                    return len(ffmpeg_children(srv.process.pid)) >= 3

                await poll(three_ffmpegs, 5)
                children = ffmpeg_children(srv.process.pid)
                assert len(children) == 3, children

                status = await trio.to_thread.run_sync(srv.stop)
                assert status == 0, srv.log()
    for name in ("noise", "converted", "hall"):
        end = results[name].end
        assert end is not None and end.reason == "shutdown", (name, end)
        assert end.message == "the server is shutting down"
    for name in ("cli_noise", "cli_hall"):
        done = results[name]
        assert done.returncode == 0, done.stderr
        assert done.summary().endswith("(the server is shutting down)"), done.stderr
    published = results["pub"]
    assert published.returncode == 3, published.stderr
    assert published.summary() == "musiclib: the server is shutting down"
    left = [pid for pid in children if alive(pid)]
    assert left == [], f"ffmpeg processes outlived the server: {left}"
    assert "Traceback" not in srv.log(), srv.log()


# ============================================================================ 7. tracks, loops


@pytest.fixture
def track_root(tmp_path: Path) -> Path:
    """A root holding one short track: the first 1.5 s of a shipped one."""
    root = tmp_path / "root"
    root.mkdir()
    cut_wav(root / "cut.wav", 1.5)
    return root


async def test_track_plays_once_in_real_time_and_loop_goes_on(start_server, tmp_path, track_root):
    """``track:`` plays the file exactly, once, in real time, and ends with source_ended;
    ``loop:`` carries on past the end with positions and samples continuing; ``-o rec.wav
    --duration 1`` writes a valid WAV of exactly one second."""
    want = await trio.to_thread.run_sync(decoded, track_root / "cut.wav", MUSIC)
    total = len(want) // MUSIC.bytes_per_frame
    assert total == round(1.5 * MUSIC.sample_rate)
    srv = live_server(start_server, tmp_path, "once=track:cut.wav", "again=loop:cut.wav")
    rec = tmp_path / "rec.wav"
    results: dict[str, Any] = {}

    async def once() -> None:
        joined = time.monotonic()
        results["once"] = heard = await hear(srv.address, "once", preroll_ms=10_000)
        results["once_wall"] = time.monotonic() - joined
        results["once_late"] = heard.start.position + heard.start.preroll

    async def again() -> None:
        frames = total + total // 2
        results["again"] = await hear(srv.address, "again", preroll_ms=10_000, frames=frames)

    async def record() -> None:
        args = ("listen", "again", "-o", rec, "--duration", "1")
        results["rec"] = await run_cli_async(*args, server=srv.address)

    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(once)
            nursery.start_soon(again)
            nursery.start_soon(record)
        listed = await run_cli_async("channels", "--json", server=srv.address)
        table = await run_cli_async("channels", server=srv.address)

    heard = results["once"]
    assert heard.start.position == 0 and heard.start.source == "track:cut.wav"
    heard.assert_contiguous()
    assert heard.gaps == []
    assert_same_bytes(heard.samples(), want, "the track channel")
    assert heard.end is not None and heard.end.reason == "source_ended", heard.end
    assert heard.end.message == "channel 'once': the source ended"
    # real time: what was still to come when the listener joined took that long to come
    to_come = (total - results["once_late"]) / MUSIC.sample_rate
    assert results["once_wall"] >= to_come - 0.1, (results["once_wall"], to_come)
    # stamped on the pacer's schedule: 1/rate apart, exactly
    first, last = heard.chunks[0], heard.chunks[-1]
    span = (last.position + len(last.payload) // 4) - (first.position + len(first.payload) // 4)
    assert abs((last.time_ns - first.time_ns) - span * 10**9 // MUSIC.sample_rate) <= 1

    looped = results["again"]
    assert looped.start.position == 0
    looped.assert_contiguous()
    assert looped.gaps == []
    assert looped.stop_position == total + total // 2
    assert_same_bytes(looped.samples(), (want + want)[: len(looped.samples())], "the loop")
    assert looped.end is not None and looped.end.reason == "complete"

    recorded = results["rec"]
    assert recorded.returncode == 0, recorded.stderr
    assert recorded.summary().startswith("musiclib: again: 48000 frames (1.00 s), ")
    with wave.open(str(rec), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 48000)
        assert w.getnframes() == MUSIC.sample_rate
        samples = w.readframes(w.getnframes())
    assert len(samples) == MUSIC.bytes_per_second
    place_in(want * 4, samples, MUSIC.bytes_per_frame, "the recording")

    assert listed.returncode == 0, listed.stderr
    infos = {c["name"]: c for c in map(json.loads, listed.stdout.decode().splitlines())}
    assert infos["once"]["state"] == "ended" and infos["once"]["position"] == total
    assert infos["again"]["state"] == "live" and infos["again"]["position"] > total
    assert infos["again"]["source"] == "loop:cut.wav"
    assert (infos["again"]["sample_rate"], infos["again"]["channels"]) == (48000, 2)
    assert table.returncode == 0, table.stderr
    rows = table.stdout.decode().splitlines()
    assert rows[0].split()[:3] == ["NAME", "SOURCE", "FORMAT"]
    assert [r.split()[0] for r in rows[1:]] == ["again", "once"]


# ============================================================================ 8. version 1


async def test_version_1_clients_keep_working_next_to_channels(start_server, tmp_path, track_root):
    """``ls``, ``info`` and ``get`` (protocol version 1) against a server with a live channel
    and a listener on it; a hand-made version 1 hello is answered with version 1."""
    srv = live_server(start_server, tmp_path, NOISE_CHANNEL)
    stop = trio.Event()
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: hear(srv.address, "noise", until=stop))
            await wait_for_channel(srv.address, "noise", listeners=1)
            listed = await run_cli_async("ls", "--json", server=srv.address)
            info = await run_cli_async("info", "cut.wav", server=srv.address)
            got = await run_cli_async("get", "cut.wav", server=srv.address)

            def hello_v1() -> Welcome:
                with socket.create_connection(("127.0.0.1", srv.port), IO_TIMEOUT) as sock:
                    conn = Connection(Role.CLIENT)
                    sock.sendall(conn.send(Hello(version=1, client="test_e2e_live")))
                    while isinstance(event := conn.next_event(), NeedData):
                        conn.receive_data(sock.recv(65536))
                    return event

            welcome = await trio.to_thread.run_sync(hello_v1)
            stop.set()
    assert listed.returncode == 0, listed.stderr
    assert [t["path"] for t in json.loads(listed.stdout)] == ["cut.wav"]
    assert info.returncode == 0, info.stderr
    assert got.returncode == 0, got.stderr
    assert_same_bytes(got.stdout, (track_root / "cut.wav").read_bytes(), "get cut.wav")
    assert isinstance(welcome, Welcome) and welcome.version == 1, welcome


# ---------------------------------------------------------------------------- reconnecting


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that cuts its first connection after ``cut_after`` bytes
    from the server (a dropped connection in the middle of a listen) and forwards every
    later one whole."""

    def __init__(self, target: str, cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.connections = 0
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        limit = self.cut_after if self.connections == 1 else None
        host, port = self.target.rsplit(":", 1)
        async with client, await trio.open_tcp_stream(host, int(port)) as server:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream, cut: int | None) -> None:
                passed = 0
                while data := await src.receive_some(65536):
                    if cut is not None and passed + len(data) >= cut:
                        await dst.send_all(data[: cut - passed])
                        nursery.cancel_scope.cancel()  # both ways: the connection is gone
                        return
                    await dst.send_all(data)
                    passed += len(data)
                nursery.cancel_scope.cancel()

            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump, client, server, None)
                    nursery.start_soon(pump, server, client, limit)


async def test_a_dropped_listen_reconnects_and_misses_nothing(start_server, tmp_path):
    """The connection drops after about 1 s of a 3 s listen (in the middle of a frame):
    the CLI listens again with a preroll that covers the outage, skips what it had, and
    its output is exactly 3 s of the source, contiguous, with nothing reported lost."""
    srv = live_server(start_server, tmp_path, NOISE_CHANNEL)
    reference = await trio.to_thread.run_sync(noise_reference)
    bpf = NOISE.bytes_per_frame
    proxy = CuttingProxy(srv.address, cut_after=NOISE.bytes_per_second + 1234)
    with trio.fail_after(IO_TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            args = ("listen", "noise", "--duration", "3", "--format", "s16le")
            out = await run_cli_async(*args, server=f"127.0.0.1:{proxy.port}")
            nursery.cancel_scope.cancel()
    assert out.returncode == 0, out.stderr
    assert proxy.connections >= 2, "the listen never reconnected"
    assert "listening again in" in out.stderr
    assert "lost" not in out.stderr, out.stderr
    assert len(out.stdout) == 3 * NOISE.sample_rate * bpf
    place_in(reference, out.stdout, bpf, "the reconnected listen")


async def test_listen_output_never_overwrites_unless_forced(start_server, tmp_path):
    """``listen -o`` refuses an existing file (as ``get`` does), and ``--force`` replaces a
    planted symbolic link itself, never the file it points to."""
    srv = live_server(start_server, tmp_path, NOISE_CHANNEL)
    await wait_for_channel(srv.address, "noise")
    rec = tmp_path / "rec.wav"
    rec.write_bytes(b"an earlier recording")
    args = ("listen", "noise", "-o", rec, "--duration", "0.2")

    refused = await run_cli_async(*args, server=srv.address)
    assert refused.returncode == 7, refused.stderr
    assert refused.summary() == f"musiclib: {rec} already exists: use --force to replace it"
    assert rec.read_bytes() == b"an earlier recording"

    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    rec.unlink()
    rec.symlink_to(victim)
    forced = await run_cli_async(*args, "--force", server=srv.address)
    assert forced.returncode == 0, forced.stderr
    assert victim.read_bytes() == b"not yours"
    assert not rec.is_symlink()
    with wave.open(str(rec), "rb") as recorded:
        assert recorded.getnframes() == round(0.2 * 48000)
