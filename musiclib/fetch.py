"""What ``get`` and ``play`` do with a stream: save it, pipe it, or both at once.

Saving is atomic: bytes go to ``PATH.part`` and are renamed to ``PATH`` only
once verified (original bytes: size and sha256 from the server; decoded
samples: the frame count the protocol checks, and the WAV header patched to
the real length). A ``.part`` left by an interrupted original download is
resumed from its length; decoded output is always written from the start.

Saving and playing at once uses the ``.part`` file itself as the buffer
between the network and the player: the download writes at network speed and
a second task reads the file back at the player's pace. Memory therefore
stays at a few chunks whatever the track's length, and a player that quits
early does not stop the save. Without a save there is nowhere to put data the
player has not taken yet, so the network is slowed to the player's pace by a
small bounded queue and TCP flow control.

File writes run in a worker thread: a local disk may be slow or full, and the
event loop must keep feeding the player meanwhile.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio

from .client import Client, StreamReader
from .errors import IntegrityError, OutputError, UsageError, single_errors
from .player import Player
from .protocol import SAMPLE_FORMATS, StreamStart
from .wav import patch_sizes, wav_header

log = logging.getLogger("musiclib.client")

#: chunks queued between the network and a player when nothing is saved
PLAYER_QUEUE_CHUNKS = 8
#: bytes read back from a ``.part`` file per write to the player
PLAYER_READ_SIZE = 64 * 1024
#: output formats of decoded streams
OUTPUT_FORMATS = ("wav", *SAMPLE_FORMATS)


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
        )

    def header(self, start: StreamStart, data_bytes: int | None) -> bytes:
        """What precedes the samples: a WAV header, or nothing for raw output."""
        if self.output != "wav":
            return b""
        assert start.sample_format and start.sample_rate and start.channels
        return wav_header(start.sample_format, start.sample_rate, start.channels, data_bytes)


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


def part_path(dest: Path) -> Path:
    """Where the bytes of ``dest`` wait until they are verified."""
    return dest.with_name(dest.name + ".part")


def _output_error(exc: OSError, path: Path | str) -> OutputError:
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "the file system is read-only",
        errno.ENOENT: "the folder does not exist",
        errno.EISDIR: "it is a directory",
    }
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return OutputError(f"cannot write {path}: {reason}")


async def _in_thread(path: Path | str, fn: Callable[..., object], *args: object) -> None:
    """Run a blocking file operation in a worker thread; OSError becomes OutputError."""
    try:
        await trio.to_thread.run_sync(fn, *args)
    except OSError as exc:
        raise _output_error(exc, path) from None


class _Progress:
    """How many bytes of the ``.part`` file are written; wakes the player feeder."""

    def __init__(self, start: int) -> None:
        self.written = start
        self.done = False
        self._event = trio.Event()

    def advance(self, n: int) -> None:
        self.written += n
        self._event.set()
        self._event = trio.Event()

    def finish(self) -> None:
        self.done = True
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


# ---- saving ---------------------------------------------------------------


async def save(
    client: Client,
    track: str,
    dest: Path,
    *,
    player: Player | None = None,
    decoding: Decoding | None = None,
) -> Outcome:
    """Save ``track`` to ``dest`` through ``dest.part``, feeding ``player`` as it goes.

    Original bytes resume an existing ``.part``; a resumed download whose
    checksum fails is restarted from zero once, since the ``.part`` may have
    come from an older version of the track.
    """
    part = part_path(dest)
    offset = 0
    if decoding is None:
        try:
            offset = part.stat().st_size
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _output_error(exc, part) from None
    try:
        with single_errors():
            return await _save_once(client, track, dest, offset, player, decoding)
    except IntegrityError:
        if offset == 0:
            raise
        log.warning("the resumed download of %s failed its checksum; starting over", track)
    with single_errors():
        return await _save_once(client, track, dest, 0, player, decoding)


async def _save_once(
    client: Client,
    track: str,
    dest: Path,
    offset: int,
    player: Player | None,
    decoding: Decoding | None,
) -> Outcome:
    part = part_path(dest)
    try:
        f = await trio.to_thread.run_sync(_open_part, part, decoding is not None)
    except OSError as exc:
        raise _output_error(exc, part) from None
    with f:
        request = decoding.open(client, track) if decoding else client.stream(track, offset)
        async with request as stream:
            start = stream.start
            assert start is not None
            outcome = Outcome(path=start.path, size=start.size, resumed_from=start.offset)
            digest = hashlib.sha256()
            if decoding is not None:
                header = decoding.header(start, None)
                await _in_thread(part, f.write, header)
            else:
                if start.offset != offset:  # the .part is longer than the file now is
                    await _in_thread(part, f.truncate, start.offset)
                await _in_thread(part, _hash_file_prefix, f, start.offset, digest)
            progress = _Progress(f.tell())
            async with trio.open_nursery() as nursery:
                if player is not None:
                    nursery.start_soon(_feed_from_file, part, progress, player, outcome)
                try:
                    async for chunk in stream:
                        digest.update(chunk)
                        await _in_thread(part, f.write, chunk)
                        outcome.received += len(chunk)
                        progress.advance(len(chunk))
                finally:
                    progress.finish()
                try:
                    _verify(stream, digest.hexdigest(), f.tell())
                except IntegrityError:
                    await trio.to_thread.run_sync(_unlink, part)  # garbage: never resume it
                    raise
                if decoding is not None and decoding.output == "wav":
                    await _in_thread(part, patch_sizes, f, outcome.received)
                await _in_thread(dest, _commit, f, part, dest)
                outcome.saved_to = dest
                if stream.end is not None:
                    outcome.frames = stream.end.frames
    return outcome


async def _feed_from_file(part: Path, progress: _Progress, player: Player, out: Outcome) -> None:
    """Read the growing ``.part`` file from the start and feed the player at its pace.

    The file stays open across the final rename, so the same bytes keep
    coming whatever the name is by then.
    """
    with open(part, "rb") as f:  # noqa: ASYNC230 - one open; reads go to a thread
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
                    return
            elif progress.done:
                break
            else:
                await progress.wait()
    out.player_status = await player.finish()


# ---- piping ---------------------------------------------------------------


async def pipe(
    client: Client, track: str, sink: Player | BinaryIO, *, decoding: Decoding | None = None
) -> Outcome:
    """Stream ``track`` into a player or a binary file object (standard output)."""
    with single_errors():
        return await _pipe(client, track, sink, decoding)


async def _pipe(
    client: Client, track: str, sink: Player | BinaryIO, decoding: Decoding | None
) -> Outcome:
    request = decoding.open(client, track) if decoding else client.stream(track)
    async with request as stream:
        assert stream.start is not None
        outcome = Outcome(path=stream.start.path, size=stream.start.size)
        digest = hashlib.sha256()
        header = decoding.header(stream.start, None) if decoding else b""
        # A header can be patched afterwards only in a file we write from its start.
        patchable = bool(header) and not isinstance(sink, Player) and _position(sink) == 0
        if isinstance(sink, Player):
            finished = await _pipe_to_player(stream, sink, header, digest, outcome)
        else:
            finished = await _pipe_to_file(stream, sink, header, digest, outcome)
        if not finished:
            return outcome  # leaving the stream early closes the connection
        _verify(stream, digest.hexdigest(), outcome.received)
        if stream.end is not None:
            outcome.frames = stream.end.frames
        if patchable:
            assert not isinstance(sink, Player)
            await _in_thread("the output", patch_sizes, sink, outcome.received)
    return outcome


async def _pipe_to_player(
    stream: StreamReader, player: Player, header: bytes, digest: hashlib._Hash, out: Outcome
) -> bool:
    """Feed the player through a bounded queue; False if it stopped reading first."""
    send, receive = trio.open_memory_channel[bytes](PLAYER_QUEUE_CHUNKS)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain_to_player, receive, player, out)
        async with send:
            try:
                if header:
                    await send.send(header)
                async for chunk in stream:
                    digest.update(chunk)
                    out.received += len(chunk)
                    await send.send(chunk)
            except trio.BrokenResourceError:  # the player went away
                return False
    return True


async def _pipe_to_file(
    stream: StreamReader, sink: BinaryIO, header: bytes, digest: hashlib._Hash, out: Outcome
) -> bool:
    """Write to ``sink`` (standard output); False if its reader went away."""

    async def write(data: bytes) -> None:
        await trio.to_thread.run_sync(_write_all, sink, data)

    try:
        if header:
            await write(header)
        async for chunk in stream:
            digest.update(chunk)
            out.received += len(chunk)
            await write(chunk)
    except BrokenPipeError:
        return False  # the reader of our output is gone: end quietly
    except OSError as exc:
        raise _output_error(exc, "the output") from None
    return True


async def _drain_to_player(
    receive: trio.MemoryReceiveChannel[bytes], player: Player, out: Outcome
) -> None:
    async with receive:
        async for chunk in receive:
            if not await player.feed(chunk):
                out.player_note = f"{player.name} stopped reading"
                return  # closing ``receive`` tells the network side to stop
    out.player_status = await player.finish()


def _verify(stream: StreamReader, sha256: str, length: int) -> None:
    """Check an original stream's size and checksum (decoded ones: the protocol counted)."""
    start, end = stream.start, stream.end
    assert start is not None and end is not None
    if start.mode != "original":
        return
    if length != start.size:
        raise IntegrityError(
            f"{start.path}: received {length} bytes, the server announced {start.size}"
        )
    if end.sha256 is not None and end.sha256 != sha256:
        raise IntegrityError(
            f"{start.path}: sha256 mismatch (got {sha256[:12]}..., "
            f"the server says {end.sha256[:12]}...)"
        )


def _position(f: BinaryIO) -> int | None:
    """Where a seekable ``f`` stands (a regular file), or ``None`` (a pipe or terminal)."""
    try:
        return f.tell() if f.seekable() else None
    except (OSError, ValueError):
        return None


# ---- blocking helpers, run in worker threads ------------------------------


def _open_part(part: Path, truncate: bool) -> BinaryIO:
    flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0)
    return os.fdopen(os.open(part, flags, 0o644), "r+b")


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


def _commit(f: BinaryIO, part: Path, dest: Path) -> None:
    f.flush()
    os.fsync(f.fileno())
    os.replace(part, dest)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _write_all(sink: BinaryIO, chunk: bytes) -> None:
    sink.write(chunk)
    sink.flush()
