"""Resources a hostile or careless peer must not be able to pile up (issue 12).

Each test reproduces one attack at a small scale and counts the resource
itself (index connections and descriptors, scans, bytes allocated), never
the wall clock or the RSS.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import imageio_ffmpeg
import pytest
import trio
import trio.testing
from mutagen.aiff import AIFF
from mutagen.apev2 import BINARY, APEv2, APEValue
from mutagen.flac import FLAC, Picture
from mutagen.id3 import APIC, ID3
from mutagen.mp4 import MP4, MP4Cover
from mutagen.oggopus import OggOpus
from mutagen.oggvorbis import OggVorbis
from mutagen.wave import WAVE

from musiclib import library_requests
from musiclib.client import Client
from musiclib.errors import Busy
from musiclib.index import Index, row_of
from musiclib.library import Library, read_track
from musiclib.maintainer import Maintainer
from musiclib.protocol import ListRequest, TrackInfo
from musiclib.server import Server, ServerConfig

# --------------------------------------------------------------------------- pending list replies


def synthetic(i: int) -> tuple[object, ...]:
    info = TrackInfo(path=f"t{i:05}.mp3", title=f"Title {i}", format="mp3", size=i)
    return row_of(info, 1, i)


def index_descriptors(index: Index) -> int:
    """Descriptors of this process open on the index file or its -wal/-shm."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith(str(index.path)):
            count += 1
    return count


@pytest.fixture
def big_library(tmp_path: Path) -> Iterator[Library]:
    """A library whose index holds 3000 tracks (no files: only the index is read)."""
    root = tmp_path / "lib"
    root.mkdir()
    library = Library(root, tmp_path / "index.sqlite3", workers=0)
    library.index.put(synthetic(i) for i in range(3000))
    yield library
    library.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
async def test_list_replies_nobody_reads_hold_no_index_connection(big_library: Library) -> None:
    """50 clients send ``list`` and stop reading once the reply has started.

    Each pending reply used to keep a pooled SQLite connection (its page cache,
    its descriptors) in a read transaction for as long as the peer liked, and
    the pool had no bound: memory and descriptors grew with every such client
    and stayed. Now the index is read in short batches: while the replies are
    stuck, and after the clients left, the reader connections stay within the
    idle pool and the descriptors at what one idle pool needs.
    """
    index = big_library.index
    server = Server(big_library, ServerConfig(root=big_library.root, send_timeout=600.0))
    # one list to warm the pool: what an idle server holds
    warm_client, warm_server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, warm_server, "warm")
        client = Client(warm_client, timeout=30)
        await client.handshake()
        tracks, end = await client.list()
        assert len(tracks) == end.total == 3000
        await client.aclose()
    baseline = index_descriptors(index)
    assert index.connections <= Index.IDLE_CONNECTIONS

    clients: list[Client] = []
    async with trio.open_nursery() as nursery:
        for i in range(50):
            client_stream, server_stream = trio.testing.lockstep_stream_pair()
            nursery.start_soon(server.handle, server_stream, f"stuck{i}")
            client = Client(client_stream, timeout=30)
            await client.handshake()
            await client._send(ListRequest())
            # a byte of the reply: the server is now inside a send nobody completes
            assert await client._stream.receive_some(1)
            clients.append(client)
        await trio.testing.wait_all_tasks_blocked()
        stuck_descriptors = index_descriptors(index)
        stuck_connections = index.connections
        for client in clients:
            await client._stream.aclose()
    assert stuck_connections <= Index.IDLE_CONNECTIONS, "pending replies hold connections"
    assert stuck_descriptors <= baseline, "pending replies hold index descriptors"
    assert index.connections <= Index.IDLE_CONNECTIONS
    assert index_descriptors(index) <= baseline


