"""The CLI in-process: exit codes and one-line errors, formatting, players, addresses.

Commands run through ``main([...])`` (the real entry point, which turns errors
into one line and an exit code) or ``app.run_async([...])`` inside a trio test
when a real server is needed; that server runs in the same trio run on
127.0.0.1 with port 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from musiclib import __version__, library_requests
from musiclib import client as client_module
from musiclib.cli import app, format_duration, format_table, main
from musiclib.client import open_client, parse_address
from musiclib.errors import Ambiguous, NotFound, PlayerNotFound, RemoteProtocolError, UsageError
from musiclib.index import Index, ListQuery, row_of
from musiclib.library import Library
from musiclib.player import STDIN_ARGS, player_command
from musiclib.protocol import (
    Connection,
    Error,
    Hello,
    InfoRequest,
    ListEnd,
    ListRequest,
    NeedData,
    Role,
    TrackInfo,
    Welcome,
)
from musiclib.server import Server, ServerConfig, serve
from musiclib.ui import JsonArrayWriter, format_size, json_array, select, track_dict

REPO = Path(__file__).resolve().parent.parent
LIBRARY = REPO / "library"
MEDIA = {".wav", ".mp3", ".ogg", ".opus", ".flac", ".m4a", ".aac", ".aif", ".aiff", ".wv"}


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_main(argv: list[str]) -> int:
    """``main(argv)``; the exit status it ends with (main always ends in SystemExit)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    code = exited.value.code
    return 0 if code is None else int(code)


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("musiclib: "), stderr
    return lines[0]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No MUSICLIB_* settings from outside; root logging restored after ``main`` set it up."""
    for name in ("MUSICLIB_SERVER", "MUSICLIB_PLAYER", "MUSICLIB_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


# ---------------------------------------------------------------------------- main: errors


def test_unreachable_server_exits_3_with_one_line(capsys):
    address = f"127.0.0.1:{free_port()}"
    assert run_main(["get", "x", "--server", address]) == 3
    captured = capsys.readouterr()
    assert address in one_line(captured.err)
    assert captured.out == ""


def test_server_from_environment(capsys, monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("MUSICLIB_SERVER", address)
    assert run_main(["ls"]) == 3
    assert address in one_line(capsys.readouterr().err)


def test_unknown_option_exits_2(capsys):
    assert run_main(["ls", "--bogus"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_bad_server_address_is_a_usage_error(capsys):
    assert run_main(["ls", "--server", "localhost:notaport"]) == 2
    assert "localhost:notaport" in one_line(capsys.readouterr().err)


def test_unparsable_player_is_a_usage_error(capsys):
    address = f"127.0.0.1:{free_port()}"
    assert run_main(["play", "x", "--player", "mpv 'unbalanced", "--server", address]) == 2
    assert "player" in one_line(capsys.readouterr().err)


def test_missing_player_exits_6(capsys):
    address = f"127.0.0.1:{free_port()}"
    argv = ["play", "x", "--player", "definitely-not-a-player-xyz", "--server", address]
    assert run_main(argv) == 6
    assert "definitely-not-a-player-xyz" in one_line(capsys.readouterr().err)


def test_get_refuses_to_write_audio_to_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    address = f"127.0.0.1:{free_port()}"  # never contacted: the check comes first
    assert run_main(["get", "x", "--server", address]) == 2
    assert "terminal" in one_line(capsys.readouterr().err)


def test_serve_refuses_a_root_that_is_not_a_folder(capsys, tmp_path):
    assert run_main(["serve", "--root", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "not a folder" in one_line(capsys.readouterr().err)


def test_version(capsys):
    assert run_main(["--version"]) == 0
    from musiclib import __version__

    assert capsys.readouterr().out.strip() == __version__


# ---------------------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, ""),
        (0, "0:00"),
        (0.4, "0:00"),
        (9, "0:09"),
        (59.6, "1:00"),
        (61, "1:01"),
        (599.4, "9:59"),
        (3599.4, "59:59"),
        (3600, "1:00:00"),
        (3725, "1:02:05"),
        (36000 + 61, "10:01:01"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def _track(path: str, title: str, **kw: object) -> TrackInfo:
    return TrackInfo(path=path, title=title, format=path.rsplit(".", 1)[-1], size=1, **kw)  # type: ignore[arg-type]


def test_format_table_aligns_columns_and_counts():
    tracks = [
        _track("a.mp3", "A", artist="Someone", album="X", duration=61),
        _track("long/folder/b.flac", "Bee title", duration=3725),
        _track("c.wav", "C", artist="Z", error="not a valid WAV file"),
    ]
    lines = format_table(tracks).splitlines()
    assert len(lines) == 1 + len(tracks) + 1
    header, rows, last = lines[0], lines[1:-1], lines[-1]
    assert header.split() == ["PATH", "TITLE", "ARTIST", "ALBUM", "TIME", "FORMAT"]
    total_size = format_size(sum(t.size for t in tracks))
    assert last == f"3 tracks, 1:03:06, {total_size}"  # 61 s + 3725 s, no duration for c
    title_col = header.index("TITLE")
    artist_col = header.index("ARTIST")
    format_col = header.index("FORMAT")
    time_end = header.index("TIME") + len("TIME")
    for row, track in zip(rows, tracks, strict=True):
        assert row.startswith(track.path + " ")
        assert row[title_col:].startswith(track.title + " ")
        if track.artist:
            assert row[artist_col:].startswith(track.artist + " ")
        assert row[format_col:].startswith(track.format)
        assert not row.endswith(" ")
    # the time column is right-aligned under its header
    assert rows[0][:time_end].endswith("1:01")
    assert rows[1][:time_end].endswith("1:02:05")
    assert rows[2][:time_end].strip().endswith("Z")  # no duration: blank cell
    assert "(unreadable)" in rows[2]
    assert "(unreadable)" not in rows[0] + rows[1]


def test_format_table_singular_and_empty():
    one = _track("a.mp3", "A")
    assert format_table([one]).splitlines()[-1] == f"1 track, 0:00, {format_size(one.size)}"
    lines = format_table([]).splitlines()
    assert lines[0].split() == ["PATH", "TITLE", "ARTIST", "ALBUM", "TIME", "FORMAT"]
    assert lines[-1] == "0 tracks, 0:00, 0 B"


def test_long_table_adds_the_technical_columns():
    t = _track("a.flac", "A", duration=3)
    t = TrackInfo(
        **{
            **t.to_wire(),
            "codec": "flac",
            "sample_rate": 44100,
            "channels": 2,
            "bits_per_sample": 24,
            "bitrate": 1_411_000,
            "size": 2_500_000,
        }
    )
    header, row, _ = format_table([t], long=True).splitlines()
    assert header.split() == [
        "PATH",
        "TITLE",
        "ARTIST",
        "ALBUM",
        "TIME",
        "FORMAT",
        "CODEC",
        "RATE",
        "CH",
        "BITS",
        "BITRATE",
        "SIZE",
    ]
    assert row.split()[-8:] == ["flac", "flac", "44100", "2", "24", "1411k", "2.5", "MB"]


def test_format_size_and_select():
    assert [format_size(n) for n in (0, 999, 1000, 2_750_000, 10**9)] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "2.8 MB",
        "1.0 GB",
    ]
    tracks = [
        TrackInfo(path="b.mp3", title="Zed", format="mp3", size=1, artist="Éloïse", duration=9),
        TrackInfo(path="a.flac", title="Ant", format="flac", size=1, artist="Bob", duration=3),
        TrackInfo(path="c.FLAC", title="Cat", format="flac", size=1, artist=None),
    ]
    assert [t.path for t in select(tracks)] == ["a.flac", "b.mp3", "c.FLAC"]
    assert [t.path for t in select(tracks, artist="ELOISE")] == ["b.mp3"]  # accents, case
    assert [t.path for t in select(tracks, fmt=".FLAC")] == ["a.flac", "c.FLAC"]
    assert [t.path for t in select(tracks, sort="title")] == ["a.flac", "c.FLAC", "b.mp3"]
    assert [t.path for t in select(tracks, sort="duration")] == ["a.flac", "b.mp3", "c.FLAC"]
    assert [t.path for t in select(tracks, sort="artist")] == ["a.flac", "b.mp3", "c.FLAC"]


def test_json_array_is_json_with_one_object_per_line():
    tracks = [
        TrackInfo(path='é/"quoted".mp3', title="Ünïcode ♫", format="mp3", size=1),
        TrackInfo(path="b.flac", title="b", format="flac", size=2, duration=1.5),
    ]
    text = json_array(track_dict(t) for t in tracks)
    assert json.loads(text) == [track_dict(t) for t in tracks]
    assert len(text.splitlines()) == 2 + len(tracks) and "♫" in text  # not escaped
    assert json.loads(json_array([])) == []
    assert track_dict(tracks[1]) == dataclasses.asdict(tracks[1])


@pytest.mark.parametrize("sort", ["path", "title", "artist", "album", "duration"])
@pytest.mark.parametrize(
    "filters",
    [{}, {"artist": "eloise"}, {"album": "BLUE"}, {"fmt": ".flac"}, {"artist": "o", "fmt": "mp3"}],
)
def test_client_side_select_agrees_with_the_server_index(
    tmp_path: Path, sort: str, filters: dict[str, str]
) -> None:
    """``ls`` filters by itself only for an older server; it must then give what the
    server's index query gives."""
    tracks = [
        TrackInfo(path="b.mp3", title="Zed", format="mp3", size=1, artist="Éloïse", duration=9),
        TrackInfo(path="a.flac", title="ant", format="flac", size=1, artist="Bob", album="Blue"),
        TrackInfo(path="c.flac", title="Cat", format="flac", size=1, album="blué", duration=3),
        TrackInfo(path="d/e.mp3", title="Émile", format="mp3", size=1, artist="Zoé", duration=3),
    ]
    index = Index(tmp_path, tmp_path / "index.sqlite3")
    index.put(row_of(t, 0, 0) for t in tracks)
    query = ListQuery(
        artist=filters.get("artist"),
        album=filters.get("album"),
        format=filters.get("fmt"),
        sort=sort,
    )
    server_side = [t.path for t in index.search(query)]
    client_side = [t.path for t in select(tracks, sort=sort, **filters)]  # type: ignore[arg-type]
    index.close()
    assert client_side == server_side
    assert server_side  # every case selects something


