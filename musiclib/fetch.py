"""What ``get`` and ``play`` do with a stream: save it, pipe it, or both at once.

(``play`` by URL, mpv's and vlc's default, goes through :mod:`musiclib.playing` and
:mod:`musiclib.gateway` instead; it still saves with :func:`save`.)

Saving is atomic: bytes go to ``PATH.part`` and are renamed to ``PATH`` only
once verified (original bytes: size and sha256 from the server; decoded
samples: the frame count the protocol checks, and the WAV header patched to
the real length). A ``.part`` left by an interrupted original download is
resumed from its length; decoded output is always written from the start.

A resume may reach another server than the bytes already kept came from (replicas
behind a load balancer, each with its own copy of the file: other inode, other
modification time, so another ``version``). What is kept is only ever completed
by the same file: each attempt's ``stream_start`` is compared with the first
attempt's (:class:`_Origin`: the size, and the sha256 whenever both announced
one), and a copy that differs is never spliced on. A save then starts over
from zero at once; a pipe, whose bytes are gone already, fails (IntegrityError)
before writing a byte of the other file. Copies that no header tells apart
(same size, no sha256 announced) are told apart by the whole-file checksum at
the end, as before: a save starts over once, a pipe fails.

The server is not trusted with the local file system. A saved file's name is
the last component of the server's path for the track, sanitised
(:func:`safe_name`: no separator, no leading dot, no control character, at
most :data:`MAX_NAME_BYTES` bytes), falling back on the name the user typed;
the server's name is preferred because the user's is often a fragment
("Brume") without an extension. The file always lands in the folder asked
for. An existing file is never replaced unless asked (``replace``, the CLI's
``--force``): the final step is a hard link, which fails if the name was
taken meanwhile, or a rename, which replaces a symbolic link itself and never
writes through it. A ``.part`` is opened without following a symbolic link,
must be a regular file with no other name, and must still be that file when
it is renamed. How much a stream may carry is bounded in
:class:`~musiclib.client.StreamReader`.

Saving and playing at once uses the ``.part`` file itself as the buffer
between the network and the player: the download writes at network speed and
a second task reads the file back at the player's pace. Memory therefore
stays at a few chunks whatever the track's length, and a player that quits
early does not stop the save. Without a save there is nowhere to put data the
player has not taken yet, so the network is slowed to the player's pace by a
small bounded queue and TCP flow control.

Every consumer (the ``.part`` file, standard output, a player) is fed through
a write-behind queue that delivers whatever has piled up in one go: large
writes when the network is fast, immediate ones when it is not.

File writes run in a worker thread: a local disk may be slow or full, and the
event loop must keep feeding the player meanwhile. A saved file's thread takes
chunks for as long as they keep coming (:class:`_ThreadWriteBehind`), and a new
file of original bytes that no player reads back is hashed there and written past
the page cache (:class:`_DirectWriter`): measured for issue 15, item 1.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import math
import mmap
import os
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

import trio

from .client import RETRYABLE, Client, StreamReader, early_requests
from .errors import (
    Changed,
    ConnectError,
    IntegrityError,
    OutputError,
    UsageError,
    single_errors,
)
from .player import Player
from .protocol import SAMPLE_FORMATS, StreamStart
from .wav import patch_sizes, wav_header

log = logging.getLogger("musiclib.client")

_T = TypeVar("_T")

#: bytes read back from a ``.part`` file per write to the player
PLAYER_READ_SIZE = 64 * 1024
#: output formats of decoded streams
OUTPUT_FORMATS = ("wav", *SAMPLE_FORMATS)
#: the longest file name :func:`safe_name` gives, in bytes of UTF-8
MAX_NAME_BYTES = 200
#: seconds of audio a decoded stream may carry when the track's duration is not known
UNKNOWN_DURATION_LIMIT = 6 * 3600.0
#: the most seconds a track's decoded stream may run past its indexed duration:
#: ``max(MIN_DURATION_MARGIN, duration * DURATION_MARGIN_RATIO)``
MIN_DURATION_MARGIN = 30.0
DURATION_MARGIN_RATIO = 0.5
#: seconds a player that stopped reading gets to exit before it is stopped
PLAYER_EXIT_WAIT = 5.0


@dataclass(frozen=True)
class Decoding:
    """A decoded stream as the user asked for it, and how to write it out."""

    output: str = "wav"  # "wav", or a raw sample format
    sample_format: str = "s16le"  # of the samples (also inside a WAV)
    sample_rate: int | None = None
    channels: int | None = None
    start: float = 0.0
    duration: float | None = None
    realtime: bool = False
    #: the track's duration in the server's index, if known: bounds the stream
    source_duration: float | None = None

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_FORMATS:
            raise UsageError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}")
        if self.sample_format not in SAMPLE_FORMATS:
            raise UsageError(f"--sample-format must be one of {', '.join(SAMPLE_FORMATS)}")
        if self.output != "wav" and self.output != self.sample_format:
            object.__setattr__(self, "sample_format", self.output)

    @property
    def extension(self) -> str:
        """File extension for ``--save``: ``wav``, or the raw format's name."""
        return self.output

    def max_seconds(self) -> float:
        """The most audio the stream may carry when no ``duration`` was asked for: what is
        left of the track after ``start``, plus a margin (indexed durations are estimates),
        or :data:`UNKNOWN_DURATION_LIMIT`."""
        known = self.source_duration
        if known is None or not math.isfinite(known) or known <= 0:
            return UNKNOWN_DURATION_LIMIT
        left = max(known - self.start, 0.0)
        return left + max(MIN_DURATION_MARGIN, left * DURATION_MARGIN_RATIO)

    def open(self, client: Client, track: str) -> StreamReader:
        """The stream request for ``track``."""
        return client.decode(
            track,
            sample_format=self.sample_format,
            sample_rate=self.sample_rate,
            channels=self.channels,
            start=self.start,
            duration=self.duration,
            realtime=self.realtime,
            max_seconds=self.max_seconds(),
        )

    def header(self, start: StreamStart, data_bytes: int | None) -> bytes:
        """What precedes the samples: a WAV header, or nothing for raw output."""
        if self.output != "wav":
            return b""
        assert start.sample_format and start.sample_rate and start.channels
        return wav_header(start.sample_format, start.sample_rate, start.channels, data_bytes)


