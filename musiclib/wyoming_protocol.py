"""The Wyoming event format, sans-IO: bytes in, events out; events in, bytes out.

Wyoming is the protocol of Home Assistant's voice pipeline (wake-word
detectors, speech recognisers, satellites). It is not musiclib's wire
protocol (PROTOCOL.md): it is spoken on its own port (``serve --wyoming``)
and to other programs' services (``listen --wyoming``). One event is

* one line of JSON, ending in ``\\n``: ``{"type": ..., "version": ...,
  "data_length": N, "payload_length": M}`` (``data`` may also sit in the line
  itself; the reference library reads both and merges them, the line first);
* then ``N`` bytes of UTF-8 JSON, an object: the event's data;
* then ``M`` bytes of payload (raw PCM for ``audio-chunk``).

The rules follow the reference implementation (``wyoming`` 1.10.2,
``wyoming/event.py``), which writes the data after the line, never inside it,
and leaves ``data_length`` out when the data is empty and ``payload_length``
when there is no payload. This module writes the same.

Like :mod:`musiclib.protocol` it knows no socket, no trio and no clock
(h11's shape): :meth:`WyomingDecoder.receive_data` takes bytes as they come,
:meth:`WyomingDecoder.next_event` returns an :class:`Event`, :data:`NEED_DATA`
or :data:`CLOSED`; :func:`encode` turns an event into bytes. A peer is not
trusted: the line, the data and the payload have size limits checked before
anything is buffered past them, and anything malformed raises
:class:`~musiclib.errors.WyomingProtocolError` (a ``RemoteProtocolError``)
naming what was wrong; after one, the decoder refuses to go on.

The typed helpers below cover the events musiclib sends and reads:
``describe``/``info``, ``audio-start``/``audio-chunk``/``audio-stop``,
``detect``/``detection``/``not-detected``, ``transcribe``/``transcript``,
``select-program`` and ``error``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .errors import LocalProtocolError, WyomingProtocolError

#: the reference library's version whose event format this module follows; sent as
#: ``version`` in every event line (readers ignore it)
WYOMING_VERSION: Final = "1.10.2"
#: the longest JSON line accepted, newline included
MAX_LINE: Final = 64 * 1024
#: the largest data object accepted after the line
MAX_DATA: Final = 1024 * 1024
#: the largest payload accepted (a second of 48 kHz stereo s32 is 384 KiB)
MAX_PAYLOAD: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Event:
    """One Wyoming event: its type, its data (a JSON object) and its payload."""

    type: str
    data: Mapping[str, Any] = field(default_factory=dict)
    payload: bytes = b""


class NeedData:
    """Sentinel: more bytes are needed before the next event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


class Closed:
    """Sentinel: the peer closed the connection between two events."""

    def __repr__(self) -> str:
        return "CLOSED"


NEED_DATA: Final = NeedData()
CLOSED: Final = Closed()