# ---------------------------------------------------------------------------- players


def test_known_player_gets_its_stdin_arguments():
    assert player_command("mpv --volume=50", {}) == [
        "mpv",
        "--volume=50",
        "--no-video",
        "--",
        "-",
    ]
    assert player_command("/usr/local/bin/ffplay", {}) == [
        "/usr/local/bin/ffplay",
        *STDIN_ARGS["ffplay"],
    ]


def test_player_already_reading_stdin_is_left_alone():
    assert player_command("mpv --no-video -", {}) == ["mpv", "--no-video", "-"]


def test_unknown_player_runs_as_given():
    assert player_command("my-player --flag 'two words'", {}) == [
        "my-player",
        "--flag",
        "two words",
    ]


def test_player_from_environ_when_not_named():
    assert player_command(None, {"MUSICLIB_PLAYER": "foo --bar"}) == ["foo", "--bar"]
    assert player_command(None, {"MUSICLIB_PLAYER": "mpv"}) == ["mpv", *STDIN_ARGS["mpv"]]
    assert player_command("baz", {"MUSICLIB_PLAYER": "foo"}) == ["baz"]  # the option wins


def test_unparsable_player_spec():
    with pytest.raises(UsageError):
        player_command("mpv 'unbalanced", {})
    with pytest.raises(UsageError):
        player_command("   ", {})


