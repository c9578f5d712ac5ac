"""Optional file-system watching: Linux inotify through ctypes, no dependency.

A change under the library root (a file written, moved, deleted, touched, a
folder made) asks the server for a rescan shortly afterwards, so changes show
up without waiting for the periodic rescan. The rescan itself stays the one
source of truth: it is incremental (only changed files are read), so the
watcher does not need to know *what* changed, only *that* something did; a
lost event (queue overflow, a folder made and filled before its watch was
added) costs nothing but a rescan that the next event or the periodic timer
brings anyway.

Where inotify is missing (another OS, a libc without it, a container that
forbids it) :func:`open_watcher` returns ``None`` and the server carries on
with periodic rescans. Folders beyond the kernel's watch limit
(``fs.inotify.max_user_watches``) are left to the periodic rescans, with a
warning. Folders reached through symlinks are not watched.

The server adds no tree of its own: the scan's walk (:func:`musiclib.library.walk`)
hands each folder to :meth:`Watcher.watch_folder` just before listing it, so
the tree is walked once, not twice at start (a second walk of 100 000 files
held the interpreter's lock 0.25 s of a 1.3 s warm start: BENCHMARKS.md,
scenario 6), and nothing changed in a folder between its listing and its
watch can be missed: the watch comes first.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from pathlib import Path
from typing import Final

__all__ = ["Watcher", "open_watcher"]

log = logging.getLogger("musiclib.watch")

_IN_ATTRIB: Final = 0x4  # touch: the mtime a rescan compares
_IN_CLOSE_WRITE: Final = 0x8
_IN_MOVED_FROM: Final = 0x40
_IN_MOVED_TO: Final = 0x80
_IN_CREATE: Final = 0x100
_IN_DELETE: Final = 0x200
_IN_DELETE_SELF: Final = 0x400
_IN_Q_OVERFLOW: Final = 0x4000
_IN_IGNORED: Final = 0x8000
_IN_ONLYDIR: Final = 0x01000000
_IN_ISDIR: Final = 0x40000000
_MASK: Final = (
    _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_ONLYDIR
)
_EVENT: Final = struct.Struct("iIII")  # wd, mask, cookie, len; then the name


class Watcher:
    """An inotify instance watching every plain folder under a root.

    :attr:`fd` is non-blocking: wait until it is readable, then call
    :meth:`changes`. The server reads it from one task; :meth:`watch_folder`
    may meanwhile be called from the scanning thread (each call is one
    system call and one dict store, which the interpreter's lock keeps whole).
    """

    def __init__(self, libc: ctypes.CDLL, fd: int, root: Path) -> None:
        self._libc = libc
        self.fd = fd
        self._root = root
        self._folders: dict[int, str] = {}  # watch descriptor -> folder
        self._full = False

    def add_tree(self, top: str) -> None:
        """Watch ``top`` and every folder below it (hidden ones excepted)."""
        for folder, subfolders, _ in os.walk(top):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            if not self._add(folder):
                return

    def watch_folder(self, folder: str) -> None:
        """Watch ``folder`` itself (not what is below it); again is harmless (the
        kernel keeps one watch per folder). Nothing once the kernel's limit is reached."""
        if not self._full:
            self._add(folder)

    def _add(self, folder: str) -> bool:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), _MASK)
        if wd >= 0:
            self._folders[wd] = folder
            return True
        err = ctypes.get_errno()
        if err == errno.ENOSPC:
            if not self._full:
                log.warning(
                    "the kernel's inotify watch limit is reached after %d folders; "
                    "changes elsewhere show up at the next periodic rescan",
                    len(self._folders),
                )
            self._full = True
            return False
        log.debug("cannot watch %s: %s", folder, os.strerror(err))  # vanished, no access
        return True

    def changes(self) -> bool:
        """Read the pending events; True if any concerns the library.

        New folders are watched at once (their files then come with the
        rescan). Hidden names and ``*.part`` downloads do not count.
        """
        relevant = False
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return relevant
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, pos)
                raw = data[pos + _EVENT.size : pos + _EVENT.size + length]
                pos += _EVENT.size + length
                name = os.fsdecode(raw.rstrip(b"\0"))
                if mask & _IN_Q_OVERFLOW:
                    relevant = True
                    continue
                if mask & _IN_IGNORED:
                    self._folders.pop(wd, None)
                    continue
                if name.startswith(".") or name.endswith(".part"):
                    continue
                relevant = True
                folder = self._folders.get(wd)
                if (
                    folder is not None
                    and name
                    and mask & _IN_ISDIR
                    and mask & (_IN_CREATE | _IN_MOVED_TO)
                ):
                    self.add_tree(os.path.join(folder, name))

    @property
    def watched(self) -> int:
        """Folders watched now."""
        return len(self._folders)

    def close(self) -> None:
        """Stop watching (closing the descriptor drops every watch)."""
        os.close(self.fd)


def open_watcher(root: Path, *, tree: bool = True) -> Watcher | None:
    """A :class:`Watcher` of ``root``, or ``None`` where inotify is not available.

    ``tree``: walk the whole tree to add the watches (run it in a worker
    thread); without it, nothing is watched until folders are added
    (:meth:`Watcher.watch_folder`, as the server's scans do).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init = libc.inotify_init1
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        log.info("no inotify on this system; changes show up at the next periodic rescan")
        return None
    fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        reason = os.strerror(ctypes.get_errno())
        log.warning("cannot watch the library (%s); relying on periodic rescans", reason)
        return None
    watcher = Watcher(libc, fd, root)
    if not tree:
        return watcher
    try:
        watcher.add_tree(os.path.realpath(root))
    except BaseException:
        watcher.close()
        raise
    return watcher
