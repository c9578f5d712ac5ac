"""A channel whose source is another server's channel: ``relay:HOST:PORT[/NAME]``.

An origin server owns a microphone; replicas relay its channel and listeners
connect to any replica. A relay is one listener of the origin (through the
client's own ``listen``, with :class:`~musiclib.liveclient.ListenCursor` for
resuming) that publishes what it hears into its local channel's hub. Samples
pass untouched: the channel's format is the origin channel's own (asked of
the origin when ``serve`` starts, :func:`prepare_relays`) unless the spec
names another, and then the origin converts. Each chunk keeps the origin's
``time_ns``, so a listener's latency stays end to end, hops included.

Positions: a relay that connects before anyone listens to it adopts the
origin's numbering (:meth:`Hub.start_at <musiclib.live.hub.Hub.start_at>`:
its ``epoch`` and positions), so every relay of one origin numbers the audio
alike and a listener can resume on another relay without a seam. From then
on (:class:`RelayMapping`):

- a dropped connection to the same run of the origin (same epoch) is
  listened to again with a preroll covering the time away; what the relay
  has is skipped and what the origin no longer has becomes a ``Gap``;
- a restarted origin (another epoch, or the same origin channel ended and
  started again) does not restart the relay: it keeps its epoch and counts
  on, leaving a ``Gap`` as long as the time between the last frame it had
  and the first new one (chunk stamps are the capture time of their *last*
  frame), never an error;
- a gap at the origin (the relay fell behind there, or the origin's source
  had a hole) arrives as a gap at the same positions.

The relay never gives up: an unreachable origin, an origin without the
channel, a refused token or an ended channel are waited out with a doubling
pause (up to :data:`BACKOFF_MAX`), logged once per change of state, not per
attempt; meanwhile ``channels`` shows the relay ``waiting``. Only the relay
server's own shutdown ends the channel.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..decode import AudioFormat
from ..errors import (
    MusiclibError,
    NotFound,
    RemoteProtocolError,
    Timeout,
    Unauthorized,
    UsageError,
)
from ..protocol import Audio, GapNotice, ListenStart
from ..text import read_token_file
from .hub import Chunk, Hub

if TYPE_CHECKING:
    import ssl

    from ..client import Client, ListenReader
    from .channels import ChannelSpec, RelayOptions

log = logging.getLogger("musiclib.live")

#: a relay's max latency as the origin's listener (``?latency=MS``): a second lets a hop
#: ride out a network hiccup without losing audio, and costs nothing while it keeps up
DEFAULT_LATENCY_MS = 1000
#: seconds ``serve`` waits for an origin to say its channel's format
FORMAT_TIMEOUT = 5.0
#: seconds an origin may stay silent (a waiting channel, a dead link) before the relay
#: listens again: the only way to notice a peer that vanished without closing
ORIGIN_TIMEOUT = 10.0
#: the first pause before trying the origin again, doubled after each failure up to
#: BACKOFF_MAX: an origin restarting is back within a fraction of a second
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0

Connector = Callable[[], AbstractAsyncContextManager["Client"]]


def _ssl_context(options: RelayOptions) -> ssl.SSLContext | None:
    from ..client import tls_context

    return tls_context(options.cafile) if options.tls else None


def connector(options: RelayOptions) -> Connector:
    """Connections to the origin: its address, the token, TLS when asked, protocol 2."""
    from ..client import open_client

    context = _ssl_context(options)

    def connect() -> AbstractAsyncContextManager[Client]:
        return open_client(
            options.address,
            timeout=ORIGIN_TIMEOUT,
            token=options.token,
            ssl_context=context,
            version=2,
        )

    return connect


def _read_token(path: str, what: str) -> str:
    """The token in ``path``; ``UsageError`` naming ``what`` (the ``--channel``)."""
    return read_token_file(Path(path), f"{what}: token-file {path}")


async def prepare_relays(specs: Sequence[ChannelSpec], *, token: str | None) -> list[ChannelSpec]:
    """``specs`` with each relay ready to run: its token and its format.

    The token presented to the origin is the one in ``?token-file=`` when
    given, else this server's own (``token``): replicas of one installation
    share one secret, and neither way puts it on a command line. A relay
    whose spec does not give the rate and the channel count takes its
    origin's, asked now (at most :data:`FORMAT_TIMEOUT` seconds): the hub's
    format is fixed before the server starts. An origin that cannot be asked
    is a ``UsageError`` naming the fix (``?rate=R&channels=C``).
    """
    ready = []
    for spec in specs:
        options = spec.relay
        if options is None:
            ready.append(spec)
            continue
        what = f"--channel {spec.name}={spec.description}"
        secret = _read_token(options.token_file, what) if options.token_file else token
        options = dataclasses.replace(options, token=secret)
        _ssl_context(options)  # a bad --cafile is said now, not by a dead channel later
        if spec.sample_rate is None or spec.channels is None:
            fmt = await origin_format(options, what)
            spec = dataclasses.replace(
                spec,
                sample_format=spec.sample_format or fmt.sample_format,
                sample_rate=spec.sample_rate or fmt.sample_rate,
                channels=spec.channels or fmt.channels,
            )
        ready.append(dataclasses.replace(spec, relay=options))
    return ready


async def origin_format(options: RelayOptions, what: str) -> AudioFormat:
    """The origin channel's own format, from the origin's ``channels``; ``UsageError``
    saying why not and what to do."""
    fix = "start the origin first, or give the format: ?rate=R&channels=C (&format=F)"
    try:
        with trio.fail_after(FORMAT_TIMEOUT):
            async with connector(options)() as client:
                found = {c.name: c for c in await client.channels()}
    except trio.TooSlowError:
        raise UsageError(
            f"{what}: the origin did not answer within {FORMAT_TIMEOUT:g} s; {fix}"
        ) from None
    except Unauthorized as exc:
        raise UsageError(
            f"{what}: the origin refused the token ({exc}): give its token with ?token-file=PATH"
        ) from None
    except MusiclibError as exc:
        raise UsageError(f"{what}: cannot ask the origin for its format ({exc}); {fix}") from None
    info = found.get(options.channel)
    if info is None:
        known = ", ".join(sorted(found)) or "none"
        raise UsageError(
            f"{what}: the origin has no channel {options.channel!r} (it has: {known}); {fix}"
        )
    return AudioFormat(info.sample_format, info.sample_rate, info.channels)


class RelayMapping:
    """Where the origin's positions land in the relay's hub, across reconnections.

    Sans-IO but for the hub it publishes into. ``offset`` maps positions:
    local = origin + offset; it is 0 while the relay mirrors its origin and
    changes only when the origin's run changes (:meth:`begin`, then the first
    audio of the new run fixes it from the chunks' stamps).
    """

    def __init__(self, hub: Hub) -> None:
        from ..liveclient import ListenCursor

        self.hub = hub
        self.cursor = ListenCursor()
        self.offset = 0
        #: the offset is known for the run being listened to
        self.anchored = False
        self._bpf = hub.format.bytes_per_frame

    @property
    def mirroring(self) -> bool:
        """The relay numbers the audio as its origin does (same epoch, same positions)."""
        return self.anchored and self.offset == 0 and self.hub.epoch == self.cursor.epoch

    def preroll_ms(self) -> int:
        """The preroll for the next listen: none at first, the time away after that."""
        return self.cursor.resume_preroll_ms() if self.cursor.begun else 0

    def begin(self, start: ListenStart) -> str:
        """A listen of the origin started: ``resumed`` (the same run of the origin goes
        on), ``mirroring`` (the relay adopted the origin's numbering) or ``new run``."""
        fmt = self.hub.format
        got = (start.sample_format, start.sample_rate, start.channels)
        if got != (fmt.sample_format, fmt.sample_rate, fmt.channels):
            raise RemoteProtocolError(f"asked the origin for {fmt}, it sends {got}")
        if self.cursor.begin(start):
            return "resumed"
        if start.epoch is not None and self.hub.start_at(start.position, start.epoch):
            self.offset, self.anchored = 0, True
            return "mirroring"
        if not self.hub.last_time_ns:  # nothing published yet: nothing to measure a gap from
            self.offset, self.anchored = self.hub.position - start.position, True
        else:
            self.anchored = False  # the first audio of the new run fixes the offset
        return "new run"

    def audio(self, event: Audio) -> None:
        """Publish the part of ``event`` the relay does not have yet."""
        payload = event.payload
        frames, rest = divmod(len(payload), self._bpf)
        if rest or not frames:
            raise RemoteProtocolError(f"the origin sent {len(payload)} bytes: not whole frames")
        hub = self.hub
        if not self.anchored:
            # the time between the last frame published and this chunk's first one
            elapsed = round((event.time_ns - hub.last_time_ns) * hub.format.sample_rate / 1e9)
            missing = max(0, elapsed - frames)
            self.offset = hub.position + missing - event.position
            self.cursor.expected = event.position
            self.anchored = True
        skip, _ = self.cursor.place(event.position, frames)
        if skip >= frames:
            return
        data = payload[skip * self._bpf :] if skip else payload
        # a position past the hub's leaves a hole: the hub tells every listener (a Gap)
        hub.publish_chunk(Chunk(event.position + skip + self.offset, event.time_ns, bytes(data)))
        self.cursor.expected = event.position + frames

    def gap(self, event: GapNotice) -> None:
        """Frames the origin will never send: the next chunk leaves the same hole here."""
        if not self.anchored:
            return  # the new run's first audio measures the whole gap from the stamps
        skip, _ = self.cursor.place(event.position, event.frames)
        if skip < event.frames:
            self.cursor.expected = event.position + event.frames


class _States:
    """Logs a relay's state when it changes, not at every attempt."""

    def __init__(self, name: str, where: str) -> None:
        self.name = name
        self.where = where
        self.current = ""

    def enter(self, state: str, level: int, message: str) -> None:
        if state != self.current:
            self.current = state
            log.log(level, "channel %s: %s: %s", self.name, self.where, message)


async def run_relay(
    hub: Hub, options: RelayOptions, *, name: str = "", connect: Connector | None = None
) -> None:
    """Relay the origin channel ``options`` names into ``hub`` until cancelled.

    Never returns and never raises for anything the origin or the network
    does: each failure is waited out (doubling pauses up to
    :data:`BACKOFF_MAX`) and the origin listened to again.
    """
    connect = connect or connector(options)
    mapping = RelayMapping(hub)
    states = _States(name or options.channel, f"relay of {options.address}/{options.channel}")
    delay = BACKOFF_MIN
    hub.paused = True
    while True:
        try:
            async with connect() as client, _listening(client, hub, options, mapping) as audio:
                async for event in audio:
                    if isinstance(event, Audio):
                        mapping.audio(event)
                        if hub.paused:
                            hub.paused = False
                            how = "its numbering" if mapping.mirroring else "our own numbering"
                            states.enter("relaying", logging.INFO, f"relaying, in {how}")
                            delay = BACKOFF_MIN
                    else:
                        mapping.gap(event)
                end = audio.end
            reason = end.reason if end is not None else "closed"
            state, level, why = "ended", logging.WARNING, f"the origin's channel ended ({reason})"
        except Timeout:
            # a waiting origin channel, or a link gone silent: listen again, quietly
            state, level, why = "silent", logging.INFO, "the origin sends nothing"
        except NotFound as exc:
            state, level, why = "absent", logging.WARNING, str(exc)
        except Unauthorized as exc:
            state, level = "refused", logging.ERROR
            why = f"{exc} (give the origin's token with ?token-file=PATH)"
        except MusiclibError as exc:  # unreachable, cut, confused, full, shutting down
            state, level, why = type(exc).__name__, logging.WARNING, str(exc)
        hub.paused = True
        states.enter(state, level, f"{why}; waiting for it")
        await trio.sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX)


@asynccontextmanager
async def _listening(
    client: Client, hub: Hub, options: RelayOptions, mapping: RelayMapping
) -> AsyncIterator[ListenReader]:
    """One listen of the origin in the hub's format, begun in ``mapping``."""
    fmt = hub.format
    async with client.listen(
        options.channel,
        sample_format=fmt.sample_format,
        sample_rate=fmt.sample_rate,
        channels=fmt.channels,
        max_latency_ms=options.max_latency_ms,
        preroll_ms=mapping.preroll_ms(),
    ) as audio:
        assert audio.start is not None
        mapping.begin(audio.start)
        yield audio