def test_default_player_is_found_on_path(tmp_path, monkeypatch):
    fake = tmp_path / "ffplay"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert player_command(None, {}) == ["ffplay", *STDIN_ARGS["ffplay"]]


def test_no_player_anywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder
    with pytest.raises(PlayerNotFound):
        player_command(None, {})


# ---------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("h:1", ("h", 1)),
        ("127.0.0.1:7651", ("127.0.0.1", 7651)),
        ("[::1]:7650", ("::1", 7650)),
        ("[::1]:80", ("::1", 80)),
        ("::1", ("::1", 7650)),
        ("host", ("host", 7650)),
        ("h:65535", ("h", 65535)),
    ],
)
def test_parse_address(text, expected):
    assert parse_address(text) == expected


def test_parse_address_bracketed_host_without_port():
    assert parse_address("[::1]") == ("::1", 7650)


@pytest.mark.parametrize("text", ["", ":80", "h:", "h:x", "h:0", "h:65536", "h:-1", "[]:80"])
def test_parse_address_refuses(text):
    with pytest.raises(UsageError):
        parse_address(text)


# ---------------------------------------------------------------------------- with a server


def shipped_files() -> list[Path]:
    """The shipped demo library's media files, sorted; skips the test if there are none."""
    files = sorted(p for p in LIBRARY.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA)
    if not files:
        pytest.skip("the demo library has not been generated")
    return files


