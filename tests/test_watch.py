"""Tests for musiclib.watch (inotify through ctypes) and the server's use of it."""

from __future__ import annotations

import json
import select
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LIBRARY, media_files, run_cli

from musiclib.watch import Watcher, open_watcher

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="inotify is Linux's; elsewhere it is absent"
)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, Watcher]]:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    watcher = open_watcher(root)
    assert watcher is not None, "inotify should be available on Linux"
    yield root, watcher
    watcher.close()


def changed(watcher: Watcher, wait: float = 2.0) -> bool:
    """Whether the watcher reports a relevant change within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([watcher.fd], [], [], left)
        if readable and watcher.changes():
            return True
    return False


def test_it_watches_every_plain_folder(watched: tuple[Path, Watcher]) -> None:
    _, watcher = watched
    assert watcher.watched == 2  # root and sub, not .hidden


@pytest.mark.parametrize(
    "change",
    [
        lambda root: (root / "sub" / "new.mp3").write_bytes(b"x"),
        lambda root: (root / "a.flac").write_bytes(b"x"),
        lambda root: (root / "sub").rename(root / "renamed"),
    ],
    ids=["written in a subfolder", "written at the top", "folder renamed"],
)
def test_changes_are_reported(watched: tuple[Path, Watcher], change: object) -> None:
    root, watcher = watched
    change(root)  # type: ignore[operator]
    assert changed(watcher)


def test_hidden_names_and_partial_downloads_are_not_changes(
    watched: tuple[Path, Watcher],
) -> None:
    root, watcher = watched
    (root / ".index.sqlite3").write_bytes(b"x")
    (root / "sub" / "track.mp3.part").write_bytes(b"x")
    (root / ".hidden" / "inside.mp3").write_bytes(b"x")
    assert not changed(watcher, wait=0.5)


def test_a_new_folder_is_watched_at_once(watched: tuple[Path, Watcher]) -> None:
    root, watcher = watched
    (root / "new" / "deeper").mkdir(parents=True)
    assert changed(watcher)
    assert watcher.watched == 4
    (root / "new" / "deeper" / "song.ogg").write_bytes(b"x")
    assert changed(watcher)


def test_a_scan_watches_each_folder_it_lists(tmp_path: Path) -> None:
    """The server walks the tree once: the scan's walk adds the watches (before each
    listing), none through a symlink, none hidden; a later scan adds none twice."""
    from musiclib.library import Library

    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    (root / ".hidden").mkdir()
    (root / "link").symlink_to(root / "a")  # inside the root: walked, not watched
    watcher = open_watcher(root, tree=False)
    assert watcher is not None
    try:
        assert watcher.watched == 0
        with Library(root, tmp_path / "index.sqlite3", workers=0) as library:
            library.rescan(on_folder=watcher.watch_folder)
            assert watcher.watched == 4  # root, a, a/b, c
            library.rescan(on_folder=watcher.watch_folder)
            assert watcher.watched == 4
        (root / "a" / "b" / "song.ogg").write_bytes(b"x")
        assert changed(watcher)
    finally:
        watcher.close()


@pytest.mark.e2e
def test_the_server_sees_changes_in_folders_it_found_at_start(
    start_server: object, tmp_path: Path
) -> None:
    first, second = (Path(t) for t in media_files(LIBRARY)[:2])
    root = tmp_path / "root"
    (root / "old" / "deep").mkdir(parents=True)
    shutil.copyfile(LIBRARY / first, root / "old" / "deep" / first.name)
    srv = start_server(root, "--rescan-interval", "0")  # type: ignore[operator]
    shutil.copyfile(LIBRARY / second, root / "old" / "deep" / second.name)
    wanted = sorted([f"old/deep/{first.name}", f"old/deep/{second.name}"])
    deadline = time.monotonic() + 15
    while True:
        listed = run_cli("ls", "--json", server=srv.address)
        assert listed.returncode == 0, listed.stderr
        paths = sorted(t["path"] for t in json.loads(listed.stdout))
        if paths == wanted:
            break
        assert time.monotonic() < deadline, f"the watcher never brought {wanted}: {paths}"
        time.sleep(0.2)


@pytest.mark.e2e
def test_the_server_rescans_when_files_arrive_without_being_asked(
    start_server: object, tmp_path: Path
) -> None:
    first, second = (Path(t) for t in media_files(LIBRARY)[:2])
    root = tmp_path / "root"
    root.mkdir()
    shutil.copyfile(LIBRARY / first, root / first.name)
    srv = start_server(root, "--rescan-interval", "0")  # type: ignore[operator]
    (root / "later" / "deep").mkdir(parents=True)
    shutil.copyfile(LIBRARY / second, root / "later" / "deep" / second.name)
    (root / first.name).unlink()
    wanted = [f"later/deep/{second.name}"]
    deadline = time.monotonic() + 15
    while True:
        listed = run_cli("ls", "--json", server=srv.address)
        assert listed.returncode == 0, listed.stderr
        paths = [t["path"] for t in json.loads(listed.stdout)]
        if paths == wanted:
            break
        assert time.monotonic() < deadline, f"the watcher never brought {wanted}: {paths}"
        time.sleep(0.2)


def test_without_inotify_there_is_no_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_libc(*args: object, **kwargs: object) -> object:
        raise OSError("no C library here")

    monkeypatch.setattr("musiclib.watch.ctypes.CDLL", no_libc)
    assert open_watcher(tmp_path) is None  # the server then relies on periodic rescans
