"""Microphones and speakers through PortAudio, with the optional ``sounddevice`` extra.

``sounddevice`` (and PortAudio behind it) is imported only when a device is
actually used, by :func:`sounddevice_module`; importing this module costs
nothing and works without the extra, so the server and the client run
everywhere and only ``--mic`` or ``--speaker`` need ``pip install
'musiclib[devices]'``.

PortAudio calls our callbacks on its own real-time thread. A callback that
blocks (on trio, on a full queue, on a log handler's I/O) makes the sound card
skip, so the callbacks here only copy bytes under a :class:`threading.Lock`
that the trio side holds for a few list operations, count, and at most ask
trio to wake up with :meth:`trio.lowlevel.TrioToken.run_sync_soon` (one
pending wake-up at a time, so even that queue cannot grow). Every buffer is
bounded: a microphone whose reader is stuck drops its oldest audio (live audio
is worth more fresh), a speaker's writer waits for room.

Blocking PortAudio calls (opening, starting, stopping, closing a stream) run
in a worker thread, and a stream is always stopped and closed on the way out
of :func:`open_input` and :func:`open_output`, cancellation included.

PortAudio lists the devices once, when it is initialised (at the first
``import sounddevice``); a device plugged in or a sound server started later
is not seen by this process until PortAudio is initialised again. That first
import takes some tens of milliseconds and is done on the calling thread, not
a worker: while PortAudio initialises, sounddevice points file descriptor 2
at /dev/null (to hide ALSA's chatter), and a log line written from another
thread at that moment would be lost.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import trio

from .decode import AudioFormat
from .errors import DeviceError

log = logging.getLogger("musiclib.devices")

#: the one line that tells a user how to get microphone and speaker support
EXTRA_HINT = (
    "microphone and speaker support needs the optional extra: pip install 'musiclib[devices]'"
)
#: the line for a sounddevice that is installed but cannot find PortAudio itself
PORTAUDIO_HINT = (
    "microphone and speaker support needs the PortAudio library, which is not installed "
    "(Debian and Ubuntu: apt-get install libportaudio2)"
)
#: our sample formats as PortAudio's sample types; both are little-endian on every
#: platform PortAudio runs on, so the raw buffers are exactly s16le and f32le
DTYPES = {"s16le": "int16", "f32le": "float32"}
#: audio a microphone keeps for a reader that is late, by default
INPUT_BUFFER_SECONDS = 2.0
#: the least a speaker lets its writer queue up, whatever the jitter buffer
SPEAKER_HIGH_WATER_SECONDS = 0.2
#: a speaker's underruns are logged at most this often
UNDERRUN_LOG_INTERVAL = 1.0

Kind = Literal["input", "output"]


def sounddevice_module() -> ModuleType:
    """The ``sounddevice`` module, imported (and PortAudio initialised) on first use.

    Raises :class:`~musiclib.errors.DeviceError` with one line saying what to
    install when the extra or the PortAudio library is missing.
    """
    try:
        import sounddevice
    except ImportError:
        raise DeviceError(EXTRA_HINT) from None
    except OSError:  # sounddevice's "PortAudio library not found"
        raise DeviceError(PORTAUDIO_HINT) from None
    except Exception as exc:  # Pa_Initialize failed: a PortAudioError from the import
        raise DeviceError(f"PortAudio could not be initialised: {exc}") from None
    module: ModuleType = sounddevice
    return module


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device as PortAudio lists it."""

    index: int
    name: str
    hostapi: str
    max_input_channels: int
    max_output_channels: int
    default_samplerate: float
    is_default_input: bool
    is_default_output: bool

    def has(self, kind: Kind) -> bool:
        """Whether the device can record (``input``) or play (``output``)."""
        channels = self.max_input_channels if kind == "input" else self.max_output_channels
        return channels > 0


def _default_index(sd: ModuleType, kind: Kind) -> int:
    """PortAudio's default device of ``kind``, or -1 if there is none."""
    try:
        info = sd.query_devices(kind=kind)
    except (sd.PortAudioError, ValueError):
        return -1
    return int(info["index"])