class Reporter(Protocol):
    """Told how a transfer advances; the CLI draws a progress bar from it."""

    def begin(self, total: int | None, done: int = 0) -> None:
        """The stream started: ``total`` bytes expected (if known), ``done`` already there."""

    def advance(self, n: int) -> None:
        """``n`` more bytes reached the file or the player."""


class _Silent:
    """The reporter when nobody is watching."""

    def begin(self, total: int | None, done: int = 0) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass
class Outcome:
    """What a transfer did, for the command to report."""

    path: str
    size: int
    received: int = 0
    resumed_from: int = 0
    frames: int | None = None
    saved_to: Path | None = None
    player_status: int | None = None
    player_note: str | None = None
    #: where the last attempt started in the file (0: from scratch)
    attempt_offset: int = 0
    #: the consumer (player, pipe reader) went away before the end
    stopped_early: bool = False
    #: told of the transfer's progress (bytes at the file for a save, at the player for play)
    reporter: Reporter = field(default_factory=_Silent, repr=False)


def part_path(dest: Path) -> Path:
    """Where the bytes of ``dest`` wait until they are verified."""
    return dest.with_name(dest.name + ".part")


# ---- where a file is saved ----------------------------------------------------


def safe_name(path: str, *, max_bytes: int = MAX_NAME_BYTES) -> str | None:
    """The last component of ``path`` as a harmless file name, or ``None`` if nothing is left.

    ``/`` and ``\\`` both separate; control and other unprintable characters
    (NUL included) become ``_``; leading dots and spaces go (no hidden file, no
    ``.`` or ``..``); a name longer than ``max_bytes`` bytes of UTF-8 is cut,
    keeping a short extension.
    """
    last = path.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c if c.isprintable() else "_" for c in last).lstrip(". ").rstrip(" ")
    if not name or name in (".", ".."):
        return None
    if len(name.encode()) <= max_bytes:
        return name
    stem, dot, ext = name.rpartition(".")
    if not (dot and stem and 0 < len(ext.encode()) <= 16):
        stem, ext = name, ""
    tail = f".{ext}" if ext else ""
    room = max_bytes - len(tail.encode())
    return stem.encode()[:room].decode(errors="ignore").rstrip(" ") + tail


def file_name(server_path: str, typed: str, fmt: str, decoding: Decoding | None) -> str:
    """The name to save a track under: the server's (sanitised), else the one the user
    typed, else ``track``; with ``decoding``, the new extension replaces the old."""
    name = safe_name(server_path)
    if name is None:
        name = safe_name(typed) or "track"
        if fmt.isalnum() and len(fmt) <= 10 and not name.endswith(f".{fmt}"):
            name += f".{fmt}"
    if decoding is not None:
        stem = name.rpartition(".")[0] or name
        name = f"{stem}.{decoding.extension}"
    return safe_name(name) or "track"  # a longer extension: cut to the bound again


def destination(output: str | None, name: str, *, replace: bool = False) -> Path:
    """Where to save ``name``: the current folder, ``output`` if it is a folder (or ends
    with ``/``: it must then exist), else ``output`` itself.

    A file that is there already is refused (OutputError, with a hint) unless
    ``replace``; so is a folder. The check is repeated when the file is committed.
    """
    folder: Path | None = None
    if output is None:
        folder = Path.cwd()
    elif output.endswith(("/", os.sep)) or Path(output).is_dir():
        folder = Path(output)
        if not folder.is_dir():
            reason = "the folder does not exist" if not folder.exists() else "not a folder"
            raise OutputError(f"cannot write {output}: {reason}")
    dest = Path(output or "") if folder is None else folder / name
    if folder is not None and dest.parent.resolve() != folder.resolve():
        raise OutputError(f"refusing to save {name!r} outside {folder}")  # safe_name prevents it
    if dest.is_dir():
        raise OutputError(f"cannot write {dest}: it is a directory")
    if not replace and os.path.lexists(dest):
        raise _exists(dest)
    return dest


def _exists(dest: Path) -> OutputError:
    return OutputError(f"{dest} already exists: use --force to replace it")


def _output_error(exc: OSError, path: Path | str) -> OutputError:
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "the file system is read-only",
        errno.ENOENT: "the folder does not exist",
        errno.EISDIR: "it is a directory",
        errno.EFBIG: "the file is too large (for the file system, or a file size limit)",
    }
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return OutputError(f"cannot write {path}: {reason}")


