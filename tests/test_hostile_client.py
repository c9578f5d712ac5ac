"""A malicious or broken server must not hurt the user (issue 12, items 12-19).

Most tests run a scripted fake server on 127.0.0.1, written with trio and the
protocol's own :class:`~musiclib.protocol.Connection` in the server role (raw
frames where it must break the rules), and drive the real CLI against it in a
subprocess: the file system, the exit status and the terminal are what is
checked. Timeouts are tested in zero wall time over memory streams with trio's
autojump clock. The rest run the real CLI against the real server over the
shipped library (decoded raw output, players, full disks, clobbering).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from musiclib import client as client_module
from musiclib.client import MAX_LIST_TRACKS, Client, open_client
from musiclib.errors import RemoteProtocolError, Timeout
from musiclib.fetch import MAX_NAME_BYTES, safe_name
from musiclib.protocol import (
    HEADER,
    KIND_DATA,
    Closed,
    Connection,
    Error,
    Event,
    Hello,
    InfoReply,
    InfoRequest,
    ListEnd,
    ListRequest,
    Message,
    NeedData,
    Role,
    StreamEnd,
    StreamRequest,
    StreamStart,
    TrackInfo,
    TrackPage,
    Welcome,
    encode_message,
)

REPO = Path(__file__).resolve().parent.parent
#: seconds any one CLI run may take before the test fails
CLI_TIMEOUT = 60
#: a small original "file" the fake server serves, and its digest
PAYLOAD = bytes(range(256)) * 40
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
#: what a terminal must never receive raw
ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x9b31m\u202e"


def env() -> dict[str, str]:
    """Our environment minus MUSICLIB_* settings."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("MUSICLIB_")}
    out["PYTHONUNBUFFERED"] = "1"
    return out


