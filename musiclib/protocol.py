"""The musiclib wire protocol as a sans-IO state machine.

Nothing here touches a socket, a clock or trio: bytes go in with
:meth:`Connection.receive_data`, events come out of :meth:`Connection.next_event`,
and :meth:`Connection.send` turns an event into bytes for the caller to write.
The same class serves both ends; ``our_role`` says which one we are, and every
event, sent or received, is checked against one transition table. A mistake
of ours raises :class:`LocalProtocolError`; anything the peer sends can only
ever raise :class:`RemoteProtocolError` (or its recoverable child
:class:`MessageError`). PROTOCOL.md is the normative description; this module
is its executable form.

Framing: every frame is a 5-byte header, ``kind`` (u8) and ``length``
(u32, big-endian), followed by ``length`` bytes. ``kind`` 1 is a message (a
msgpack map with a ``"type"`` key); ``kind`` 2 is raw stream payload. Payload
travels unwrapped because packing large chunks into msgpack maps measured 3x
slower (allocator churn), and raw frames let a server use ``sendfile``. The
length is checked against the receiver's limit before a single body byte is
buffered, and data frames are handed out as they arrive, so the receive buffer
never has to hold a whole payload frame.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import re
import struct
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Union  # Union: for get_origin checks

import msgpack

from .errors import LocalProtocolError, MessageError, ProtocolError, RemoteProtocolError

#: The newest protocol version this implementation speaks (see "Versions" in PROTOCOL.md).
PROTOCOL_VERSION: Final = 2
#: Versions a server built from this module accepts in a ``hello``: version 2 is
#: version 1 plus live audio, so a version 1 client keeps working unchanged.
SUPPORTED_VERSIONS: Final = frozenset({1, 2})

HEADER: Final = struct.Struct(">BI")
KIND_MESSAGE: Final = 1
KIND_DATA: Final = 2
#: a live audio chunk (version 2): position, capture time, then samples
KIND_AUDIO: Final = 3
#: what precedes the samples in an audio frame's body: position (u64), time_ns (i64)
AUDIO_HEADER: Final = struct.Struct(">Qq")

#: Default limit on one message frame's body (both directions).
MAX_MESSAGE_SIZE: Final = 1 << 20
#: Default limit on one data frame's body; senders should use much less.
MAX_DATA_SIZE: Final = 1 << 20
#: Pages of a list reply are kept below this many encoded bytes.
PAGE_BUDGET: Final = 64 * 1024
#: The most words a list query may have (each word is one more condition to test).
MAX_QUERY_WORDS: Final = 32
#: The longest a list filter (``query``, ``artist``, ``album``, ``format``) may be, in
#: code points.
MAX_FILTER_LENGTH: Final = 1024
#: The longest a track name (``info``, ``stream``) may be, in code points.
MAX_TRACK_NAME: Final = 4096
#: What separates the words of a query: the characters of Unicode's White_Space property.
_SPACE: Final = re.compile("[\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def query_words(query: str | None) -> list[str]:
    """The words of a list query, as typed: split at Unicode ``White_Space``, nothing else.

    Quotes and other punctuation are characters of the words like any other;
    the server folds each word (see PROTOCOL.md, "Matching") before looking for it.
    """
    return [word for word in _SPACE.split(query) if word] if query else []


class Role(enum.Enum):
    """Which end of the connection a :class:`Connection` object speaks for."""

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Where the conversation stands; both ends track the same state."""

    AWAIT_HELLO = "await_hello"  # the client must speak first
    AWAIT_WELCOME = "await_welcome"  # the server accepts or refuses
    IDLE = "idle"  # the client may send a request
    LISTING = "listing"  # the server sends pages, then list_end
    INFO = "info"  # the server sends track_info (or an error)
    RESCAN = "rescan"  # the server sends rescan_status (or an error)
    STREAM_HEAD = "stream_head"  # the server sends stream_start (or an error)
    STREAMING = "streaming"  # data frames, then stream_end
    CHANNELS = "channels"  # the server sends channel_list (or an error)
    STATUS = "status"  # the server sends server_status (or an error)
    LISTEN_HEAD = "listen_head"  # the server sends listen_start (or an error)
    LISTENING = "listening"  # audio frames and gaps; the client may send stop
    LISTEN_STOPPING = "listen_stopping"  # the client sent stop; listen_end is coming
    PUBLISH_HEAD = "publish_head"  # the server sends publish_ready (or an error)
    PUBLISHING = "publishing"  # the client sends data frames, then publish_end
    PUBLISH_CLOSING = "publish_closing"  # publish_end sent; publish_done is coming
    PUBLISH_ABORTED = "publish_aborted"  # the server ended the publish; publish_end due
    CLOSED = "closed"  # a fatal error or end of file; nothing more may pass
    ERROR = "error"  # the peer broke the framing; the connection is dead


class NeedData:
    """Sentinel type: :meth:`Connection.next_event` needs more bytes."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


# --------------------------------------------------------------------------
# Messages. Each is a frozen dataclass; ``TYPE`` is its wire name. Fields
# without a default are required on the wire; ``None`` values are left out.
# Unknown keys in a received map are ignored so that minor additions stay
# compatible (PROTOCOL.md, "Versions").
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrackInfo:
    """One library entry as it travels in a list reply.

    ``path`` is relative to the library root and ``/``-separated; ``error`` is
    set when the file could not be parsed (it is still listed and served).
    """

    path: str
    title: str
    format: str
    size: int
    artist: str | None = None
    album: str | None = None
    track: int | None = None
    duration: float | None = None
    codec: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    bitrate: int | None = None
    bits_per_sample: int | None = None
    sha256: str | None = None
    error: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this track; fields left at their default are left out.

        Every optional field defaults to ``None``, so this skips the generic
        walk over the dataclass fields: a list reply encodes thousands of these.
        """
        return {k: v for k in _TRACK_FIELD_NAMES if (v := getattr(self, k)) is not None}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> TrackInfo:
        """Validate a received map; raises :class:`MessageError` when it is not a track."""
        return _from_wire(cls, data)

    def album_order(self) -> tuple[bool, str, int, str]:
        """The sort key of "album order", how several matches play (``play`` and a
        ``track:`` channel alike): album (tracks without one last, as ``ls`` sorts it),
        then track number, then path. The index keeps no disc number."""
        return (self.album is None, (self.album or "").casefold(), self.track or 0, self.path)