def list_devices() -> list[DeviceInfo]:
    """Every device PortAudio knows, in PortAudio's order (the index is the position)."""
    sd = sounddevice_module()
    hostapis = [str(api["name"]) for api in sd.query_hostapis()]
    default_in = _default_index(sd, "input")
    default_out = _default_index(sd, "output")
    found = []
    for index, dev in enumerate(sd.query_devices()):
        api = int(dev["hostapi"])
        found.append(
            DeviceInfo(
                index=index,
                name=str(dev["name"]),
                hostapi=hostapis[api] if 0 <= api < len(hostapis) else "?",
                max_input_channels=int(dev["max_input_channels"]),
                max_output_channels=int(dev["max_output_channels"]),
                default_samplerate=float(dev["default_samplerate"]),
                is_default_input=index == default_in,
                is_default_output=index == default_out,
            )
        )
    return found


def _describe(devices: list[DeviceInfo], kind: Kind) -> str:
    """The ``kind`` devices that exist, for an error message: what the user may pick."""
    usable = [d for d in devices if d.has(kind)]
    if not usable:
        return f"there are no {kind} devices (no sound card, or no sound server running)"
    default = "is_default_input" if kind == "input" else "is_default_output"
    names = ", ".join(
        f"{d.index}: {d.name!r}" + (" (default)" if getattr(d, default) else "") for d in usable
    )
    return f"{kind} devices: {names}"


def find_device(name: str | None, kind: Kind) -> int | None:
    """The index of the ``kind`` device called ``name``; ``None`` means the default device.

    ``name`` is matched, in this order, as an exact device name, as a device
    index (a decimal number), then as a case-insensitive part of exactly one
    name. The index comes before the partial match so that ``0`` picks device
    0 and not every device with a 0 in its name. No match, or several:
    :class:`~musiclib.errors.DeviceError` listing the devices that exist.
    """
    if name is None:
        return None
    devices = list_devices()
    usable = [d for d in devices if d.has(kind)]
    exact = [d for d in usable if d.name == name]
    if len(exact) == 1:
        return exact[0].index
    if not exact and name.strip().isdecimal():
        index = int(name)
        if any(d.index == index for d in usable):
            return index
        raise DeviceError(f"there is no {kind} device {index}; {_describe(devices, kind)}")
    partial = exact or [d for d in usable if name.casefold() in d.name.casefold()]
    if len(partial) == 1:
        return partial[0].index
    if not partial:
        raise DeviceError(f"no {kind} device matches {name!r}; {_describe(devices, kind)}")
    names = ", ".join(f"{d.index}: {d.name!r}" for d in partial)
    raise DeviceError(
        f"{name!r} matches several {kind} devices ({names}); give the exact name or the index"
    )


def _dtype(fmt: AudioFormat) -> str:
    try:
        return DTYPES[fmt.sample_format]
    except KeyError:
        known = ", ".join(DTYPES)
        raise ValueError(f"devices take {known} samples, not {fmt.sample_format!r}") from None


async def _open_stream(
    sd: ModuleType, factory: Callable[..., Any], kind: Kind, name: str | None, **kwargs: Any
) -> Any:
    """Open and start a PortAudio stream in a worker thread; the failures as DeviceError."""
    index = find_device(name, kind)
    if index is None and _default_index(sd, kind) < 0:
        raise DeviceError(f"there is no default {kind} device; {_describe(list_devices(), kind)}")

    def open_and_start() -> Any:
        stream = factory(device=index, **kwargs)
        try:
            stream.start()
        except BaseException:
            stream.close(ignore_errors=True)
            raise
        return stream

    try:
        # not abandoned on cancellation: the stream comes back and is closed by the caller
        return await trio.to_thread.run_sync(open_and_start)
    except (sd.PortAudioError, ValueError) as exc:
        label = "the default" if name is None else repr(name)
        devices = _describe(list_devices(), kind)
        raise DeviceError(f"cannot open {label} {kind} device: {exc}; {devices}") from None


