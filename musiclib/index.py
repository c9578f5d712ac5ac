"""The persistent library index: one SQLite file per library root.

The index is a cache of what the disk says, never a source of truth: every
row is keyed by its path and carries the file's size and modification time,
so a rescan re-reads only the files whose size or mtime moved, and a file
that cannot be trusted is rebuilt from the disk.

Why it looks the way it does:

* **The standard library's sqlite3, WAL mode.** Readers (list, resolve) never
  wait for the scanner and see each committed batch at once, which is how a
  list during a scan returns "what is known so far". ``synchronous=NORMAL``:
  a power cut may lose the last batches, and the next scan re-reads them.
* **Never trusted blindly.** The file must carry our ``application_id``, our
  schema version, the same root, and pass ``PRAGMA quick_check``. A file of
  ours that is merely stale (old schema, other root) is deleted and rebuilt;
  anything else (corrupt, not SQLite, another program's database) is moved
  aside to ``<name>.broken`` and rebuilt, so nothing of somebody else's is
  destroyed.
* **Search in SQL.** Folded (case- and accent-free) copies of the text fields
  are stored next to them; a query word matches when ``instr`` finds it, the
  same rule the in-memory search used. ``LIKE`` is avoided: its ``%``/``_``
  would need escaping and it folds ASCII only.
* **A small, bounded pool of connections.** A connection is used by one
  thread at a time, but trio's worker threads come and go, so connections
  are lent from a pool (closed beyond :attr:`Index.IDLE_CONNECTIONS`) rather
  than kept per thread. At most :attr:`Index.MAX_CONNECTIONS` are open at
  once; a reader beyond that waits for one (at most
  :attr:`Index.BORROW_TIMEOUT` seconds, then :class:`~musiclib.errors.Busy`).
  Each keeps a small page cache (:attr:`Index.CACHE_KIB`). One writer
  connection, behind a lock, takes every write.
* **No transaction outlives a batch.** A list reply waits on a slow network
  peer for as long as the peer likes; a read transaction held meanwhile
  would tie up a connection, its page cache and three descriptors per reply,
  and keep the WAL from being checkpointed. So :class:`Listing` reads one
  batch per short transaction and continues after the last row it read
  (keyset pagination on ``(sort key, path)``, which an index per sort key
  makes a range scan). The first batch and the ``total`` come from one
  snapshot, so a reply of up to one batch is exactly a snapshot. A longer
  reply during a scan that commits meanwhile lists every track that stayed
  unchanged exactly once and in order; a track added, removed or re-sorted
  by the scan may be missing from it or (for sorts other than ``path``,
  whose key never changes) appear twice. :attr:`Listing.changed` says
  whether that could have happened, and the reply then says ``scanning``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from .errors import Busy
from .protocol import LIST_SORTS, ListRequest, TrackInfo, query_words
from .text import fold

__all__ = [
    "Index",
    "ListQuery",
    "Listing",
    "default_index_path",
    "match_condition",
    "row_of",
]

log = logging.getLogger("musiclib.index")

#: ``PRAGMA application_id`` of a musiclib index ("mlib")
APPLICATION_ID: Final = 0x6D6C6962
#: ``PRAGMA user_version``; bump it whenever the schema changes (old files are rebuilt)
SCHEMA_VERSION: Final = 2

#: The TrackInfo fields, in the order they are stored (the first columns of a row);
#: a field added to TrackInfo needs a column in _SCHEMA and a new SCHEMA_VERSION.
TRACK_FIELDS: Final = tuple(f.name for f in dataclasses.fields(TrackInfo))
_N_TRACK = len(TRACK_FIELDS)
# bookkeeping columns after the TrackInfo ones
_EXTRA = ("mtime_ns", "inode", "haystack", "path_key", "title_key", "artist_key", "album_key")
COLUMNS: Final = TRACK_FIELDS + _EXTRA

_SCHEMA = """
CREATE TABLE tracks (
    path TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    format TEXT NOT NULL,
    size INTEGER NOT NULL,
    artist TEXT,
    album TEXT,
    track INTEGER,
    duration REAL,
    codec TEXT,
    sample_rate INTEGER,
    channels INTEGER,
    bitrate INTEGER,
    bits_per_sample INTEGER,
    sha256 TEXT,
    error TEXT,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    haystack TEXT NOT NULL,
    path_key TEXT NOT NULL,
    title_key TEXT NOT NULL,
    artist_key TEXT,
    album_key TEXT,
    -- never-NULL sort keys (missing values last), so that a row value can say
    -- where a batch ended and each index below is searched as a range
    artist_last INTEGER GENERATED ALWAYS AS (artist_key IS NULL) VIRTUAL,
    artist_sort TEXT GENERATED ALWAYS AS (coalesce(artist_key, '')) VIRTUAL,
    album_last INTEGER GENERATED ALWAYS AS (album_key IS NULL) VIRTUAL,
    album_sort TEXT GENERATED ALWAYS AS (coalesce(album_key, '')) VIRTUAL,
    duration_last INTEGER GENERATED ALWAYS AS (duration IS NULL) VIRTUAL,
    duration_sort REAL GENERATED ALWAYS AS (coalesce(duration, 0.0)) VIRTUAL
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX tracks_by_title ON tracks (title_key, path);
CREATE INDEX tracks_by_artist ON tracks (artist_last, artist_sort, path);
CREATE INDEX tracks_by_album ON tracks (album_last, album_sort, path);
CREATE INDEX tracks_by_duration ON tracks (duration_last, duration_sort, path);
"""

#: Every commit that adds, replaces or deletes rows (not a sha256) counts itself, in
#: the same transaction, so a reader can tell exactly whether two snapshots differ.
_BUMP_GENERATION = (
    "INSERT INTO meta VALUES ('generation', '1') "
    "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
)
_GENERATION = (
    "SELECT coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'generation'), 0)"
)
_SELECT_TRACK = "SELECT " + ", ".join(TRACK_FIELDS) + " FROM tracks"
_SELECT_TRACK_VERSION = "SELECT " + ", ".join(TRACK_FIELDS) + ", mtime_ns FROM tracks"
_INSERT = (
    f"INSERT OR REPLACE INTO tracks ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
)

#: The sort key per sort, never NULL: missing values last, then by path so the
#: order is total (and a row value can say where a batch ended). Each is an index
#: in _SCHEMA, so ordering and continuing after a row are range scans.
_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "path": ("path",),
    "title": ("title_key", "path"),
    "artist": ("artist_last", "artist_sort", "path"),
    "album": ("album_last", "album_sort", "path"),
    "duration": ("duration_last", "duration_sort", "path"),
}
assert tuple(_KEYS) == LIST_SORTS

Row = tuple[Any, ...]
#: What the scanner needs to know of an indexed file: size, mtime_ns, inode, sha256.
Version = tuple[int, int, int, str | None]


def row_of(info: TrackInfo, mtime_ns: int, inode: int) -> Row:
    """The table row for ``info``: its fields, then the keys search and sorting use."""
    fields = tuple(getattr(info, name) for name in TRACK_FIELDS)
    text = "\n".join(filter(None, (info.title, info.artist, info.album, info.path)))
    return (
        *fields,
        mtime_ns,
        inode,
        fold(text),
        info.path.casefold(),
        fold(info.title),
        fold(info.artist) if info.artist else None,
        fold(info.album) if info.album else None,
    )


def track_of(row: Sequence[Any]) -> TrackInfo:
    """The :class:`TrackInfo` of a row selected with the TrackInfo columns first."""
    return TrackInfo(*row[:_N_TRACK])


#: What a list asks for is exactly what the ``list`` message carries (query words,
#: artist, album, format, sort, offset, limit), so the message is the query.
ListQuery = ListRequest


def match_condition(query: ListQuery) -> tuple[str, list[Any]]:
    """The SQL condition (``"1"`` when everything matches) and its parameters for ``query``.

    The query is split into words (:func:`~musiclib.protocol.query_words`), and
    each folded word must appear in the folded title, artist, album or path;
    ``artist`` and ``album`` are substrings of those tags, folded alike
    (:func:`~musiclib.text.fold`). ``format`` is the file extension, exactly.
    The protocol bounds the words, so the condition stays far from SQLite's
    expression depth limit.
    """
    clauses: list[str] = []
    params: list[Any] = []
    for word in query_words(query.query):
        if folded := fold(word):
            clauses.append("instr(haystack, ?) > 0")
            params.append(folded)
    for column, wanted in (("artist_key", query.artist), ("album_key", query.album)):
        if wanted:
            clauses.append(f"instr({column}, ?) > 0")
            params.append(fold(wanted))
    if query.format:
        clauses.append("format = ?")
        params.append(query.format.lower().removeprefix("."))
    return (" AND ".join(clauses) if clauses else "1"), params


def _where(query: ListQuery) -> tuple[str, list[Any]]:
    """The ``WHERE`` clause (possibly empty) and its parameters for ``query``."""
    condition, params = match_condition(query)
    return (" WHERE " + condition if params else ""), params


def default_index_path(root: Path) -> Path:
    """Where the index of ``root`` lives by default: the user's cache directory.

    ``$XDG_CACHE_HOME/musiclib/`` (an absolute path only, as the XDG spec
    says), else ``~/.cache/musiclib/``; the file name carries the folder's
    name for people and a hash of its real path for uniqueness.
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    cache = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    real = os.path.realpath(root)
    tag = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(real).name)[:40]
    return cache / "musiclib" / f"{name or 'root'}-{tag}.sqlite3"