_TRACK_FIELD_NAMES: Final = tuple(f.name for f in dataclasses.fields(TrackInfo))
assert all(
    f.default is None for f in dataclasses.fields(TrackInfo) if f.default is not dataclasses.MISSING
)


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message that travels in a kind-1 frame."""

    TYPE: ClassVar[str] = ""
    SENDER: ClassVar[Role]
    #: the first protocol version that has this message
    VERSION: ClassVar[int] = 1

    def problem(self) -> str | None:
        """Why the field values are invalid, or ``None``; types are checked separately."""
        return None


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message of a connection: the client's protocol version, name and token.

    ``token`` is the shared secret of a server started with one; never logged.
    """

    TYPE: ClassVar[str] = "hello"
    SENDER: ClassVar[Role] = Role.CLIENT
    version: int
    client: str = ""
    token: str | None = None

    def problem(self) -> str | None:
        return "version must be positive" if self.version < 1 else None


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """The server accepts the connection and states what it has.

    ``versions``: every protocol version the server speaks (empty: not stated);
    ``max_message_size``: the largest message body it accepts from this client.
    """

    TYPE: ClassVar[str] = "welcome"
    SENDER: ClassVar[Role] = Role.SERVER
    version: int
    server: str
    tracks: int = 0
    scanning: bool = False
    versions: tuple[int, ...] = ()
    max_message_size: int | None = None

    def problem(self) -> str | None:
        if self.version < 1:
            return "version must be positive"
        if self.versions and self.version not in self.versions:
            return "versions must include the version of the conversation"
        return None


