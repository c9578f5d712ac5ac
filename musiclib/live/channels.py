"""A server's live channels: what each one reads, and the life of its source.

A channel is a name, one source and one :class:`~musiclib.live.hub.Hub`.
Sources configured with ``serve --channel NAME=SOURCE`` start with the server
and run until it stops; a publishing client creates its channel when it
starts and ends it when it leaves (a second publisher for the same name is
refused with ``channel_busy``). Listeners that want another format than the
channel's own share one converter per distinct format (one ffmpeg each),
started for the first such listener and stopped when the last one leaves.

``NAME=SOURCE`` forms (the CLI's ``--channel``)::

    mic                     the default microphone
    mic:NAME                an input device by (part of) its name, or its index
    track:QUERY             the tracks QUERY names, in album order, played once
    loop:QUERY              the same, again and again
    ffmpeg:ARGS             any ffmpeg input, e.g. ``-re -i /srv/feed.ogg``
    relay:HOST:PORT[/NAME]  another server's channel NAME (default: this one's name),
                            as that server numbers it (:mod:`musiclib.live.relay`)

Any of them may end with ``?rate=16000&channels=1&format=s16le`` to set the
channel's own format (defaults: a microphone 16 kHz mono, the speech
pipelines' format; a relay its origin channel's own format, asked of the
origin when ``serve`` starts; every other source 48 kHz stereo; always
``s16le``). The format is fixed when the server starts, so a channel exists
(``waiting``) before its first audio, and tracks of any format play on it. A
relay also takes ``latency=MS`` (its max latency as the origin's listener),
``token-file=PATH`` (the origin's token, when it is not this server's own),
``tls=1`` and ``cafile=PEM`` (TLS to the origin).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..decode import AudioFormat
from ..errors import Ambiguous, ChannelBusy, MusiclibError, NotFound, UsageError
from ..protocol import CHANNEL_NAME_RULE, ChannelInfo, TrackInfo, channel_name_ok
from .hub import Hub
from .sources import default_chunk_frames

if TYPE_CHECKING:
    from ..library import Library

log = logging.getLogger("musiclib.live")

#: the kinds of source ``--channel`` accepts
SOURCE_KINDS = ("mic", "track", "loop", "ffmpeg", "relay")
#: the ``?key=value`` options every kind takes, and those only a relay takes
FORMAT_OPTIONS = ("rate", "channels", "format")
RELAY_OPTIONS = ("latency", "token-file", "tls", "cafile")
#: a microphone's default format: speech pipelines' (wake word, recognisers)
MIC_DEFAULT = AudioFormat("s16le", 16000, 1)
#: the default of every other source: what players and speakers take as they are
MUSIC_DEFAULT = AudioFormat("s16le", 48000, 2)


def channel_format(spec: ChannelSpec) -> AudioFormat:
    """The channel's own format: the spec's overrides on top of its kind's default.

    A relay has no default: its format is its origin's, which ``serve`` asks
    for when it starts (:func:`musiclib.live.relay.prepare_relays`) unless the
    spec gives it; ``UsageError`` when neither happened.
    """
    if spec.kind == "relay" and (spec.sample_rate is None or spec.channels is None):
        raise UsageError(
            f"--channel {spec.name}={spec.description}: the origin's format is not known: "
            "give it with ?rate=R&channels=C (and &format=F unless s16le)"
        )
    base = MIC_DEFAULT if spec.kind == "mic" else MUSIC_DEFAULT
    return AudioFormat(
        spec.sample_format or base.sample_format,
        spec.sample_rate or base.sample_rate,
        spec.channels or base.channels,
    )


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One ``--channel NAME=SOURCE`` as given: the kind of source, its argument, formats."""

    name: str
    kind: str
    arg: str = ""
    sample_format: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    #: a relay's options (``?latency=``, ``?token-file=``, ``?tls=``, ``?cafile=``)
    relay: RelayOptions | None = None

    @property
    def description(self) -> str:
        """The source as ``channels`` shows it."""
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