class _Untrusted(Exception):
    """Internal: the index file must not be used; ``ours`` says whether it may be deleted."""

    def __init__(self, reason: str, *, ours: bool) -> None:
        super().__init__(reason)
        self.ours = ours


class Index:
    """The SQLite index of one library root; every method may be called from any thread.

    ``path=None`` uses :func:`default_index_path`. When that place cannot be
    written (a read-only home, a full disk), the index lives in a temporary
    folder for this run only, with a warning: serving matters more than
    remembering.

    ``read_only``: another process (the primary of ``serve --workers``) keeps
    this index; it is opened as it is, never rebuilt, and every connection
    refuses to write (``PRAGMA query_only``).
    """

    #: connections kept open in the pool for the next reader
    IDLE_CONNECTIONS = 4
    #: reader connections open at most (lent and idle); more readers wait for one
    MAX_CONNECTIONS = 16
    #: seconds a reader waits for a connection before giving up with Busy
    BORROW_TIMEOUT = 30.0
    #: page cache of a reader connection, in KiB (SQLite's default is 2000)
    CACHE_KIB = 256

    def __init__(self, root: Path, path: Path | None = None, *, read_only: bool = False) -> None:
        self._root = str(os.path.realpath(root))
        self._tmpdir: str | None = None
        #: every connection refuses writes (``PRAGMA query_only``): another process
        #: (the primary worker) keeps this index, this one only reads it
        self.read_only = read_only
        target = Path(path) if path is not None else default_index_path(root)
        if read_only:
            self._writer = self._open_read_only(target)
        else:
            self._writer = self._open_writable(target, named=path is not None)
            target = self._writer_path
        self.path = target
        self._write_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._returned = threading.Condition(self._pool_lock)
        self._idle: list[sqlite3.Connection] = []
        self._open = 0  # reader connections open (lent or idle)
        self._closed = False
        self.count = self._count(self._writer)
        #: the index's generation (see ``_BUMP_GENERATION``), kept by the writer: set
        #: only once a commit is visible, so a lookup begun after reading a value sees
        #: at least that generation (what a cache of lookups may be keyed by)
        self.generation = int(self._writer.execute(_GENERATION).fetchone()[0])
        #: called with the new generation after each commit that bumped it, in the
        #: writing thread under the write lock (one caller at a time): the primary
        #: worker publishes it to the others there (:mod:`musiclib.maintainer`)
        self.on_commit: Callable[[int], None] | None = None

    def _open_writable(self, target: Path, *, named: bool) -> sqlite3.Connection:
        """The writer connection at ``target``, or at a temporary place if that fails
        and the user did not name it; :attr:`_writer_path` says where."""
        self._writer_path = target
        try:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            return self._open_trusted(target)
        except (OSError, sqlite3.Error) as exc:
            if named:  # the user named it: they want to hear why not
                raise OSError(f"cannot use the index file {target}: {exc}") from exc
            self._tmpdir = tempfile.mkdtemp(prefix="musiclib-index-")
            log.warning(
                "cannot keep the index in %s (%s); using a temporary one for this run",
                target,
                exc,
            )
            self._writer_path = Path(self._tmpdir) / "index.sqlite3"
            return self._open_trusted(self._writer_path)

    def _open_read_only(self, target: Path) -> sqlite3.Connection:
        """A connection to the index another process keeps at ``target``; never rebuilt
        here (that process owns it): an index not to be trusted is an ``OSError``."""
        try:
            conn = self._connect(target, query_only=True)
        except sqlite3.Error as exc:
            raise OSError(f"cannot open the index file {target}: {exc}") from exc
        try:
            app, version = conn.execute(
                "SELECT * FROM pragma_application_id, pragma_user_version"
            ).fetchone()
            row = conn.execute("SELECT value FROM meta WHERE key = 'root'").fetchone()
        except sqlite3.Error as exc:
            conn.close()
            raise OSError(f"cannot read the index file {target}: {exc}") from exc
        ours = app == APPLICATION_ID and version == SCHEMA_VERSION
        if not ours or row is None or row[0] != self._root:
            conn.close()
            raise OSError(f"the index file {target} is not this library's (yet)")
        return conn

    # ------------------------------------------------------------------ opening

    @staticmethod
    def _connect(
        path: Path, cache_kib: int | None = None, *, query_only: bool = False
    ) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        if query_only:
            conn.execute("PRAGMA query_only=ON")
        else:
            conn.execute("PRAGMA synchronous=NORMAL")
        if cache_kib is not None:
            conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        return conn

    def _open_trusted(self, path: Path) -> sqlite3.Connection:
        """A writer connection to a trusted index at ``path``, rebuilt first if need be."""
        try:
            conn = self._connect(path)
        except sqlite3.Error as exc:
            self._discard(path, _Untrusted(f"cannot open it: {exc}", ours=False))
            conn = self._connect(path)
        try:
            self._check(conn)
            return conn
        except _Untrusted as why:
            conn.close()
            self._discard(path, why)
        conn = self._connect(path)
        self._check(conn)  # a fresh file: creates the schema
        return conn

    def _check(self, conn: sqlite3.Connection) -> None:
        """Create the schema in an empty file, or raise :class:`_Untrusted`.

        Only reads until the file is known to be ours (or empty): another
        program's database is not even switched to WAL mode. The integrity
        check comes before the meta row is believed, so damage is never
        mistaken for "another folder's index" and deleted.
        """
        try:
            app = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app == 0 and version == 0 and tables == 0:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(
                    "BEGIN;"
                    + _SCHEMA
                    + f"PRAGMA application_id={APPLICATION_ID};"
                    + f"PRAGMA user_version={SCHEMA_VERSION};"
                    + "COMMIT;"
                )
                conn.execute("INSERT INTO meta VALUES ('root', ?)", (self._root,))
                return
            if app != APPLICATION_ID:
                raise _Untrusted("it is not a musiclib index", ours=False)
            result = conn.execute("PRAGMA quick_check").fetchone()
            if result is None or result[0] != "ok":
                first = str(result[0]).splitlines()[0] if result else "no result"
                raise _Untrusted(f"integrity check failed: {first}", ours=False)
            if version != SCHEMA_VERSION:
                raise _Untrusted(f"schema {version}, this version uses {SCHEMA_VERSION}", ours=True)
            row = conn.execute("SELECT value FROM meta WHERE key = 'root'").fetchone()
            if row is None or row[0] != self._root:
                raise _Untrusted("it indexes another folder", ours=True)
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as exc:  # "file is not a database", malformed...
            raise _Untrusted(f"unreadable: {exc}", ours=False) from None

    @staticmethod
    def _discard(path: Path, why: _Untrusted) -> None:
        """Remove an untrusted index file (ours) or move it aside (anything else)."""
        if why.ours:
            log.warning("rebuilding the index %s: %s", path, why)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            aside = path.with_name(path.name + ".broken")
            log.warning("index %s is not to be trusted (%s); moved to %s", path, why, aside)
            os.replace(path, aside)
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                Path(str(path) + suffix).unlink()

    def close(self) -> None:
        """Close every connection (and the temporary folder, if one was used)."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._returned.notify_all()
        for conn in idle:
            conn.close()
        with self._write_lock:
            self._writer.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    # ------------------------------------------------------------------ the pool

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        conn = self._borrow()
        try:
            yield conn
        finally:
            self._give_back(conn)

    @property
    def connections(self) -> int:
        """Reader connections open now, lent or idle (the writer not counted)."""
        return self._open

    def _borrow(self) -> sqlite3.Connection:
        """An idle connection, a new one while fewer than MAX_CONNECTIONS are open,
        else the next one given back (Busy after BORROW_TIMEOUT seconds)."""
        with self._pool_lock:
            ready = self._returned.wait_for(
                lambda: self._closed or self._idle or self._open < self.MAX_CONNECTIONS,
                timeout=self.BORROW_TIMEOUT,
            )
            if self._closed:
                raise RuntimeError("the index is closed")
            if not ready:
                raise Busy("every index connection is in use; try again")
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            return self._connect(self.path, self.CACHE_KIB, query_only=self.read_only)
        except BaseException:
            with self._pool_lock:
                self._open -= 1
                self._returned.notify()
            raise

    def _give_back(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.rollback()
        with self._pool_lock:
            if not self._closed and len(self._idle) < self.IDLE_CONNECTIONS:
                self._idle.append(conn)
                self._returned.notify()
                return
            self._open -= 1
            self._returned.notify()
        conn.close()

    # ------------------------------------------------------------------ reading

    @staticmethod
    def _count(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT count(*) FROM tracks").fetchone()[0])

    def get(self, path: str) -> TrackInfo | None:
        """The track stored under exactly ``path``."""
        found = self.lookup(path)
        return found[0] if found is not None else None

    def lookup(self, path: str) -> tuple[TrackInfo, int] | None:
        """The track stored under exactly ``path`` and the mtime (ns) of the version
        it describes: with its ``size``, what its ``sha256`` is the digest of."""
        with self._reader() as conn:
            row = conn.execute(_SELECT_TRACK_VERSION + " WHERE path = ?", (path,)).fetchone()
        return (track_of(row), int(row[_N_TRACK])) if row is not None else None

    def paths_where(self, clause: str, params: Sequence[Any], limit: int) -> tuple[int, list[str]]:
        """How many tracks match ``clause``, and the first ``limit`` of their paths."""
        with self._reader() as conn:
            conn.execute("BEGIN")
            total = conn.execute(f"SELECT count(*) FROM tracks WHERE {clause}", params)
            count = int(total.fetchone()[0])
            rows = conn.execute(
                f"SELECT path FROM tracks WHERE {clause} ORDER BY path LIMIT ?", (*params, limit)
            ).fetchall()
        return count, [r[0] for r in rows]

    def search(self, query: ListQuery) -> list[TrackInfo]:
        """Every track ``query`` selects, at once (see :meth:`listing` for big replies)."""
        with self.listing(query) as listing:
            return [t for batch in iter(listing.fetch, []) for t in batch]

    def listing(self, query: ListQuery, first: int = 512) -> Listing:
        """A :class:`Listing` of ``query`` with its ``total`` and ``first`` tracks read."""
        return Listing(self, query, first)

    def versions(self) -> dict[str, Version]:
        """Every indexed path with what a scan compares: size, mtime, inode, sha256."""
        with self._reader() as conn:
            rows = conn.execute("SELECT path, size, mtime_ns, inode, sha256 FROM tracks")
            return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}

    def sha256(self, path: str, size: int, mtime_ns: int) -> str | None:
        """The stored sha256 of ``path`` if the index holds this version of it."""
        with self._reader() as conn:
            row = conn.execute(
                "SELECT sha256 FROM tracks WHERE path = ? AND size = ? AND mtime_ns = ?",
                (path, size, mtime_ns),
            ).fetchone()
        return row[0] if row is not None else None

    def without_sha256(self, after: str, limit: int) -> list[tuple[str, int, int]]:
        """Up to ``limit`` ``(path, size, mtime_ns)`` past ``after`` (in path order) with
        no sha256 yet: the background hasher's work list, walked in pages."""
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT path, size, mtime_ns FROM tracks WHERE sha256 IS NULL AND path > ? "
                "ORDER BY path LIMIT ?",
                (after, limit),
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    # ------------------------------------------------------------------ writing

    def put(self, rows: Iterable[Row]) -> None:
        """Insert or replace whole rows (see :func:`row_of`) in one transaction."""
        with self._write_lock:
            with self._writer:
                self._writer.execute("BEGIN")
                self._writer.executemany(_INSERT, rows)
                generation = self._bump()
            self._committed(generation)

    def delete(self, paths: Iterable[str]) -> None:
        """Forget ``paths`` in one transaction."""
        with self._write_lock:
            with self._writer:
                self._writer.execute("BEGIN")
                self._writer.executemany("DELETE FROM tracks WHERE path = ?", ((p,) for p in paths))
                generation = self._bump()
            self._committed(generation)

    def _bump(self) -> int:
        """Count the open write transaction as a new generation (and recount); its number."""
        self._writer.execute(_BUMP_GENERATION)
        self.count = self._count(self._writer)
        return int(self._writer.execute(_GENERATION).fetchone()[0])

    def _committed(self, generation: int) -> None:
        """After a commit (write lock held): say its generation, now that it is visible."""
        self.generation = generation
        if self.on_commit is not None:
            self.on_commit(generation)

    def set_sha256(self, path: str, size: int, mtime_ns: int, digest: str) -> bool:
        """Store ``digest`` for this version of ``path``; False if the index moved on."""
        with self._write_lock, self._writer:
            cursor = self._writer.execute(
                "UPDATE tracks SET sha256 = ? WHERE path = ? AND size = ? AND mtime_ns = ?",
                (digest, path, size, mtime_ns),
            )
            return cursor.rowcount > 0