async def run_app(*args: str) -> object:
    """A command through cyclopts inside this trio run; its return value."""
    return await app.run_async(list(args), result_action="return_value")


@pytest.fixture
async def address(nursery) -> AsyncIterator[str]:
    """A real server over the shipped library, in this trio run, already indexed."""
    shipped_files()
    config = ServerConfig(root=LIBRARY, port=0)
    server = Server(Library(config.root), config)
    # index before serving, so that the first list is complete (a rescan keeps old entries)
    await trio.to_thread.run_sync(server.library.rescan)
    addresses = await nursery.start(functools.partial(serve, config, server=server))
    host, port = addresses[0]
    yield f"{host}:{port}"
    server.stop()


async def test_ls_json_in_process(address, capsys):
    files = shipped_files()
    assert await run_app("ls", "--json", "--server", address) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["path"] for t in listed] == [p.relative_to(LIBRARY).as_posix() for p in files]
    for t in listed:
        assert t["size"] == (LIBRARY / t["path"]).stat().st_size


async def held_json(address: str, **query: object) -> str:
    """What ``ls --json`` printed before it streamed: the whole reply of one ``list``
    (in the server's order), as ``print(json_array(...))`` wrote it; once the server's
    background hashing has stored every sha256, so that a later listing says the same."""
    async with open_client(address) as client:
        with trio.fail_after(30):
            while any(t.sha256 is None for t in (await client.list())[0]):  # noqa: ASYNC110 (the server's hashing, polled)
                await trio.sleep(0.05)
        tracks, _ = await client.list(**query)  # type: ignore[arg-type]
    return json_array(track_dict(t) for t in tracks) + "\n"


@pytest.mark.parametrize("batch, per_reply", [(128, 100_000), (2, 100_000), (2, 3), (1, 1)])
@pytest.mark.parametrize(
    "args, query",
    [
        ((), {}),  # every track
        (("Brume",), {"query": "Brume"}),  # one
        (("--sort", "title"), {"sort": "title"}),
        (("--limit", "5", "--offset", "2"), {"offset": 2, "limit": 5}),
        (("--artist", "modules", "--sort", "duration"), {"artist": "modules", "sort": "duration"}),
        (
            (
                "--offset",
                "20",
            ),
            {"offset": 20},
        ),  # past the end: none shown
    ],
)
async def test_ls_json_streams_what_the_whole_list_held(
    address, capsys, monkeypatch, batch, per_reply, args, query
):
    """``ls --json`` writes each page as it arrives: the same bytes as the held list,
    when the server sends many small batches (``batch``) and when the listing takes
    several replies (``per_reply``: the client's cap on one reply, made small)."""
    expected = await held_json(address, **query)
    monkeypatch.setattr(library_requests, "LIST_BATCH", batch)
    monkeypatch.setattr(client_module, "MAX_LIST_TRACKS", per_reply)
    assert await run_app("ls", "--json", *args, "--server", address) == 0
    out = capsys.readouterr().out
    assert out == expected
    assert json.loads(out) == json.loads(expected)


async def test_ls_json_of_nothing_is_an_empty_array(address, capsys, caplog):
    assert await run_app("ls", "--json", "no-such-word-anywhere", "--server", address) == 1
    assert capsys.readouterr().out == "[]\n" and "no track matches" in caplog.text


async def test_list_pages_continue_past_the_cap_on_one_reply(address, monkeypatch):
    """A listing longer than one reply may hold (the cap made 3 here) comes whole, in
    order, in replies of at most 3, each checked as :meth:`Client.list` checks one."""
    files = shipped_files()
    async with open_client(address) as client:
        whole, end = await client.list()
        monkeypatch.setattr(client_module, "MAX_LIST_TRACKS", 3)
        async with client.list_pages() as pages:
            sizes = [len(page) async for page in pages]
        assert pages.end is not None
        assert (pages.end.count, pages.end.total) == (len(files), end.total)
        async with client.list_pages(offset=1, limit=7) as pages:
            paged = [t async for page in pages for t in page]
        with pytest.raises(RemoteProtocolError, match="exceeds 3 tracks"):  # one reply: capped
            await client.list()
    assert sum(sizes) == len(files) and max(sizes) <= 3
    assert paged == whole[1:8]