async def _in_thread(path: Path | str, fn: Callable[..., _T], *args: object) -> _T:
    """Run a blocking file operation in a worker thread; OSError becomes OutputError."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except OSError as exc:
        raise _output_error(exc, path) from None


#: chunks queued between the network and a slower consumer (disk, pipe, player)
QUEUE_CHUNKS = 8
#: seconds without a chunk after which a buffering writer puts out what it holds
IDLE_AFTER = 0.05


class _WriteBehind:
    """A bounded queue between the network and a slower consumer, drained in batches.

    The consumer takes everything queued at once: while the disk or pipe is
    busy, chunks pile up (up to the bound) and go out in one threaded write;
    when the network is the slow side, each chunk goes out as it arrives. So
    bulk transfers wake a worker thread rarely, and live ones are not delayed.
    """

    def __init__(self, deliver: Callable[[list[bytes]], Awaitable[bool]]) -> None:
        self._send, self._receive = trio.open_memory_channel[bytes](QUEUE_CHUNKS)
        self._deliver = deliver
        self._done = trio.Event()
        self._queued = 0  # chunks put so far
        self._delivered = 0  # chunks the consumer has taken care of
        self._progress = trio.Event()  # set (and replaced) after each batch
        #: the consumer went away (a player quit, a pipe's reader left)
        self.stopped = False

    async def run(self) -> None:
        """The consumer's task: deliver batches until the queue is closed and empty."""
        try:
            async with self._receive:
                async for first in self._receive:
                    chunks = [first]
                    with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                        while True:
                            chunks.append(self._receive.receive_nowait())
                    if not await self._deliver(chunks):
                        self.stopped = True
                        return  # closing the queue tells the network side to stop
                    self._delivered += len(chunks)
                    self._progress.set()
                    self._progress = trio.Event()
        finally:
            self._done.set()
            self._progress.set()

    async def put(self, chunk: bytes) -> bool:
        """Queue ``chunk``; False once the consumer has gone away."""
        try:
            await self._send.send(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self._queued += 1
        return True

    async def drain(self) -> bool:
        """Wait until every chunk queued so far has been delivered; False if the
        consumer went away first (then not all of them were)."""
        target = self._queued
        while self._delivered < target and not self._done.is_set():
            await self._progress.wait()
        return self._delivered >= target

    async def close(self) -> None:
        """No more chunks: wait until everything queued has been delivered.

        Shielded, so that a transfer that fails still writes every byte it
        received (a resume starts from them); if the consumer itself is
        cancelled it stops at once and this returns.
        """
        await self._send.aclose()
        with trio.CancelScope(shield=True):
            await self._done.wait()


class _ThreadWriteBehind:
    """The write-behind queue of a saved file: one worker thread writes for as long as
    chunks keep coming.

    :class:`_WriteBehind` sends each batch to a worker thread and waits for it on the
    event loop, so between two batches the thread idles until the loop has taken the
    finished call's wake-up and sent the next batch: measured in-process, a quarter of
    a 1 GiB download's time (issue 15, item 1). A file written past the page cache is
    hashed and copied in this thread (:class:`_DirectWriter`), the larger share of the
    work, so the thread takes the next batch itself as soon as it is done with one, and
    wakes the loop only when the loop waits for room in the queue, or to count progress.

    ``write(chunks)`` runs in the worker thread and returns the bytes it took; what it
    raises comes out of :meth:`run`. ``idle()`` runs there when no chunk came for
    :data:`IDLE_AFTER` seconds (the network is the slow side: a buffering writer puts
    out what it holds), and ``end()`` last, also after a failure. ``written(n)`` runs
    on the event loop after each batch, as a callback (so it only counts: it must not
    raise). Memory: at most ``QUEUE_CHUNKS`` chunks queued and one batch in hand.
    """

    def __init__(
        self,
        write: Callable[[list[bytes]], int],
        *,
        written: Callable[[int], None] | None = None,
        idle: Callable[[], None] | None = None,
        end: Callable[[], None] | None = None,
    ) -> None:
        self._write, self._written, self._idle, self._end = write, written, idle, end
        self._token = trio.lowlevel.current_trio_token()
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)  # the worker waits on it for chunks
        self._chunks: collections.deque[bytes] = collections.deque()
        self._closed = False  # no more chunks will come
        self._cancelled = False  # stop after the current batch
        self._ended = False  # the worker has returned
        self._loop_waits = False  # wake the loop after the next batch
        self._changed = trio.Event()  # set (and replaced) on the loop when the loop waited
        self._done = trio.Event()
        self._error: BaseException | None = None

    async def run(self) -> None:
        """Start the worker and wait for it; cancelled, it stops after its current batch."""
        threading.Thread(target=self._work, name="musiclib-writer", daemon=True).start()
        try:
            await self._done.wait()
        finally:
            if not self._done.is_set():
                with self._lock:
                    self._cancelled = True
                    self._more.notify()
                with trio.CancelScope(shield=True):
                    await self._done.wait()
        if self._error is not None:
            raise self._error

    async def put(self, chunk: bytes) -> bool:
        """Queue ``chunk``; False once the worker has ended (it failed)."""
        while True:
            with self._lock:
                if self._ended or self._cancelled:
                    return False
                if len(self._chunks) < QUEUE_CHUNKS:
                    self._chunks.append(chunk)
                    self._more.notify()
                    return True
                self._loop_waits = True
                changed = self._changed
            await changed.wait()

    async def close(self) -> None:
        """No more chunks: wait until everything queued has been written (shielded, as
        :meth:`_WriteBehind.close`)."""
        with self._lock:
            self._closed = True
            self._more.notify()
        with trio.CancelScope(shield=True):
            await self._done.wait()

    def _work(self) -> None:
        try:
            while True:
                batch = self._take(IDLE_AFTER if self._idle is not None else None)
                if batch == [] and self._idle is not None:
                    self._idle()  # outside the lock: it may write
                    batch = self._take(None)
                if batch is None:
                    return
                n = self._write(batch)
                with self._lock:
                    wake, self._loop_waits = self._loop_waits, False
                if wake or self._written is not None:
                    self._token.run_sync_soon(self._batch_done, n, wake)
        except BaseException as exc:
            self._error = exc
        finally:
            try:
                if self._end is not None:
                    self._end()
            except BaseException as exc:
                self._error = self._error or exc
            with self._lock:
                self._ended = True
            self._token.run_sync_soon(self._finished)

    def _take(self, timeout: float | None) -> list[bytes] | None:
        """Every chunk queued, waiting up to ``timeout`` seconds for one (``[]``: none
        came), or ``None`` once the queue is closed and empty, or cancelled."""
        with self._lock:
            self._more.wait_for(
                lambda: self._chunks or self._closed or self._cancelled, timeout=timeout
            )
            if self._cancelled or (self._closed and not self._chunks):
                return None
            batch = list(self._chunks)
            self._chunks.clear()
            return batch

    def _batch_done(self, n: int, wake: bool) -> None:
        if self._written is not None:
            self._written(n)
        if wake:
            self._changed.set()
            self._changed = trio.Event()

    def _finished(self) -> None:
        self._done.set()
        self._changed.set()