class Listing:
    """The tracks one query selects, fetched in batches, each in its own short read
    transaction; no connection is held between batches.

    :attr:`total` counts every match (before ``offset`` and ``limit``) in the
    same snapshot as the first ``first`` tracks, read at once; later batches
    continue after the last track read (see the module's docstring for what a
    scan committing meanwhile can do, and :attr:`changed`). Usable from one
    thread at a time, from any.
    """

    def __init__(self, index: Index, query: ListQuery, first: int = 512) -> None:
        if query.sort not in _KEYS:
            raise ValueError(f"sort must be one of {', '.join(LIST_SORTS)}")
        self._index = index
        self._where, self._params = _where(query)
        self._keys = _KEYS[query.sort]
        self._left = math.inf if query.limit is None else query.limit
        self._after: tuple[Any, ...] | None = None  # the sort key of the last row read
        self._ahead: list[TrackInfo] = []
        self._done = False
        #: whether a later batch came from another snapshot than the first (a scan
        #: committed in between), so the reply may miss or repeat a track it moved
        self.changed = False
        with index._reader() as conn:
            conn.execute("BEGIN")
            self._generation = int(conn.execute(_GENERATION).fetchone()[0])
            total = conn.execute("SELECT count(*) FROM tracks" + self._where, self._params)
            self.total = int(total.fetchone()[0])
            self._ahead = self._read(conn, first, query.offset)

    def _read(self, conn: sqlite3.Connection, n: int, offset: int = 0) -> list[TrackInfo]:
        """The next ``n`` tracks at most (after ``offset`` more), read with ``conn``."""
        n = int(min(n, self._left))
        if n <= 0 or self._done:
            self._done = True
            return []
        keys = ", ".join(self._keys)
        where, params = self._where, list(self._params)
        if self._after is not None:
            marks = ", ".join("?" * len(self._keys))
            where += (" AND " if where else " WHERE ") + f"({keys}) > ({marks})"
            params.extend(self._after)
        rows = conn.execute(
            f"SELECT {', '.join(TRACK_FIELDS)}, {keys} FROM tracks{where} "
            f"ORDER BY {keys} LIMIT ? OFFSET ?",
            (*params, n, offset),
        ).fetchall()
        if len(rows) < n:
            self._done = True
        if rows:
            self._after = tuple(rows[-1][_N_TRACK:])
        self._left -= len(rows)
        return [track_of(row) for row in rows]

    def fetch(self, n: int = 512) -> list[TrackInfo]:
        """The next ``n`` tracks at most; ``[]`` at the end."""
        if self._ahead:
            out, self._ahead = self._ahead[:n], self._ahead[n:]
            return out
        if self._done:
            return []
        with self._index._reader() as conn:
            conn.execute("BEGIN")
            if int(conn.execute(_GENERATION).fetchone()[0]) != self._generation:
                self.changed = True
            return self._read(conn, n)

    def close(self) -> None:
        """Forget what is left (nothing is held between batches); safe to call twice."""
        self._ahead = []
        self._done = True

    def __enter__(self) -> Listing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