async def run_cli(*args: str, cwd: Path) -> tuple[int, bytes, str]:
    """The real CLI in a subprocess: exit status, standard output, standard error."""
    with trio.fail_after(CLI_TIMEOUT):
        done = await trio.run_process(
            [sys.executable, "-m", "musiclib", *args],
            cwd=cwd,
            env=env(),
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, done.stdout, done.stderr.decode("utf-8", "replace")


def one_line(stderr: str) -> str:
    """The single ``musiclib:`` line a failure prints (no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("musiclib: "), stderr
    return lines[0]


# ---- the fake server ------------------------------------------------------------------------


class Peer:
    """The server side of one connection, speaking through the protocol object."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = Connection(Role.SERVER)
        #: bytes of data payload sent in this connection
        self.sent = 0

    async def receive(self) -> Event:
        while True:
            event = self.conn.next_event()
            if not isinstance(event, NeedData):
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def send(self, *messages: Message) -> None:
        await self.stream.send_all(b"".join(self.conn.send(m) for m in messages))

    async def data(self, payload: bytes) -> None:
        await self.stream.send_all(self.conn.send_data_header(len(payload)) + payload)
        self.sent += len(payload)


Script = Callable[[Peer, Message], Awaitable[None]]


def track(path: str = "Artist/Album/01 - Song.flac", **fields: Any) -> TrackInfo:
    values: dict[str, Any] = {"title": "Song", "format": "flac", "size": len(PAYLOAD)}
    values.update(fields)
    return TrackInfo(path=path, **values)


def answering(found: TrackInfo, stream_path: str | None = None, **start_fields: Any) -> Script:
    """A script answering ``info`` with ``found`` and an original ``stream`` with PAYLOAD."""

    async def script(peer: Peer, request: Message) -> None:
        if isinstance(request, InfoRequest):
            await peer.send(InfoReply(track=found))
        elif isinstance(request, StreamRequest):
            fields: dict[str, Any] = {
                "path": found.path if stream_path is None else stream_path,
                "size": len(PAYLOAD),
                "version": "1",
                "offset": min(request.offset, len(PAYLOAD)),
                "length": len(PAYLOAD) - min(request.offset, len(PAYLOAD)),
                "sha256": PAYLOAD_SHA,
            }
            fields.update(start_fields)
            await peer.send(StreamStart(**fields))
            if fields["offset"] < len(PAYLOAD):
                await peer.data(PAYLOAD[fields["offset"] :])
            await peer.send(StreamEnd(sent=peer.sent, sha256=PAYLOAD_SHA))
        else:
            raise AssertionError(f"unexpected {request}")

    return script


#: the welcome of a server older than paging (no ``versions``): ``ls`` holds its list whole
OLD_WELCOME = Welcome(version=1, server="fake/1")
#: the welcome of a server that pages: ``ls --json`` writes its list as it comes
PAGING_WELCOME = Welcome(version=1, server="fake/2", versions=(1, 2))


@asynccontextmanager
async def fake_server(script: Script, welcome: Welcome = OLD_WELCOME) -> AsyncIterator[str]:
    """A server on 127.0.0.1 that welcomes every client (with ``welcome``) and hands
    each request to ``script``; its address. A client going away ends its connection
    quietly."""

    async def handle(stream: trio.SocketStream) -> None:
        peer = Peer(stream)
        try:
            hello = await peer.receive()
            assert isinstance(hello, Hello), hello
            await peer.send(welcome)
            while True:
                request = await peer.receive()
                if isinstance(request, Closed):
                    return
                assert isinstance(request, Message)
                await script(peer, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError):
            pass  # the client left (mid-frame, too): that is what several tests want
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        yield f"127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (symbolic links as ``-> target``) and its content."""
    out: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = b"-> " + os.readlink(path).encode()
        elif path.is_file():
            out[rel] = path.read_bytes()
    return out


# ---- 12: the server does not choose where a file goes ---------------------------------------


@pytest.mark.parametrize(
    "name",
    ["Bad.flac", "AB.flac", "a" * 250 + ".flac", "_name.flac", "Lo_.flac", "Song.flac"],
)
def test_safe_name_keeps_what_is_harmless(name):
    assert safe_name(name) == (name if len(name) < 200 else "a" * 195 + ".flac")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("x/.bashrc", "bashrc"),
        (".", None),
        ("", None),
        ("a/..", None),
        ("..", None),
        ("a/", None),
        ("evil\x00name.flac", "evil_name.flac"),
        ("..\\..\\x.flac", "x.flac"),
        ("\x1b]0;pwn\x07.flac", "_]0;pwn_.flac"),
        ("é" * 150 + ".opus", "é" * 97 + ".opus"),
        (" . .hidden", "hidden"),
    ],
)
def test_safe_name_drops_what_could_hurt(path, expected):
    name = safe_name(path)
    assert name == expected
    if name is not None:
        assert len(name.encode()) <= MAX_NAME_BYTES and name.isprintable()