class _Progress:
    """How many bytes of the ``.part`` file are written; wakes the player feeder."""

    def __init__(self, start: int, *, want_reader: bool = False) -> None:
        self.written = start
        self.done = False
        #: a second handle on the ``.part`` file for the player feeder, opened by the
        #: download before it writes (so a fast download cannot rename it away first)
        self.want_reader = want_reader
        self.reader: BinaryIO | None = None
        self._event = trio.Event()

    def advance(self, n: int) -> None:
        self.written += n
        self._event.set()
        self._event = trio.Event()

    def reset(self, written: int) -> None:
        """A new attempt starts with the file at ``written`` bytes."""
        self.written = written
        self._event.set()
        self._event = trio.Event()

    def finish(self) -> None:
        self.done = True
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


# ---- retries -----------------------------------------------------------------

Connector = Callable[[], AbstractAsyncContextManager[Client]]


def reusing(client: Client, connect: Connector) -> Connector:
    """A :data:`Connector` whose first connection is ``client``, already open, and the
    later ones (retries, more tracks) new ones from ``connect``.

    ``get`` and ``play`` ask ``info`` first; their stream then goes over the same
    connection instead of a second connect and handshake. Whoever opened
    ``client`` still closes it; a stream left unfinished closes it earlier.
    """
    spare = [client]

    @contextlib.asynccontextmanager
    async def reused() -> AsyncIterator[Client]:
        yield spare.pop()

    def connector() -> AbstractAsyncContextManager[Client]:
        return reused() if spare else connect()

    return connector


@contextlib.asynccontextmanager
async def _open(connect: Connector) -> AsyncIterator[Client]:
    """A connection from ``connect``, whose ``hello`` goes out with its first request
    (a ``stream``) instead of a round trip before it (:func:`~musiclib.client.early_requests`)."""
    async with contextlib.AsyncExitStack() as stack:
        with early_requests():
            client = await stack.enter_async_context(connect())
        yield client


@dataclass(frozen=True)
class Retry:
    """Reconnect after a dropped connection: how often, and how long to wait between."""

    attempts: int = 5
    first_delay: float = 0.5
    max_delay: float = 8.0

    def delays(self) -> list[float]:
        """The waits before each reconnection: doubling, capped."""
        return [min(self.first_delay * 2**n, self.max_delay) for n in range(self.attempts)]


NO_RETRY = Retry(attempts=0)


async def _retrying(retry: Retry, attempt: Callable[[], Awaitable[None]], what: str) -> None:
    """Run ``attempt`` until it succeeds, retrying RETRYABLE failures ``retry.attempts`` times.

    Each attempt resumes from what the previous ones delivered, so a retry
    costs only the bytes still missing.
    """
    delays = retry.delays()
    for n in range(len(delays) + 1):
        try:
            await attempt()
            return
        except RETRYABLE as exc:
            if n == len(delays):
                raise
            log.warning(
                "%s: %s; retrying in %.1f s (%d of %d)", what, exc, delays[n], n + 1, len(delays)
            )
            await trio.sleep(delays[n])


@contextlib.asynccontextmanager
async def first_reply(
    connect: Connector, retry: Retry, what: str, ask: Callable[[Client], Awaitable[_T]]
) -> AsyncIterator[tuple[Client, _T]]:
    """Connect and ask a first question (``get``'s ``info``, ``play``'s queue), retrying
    RETRYABLE failures as a transfer does; yields the open client and the answer.

    Behind a load balancer a new connection can land on a replica in the very
    moment it stops (accepted by its kernel, never answered): that is a
    dropped connection like any other, and ``get`` must not fail on it when
    the same failure one request later would have been retried. A refused
    connect is not retried: then nothing listens there at all (no server, or a
    wrong address), and the user should hear it at once.
    """
    delays = retry.delays()
    for n in range(len(delays) + 1):
        async with contextlib.AsyncExitStack() as stack:
            try:
                with early_requests():  # the hello goes out with the first question
                    client = await stack.enter_async_context(connect())
                answer = await ask(client)
            except RETRYABLE as exc:
                if n == len(delays) or isinstance(exc, ConnectError):
                    raise  # nothing listens there: say so now, not after 15 s of retries
                log.warning(
                    "%s: %s; retrying in %.1f s (%d of %d)",
                    what,
                    exc,
                    delays[n],
                    n + 1,
                    len(delays),
                )
            else:
                yield client, answer
                return
        await trio.sleep(delays[n])  # after the failed connection is closed