@dataclass(frozen=True, slots=True)
class RelayOptions:
    """Where a relay's origin is and how to reach it (``relay:HOST:PORT[/NAME]?...``)."""

    host: str
    port: int
    #: the origin's channel
    channel: str
    #: the relay's max latency as a listener of the origin (``?latency=MS``)
    max_latency_ms: int
    token_file: str | None = None
    tls: bool = False
    cafile: str | None = None
    #: the token presented to the origin, set when ``serve`` starts (never printed)
    token: str | None = field(default=None, repr=False, compare=False)

    @property
    def address(self) -> str:
        """``HOST:PORT``, with an IPv6 host in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_channel(text: str) -> ChannelSpec:
    """``NAME=SOURCE[?rate=R&channels=C&format=F]`` -> :class:`ChannelSpec`; ``UsageError``
    with the reason otherwise."""
    name, sep, source = text.partition("=")
    name = name.strip()
    if not sep or not source.strip():
        raise UsageError(f"--channel {text!r}: expected NAME=SOURCE (e.g. kitchen=mic)")
    if not channel_name_ok(name):
        raise UsageError(f"--channel {text!r}: {CHANNEL_NAME_RULE}")
    options: dict[str, str] = {}
    relay = source.strip().startswith("relay:")
    base, q, tail = source.rpartition("?")
    if q:
        pairs = [p.partition("=") for p in tail.split("&")]
        allowed = FORMAT_OPTIONS + RELAY_OPTIONS if relay else FORMAT_OPTIONS
        if relay:  # nothing else may hold a '?': an unknown option is a mistake to name
            bad = [k for k, s, v in pairs if k not in allowed or not s or not v]
            if bad:
                known = ", ".join(allowed)
                raise UsageError(
                    f"--channel {text!r}: bad option {bad[0]!r} (KEY=VALUE, KEY one of {known})"
                )
        if pairs and all(k in allowed and s and v for k, s, v in pairs):
            options = {k: v for k, _, v in pairs}
            source = base
    kind, _, arg = source.partition(":")
    kind = kind.strip()
    if kind not in SOURCE_KINDS:
        raise UsageError(
            f"--channel {text!r}: unknown source {kind!r} (one of {', '.join(SOURCE_KINDS)})"
        )
    arg = arg.strip()
    if kind != "ffmpeg" and len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "\"'":
        arg = arg[1:-1]  # quoted where no shell removed the quotes (a config file, the env)
    if kind in ("track", "loop", "ffmpeg", "relay") and not arg:
        raise UsageError(f"--channel {text!r}: {kind}: needs an argument")
    try:
        rate = int(options["rate"]) if "rate" in options else None
        channels = int(options["channels"]) if "channels" in options else None
    except ValueError:
        raise UsageError(f"--channel {text!r}: rate and channels are whole numbers") from None
    relay_options = None
    if kind == "relay":
        relay_options = _relay_options(text, name, arg, options)
        host = relay_options.address
        arg = f"{host}/{relay_options.channel}"
    spec = ChannelSpec(name, kind, arg, options.get("format"), rate, channels, relay_options)
    probe = AudioFormat(spec.sample_format or "s16le", rate or 16000, channels or 1)
    problem = probe.problem()
    if problem:
        raise UsageError(f"--channel {text!r}: {problem}")
    if kind == "ffmpeg":
        try:
            shlex.split(arg)
        except ValueError as exc:
            raise UsageError(f"--channel {text!r}: cannot split its arguments: {exc}") from None
    return spec


def _relay_options(text: str, name: str, arg: str, options: dict[str, str]) -> RelayOptions:
    """``HOST:PORT[/CHANNEL]`` and a relay's options, checked; ``UsageError`` otherwise."""
    from ..client import parse_address
    from .relay import DEFAULT_LATENCY_MS

    where, slash, origin_channel = arg.partition("/")
    origin_channel = origin_channel.strip() if slash else name
    if not channel_name_ok(origin_channel):
        raise UsageError(f"--channel {text!r}: the origin's channel: {CHANNEL_NAME_RULE}")
    if not where.strip() or ":" not in where:
        raise UsageError(f"--channel {text!r}: relay: expected HOST:PORT[/CHANNEL]")
    try:
        host, port = parse_address(where.strip())
    except UsageError as exc:
        raise UsageError(f"--channel {text!r}: relay: {exc}") from None
    try:
        latency = int(options.get("latency", DEFAULT_LATENCY_MS))
    except ValueError:
        latency = 0
    if not 1 <= latency <= 60_000:
        raise UsageError(f"--channel {text!r}: latency is 1..60000 milliseconds")
    tls = options.get("tls", "0")
    if tls not in ("0", "1"):
        raise UsageError(f"--channel {text!r}: tls is 1 (TLS) or 0 (plain TCP)")
    cafile = options.get("cafile")
    return RelayOptions(
        host,
        port,
        origin_channel,
        latency,
        token_file=options.get("token-file"),
        tls=tls == "1" or cafile is not None,
        cafile=cafile,
    )