async def test_memory_is_given_back_once_after_the_last_pending_list_reply(
    big_library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 peers that send ``list`` and stop reading left RSS 25 MiB up after they
    had gone: glibc keeps freed memory. ``malloc_trim`` (here a counting hook) now
    runs once the last list reply in progress has ended, never while one still runs."""
    calls: list[int] = []  # the replies in progress at each trim
    trimmed = trio.Event()
    replies = library_requests.LIST_REPLIES

    def trim() -> None:  # runs in a worker thread
        calls.append(replies.replies)
        trio.from_thread.run_sync(trimmed.set)

    monkeypatch.setattr(replies, "trim", trim)
    monkeypatch.setattr(replies, "interval", 0.0)

    server = Server(big_library, ServerConfig(root=big_library.root, send_timeout=600.0))
    clients: list[Client] = []
    async with trio.open_nursery() as nursery:
        for i in range(5):
            client_stream, server_stream = trio.testing.lockstep_stream_pair()
            nursery.start_soon(server.handle, server_stream, f"stuck{i}")
            client = Client(client_stream, timeout=30)
            await client.handshake()
            await client._send(ListRequest())
            assert await client._stream.receive_some(1)  # the reply is under way, stuck
            clients.append(client)
        await trio.testing.wait_all_tasks_blocked()
        assert replies.replies == 5
        for client in clients[:-1]:
            await client._stream.aclose()
        await trio.sleep(0.1)
        assert (calls, replies.replies) == ([], 1)  # one reply still runs: no trim
        await clients[-1]._stream.aclose()
        with trio.fail_after(5):
            await trimmed.wait()
        await trio.sleep(0.1)  # and no second one
    assert calls == [0]


def test_the_index_pool_has_a_hard_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers beyond ``MAX_CONNECTIONS`` wait for a connection to come back (and give
    up with ``busy`` after ``BORROW_TIMEOUT``) instead of opening one more."""
    monkeypatch.setattr(Index, "MAX_CONNECTIONS", 3)
    index = Index(tmp_path, tmp_path / "index.sqlite3")
    try:
        index.put(synthetic(i) for i in range(10))
        held = [index._borrow() for _ in range(3)]
        assert index.connections == 3
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(index.get("t00001.mp3")))
        waiter.start()
        waiter.join(timeout=0.5)  # it cannot finish: every connection is lent
        assert waiter.is_alive() and not got
        assert index.connections == 3
        index._give_back(held.pop())
        waiter.join(timeout=30)
        assert not waiter.is_alive()
        assert got and got[0] is not None
        assert index.connections <= 3

        monkeypatch.setattr(Index, "BORROW_TIMEOUT", 0.01)
        held.append(index._borrow())
        with pytest.raises(Busy):
            index._borrow()
        for conn in held:
            index._give_back(conn)
        assert index.connections <= Index.IDLE_CONNECTIONS
    finally:
        index.close()


# --------------------------------------------------------------------------- rescan spam


@dataclasses.dataclass
class Settings:
    """What the maintainer reads of the server's configuration."""

    rescan_interval: float = 0.0
    background_checksums: bool = False
    watch: bool = False
    watch_settle: float = 60.0


class SlowScans:
    """Stands in for ``Library.rescan``: counts scans, each taking ``seconds`` of trio's
    (mock) clock, so that what the maintainer does with time can be counted."""

    def __init__(self, library: Library, seconds: float) -> None:
        self.library = library
        self.seconds = seconds
        self.started: list[float] = []
        self.busy = 0.0
        #: set once the first scan is running
        self.running = trio.Event()

    def __call__(
        self,
        stop: threading.Event | None = None,
        *,
        settle: float = 0.0,
        on_folder: Callable[[str], object] | None = None,
    ) -> int:
        self.started.append(trio.from_thread.run_sync(trio.current_time))
        trio.from_thread.run_sync(self.running.set)
        trio.from_thread.run(trio.sleep, self.seconds)
        self.busy += self.seconds
        self.library.scanning = False  # as the real one says when it ends
        return 0


@pytest.fixture
def library(tmp_path: Path) -> Iterator[Library]:
    root = tmp_path / "lib"
    root.mkdir()
    library = Library(root, tmp_path / "index.sqlite3", workers=0)
    yield library
    library.close()