@dataclass
class _Origin:
    """The file the bytes kept so far are a prefix of, as the first attempt announced it.

    Resuming is only byte-exact if the next attempt sends the same file. Its
    ``version`` cannot say so: another replica's copy has another
    modification time, and an identical copy is the normal case. Size and
    sha256 can: a different size is a different file, and so is a different
    sha256 when both attempts announced one (a server announces it when its
    index knows it). Anything the headers cannot tell apart is caught by the
    checksum of the whole at the end.
    """

    size: int | None = None
    sha256: str | None = None
    version: str | None = None

    def forget(self) -> None:
        """The kept bytes are gone (a new download from zero): the next start sets the origin."""
        self.size = self.sha256 = self.version = None

    def check(self, start: StreamStart, kept: int) -> None:
        """Accept ``start`` as the continuation of ``kept`` bytes, or raise IntegrityError.

        Learns the origin from the first start of a run, and its sha256 from the
        first start that announces one.
        """
        if start.mode != "original":
            return
        if kept and self.size is not None:
            if start.size != self.size:
                raise IntegrityError(
                    f"{start.path}: this server's copy is {start.size} bytes, the "
                    f"{kept} bytes kept came from one of {self.size}: not resuming on it"
                )
            if start.sha256 and self.sha256 and start.sha256 != self.sha256:
                raise IntegrityError(
                    f"{start.path}: this server's copy has another sha256 "
                    f"({start.sha256[:12]}..., the {kept} bytes kept came from "
                    f"{self.sha256[:12]}...): not resuming on it"
                )
            if start.version != self.version:
                log.info(
                    "%s: resuming on another copy (version %s, was %s)%s",
                    start.path,
                    start.version,
                    self.version,
                    "" if start.sha256 and self.sha256 else "; the final checksum decides",
                )
        if self.size is None:
            self.size, self.version = start.size, start.version
        self.sha256 = self.sha256 or start.sha256


# ---- saving ---------------------------------------------------------------


async def save(
    connect: Connector,
    track: str,
    dest: Path,
    *,
    player: Player | None = None,
    decoding: Decoding | None = None,
    retry: Retry = NO_RETRY,
    reporter: Reporter | None = None,
    replace: bool = False,
) -> Outcome:
    """Save ``track`` to ``dest`` through ``dest.part``, feeding ``player`` as it goes.

    Original bytes resume an existing ``.part``, and a dropped connection is
    resumed from what arrived (``retry``). A resumed download whose checksum
    fails, or whose server announces another file than the first attempt's
    (:class:`_Origin`), is restarted from zero once, since the ``.part`` may
    have come from an older version of the track or another replica's other
    copy (not while a player is listening: it has heard the old bytes already).
    Decoded output is always written whole.
    An existing ``dest`` is an OutputError unless ``replace``.
    """
    outcome = Outcome(path=track, size=0, reporter=reporter or _Silent())
    progress = _Progress(0, want_reader=player is not None)
    origin = _Origin()

    async def attempt() -> None:
        await _save_attempt(connect, track, dest, decoding, progress, outcome, replace, origin)

    with single_errors():
        async with trio.open_nursery() as nursery:
            if player is not None:
                nursery.start_soon(_feed_from_file, progress, player, outcome)
            try:
                try:
                    await _retrying(retry if decoding is None else NO_RETRY, attempt, track)
                except IntegrityError as exc:
                    if outcome.attempt_offset == 0 or player is not None:
                        raise
                    log.warning("%s; starting over from the first byte", exc)
                    origin.forget()
                    await _retrying(retry, attempt, track)
            finally:
                progress.finish()
    if progress.reader is not None:  # the feeder closes it, unless it never got that far
        progress.reader.close()
    return outcome


async def _save_attempt(
    connect: Connector,
    track: str,
    dest: Path,
    decoding: Decoding | None,
    progress: _Progress,
    outcome: Outcome,
    replace: bool,
    origin: _Origin,
) -> None:
    part = part_path(dest)
    f = await _in_thread(part, _open_part, part, decoding is not None)
    try:
        with _closing(f, part):
            await _save_into(
                f, part, connect, track, dest, decoding, progress, outcome, replace, origin
            )
    except BaseException as exc:
        # Keep a .part only if a later run can resume it: original bytes of an
        # unchanged file (also after Ctrl-C). Decoded output, an empty file, and
        # bytes of a file that changed mid-stream are worthless.
        worthless = decoding is not None or isinstance(exc, Changed)
        with trio.CancelScope(shield=True):
            if worthless or await trio.to_thread.run_sync(_size_of, part) == 0:
                await trio.to_thread.run_sync(_unlink, part)
        raise