async def _close_stream(stream: Any) -> None:
    """Stop (discarding what is queued) and close ``stream``, even in a cancelled scope."""

    def abort_and_close() -> None:
        try:
            stream.abort(ignore_errors=True)
        finally:
            stream.close(ignore_errors=True)

    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(abort_and_close)


class _Waker:
    """Wakes trio from a PortAudio thread, with at most one wake-up in flight.

    ``poke()`` is called with the owner's lock held, on PortAudio's thread; it
    never blocks. The trio side waits on :meth:`event`, a fresh
    :class:`trio.Event` taken under the same lock after finding nothing to do.
    """

    def __init__(self, lock: threading.Lock, on_wake: Callable[[], None] | None = None) -> None:
        self._lock = lock
        self._token = trio.lowlevel.current_trio_token()
        self._pending = False
        self._event = trio.Event()
        self._on_wake = on_wake

    def poke(self) -> None:
        """(PortAudio's thread, lock held) make trio run :meth:`_wake` soon."""
        if self._pending:
            return
        self._pending = True
        with contextlib.suppress(trio.RunFinishedError):  # trio is gone: nobody to wake
            self._token.run_sync_soon(self._wake)

    def event(self) -> trio.Event:
        """(trio, lock held) an event that the next :meth:`poke` sets."""
        self._event = trio.Event()
        return self._event

    def _wake(self) -> None:
        with self._lock:
            self._pending = False
            event = self._event
        event.set()
        if self._on_wake is not None:
            self._on_wake()


