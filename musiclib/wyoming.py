"""Live channels in Wyoming: a microphone endpoint for satellites, a client for services.

Wyoming (:mod:`musiclib.wyoming_protocol`) is what Home Assistant's voice
pipeline speaks: wake-word detectors, speech recognisers and satellites. This
module is the two trio shells around that codec.

**The microphone endpoint** (``serve --wyoming HOST:PORT``,
:func:`serve_wyoming`). A connection is a listener of one channel, in the
format Wyoming services take (16 kHz, 16-bit, mono, unless
``--wyoming-format NAME=RATE[/CHANNELS]`` says otherwise for that channel),
converted by the channel's shared converter (``Channels.feed``), so a
satellite and a ``listen --rate 16000`` share one ffmpeg. Audio is sent as it
comes: ``audio-start`` first, then an ``audio-chunk`` per hub chunk, its
``timestamp`` the chunk's position on the channel's clock in milliseconds,
and ``audio-stop`` when the channel ends (then the connection closes, and a
satellite reconnects as it does to any microphone service).

* Which channel: ``wyoming-satellite --mic-uri tcp://...`` connects and only
  reads, so a connection gets a channel without asking: the one named by
  ``--wyoming-channel``, by default the first ``--channel`` of ``serve``, else
  (only published channels) the first by name. ``describe`` is answered at any
  time with an ``info`` listing every channel as a ``mic`` program, and a
  client that wants another one sends ``select-program`` with its name: the
  current stream ends with ``audio-stop`` and the chosen one begins with
  ``audio-start``.
* A slow service is a slow listener: its subscription is bounded by
  ``--wyoming-latency`` (milliseconds of audio), the hub drops the oldest
  audio beyond it, and the loss shows in the timestamps, which jump by
  exactly the frames lost; a service that stays behind for ``--lag-limit``
  seconds is cut like any listener (an ``error`` event, then the close).
* Wyoming has no authentication. The endpoint binds 127.0.0.1 unless told
  otherwise and warns when it listens beyond this machine.

**The client** (``listen CHANNEL --wyoming tcp://HOST:PORT``,
:func:`listen_to_service`). The musiclib side is :func:`musiclib.liveclient.listen`
itself (reconnection, gaps filled with silence, epochs): its sink hands the
samples to the Wyoming side through a small bounded queue, so a service that
reads slowly makes this client a slow listener of the server, whose drops
come back as silence and keep the service's clock exact. The Wyoming side
asks the service's ``info`` first (a wake-word service must list a ``wake``
program, a recogniser an ``asr`` one), then

* wake word: ``detect`` (the ``--wake`` names), ``audio-start`` and audio
  for as long as the listen runs; each ``detection`` is reported with the
  channel time it names;
* ``--transcribe``: each utterance, found by its loudness (it ends after
  :data:`SILENCE_MS` of quiet or after ``--duration`` seconds), goes on a
  connection of its own (``transcribe``, ``audio-start``, audio,
  ``audio-stop``), as recognisers close the connection after their
  ``transcript``.

A wake-word service that goes away (restarted, upgraded) is connected to
again by itself, after :data:`RECONNECT_DELAYS`; the audio of that time is not
buffered for it (a detector wants the present).
"""

from __future__ import annotations

import array
import contextlib
import ipaddress
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import trio

from . import wyoming_protocol as wp
from .decode import AudioFormat
from .errors import (
    ConnectionLost,
    ListenError,
    MusiclibError,
    NotFound,
    TransportError,
    UsageError,
    WyomingProtocolError,
    WyomingServiceError,
    single_errors,
)
from .live.hub import Chunk, End, Gap, Subscription
from .transport import Transport, open_stream

if TYPE_CHECKING:
    from .live.channels import Channel, Channels
    from .liveclient import Connector, ListenOptions, ListenStats, Sink
    from .protocol import ListenStart

log = logging.getLogger("musiclib.wyoming")