@dataclass(frozen=True, slots=True)
class ListRequest(Message):
    """Ask for the tracks matching ``query`` and the filters (all tracks when absent).

    ``query``: words that must all appear in the title, artist, album or path;
    ``artist``/``album``: a substring of that tag; all three ignore case and
    accents. ``format``: the file extension, exactly. The matches are ordered
    by ``sort`` (then by path), and ``offset``/``limit`` pick a window of them.
    """

    TYPE: ClassVar[str] = "list"
    SENDER: ClassVar[Role] = Role.CLIENT
    query: str | None = None
    artist: str | None = None
    album: str | None = None
    format: str | None = None
    sort: str = "path"
    offset: int = 0
    limit: int | None = None

    def problem(self) -> str | None:
        if self.sort not in LIST_SORTS:
            return f"sort must be one of {', '.join(LIST_SORTS)}"
        if not 0 <= self.offset < 2**63:
            return "offset must be 0..2^63-1"
        if self.limit is not None and not 0 <= self.limit < 2**63:
            return "limit must be 0..2^63-1"
        for name in ("query", "artist", "album", "format"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_FILTER_LENGTH:
                return f"{name} must be at most {MAX_FILTER_LENGTH} characters"
        if len(query_words(self.query)) > MAX_QUERY_WORDS:
            return f"query must have at most {MAX_QUERY_WORDS} words"
        return None


#: orders a list reply may be sorted in
LIST_SORTS: Final = ("path", "title", "artist", "album", "duration")


@dataclass(frozen=True, slots=True)
class TrackPage(Message):
    """One page of a list reply; a reply has zero or more pages, then ``ListEnd``."""

    TYPE: ClassVar[str] = "tracks"
    SENDER: ClassVar[Role] = Role.SERVER
    tracks: tuple[TrackInfo, ...]


@dataclass(frozen=True, slots=True)
class ListEnd(Message):
    """End of a list reply: ``count`` tracks were sent, of ``total`` that match (before
    ``offset`` and ``limit``); ``scanning`` says the library index is still being built.

    A server that states ``total`` has applied every field of the request;
    without it (an older server), a client filters and pages by itself.
    """

    TYPE: ClassVar[str] = "list_end"
    SENDER: ClassVar[Role] = Role.SERVER
    count: int
    total: int | None = None
    scanning: bool = False


@dataclass(frozen=True, slots=True)
class RescanRequest(Message):
    """Ask the server to re-read its library folder; ``wait`` for the scan to finish."""

    TYPE: ClassVar[str] = "rescan"
    SENDER: ClassVar[Role] = Role.CLIENT
    wait: bool = False


@dataclass(frozen=True, slots=True)
class RescanStatus(Message):
    """The answer to ``rescan``: tracks known now, and whether a scan is still running."""

    TYPE: ClassVar[str] = "rescan_status"
    SENDER: ClassVar[Role] = Role.SERVER
    tracks: int
    scanning: bool = False


@dataclass(frozen=True, slots=True)
class InfoRequest(Message):
    """Ask which track a name resolves to, and its facts; ``checksum`` adds its sha256
    (which may take the server a moment to compute the first time)."""

    TYPE: ClassVar[str] = "info"
    SENDER: ClassVar[Role] = Role.CLIENT
    track: str
    checksum: bool = False

    def problem(self) -> str | None:
        return _track_name_problem(self.track)


@dataclass(frozen=True, slots=True)
class InfoReply(Message):
    """The track an ``info`` request resolved to."""

    TYPE: ClassVar[str] = "track_info"
    SENDER: ClassVar[Role] = Role.SERVER
    track: TrackInfo


@dataclass(frozen=True, slots=True)
class StreamRequest(Message):
    """Ask for a track: its original bytes from ``offset``, or decoded samples.

    In ``decoded`` mode the server runs the file through a decoder and sends
    interleaved samples in ``sample_format`` at ``sample_rate`` and
    ``channels`` (each defaulting to the source's own), from ``start`` seconds
    for ``duration`` seconds (to the end when absent). ``pacing`` ``realtime``
    asks for an initial burst and then playback speed, like a live source.
    """

    TYPE: ClassVar[str] = "stream"
    SENDER: ClassVar[Role] = Role.CLIENT
    track: str
    offset: int = 0
    mode: str = "original"
    sample_format: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    start: float = 0.0
    duration: float | None = None
    pacing: str = "none"

    def problem(self) -> str | None:
        if name_problem := _track_name_problem(self.track):
            return name_problem
        if not 0 <= self.offset < 2**63:
            return "offset must be 0..2^63-1"
        if self.mode not in MODES:
            return f"mode must be one of {', '.join(MODES)}"
        if self.pacing not in PACINGS:
            return f"pacing must be one of {', '.join(PACINGS)}"
        if self.mode == "original":
            decoded_only = (self.sample_format, self.sample_rate, self.channels, self.duration)
            if self.start or any(v is not None for v in decoded_only):
                return (
                    "sample_format, sample_rate, channels, start and duration "
                    "apply to decoded streams only"
                )
            return None
        if self.offset:
            return "offset applies to original streams only; use start"
        return _audio_problem(self.sample_format, self.sample_rate, self.channels) or (
            f"start must be at least 0 and less than {MAX_SECONDS:g} seconds"
            if not 0 <= self.start < MAX_SECONDS
            else f"duration must be more than 0 and less than {MAX_SECONDS:g} seconds"
            if self.duration is not None and not 0 < self.duration < MAX_SECONDS
            else None
        )


#: ``start`` and ``duration`` of a decoded stream are below this many seconds (finite)
MAX_SECONDS: Final = 1e9


def _track_name_problem(name: str) -> str | None:
    if len(name) > MAX_TRACK_NAME:
        return f"track must be at most {MAX_TRACK_NAME} characters"
    return None


#: stream modes a request may ask for
MODES: Final = ("original", "decoded")
#: pacing choices for decoded streams
PACINGS: Final = ("none", "realtime")
#: sample formats of decoded streams, and the bytes one sample takes
SAMPLE_FORMATS: Final = {"s16le": 2, "f32le": 4}
#: accepted ranges for decoded streams
SAMPLE_RATES: Final = range(1000, 384001)
CHANNELS: Final = range(1, 9)


def _audio_problem(fmt: str | None, rate: int | None, channels: int | None) -> str | None:
    if fmt is not None and fmt not in SAMPLE_FORMATS:
        return f"sample_format must be one of {', '.join(SAMPLE_FORMATS)}"
    if rate is not None and rate not in SAMPLE_RATES:
        return f"sample_rate must be {SAMPLE_RATES.start}..{SAMPLE_RATES.stop - 1}"
    if channels is not None and channels not in CHANNELS:
        return f"channels must be {CHANNELS.start}..{CHANNELS.stop - 1}"
    return None


@dataclass(frozen=True, slots=True)
class StreamStart(Message):
    """Header of a stream: which file, which version of it, and what follows.

    ``version`` changes whenever the file does (size and modification time),
    so a client can tell whether a partial download belongs to the same file.
    ``length`` is the number of payload bytes that follow: always ``size -
    offset`` in an original stream, ``None`` in a decoded one (not known in
    advance). A decoded stream states its
    sample format, rate and channels here, before any sample. ``sha256`` is the
    whole file's, when the server knows it already (original streams only).
    """

    TYPE: ClassVar[str] = "stream_start"
    SENDER: ClassVar[Role] = Role.SERVER
    path: str
    size: int
    version: str
    offset: int = 0
    length: int | None = None
    mode: str = "original"
    sample_format: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    start: float | None = None
    sha256: str | None = None

    def problem(self) -> str | None:
        if self.sha256 is not None and not _is_sha256(self.sha256):
            return "sha256 must be 64 lowercase hexadecimal digits"
        if self.size < 0 or self.offset < 0:
            return "size and offset must not be negative"
        if self.mode == "original" and (
            self.offset > self.size or self.length != self.size - self.offset
        ):
            return "an original stream's length must be size - offset (offset at most size)"
        if self.mode not in MODES:
            return f"mode must be one of {', '.join(MODES)}"
        if self.mode == "decoded":
            if self.sample_format is None or self.sample_rate is None or self.channels is None:
                return "a decoded stream must state sample_format, sample_rate and channels"
            return _audio_problem(self.sample_format, self.sample_rate, self.channels)
        return None

    @property
    def bytes_per_frame(self) -> int | None:
        """Bytes of one sample frame (all channels) in a decoded stream."""
        if self.sample_format is None or self.channels is None:
            return None
        return SAMPLE_FORMATS[self.sample_format] * self.channels


@dataclass(frozen=True, slots=True)
class StreamEnd(Message):
    """End of a stream: the payload byte count and either the whole file's sha256
    (original streams: required) or the number of sample frames sent (decoded
    streams: required)."""

    TYPE: ClassVar[str] = "stream_end"
    SENDER: ClassVar[Role] = Role.SERVER
    sent: int
    sha256: str | None = None
    frames: int | None = None

    def problem(self) -> str | None:
        if self.sha256 is not None and not _is_sha256(self.sha256):
            return "sha256 must be 64 lowercase hexadecimal digits"
        return None if self.sent >= 0 else "sent must not be negative"


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A typed error. ``fatal`` means the server closes the connection after it.

    ``candidates``: the matching paths of an ``ambiguous`` name; ``versions``: the
    protocol versions the server speaks, in an ``unsupported_version`` error.
    """

    TYPE: ClassVar[str] = "error"
    SENDER: ClassVar[Role] = Role.SERVER
    code: str
    message: str
    candidates: tuple[str, ...] = ()
    fatal: bool = False
    versions: tuple[int, ...] = ()


# --------------------------------------------------------------------------
# Version 2: live channels. A channel is one live source (a microphone, a
# track played in real time, any ffmpeg input, or a publishing client) fanned
# out to many listeners. Listening and publishing are the two replies in which
# both ends speak: a listener may send ``stop`` while audio flows, a publisher
# sends data frames while the server may end the publish with an ``error``.
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """One live channel as ``channel_list`` describes it.

    ``state``: ``live`` (audio is flowing), ``waiting`` (no audio yet) or
    ``ended``; ``latency_ms``: how far behind its slowest listener is now.
    """

    name: str
    source: str
    sample_format: str
    sample_rate: int
    channels: int
    state: str
    listeners: int = 0
    position: int = 0
    latency_ms: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this channel."""
        return _to_wire(self)


@dataclass(frozen=True, slots=True)
class ChannelsRequest(Message):
    """Ask which live channels the server has."""

    TYPE: ClassVar[str] = "channels"
    SENDER: ClassVar[Role] = Role.CLIENT
    VERSION: ClassVar[int] = 2


@dataclass(frozen=True, slots=True)
class ChannelList(Message):
    """The live channels, by name."""

    TYPE: ClassVar[str] = "channel_list"
    SENDER: ClassVar[Role] = Role.SERVER
    VERSION: ClassVar[int] = 2
    channels: tuple[ChannelInfo, ...]


@dataclass(frozen=True, slots=True)
class StatusRequest(Message):
    """Ask how the server is: its version, its library, its load (``musiclib status``)."""

    TYPE: ClassVar[str] = "status"
    SENDER: ClassVar[Role] = Role.CLIENT
    VERSION: ClassVar[int] = 2


@dataclass(frozen=True, slots=True)
class ServerStatus(Message):
    """The answer to ``status``: who the server is, how big its library, how busy.

    ``uptime``: seconds since it started; ``connections``: served now, this
    one included; ``last_scan``: seconds since the last scan ended (absent:
    none has ended yet), ``last_scan_took`` its length; ``scans``: scans ended
    since start; ``channels``: live channels now; ``worker`` and ``pid``: which
    worker process answered, when the server runs several (``serve --workers``).
    """

    TYPE: ClassVar[str] = "server_status"
    SENDER: ClassVar[Role] = Role.SERVER
    VERSION: ClassVar[int] = 2
    server: str
    versions: tuple[int, ...]
    tracks: int
    uptime: float
    connections: int
    scanning: bool = False
    scans: int = 0
    last_scan: float | None = None
    last_scan_took: float | None = None
    channels: int = 0
    worker: int | None = None
    pid: int | None = None

    def problem(self) -> str | None:
        if not self.versions:
            return "versions must not be empty"
        if self.tracks < 0 or self.connections < 0 or self.scans < 0 or self.channels < 0:
            return "counts must not be negative"
        if (self.worker is not None and self.worker < 0) or (self.pid is not None and self.pid < 1):
            return "worker must not be negative, pid must be positive"
        for name in ("uptime", "last_scan", "last_scan_took"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1e12:  # NaN, infinities, negatives
                return f"{name} must be a number of seconds, 0 or more"
        return None


#: bounds of a listener's declared maximum latency and preroll, in milliseconds
MAX_LATENCY_MS: Final = range(1, 60_001)
PREROLL_MS: Final = range(0, 60_001)


@dataclass(frozen=True, slots=True)
class ListenRequest(Message):
    """Receive a channel live, in the channel's format or another one.

    ``max_latency_ms``: how far behind the listener may fall before the server
    drops its oldest audio (and says so with ``gap``); ``preroll_ms``: start
    with this much of the most recent audio; ``frames``: end after that many.
    """

    TYPE: ClassVar[str] = "listen"
    SENDER: ClassVar[Role] = Role.CLIENT
    VERSION: ClassVar[int] = 2
    channel: str
    sample_format: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    max_latency_ms: int = 500
    preroll_ms: int = 0
    frames: int | None = None

    def problem(self) -> str | None:
        if self.max_latency_ms not in MAX_LATENCY_MS:
            return f"max_latency_ms must be {MAX_LATENCY_MS.start}..{MAX_LATENCY_MS.stop - 1}"
        if self.preroll_ms not in PREROLL_MS:
            return f"preroll_ms must be {PREROLL_MS.start}..{PREROLL_MS.stop - 1}"
        if self.frames is not None and not 0 < self.frames < 2**63:
            return "frames must be positive"
        return _audio_problem(self.sample_format, self.sample_rate, self.channels)


@dataclass(frozen=True, slots=True)
class ListenStart(Message):
    """The listen is accepted: the format of the audio that follows and where it starts.

    ``position`` is the first frame that will follow; the first ``preroll``
    frames of it are history, the rest is live. ``converted`` is true when the
    samples are ffmpeg's conversion of the source, not the source's own.
    ``epoch`` identifies this run of the channel (the reference server: the
    wall clock in ns when it started), so a listener that reconnects can tell
    whether positions continue or start again.
    """

    TYPE: ClassVar[str] = "listen_start"
    SENDER: ClassVar[Role] = Role.SERVER
    VERSION: ClassVar[int] = 2
    channel: str
    sample_format: str
    sample_rate: int
    channels: int
    position: int = 0
    preroll: int = 0
    converted: bool = False
    source: str | None = None
    epoch: int | None = None

    def problem(self) -> str | None:
        if self.position < 0 or self.preroll < 0:
            return "position and preroll must not be negative"
        return _audio_problem(self.sample_format, self.sample_rate, self.channels)

    @property
    def bytes_per_frame(self) -> int:
        """Bytes of one sample frame (all channels)."""
        return SAMPLE_FORMATS[self.sample_format] * self.channels


@dataclass(frozen=True, slots=True)
class GapNotice(Message):
    """``frames`` frames from ``position`` on are lost to this listener (it fell behind,
    or the source itself had a hole); the next audio starts at ``position + frames``."""

    TYPE: ClassVar[str] = "gap"
    SENDER: ClassVar[Role] = Role.SERVER
    VERSION: ClassVar[int] = 2
    position: int
    frames: int

    def problem(self) -> str | None:
        return None if self.position >= 0 and self.frames > 0 else "a gap must be positive"


@dataclass(frozen=True, slots=True)
class ListenEnd(Message):
    """End of a listen: why, and the frames sent and lost in it.

    ``reason``: ``stopped`` (the listener's ``stop``), ``complete`` (the
    requested ``frames`` were sent), ``source_ended``, ``publisher_left``,
    ``source_failed`` or ``shutdown``; receivers treat unknown reasons as ends.
    """

    TYPE: ClassVar[str] = "listen_end"
    SENDER: ClassVar[Role] = Role.SERVER
    VERSION: ClassVar[int] = 2
    reason: str
    message: str
    frames: int
    lost: int = 0


@dataclass(frozen=True, slots=True)
class StopRequest(Message):
    """Sent by a listener while audio flows: end this listen (``listen_end`` follows).

    A ``stop`` that crosses the end of the listen on the wire arrives when the
    server is idle again; the server ignores it there.
    """

    TYPE: ClassVar[str] = "stop"
    SENDER: ClassVar[Role] = Role.CLIENT
    VERSION: ClassVar[int] = 2


@dataclass(frozen=True, slots=True)
class PublishRequest(Message):
    """Become the source of channel ``channel``: samples in this format follow as data frames."""

    TYPE: ClassVar[str] = "publish"
    SENDER: ClassVar[Role] = Role.CLIENT
    VERSION: ClassVar[int] = 2
    channel: str
    sample_rate: int
    channels: int
    sample_format: str = "s16le"
    source: str | None = None

    def problem(self) -> str | None:
        if not channel_name_ok(self.channel):
            return CHANNEL_NAME_RULE
        return _audio_problem(self.sample_format, self.sample_rate, self.channels)

    @property
    def bytes_per_frame(self) -> int:
        """Bytes of one sample frame (all channels)."""
        return SAMPLE_FORMATS[self.sample_format] * self.channels


CHANNEL_NAME_RULE: Final = (
    "a channel name is 1-64 characters: letters, digits, '-', '_' and '.', not starting with '.'"
)


def channel_name_ok(name: str) -> bool:
    """Whether ``name`` is a valid channel name (see :data:`CHANNEL_NAME_RULE`)."""
    return (
        0 < len(name) <= 64
        and not name.startswith(".")
        and all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)
    )


@dataclass(frozen=True, slots=True)
class PublishReady(Message):
    """The publish is accepted: the client may send samples as data frames now."""

    TYPE: ClassVar[str] = "publish_ready"
    SENDER: ClassVar[Role] = Role.SERVER
    VERSION: ClassVar[int] = 2
    channel: str


@dataclass(frozen=True, slots=True)
class PublishEnd(Message):
    """The publisher is done; ``sent`` counts the payload bytes of its data frames."""

    TYPE: ClassVar[str] = "publish_end"
    SENDER: ClassVar[Role] = Role.CLIENT
    VERSION: ClassVar[int] = 2
    sent: int

    def problem(self) -> str | None:
        return None if self.sent >= 0 else "sent must not be negative"


@dataclass(frozen=True, slots=True)
class PublishDone(Message):
    """The answer to ``publish_end``: the frames the channel received from this publisher."""

    TYPE: ClassVar[str] = "publish_done"
    SENDER: ClassVar[Role] = Role.SERVER
    VERSION: ClassVar[int] = 2
    frames: int


@dataclass(frozen=True, slots=True)
class Data:
    """A piece of stream payload (kind-2 frame body, possibly a part of one)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Audio:
    """One live audio chunk (a kind-3 frame): whole frames of samples and their place.

    ``position`` counts frames since the channel started; ``time_ns`` is the
    wall clock (nanoseconds since the Unix epoch) at which the source
    delivered the chunk, so a listener's latency is its arrival time minus it.
    """

    position: int
    time_ns: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed its side at a frame boundary."""


Event = Message | Data | Audio | Closed

MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Welcome,
        ListRequest,
        TrackPage,
        ListEnd,
        InfoRequest,
        InfoReply,
        RescanRequest,
        RescanStatus,
        StreamRequest,
        StreamStart,
        StreamEnd,
        Error,
        ChannelsRequest,
        ChannelList,
        StatusRequest,
        ServerStatus,
        ListenRequest,
        ListenStart,
        GapNotice,
        ListenEnd,
        StopRequest,
        PublishRequest,
        PublishReady,
        PublishEnd,
        PublishDone,
    )
}


