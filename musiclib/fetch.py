"""What ``get`` and ``play`` do with a stream: save it, pipe it, or both at once.

Saving is atomic: bytes go to ``PATH.part``, are checked against the size and
sha256 the server states at the end of the stream, and only then renamed to
``PATH``. A ``.part`` left by an interrupted run is resumed from its length.

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
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio

from .client import Client, StreamReader
from .errors import IntegrityError, OutputError, single_errors
from .player import Player

log = logging.getLogger("musiclib.client")

#: chunks queued between the network and a player when nothing is saved
PLAYER_QUEUE_CHUNKS = 8
#: bytes read back from a ``.part`` file per write to the player
PLAYER_READ_SIZE = 64 * 1024


@dataclass
class Outcome:
    """What a transfer did, for the command to report."""

    path: str
    size: int
    received: int = 0
    resumed_from: int = 0
    saved_to: Path | None = None
    player_status: int | None = None
    player_note: str | None = None


def part_path(dest: Path) -> Path:
    """Where the bytes of ``dest`` wait until they are verified."""
    return dest.with_name(dest.name + ".part")


def _output_error(exc: OSError, path: Path) -> OutputError:
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EACCES: "permission denied",
        errno.EROFS: "the file system is read-only",
        errno.ENOENT: "the folder does not exist",
        errno.EISDIR: "it is a directory",
    }
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return OutputError(f"cannot write {path}: {reason}")


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


async def save(
    client: Client,
    track: str,
    dest: Path,
    *,
    player: Player | None = None,
) -> Outcome:
    """Download ``track`` to ``dest`` (resuming ``dest.part``), feeding ``player`` as it goes.

    A resumed download whose checksum fails is restarted from zero once, since
    the ``.part`` file may have come from an older version of the track.
    """
    part = part_path(dest)
    try:
        offset = part.stat().st_size
    except FileNotFoundError:
        offset = 0
    except OSError as exc:
        raise _output_error(exc, part) from None
    try:
        with single_errors():
            return await _save_once(client, track, dest, part, offset, player)
    except IntegrityError:
        if offset == 0:
            raise
        log.warning("the resumed download of %s failed its checksum; starting over", track)
    with single_errors():
        return await _save_once(client, track, dest, part, 0, player)


async def _save_once(
    client: Client, track: str, dest: Path, part: Path, offset: int, player: Player | None
) -> Outcome:
    try:
        f = await trio.to_thread.run_sync(_open_part, part)
    except OSError as exc:
        raise _output_error(exc, part) from None
    with f:
        async with client.stream(track, offset) as stream:
            assert stream.start is not None
            start = stream.start
            if start.offset != offset:  # the .part is longer than the file now is
                await trio.to_thread.run_sync(f.truncate, start.offset)
            digest = await trio.to_thread.run_sync(_hash_file_prefix, f, start.offset)
            f.seek(start.offset)
            outcome = Outcome(path=start.path, size=start.size, resumed_from=start.offset)
            progress = _Progress(start.offset)
            async with trio.open_nursery() as nursery:
                if player is not None:
                    nursery.start_soon(_feed_from_file, part, progress, player, outcome)
                try:
                    async for chunk in stream:
                        digest.update(chunk)
                        try:
                            await trio.to_thread.run_sync(f.write, chunk)
                        except OSError as exc:
                            raise _output_error(exc, part) from None
                        outcome.received += len(chunk)
                        progress.advance(len(chunk))
                finally:
                    progress.finish()
                try:
                    _verify(stream, digest.hexdigest(), f.tell())
                except IntegrityError:
                    await trio.to_thread.run_sync(_unlink, part)  # garbage: never resume it
                    raise
                try:
                    await trio.to_thread.run_sync(_commit, f, part, dest)
                except OSError as exc:
                    raise _output_error(exc, dest) from None
                outcome.saved_to = dest
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


async def pipe(client: Client, track: str, sink: Player | BinaryIO) -> Outcome:
    """Stream ``track`` into a player or a binary file object (standard output)."""
    with single_errors():
        return await _pipe(client, track, sink)


async def _pipe(client: Client, track: str, sink: Player | BinaryIO) -> Outcome:
    async with client.stream(track) as stream:
        assert stream.start is not None
        outcome = Outcome(path=stream.start.path, size=stream.start.size)
        digest = hashlib.sha256()
        if isinstance(sink, Player):
            send, receive = trio.open_memory_channel[bytes](PLAYER_QUEUE_CHUNKS)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain_to_player, receive, sink, outcome)
                async with send:
                    async for chunk in stream:
                        digest.update(chunk)
                        outcome.received += len(chunk)
                        try:
                            await send.send(chunk)
                        except trio.BrokenResourceError:  # the player went away
                            return outcome  # leaving the stream early closes the connection
        else:
            async for chunk in stream:
                digest.update(chunk)
                outcome.received += len(chunk)
                try:
                    await trio.to_thread.run_sync(_write_all, sink, chunk)
                except BrokenPipeError:
                    return outcome  # the reader of our output is gone: end quietly
                except OSError as exc:
                    raise OutputError(f"cannot write the output: {exc.strerror}") from None
        _verify(stream, digest.hexdigest(), outcome.received)
    return outcome


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
    assert stream.start is not None and stream.end is not None
    if length != stream.start.size:
        raise IntegrityError(
            f"{stream.start.path}: received {length} bytes, the server announced "
            f"{stream.start.size}"
        )
    if stream.end.sha256 is not None and stream.end.sha256 != sha256:
        raise IntegrityError(
            f"{stream.start.path}: sha256 mismatch (got {sha256[:12]}..., "
            f"the server says {stream.end.sha256[:12]}...)"
        )


# ---- blocking helpers, run in worker threads ------------------------------


def _open_part(part: Path) -> BinaryIO:
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    return os.fdopen(fd, "r+b")


def _hash_file_prefix(f: BinaryIO, length: int) -> hashlib._Hash:
    digest = hashlib.sha256()
    f.seek(0)
    left = length
    while left:
        chunk = f.read(min(1 << 20, left))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    return digest


def _commit(f: BinaryIO, part: Path, dest: Path) -> None:
    f.flush()
    os.fsync(f.fileno())
    os.replace(part, dest)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _write_all(sink: BinaryIO, chunk: bytes) -> None:
    sink.write(chunk)
    sink.flush()