async def _save_into(
    f: BinaryIO,
    part: Path,
    connect: Connector,
    track: str,
    dest: Path,
    decoding: Decoding | None,
    progress: _Progress,
    outcome: Outcome,
    replace: bool,
    origin: _Origin,
) -> None:
    if progress.want_reader and progress.reader is None:
        progress.reader = await _in_thread(part, _reopen, f, part)
    offset = 0 if decoding is not None else await trio.to_thread.run_sync(_size, f)
    outcome.attempt_offset = offset
    if offset == 0:
        origin.forget()
    async with _open(connect) as client:
        request = decoding.open(client, track) if decoding else client.stream(track, offset)
        async with request as stream:
            start = stream.start
            assert start is not None
            try:
                origin.check(start, offset)
            except IntegrityError:
                await trio.to_thread.run_sync(_unlink, part)  # another file's prefix
                raise
            outcome.path, outcome.size = start.path, start.size
            if not outcome.received:
                outcome.resumed_from = start.offset
                total = start.size if decoding is None else None
                # with a player, progress is what it has heard (the feeder reports)
                outcome.reporter.begin(total, 0 if progress.want_reader else start.offset)
            digest = hashlib.sha256()
            if decoding is not None:
                await _in_thread(part, f.write, decoding.header(start, None))
            else:
                if start.offset != offset:  # the .part is longer than the file now is
                    await _in_thread(part, f.truncate, start.offset)
                await _in_thread(part, _hash_file_prefix, f, start.offset, digest)
            progress.reset(f.tell())
            # a new file of original bytes that no player reads back: past the page cache
            direct = None
            if decoding is None and not progress.want_reader:
                direct = await _in_thread(part, _DirectWriter.open, f, start.offset, digest)
            hash_here = direct is None

            def to_part(chunks: list[bytes]) -> int:  # in the writer's thread
                try:
                    if direct is not None:
                        return direct.write(chunks)
                    return _write_chunks(f, chunks)
                except OSError as exc:
                    raise _output_error(exc, part) from None

            def written(n: int) -> None:
                progress.advance(n)
                if not progress.want_reader:
                    outcome.reporter.advance(n)

            def end() -> None:
                if direct is not None:
                    try:
                        direct.finish()
                    except OSError as exc:
                        raise _output_error(exc, part) from None

            queue = _ThreadWriteBehind(
                to_part,
                written=written,
                idle=None if direct is None else direct.put_out,
                end=end,
            )
            with single_errors():  # retries and clean-up look at the error's type
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(queue.run)
                    try:
                        async for chunk in stream:
                            # hashed here (unless written directly), not in the writer's
                            # thread: writing into the page cache is the slower side
                            # (measured, issue 15)
                            if hash_here:
                                digest.update(chunk)
                            outcome.received += len(chunk)
                            await queue.put(chunk)
                    finally:  # every byte received reaches the .part, also on failure
                        await queue.close()
            try:
                _verify(stream, digest.hexdigest(), f.tell())
            except IntegrityError:
                await trio.to_thread.run_sync(_unlink, part)  # garbage: never resume it
                raise
            if decoding is not None and decoding.output == "wav":
                await _in_thread(part, patch_sizes, f, f.tell() - len(decoding.header(start, 0)))
            await _in_thread(dest, _commit, f, part, dest, replace)
            outcome.saved_to = dest
            assert stream.end is not None
            outcome.frames = stream.end.frames


async def _feed_from_file(progress: _Progress, player: Player, out: Outcome) -> None:
    """Read the growing ``.part`` file from the start and feed the player at its pace.

    The handle stays open across the final rename, so the same bytes keep
    coming whatever the file's name is by then.
    """
    while progress.reader is None and not progress.done:
        await progress.wait()
    if progress.reader is None:
        return
    with progress.reader as f:
        position = 0
        while True:
            if position < progress.written:
                chunk = await trio.to_thread.run_sync(
                    f.read, min(PLAYER_READ_SIZE, progress.written - position)
                )
                if not chunk:  # cannot happen unless the file was cut underneath us
                    break
                position += len(chunk)
                if not await player.feed(chunk):
                    out.player_note = f"{player.name} stopped reading; the download goes on"
                    out.player_status = await _exit_status(player)
                    return
                out.reporter.advance(len(chunk))
            elif progress.done:
                break
            else:
                await progress.wait()
    out.player_status = await player.finish()


# ---- piping ---------------------------------------------------------------


async def pipe(
    connect: Connector,
    track: str,
    sink: Player | BinaryIO,
    *,
    decoding: Decoding | None = None,
    retry: Retry = NO_RETRY,
    reporter: Reporter | None = None,
) -> Outcome:
    """Stream ``track`` into a player or a binary file object (standard output).

    A dropped connection is resumed from the bytes already passed on
    (original streams only: a decoded stream cannot be resumed exactly).
    """
    outcome = Outcome(path=track, size=0, reporter=reporter or _Silent())
    digest = hashlib.sha256()
    deliver: Callable[[list[bytes]], Awaitable[bool]]
    if isinstance(sink, Player):
        player = sink

        async def to_player(chunks: list[bytes]) -> bool:
            for chunk in chunks:
                if not await player.feed(chunk):
                    outcome.player_note = f"{player.name} stopped reading"
                    return False
                outcome.reporter.advance(len(chunk))
            return True

        deliver, file = to_player, None
    else:
        output = sink

        async def to_file(chunks: list[bytes]) -> bool:
            try:
                outcome.reporter.advance(
                    await trio.to_thread.run_sync(_write_chunks, output, chunks, digest)
                )
            except BrokenPipeError:
                return False  # the reader of our output is gone: end quietly
            except OSError as exc:
                raise _output_error(exc, "the output") from None
            return True

        deliver, file = to_file, output
    # A WAV header can be patched afterwards only in a file we write from its start.
    patchable = (
        decoding is not None
        and decoding.output == "wav"
        and file is not None
        and _position(file) == 0
        and not _appends(file)
    )
    queue = _WriteBehind(deliver)
    with single_errors():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.run)
            try:
                await _pipe_attempts(
                    connect, track, queue, decoding, retry, digest, outcome, file is None
                )
            except BaseException:
                if file is None:  # a player need not finish the queue of a failed stream
                    nursery.cancel_scope.cancel()
                raise
            finally:
                await queue.close()
    outcome.stopped_early = outcome.stopped_early or queue.stopped
    if patchable and file is not None and not outcome.stopped_early:
        try:
            await _in_thread("the output", patch_sizes, file, outcome.received)
        except (ValueError, io.UnsupportedOperation) as exc:  # not the file we wrote from 0
            log.warning("the WAV header keeps its open length: %s", exc)
    if isinstance(sink, Player):
        if outcome.stopped_early:
            outcome.player_status = await _exit_status(sink)
        else:
            outcome.player_status = await sink.finish()
    return outcome