@pytest.mark.parametrize(
    "server_path",
    [
        "x/.bashrc",
        ".",
        "",
        "a/..",
        "../../outside.flac",
        "evil\x00name.flac",
        "sub\\..\\..\\win.flac",
        "\x1b[2Jtitle\x07.flac",
        "n" * 1000 + ".flac",
        "/etc/passwd",
    ],
)
async def test_a_server_chosen_name_stays_in_the_folder_and_in_sight(tmp_path, server_path):
    """get --save writes one new, visible, harmless name inside the current folder and
    touches nothing else (before: ./.bashrc overwritten, a .part in the parent, a
    traceback for a NUL)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / ".bashrc").write_text("mine\n")
    (tmp_path / "outside.flac").write_text("mine\n")
    before = files_under(tmp_path)
    async with fake_server(answering(track(server_path))) as address:
        status, _, err = await run_cli("get", "Song", "--save", "--server", address, cwd=work)
    assert status == 0, err
    after = files_under(tmp_path)
    new = {k: v for k, v in after.items() if k not in before}
    assert {k: v for k, v in after.items() if k in before} == before
    assert len(new) == 1, new
    ((rel, content),) = new.items()
    assert content == PAYLOAD
    folder, _, name = rel.rpartition("/")
    assert folder == "work"
    assert not name.startswith(".") and name.isprintable()
    assert len(name.encode()) <= MAX_NAME_BYTES
    assert "\x1b" not in err and "\x07" not in err


# ---- 13: nothing is replaced unless asked -----------------------------------------------------


async def test_existing_files_are_kept_unless_forced(tmp_path):
    """-o over a file, --save twice: refused with a hint (exit 7); --force replaces."""
    (tmp_path / "existing.flac").write_bytes(b"precious")
    async with fake_server(answering(track("A/Song.flac"))) as address:
        status, _, err = await run_cli(
            "get", "Song", "-o", "existing.flac", "--server", address, cwd=tmp_path
        )
        assert status == 7 and "use --force to replace it" in one_line(err)
        assert (tmp_path / "existing.flac").read_bytes() == b"precious"
        status, _, err = await run_cli("get", "Song", "--save", "--server", address, cwd=tmp_path)
        assert status == 0, err
        status, _, err = await run_cli("get", "Song", "--save", "--server", address, cwd=tmp_path)
        assert status == 7 and "Song.flac already exists" in one_line(err)
        status, _, err = await run_cli(
            "get", "Song", "-o", "existing.flac", "--force", "--server", address, cwd=tmp_path
        )
        assert status == 0, err
    assert (tmp_path / "existing.flac").read_bytes() == PAYLOAD
    assert sorted(os.listdir(tmp_path)) == ["Song.flac", "existing.flac"]


async def test_a_trailing_slash_means_a_folder(tmp_path):
    """-o dir/ saves inside dir (before: a file named dir); a missing dir/ is an error
    (nothing is created), and so is a file where a folder is named."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "plain").write_bytes(b"x")
    async with fake_server(answering(track("A/Song.flac"))) as address:
        status, _, err = await run_cli(
            "get", "Song", "-o", "dir/", "--server", address, cwd=tmp_path
        )
        assert status == 0, err
        assert (tmp_path / "dir" / "Song.flac").read_bytes() == PAYLOAD
        status, _, err = await run_cli(
            "get", "Song", "-o", "missing/", "--server", address, cwd=tmp_path
        )
        assert status == 7 and "the folder does not exist" in one_line(err)
        status, _, err = await run_cli(
            "get", "Song", "-o", "plain/", "--server", address, cwd=tmp_path
        )
        assert status == 7, err
    assert sorted(os.listdir(tmp_path)) == ["dir", "plain"]
    assert (tmp_path / "plain").read_bytes() == b"x"


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
async def test_a_planted_part_file_is_never_written_through(tmp_path, kind):
    """A symbolic or hard link planted as X.part is refused; its target is untouched."""
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    work = tmp_path / "work"
    work.mkdir()
    part = work / "Song.flac.part"
    if kind == "symlink":
        part.symlink_to(target)
    else:
        os.link(target, part)
    async with fake_server(answering(track("A/Song.flac"))) as address:
        status, _, err = await run_cli("get", "Song", "--save", "--server", address, cwd=work)
    assert status == 7 and "Song.flac.part" in one_line(err)
    assert target.read_bytes() == b"precious"
    assert not (work / "Song.flac").exists()