async def test_rescan_requests_during_a_scan_share_one_more_scan(
    library: Library, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    """50 clients asking for a rescan (waiting or not) while one runs cost one more scan
    in all, not one each; each waiting client is answered after a scan that started after
    its request. (A guard: this already held; the loop below is what the attack did.)"""
    scans = SlowScans(library, 10.0)
    monkeypatch.setattr(library, "rescan", scans)
    maintainer = Maintainer(library, Settings())
    answered: list[float] = []

    async def client(wait: bool) -> None:
        asked = trio.current_time()
        await maintainer.request_rescan(wait=wait)
        if wait:
            assert any(asked <= start for start in scans.started)
            answered.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await nursery.start(maintainer.run)
        await scans.running.wait()
        assert len(scans.started) == 1
        async with trio.open_nursery() as clients:
            for i in range(50):
                clients.start_soon(client, i % 2 == 0)
        assert len(answered) == 25
        await trio.sleep(1000)  # nothing else is asked for: nothing else runs
        nursery.cancel_scope.cancel()
    assert len(scans.started) == 2


async def test_a_client_asking_for_rescans_in_a_loop_keeps_the_scanner_mostly_idle(
    library: Library, monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    """One client looping ``rescan --wait`` used to run scans back to back (109 full
    scans in 20 s, one core at 100 %). Each is still answered by a scan that started
    after it, but after a scan of ``d`` seconds the next waits ``REST_FACTOR * d``: the
    scanner is busy at most ``1 / (1 + REST_FACTOR)`` of the time."""
    scans = SlowScans(library, 1.0)
    monkeypatch.setattr(library, "rescan", scans)
    maintainer = Maintainer(library, Settings())
    async with trio.open_nursery() as nursery:
        await nursery.start(maintainer.run)
        await maintainer.wait_for_first_scan()
        began = trio.current_time()
        busy_before = scans.busy
        for _ in range(20):
            await maintainer.request_rescan(wait=True)
        elapsed = trio.current_time() - began
        nursery.cancel_scope.cancel()
    assert len(scans.started) == 21  # one per request, none shared: they came one by one
    share = (scans.busy - busy_before) / elapsed
    assert share <= 1 / (1 + Maintainer.REST_FACTOR) + 0.01, f"scanning {share:.0%} of the time"


# --------------------------------------------------------------------------- files being copied


def test_a_scan_notes_files_still_changing_and_a_recheck_reads_them_again(
    library: Library,
) -> None:
    """The scan indexes a file modified less than ``settle`` seconds ago as it finds it
    and remembers it; a later look reads it again if it changed, and forgets it once
    it did not change between two looks."""
    song = library.root / "slow.mp3"
    song.write_bytes(b"\xff" * 1000)  # the first part of a copy
    (library.root / "old.mp3").write_bytes(b"\xff" * 10)
    hour_ago = time.time() - 3600
    os.utime(library.root / "old.mp3", (hour_ago, hour_ago))
    library.rescan(settle=60.0)
    first = library.index.get("slow.mp3")
    assert first is not None and first.size == 1000  # listed at once, as found
    assert library.unsettled
    with song.open("ab") as rest:  # the copy goes on after the scan
        rest.write(b"\xff" * 3000)
    library.recheck(settle=60.0)
    now = library.index.get("slow.mp3")
    assert now is not None and now.size == 4000
    assert library.unsettled  # it changed since the last look: look once more
    library.recheck(settle=60.0)
    assert not library.unsettled  # unchanged between two looks: settled


async def test_a_file_written_in_pieces_during_a_scan_ends_up_indexed_whole(
    library: Library,
) -> None:
    """A file copied slowly used to stay indexed at the size the scan saw until the next
    rescan. Written in pieces while the server scans (no watcher, no periodic rescans),
    it ends up indexed at its full size without anyone asking for a rescan."""
    song = library.root / "slow.mp3"
    song.write_bytes(b"\xff" * 1000)
    maintainer = Maintainer(library, Settings(watch_settle=1.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(maintainer.run)
        for _ in range(15):  # about 1.5 s of copying, the scan in the middle of it
            await trio.sleep(0.1)
            with song.open("ab") as rest:
                rest.write(b"\xff" * 1000)
        await maintainer.wait_for_first_scan()
        for _ in range(300):  # a bound on the wait, not a threshold: a look comes in ~1 s
            now = library.index.get("slow.mp3")
            if now is not None and now.size == 16000:
                break
            await trio.sleep(0.1)
        else:
            pytest.fail(f"still indexed at {now.size if now else None} bytes, not 16000")
        nursery.cancel_scope.cancel()
    assert maintainer.scans_done == 1  # no rescan did it


# --------------------------------------------------------------------------- huge pictures in tags

PICTURE = 24 * 1024 * 1024  # bytes of picture per file: far more than any tag read may cost
EXTS = ("mp3", "flac", "ogg", "opus", "m4a", "wav", "aiff")


def encode(out: Path, tags: dict[str, str]) -> Path:
    """One second of a sine wave, tagged, in the format of ``out``'s extension."""
    meta = [a for k, v in tags.items() for a in ("-metadata", f"{k}={v}")]
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", "sine=frequency=440:duration=1", *meta, str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def huge_picture(path: Path) -> None:
    """Add a PICTURE bytes cover to ``path`` the way each format carries one."""
    ext = path.suffix[1:]
    if ext == "mp3":
        id3 = ID3(path)
        id3.add(APIC(encoding=0, mime="image/png", type=3, desc="", data=bytes(PICTURE)))
        id3.save(path)
    elif ext == "flac":
        flac = FLAC(path)
        for _ in range(2):  # a FLAC block holds 16 MiB at most: two of them
            picture = Picture()
            picture.data = bytes(PICTURE // 2)
            flac.add_picture(picture)
        flac.save()
    elif ext in ("ogg", "opus"):
        ogg = OggOpus(path) if ext == "opus" else OggVorbis(path)
        picture = Picture()
        picture.data = bytes(PICTURE * 3 // 4)  # base64: 4/3 as long
        ogg["metadata_block_picture"] = [base64.b64encode(picture.write()).decode("ascii")]
        ogg.save()
    elif ext == "m4a":
        mp4 = MP4(path)
        mp4["covr"] = [MP4Cover(bytes(PICTURE))]
        mp4.save()
    else:  # an ID3 chunk in a WAV or AIFF file
        iff = WAVE(path) if ext == "wav" else AIFF(path)
        iff.add_tags()
        iff.tags.add(APIC(encoding=0, mime="image/png", type=3, desc="", data=bytes(PICTURE)))
        iff.save()


@pytest.fixture(scope="module")
def pictured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pictured")
    for ext in EXTS:
        huge_picture(encode(folder / f"song.{ext}", {"title": "Big Cover", "artist": "Someone"}))
    return folder


@pytest.mark.parametrize("ext", EXTS)
def test_a_huge_picture_in_a_tag_is_never_read(pictured: Path, ext: str) -> None:
    """A 200 MB picture in one tag took the server to 830 MB during a scan: mutagen read
    (and kept) it whole. Reading the tags of a file with a 24 MiB picture now allocates
    a small fraction of it, and the text tags and stream facts are still read (from
    the RIFF INFO / AIFF NAME chunks for WAV and AIFF, whose ID3 chunk is skipped)."""
    assert (pictured / f"song.{ext}").stat().st_size > PICTURE
    tracemalloc.start()
    try:
        info = read_track(pictured, f"song.{ext}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PICTURE // 8, f"reading the tags allocated {peak / 2**20:.1f} MiB"
    assert info.error is None
    artist = None if ext == "aiff" else "Someone"  # ffmpeg writes an artist into no AIFF chunk
    assert (info.title, info.artist) == ("Big Cover", artist)
    assert info.duration == pytest.approx(1.0, abs=0.1)


def test_tags_too_large_for_any_reader_fail_the_file_not_the_memory(tmp_path: Path) -> None:
    """What no bounded reader trims (here a WavPack file's APEv2 tag with a 24 MiB
    binary item) may not be read past MAX_READ bytes either: the file is listed with
    an error, still a track, and reading it allocated a small fraction of the tag."""
    song = encode(tmp_path / "song.wv", {"title": "Big Cover"})
    ape = APEv2()
    ape["Title"] = "Big Cover"
    ape["Cover Art (Front)"] = APEValue(b"cover.png\0" + bytes(PICTURE), BINARY)
    ape.save(song)
    tracemalloc.start()
    try:
        info = read_track(tmp_path, "song.wv")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PICTURE // 8, f"reading the tags allocated {peak / 2**20:.1f} MiB"
    assert info.error is not None and "MiB read" in info.error
    assert (info.title, info.size) == ("song", song.stat().st_size)
