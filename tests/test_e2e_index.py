"""End to end: the persistent index seen through the real server and the real CLI.

The server runs as a subprocess on 127.0.0.1 with ``--index`` in the test's
folder; the client is ``python -m musiclib`` (or, where the reply's details
matter, musiclib.client). Covered: a restart reads no file again and still
lists every track; a changed file is re-read and a deleted one disappears;
garbage in the index file is moved aside; ``ls --limit/--offset`` pages
cover every track once; background hashing fills in sha256 and stream_start
announces it; a list during the first scan says so and is a consistent part.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
import trio
from conftest import (
    ServerProcess,
    run_cli,
    running_server,
)

from musiclib.client import open_client
from musiclib.protocol import ListEnd, TrackInfo

pytestmark = pytest.mark.e2e

#: name -> tags of the generated sounds (0.2 s each)
SOUNDS: dict[str, dict[str, str]] = {
    "one.mp3": {"title": "Formation", "artist": "Beyoncé", "album": "Lemonade"},
    "two.flac": {"title": "Jóga", "artist": "Björk", "album": "Homogenic"},
    "three.ogg": {"title": "Intro"},
    "four.wav": {"title": "Quiet", "artist": "Aurora"},
    "one-v2.mp3": {"title": "Formation (Remastered)", "artist": "Beyoncé", "album": "Lemonade"},
}
#: the library: three discs of the four first sounds
LAYOUT = {
    f"Disc {disc}/{name}": name for disc in (1, 2, 3) for name in list(SOUNDS)[:4]
}  # fmt: skip

# a scan's reads, and a recheck's: a file the first scan found freshly written is looked at
# again watch_settle seconds later, and when a test changes it before its rescan, that
# recheck may be what re-reads it (the rescan then finds it current and reads nothing)
_READING = re.compile(
    r"reading (\d+) (?:new or changed files of \d+|files again that were still changing)"
)


@pytest.fixture(scope="module")
def sounds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("e2e-sounds")
    for name, tags in SOUNDS.items():
        meta = [a for k, v in tags.items() for a in ("-metadata", f"{k}={v}")]
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", "sine=frequency=330:duration=0.2", *meta, str(d / name),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return d


@pytest.fixture
def root(sounds: Path, tmp_path: Path) -> Path:
    for rel, src in LAYOUT.items():
        dest = tmp_path / "lib" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sounds / src, dest)
    return tmp_path / "lib"


@pytest.fixture
def index(tmp_path: Path) -> Path:
    return tmp_path / "state" / "index.sqlite3"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ls_json(server: ServerProcess, *args: str) -> list[dict[str, Any]]:
    result = run_cli("ls", "--json", *args, server=server.address)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    listed: list[dict[str, Any]] = json.loads(result.stdout)
    return listed


def rescan_wait(server: ServerProcess) -> str:
    result = run_cli("rescan", "--wait", server=server.address)
    assert result.returncode == 0, result.stderr
    return bytes(result.stdout).decode().strip()


def files_read(server: ServerProcess) -> list[int]:
    """How many files each scan (or recheck) of this server opened, from its log."""
    return [int(m.group(1)) for m in _READING.finditer(server.log())]


def wait_files_read(server: ServerProcess, expected: list[int], timeout: float = 10.0) -> list[int]:
    """:func:`files_read` once it shows ``expected`` scans, or what it shows after ``timeout``.

    The scan logs its line before the reply goes out, but the test reads the
    server's stderr through a pipe and a thread: under load the CLI can be
    done before that thread has the line. A server that read more files than
    expected shows it at once; one that read fewer shows it after the wait.
    """
    deadline = time.monotonic() + timeout
    while (seen := files_read(server)) != expected and len(seen) < len(expected):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return seen


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))


# ---------------------------------------------------------------------------- restarts


def test_restart_with_the_same_index_reads_no_file_again(
    root: Path, sounds: Path, index: Path
) -> None:
    with running_server(root, "--index", str(index)) as first:
        first.wait_for_log(r"stored the sha256 of 12 files")
        before = ls_json(first)
    assert files_read(first) == [12]
    assert len(before) == 12 and all(t["sha256"] for t in before)

    with running_server(root, "--index", str(index)) as second:
        assert ls_json(second) == before  # tags and stored sha256 alike
        # stream_start announces the sha256 from the index: this process never hashed it
        track = "Disc 2/two.flac"
        start, data, end_sha = trio.run(stream, second.address, track)
        assert start == end_sha == sha256(root / track) == hashlib.sha256(data).hexdigest()
    log = second.log()
    assert files_read(second) == []
    assert "new or changed" not in log and "stored the sha256" not in log
    assert "indexed 12 tracks" in log

    # changed while no server ran: the next start reads that one file only
    shutil.copyfile(sounds / "one-v2.mp3", root / "Disc 1/one.mp3")
    bump_mtime(root / "Disc 1/one.mp3")
    with running_server(root, "--index", str(index)) as third:
        after = {t["path"]: t for t in ls_json(third)}
    assert files_read(third) == [1]
    assert "reading 1 new or changed files of 12" in third.log()
    assert after["Disc 1/one.mp3"]["title"] == "Formation (Remastered)"
    assert after["Disc 1/one.mp3"]["size"] == (sounds / "one-v2.mp3").stat().st_size
    unchanged = {t["path"]: t for t in before if t["path"] != "Disc 1/one.mp3"}
    assert {p: t for p, t in after.items() if p != "Disc 1/one.mp3"} == unchanged


async def stream(address: str, track: str) -> tuple[str | None, bytes, str | None]:
    """The sha256 stream_start announced, the bytes, and the sha256 stream_end gave."""
    async with open_client(address, timeout=30) as client, client.stream(track) as reply:
        data = b"".join([chunk async for chunk in reply])
        assert reply.start is not None and reply.end is not None
        return reply.start.sha256, data, reply.end.sha256


def test_changed_file_is_reread_and_deleted_file_disappears_on_rescan(
    root: Path, sounds: Path, index: Path
) -> None:
    with running_server(root, "--index", str(index), "--no-checksums") as srv:
        titles = {t["path"]: t["title"] for t in ls_json(srv)}
        assert titles["Disc 3/one.mp3"] == "Formation"

        shutil.copyfile(sounds / "one-v2.mp3", root / "Disc 3/one.mp3")
        bump_mtime(root / "Disc 3/one.mp3")
        (root / "Disc 2/three.ogg").unlink()
        assert rescan_wait(srv) == "11 tracks (done)"
        assert wait_files_read(srv, [12, 1]) == [12, 1]

        listed = {t["path"]: t for t in ls_json(srv)}
        assert sorted(listed) == sorted(p for p in LAYOUT if p != "Disc 2/three.ogg")
        assert listed["Disc 3/one.mp3"]["title"] == "Formation (Remastered)"
        assert ls_json(srv, "remastered") == [listed["Disc 3/one.mp3"]]
        gone = run_cli("info", "Disc 2/three.ogg", server=srv.address)
        assert gone.returncode != 0 and "no track" in gone.stderr

        # a touched file (same bytes, new mtime) is read again too; nothing else is
        bump_mtime(root / "Disc 1/four.wav")
        assert rescan_wait(srv) == "11 tracks (done)"
        assert wait_files_read(srv, [12, 1, 1]) == [12, 1, 1]


# ---------------------------------------------------------------------------- a broken index


def test_garbage_index_file_is_moved_aside_and_every_track_served(root: Path, index: Path) -> None:
    index.parent.mkdir(parents=True)
    garbage = b"this is not an index\n" * 500
    index.write_bytes(garbage)
    with running_server(root, "--index", str(index), "--no-checksums") as srv:
        listed = ls_json(srv)
    aside = Path(f"{index}.broken")
    assert f"moved to {aside}" in srv.log()
    assert aside.read_bytes() == garbage
    assert sorted(t["path"] for t in listed) == sorted(LAYOUT)
    # the rebuilt index is trusted by the next start, which reads nothing again
    with running_server(root, "--index", str(index), "--no-checksums") as again:
        assert ls_json(again) == listed
    assert "not to be trusted" not in again.log() and files_read(again) == []


# ---------------------------------------------------------------------------- paging


@pytest.mark.parametrize("sort", ["path", "artist"])
def test_ls_pages_cover_every_track_exactly_once(root: Path, index: Path, sort: str) -> None:
    with running_server(root, "--index", str(index), "--no-checksums") as srv:
        whole = [t["path"] for t in ls_json(srv, "--sort", sort)]
        assert sorted(whole) == sorted(LAYOUT)
        paged: list[str] = []
        for offset in range(0, 12 + 5, 5):  # bounded: one page past the end
            result = run_cli(
                "ls", "--json", "--sort", sort, "--limit", "5", "--offset", str(offset),
                server=srv.address,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            page = [t["path"] for t in json.loads(result.stdout)]
            if not page:
                assert f"12 tracks match, none shown from --offset {offset}" in result.stderr
                break
            last = offset + len(page)
            assert f"tracks {offset + 1}-{last} of 12" in result.stderr
            assert (f"--offset {last} for the next ones" in result.stderr) == (last < 12)
            paged += page
        else:
            pytest.fail("paging never reached an empty page")
    assert paged == whole
    assert len(set(paged)) == len(paged) == 12


# ---------------------------------------------------------------------------- sha256


def test_background_hashing_fills_in_every_sha256_and_get_verifies(
    root: Path, index: Path, tmp_path: Path
) -> None:
    with running_server(root, "--index", str(index)) as srv:
        srv.wait_for_log(r"stored the sha256 of \d+ files", timeout=15)
        listed = ls_json(srv)
        assert {t["path"]: t["sha256"] for t in listed} == {p: sha256(root / p) for p in LAYOUT}

        track = "Disc 1/four.wav"
        start, data, end_sha = trio.run(stream, srv.address, track)
        assert start == end_sha == sha256(root / track)
        assert data == (root / track).read_bytes()
        work = tmp_path / "work"
        work.mkdir()
        got = run_cli("get", track, "--save", server=srv.address, cwd=work)
        assert got.returncode == 0, got.stderr
        assert os.listdir(work) == ["four.wav"]
        assert sha256(work / "four.wav") == sha256(root / track)


def test_without_background_hashing_a_get_stores_the_sha256(
    root: Path, index: Path, tmp_path: Path
) -> None:
    with running_server(root, "--index", str(index), "--no-checksums") as srv:
        assert all(t["sha256"] is None for t in ls_json(srv))
        got = run_cli("get", "Disc 2/one.mp3", "--save", server=srv.address, cwd=tmp_path)
        assert got.returncode == 0, got.stderr
        hashed = {t["path"]: t["sha256"] for t in ls_json(srv) if t["sha256"]}
        assert hashed == {"Disc 2/one.mp3": sha256(root / "Disc 2/one.mp3")}
        start, _, _ = trio.run(stream, srv.address, "Disc 2/one.mp3")
        assert start == hashed["Disc 2/one.mp3"]
    assert "stored the sha256" not in srv.log()


# ---------------------------------------------------------------------------- a list during a scan


async def list_until_complete(address: str, n: int) -> list[tuple[list[TrackInfo], ListEnd]]:
    """List again and again over one connection until a reply has all ``n`` tracks and
    says the scan is over (bounded)."""
    replies: list[tuple[list[TrackInfo], ListEnd]] = []
    async with open_client(address, timeout=30) as client:
        for _ in range(2000):
            tracks, end = await client.list()
            replies.append((tracks, end))
            if not end.scanning and len(tracks) == n:
                break
            await trio.sleep(0.005)
    return replies


def test_a_list_during_the_first_scan(sounds: Path, tmp_path: Path) -> None:
    n = 3000
    root = tmp_path / "many"
    for i in range(n):  # hard links of one small tagged file: cheap to make, real to read
        dest = root / f"d{i // 100:02}" / f"t{i:04}.mp3"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(sounds / "one.mp3", dest)
    every = sorted(f"d{i // 100:02}/t{i:04}.mp3" for i in range(n))
    args = ("--scan-workers", "0", "--no-checksums", "--index", str(tmp_path / "i.sqlite3"))
    with running_server(root, *args, wait_indexed=False) as srv:
        replies = trio.run(list_until_complete, srv.address, n)
        srv.wait_for_log(rf"indexed {n} tracks")
    during = [(tracks, end) for tracks, end in replies if end.scanning]
    assert during, f"no list came back during the scan; log:\n{srv.log()}"
    assert len(during[0][0]) < n  # the first list saw part of the library
    for tracks, end in during:  # each one a consistent part: sorted, once each, counted
        got = [t.path for t in tracks]
        assert got == sorted(set(got))
        assert set(got) <= set(every)
        # read in batches: tracks the scan added after the first one may come too
        assert end.total is not None and end.total <= end.count == len(got)
        assert all(t.title == "Formation" for t in tracks)
    final_tracks, final_end = replies[-1]
    assert not final_end.scanning
    assert [t.path for t in final_tracks] == every
    assert final_end.count == final_end.total == n