# --------------------------------------------------------------------------
# Encoding and validation of field values, driven by the dataclass hints.
# --------------------------------------------------------------------------


#: each message class's fields and their defaults, in order (``dataclasses.fields``
#: builds its answer at every call: a few microseconds for every message sent)
_WIRE_FIELDS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _wire_fields(cls: type) -> tuple[tuple[str, Any], ...]:
    found = _WIRE_FIELDS.get(cls)
    if found is None:
        found = _WIRE_FIELDS[cls] = tuple((f.name, f.default) for f in dataclasses.fields(cls))
    return found


def _to_wire(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, default in _wire_fields(type(obj)):
        value = getattr(obj, name)
        if value is None or value == default:  # absent means the default on the wire
            continue
        if isinstance(value, tuple):
            value = [v.to_wire() if isinstance(v, (TrackInfo, ChannelInfo)) else v for v in value]
        elif isinstance(value, TrackInfo):
            value = value.to_wire()
        out[name] = value
    return out


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _check_value(hint: Any, value: Any, where: str) -> Any:
    """Return ``value`` converted to ``hint``, or raise MessageError."""
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _check_value(inner, value, where)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise MessageError(f"{where} must be an array")
        return tuple(_check_value(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is TrackInfo or hint is ChannelInfo:
        if not isinstance(value, dict):
            raise MessageError(f"{where} must be a map")
        return _from_wire(hint, value, where)
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise MessageError(f"{where} must be a number")
        return float(value)
    if hint is int and isinstance(value, bool):
        raise MessageError(f"{where} must be an integer")
    if not isinstance(value, hint):
        raise MessageError(f"{where} must be of type {hint.__name__}")
    return value


_T = typing.TypeVar("_T")


# Per class: (field name, required, the type a valid value has as msgpack gives it, or
# None when it needs conversion or nested checks, the hint).
_Spec = tuple[tuple[str, bool, type | None, Any], ...]
_SPECS: dict[type, _Spec] = {}
_PLAIN: Final = (str, int, bool, float)


def _spec(cls: type) -> _Spec:
    spec = _SPECS.get(cls)
    if spec is None:
        hints = _hints(cls)
        fields = []
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            plain = args[0] if len(args) == 1 and typing.get_origin(hint) else hint
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            fields.append((f.name, required, plain if plain in _PLAIN else None, hint))
        spec = _SPECS[cls] = tuple(fields)
    return spec


def _from_wire(cls: type[_T], data: Mapping[str, Any], where: str = "") -> _T:
    """Build ``cls`` from a received map, checking every field against its type hint.

    A value whose exact type is already right (str, int, bool) is taken as it
    is; only the rest go through :func:`_check_value`. That keeps decoding a
    10 000-track list reply about five times cheaper, with the same rules.
    """
    kwargs: dict[str, Any] = {}
    for name, required, plain, hint in _spec(cls):
        value = data.get(name)
        if value is None:
            if required:
                raise MessageError(f"{where or cls.__name__}: missing field {name!r}")
            continue
        if type(value) is plain:  # exact: a bool is never taken for an int
            kwargs[name] = value
        else:
            kwargs[name] = _check_value(hint, value, f"{where or cls.__name__}.{name}")
    return cls(**kwargs)


def encode_message(msg: Message) -> bytes:
    """One complete kind-1 frame for ``msg`` (no state checks; see ``Connection.send``)."""
    body: bytes = msgpack.packb({"type": msg.TYPE, **_to_wire(msg)}, use_bin_type=True)
    return HEADER.pack(KIND_MESSAGE, len(body)) + body


def decode_message(body: bytes) -> Message:
    """Parse a kind-1 frame body; raises :class:`MessageError` for anything invalid."""
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        reason = str(exc) or type(exc).__name__
        raise MessageError(f"message is not valid msgpack: {reason}") from None
    if not isinstance(data, dict):
        raise MessageError("message must be a msgpack map")
    kind = data.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None or not isinstance(kind, str):
        raise MessageError(f"unknown message type {kind!r}")
    msg = _from_wire(cls, data, kind)
    problem = msg.problem()
    if problem:
        raise MessageError(f"{kind}: {problem}")
    return msg


def paginate(tracks: Iterable[TrackInfo], budget: int = PAGE_BUDGET) -> Iterator[TrackPage]:
    """Split tracks into pages whose encoded size stays under ``budget`` bytes.

    A track larger than the budget on its own still gets a page of its own;
    the receiver's ``max_message_size`` is far larger than any real track.
    """
    page: list[TrackInfo] = []
    size = 0
    for track in tracks:
        n = _wire_size(track.to_wire())
        if page and size + n > budget:
            yield TrackPage(tuple(page))
            page, size = [], 0
        page.append(track)
        size += n
    if page:
        yield TrackPage(tuple(page))


def _wire_size(fields: Mapping[str, Any]) -> int:
    """An upper bound of the msgpack size of a flat map of short keys and scalar values.

    Cheaper than packing the map once to measure it and again to send it.
    """
    size = 5  # the largest map header
    for key, value in fields.items():
        size += len(key) + 5 + (len(value.encode()) + 5 if isinstance(value, str) else 9)
    return size


# --------------------------------------------------------------------------
# The connection state machine.
# --------------------------------------------------------------------------

# (state, message type) -> next state, for messages that keep the connection open.
_TRANSITIONS: Final[dict[tuple[State, type[Message]], State]] = {
    (State.AWAIT_HELLO, Hello): State.AWAIT_WELCOME,
    (State.AWAIT_WELCOME, Welcome): State.IDLE,
    (State.IDLE, ListRequest): State.LISTING,
    (State.IDLE, InfoRequest): State.INFO,
    (State.IDLE, StreamRequest): State.STREAM_HEAD,
    (State.IDLE, RescanRequest): State.RESCAN,
    (State.IDLE, Error): State.IDLE,  # the answer to a request that was malformed
    (State.LISTING, TrackPage): State.LISTING,
    (State.LISTING, ListEnd): State.IDLE,
    (State.LISTING, Error): State.IDLE,
    (State.INFO, InfoReply): State.IDLE,
    (State.INFO, Error): State.IDLE,
    (State.RESCAN, RescanStatus): State.IDLE,
    (State.RESCAN, Error): State.IDLE,
    (State.STREAM_HEAD, StreamStart): State.STREAMING,
    (State.STREAM_HEAD, Error): State.IDLE,
    (State.STREAMING, StreamEnd): State.IDLE,
    (State.STREAMING, Error): State.IDLE,
    # version 2: live channels
    (State.IDLE, ChannelsRequest): State.CHANNELS,
    (State.CHANNELS, ChannelList): State.IDLE,
    (State.CHANNELS, Error): State.IDLE,
    (State.IDLE, StatusRequest): State.STATUS,
    (State.STATUS, ServerStatus): State.IDLE,
    (State.STATUS, Error): State.IDLE,
    (State.IDLE, ListenRequest): State.LISTEN_HEAD,
    (State.LISTEN_HEAD, ListenStart): State.LISTENING,
    (State.LISTEN_HEAD, Error): State.IDLE,
    (State.LISTENING, GapNotice): State.LISTENING,
    (State.LISTENING, StopRequest): State.LISTEN_STOPPING,
    (State.LISTENING, ListenEnd): State.IDLE,
    (State.LISTENING, Error): State.IDLE,
    (State.LISTEN_STOPPING, GapNotice): State.LISTEN_STOPPING,
    (State.LISTEN_STOPPING, ListenEnd): State.IDLE,
    (State.LISTEN_STOPPING, Error): State.IDLE,
    (State.IDLE, PublishRequest): State.PUBLISH_HEAD,
    (State.PUBLISH_HEAD, PublishReady): State.PUBLISHING,
    (State.PUBLISH_HEAD, Error): State.IDLE,
    (State.PUBLISHING, PublishEnd): State.PUBLISH_CLOSING,
    (State.PUBLISHING, Error): State.PUBLISH_ABORTED,  # the client still owes publish_end
    (State.PUBLISH_CLOSING, PublishDone): State.IDLE,
    (State.PUBLISH_CLOSING, Error): State.IDLE,
    (State.PUBLISH_ABORTED, PublishEnd): State.IDLE,
}

#: what a client may send after its hello without waiting for the welcome: a request of
#: version 1, whose reply every version has, and no live one (the server reads it only
#: after the welcome, in the conversation's version, which is never below 1)
EARLY_REQUESTS: Final = frozenset({ListRequest, InfoRequest, StreamRequest, RescanRequest})

#: where each role may send payload: data frames (kind 2) and audio frames (kind 3)
_DATA_STATES: Final = {
    Role.SERVER: frozenset({State.STREAMING}),
    Role.CLIENT: frozenset({State.PUBLISHING, State.PUBLISH_ABORTED}),
}
_AUDIO_STATES: Final = frozenset({State.LISTENING, State.LISTEN_STOPPING})


class Connection:
    """One end of a musiclib conversation, as a pure state machine.

    ``max_message_size`` and ``max_data_size`` bound what the peer may send in
    one frame; a larger announced length is a :class:`RemoteProtocolError`
    raised before the body is buffered.
    """

    def __init__(
        self,
        our_role: Role,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_data_size: int = MAX_DATA_SIZE,
    ) -> None:
        self.our_role = our_role
        self.their_role = Role.SERVER if our_role is Role.CLIENT else Role.CLIENT
        self.max_message_size = max_message_size
        self.max_data_size = max_data_size
        self.state = State.AWAIT_HELLO
        self._buf = bytearray()
        self._eof = False
        self._frame_left = 0  # payload bytes still to come in the current data frame
        # Received bytes known to be payload of the current data frame, kept as they
        # came: handing them out needs no copy (the receive path's main cost).
        self._direct: collections.deque[bytes] = collections.deque()
        self._direct_size = 0
        self._stream_left: int | None = None  # payload bytes still expected, if known
        self._stream_sent = 0  # payload bytes seen in the current stream
        self._frame_bytes: int | None = None  # bytes per sample frame, decoded streams
        #: the protocol version of the conversation, known once the welcome has passed
        self.version = 1
        self._hello_version = 1
        self._audio_next = 0  # position the next audio frame must start at (listening)
        self._audio_frames = 0  # frames sent in audio frames in the current listen
        self._audio_lost = 0  # frames announced in gaps in the current listen
        self._write_broken = False  # a write of ours stopped part way (send_failed)
        #: a client's request sent after its hello, before the welcome (see EARLY_REQUESTS)
        self._early: Message | None = None

    # ---- receiving ------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its side."""
        if self._eof and data:
            raise LocalProtocolError("received data after end of file")
        if not data:
            self._eof = True
            return
        room = self._frame_left - self._direct_size
        if room > 0 and not self._buf:  # inside a data frame: keep the bytes as they are
            piece = bytes(data) if len(data) <= room else bytes(data[:room])
            self._direct.append(piece)
            self._direct_size += len(piece)
            data = data[len(piece) :]
        self._buf += data

    @property
    def payload_sent(self) -> int:
        """Payload bytes of data frames in the current stream or publish so far."""
        return self._stream_sent

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received but not yet parsed, and whether end of file was seen."""
        return b"".join(self._direct) + bytes(self._buf), self._eof

    def next_event(self) -> Event | NeedData:
        """The next complete event from the peer, or :data:`NEED_DATA`."""
        if self.state is State.ERROR:
            raise RemoteProtocolError("the connection already failed")
        try:
            return self._next_event()
        except MessageError:
            raise
        except RemoteProtocolError:
            self.state = State.ERROR
            raise

    def _next_event(self) -> Event | NeedData:
        buf = self._buf
        if self._direct:  # payload that arrived while a data frame was open
            payload = self._direct.popleft()
            self._direct_size -= len(payload)
            self._frame_left -= len(payload)
            return Data(payload)
        if self._frame_left:
            if not buf:
                return self._need_data("in the middle of a data frame")
            n = min(self._frame_left, len(buf))
            payload = bytes(buf[:n])
            del buf[:n]
            self._frame_left -= n
            return Data(payload)
        if len(buf) < HEADER.size:
            if not buf and self._eof:
                self.state = State.CLOSED
                return Closed()
            return self._need_data("in a frame header")
        kind, length = HEADER.unpack_from(buf)
        if kind == KIND_DATA:
            self._start_data_frame(length)
            del buf[: HEADER.size]
            return self._next_event()
        if kind == KIND_AUDIO:
            return self._audio_frame(length)
        if kind != KIND_MESSAGE:
            raise RemoteProtocolError(f"unknown frame kind {kind}")
        if length > self.max_message_size:
            raise RemoteProtocolError(
                f"message of {length} bytes exceeds the limit of {self.max_message_size}"
            )
        if len(buf) < HEADER.size + length:
            return self._need_data("in a message frame")
        body = bytes(buf[HEADER.size : HEADER.size + length])
        del buf[: HEADER.size + length]
        try:
            msg = decode_message(body)
            if self.version < msg.VERSION and self.state is not State.AWAIT_HELLO:
                # what a server of the conversation's version would say of it
                raise MessageError(f"unknown message type {msg.TYPE!r} in protocol version 1")
        except MessageError as exc:
            if self.our_role is Role.SERVER and self.state is State.IDLE:
                raise  # a bad request: answer it with an error, keep the connection
            raise RemoteProtocolError(str(exc)) from None
        self._process(msg, self.their_role)
        return msg

    def _audio_frame(self, length: int) -> Event | NeedData:
        """A whole kind-3 frame: position, time, samples (small: one chunk of live audio)."""
        if self.their_role is not Role.SERVER or self.state not in _AUDIO_STATES:
            raise RemoteProtocolError("audio frame outside of a listen")
        bpf = self._frame_bytes or 1
        if length <= AUDIO_HEADER.size or (length - AUDIO_HEADER.size) % bpf:
            raise RemoteProtocolError(f"audio frame of {length} bytes is not whole sample frames")
        if length > self.max_data_size + AUDIO_HEADER.size:
            raise RemoteProtocolError(
                f"audio frame of {length} bytes exceeds the limit of {self.max_data_size}"
            )
        buf = self._buf
        if len(buf) < HEADER.size + length:
            return self._need_data("in an audio frame")
        position, time_ns = AUDIO_HEADER.unpack_from(buf, HEADER.size)
        payload = bytes(buf[HEADER.size + AUDIO_HEADER.size : HEADER.size + length])
        del buf[: HEADER.size + length]
        self._count_audio(position, len(payload) // bpf, RemoteProtocolError)
        return Audio(position, time_ns, payload)

    def _count_audio(self, position: int, frames: int, exc: type[ProtocolError]) -> None:
        if position != self._audio_next:
            raise exc(f"audio at frame {position} where frame {self._audio_next} was due")
        self._audio_next += frames
        self._audio_frames += frames

    def _need_data(self, where: str) -> NeedData:
        if self._eof:
            raise RemoteProtocolError(f"connection closed {where}")
        return NEED_DATA

    def _start_data_frame(self, length: int) -> None:
        if self.state not in _DATA_STATES[self.their_role]:
            raise RemoteProtocolError("data frame outside of a stream or a publish")
        if length == 0:
            raise RemoteProtocolError("empty data frame")
        if length > self.max_data_size:
            raise RemoteProtocolError(
                f"data frame of {length} bytes exceeds the limit of {self.max_data_size}"
            )
        self._count_payload(length, RemoteProtocolError)
        self._frame_left = length

    def _count_payload(self, n: int, exc: type[ProtocolError]) -> None:
        if self._stream_left is not None:
            if n > self._stream_left:
                raise exc(f"{n} payload bytes exceed the {self._stream_left} announced")
            self._stream_left -= n
        self._stream_sent += n

    # ---- sending --------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """The frame for ``msg``, after checking that we may send it now."""
        if self._write_broken:
            raise LocalProtocolError("a write failed part way; nothing more may be sent")
        problem = msg.problem()
        if problem:
            raise LocalProtocolError(f"{msg.TYPE}: {problem}")
        self._process(msg, self.our_role)
        return encode_message(msg)

    def send_data_header(self, length: int) -> bytes:
        """Header of a data frame; the caller writes exactly ``length`` payload bytes next.

        Returning only the header lets the shell send the payload straight
        from its buffer (or with ``sendfile``) instead of copying it here.
        """
        if self.state not in _DATA_STATES[self.our_role]:
            raise LocalProtocolError(
                "data may only be sent by a server inside a stream or a client publishing"
            )
        if not 0 < length <= MAX_DATA_SIZE:
            raise LocalProtocolError(f"data frame length must be 1..{MAX_DATA_SIZE}")
        self._count_payload(length, LocalProtocolError)
        return HEADER.pack(KIND_DATA, length)

    def send_audio_header(
        self, position: int, time_ns: int, length: int, *, commit: bool = True
    ) -> bytes:
        """Header of an audio frame (kind 3) for ``length`` bytes of samples that the
        caller writes next; the position must continue the listen without a hole.

        With ``commit=False`` the frame is checked but not counted yet: a caller
        that tries a non-blocking write calls :meth:`commit_audio` once some of
        it went out, and nothing if none did.
        """
        if self.our_role is not Role.SERVER or self.state not in _AUDIO_STATES:
            raise LocalProtocolError("audio may only be sent by a server inside a listen")
        bpf = self._frame_bytes or 1
        if length <= 0 or length % bpf or length > MAX_DATA_SIZE:
            raise LocalProtocolError(f"audio of {length} bytes is not 1..{MAX_DATA_SIZE} frames")
        if not (0 <= position < 2**64 and -(2**63) <= time_ns < 2**63):
            raise LocalProtocolError("position or time_ns out of range for an audio frame")
        if commit:
            self._count_audio(position, length // bpf, LocalProtocolError)
        elif position != self._audio_next:
            raise LocalProtocolError(f"audio at {position} where {self._audio_next} was due")
        return HEADER.pack(KIND_AUDIO, AUDIO_HEADER.size + length) + AUDIO_HEADER.pack(
            position, time_ns
        )

    def commit_audio(self, position: int, length: int) -> None:
        """Count an audio frame checked with ``send_audio_header(..., commit=False)``."""
        self._count_audio(position, length // (self._frame_bytes or 1), LocalProtocolError)

    def send_failed(self) -> None:
        """Our write failed part way: the byte stream is broken, nothing more may be sent."""
        self._write_broken = True
        self.state = State.ERROR

    def _send_early(self, msg: Message) -> None:
        """A client's request before the welcome (PROTOCOL.md, "Conversation": early
        requests): its reply state begins once the welcome has passed."""
        if type(msg) not in EARLY_REQUESTS:
            raise LocalProtocolError(
                f"{msg.TYPE!r} is not allowed in state {self.state.value} (only a request "
                "every protocol version has may follow the hello before the welcome)"
            )
        if self._early is not None:
            raise LocalProtocolError("one request may follow the hello before the welcome")
        self._early = msg

    # ---- the transition table ------------------------------------------

    def _process(self, msg: Message, sender: Role) -> None:
        exc = LocalProtocolError if sender is self.our_role else RemoteProtocolError
        if msg.SENDER is not sender:
            raise exc(f"a {sender.value} may not send {msg.TYPE!r}")
        if isinstance(msg, Error) and msg.fatal and self.state is not State.CLOSED:
            self.state = State.CLOSED
            return
        if self.state is State.AWAIT_WELCOME and sender is self.our_role is Role.CLIENT:
            self._send_early(msg)
            return
        if self.version < msg.VERSION and self.state is not State.AWAIT_HELLO:
            raise exc(f"{msg.TYPE!r} needs protocol version {msg.VERSION}")
        if isinstance(msg, StopRequest) and self.state is State.IDLE and self.their_role is sender:
            return  # a listener's stop that crossed the end of its listen: nothing to do
        new = _TRANSITIONS.get((self.state, type(msg)))
        if new is None:
            raise exc(f"{msg.TYPE!r} is not allowed in state {self.state.value}")
        if isinstance(msg, Hello):
            self._hello_version = msg.version
        elif isinstance(msg, Welcome):
            if msg.version > self._hello_version:  # the server picks, at most the client's
                raise exc(f"welcome of version {msg.version} to a hello of {self._hello_version}")
            self.version = min(msg.version, PROTOCOL_VERSION)
            if self._early is not None:  # the server reads it now, as if sent at this moment
                early, self._early = self._early, None
                new = _TRANSITIONS[(State.IDLE, type(early))]
        elif isinstance(msg, ListenStart):
            self._frame_bytes = msg.bytes_per_frame
            self._audio_next = msg.position
            self._audio_frames = 0
            self._audio_lost = 0
        elif isinstance(msg, ListenEnd):
            if msg.frames != self._audio_frames:
                raise exc(f"listen_end says {msg.frames} frames, {self._audio_frames} were sent")
            if msg.lost != self._audio_lost:
                raise exc(f"listen_end says {msg.lost} frames lost, gaps said {self._audio_lost}")
        elif isinstance(msg, GapNotice):
            if msg.position != self._audio_next:
                raise exc(f"gap at frame {msg.position} where frame {self._audio_next} was due")
            self._audio_next += msg.frames
            self._audio_lost += msg.frames
        elif isinstance(msg, PublishRequest):
            self._frame_bytes = msg.bytes_per_frame
            self._stream_left = None
            self._stream_sent = 0
        elif isinstance(msg, PublishEnd):
            if msg.sent != self._stream_sent:
                raise exc(f"publish_end says {msg.sent} bytes, {self._stream_sent} were sent")
            if self._frame_bytes and msg.sent % self._frame_bytes:
                raise exc(f"{msg.sent} bytes are not a whole number of sample frames")
        if isinstance(msg, StreamStart):
            self._stream_left = msg.length
            self._stream_sent = 0
            self._frame_bytes = msg.bytes_per_frame if msg.mode == "decoded" else None
        elif isinstance(msg, StreamEnd):
            if self._stream_left:
                raise exc(f"stream ended {self._stream_left} bytes short")
            if msg.sent != self._stream_sent:
                raise exc(f"stream_end says {msg.sent} bytes, {self._stream_sent} were sent")
            if self._frame_bytes is not None and msg.frames != msg.sent // self._frame_bytes:
                raise exc(f"stream_end says {msg.frames} frames for {msg.sent} bytes")
            if self._frame_bytes is not None and msg.sent % self._frame_bytes:
                raise exc(f"{msg.sent} bytes are not a whole number of sample frames")
            if self._frame_bytes is None and msg.sha256 is None:
                raise exc("an original stream's stream_end must carry the file's sha256")
        self.state = new
