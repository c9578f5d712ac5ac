"""The catalog's maintainer: rescans, the change watcher and background hashing.

The library's index lives longer than any connection and must be kept by one
service per library, however many sessions (or, later, worker processes)
serve it. This module is that service, apart from the server's connection
handling: :class:`Maintainer` owns the scans (one task, so they never
overlap), the inotify watcher that asks for them, the background sha256 of
new files, the :class:`~musiclib.checksums.ChecksumCache` the streams share,
the :class:`TrackCache` of names resolved (and stored sha256s read) while the
index stays the same, and the limiter on the worker threads that run index
queries. Requests use it
through :meth:`Maintainer.in_thread`, :meth:`Maintainer.request_rescan` and
:meth:`Maintainer.wait_for_first_scan`; the server starts it with
``await nursery.start(maintainer.run)``.

What the scans cost is bounded whoever asks for them:

* **Requests share scans.** Every request that arrives while a scan runs (or
  before the next one starts) is served by the same next scan: one queued
  scan at most, however many clients ask. A request is never served by a scan
  that started before it, which might have walked past the change that
  prompted it.
* **Scans rest.** After a scan that took ``d`` seconds the next one waits
  until ``REST_FACTOR * d`` seconds have passed (at most ``MAX_REST``), so a
  client asking in a loop keeps the scanner busy a quarter of the time at most,
  not all of it. Incremental scans of an unchanged library are short, so
  their rests are too; a long scan (many files read) rests ``MAX_REST``.
* **Files still being written are looked at again.** A scan notes the files
  it read that changed in the last ``watch_settle`` seconds (a copy in
  progress); they are indexed as found, and every ``watch_settle`` seconds the
  maintainer looks at just those files again (:meth:`Library.recheck
  <musiclib.library.Library.recheck>`) until each stays unchanged over one
  such period, so a file copied slowly ends up indexed whole without anyone
  asking for a rescan.

With several worker processes (:mod:`musiclib.workers`) one maintainer
runs, in the primary worker, and it alone writes the index. The others make
a *follower* (``follow=``): it runs no scan, watcher or hasher and writes
nothing, and its :meth:`Maintainer.state` is what the primary last published
on a :class:`StateBoard`, a few bytes of shared memory the primary rewrites
when a scan starts or ends and every :data:`PUBLISH_INTERVAL` seconds
(SQLite would do, but a query per ``welcome`` costs a thread hop; a read of
shared memory costs nothing and is as fresh). The board also carries a count
the primary's index bumps right after each commit, by which a follower's
:class:`TrackCache` knows its names are stale.

Its log lines are the server's (the ``musiclib.server`` logger), as they were
when this lived in :mod:`musiclib.server`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import mmap
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from .checksums import ChecksumCache
from .errors import Changed, NotFound
from .library import Library, open_confined
from .protocol import TrackInfo
from .watch import Watcher, open_watcher

log = logging.getLogger("musiclib.server")

_T = TypeVar("_T")


class MaintainerConfig(Protocol):
    """The settings the maintainer reads (``ServerConfig`` has them); read when used."""

    #: seconds between background rescans of the library (``0`` disables them)
    rescan_interval: float
    #: compute every file's sha256 in the background after each scan
    background_checksums: bool
    #: rescan soon after the library changes (inotify, where available)
    watch: bool
    #: seconds of quiet after a change before that rescan; also how long a file must
    #: stay unchanged to count as settled (not still being written)
    watch_settle: float


async def run_stoppable(fn: Callable[[threading.Event], _T]) -> _T:
    """Run ``fn(stop)`` in a worker thread; if cancelled, set ``stop`` and wait for ``fn``.

    A scan must not outlive the server that started it (it holds the index
    and may run child processes), yet an uncancellable wait would hold up
    shutdown for a whole scan: ``fn`` checks ``stop`` between batches and
    returns (or raises) soon after it is set.
    """
    stop = threading.Event()
    started = threading.Event()
    finished = threading.Event()

    def run() -> _T:
        started.set()
        try:
            return fn(stop)
        finally:
            finished.set()

    try:
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    except trio.Cancelled:
        stop.set()
        if started.is_set():
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(finished.wait, 30.0)
        raise


@dataclass(frozen=True)
class CatalogState:
    """What the catalog's upkeep says about the index now (``status``, ``welcome``)."""

    #: tracks in the index
    tracks: int
    #: whether a scan runs
    scanning: bool
    #: scans finished since the server started
    scans: int
    #: seconds since the last scan ended and how long it took (``None``: none ended yet)
    last_scan: tuple[float, float] | None