class Microphone:
    """The blocks an input device records, as an async iterator of ``(data, time_ns)``.

    Every block holds exactly ``block_frames`` frames; ``time_ns`` is the wall
    clock when its last frame had been captured. Blocks follow each other
    without a hole unless :attr:`dropped_before_last` says otherwise (read it
    right after each block: it is exact, where comparing :attr:`overflows`
    before and after can race with a drop). Get one from :func:`open_input`.
    """

    def __init__(self, fmt: AudioFormat, block_frames: int, buffer_seconds: float) -> None:
        if block_frames < 1:
            raise ValueError("block_frames must be at least 1")
        if not buffer_seconds > 0:
            raise ValueError("buffer_seconds must be positive")
        self.format = fmt
        self.block_frames = block_frames
        #: blocks dropped (the oldest first) because the reader fell behind by more
        #: than the buffer holds
        self.overflows = 0
        #: of those, the blocks dropped right before the block last returned: a reader
        #: counting positions skips that many blocks of frames (and says so to listeners)
        self.dropped_before_last = 0
        #: callbacks in which PortAudio said the device itself lost input
        self.input_overflows = 0
        self._block_bytes = block_frames * fmt.bytes_per_frame
        self._max_blocks = max(1, math.ceil(buffer_seconds * fmt.sample_rate / block_frames))
        self._lock = threading.Lock()
        self._blocks: deque[tuple[bytes, int]] = deque()
        self._partial = bytearray()
        self._dropped_before_head = 0
        self._finished = False
        self._waker = _Waker(self._lock)

    def _callback(self, indata: Any, frames: int, _time: Any, status: Any) -> None:
        """(PortAudio's thread) re-cut what arrived into whole blocks; never blocks."""
        now = time.time_ns()
        data = bytes(indata)
        with self._lock:
            if status.input_overflow:
                self.input_overflows += 1
            partial = self._partial
            partial += data
            size = self._block_bytes
            if len(partial) < size:
                return
            bpf = self.format.bytes_per_frame
            rate = self.format.sample_rate
            while len(partial) >= size:
                block = bytes(partial[:size])
                del partial[:size]
                later = len(partial) // bpf  # frames captured after this block's last one
                self._blocks.append((block, now - later * 1_000_000_000 // rate))
                if len(self._blocks) > self._max_blocks:
                    self._blocks.popleft()
                    self.overflows += 1
                    self._dropped_before_head += 1  # the hole is before the new oldest
            self._waker.poke()

    def _stream_finished(self) -> None:
        """(PortAudio's thread) the stream stopped, because we stopped it or it failed."""
        with self._lock:
            self._finished = True
            self._waker.poke()

    def __aiter__(self) -> Microphone:
        return self

    async def __anext__(self) -> tuple[bytes, int]:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            with self._lock:
                if self._blocks:
                    block = self._blocks.popleft()
                    self.dropped_before_last = self._dropped_before_head
                    self._dropped_before_head = 0
                    break
                if self._finished:
                    raise DeviceError("the input device stopped delivering audio")
                event = self._waker.event()
            await event.wait()
        await trio.lowlevel.cancel_shielded_checkpoint()  # a block taken is never lost
        return block


@asynccontextmanager
async def open_input(
    device: str | None,
    fmt: AudioFormat,
    *,
    block_frames: int,
    buffer_seconds: float = INPUT_BUFFER_SECONDS,
) -> AsyncIterator[Microphone]:
    """Record from ``device`` (``None``: the default) in ``fmt``, block by block.

    The :class:`Microphone` handed out yields ``(data, time_ns)`` blocks of
    exactly ``block_frames`` frames. Up to ``buffer_seconds`` of audio wait for
    a late reader; beyond that the oldest blocks are dropped and counted in
    ``overflows``. A device that is missing, busy or cannot take ``fmt``:
    :class:`~musiclib.errors.DeviceError` naming the input devices there are.
    """
    dtype = _dtype(fmt)
    sd = sounddevice_module()  # on this thread: see the module's docstring
    mic = Microphone(fmt, block_frames, buffer_seconds)
    stream = await _open_stream(
        sd,
        sd.RawInputStream,
        "input",
        device,
        samplerate=fmt.sample_rate,
        channels=fmt.channels,
        dtype=dtype,
        blocksize=block_frames,
        callback=mic._callback,
        finished_callback=mic._stream_finished,
    )
    try:
        yield mic
    finally:
        await _close_stream(stream)


class Speaker:
    """Plays what is written to it on an output device, through a small jitter buffer.

    Playback starts once ``jitter_ms`` of audio is buffered, and starts over
    that way after the buffer ran dry, so that one late write costs one gap
    and not a stutter. The writer waits while more than
    max(4 * jitter, 200 ms) is queued. Get one from :func:`open_output`.
    """

    def __init__(self, fmt: AudioFormat, jitter_ms: float) -> None:
        if not (math.isfinite(jitter_ms) and jitter_ms >= 0):
            raise ValueError("jitter_ms must be a non-negative number")
        self.format = fmt
        bpf = fmt.bytes_per_frame
        #: times the buffer ran dry while playing (silence was played instead)
        self.underruns = 0
        #: callbacks in which PortAudio said the device itself ran short
        self.output_underflows = 0
        #: bytes written and bytes handed to PortAudio so far
        self.written = 0
        self.played = 0
        self._prefill = max(1, round(jitter_ms / 1000 * fmt.sample_rate)) * bpf
        high = max(4 * jitter_ms / 1000, SPEAKER_HIGH_WATER_SECONDS)
        self._high = max(self._prefill, round(high * fmt.sample_rate) * bpf)
        self._lock = threading.Lock()
        self._buffer = bytearray()
        self._playing = False
        self._draining = False
        self._finished = False
        self._dac_end = 0.0  # stream time at which the last data handed over is heard
        self._logged_underruns = 0
        self._last_log = -math.inf
        self._waker = _Waker(self._lock, self._log_underruns)
        self._stream: Any = None

    def _callback(self, outdata: Any, frames: int, time_info: Any, status: Any) -> None:
        """(PortAudio's thread) hand over buffered audio, or silence; never blocks."""
        size = len(outdata)
        with self._lock:
            if status.output_underflow:
                self.output_underflows += 1
            buffer = self._buffer
            if not self._playing and buffer and (len(buffer) >= self._prefill or self._draining):
                self._playing = True
            take = min(size, len(buffer)) if self._playing else 0
            if take:
                outdata[:take] = buffer[:take]
                del buffer[:take]
                self.played += take
                bps = self.format.bytes_per_second
                self._dac_end = float(time_info.outputBufferDacTime) + take / bps
            if take < size:
                outdata[take:] = bytes(size - take)
                if self._playing:
                    self._playing = False  # wait for the jitter buffer to fill again
                    if not self._draining:
                        self.underruns += 1
            if take or self.underruns != self._logged_underruns:
                self._waker.poke()

    def _stream_finished(self) -> None:
        """(PortAudio's thread) the stream stopped, because we stopped it or it failed."""
        with self._lock:
            self._finished = True
            self._waker.poke()

    def _log_underruns(self) -> None:
        """(trio) report new underruns, at most once every UNDERRUN_LOG_INTERVAL seconds."""
        with self._lock:
            count = self.underruns
        if count == self._logged_underruns:
            return
        now = time.monotonic()
        if now - self._last_log < UNDERRUN_LOG_INTERVAL:
            return
        log.warning(
            "speaker ran dry %d time(s) since the last report (%d in all); "
            "the audio arrives late or unevenly",
            count - self._logged_underruns,
            count,
        )
        self._logged_underruns = count
        self._last_log = now

    def _check_alive(self) -> None:
        if self._finished:
            raise DeviceError("the output device stopped playing")

    async def write(self, data: bytes) -> None:
        """Queue ``data`` (whole frames) for playback; waits while the buffer is full."""
        if len(data) % self.format.bytes_per_frame:
            raise ValueError(
                f"{len(data)} bytes are not whole frames of {self.format.bytes_per_frame} bytes"
            )
        view = memoryview(data)
        while True:
            with self._lock:
                self._check_alive()
                self._draining = False
                room = self._high - len(self._buffer)
                if room > 0 and view:
                    take = min(room, len(view))
                    self._buffer += view[:take]
                    self.written += take
                    view = view[take:]
                if not view:
                    break
                event = self._waker.event()
            await event.wait()
        await trio.lowlevel.checkpoint()

    async def drain(self) -> None:
        """Wait until everything written so far has been played (the buffer too, if short)."""
        while True:
            with self._lock:
                self._check_alive()
                self._draining = True
                if not self._buffer:
                    dac_end = self._dac_end
                    break
                event = self._waker.event()
            await event.wait()
        stream = self._stream
        if not dac_end or stream is None:  # nothing was ever played
            await trio.lowlevel.checkpoint()
            return
        # What PortAudio still holds is heard by the last byte's DAC time (stream time);
        # a host API without a usable clock gives nonsense, then the stated latency will do.
        ahead = dac_end - float(stream.time)
        await trio.sleep(ahead if 0.0 <= ahead <= 2.0 else float(stream.latency))


@asynccontextmanager
async def open_output(
    device: str | None, fmt: AudioFormat, *, jitter_ms: float = 60.0
) -> AsyncIterator[Speaker]:
    """Play on ``device`` (``None``: the default) in ``fmt`` through a :class:`Speaker`.

    The stream runs (playing silence) from the start; what the block did not
    :meth:`~Speaker.drain` is cut off on the way out. A device that is missing,
    busy or cannot take ``fmt``: :class:`~musiclib.errors.DeviceError` naming
    the output devices there are.
    """
    dtype = _dtype(fmt)
    sd = sounddevice_module()  # on this thread: see the module's docstring
    speaker = Speaker(fmt, jitter_ms)
    stream = await _open_stream(
        sd,
        sd.RawOutputStream,
        "output",
        device,
        samplerate=fmt.sample_rate,
        channels=fmt.channels,
        dtype=dtype,
        blocksize=max(1, fmt.sample_rate // 100),
        callback=speaker._callback,
        finished_callback=speaker._stream_finished,
    )
    speaker._stream = stream
    try:
        yield speaker
    finally:
        speaker._stream = None
        await _close_stream(stream)