#: the Wyoming endpoint's port when ``--wyoming`` gives none (Wyoming's mic services
#: conventionally use 10600)
DEFAULT_PORT = 10600
#: Wyoming connections served at once by the endpoint; one more gets an ``error`` (busy)
MAX_CONNECTIONS = 64
#: seconds a send to a Wyoming peer may take before it is given up
SEND_TIMEOUT = 30.0
#: seconds a service has to answer ``describe``
INFO_TIMEOUT = 10.0
#: seconds a recogniser has to answer an utterance with its ``transcript``
TRANSCRIPT_TIMEOUT = 60.0
#: seconds a wake-word service has, after the listen ended, to answer the last audio
LAST_ANSWER_WAIT = 2.0
#: bytes read from a Wyoming peer at once
RECEIVE_SIZE = 64 * 1024
#: pauses before connecting again to a wake-word service that went away; the last repeats
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0)
#: chunks queued between the musiclib listen and the Wyoming side (about 0.6 s at 20 ms)
QUEUE_CHUNKS = 32
#: utterances (their connections) a recogniser may be working on at once
MAX_UTTERANCES = 2

# --- how --transcribe finds an utterance: loudness, not a speech model --------------
#: the RMS (of 16-bit samples) from which a chunk counts as sound
SPEECH_RMS = 300
#: quiet after sound that ends an utterance, in ms
SILENCE_MS = 700
#: audio kept from before the first loud chunk, in ms (the onset of the first word)
PREROLL_MS = 300


# =====================================================================================
# The endpoint: channels as Wyoming microphones
# =====================================================================================


@dataclass(frozen=True)
class WyomingConfig:
    """``serve --wyoming``: where the endpoint listens and what it sends."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: the channel a connection gets without asking (``None``: see the module's docstring)
    channel: str | None = None
    #: channels sent in another format than 16 kHz mono s16le (``--wyoming-format``)
    formats: dict[str, AudioFormat] = field(default_factory=dict)
    #: milliseconds a service may fall behind before its oldest audio is dropped
    max_latency_ms: int = 500


#: what a Wyoming mic service sends unless told otherwise (what wake and ASR services take)
ENDPOINT_FORMAT = AudioFormat("s16le", 16000, 1)
_WIDTHS = {"s16le": 2, "s32le": 4}


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``tcp://HOST:PORT``, or ``HOST``: port 10600) -> ``(host, port)``."""
    from .client import parse_address

    text = text.strip().removeprefix("tcp://")
    if ":" not in text.strip("[]") or text.endswith("]"):
        text = f"{text}:{DEFAULT_PORT}"
    zero = text.endswith(":0")  # port 0: any free one (the log says which)
    try:
        host, port = parse_address(text[:-1] + "1" if zero else text)
    except UsageError as exc:
        raise UsageError(f"--wyoming: {exc}") from None
    return host, 0 if zero else port


def parse_format(text: str) -> tuple[str, AudioFormat]:
    """``NAME=RATE[/CHANNELS]`` (``--wyoming-format``) -> ``(name, format)``, s16le."""
    name, sep, spec = text.partition("=")
    rate_text, _, channels_text = spec.partition("/")
    try:
        fmt = AudioFormat("s16le", int(rate_text), int(channels_text or 1))
    except ValueError:
        fmt = None
    if not sep or not name.strip() or fmt is None or fmt.problem():
        raise UsageError(
            f"--wyoming-format {text!r}: expected NAME=RATE[/CHANNELS], e.g. hall=48000/2"
        )
    return name.strip(), fmt


def _pcm(fmt: AudioFormat) -> wp.PcmFormat:
    return wp.PcmFormat(fmt.sample_rate, _WIDTHS[fmt.sample_format], fmt.channels)