async def _exit_status(player: Player) -> int:
    """The exit status of a player that stopped reading early: 0 when the user quit it,
    non-zero when it failed. One that stays without reading is stopped (an error too)."""
    status = await player.finish(timeout=PLAYER_EXIT_WAIT)
    if status is None:
        return -15  # SIGTERM: the clean-up of open_player stops it
    return status


async def _pipe_attempts(
    connect: Connector,
    track: str,
    queue: _WriteBehind,
    decoding: Decoding | None,
    retry: Retry,
    digest: hashlib._Hash,
    outcome: Outcome,
    hash_here: bool,
) -> None:
    """Pass the stream to ``queue``, resuming after dropped connections.

    ``digest`` is updated here as chunks arrive (``hash_here``, for a player),
    or else by the queue's consumer in the writer's thread, so that hashing
    overlaps receiving; then the checksum is compared once the queue has
    delivered every byte of the stream.
    """
    put = queue.put
    origin = _Origin()

    async def attempt() -> None:
        async with _open(connect) as client:
            if decoding is not None:
                request = decoding.open(client, track)
            else:
                request = client.stream(track, outcome.received)
            async with request as stream:
                start = stream.start
                assert start is not None
                origin.check(start, outcome.received)  # before a byte of another file goes out
                outcome.path, outcome.size = start.path, start.size
                if not outcome.received:
                    outcome.reporter.begin(start.size if decoding is None else None)
                if decoding is not None and not await put(decoding.header(start, None)):
                    outcome.stopped_early = True
                    return
                async for chunk in stream:
                    if hash_here:
                        digest.update(chunk)
                    outcome.received += len(chunk)
                    if not await put(chunk):
                        outcome.stopped_early = True
                        return  # leaving the stream early closes the connection
                if not hash_here and not await queue.drain():  # every byte hashed first
                    outcome.stopped_early = True
                    return
                _verify(stream, digest.hexdigest(), outcome.received)
                assert stream.end is not None
                outcome.frames = stream.end.frames

    await _retrying(retry if decoding is None else NO_RETRY, attempt, track)


def _verify(stream: StreamReader, sha256: str, length: int) -> None:
    """Check an original stream's size and checksum (decoded ones: the protocol counted).

    A resumed download is checked whole: the ``.part`` prefix was hashed first.
    """
    start, end = stream.start, stream.end
    assert start is not None and end is not None
    if start.mode != "original":
        return
    if length != start.size:
        raise IntegrityError(
            f"{start.path}: received {length} bytes, the server announced {start.size}"
        )
    # the digest may be announced in the header (known from the server's index),
    # at the end, or both: every one announced must match what arrived
    for announced in (start.sha256, end.sha256):
        if announced is not None and announced != sha256:
            raise IntegrityError(
                f"{start.path}: sha256 mismatch (got {sha256[:12]}..., "
                f"the server says {announced[:12]}...)"
            )


def _appends(f: BinaryIO) -> bool:
    """Whether writes to ``f`` go to its end whatever the position (``>>`` redirection)."""
    try:
        return bool(fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_APPEND)
    except (OSError, ValueError, AttributeError):
        return False


def _position(f: BinaryIO) -> int | None:
    """Where a seekable ``f`` stands (a regular file), or ``None`` (a pipe or terminal)."""
    try:
        return f.tell() if f.seekable() else None
    except (OSError, ValueError):
        return None


# ---- blocking helpers, run in worker threads ------------------------------