def test_json_array_writer_writes_what_print_json_array_prints():
    """Written piece by piece, in pages of any size, the bytes are the same."""
    items = [track_dict(TrackInfo(path=f"{i}é.mp3", title="t\n\x1b", format="mp3", size=i))
             for i in range(5)]  # fmt: skip
    for pages in ([], [[]], [items], [items[:1], [], items[1:]], [[i] for i in items]):
        out = io.StringIO()
        writer = JsonArrayWriter(out)
        for page in pages:
            writer.write(page)
        writer.close()
        flat = [item for page in pages for item in page]
        assert out.getvalue() == json_array(flat) + "\n"
        assert json.loads(out.getvalue()) == flat


async def test_ls_query_in_process(address, capsys):
    artist = shipped_files()[0].relative_to(LIBRARY).parts[0]
    assert await run_app("ls", artist.upper(), "--server", address) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = lines[1:-1]
    assert rows and all(row.startswith(artist + "/") for row in rows)
    assert lines[-1].startswith(f"{len(rows)} track{'s' if len(rows) != 1 else ''}, ")


async def test_ls_filters_sort_and_long_in_process(address, capsys):
    assert await run_app("ls", "--artist", "ondes ephemeres", "--json", "--server", address) == 0
    listed = json.loads(capsys.readouterr().out)  # pure JSON on stdout
    assert listed and all(t["artist"] == "Les Ondes Éphémères" for t in listed)
    assert {"bits_per_sample", "sha256", "error"} <= set(listed[0])
    assert (
        await run_app("ls", "--format", "ogg", "--sort", "duration", "--json", "--server", address)
        == 0
    )
    oggs = json.loads(capsys.readouterr().out)
    assert oggs and {t["format"] for t in oggs} == {"ogg"}
    assert [t["duration"] for t in oggs] == sorted(t["duration"] for t in oggs)
    assert await run_app("ls", "--long", "--album", "café", "--server", address) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-6:] == ["CODEC", "RATE", "CH", "BITS", "BITRATE", "SIZE"]
    assert len(lines) == 2 + 3 and lines[-1].startswith("3 tracks, ")


async def test_ls_options_from_the_environment(address, capsys, monkeypatch):
    monkeypatch.setenv("MUSICLIB_LS_SORT", "title")
    assert await run_app("ls", "--json", "--server", address) == 0
    titles = [t["title"] for t in json.loads(capsys.readouterr().out)]
    assert titles == sorted(titles, key=str.casefold) and len(titles) >= 2


async def test_info_in_process(address, capsys):
    import hashlib

    track = shipped_files()[0]
    rel = track.relative_to(LIBRARY).as_posix()
    assert await run_app("info", track.name, "--server", address) == 0
    text = capsys.readouterr().out
    facts = dict(line.strip().split("  ", 1) for line in text.splitlines())
    assert facts["path"].strip() == rel
    assert facts["sha256"].strip() == hashlib.sha256(track.read_bytes()).hexdigest()
    assert facts["size"].startswith(f"{track.stat().st_size} bytes")
    assert await run_app("info", rel, "--json", "--server", address) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["path"] == rel and data["sha256"] == facts["sha256"].strip()
    assert data["duration"] > 0 and data["sample_rate"] > 0


def test_completion_script(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["completion", "--shell", "bash"])
    assert exit_.value.code == 0
    script = capsys.readouterr().out
    assert "musiclib" in script and "complete" in script
    for command in ("serve", "ls", "get", "play", "info", "rescan"):
        assert command in script


async def test_get_save_in_process(address, tmp_path, monkeypatch):
    track = min(shipped_files(), key=lambda p: p.stat().st_size)
    monkeypatch.chdir(tmp_path)
    rel = track.relative_to(LIBRARY).as_posix()
    assert await run_app("get", rel, "--save", "--server", address) == 0
    assert os.listdir(tmp_path) == [track.name]
    assert (tmp_path / track.name).read_bytes() == track.read_bytes()