async def serve_wyoming(
    channels: Channels,
    config: WyomingConfig,
    *,
    default_channel: str | None = None,
    lag_limit: float = 10.0,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``channels`` as Wyoming microphones on ``config.host:port`` until cancelled.

    ``task_status.started`` receives the bound addresses (``port=0`` picks
    one). ``default_channel`` is the one a connection gets when
    ``config.channel`` names none (``serve`` passes its first ``--channel``).
    """
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    except OSError as exc:
        from .server import listen_reason

        where = f"{config.host}:{config.port}"
        raise ListenError(f"--wyoming: cannot listen on {where}: {listen_reason(exc)}") from None
    addresses = []
    for lst in listeners:
        host, port, *_ = lst.socket.getsockname()
        addresses.append((host, port))
    if not all(ipaddress.ip_address(h).is_loopback for h, _ in addresses):
        log.warning(
            "the Wyoming endpoint listens beyond this machine on %s: Wyoming has no "
            "authentication, anyone who can reach it hears every channel",
            config.host,
        )
    for host, port in addresses:
        log.info("Wyoming microphones on %s:%d", f"[{host}]" if ":" in host else host, port)
    endpoint = _Endpoint(channels, config, config.channel or default_channel, lag_limit)
    with single_errors():
        async with trio.open_nursery() as nursery:
            task_status.started(addresses)
            await trio.serve_listeners(endpoint.handle, listeners, handler_nursery=nursery)


class _Endpoint:
    def __init__(
        self, channels: Channels, config: WyomingConfig, default: str | None, lag_limit: float
    ) -> None:
        self.channels = channels
        self.config = config
        self.default = default
        self.lag_limit = lag_limit
        self.connections = 0
        self.active = 0

    def format_of(self, name: str) -> AudioFormat:
        return self.config.formats.get(name, ENDPOINT_FORMAT)

    def pcm_of(self, name: str) -> wp.PcmFormat:
        return _pcm(self.format_of(name))

    def info(self) -> wp.Event:
        from . import __version__

        listed = [
            (c.name, f"musiclib channel {c.name} ({c.source}, {c.state})", self.pcm_of(c.name))
            for c in self.channels.infos(time.time_ns())
        ]
        return wp.mic_info(listed, __version__)

    def pick(self, wanted: str | None) -> Channel:
        """The channel a connection gets: the one it selected, else the default, else the
        first by name; ``NotFound`` when there is none."""
        name = wanted or self.default
        if name is None:
            infos = self.channels.infos(0)
            if not infos:
                raise NotFound("no channel to send: the server has no live channel now")
            name = infos[0].name
        return self.channels.get(name)

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection; whatever happens to it stays with it."""
        self.connections += 1
        try:
            host, port, *_ = stream.socket.getpeername()
            peer = f"{host}:{port}"
        except OSError:
            peer = f"wyoming connection {self.connections}"
        transport = Transport(stream, peer=peer)
        session = _MicSession(self, transport, peer)
        self.active += 1
        try:
            if self.active > MAX_CONNECTIONS:
                log.warning("%s: refused, %d Wyoming connections already", peer, MAX_CONNECTIONS)
                with trio.move_on_after(1.0):
                    await session.send(wp.error("too many connections", "busy"))
                return
            await session.run()
        except (TransportError, WyomingProtocolError) as exc:
            log.info("%s: %s", peer, exc)
        except MusiclibError as exc:
            log.warning("%s: %s", peer, exc)
        except Exception:  # a bug: this connection ends, the endpoint goes on
            log.exception("%s: the Wyoming connection failed", peer)
        finally:
            self.active -= 1
            await transport.aclose()


class _MicSession:
    """One Wyoming connection to the endpoint: a reader of the client's events and a
    sender of one channel's audio, one writer at a time."""

    def __init__(self, endpoint: _Endpoint, transport: Transport, peer: str) -> None:
        self.endpoint = endpoint
        self.transport = transport
        self.peer = peer
        self.decoder = wp.WyomingDecoder()
        self.send_lock = trio.Lock()
        #: the channel the client selected (``select-program``)
        self.selected: str | None = None
        #: the subscription being streamed, woken when the client selects another channel
        self.listening: Subscription | None = None

    async def send(self, event: wp.Event) -> None:
        async with self.send_lock:
            await self.transport.send(wp.encode(event), SEND_TIMEOUT)

    async def run(self) -> None:
        with single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.read_events, nursery.cancel_scope)
                await self.stream_channels()
                nursery.cancel_scope.cancel()

    async def read_events(self, done: trio.CancelScope) -> None:
        """Answer ``describe``, follow ``select-program``; the client's close ends all."""
        while True:
            event = self.decoder.next_event()
            if isinstance(event, wp.NeedData):
                self.decoder.receive_data(await self.transport.receive(RECEIVE_SIZE, math.inf))
                continue
            if isinstance(event, wp.Closed):
                log.info("%s: the Wyoming client left", self.peer)
                done.cancel()
                return
            if event.type == "describe":
                await self.send(self.endpoint.info())
            elif event.type == "select-program":
                name = wp.parse_select(event)
                if name not in self.endpoint.channels:
                    await self.send(wp.error(f"no channel {name!r}", "not_found"))
                else:
                    self.selected = name
                    if self.listening is not None:
                        self.listening.wake()  # the stream notices between two chunks
            else:
                log.debug("%s: ignored a Wyoming %r event", self.peer, event.type)

    async def stream_channels(self) -> None:
        """Stream the chosen channel; again with another one after ``select-program``."""
        while True:
            try:
                channel = self.endpoint.pick(self.selected)
            except NotFound as exc:
                await self.send(wp.error(str(exc), "not_found"))
                return
            if await self.stream(channel):
                return

    async def stream(self, channel: Channel) -> bool:
        """``audio-start``, chunks, ``audio-stop``: ``True`` when the channel ended (or
        this client was cut), ``False`` when the client selected another channel.

        A switch is noticed between two chunks, never during a send: a send cut
        half way would leave half an event on the wire.
        """
        fmt = self.endpoint.format_of(channel.name)
        pcm = _pcm(fmt)
        rate = fmt.sample_rate
        latency = self.endpoint.config.max_latency_ms
        backlog = max(1, latency * rate // 1000)
        async with self.endpoint.channels.feed(channel, fmt) as hub:
            with hub.subscribe(
                max_backlog_frames=backlog, lag_limit=self.endpoint.lag_limit
            ) as sub:
                cut = trio.CancelScope()
                sub.on_cut = cut.cancel  # a send stuck on a service that stopped reading
                self.listening = sub
                position = sub.start_position
                log.info(
                    "%s: Wyoming mic %s as %d Hz %d ch (max latency %d ms)",
                    self.peer,
                    channel.name,
                    rate,
                    fmt.channels,
                    latency,
                )
                end: End | None = None
                with cut:
                    await self.send(wp.audio_start(pcm, wp.ms_of(position, rate)))
                    while end is None:
                        item = sub.next_nowait()
                        if item is None:
                            if self.selected not in (None, channel.name):
                                break
                            await sub.wait()
                        elif isinstance(item, Chunk):
                            ts = wp.ms_of(item.position, rate)
                            await self.send(wp.audio_chunk(pcm, item.data, ts))
                            position = item.position + len(item.data) // fmt.bytes_per_frame
                        elif isinstance(item, Gap):
                            # the next chunk's timestamp jumps by exactly this much
                            log.info(
                                "%s: fell behind, %d frames (%.0f ms) dropped at frame %d",
                                self.peer,
                                item.frames,
                                item.frames * 1000 / rate,
                                item.position,
                            )
                        else:
                            end = item
                self.listening = None
                if cut.cancelled_caught:  # the send was stopped half way: nothing may follow
                    log.info("%s: cut, it stopped reading for too long", self.peer)
                    return True
                if end is not None and end.reason == "too_slow":
                    log.info("%s: cut: %s", self.peer, end.message)
                    await self.send(wp.error(end.message, "too_slow"))
                    return True
                await self.send(wp.audio_stop(wp.ms_of(position, rate)))
                return end is not None


# =====================================================================================
# The client: a channel to a Wyoming service
# =====================================================================================


@dataclass(frozen=True)
class ServiceTarget:
    """``listen --wyoming URI``: which service, and what to ask of it."""

    host: str
    port: int
    mode: Literal["detect", "transcribe"] = "detect"
    #: wake words to ask for (``--wake``); empty: whatever the service listens for
    wake: tuple[str, ...] = ()
    #: ``--transcribe``: the longest utterance, in seconds (``--duration``)
    max_utterance: float | None = None
    #: ``--language`` for a recogniser
    language: str | None = None

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_service_uri(text: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` -> ``(host, port)``; ``UsageError`` otherwise."""
    from .client import parse_address

    scheme, sep, rest = text.partition("://")
    if not sep or scheme != "tcp" or not rest:
        raise UsageError(f"--wyoming {text!r}: expected tcp://HOST:PORT")
    if ":" not in rest.strip("[]") or rest.endswith("]"):
        raise UsageError(f"--wyoming {text!r}: expected tcp://HOST:PORT (the port is needed)")
    try:
        return parse_address(rest)
    except UsageError as exc:
        raise UsageError(f"--wyoming {text!r}: {exc}") from None


@dataclass(frozen=True)
class Answer:
    """What a service said that ``listen --wyoming`` reports."""

    kind: Literal["detection", "transcript", "not-detected", "error"]
    #: the wake word (detection)
    name: str | None = None
    #: channel time in seconds: when the wake word fired, when the utterance began
    at: float | None = None
    #: a transcript's text, an error's message
    text: str | None = None
    #: an utterance's length in seconds
    length: float | None = None

    def as_dict(self) -> dict[str, object]:
        """The answer as one JSON object (``--json``)."""
        out: dict[str, object] = {"type": self.kind}
        for key in ("name", "at", "text", "length"):
            value = getattr(self, key)
            if value is not None:
                out[key] = round(value, 3) if isinstance(value, float) else value
        return out


class ServiceConnection:
    """One connection to a Wyoming service: events out, events in, under deadlines."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.decoder = wp.WyomingDecoder()

    async def send(self, event: wp.Event) -> None:
        await self.transport.send(wp.encode(event), SEND_TIMEOUT)

    async def next_event(self, timeout: float = math.inf) -> wp.Event:
        """The next event; ``ConnectionLost`` when the service closed."""
        with trio.fail_after(timeout) if timeout != math.inf else contextlib.nullcontext():
            while True:
                event = self.decoder.next_event()
                if isinstance(event, wp.Event):
                    return event
                if isinstance(event, wp.Closed):
                    raise ConnectionLost(f"the Wyoming service at {self.transport.peer} closed")
                self.decoder.receive_data(await self.transport.receive(RECEIVE_SIZE, math.inf))

    async def describe(self) -> wp.ServiceInfo:
        """Ask ``describe``; the ``info`` (other events before it are skipped)."""
        await self.send(wp.describe())
        try:
            with trio.fail_after(INFO_TIMEOUT):
                while True:
                    event = await self.next_event()
                    if event.type == "info":
                        return wp.parse_info(event)
        except trio.TooSlowError:
            raise WyomingServiceError(
                f"the Wyoming service at {self.transport.peer} did not describe itself "
                f"within {INFO_TIMEOUT:g} s"
            ) from None


@contextlib.asynccontextmanager
async def open_service(
    target: ServiceTarget,
) -> AsyncIterator[tuple[ServiceConnection, wp.ServiceInfo]]:
    """A connection to ``target``'s service, its ``info`` checked against the mode:
    ``WyomingServiceError`` when it offers nothing of the kind asked."""
    stream = await open_stream(target.host, target.port, timeout=10.0, address=target.uri)
    transport = Transport(stream, peer=target.uri)
    try:
        conn = ServiceConnection(transport)
        info = await conn.describe()
        offers = ", ".join(info.kinds) or "nothing"
        if target.mode == "detect":
            if not info.wake_models:
                raise WyomingServiceError(
                    f"{target.uri} offers no wake-word detection (it offers: {offers})"
                )
            missing = [w for w in target.wake if w not in info.wake_models]
            if missing:
                raise WyomingServiceError(
                    f"{target.uri} has no wake word {missing[0]!r} "
                    f"(it has: {', '.join(info.wake_models)})"
                )
        elif not info.asr_programs:
            raise WyomingServiceError(
                f"{target.uri} offers no speech recognition (it offers: {offers})"
            )
        yield conn, info
    finally:
        await transport.aclose()


@dataclass
class _Audio:
    """Samples from the listen, stamped with their position on the channel's clock."""

    position: int
    data: bytes


class _ServiceSink:
    """The listen's sink: stamps the samples and queues them for the Wyoming side.

    A full queue makes :meth:`write` wait: the service is slow, and this
    client becomes a slow listener of the musiclib server (whose drops come
    back as silence, so the service's clock stays exact).
    """

    def __init__(self, send: trio.MemorySendChannel[_Audio], bytes_per_frame: int) -> None:
        self.send_channel = send
        self.bytes_per_frame = bytes_per_frame
        self.position = 0

    def on_start(self, start: ListenStart, continues: bool) -> None:
        if not continues:
            self.position = start.position

    async def write(self, data: bytes) -> bool:
        try:
            await self.send_channel.send(_Audio(self.position, data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False  # the Wyoming side gave up: the listen stops
        self.position += len(data) // self.bytes_per_frame
        return True

    async def close(self) -> None:
        pass


async def listen_to_service(
    connect: Connector,
    channel: str,
    options: ListenOptions,
    target: ServiceTarget,
    emit: Callable[[Answer], None],
    *,
    retry_delays: Sequence[float] = (),
    reconnect_delays: Sequence[float] = RECONNECT_DELAYS,
) -> ListenStats:
    """Listen to ``channel`` and feed it to ``target``'s service; ``emit`` each answer.

    The service is connected to (and its ``info`` checked) before the listen
    starts, so a wrong address or service fails at once. Runs until the
    listen ends (``--duration``, the channel's end, Ctrl-C); a wake-word
    service then gets ``audio-stop`` and :data:`LAST_ANSWER_WAIT` seconds to
    answer, a recogniser the end of the current utterance.
    """
    from .liveclient import listen

    fmt = AudioFormat("s16le", wp.SPEECH_FORMAT.rate, wp.SPEECH_FORMAT.channels)
    options = _speech_options(options, fmt)
    send, receive = trio.open_memory_channel[_Audio](QUEUE_CHUNKS)
    sink = _ServiceSink(send, fmt.bytes_per_frame)

    @contextlib.asynccontextmanager
    async def open_sink(_fmt: AudioFormat, _frames: int | None) -> AsyncIterator[Sink]:
        yield sink

    if target.mode == "detect":
        side = _WakeSide(target, receive, emit, list(reconnect_delays))
    else:
        side = _TranscribeSide(target, receive, emit)  # type: ignore[assignment]
    await side.check()
    stats: ListenStats | None = None
    with single_errors():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side.run)
            try:
                async with send:
                    stats = await listen(
                        connect,
                        channel,
                        options,
                        open_sink,
                        retry_delays=retry_delays,
                        on_start=sink.on_start,
                    )
            except BaseException:
                nursery.cancel_scope.cancel()
                raise
    assert stats is not None
    return stats


def _speech_options(options: ListenOptions, fmt: AudioFormat) -> ListenOptions:
    import dataclasses

    return dataclasses.replace(
        options,
        sample_format=fmt.sample_format,
        sample_rate=fmt.sample_rate,
        channels=fmt.channels,
        fill_gaps=True,  # a detector's clock must stay the channel's
    )


class _WakeSide:
    """The Wyoming side of a wake-word listen: one connection, again after each loss."""

    def __init__(
        self,
        target: ServiceTarget,
        audio: trio.MemoryReceiveChannel[_Audio],
        emit: Callable[[Answer], None],
        delays: list[float],
    ) -> None:
        self.target = target
        self.audio = audio
        self.emit = emit
        self.delays = delays
        self.pcm = wp.SPEECH_FORMAT
        self.last_position = 0

    async def check(self) -> None:
        async with open_service(self.target):
            pass

    async def run(self) -> None:
        failures = 0
        with self.audio:
            while True:
                try:
                    async with open_service(self.target) as (conn, _info):
                        if failures:
                            log.warning("%s: connected again", self.target.uri)
                        failures = 0
                        if await self.session(conn):
                            return
                except (TransportError, WyomingProtocolError, WyomingServiceError) as exc:
                    delay = self.delays[min(failures, len(self.delays) - 1)] if self.delays else 1.0
                    if failures == 0:
                        log.warning("%s; connecting again (every %g s at most)", exc, delay)
                    failures += 1
                    if await self.skip_for(delay):
                        return

    async def skip_for(self, seconds: float) -> bool:
        """Drop the audio of ``seconds`` (nobody hears it); ``True`` when the listen ended."""
        with trio.move_on_after(seconds):
            async for item in self.audio:
                self.last_position = item.position
            return True
        return False

    async def session(self, conn: ServiceConnection) -> bool:
        """Feed the service until the listen ends (``True``) or the connection fails."""
        rate = self.pcm.rate
        await conn.send(wp.detect(list(self.target.wake) or None))
        await conn.send(wp.audio_start(self.pcm, wp.ms_of(self.last_position, rate)))
        with single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.read_answers, conn)
                async for item in self.audio:
                    self.last_position = item.position
                    await conn.send(
                        wp.audio_chunk(self.pcm, item.data, wp.ms_of(item.position, rate))
                    )
                end_ms = wp.ms_of(self.last_position, rate)
                await conn.send(wp.audio_stop(end_ms))
                await trio.sleep(LAST_ANSWER_WAIT)  # answers to the last audio still count
                nursery.cancel_scope.cancel()
        return True

    async def read_answers(self, conn: ServiceConnection) -> None:
        rate = self.pcm.rate
        while True:
            event = await conn.next_event()
            if event.type == "detection":
                found = wp.parse_detection(event)
                ms = found.timestamp_ms
                at = ms / 1000 if ms is not None else self.last_position / rate
                self.emit(Answer("detection", name=found.name or "?", at=at))
            elif event.type == "not-detected":
                self.emit(Answer("not-detected"))
            elif event.type == "error":
                self.emit(Answer("error", text=wp.parse_error(event)))
            else:
                log.debug("%s: ignored a Wyoming %r event", self.target.uri, event.type)


class Utterances:
    """Where utterances begin and end in a stream of 16-bit mono chunks (sans-IO).

    Loudness only (RMS against :data:`SPEECH_RMS`): enough to cut a
    recogniser's input on pauses, not a speech detector. :meth:`feed` returns
    what to do with a chunk: ``("begin", position, preroll)`` then the chunk
    as ``("audio", position, data)``, and ``("end", position, b"")`` after
    ``silence_ms`` of quiet or ``max_frames`` of utterance.
    """

    def __init__(
        self,
        rate: int,
        *,
        max_frames: int | None = None,
        silence_ms: int = SILENCE_MS,
        preroll_ms: int = PREROLL_MS,
        threshold: int = SPEECH_RMS,
    ) -> None:
        self.rate = rate
        self.max_frames = max_frames
        self.silence_frames = silence_ms * rate // 1000
        self.preroll_frames = preroll_ms * rate // 1000
        self.threshold = threshold
        self.active = False
        self.frames = 0  # frames in the current utterance
        self.quiet = 0  # frames of quiet at its end
        self._recent: list[_Audio] = []  # before an utterance: the preroll kept

    def feed(self, position: int, data: bytes) -> list[tuple[str, int, bytes]]:
        frames = len(data) // 2
        loud = rms16(data) >= self.threshold
        out: list[tuple[str, int, bytes]] = []
        if not self.active:
            if not loud:
                self._recent.append(_Audio(position, data))
                kept = 0
                for i in range(len(self._recent) - 1, -1, -1):
                    kept += len(self._recent[i].data) // 2
                    if kept >= self.preroll_frames:
                        del self._recent[:i]
                        break
                return out
            pre = (
                b"".join(a.data for a in self._recent)[-self.preroll_frames * 2 :]
                if self.preroll_frames
                else b""
            )
            begin = position - len(pre) // 2
            self._recent.clear()
            self.active, self.frames, self.quiet = True, 0, 0
            out.append(("begin", begin, b""))
            if pre:
                out.append(("audio", begin, pre))
                self.frames += len(pre) // 2
        if self.max_frames is not None and self.frames + frames >= self.max_frames:
            take = self.max_frames - self.frames
            out.append(("audio", position, data[: take * 2]))
            out.append(("end", position + take, b""))
            self.active = False
            rest = data[take * 2 :]
            if rest:
                out += self.feed(position + take, rest)
            return out
        out.append(("audio", position, data))
        self.frames += frames
        self.quiet = 0 if loud else self.quiet + frames
        if self.quiet >= self.silence_frames:
            out.append(("end", position + frames, b""))
            self.active = False
        return out


def rms16(data: bytes) -> float:
    """Root mean square of 16-bit little-endian samples."""
    samples = array.array("h")
    samples.frombytes(data[: len(data) - len(data) % 2])
    if sys.byteorder == "big":
        samples.byteswap()
    if not samples:
        return 0.0
    return math.sqrt(sum(s * s for s in samples) / len(samples))


class _TranscribeSide:
    """The Wyoming side of ``--transcribe``: an utterance per connection."""

    def __init__(
        self,
        target: ServiceTarget,
        audio: trio.MemoryReceiveChannel[_Audio],
        emit: Callable[[Answer], None],
    ) -> None:
        self.target = target
        self.audio = audio
        self.emit = emit
        self.pcm = wp.SPEECH_FORMAT
        rate = self.pcm.rate
        max_frames = None if target.max_utterance is None else round(target.max_utterance * rate)
        self.cutter = Utterances(rate, max_frames=max_frames)
        self.busy = trio.Semaphore(MAX_UTTERANCES)

    async def check(self) -> None:
        async with open_service(self.target):
            pass

    async def run(self) -> None:
        current: trio.MemorySendChannel[_Audio] | None = None
        with single_errors():
            async with trio.open_nursery() as nursery:
                with self.audio:
                    async for item in self.audio:
                        for what, position, data in self.cutter.feed(item.position, item.data):
                            if what == "begin":
                                # a full house of utterances waits: this listen becomes slow
                                await self.busy.acquire()
                                current, pending = trio.open_memory_channel[_Audio](
                                    TRANSCRIPT_QUEUE
                                )
                                nursery.start_soon(self.utterance, position, pending)
                            elif what == "audio" and current is not None:
                                try:
                                    await current.send(_Audio(position, data))
                                except trio.BrokenResourceError:  # that utterance failed (said)
                                    current = None
                            elif what == "end" and current is not None:
                                await current.aclose()
                                current = None
                if current is not None:  # the listen ended mid-utterance: it ends there
                    await current.aclose()

    async def utterance(self, begin: int, audio: trio.MemoryReceiveChannel[_Audio]) -> None:
        rate = self.pcm.rate
        frames = 0
        try:
            with audio:
                async with open_service(self.target) as (conn, _info):
                    await conn.send(wp.transcribe(self.target.language))
                    await conn.send(wp.audio_start(self.pcm, wp.ms_of(begin, rate)))
                    async for item in audio:
                        await conn.send(
                            wp.audio_chunk(self.pcm, item.data, wp.ms_of(item.position, rate))
                        )
                        frames += len(item.data) // self.pcm.bytes_per_frame
                    await conn.send(wp.audio_stop(wp.ms_of(begin + frames, rate)))
                    with trio.fail_after(TRANSCRIPT_TIMEOUT):
                        while True:
                            event = await conn.next_event()
                            if event.type == "transcript":
                                text = wp.parse_transcript(event)
                                self.emit(
                                    Answer(
                                        "transcript",
                                        at=begin / rate,
                                        text=text,
                                        length=frames / rate,
                                    )
                                )
                                return
                            if event.type == "error":
                                self.emit(Answer("error", text=wp.parse_error(event)))
                                return
        except trio.TooSlowError:
            self.emit(Answer("error", text=f"{self.target.uri} sent no transcript in time"))
        except (TransportError, WyomingProtocolError, WyomingServiceError) as exc:
            self.emit(Answer("error", text=f"an utterance was not transcribed: {exc}"))
        finally:
            self.busy.release()


#: audio queued for one utterance's connection (20 ms chunks: a minute)
TRANSCRIPT_QUEUE = 3000


def format_answer(answer: Answer) -> str:
    """One line for a human; the service's words escaped for the terminal."""
    from .ui import printable

    if answer.kind == "detection":
        return f"detection {printable(answer.name or '?')} at {answer.at or 0.0:.2f} s"
    if answer.kind == "transcript":
        return f"transcript: {printable(answer.text or '')}"
    if answer.kind == "not-detected":
        return "not-detected"
    return f"error: {printable(answer.text or '')}"