async def test_force_replaces_a_symlink_itself_not_its_target(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    work = tmp_path / "work"
    work.mkdir()
    (work / "Song.flac").symlink_to(target)
    async with fake_server(answering(track("A/Song.flac"))) as address:
        status, _, err = await run_cli("get", "Song", "--save", "--server", address, cwd=work)
        assert status == 7, err
        status, _, err = await run_cli(
            "get", "Song", "--save", "--force", "--server", address, cwd=work
        )
    assert status == 0, err
    assert target.read_bytes() == b"precious"
    assert not (work / "Song.flac").is_symlink()
    assert (work / "Song.flac").read_bytes() == PAYLOAD


async def test_a_part_file_is_still_resumed(tmp_path):
    """Resuming a .part is not clobbering: it goes on from where it stopped."""
    (tmp_path / "Song.flac.part").write_bytes(PAYLOAD[:1000])
    async with fake_server(answering(track("A/Song.flac"))) as address:
        status, _, err = await run_cli("get", "Song", "--save", "--server", address, cwd=tmp_path)
    assert status == 0, err
    assert "resumed at byte 1000" in err
    assert os.listdir(tmp_path) == ["Song.flac"]
    assert (tmp_path / "Song.flac").read_bytes() == PAYLOAD


# ---- 14: what a reply may hold, and how long a wait may last --------------------------------


def endless_list(pages: int, per_page: int, title: str = "t") -> Script:
    """Answers ``list`` with ``pages`` pages (more than a client should take)."""

    async def script(peer: Peer, request: Message) -> None:
        assert isinstance(request, ListRequest)
        n = 0
        for _ in range(pages):
            tracks = tuple(
                TrackInfo(path=f"t{n + i}.flac", title=title, format="flac", size=1)
                for i in range(per_page)
            )
            n += per_page
            await peer.send(TrackPage(tracks=tracks))
        await peer.send(ListEnd(count=n, total=n))

    return script


async def test_a_list_reply_holds_a_bounded_number_of_tracks(tmp_path):
    """Before: ls took every track a server sent (1 GB in 17 s for an endless reply)."""
    per_page = 2000
    pages = MAX_LIST_TRACKS // per_page + 1
    async with fake_server(endless_list(pages, per_page)) as address:
        status, out, err = await run_cli("ls", "--json", "--server", address, cwd=tmp_path)
    assert status == 3, err[-500:]
    assert f"exceeds {MAX_LIST_TRACKS} tracks" in one_line(err)
    assert out == b""


async def test_a_streamed_list_reply_is_bounded_too(tmp_path):
    """``ls --json`` from a server that pages writes each page as it comes, so what
    passes through is not held; one reply is still cut past MAX_LIST_TRACKS, the
    output then an array with no end (no JSON reader takes it for a whole one)."""
    per_page = 2000
    pages = MAX_LIST_TRACKS // per_page + 1
    async with fake_server(endless_list(pages, per_page), PAGING_WELCOME) as address:
        status, out, err = await run_cli("ls", "--json", "--server", address, cwd=tmp_path)
    assert status == 3, err[-500:]
    assert f"exceeds {MAX_LIST_TRACKS} tracks" in one_line(err)
    assert out.startswith(b'[\n  {"path": "t0.flac"') and not out.rstrip().endswith(b"]")
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def paging_list(total: int, per_reply_cap: int, asked: list[ListRequest]) -> Script:
    """Answers each ``list`` (kept in ``asked``) with the tracks from its ``offset``, at
    most its ``limit`` and ``per_reply_cap``, of a library of ``total`` (and says so)."""

    async def script(peer: Peer, request: Message) -> None:
        assert isinstance(request, ListRequest) and request.limit is not None
        asked.append(request)
        end = min(total, request.offset + request.limit, request.offset + per_reply_cap)
        tracks = tuple(
            TrackInfo(path=f"t{i:04d}.flac", title="t", format="flac", size=1)
            for i in range(request.offset, end)
        )
        await peer.send(TrackPage(tracks=tracks), ListEnd(count=len(tracks), total=total))

    return script


@pytest.mark.parametrize(
    "total, cap, listed, offsets",
    [
        (35, 10, 35, [0, 10, 20, 30]),  # whole, in replies of the client's cap
        (30, 10, 30, [0, 10, 20]),  # the stated total reached: no empty last reply
        (35, 7, 7, [0]),  # a short reply ends the listing (nothing more matches)
        (0, 10, 0, [0]),
    ],
)
async def test_a_streamed_listing_asks_again_only_after_a_full_reply(
    monkeypatch, total, cap, listed, offsets
):
    """The listing asks again from where a reply ended only while the replies are
    full and the stated total is not reached: a server cannot make it ask forever
    with short replies, and one that pages is listed whole, in order."""
    monkeypatch.setattr(client_module, "MAX_LIST_TRACKS", 10)
    asked: list[ListRequest] = []
    async with (
        fake_server(paging_list(total, cap, asked), PAGING_WELCOME) as address,
        open_client(address, timeout=10) as client,
        client.list_pages() as pages,
    ):
        paths = [t.path async for page in pages for t in page]
    assert paths == [f"t{i:04d}.flac" for i in range(listed)]
    assert pages.end is not None and (pages.end.count, pages.end.total) == (listed, total)
    assert [(r.offset, r.limit) for r in asked] == [(o, 10) for o in offsets]


async def test_a_list_reply_holds_a_bounded_number_of_bytes(monkeypatch):
    monkeypatch.setattr(client_module, "MAX_LIST_BYTES", 2 * 1024 * 1024)
    async with (
        fake_server(endless_list(200, 1, title="x" * 60_000)) as address,
        open_client(address, timeout=10) as client,
    ):
        with pytest.raises(RemoteProtocolError, match="exceeds"):
            await client.list()


async def test_a_list_reply_may_not_overrun_its_limit(tmp_path):
    async with fake_server(endless_list(3, 10)) as address:
        status, _, err = await run_cli("ls", "--limit", "5", "--server", address, cwd=tmp_path)
    assert status == 3 and "30 tracks sent for a limit of 5" in one_line(err)


def endless_stream(start: StreamStart, found: TrackInfo, chunks: int = 2000) -> Script:
    """Answers ``stream`` with ``start`` and then far more data than it may carry."""

    async def script(peer: Peer, request: Message) -> None:
        if isinstance(request, InfoRequest):
            await peer.send(InfoReply(track=found))
            return
        assert isinstance(request, StreamRequest)
        await peer.send(start)
        for _ in range(chunks):
            await peer.data(b"\x01\x02" * 2048)

    return script


def overlong_stream(size: int, chunks: int = 2000) -> Script:
    """Answers ``stream`` with a start announcing ``size`` bytes, then raw data frames
    far past it (the protocol object would not let the fake send them)."""

    async def script(peer: Peer, request: Message) -> None:
        if isinstance(request, InfoRequest):
            await peer.send(InfoReply(track=track("A/Song.flac", size=size)))
            return
        await peer.send(StreamStart(path="A/Song.flac", size=size, version="1", length=size))
        for _ in range(chunks):
            await peer.stream.send_all(HEADER.pack(KIND_DATA, 4096) + b"\x01" * 4096)

    return script


async def test_an_original_stream_is_cut_at_the_announced_size(tmp_path):
    """A length of 1000 bytes, then megabytes: the client writes at most 1000 and stops
    with a protocol error (the disk does not fill)."""
    async with fake_server(overlong_stream(1000)) as address:
        status, _, err = await run_cli(
            "get", "Song", "--save", "--retries", "0", "--server", address, cwd=tmp_path
        )
        assert status == 3 and "exceed" in one_line(err)
        status, out, err = await run_cli(
            "get", "Song", "--retries", "0", "--server", address, cwd=tmp_path
        )
        assert status == 3 and len(out) <= 1000, err
    assert not (tmp_path / "Song.flac").exists()
    part = tmp_path / "Song.flac.part"
    assert not part.exists() or part.stat().st_size <= 1000


async def test_a_wrong_checksum_fails_to_standard_output_and_to_a_file(tmp_path):
    """The digest is computed off the event loop (issue 15); it is still compared before
    exit 0: standard output exits 5, a file is never renamed into place."""
    wrong = "0" * 64
    async with fake_server(answering(track(), sha256=wrong)) as address:
        status, out, err = await run_cli(
            "get", "Song", "--retries", "0", "--server", address, cwd=tmp_path
        )
        assert status == 5 and "sha256" in one_line(err), err
        assert out == PAYLOAD  # passed on as it came, then found wrong
        status, _, err = await run_cli(
            "get", "Song", "-o", "out.flac", "--retries", "0", "--server", address, cwd=tmp_path
        )
        assert status == 5 and "sha256" in one_line(err), err
    assert os.listdir(tmp_path) == []


DECODED = {"mode": "decoded", "sample_format": "s16le", "sample_rate": 8000, "channels": 1}


@pytest.mark.parametrize(
    ("args", "seconds"),
    [(["--duration", "1"], 1.0), ([], 2.0)],
    ids=["asked-duration", "indexed-duration"],
)
async def test_a_decoded_stream_is_bounded_by_its_duration(tmp_path, args, seconds):
    """1 s asked (or a 2 s track): an endless decoded stream is cut near there, saved or
    piped (before: it ran until the server stopped)."""
    start = StreamStart(path="A/Song.flac", size=1000, version="1", **DECODED)
    found = track("A/Song.flac", duration=2.0)
    async with fake_server(endless_stream(start, found)) as address:
        status, _, err = await run_cli(
            "get", "Song", "--decode", "--save", *args, "--server", address, cwd=tmp_path
        )
        assert status == 3 and "the most it may carry" in one_line(err)
        status, out, err = await run_cli(
            "get", "Song", "--decode", "--format", "s16le", *args, "--server", address, cwd=tmp_path
        )
        assert status == 3, err
    bound = (seconds + 1) * 8000 * 2 if args else (seconds + 30) * 8000 * 2
    assert 0 < len(out) <= bound
    assert os.listdir(tmp_path) == []


async def test_a_decoded_stream_must_be_what_was_asked_for(tmp_path):
    """Asked for samples, given original bytes (before: an AssertionError, exit 1)."""
    found = track("A/Song.flac")
    start = StreamStart(path="A/Song.flac", size=10, version="1", length=10)
    async with fake_server(endless_stream(start, found, chunks=0)) as address:
        status, _, err = await run_cli(
            "get", "Song", "--decode", "--save", "--retries", "0", "--server", address, cwd=tmp_path
        )
    assert status == 3 and "asked for a decoded stream, got original" in one_line(err)


async def dribble(stream: trio.abc.Stream, frame: bytes, every: float, sent: list[int]) -> None:
    """Send ``frame`` a byte at a time, one every ``every`` s, counting them in ``sent``."""
    try:
        for i in range(len(frame)):
            await stream.send_all(frame[i : i + 1])
            sent.append(i)
            await trio.sleep(every)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@pytest.mark.parametrize("phase", ["handshake", "list"])
async def test_the_timeout_bounds_a_whole_message_not_each_byte(autojump_clock, phase):
    """A welcome or a list page dribbled a byte every 1.5 s: the wait ends after the
    timeout (2 s) whatever trickles in (before: the client waited for the whole message)."""
    client_side, server_side = trio.testing.memory_stream_pair()
    client = Client(client_side, timeout=2)
    welcome = encode_message(Welcome(version=1, server="fake/1"))
    page = encode_message(TrackPage(tracks=(track("x" * 40),)))
    dribbled = welcome if phase == "handshake" else page
    sent: list[int] = []

    async def serve() -> None:
        await server_side.receive_some(65536)  # the hello
        if phase == "list":
            await server_side.send_all(welcome)
            await server_side.receive_some(65536)  # the list request
        await dribble(server_side, dribbled, 1.5, sent)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        began = trio.current_time()
        expected = "answer to hello within 2 s" if phase == "handshake" else "message for 2 s"
        with pytest.raises(Timeout, match=f"no complete {expected}"):
            await client.handshake()
            await client.list()
        waited = trio.current_time() - began
        await client.aclose()
    assert 0 < len(sent) < len(dribbled)
    assert waited < 5  # virtual time: the autojump clock makes this exact, not flaky


async def test_ls_timeout_against_a_dribbling_server(tmp_path):
    """The same through the real CLI: ls --timeout 1 gives up with exit 3 long before a
    dribbled page (one byte every 0.3 s) could be complete."""
    page = encode_message(TrackPage(tracks=(track("y" * 40),)))
    progress: list[int] = []

    async def script(peer: Peer, request: Message) -> None:
        await dribble(peer.stream, page, 0.3, progress)

    async with fake_server(script) as address:
        status, out, err = await run_cli("ls", "--timeout", "1", "--server", address, cwd=tmp_path)
    assert status == 3 and "no complete message for 1 s" in one_line(err)
    assert 0 < len(progress) < len(page)
    assert out == b""


# ---- 15: nothing from the server reaches the terminal raw -----------------------------------


def lying_list(title: str) -> Script:
    async def script(peer: Peer, request: Message) -> None:
        if isinstance(request, ListRequest):
            tracks = (
                track("A/" + title + ".flac", title=title, artist=title, duration=float("inf")),
                track("B/ok.flac", title="ok", duration=float("nan")),
            )
            await peer.send(TrackPage(tracks=tracks), ListEnd(count=2, total=2))
        elif isinstance(request, InfoRequest):
            await peer.send(InfoReply(track=track("A/x.flac", title=title, album=title)))
        else:
            await peer.send(Error(code="not_found", message=title * 40_000))

    return script


async def test_escapes_from_the_server_are_shown_not_obeyed(tmp_path):
    """Titles, artists, paths and error messages carrying ESC/OSC/CSI/bidi characters are
    escaped on the terminal and exact in --json; a 1 MB message is cut to one short line."""
    async with fake_server(lying_list(ESCAPES)) as address:
        results = {
            args: await run_cli(*args, "--server", address, cwd=tmp_path)
            for args in (
                ("ls",),
                ("ls", "--long"),
                ("info", "x"),
                ("ls", "--json"),
                ("get", "x", "--retries", "0"),
            )
        }
    for args, (status, out, err) in results.items():
        text = out.decode() + err
        if args[0] == "get":
            assert status == 4
            line = one_line(err)
            assert len(line) <= 320 and line.endswith("…")
        else:
            assert status == 0, (args, err)
        if args != ("ls", "--json"):
            for c in ESCAPES:
                if not c.isprintable():
                    assert c not in text, (args, text[:300])
            assert "\\x1b[2J" in text
    listed = json.loads(results[("ls", "--json")][1])
    assert listed[0]["title"] == ESCAPES and listed[0]["duration"] == float("inf")


async def test_log_lines_are_escaped_too(tmp_path):
    """The 'saved ...' line names the path the server announced: escaped."""
    script = answering(track("A/Song.flac"), stream_path="A/" + ESCAPES + ".flac")
    async with fake_server(script) as address:
        status, _, err = await run_cli("get", "Song", "--save", "--server", address, cwd=tmp_path)
    assert status == 0, err
    assert "saved A/\\x1b[2J" in err and "\x1b" not in err
    assert os.listdir(tmp_path) == ["Song.flac"]


# ---- 19: the wrong server ---------------------------------------------------------------------


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n\x1b[2J" * 100])
async def test_a_server_that_is_not_musiclib(tmp_path, reply):
    """A silent server times out (exit 3), an HTTP one is a protocol error (exit 3): one
    line each, escaped."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await stream.receive_some(65536)
            if reply:
                await stream.send_all(reply)
            await trio.sleep(30)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        status, _, err = await run_cli("ls", "--timeout", "1", "--server", address, cwd=tmp_path)
        nursery.cancel_scope.cancel()
    line = one_line(err)
    assert status == 3 and "\x1b" not in line and len(line) <= 320


# ---- with the real server: 16 raw output, 17 players, 18 full disks ---------------------------


def get_to_file(
    address: str, out: Path, *args: str, **popen: Any
) -> subprocess.CompletedProcess[str]:
    """``musiclib get`` with standard output going to the regular file ``out``."""
    with out.open("wb") as f:
        return subprocess.run(
            [sys.executable, "-m", "musiclib", "get", *args, "--server", address],
            cwd=out.parent,
            env=env(),
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.PIPE,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
            **popen,
        )


@pytest.mark.parametrize(("fmt", "width"), [("s16le", 2), ("f32le", 4)])
def test_raw_samples_to_a_file_are_not_patched_like_a_wav(server, tmp_path, fmt, width):
    """README's own `get Brume --decode --format s16le ... > brume.raw` (before: a
    traceback and exit 1, the client patching a WAV header into raw samples)."""
    raw = get_to_file(
        server.address,
        tmp_path / "brume.raw",
        "Brume",
        "--decode",
        "--format",
        fmt,
        "--rate",
        "16000",
        "--channels",
        "1",
    )
    assert raw.returncode == 0, raw.stderr
    wav = get_to_file(
        server.address,
        tmp_path / "brume.wav",
        "Brume",
        "--decode",
        "--sample-format",
        fmt,
        "--rate",
        "16000",
        "--channels",
        "1",
    )
    assert wav.returncode == 0, wav.stderr
    samples = (tmp_path / "brume.raw").read_bytes()
    whole = (tmp_path / "brume.wav").read_bytes()
    assert len(samples) % width == 0 and len(samples) > 16000 * width
    assert whole.endswith(samples) and whole.startswith(b"RIFF")


def play(address: str, cwd: Path, player: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "musiclib",
            "play",
            "Brume",
            "--player",
            player,
            *args,
            "--server",
            address,
        ],
        cwd=cwd,
        env=env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize(
    ("player", "args", "status"),
    [
        ("sh -c 'head -c 1000 >/dev/null; exit 3'", (), 6),
        ("false", (), 6),
        ("sh -c 'cat >/dev/null; exit 2'", (), 6),
        ("sh -c 'head -c 1000 >/dev/null; exit 3'", ("--decode",), 6),
        ("false", ("--save",), 6),
        ("sh -c 'head -c 1000 >/dev/null'", (), 0),
        ("sh -c 'cat >/dev/null'", ("--save",), 0),
    ],
    ids=[
        "quits-early-3",
        "false",
        "fails-at-end",
        "decoded-quits-3",
        "false-saving",
        "user-quit-0",
        "reads-all-saving",
    ],
)
def test_a_failing_player_is_exit_6_every_time(server, tmp_path, player, args, status):
    """Before: a player that failed after reading part of a long track, or `false`,
    gave exit 0. A player that exits 0 early (the user quit it) is exit 0."""
    done = play(server.address, tmp_path, player, *args)
    assert done.returncode == status, done.stderr
    if status:
        assert "musiclib: " in done.stderr and "Traceback" not in done.stderr
    if "--save" in args:
        assert os.listdir(tmp_path) == ["01 - Brume.flac"]  # the save itself succeeded


def _small_files() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit is EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


@pytest.mark.parametrize(
    "args",
    [
        ("--decode", "-o", "x.wav"),
        ("-o", "x.flac"),
        ("--decode",),
        ("--decode", "--format", "f32le"),
    ],
)
def test_a_full_disk_is_an_output_error(server, tmp_path, args):
    """A file size limit (EFBIG) while saving or writing standard output: exit 7, one
    line (before: exit 1, "a bug", for a decoded save)."""
    done = get_to_file(server.address, tmp_path / "stdout", "Brume", *args, preexec_fn=_small_files)
    assert done.returncode == 7, done.stderr
    assert "too large" in one_line(done.stderr)
    assert not (tmp_path / "x.wav").exists() and not (tmp_path / "x.wav.part").exists()


def test_standard_output_on_a_full_device_is_an_output_error(server):
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "musiclib",
                "get",
                "Brume",
                "--decode",
                "--server",
                server.address,
            ],
            env=env(),
            stdin=subprocess.DEVNULL,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
    assert done.returncode == 7 and "the disk is full" in one_line(done.stderr)


def test_a_shorter_clip_does_not_replace_a_full_decode(server, tmp_path):
    """--decode --save over a full WAV with a 2-second clip: refused (before: replaced)."""
    first = get_to_file(server.address, tmp_path / "out1", "Brume", "--decode", "--save")
    assert first.returncode == 0, first.stderr
    saved = tmp_path / "01 - Brume.wav"
    full = saved.read_bytes()
    clip = get_to_file(
        server.address, tmp_path / "out2", "Brume", "--decode", "--save", "--duration", "2"
    )
    assert clip.returncode == 7 and "--force" in one_line(clip.stderr)
    assert saved.read_bytes() == full
    forced = get_to_file(
        server.address,
        tmp_path / "out3",
        "Brume",
        "--decode",
        "--save",
        "--duration",
        "2",
        "--force",
    )
    assert forced.returncode == 0, forced.stderr
    assert len(saved.read_bytes()) < len(full)


def test_progress_labels_and_channel_names_are_escaped():
    """A title drawn in the progress bar, and a channel's name and source in ``channels``:
    no clear-screen sequence, no rich markup obeyed (before: both reached the terminal)."""
    import io

    from musiclib.protocol import ChannelInfo
    from musiclib.ui import ProgressBar, format_channels

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    with ProgressBar("\x1b[2J[blink]Title", stream=screen) as bar:
        bar.begin(100)
        bar.advance(50)
    drawn = screen.getvalue()
    assert "\x1b[2J" not in drawn and "\\x1b[2J[blink]Title" in drawn
    channel = ChannelInfo(
        name="ch\x1b[2J",
        source="mic\x07",
        sample_format="s16le",
        sample_rate=16000,
        channels=1,
        state="live",
    )
    table = format_channels([channel])
    assert "\x1b" not in table and "\x07" not in table and "ch\\x1b[2J" in table