def encode(event: Event) -> bytes:
    """The bytes of ``event``, as the reference library writes them.

    ``LocalProtocolError`` for an event this side must not send (an empty
    type, a type with a newline, data that is not JSON).
    """
    if not event.type or "\n" in event.type:
        raise LocalProtocolError(f"a Wyoming event type is one non-empty line: {event.type!r}")
    header: dict[str, Any] = {"type": event.type, "version": WYOMING_VERSION}
    data = b""
    if event.data:
        try:
            data = json.dumps(dict(event.data), ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(f"{event.type}: data is not JSON: {exc}") from None
        header["data_length"] = len(data)
    if event.payload:
        header["payload_length"] = len(event.payload)
    line = json.dumps(header, ensure_ascii=False).encode("utf-8") + b"\n"
    return b"".join((line, data, event.payload))


class WyomingDecoder:
    """Incremental reader of one peer's events.

    Feed bytes with :meth:`receive_data` (``b""`` for end of file) and take
    events with :meth:`next_event` until it says :data:`NEED_DATA`. Memory is
    bounded by the limits: an incomplete line longer than ``max_line`` is an
    error as soon as it is seen, and a declared data or payload length past
    its limit is refused from the line, before its bytes are waited for.
    """

    def __init__(
        self,
        *,
        max_line: int = MAX_LINE,
        max_data: int = MAX_DATA,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.max_line = max_line
        self.max_data = max_data
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._eof = False
        self._failed = False
        # the event being read: its line parsed, its data and payload still to come
        self._type = ""
        self._data: dict[str, Any] = {}
        self._data_length = 0
        self._payload_length = 0
        self._in_event = False

    def receive_data(self, data: bytes) -> None:
        """More bytes from the peer; ``b""`` means it closed its side."""
        if self._eof and data:
            raise LocalProtocolError("bytes received after end of file")
        if not data:
            self._eof = True
            return
        self._buffer += data

    def next_event(self) -> Event | NeedData | Closed:
        """The next complete event, :data:`NEED_DATA`, or :data:`CLOSED` at a clean end."""
        if self._failed:
            raise LocalProtocolError("the decoder failed before; the connection is unusable")
        try:
            return self._next()
        except WyomingProtocolError:
            self._failed = True
            raise

    def _next(self) -> Event | NeedData | Closed:
        buffer = self._buffer
        if not self._in_event:
            end = buffer.find(b"\n", 0, self.max_line)
            if end < 0:
                if len(buffer) >= self.max_line:
                    raise WyomingProtocolError(
                        f"an event line is longer than {self.max_line} bytes"
                    )
                if self._eof:
                    if buffer:
                        raise WyomingProtocolError("the peer closed in the middle of an event")
                    return CLOSED
                return NEED_DATA
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            self._start_event(line)
        need = self._data_length + self._payload_length
        if len(buffer) < need:
            if self._eof:
                raise WyomingProtocolError(
                    f"the peer closed in the middle of a {self._type!r} event"
                )
            return NEED_DATA
        data = self._data
        if self._data_length:
            data.update(_json_object(bytes(buffer[: self._data_length]), self._type, "data"))
        payload = bytes(buffer[self._data_length : need])
        del buffer[:need]
        self._in_event = False
        return Event(self._type, data, payload)

    def _start_event(self, line: bytes) -> None:
        header = _json_object(line, None, "line")
        kind = header.get("type")
        if not isinstance(kind, str) or not kind:
            raise WyomingProtocolError("an event line without a 'type' string")
        data = header.get("data")
        if data is None:
            data = {}
        elif not isinstance(data, dict):
            raise WyomingProtocolError(f"{kind!r}: 'data' is not an object")
        data_length = _length(header, "data_length", kind)
        payload_length = _length(header, "payload_length", kind)
        if data_length > self.max_data:
            raise WyomingProtocolError(
                f"{kind!r}: data of {data_length} bytes (the limit is {self.max_data})"
            )
        if payload_length > self.max_payload:
            raise WyomingProtocolError(
                f"{kind!r}: a payload of {payload_length} bytes (the limit is {self.max_payload})"
            )
        self._type = kind
        self._data = dict(data)
        self._data_length = data_length
        self._payload_length = payload_length
        self._in_event = True


def _json_object(raw: bytes, kind: str | None, what: str) -> dict[str, Any]:
    where = f"{kind!r}: its {what}" if kind else f"an event {what}"
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise WyomingProtocolError(f"{where} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise WyomingProtocolError(f"{where} is not a JSON object")
    return value


def _length(header: Mapping[str, Any], key: str, kind: str) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WyomingProtocolError(f"{kind!r}: {key} is not a length: {value!r}")
    return value


# ---- typed events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PcmFormat:
    """Wyoming's audio format: ``rate`` Hz, ``width`` bytes a sample, ``channels``."""

    rate: int
    width: int
    channels: int

    @property
    def bytes_per_frame(self) -> int:
        """Bytes of one frame (a sample of every channel)."""
        return self.width * self.channels

    def fields(self) -> dict[str, int]:
        """The ``rate``/``width``/``channels`` fields of an audio event."""
        return {"rate": self.rate, "width": self.width, "channels": self.channels}


#: what Wyoming's wake-word and speech services take unless they say otherwise
SPEECH_FORMAT: Final = PcmFormat(16000, 2, 1)


def ms_of(frames: int, rate: int) -> int:
    """``frames`` at ``rate`` as whole milliseconds (Wyoming's timestamps)."""
    return frames * 1000 // rate


def describe() -> Event:
    """Ask a service what it offers (answered with ``info``)."""
    return Event("describe")


def audio_start(fmt: PcmFormat, timestamp_ms: int | None = None) -> Event:
    """A stream of audio begins (``timestamp`` in ms, on the sender's clock)."""
    return Event("audio-start", {**fmt.fields(), "timestamp": timestamp_ms})


def audio_chunk(fmt: PcmFormat, pcm: bytes, timestamp_ms: int | None = None) -> Event:
    """Whole frames of PCM; ``timestamp`` is the time of the first frame, in ms."""
    return Event("audio-chunk", {**fmt.fields(), "timestamp": timestamp_ms}, pcm)


def audio_stop(timestamp_ms: int | None = None) -> Event:
    """The stream of audio ends."""
    return Event("audio-stop", {"timestamp": timestamp_ms})


def detect(names: list[str] | None = None) -> Event:
    """Ask a wake-word service to listen for ``names`` (all its models if ``None``)."""
    return Event("detect", {"names": names})


def transcribe(language: str | None = None) -> Event:
    """Ask a speech recogniser for the transcript of the audio that follows."""
    return Event("transcribe", {"language": language} if language else {})


def error(text: str, code: str | None = None) -> Event:
    """Something went wrong; ``text`` is for a human."""
    return Event("error", {"text": text, "code": code})


def mic_info(channels: list[tuple[str, str, PcmFormat]], version: str) -> Event:
    """``info`` describing a microphone service with one ``mic`` program per channel:
    ``(name, description, format)`` each."""
    attribution = {"name": "musiclib", "url": "https://github.com/musiclib/musiclib"}
    return Event(
        "info",
        {
            "mic": [
                {
                    "name": name,
                    "attribution": attribution,
                    "installed": True,
                    "description": description,
                    "version": version,
                    "mic_format": fmt.fields(),
                }
                for name, description, fmt in channels
            ]
        },
    )


@dataclass(frozen=True, slots=True)
class AudioHead:
    """The format and timestamp of an ``audio-start`` or ``audio-chunk``."""

    format: PcmFormat
    timestamp_ms: int | None


def parse_audio(event: Event) -> AudioHead:
    """The format fields of an audio event; ``WyomingProtocolError`` when they are wrong,
    or when an ``audio-chunk``'s payload is not whole frames."""
    values = []
    for key in ("rate", "width", "channels"):
        value = event.data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise WyomingProtocolError(f"{event.type!r}: {key} is not a positive number")
        values.append(value)
    fmt = PcmFormat(*values)
    if event.type == "audio-chunk" and len(event.payload) % fmt.bytes_per_frame:
        raise WyomingProtocolError(
            f"'audio-chunk': {len(event.payload)} bytes are not whole frames "
            f"of {fmt.bytes_per_frame} bytes"
        )
    return AudioHead(fmt, _optional_int(event, "timestamp"))


@dataclass(frozen=True, slots=True)
class Detection:
    """A wake word was heard: which one, and when (ms, on the audio's clock)."""

    name: str | None
    timestamp_ms: int | None


def parse_detection(event: Event) -> Detection:
    """``detection`` -> :class:`Detection`."""
    return Detection(_optional_str(event, "name"), _optional_int(event, "timestamp"))


def parse_transcript(event: Event) -> str:
    """``transcript`` -> its text."""
    text = event.data.get("text")
    if not isinstance(text, str):
        raise WyomingProtocolError("'transcript' without a text")
    return text


def parse_error(event: Event) -> str:
    """``error`` -> one line for a human (its text, and its code when given)."""
    text = _optional_str(event, "text") or "no reason given"
    code = _optional_str(event, "code")
    return f"{text} ({code})" if code else text


def parse_select(event: Event) -> str:
    """``select-program`` -> the program's name."""
    name = event.data.get("name")
    if not isinstance(name, str) or not name:
        raise WyomingProtocolError("'select-program' without a name")
    return name


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What a service's ``info`` offers, as far as ``listen --wyoming`` cares."""

    #: the wake-word models (their names) of every wake program
    wake_models: tuple[str, ...]
    #: the names of its speech-to-text programs
    asr_programs: tuple[str, ...]
    #: the kinds of program it lists (``wake``, ``asr``, ``mic``...), for an error message
    kinds: tuple[str, ...]


def parse_info(event: Event) -> ServiceInfo:
    """``info`` -> :class:`ServiceInfo`; lenient about fields musiclib does not use."""
    data = event.data
    kinds = tuple(k for k, v in data.items() if isinstance(v, list) and v)
    wake: list[str] = []
    for program in _objects(data.get("wake")):
        wake += [
            m["name"] for m in _objects(program.get("models")) if isinstance(m.get("name"), str)
        ]
    asr = tuple(
        p["name"] for p in _objects(data.get("asr")) if isinstance(p.get("name"), str)
    ) or tuple("asr" for _ in _objects(data.get("asr")))
    return ServiceInfo(tuple(wake), asr, kinds)


def _objects(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _optional_int(event: Event, key: str) -> int | None:
    value = event.data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise WyomingProtocolError(f"{event.type!r}: {key} is not a number")
    return int(value)


def _optional_str(event: Event, key: str) -> str | None:
    value = event.data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise WyomingProtocolError(f"{event.type!r}: {key} is not a string")
    return value