def tracks_for(library: Library, name: str) -> list[TrackInfo]:
    """Every track ``name`` means, in album order: the one it resolves to, all the
    candidates when it is ambiguous, else every track matching its words."""
    try:
        return [library.resolve(name)]
    except Ambiguous as many:
        found = [t for p in many.candidates if (t := library.index.get(p)) is not None]
    except NotFound:
        found = library.search(name)
    if not found:
        raise NotFound(f"no track matches {name!r}")
    return sorted(found, key=TrackInfo.album_order)


@dataclass(eq=False)
class _Converter:
    out: Hub
    users: int = 0
    ready: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass(eq=False)
class Channel:
    """A live channel: its hub, where its audio comes from, and its converters."""

    name: str
    source: str
    hub: Hub
    #: the address of the publishing client, for a published channel
    publisher: str | None = None
    #: called when the server shuts down (a publish stops reading its client)
    on_shutdown: Callable[[], None] | None = None
    #: the scope the server-side source runs in: cancelled at shutdown
    source_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    _converters: dict[AudioFormat, _Converter] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        """When this run of the channel began (ns since the Unix epoch), or the run a
        relay mirrors: its identity for a listener that reconnects, since positions
        start again with every run."""
        return self.hub.epoch

    @property
    def format(self) -> AudioFormat:
        """The channel's own format: what its source delivers."""
        return self.hub.format

    @property
    def state(self) -> str:
        """``live``, ``waiting`` (no audio yet, or a relay without its origin) or ``ended``."""
        if self.hub.closed:
            return "ended"
        return "live" if self.hub.chunks and not self.hub.paused else "waiting"

    def info(self, now_ns: int) -> ChannelInfo:
        """The channel as ``channel_list`` describes it."""
        hubs = [self.hub, *(c.out for c in self._converters.values())]
        listeners = sum(h.listeners for h in hubs)
        oldest = [t for h in hubs if (t := h.oldest_backlog_ns())]
        behind = (now_ns - min(oldest)) / 1e6 if oldest else 0.0
        fmt = self.format
        return ChannelInfo(
            name=self.name,
            source=self.source,
            sample_format=fmt.sample_format,
            sample_rate=fmt.sample_rate,
            channels=fmt.channels,
            state=self.state,
            listeners=listeners,
            position=self.hub.position,
            latency_ms=round(max(0.0, behind), 1),
        )


ConverterRunner = Callable[..., Awaitable[None]]