#: seconds between two publications of the primary's state on its board (the longest
#: a follower's track count or channel count lags during a scan or a publish)
PUBLISH_INTERVAL = 0.05


class StateBoard:
    """The primary worker's :class:`CatalogState` (and its number of live channels),
    in a small file every worker maps into memory.

    One writer (the primary), any number of readers. A write is bracketed by
    a sequence number made odd before and even after (a seqlock), so a reader
    that catches a write half done reads again; nothing ever waits. A writer
    killed in the middle of a write leaves the number odd: readers then take
    what they read after :data:`READ_TRIES` tries (the next primary's first
    write makes it whole again) rather than spin forever. Times are
    ``time.monotonic()``, one clock for every process on the machine.
    """

    #: reads of a board whose sequence number stays odd before taking what is there
    READ_TRIES = 100

    _SEQ = struct.Struct("<Q")
    #: tracks, scanning, scans, end of the last scan (NaN: none), its length, channels
    _FIELDS = struct.Struct("<qqqddq")
    #: the index's generation: a sequence number and a count of its own, after the state
    _GENERATION_AT = _SEQ.size + _FIELDS.size
    _GENERATION = struct.Struct("<QQ")
    SIZE = _GENERATION_AT + _GENERATION.size

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, self.SIZE)
        finally:
            os.close(fd)

    @classmethod
    def create(cls, path: Path) -> StateBoard:
        """A new board at ``path`` (readable by this user only): no scan, no track yet."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            initial = cls._FIELDS.pack(0, 1, 0, math.nan, 0.0, 0) + cls._GENERATION.pack(0, 0)
            os.write(fd, bytes(cls._SEQ.size) + initial)
        finally:
            os.close(fd)
        return cls(path)

    def publish(self, state: CatalogState, channels: int) -> None:
        """Write ``state`` (the primary only)."""
        (seq,) = self._SEQ.unpack_from(self._map, 0)
        writing = seq + 1 if seq % 2 == 0 else seq + 2  # odd (a dead writer may have left one)
        ended, took = math.nan, 0.0
        if state.last_scan is not None:
            ended, took = time.monotonic() - state.last_scan[0], state.last_scan[1]
        fields = (state.tracks, int(state.scanning), state.scans, ended, took, channels)
        self._SEQ.pack_into(self._map, 0, writing)
        self._FIELDS.pack_into(self._map, self._SEQ.size, *fields)
        self._SEQ.pack_into(self._map, 0, writing + 1)

    def read(self) -> tuple[CatalogState, int]:
        """The last state published, and the number of live channels then."""
        for _ in range(self.READ_TRIES):
            (before,) = self._SEQ.unpack_from(self._map, 0)
            tracks, scanning, scans, ended, took, channels = self._FIELDS.unpack_from(
                self._map, self._SEQ.size
            )
            (after,) = self._SEQ.unpack_from(self._map, 0)
            if before == after and not before % 2:
                break
        last = None if math.isnan(ended) else (max(time.monotonic() - ended, 0.0), took)
        return CatalogState(tracks, bool(scanning), scans, last), channels

    def bump_generation(self) -> None:
        """Say that the index changed: a commit added, replaced or deleted tracks, or
        a new primary opened it (the primary only, one thread at a time: the index's
        writer under its write lock, or the primary at start before any scan).

        A count of the board's own, not the index's generation: it never goes back,
        even when a restarted primary had to rebuild the index, so a follower's
        cache can never take a new index for the one it cached.
        """
        (seq,) = self._SEQ.unpack_from(self._map, self._GENERATION_AT)
        _, value = self._GENERATION.unpack_from(self._map, self._GENERATION_AT)
        writing = seq + 1 if seq % 2 == 0 else seq + 2
        self._SEQ.pack_into(self._map, self._GENERATION_AT, writing)
        self._GENERATION.pack_into(self._map, self._GENERATION_AT, writing, value + 1)
        self._SEQ.pack_into(self._map, self._GENERATION_AT, writing + 1)

    def generation(self) -> int:
        """The index's generation as last said (:meth:`bump_generation`); it changes
        right after each commit, before the writer takes its next batch."""
        at = self._GENERATION_AT
        for _ in range(self.READ_TRIES):
            (before,) = self._SEQ.unpack_from(self._map, at)
            (value,) = self._SEQ.unpack_from(self._map, at + self._SEQ.size)
            (after,) = self._SEQ.unpack_from(self._map, at)
            if before == after and not before % 2:
                break
        return int(value)

    def close(self) -> None:
        self._map.close()


#: what :meth:`Library.locate <musiclib.library.Library.locate>` gives: a track and the
#: mtime (ns) of the file version its row describes
Located = tuple[TrackInfo, int]


@dataclass
class _Lookup:
    """One lookup of a name in a worker thread, which others asking meanwhile share."""

    done: trio.Event
    found: Located | None = None


class TrackCache:
    """Track names resolved before, answered on the event loop while the index is
    the one they were resolved in.

    Why: a stream request used to wait for two worker-thread lookups (the name,
    then the stored sha256). Under load each one waits for the interpreter's lock
    behind a loop busy with hundreds of streams, and only resumes at the loop's
    next pass: with 500 downloads starting at once that step took most of the time
    to first byte (BENCHMARKS.md, scenario 9). What a name resolves to depends on
    the index alone, so a lookup made in generation ``g`` answers the same name
    until the generation moves, and then the whole cache is dropped: no rescan,
    rename or replacement is ever answered from before it. The generation is read
    on the loop *before* a lookup starts, and the index publishes a generation only
    once its commit is visible, so a lookup is never filed under a newer generation
    than the index it saw (it may be filed under an older one, which only drops it
    sooner).

    Requests for a name already being looked up (in the same generation) wait for
    that lookup instead of starting their own: 500 requests for one new name cost
    one thread hop, not 500. Failures (not found, ambiguous) are not kept: whoever
    waited for a lookup that failed looks it up again itself.
    """

    #: names remembered at most; past it the oldest tenth is forgotten
    MAX_ENTRIES = 4096

    def __init__(
        self,
        generation: Callable[[], int],
        lookup: Callable[[str], Awaitable[Located]],
    ) -> None:
        self._generation = generation
        self._lookup = lookup
        self._at: int | None = None  # the generation the entries were resolved in
        self._known: dict[str, Located] = {}
        self._pending: dict[tuple[int, str], _Lookup] = {}

    def _current(self) -> int:
        generation = self._generation()
        if generation != self._at:
            self._known.clear()
            self._at = generation
        return generation

    async def locate(self, name: str) -> Located:
        """What ``name`` resolves to in the index as it is now."""
        generation = self._current()
        found = self._known.get(name)
        if found is not None:
            return found
        shared = self._pending.get((generation, name))
        if shared is not None:
            await shared.done.wait()
            if shared.found is not None:
                return shared.found
            return await self._lookup(name)  # it failed (or was cancelled): ask again
        mine = self._pending[generation, name] = _Lookup(trio.Event())
        try:
            mine.found = await self._lookup(name)
        finally:
            del self._pending[generation, name]
            mine.done.set()
        if self._current() == generation:  # nothing committed since it started
            if len(self._known) >= self.MAX_ENTRIES:
                for old in list(self._known)[: self.MAX_ENTRIES // 10]:
                    del self._known[old]
            self._known[name] = mine.found
        return mine.found

    def __len__(self) -> int:
        return len(self._known)


class Maintainer:
    """Keeps one library's index current and its files hashed; runs once per library.

    ``follow``: this process only reads an index another process maintains;
    it is asked for the state (:meth:`state`), and :meth:`run` does nothing.
    ``on_change`` is called when a scan starts or ends, before anyone waiting
    for it is woken (the primary publishes its state then). ``generation``
    says the index's generation (default: the index's own, which this process
    keeps when it writes; a follower reads the primary's from the board).
    """

    #: a scan that took ``d`` seconds is followed by at least ``REST_FACTOR * d`` seconds
    #: without one...
    REST_FACTOR = 3.0
    #: ...but never more than this many seconds
    MAX_REST = 5.0

    def __init__(
        self,
        library: Library,
        config: MaintainerConfig,
        *,
        follow: Callable[[], CatalogState] | None = None,
        on_change: Callable[[], None] | None = None,
        generation: Callable[[], int] | None = None,
    ) -> None:
        self.library = library
        self.config = config
        self._follow = follow
        self._on_change = on_change
        #: sha256 per file version, computed once and shared
        self.checksums = ChecksumCache()
        #: bounds the threads (and so the index connections) busy with index queries
        self.index_threads = trio.CapacityLimiter(8)
        #: names resolved before, while the index stays as it was (see TrackCache)
        self.tracks = TrackCache(
            generation or (lambda: library.index.generation),
            functools.partial(self.in_thread, library.locate),
        )
        #: the index's sha256 per file version (path, size, mtime) once read: a
        #: version's digest never changes, so this needs no generation
        self._stored: dict[tuple[str, int, int], str] = {}
        #: scans started and completed, and a wake-up for those waiting for one
        self.scans_started = 0
        self.scans_done = 0
        self._scan_finished = trio.Event()
        #: when the last scan ended (trio's clock) and how long it took
        self._last_end = -math.inf
        self._last_took = 0.0
        # capacity 1: many requests for a rescan while one is pending ask for one rescan
        self._scan_kick, self._scan_kicked = trio.open_memory_channel[None](1)
        self._hash_kick, self._hash_kicked = trio.open_memory_channel[None](1)
        #: the change watcher (``watch``, where inotify exists), whose folders the
        #: scans' walks add (see :meth:`watch_for_changes`)
        self._watcher: Watcher | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Scan now and keep scanning, watching and hashing until cancelled
        (a follower: nothing to do, it returns at once)."""
        if self._follow is not None:
            task_status.started()
            return
        self.library.scanning = True  # the first scan starts in a moment
        # before the first scan, whose walk adds its folders (no tree walked here)
        self._watcher = open_watcher(self.library.root, tree=False) if self.config.watch else None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.rescan_periodically)
                if self.config.background_checksums:
                    nursery.start_soon(self.hash_in_background)
                if self._watcher is not None:
                    nursery.start_soon(self.watch_for_changes, self._watcher)
                task_status.started()
        finally:  # closed once no scan runs (one may be adding a folder to it until then)
            if self._watcher is not None:
                self._watcher.close()
                self._watcher = None

    @property
    def writes_index(self) -> bool:
        """Whether this process may write the index (not a follower)."""
        return self._follow is None

    def state(self) -> CatalogState:
        """The index's track count, whether a scan runs, the scans done and the last one."""
        if self._follow is not None:
            return self._follow()
        return CatalogState(
            self.library.count, self.library.scanning, self.scans_done, self.last_scan()
        )

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def last_scan(self) -> tuple[float, float] | None:
        """Seconds since the last scan ended and how long it took; ``None`` before one ends."""
        if self.scans_done < 1:
            return None
        return trio.current_time() - self._last_end, self._last_took

    async def in_thread(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run an index query in a worker thread (they are short; never abandoned)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.index_threads)

    async def locate(self, name: str) -> Located:
        """What ``name`` resolves to, and its row's version (:meth:`Library.locate
        <musiclib.library.Library.locate>`), from memory while the index has not changed."""
        found = await self.tracks.locate(name)
        track, mtime_ns = found
        if track.sha256 is not None:
            self._remember_stored((track.path, track.size, mtime_ns), track.sha256)
        return found

    async def stored_sha256(self, track: TrackInfo, st: os.stat_result) -> str | None:
        """The index's sha256 of the version of ``track`` that ``st`` describes, if it
        has one: from memory if read (or located) before, else from the index."""
        key = (track.path, st.st_size, st.st_mtime_ns)
        known = self._stored.get(key)
        if known is None:
            known = await self.in_thread(self.library.stored_sha256, track, st)
            if known is not None:
                self._remember_stored(key, known)
        return known

    def _remember_stored(self, key: tuple[str, int, int], digest: str) -> None:
        if key not in self._stored and len(self._stored) >= TrackCache.MAX_ENTRIES:
            for old in list(self._stored)[: TrackCache.MAX_ENTRIES // 10]:
                del self._stored[old]
        self._stored[key] = digest

    async def wait_for_first_scan(self) -> None:
        """Return once a scan has finished (at once if one has)."""
        while self.scans_done < 1:
            await self._scan_finished.wait()

    async def rescan(self) -> int:
        """Update the index in a worker thread; the event loop keeps serving meanwhile."""
        settle = self.config.watch_settle
        watcher = self._watcher
        scan = functools.partial(
            self.library.rescan,
            settle=settle,
            on_folder=watcher.watch_folder if watcher is not None else None,
        )
        count = await run_stoppable(scan)
        log.info("indexed %d tracks under %s", count, self.library.root)
        with contextlib.suppress(trio.WouldBlock):
            self._hash_kick.send_nowait(None)
        return count

    async def rescan_periodically(self) -> None:
        """Scan at start, then on request and every ``rescan_interval`` seconds if set,
        resting between scans; look again at unsettled files meanwhile.

        One task does every scan, so scans never overlap; requests that arrive
        during a scan are all served by the next one, which starts after them.
        """
        while True:
            await trio.sleep_until(
                self._last_end + min(self.MAX_REST, self.REST_FACTOR * self._last_took)
            )
            # said before the worker thread starts, so no reply in between claims
            # an up-to-date index
            self.library.scanning = True
            self.scans_started += 1
            self._changed()
            with contextlib.suppress(trio.WouldBlock):  # what asked for it is served now
                self._scan_kicked.receive_nowait()
            started = trio.current_time()
            try:
                await self.rescan()
            except (OSError, sqlite3.Error) as exc:
                log.error("scan of %s failed: %s", self.library.root, exc)
            except Exception as exc:  # a bug: log it, keep serving what the index has
                log.exception("scan of %s failed: %s", self.library.root, exc)
            self._last_end = trio.current_time()
            self._last_took = self._last_end - started
            self.scans_done += 1
            self._changed()
            self._scan_finished.set()
            self._scan_finished = trio.Event()
            await self._wait_for_next_scan()

    async def _wait_for_next_scan(self) -> None:
        """Until a scan is asked for or due, looking again at unsettled files every
        ``watch_settle`` seconds meanwhile."""
        interval = self.config.rescan_interval
        due = trio.current_time() + interval if interval > 0 else math.inf
        while True:
            settle = self.config.watch_settle
            look = trio.current_time() + settle if self.library.unsettled else math.inf
            with trio.move_on_at(min(due, look)):
                await self._scan_kicked.receive()
                return
            if trio.current_time() >= due:
                return
            try:
                recheck = functools.partial(self.library.recheck, settle=settle)
                await run_stoppable(recheck)
            except (OSError, sqlite3.Error) as exc:
                log.error("looking again at changing files failed: %s", exc)
            except Exception as exc:  # a bug: log it, keep serving what the index has
                log.exception("looking again at changing files failed: %s", exc)

    async def request_rescan(self, *, wait: bool) -> None:
        """Ask for a scan that starts after this call; with ``wait``, until it is done.

        Every request made before that scan starts is served by it.
        """
        target = self.scans_started + 1  # the next scan to start
        with contextlib.suppress(trio.WouldBlock):
            self._scan_kick.send_nowait(None)
        while wait and self.scans_done < target:
            await self._scan_finished.wait()

    async def watch_for_changes(self, watcher: Watcher) -> None:
        """Ask for a rescan once the library has changed and then been quiet for
        ``watch_settle`` seconds (at most ten times that after the first change).

        Every scan's walk watches each folder just before it lists it
        (:meth:`Watcher.watch_folder <musiclib.watch.Watcher.watch_folder>`), so
        the tree is walked once at start, not once more by the watcher, and a
        change is either seen by the listing or reported by the watch. A change
        during the first scan is read once it ends, and asks for the next one.
        """
        await self.wait_for_first_scan()
        log.info("watching %d folders for changes", watcher.watched)
        settle = self.config.watch_settle
        while True:
            await trio.lowlevel.wait_readable(watcher.fd)
            if not watcher.changes():
                continue
            give_up = trio.current_time() + 10 * settle
            while trio.current_time() < give_up:
                with trio.move_on_after(settle) as quiet:
                    await trio.lowlevel.wait_readable(watcher.fd)
                if quiet.cancelled_caught:
                    break
                watcher.changes()
            log.debug("the library changed; rescanning")
            await self.request_rescan(wait=False)

    async def hash_in_background(self) -> None:
        """After each scan, store the sha256 of every indexed file that has none yet.

        One file at a time, through the same :class:`ChecksumCache` the streams
        use, so a file being streamed is never hashed twice. Files that moved
        on since the scan are skipped: the next scan re-reads them.
        """
        async for _ in self._hash_kicked:
            after, hashed = "", 0
            while True:
                work = await self.in_thread(self.library.index.without_sha256, after, 64)
                if not work:
                    break
                for path, size, mtime_ns in work:
                    after = path
                    hashed += await self._hash_one(path, size, mtime_ns)
            if hashed:
                log.info("stored the sha256 of %d files", hashed)

    async def _hash_one(self, path: str, size: int, mtime_ns: int) -> bool:
        try:
            with open_confined(self.library.root, path, self.library.follow_symlinks) as f:
                st = os.fstat(f.fileno())
                if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                    return False
                digest = await self.checksums.sha256(f.fileno(), st)
        except (OSError, NotFound, Changed) as exc:
            log.debug("no sha256 for %s: %s", path, exc)
            return False
        store = self.library.index.set_sha256
        return bool(await self.in_thread(store, path, size, mtime_ns, digest))
