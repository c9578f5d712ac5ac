"""sha256 of library files: computed once per file version, off the event loop.

Hashing every byte as it is sent cost the server half its CPU (53% of a
profile during 1 GiB downloads, BENCHMARKS.md). Instead, a file version
(device, inode, size, modification time) is hashed once, in a worker thread
that reads with ``pread`` on a descriptor of its own, while the event loop
sends the file; hashlib releases the GIL, so on two cores hashing and sending
run side by side. Every request for the same version shares one computation,
and the result is remembered until the file changes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass

import trio

from .errors import Changed

#: bytes hashed per read in the worker thread
READ_SIZE = 1 << 20

FileKey = tuple[int, int, int, int]


def file_key(st: os.stat_result) -> FileKey:
    """What identifies one version of a file: device, inode, size, mtime (ns)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _Abandoned(Exception):
    """Internal: nobody wants the result any more."""


def sha256_of_fd(fd: int, size: int, stop: threading.Event) -> str:
    """Hash the first ``size`` bytes of ``fd`` with ``pread`` (its offset is not moved).

    Runs in a worker thread and closes nothing: the caller owns ``fd``.
    """
    digest = hashlib.sha256()
    position = 0
    while position < size:
        if stop.is_set():
            raise _Abandoned
        chunk = os.pread(fd, min(READ_SIZE, size - position), position)
        if not chunk:
            raise Changed("the file shrank while it was being hashed")
        digest.update(chunk)
        position += len(chunk)
    return digest.hexdigest()


def _hash_and_close(fd: int, st: os.stat_result, stop: threading.Event) -> str:
    try:
        digest = sha256_of_fd(fd, st.st_size, stop)
        if file_key(os.fstat(fd)) != file_key(st):
            raise Changed("the file changed while it was being hashed")
        return digest
    finally:
        os.close(fd)


@dataclass
class ChecksumCache:
    """sha256 per file version, shared by every request and remembered.

    ``max_entries`` bounds the memory: past it, the oldest entries are
    forgotten (they are recomputed if asked for again).
    """

    max_entries: int = 100_000

    def __post_init__(self) -> None:
        self._known: dict[FileKey, str] = {}
        self._pending: dict[FileKey, trio.Event] = {}

    def known(self, st: os.stat_result) -> str | None:
        """The digest of this version if it was computed already."""
        return self._known.get(file_key(st))

    async def sha256(self, fd: int, st: os.stat_result) -> str:
        """The digest of the open file ``fd`` whose stat is ``st``.

        The worker gets a duplicate of ``fd``, so the caller may close its own
        at any time; if the caller is cancelled the worker stops at its next
        read. ``Changed`` if the file moves while it is hashed.
        """
        key = file_key(st)
        while key not in self._known:
            pending = self._pending.get(key)
            if pending is not None:  # someone is computing it: share the result
                await pending.wait()
                continue  # if they gave up (cancelled), the loop computes it here
            done = self._pending[key] = trio.Event()
            stop = threading.Event()
            try:
                digest = await trio.to_thread.run_sync(
                    _hash_and_close, os.dup(fd), st, stop, abandon_on_cancel=True
                )
            finally:
                stop.set()
                del self._pending[key]
                done.set()
            self._remember(key, digest)
        return self._known[key]

    def _remember(self, key: FileKey, digest: str) -> None:
        if len(self._known) >= self.max_entries:
            for old in list(self._known)[: self.max_entries // 10 or 1]:
                del self._known[old]
        self._known[key] = digest