class Channels:
    """The registry of a server's channels; runs their sources and converters.

    Everything runs in the nursery handed to :meth:`run`, so nothing outlives
    the server: when it is cancelled, sources stop, devices close and every
    ffmpeg is killed and reaped.
    """

    def __init__(self, *, ffmpeg: str | None = None, history_seconds: float = 10.0) -> None:
        self.ffmpeg = ffmpeg
        self.history_seconds = history_seconds
        self._channels: dict[str, Channel] = {}
        self._nursery: trio.Nursery | None = None
        self.stopping = False

    def __contains__(self, name: str) -> bool:
        return name in self._channels

    def get(self, name: str) -> Channel:
        """The channel called ``name``; ``NotFound`` naming those that exist."""
        channel = self._channels.get(name)
        if channel is None:
            known = ", ".join(sorted(self._channels)) or "none"
            raise NotFound(f"no channel {name!r} (channels: {known})")
        return channel

    def infos(self, now_ns: int) -> list[ChannelInfo]:
        """Every channel's description, by name."""
        return [self._channels[n].info(now_ns) for n in sorted(self._channels)]

    def add(
        self, name: str, source: str, fmt: AudioFormat, publisher: str | None = None
    ) -> Channel:
        """Register a new channel; ``ChannelBusy`` if the name is taken."""
        if self.stopping:
            raise ChannelBusy("the server is shutting down")
        if name in self._channels:
            other = self._channels[name]
            who = f"a publisher ({other.publisher})" if other.publisher else other.source
            raise ChannelBusy(f"channel {name!r} is busy: its source is {who}")
        channel = Channel(name, source, Hub(fmt, history_seconds=self.history_seconds), publisher)
        self._channels[name] = channel
        return channel

    def remove(self, channel: Channel) -> None:
        """Forget ``channel`` (its name may be used again), ending it if it still runs.

        Its converters are left to finish: they see the end, let ffmpeg flush
        the last samples to their listeners, and stop by themselves.
        """
        channel.hub.close("source_ended", f"channel {channel.name!r} ended")
        if self._channels.get(channel.name) is channel:
            del self._channels[channel.name]

    def shutdown(self) -> None:
        """End every channel for its listeners (``shutdown``); sources stop with the nursery."""
        self.stopping = True
        for channel in tuple(self._channels.values()):
            channel.hub.close("shutdown", "the server is shutting down")
            if channel.on_shutdown is not None:
                channel.on_shutdown()
            # devices and ffmpeg are released now, not after the connections' grace period
            channel.source_scope.cancel()
            for conv in channel._converters.values():
                conv.scope.cancel()

    async def run(
        self,
        sources: list[tuple[Channel, Callable[[Hub], Awaitable[None]]]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run each configured source until it ends, and host converters, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for channel, read in sources:
                nursery.start_soon(self._run_source, channel, read)
            task_status.started()
            await trio.sleep_forever()

    async def _run_source(self, channel: Channel, read: Callable[[Hub], Awaitable[None]]) -> None:
        hub = channel.hub
        try:
            with channel.source_scope:
                await read(hub)
            if channel.source_scope.cancelled_caught:
                return  # shut down: the hub says so already
        except MusiclibError as exc:
            log.error("channel %s: %s", channel.name, exc)
            hub.close("source_failed", f"channel {channel.name!r}: {exc}")
        except OSError as exc:
            log.error("channel %s: %s", channel.name, exc)
            hub.close("source_failed", f"channel {channel.name!r}: {exc.strerror or exc}")
        except Exception as exc:  # a bug: this channel ends, the server keeps serving
            log.exception("channel %s failed: %s", channel.name, exc)
            hub.close("source_failed", f"channel {channel.name!r}: internal error")
        else:
            log.info("channel %s: the source ended", channel.name)
            hub.close("source_ended", f"channel {channel.name!r}: the source ended")

    @contextlib.asynccontextmanager
    async def feed(self, channel: Channel, fmt: AudioFormat) -> AsyncIterator[Hub]:
        """The hub carrying ``channel`` in ``fmt``: its own, or a shared converter's.

        The first listener of a format starts its converter (one ffmpeg); the
        last one to leave stops it.
        """
        if fmt == channel.format:
            yield channel.hub
            return
        conv = channel._converters.get(fmt)
        if conv is None:
            if self._nursery is None:
                raise RuntimeError("Channels.run is not running")
            conv = _Converter(Hub(fmt, history_seconds=self.history_seconds))
            channel._converters[fmt] = conv
            self._nursery.start_soon(self._run_converter, channel, conv)
        conv.users += 1
        try:
            await conv.ready.wait()
            yield conv.out
        finally:
            conv.users -= 1
            if conv.users == 0:
                conv.scope.cancel()
                if channel._converters.get(fmt) is conv:
                    del channel._converters[fmt]

    async def _run_converter(self, channel: Channel, conv: _Converter) -> None:
        from .convert import run_converter

        out = conv.out
        fmt = out.format
        what = f"channel {channel.name}: converter to {fmt.sample_format} {fmt.sample_rate} Hz"
        with conv.scope:
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        lambda task_status: run_converter(
                            channel.hub, out, ffmpeg=self.ffmpeg, task_status=task_status
                        )
                    )
                    log.info("%s %d ch started", what, fmt.channels)
                    await _caught_up(channel.hub, out)
                    conv.ready.set()
            except MusiclibError as exc:
                log.error("%s failed: %s", what, exc)
                out.close("source_failed", f"{what} failed: {exc}")
            except OSError as exc:
                log.error("%s failed: %s", what, exc)
                out.close("source_failed", f"{what} failed: {exc.strerror or exc}")
        if not out.closed:
            out.close(
                channel.hub.end.reason if channel.hub.end else "source_ended",
                channel.hub.end.message if channel.hub.end else f"{what} stopped",
            )
        conv.ready.set()  # waiters see the closed hub
        if channel._converters.get(fmt) is conv:
            del channel._converters[fmt]


async def _caught_up(source: Hub, out: Hub, *, limit: float = 2.0) -> None:
    """Wait (at most ``limit`` s) until a new converter has converted the history it
    was primed with, so that its first listeners join at the live edge instead of
    finding seconds of history queued as if it were live."""
    from .convert import input_packet_frames, scale_position

    in_rate, out_rate = source.format.sample_rate, out.format.sample_rate
    # ffmpeg's raw PCM demuxer holds back up to one packet (1024 frames at 16 kHz)
    held = input_packet_frames(in_rate) + 2 * default_chunk_frames(source.format)
    target = scale_position(max(0, source.position - held), in_rate, out_rate)
    # woken by each converted chunk, as any listener is; the queue only needs the newest
    with (
        out.subscribe(max_backlog_frames=1, lag_limit=math.inf) as watch,
        trio.move_on_after(limit),
    ):
        while out.position < target and not out.closed:
            await watch.wait()
            while watch.next_nowait() is not None and not out.closed:
                pass


def source_reader(
    spec: ChannelSpec,
    fmt: AudioFormat,
    *,
    ffmpeg: str | None,
    tracks: Callable[[], Awaitable[list[Path]]] | None = None,
) -> Callable[[Hub], Awaitable[None]]:
    """The coroutine function that reads ``spec``'s source into a hub of format ``fmt``.

    ``tracks`` finds the files of a ``track:``/``loop:`` source when it
    starts (after the library's first scan).
    """
    from . import sources

    chunk = default_chunk_frames(fmt)

    async def read(hub: Hub) -> None:
        if spec.relay is not None:
            from .relay import run_relay

            await run_relay(hub, spec.relay, name=spec.name)
        elif spec.kind == "mic":
            await sources.run_mic(hub, spec.arg or None, chunk_frames=chunk)
        elif spec.kind == "ffmpeg":
            await sources.run_ffmpeg(hub, shlex.split(spec.arg), ffmpeg=ffmpeg, chunk_frames=chunk)
        else:
            assert tracks is not None
            paths = await tracks()
            await sources.run_decoded(
                hub, paths, loop=spec.kind == "loop", ffmpeg=ffmpeg, chunk_frames=chunk
            )

    return read