async def test_get_to_stdout_in_process(address, capsysbinary):
    track = min(shipped_files(), key=lambda p: p.stat().st_size)
    rel = track.relative_to(LIBRARY).as_posix()
    assert await run_app("get", rel, "--server", address) == 0
    assert capsysbinary.readouterr().out == track.read_bytes()


def counting_connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the connections the CLI opens (one entry per ``open_client``)."""
    import musiclib.client

    opened: list[str] = []
    real = musiclib.client.open_client

    def counted(address: str, **kwargs: object):  # type: ignore[no-untyped-def]
        opened.append(address)
        return real(address, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(musiclib.client, "open_client", counted)
    return opened


async def test_get_asks_info_and_streams_on_one_connection(address, tmp_path, monkeypatch):
    opened = counting_connections(monkeypatch)
    track = min(shipped_files(), key=lambda p: p.stat().st_size)
    monkeypatch.chdir(tmp_path)
    assert await run_app("get", track.stem, "--save", "-q", "--server", address) == 0
    assert (tmp_path / track.name).read_bytes() == track.read_bytes()
    assert len(opened) == 1


async def test_play_pipe_builds_the_queue_and_streams_on_one_connection(
    address, tmp_path, monkeypatch
):
    opened = counting_connections(monkeypatch)
    track = min(shipped_files(), key=lambda p: p.stat().st_size)
    heard = tmp_path / "heard"
    player = f"sh -c 'cat > {heard}'"
    argv = ["play", track.stem, "--pipe", "-q", "--player", player, "--server", address]
    assert await run_app(*argv) == 0
    assert heard.read_bytes() == track.read_bytes()
    assert len(opened) == 1


async def test_reusing_hands_out_the_open_client_once():
    from musiclib.fetch import reusing

    opened: list[object] = []
    spare = object()

    @contextlib.asynccontextmanager
    async def connect():  # type: ignore[no-untyped-def]
        client = object()
        opened.append(client)
        yield client

    connector = reusing(spare, connect)  # type: ignore[arg-type]
    async with connector() as first:
        assert first is spare
    async with connector() as second, connector() as third:
        assert opened == [second, third]


async def test_get_and_play_send_their_first_request_with_the_hello(nursery, tmp_path):
    """``get`` and ``play`` do not wait for the welcome (PROTOCOL.md, "Conversation"): this
    peer welcomes only once more than the hello has arrived (or after 3 s, less than the
    client waits for a welcome: a client that waited would then go on, and be caught)."""
    hello = Connection(Role.CLIENT).send(Hello(version=1, client=f"musiclib/{__version__}"))
    early: list[bool] = []

    async def peer(stream: trio.SocketStream) -> None:
        conn = Connection(Role.SERVER)
        raw = b""
        with trio.move_on_after(3):
            while len(raw) <= len(hello) and (data := await stream.receive_some(65536)):
                raw += data
        early.append(raw.startswith(hello) and len(raw) > len(hello))
        conn.receive_data(raw)
        assert isinstance(conn.next_event(), Hello)
        await stream.send_all(conn.send(Welcome(version=1, server="peer/1")))
        while True:
            while isinstance(event := conn.next_event(), NeedData):
                conn.receive_data(await stream.receive_some(65536))
            if isinstance(event, InfoRequest):  # the name names no track...
                await stream.send_all(conn.send(Error(code="not_found", message="none")))
            elif isinstance(event, ListRequest):  # ...and its words match none (play)
                await stream.send_all(conn.send(ListEnd(count=0, total=0)))
            else:
                break
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, peer, 0, host="127.0.0.1"))
    address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    for argv in (["get", "x", "-o", str(tmp_path / "x")], ["play", "x", "--player", "cat"]):
        with pytest.raises(NotFound):
            await run_app(*argv, "--retries", "0", "--server", address)
    assert early == [True, True]


def imported_by(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return set(done.stdout.split())


def test_the_cli_imports_what_a_command_needs_only():
    """Start-up is import time (issue 15): the CLI module loads no trio (only commands
    that connect need it), no server, no player, no rich; playing through a pipe loads
    no HTTP gateway (h11)."""
    cli = imported_by("import musiclib.cli")
    unwanted = {"trio", "musiclib.client", "rich", "h11", "musiclib.server", "musiclib.fetch"}
    unwanted |= {"musiclib.playing", "cyclopts.completion.install", "subprocess"}
    unwanted |= {"musiclib.gateway", "musiclib.library", "msgpack.fallback", "sqlite3"}
    assert not cli & unwanted
    piped = imported_by("import musiclib.cli, musiclib.playing")
    assert not piped & {"h11", "musiclib.gateway", "rich", "musiclib.server"}


def test_install_completion_is_listed_but_loaded_only_when_used(capsys):
    """``--install-completion`` (cyclopts') is registered lazily: the list of commands shows
    it with its help, and its own help page still describes it."""
    assert run_main(["--help"]) == 0
    assert "--install-completion  Install shell completion" in capsys.readouterr().out
    assert run_main(["--install-completion", "--help"]) == 0
    page = capsys.readouterr().out
    assert "installs the completion script" in page and "--shell" in page


def test_start_up_pauses_the_garbage_collector_until_the_command_line_is_parsed():
    """Start-up builds objects that live as long as the process; the cyclic collector does
    not walk them (issue 15: about 8 ms of ``ls``). Importing the CLI leaves the collector
    as it found it, what it built frozen out of its sight; run as the program (``main()``
    pauses it), it runs again once the command line is parsed, trio loaded for an async
    command."""

    def run(code: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
        )
        return done.stdout.split()

    imported = "import gc; {} import musiclib.cli; print(gc.isenabled(), gc.get_freeze_count() > 0)"
    assert run(imported.format("")) == ["True", "True"]
    assert run(imported.format("gc.disable();")) == ["False", "False"]
    program = (
        "import gc, sys; from musiclib import cli; cli._pause_collection(); "
        "print(gc.isenabled()); cli.app.parse_args(['ls']); "
        "print(gc.isenabled(), 'trio' in sys.modules)"
    )
    assert run(program) == ["False", "True", "True"]


async def test_errors_in_process_are_typed(address, capsys):
    with pytest.raises(NotFound) as not_found:
        await run_app("get", "no-such-track-anywhere", "--server", address)
    assert not_found.value.exit_code == 4
    artist = shipped_files()[0].relative_to(LIBRARY).parts[0]
    with pytest.raises(Ambiguous) as ambiguous:
        await run_app("get", artist, "--server", address)
    assert ambiguous.value.exit_code == 4
    assert len(ambiguous.value.candidates) >= 2
    assert all(c.startswith(artist + "/") for c in ambiguous.value.candidates)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "argv",
    [["ls", "--bogus"], ["ls", "--sort", "bitrate"], ["serve", "--port", "x"], ["nope"]],
)
def test_a_bad_command_line_is_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("musiclib: ") and err[0].endswith("(see musiclib --help)")


def test_output_errors_say_what_went_wrong():
    import errno as e

    from musiclib.fetch import _output_error

    cases = {
        e.ENOSPC: "the disk is full",
        e.EACCES: "permission denied",
        e.EROFS: "read-only",
        e.ENOENT: "the folder does not exist",
    }
    for code, words in cases.items():
        err = _output_error(OSError(code, os.strerror(code)), Path("/x/y.mp3"))
        assert err.exit_code == 7
        assert str(err) == f"cannot write /x/y.mp3: {words}" or words in str(err)


def test_serve_options_come_from_the_environment(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "no-such-folder"
    monkeypatch.setenv("MUSICLIB_SERVE_ROOT", str(missing))
    with pytest.raises(SystemExit) as exit_:
        main(["serve"])
    assert exit_.value.code == 2
    assert f"--root {missing}: not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tone=ffmpeg:-f lavfi -i sine\nbad name=mic", "--channel 'bad name=mic': a channel name"),
        ("a=mic\na=loop:x", "each channel needs a name of its own"),
        ("a=radio", "unknown source 'radio'"),
    ],
)
def test_serve_channels_come_from_the_environment_one_per_line(monkeypatch, capsys, value, message):
    """MUSICLIB_SERVE_CHANNEL holds one NAME=SOURCE per line (specs contain spaces)."""
    monkeypatch.setenv("MUSICLIB_SERVE_CHANNEL", value)
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--root", str(Path(__file__).parent.parent / "library")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