def _size(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _open_part(part: Path, truncate: bool) -> BinaryIO:
    """Open (or create) ``part`` for writing: never through a symbolic link, and only a
    regular file with no other name (a hard link planted there would be written through)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(part, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{part} is a symbolic link: remove it first") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OutputError(f"{part} is not a plain file of its own: remove it first")
        os.set_blocking(fd, True)
        if truncate:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "r+b")


def _reopen(f: BinaryIO, part: Path) -> BinaryIO:
    """A second, read-only handle on the file ``f`` writes, opened by ``part``'s name."""
    fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not _same_file(os.fstat(fd), os.fstat(f.fileno())):
        os.close(fd)
        raise OutputError(f"{part} was replaced while it was being written")
    return os.fdopen(fd, "rb")


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextlib.contextmanager
def _closing(f: BinaryIO, path: Path) -> Iterator[None]:
    """Close ``f`` at the end; a failed close (a last flush on a full disk) is an
    OutputError, unless another error is on its way out already."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()
        raise
    try:
        f.close()
    except OSError as exc:
        raise _output_error(exc, path) from None


def _hash_file_prefix(f: BinaryIO, length: int, digest: hashlib._Hash) -> None:
    """Hash the first ``length`` bytes of ``f`` into ``digest``, leaving ``f`` at ``length``."""
    f.seek(0)
    left = length
    while left:
        chunk = f.read(min(1 << 20, left))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)


def _commit(f: BinaryIO, part: Path, dest: Path, replace: bool) -> None:
    """Give ``part`` (still the file ``f`` wrote) the name ``dest``.

    Without ``replace`` a hard link makes the name, failing if it is taken
    (by anything: a file, a symbolic link); file systems without hard links
    fall back on a check and a rename. A rename replaces a link at ``dest``
    itself and never writes through it.
    """
    f.flush()
    os.fsync(f.fileno())
    try:
        now = os.lstat(part)
    except FileNotFoundError:
        now = None
    if now is None or not _same_file(now, os.fstat(f.fileno())):
        raise OutputError(f"{part} was replaced while it was being written")
    if replace:
        os.replace(part, dest)
        return
    try:
        os.link(part, dest, follow_symlinks=False)
    except FileExistsError:
        raise _exists(dest) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(dest):
            raise _exists(dest) from None
        os.rename(part, dest)
        return
    os.unlink(part)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


#: O_DIRECT writes: their offsets, lengths and buffer addresses are multiples of this
DIRECT_ALIGN = 4096
#: bytes per O_DIRECT write; two buffers of it (one filling, one being written)
DIRECT_BLOCK = 2 << 20


class _DirectWriter:
    """Writes a new file with ``O_DIRECT``: from two aligned buffers to the disk, past
    the page cache, and hashes what it writes.

    Writing 1 GiB into the page cache cost this VM 0.2-3 s (every new page is memory
    the host must hand over again) plus an ``fsync`` of 0.3 s before the rename; the
    same bytes written with ``O_DIRECT`` in 1-4 MiB pieces took about 0.4 s in all,
    nearly all of it waiting for the disk, which a second thread does while this one hashes and
    copies the next piece (issue 15, item 1). Used only where nothing reads the file
    while it grows (no player) and from an aligned offset (a fresh download); the
    unaligned tail is written through the page cache by :meth:`finish`. A file
    system that refuses ``O_DIRECT`` (:meth:`open` returns ``None``) or a first write
    that fails with EINVAL falls back to ordinary writes.

    Everything but :meth:`open` runs in the write-behind queue's worker thread.
    """

    def __init__(self, f: BinaryIO, offset: int, digest: hashlib._Hash) -> None:
        self._f = f
        self._fd = f.fileno()
        self._digest = digest
        self._offset = offset  # where the current buffer's first byte goes
        self._buffers = [mmap.mmap(-1, DIRECT_BLOCK) for _ in range(2)]
        self._current = 0
        self._fill = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="musiclib-disk")
        self._pending: Future[None] | None = None
        self._direct = True  # False once a write was refused: ordinary writes from then on

    @classmethod
    def open(cls, f: BinaryIO, offset: int, digest: hashlib._Hash) -> _DirectWriter | None:
        """Turn ``O_DIRECT`` on for ``f`` (which stands at ``offset``); ``None`` if it
        cannot be (unaligned offset, a file system without it)."""
        if offset % DIRECT_ALIGN or not hasattr(os, "O_DIRECT"):
            return None
        fd = f.fileno()
        try:
            f.flush()
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError:
            return None
        return cls(f, offset, digest)

    def write(self, chunks: list[bytes]) -> int:
        """Hash ``chunks`` and copy them into the buffers, writing each full one."""
        total = 0
        for chunk in chunks:
            self._digest.update(chunk)
            view = memoryview(chunk)
            while view:
                n = min(len(view), DIRECT_BLOCK - self._fill)
                self._buffers[self._current][self._fill : self._fill + n] = view[:n]
                self._fill += n
                view = view[n:]
                if self._fill == DIRECT_BLOCK:
                    self._put(DIRECT_BLOCK)
            total += len(chunk)
        return total

    def put_out(self) -> None:
        """Start writing the whole blocks held (the network is the slow side now)."""
        aligned = self._fill - self._fill % DIRECT_ALIGN
        if aligned:
            self._put(aligned)

    def finish(self) -> None:
        """Write everything held, the tail through the page cache; leave ``f`` at the end."""
        try:
            self.put_out()
            self._wait()
            tail = self._fill
            fd = self._fd
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            if tail:
                _pwrite_all(fd, memoryview(self._buffers[self._current])[:tail], self._offset)
            self._offset += tail
            self._fill = 0
            self._f.seek(self._offset)
        finally:
            self._pool.shutdown(wait=True)
            self._buffers.clear()  # unmapped once the last view of them is gone

    def _put(self, length: int) -> None:
        """Write the first ``length`` bytes of the current buffer (in the second thread)
        and go on filling the other one with the rest."""
        self._wait()
        buffer = self._buffers[self._current]
        view = memoryview(buffer)[:length]
        self._pending = self._pool.submit(self._write_at, view, self._offset)
        self._offset += length
        rest = self._fill - length
        other = self._buffers[1 - self._current]
        other[:rest] = buffer[length : self._fill]
        self._current = 1 - self._current
        self._fill = rest

    def _write_at(self, view: memoryview, offset: int) -> None:
        if self._direct:
            try:
                _pwrite_all(self._fd, view, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False  # refused after all: ordinary writes from now on
                fd = self._fd
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        _pwrite_all(self._fd, view, offset)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _hash_chunks(digest: hashlib._Hash, chunks: list[bytes]) -> None:
    """Add ``chunks`` to ``digest`` (in a worker thread: hashlib releases the GIL)."""
    for chunk in chunks:
        digest.update(chunk)


def _write_chunks(sink: BinaryIO, chunks: list[bytes], digest: hashlib._Hash | None = None) -> int:
    """Hash ``chunks`` into ``digest`` (if given), write them and flush them (so a
    reader sees them); the byte count."""
    if digest is not None:
        _hash_chunks(digest, chunks)
    sink.writelines(chunks)
    sink.flush()
    return sum(len(c) for c in chunks)
