"""What a person meets at the terminal (issue 13, items 4-8, 12 and 13).

Tables that fit (rich, measured in terminal cells), natural order, ``--paths``,
exit status 1 for a miss and "did you mean", several unquoted words as one
name, ``status`` and ``--json`` reports, shell completion of track names from
a real server (and silence without one), and messages that say what happened
and what to do. The end-to-end tests run the real CLI against real servers on
127.0.0.1 (conftest's ``server``, ``start_server`` and ``cli``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len

from musiclib import cli as cli_module
from musiclib.cli import _shell_unescape, main
from musiclib.errors import UsageError
from musiclib.protocol import ServerStatus, TrackInfo
from musiclib.ui import (
    format_status,
    format_table,
    format_table_for_terminal,
    natural_key,
    order,
    suggestions,
)

REPO = Path(__file__).resolve().parent.parent

Cli = Callable[..., "subprocess.CompletedProcess[Any]"]


def track(path: str, title: str | None = None, **kw: Any) -> TrackInfo:
    kw.setdefault("size", 1000)
    return TrackInfo(
        path=path, title=title or path.rsplit("/", 1)[-1], format=path.rsplit(".")[-1], **kw
    )


WIDE = [
    track(
        "Les Ondes Éphémères/Café du Matin/01 - Brume.flac",
        "Brume",
        artist="Les Ondes Éphémères",
        album="Café du Matin",
        duration=13,
        codec="flac",
        sample_rate=32000,
        channels=1,
        bits_per_sample=16,
        bitrate=169_000,
        size=281_468,
    ),
    track(
        "坂本/東京の夜/02 - 夜明けの歌.mp3",
        "夜明けの歌 🎵",
        artist="坂本龍一",
        album="東京の夜",
        duration=213,
        codec="mp3",
        sample_rate=44100,
        channels=2,
        bitrate=320_000,
        size=2_810_468,
    ),
    track(
        "The Quiet Modules/Night Shift/10 - A title that goes on and on and on and on.ogg",
        "A title that goes on and on and on and on",
        artist="The Quiet Modules",
        album="Night Shift",
        duration=3725,
        size=12_345,
    ),
]


# ---------------------------------------------------------------------------- 4. tables


@pytest.mark.parametrize("width", [40, 60, 80, 100, 200])
@pytest.mark.parametrize("long", [False, True])
def test_the_terminal_table_fits_the_width_in_cells(width: int, long: bool) -> None:
    out = format_table_for_terminal(WIDE, long=long, width=width)
    lines = out.splitlines()
    table = lines[: len(WIDE) + 1]  # the header and one line per track
    assert all(cell_len(line) <= width for line in table), out
    assert table[0].startswith("PATH")
    assert lines[len(WIDE) + 1] == "3 tracks, 1:05:51, 3.1 MB"


@pytest.mark.parametrize("width", [60, 80, 200])
def test_wide_characters_stay_aligned(width: int) -> None:
    """CJK and emoji take two cells: the TIME column ends at the same cell on every line."""
    lines = format_table_for_terminal(WIDE, width=width).splitlines()[: len(WIDE) + 1]
    ends = set()
    for line, time in zip(lines, ["TIME", "0:13", "3:33", "1:02:05"], strict=True):
        ends.add(cell_len(line[: line.index(time) + len(time)]))
    assert len(ends) == 1, "\n".join(lines)


def test_long_stays_readable_at_80_columns() -> None:
    out = format_table_for_terminal(WIDE, long=True, width=80)
    header = out.splitlines()[0].split()
    for wanted in ("PATH", "TITLE", "TIME", "SIZE", "CODEC"):
        assert wanted in header, out
    assert "…" in out  # the long path was shortened, not wrapped
    assert out.splitlines()[-1].startswith("(not shown, the terminal is too narrow:")
    # a wide terminal shows every column and says nothing of it
    wide = format_table_for_terminal(WIDE, long=True, width=250)
    assert "not shown" not in wide and "BITRATE" in wide.splitlines()[0]


def test_the_terminal_table_escapes_what_the_server_sent() -> None:
    hostile = [track("evil\x1b]0;pwned\x07.mp3", "[blink]x[/blink] \x1b[31mred", artist="\u202e")]
    out = format_table_for_terminal(hostile, width=200)
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b" in out and "\\u202e" in out
    assert "[blink]x[/blink]" in out  # shown as written, not read as rich markup


def test_the_plain_table_for_a_pipe_does_not_change() -> None:
    """Scripts read it: no width, no ellipsis, one line per track."""
    out = format_table(WIDE)
    assert WIDE[2].path in out and "…" not in out
    assert len(out.splitlines()) == len(WIDE) + 2


# ---------------------------------------------------------------------------- 6. order


def test_natural_order_puts_2_before_10() -> None:
    names = ["10 - b.mp3", "2 - a.mp3", "1 - c.mp3", "Disc 10/1.mp3", "Disc 9/1.mp3"]
    tracks = [track(n) for n in names]
    assert [t.path for t in order(tracks)] == [
        "1 - c.mp3",
        "2 - a.mp3",
        "10 - b.mp3",
        "Disc 9/1.mp3",
        "Disc 10/1.mp3",
    ]
    assert natural_key("Track 2") < natural_key("track 10")  # case ignored too


def test_order_by_size_format_and_reverse_keeps_unknowns_last() -> None:
    tracks = [
        track("a.mp3", size=300, duration=2),
        track("b.flac", size=100),
        track("c.ogg", size=200, duration=1),
    ]
    assert [t.path for t in order(tracks, "size")] == ["b.flac", "c.ogg", "a.mp3"]
    assert [t.path for t in order(tracks, "size", reverse=True)] == ["a.mp3", "c.ogg", "b.flac"]
    assert [t.path for t in order(tracks, "format")] == ["b.flac", "a.mp3", "c.ogg"]
    # no duration: last, whichever way the rest goes
    assert [t.path for t in order(tracks, "duration")] == ["c.ogg", "a.mp3", "b.flac"]
    assert [t.path for t in order(tracks, "duration", reverse=True)][-1] == "b.flac"


# ---------------------------------------------------------------------------- 5. did you mean


def test_suggestions_fix_a_misspelt_word_and_name_close_titles() -> None:
    assert suggestions("brumme", WIDE) == ["Brume"]
    assert suggestions("cafe brumme", WIDE)[0] == "cafe brume"
    assert suggestions("quiet modles", WIDE)[0] == "quiet modules"
    assert suggestions("zzzzzz", WIDE) == []
    assert suggestions("", WIDE) == []


# ---------------------------------------------------------------------------- 7. status


def test_format_status_complete_and_pieced_together() -> None:
    status = ServerStatus(
        server="musiclib/0.1.0",
        versions=(1, 2),
        tracks=10,
        uptime=3725.0,
        connections=3,
        scans=2,
        last_scan=42.0,
        last_scan_took=0.25,
    )
    out = format_status(status, "127.0.0.1:7650")
    assert "musiclib/0.1.0 at 127.0.0.1:7650" in out
    assert "versions 1, 2" in out and "1 h 2 min" in out and "42 s ago, took 0.25 s" in out
    old = format_status(status, "h:1", complete=False)
    assert "unknown (an older server)" in old and "1 h 2 min" not in old
    assert "worker" not in out  # one process: no worker line


def test_format_status_names_the_worker_that_answered() -> None:
    """With ``serve --workers``, ``connections`` are one worker's: say which one."""
    status = ServerStatus(
        server="musiclib/0.1.0", versions=(1, 2), tracks=1, uptime=1.0, connections=4,
        worker=1, pid=4242,
    )  # fmt: skip
    lines = format_status(status, "h:1").splitlines()
    names = [line.strip().split("  ")[0] for line in lines]
    assert names.index("worker") == names.index("connections") - 1
    assert lines[names.index("worker")].endswith("1 (pid 4242)")


# ---------------------------------------------------------------------------- 8. completion


def test_a_completed_word_is_unquoted_as_the_command_gets_it() -> None:
    assert _shell_unescape("Les\\ Ondes\\ É") == "Les Ondes É"
    assert _shell_unescape("'Les Ondes") == "Les Ondes"
    assert _shell_unescape('"a\\"b') == 'a"b'


def _complete(words: list[str], server: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Source ``musiclib completion bash`` in a real bash and call its function as bash does
    at a TAB after ``words`` (the last one is the word being completed)."""
    script = tmp_path / "musiclib.bash"
    if not script.exists():
        made = subprocess.run(
            [sys.executable, "-m", "musiclib", "completion", "bash"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        script.write_text(made.stdout)
        # the console script the completion calls, found on PATH as a shell would
        bindir = tmp_path / "bin"
        bindir.mkdir()
        (bindir / "musiclib").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m musiclib "$@"\n')
        (bindir / "musiclib").chmod(0o755)
    test = f"""
source {script}
fn=$(complete -p musiclib | sed 's/.* -F \\([^ ]*\\) .*/\\1/')
COMP_WORDS=(musiclib "$@")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE="${{COMP_WORDS[*]}}"
COMP_POINT=${{#COMP_LINE}}
COMPREPLY=()
"$fn" musiclib "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "MUSICLIB_SERVER": server,
    }
    return subprocess.run(
        ["bash", "-c", test, "bash", *words],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,  # a hang guard, not a measurement
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_track_names_from_the_server(server: Any, tmp_path: Path) -> None:
    done = _complete(["get", "Les"], server.address, tmp_path)
    assert done.returncode == 0, done.stderr
    got = done.stdout.splitlines()
    assert "Les\\ Ondes\\ Éphémères/Café\\ du\\ Matin/01\\ -\\ Brume.flac" in got
    assert all(line.startswith("Les\\ ") for line in got), got
    # the second TAB: the word now holds backslashes; the names still match
    again = _complete(
        ["info", "Les\\ Ondes\\ Éphémères/Café\\ du\\ Matin/01"], server.address, tmp_path
    )
    assert again.stdout.splitlines() == [
        "Les\\ Ondes\\ Éphémères/Café\\ du\\ Matin/01\\ -\\ Brume.flac"
    ], again
    # options still complete as before
    options = _complete(["ls", "--rev"], server.address, tmp_path)
    assert options.stdout.split() == ["--reverse"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_without_a_server_is_silent(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{sock.getsockname()[1]}"
    done = _complete(["get", "Les"], nobody, tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == "" and done.stderr == ""
    # and a server that accepts but never answers: given up after COMPLETION_TIMEOUT
    with _silent_server() as silent:
        done = _complete(["get", "Les"], silent, tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == "" and done.stderr == ""


# ---------------------------------------------------------------------------- e2e: ls


def test_several_unquoted_words_are_one_query(cli: Cli) -> None:
    quoted = cli("ls", "--paths", "Modules Night")
    unquoted = cli("ls", "--paths", "Modules", "Night")
    assert unquoted.returncode == 0, unquoted.stderr
    assert unquoted.stdout == quoted.stdout
    assert unquoted.stdout.decode().splitlines() == [
        "The Quiet Modules/Night Shift/01 - Blinking Cursor.mp3",
        "The Quiet Modules/Night Shift/02 - Überstunden.ogg",
    ]
    info = cli("info", "--json", "Cafe", "Brume")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["path"].endswith("Café du Matin/01 - Brume.flac")


def test_paths_and_dash_1_print_one_path_per_line(cli: Cli) -> None:
    listed = [t["path"] for t in json.loads(cli("ls", "--json").stdout)]
    paths = cli("ls", "--paths")
    assert paths.returncode == 0, paths.stderr
    assert paths.stdout.decode().splitlines() == listed
    assert cli("ls", "-1").stdout == paths.stdout
    assert cli("ls", "--paths", "--json").returncode == 2


def test_a_miss_exits_1_and_suggests(cli: Cli) -> None:
    miss = cli("ls", "brumme")
    assert miss.returncode == 1
    assert miss.stdout == b""
    assert miss.stderr.strip() == "musiclib: no track matches 'brumme'; did you mean 'Brume'?"
    filters = cli("ls", "--artist", "nobody at all")
    assert filters.returncode == 1 and "no track matches --artist 'nobody at all'" in filters.stderr
    assert cli("ls", "--json", "zzzzzz").stdout.strip() == b"[]"
    # info and get: the server's not_found (exit 4), with the suggestion
    info = cli("info", "cafe", "brumme")
    assert info.returncode == 4
    assert "did you mean 'cafe brume'" in info.stderr, info.stderr


def _tiny_wav(path: Path, frames: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * frames)


def test_natural_order_reverse_and_size_end_to_end(start_server: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for name, frames in [("10.wav", 100), ("2.wav", 300), ("1.wav", 200)]:
        _tiny_wav(root / name, frames)
    srv = start_server(root)

    def paths(*args: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-m", "musiclib", "ls", "--paths", "--server", srv.address, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    assert paths() == ["1.wav", "2.wav", "10.wav"]  # the server's order: 1, 10, 2
    assert paths("--reverse") == ["10.wav", "2.wav", "1.wav"]
    assert paths("--sort", "size") == ["10.wav", "1.wav", "2.wav"]
    assert paths("--sort", "size", "-r", "--limit", "1") == ["2.wav"]
    # a page of a server order is the server's, by code point
    assert paths("--limit", "2") == ["1.wav", "10.wav"]


# ---------------------------------------------------------------------------- e2e: status, json


def test_status_says_versions_tracks_uptime_and_connections(cli: Cli, server: Any) -> None:
    done = cli("status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["address"] == server.address
    assert status["versions"] == [1, 2]
    assert status["tracks"] == len(json.loads(cli("ls", "--json").stdout))
    assert status["uptime"] >= 0 and status["connections"] >= 1
    assert status["scans"] >= 1 and status["last_scan"] >= 0
    text = cli("status")
    assert text.returncode == 0
    assert "connections" in text.stdout.decode() and server.address in text.stdout.decode()


def test_rescan_says_it_started_or_finished(cli: Cli) -> None:
    started = cli("rescan")
    assert started.returncode == 0
    assert started.stdout.decode().startswith("rescan started (")
    done = cli("rescan", "--wait")
    assert done.stdout.decode().endswith(" tracks (done)\n")
    report = json.loads(cli("rescan", "--wait", "--json").stdout)
    assert report["waited"] is True and report["scanning"] is False and report["tracks"] > 0


def test_get_json_reports_the_saved_file(cli: Cli, tmp_path: Path) -> None:
    done = cli("get", "Cafe", "Brume", "-o", tmp_path / "b.flac", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["saved_to"] == str(tmp_path / "b.flac")
    assert report["verified"] is True
    assert report["size"] == (tmp_path / "b.flac").stat().st_size
    assert done.stderr == ""  # the report is the JSON, nothing else
    assert cli("get", "Brume", "--json").returncode == 2  # to stdout: no room for a report


# ---------------------------------------------------------------------------- 13. help


@pytest.mark.parametrize("command", ["ls", "info", "rescan", "status", "channels"])
def test_options_that_do_nothing_are_not_offered(command: str, capsys: Any) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--server" in text
    assert "--quiet" not in text and "--retries" not in text
    with pytest.raises(SystemExit) as exited:
        main([command, "--quiet"])
    assert exited.value.code == 2


def test_transfers_still_take_quiet_and_retries(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        main(["get", "--help"])
    text = capsys.readouterr().out
    assert "--quiet" in text and "--retries" in text and "--json" in text


# ---------------------------------------------------------------------------- 12. messages


def _one_line(result: subprocess.CompletedProcess[Any]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("musiclib: "), result.stderr
    return str(lines[0])


def test_port_is_not_an_option_of_a_client(cli: Cli) -> None:
    done = cli("ls", "--port", "7660")
    assert done.returncode == 2
    assert _one_line(done) == (
        "musiclib: ls has no --port option: give the server as --server HOST:PORT "
        "(e.g. --server 127.0.0.1:7660)"
    )


def test_get_without_a_track_says_how(cli: Cli) -> None:
    done = cli("get", "--save")
    assert done.returncode == 2
    assert "which track? musiclib get TRACK" in _one_line(done)


def test_a_port_out_of_range(cli: Cli) -> None:
    done = cli("ls", server="127.0.0.1:99999")
    assert done.returncode == 2
    assert _one_line(done).endswith("the port must be 1-65535")


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = (tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem")
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths[0]))
    cert.private_key_pem.write_to_path(str(paths[1]))
    ca.cert_pem.write_to_path(str(paths[2]))
    return paths


def test_plain_against_tls_and_tls_against_plain(
    cli: Cli, server: Any, start_server: Any, tls_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    cert, key, ca = tls_files
    root = tmp_path / "root"
    root.mkdir()
    _tiny_wav(root / "a.wav", 10)
    tls = start_server(root, "--tls-cert", str(cert), "--tls-key", str(key))
    plain = cli("ls", server=tls.address)
    assert plain.returncode == 3
    assert "if it serves TLS, add --tls (or --cafile PEM)" in _one_line(plain)
    assert cli("ls", "--cafile", ca, server=tls.address).returncode == 0
    wrong = cli("ls", "--cafile", ca)  # the shared server speaks plain TCP
    assert wrong.returncode == 3
    assert "the server does not speak TLS (drop --tls and --cafile" in _one_line(wrong)


class _Peer:
    """A TCP server on 127.0.0.1 that is not musiclib: it sends ``greeting`` (if any) once
    it has read something, then holds the connection until the client leaves."""

    def __init__(self, greeting: bytes | None) -> None:
        self.greeting = greeting
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(60)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    conn.settimeout(60)
                    if conn.recv(4096) and self.greeting is not None:
                        conn.sendall(self.greeting)
                    while conn.recv(4096):  # until the client hangs up
                        pass
        except OSError:  # closed at the end of the test
            return

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=10)


@pytest.fixture
def web_server() -> Iterator[str]:
    peer = _Peer(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    yield peer.address
    peer.close()


def _silent_server() -> Any:
    from contextlib import contextmanager

    @contextmanager
    def run() -> Iterator[str]:
        peer = _Peer(None)
        try:
            yield peer.address
        finally:
            peer.close()

    return run()


def test_a_server_that_does_not_speak_musiclib(cli: Cli, web_server: str) -> None:
    done = cli("ls", server=web_server)
    assert done.returncode == 3
    assert _one_line(done) == (
        "musiclib: not a musiclib server: it is a web server ('HTTP/1.1 400 Bad Request'): "
        "check the port"
    )
    with _silent_server() as silent:
        quiet = cli("ls", "--timeout", "1", server=silent)
    assert quiet.returncode == 3
    assert "no complete answer to hello within 1 s: is this a musiclib server" in _one_line(quiet)


# ---------------------------------------------------------------------------- Ctrl-C during get


def test_ctrl_c_during_get_says_the_part_was_kept(
    monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path
) -> None:
    part = tmp_path / "b.flac.part"
    part.write_bytes(b"x" * 1234)
    note = cli_module._kept_part(tmp_path / "b.flac", 5000)
    assert note == f"kept {part} (1234 of 5000 bytes): run the same command again to resume"
    assert "nothing was kept" in cli_module._kept_part(tmp_path / "other.wav", 10)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt(note)

    monkeypatch.setattr(cli_module, "app", interrupted)
    with pytest.raises(SystemExit) as exited:
        main(["get", "x", "-o", str(tmp_path / "b.flac")])
    assert exited.value.code == 130
    assert capsys.readouterr().err == f"musiclib: interrupted: {note}\n"


# ---------------------------------------------------------------------------- status, in process


@pytest.fixture
async def in_process(nursery: Any, tmp_path: Path) -> Any:
    """A real server in this trio run on 127.0.0.1 (port 0) over a two-track root."""
    import functools

    import trio

    from musiclib.library import Library
    from musiclib.server import Server, ServerConfig, serve

    root = tmp_path / "root"
    root.mkdir()
    _tiny_wav(root / "2.wav", 10)
    _tiny_wav(root / "10.wav", 20)
    config = ServerConfig(root=root, port=0, index=tmp_path / "index.sqlite")
    server = Server(Library(root, config.index), config)
    await trio.to_thread.run_sync(server.library.rescan)
    addresses = await nursery.start(functools.partial(serve, config, server=server))
    host, port = addresses[0]
    yield server, f"{host}:{port}"
    server.stop()


async def test_status_counts_connections_and_scans(in_process: Any, capsys: Any) -> None:
    from musiclib.client import open_client

    _, address = in_process
    async with open_client(address, version=2) as first, open_client(address, version=2):
        status = await first.status()
    assert status.connections == 2  # the two open now, the asking one included
    assert status.tracks == 2 and status.versions == (1, 2)
    assert status.server.startswith("musiclib/") and status.uptime >= 0


async def test_status_of_a_server_older_than_status(
    in_process: Any, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older version 2 server answers ``status`` with bad_request: the welcome's facts."""
    from musiclib import server as server_module
    from musiclib.protocol import StatusRequest

    _, address = in_process
    older = {k: v for k, v in server_module._REQUESTS.items() if k is not StatusRequest}
    monkeypatch.setattr(server_module, "_REQUESTS", older)
    await cli_module.app.run_async(
        ["status", "--json", "--server", address], result_action="return_value"
    )
    out = json.loads(capsys.readouterr().out)
    assert out["tracks"] == 2 and out["versions"] == [1, 2]
    assert out["uptime"] is None and out["connections"] is None


def test_play_can_take_decode_options_without_format() -> None:
    """``WavDecodeOptions`` (for ``play``, which feeds players WAV only) has no --format."""
    from musiclib.cli import DecodeOptions, WavDecodeOptions

    assert not hasattr(WavDecodeOptions(), "format")
    wav = WavDecodeOptions(decode=True, rate=16000).decoding()
    assert wav is not None and wav.output == "wav" and wav.sample_rate == 16000
    raw = DecodeOptions(decode=True, format="s16le").decoding()
    assert raw is not None and raw.output == "s16le"
    with pytest.raises(UsageError, match=r"^--rate, --channels"):
        WavDecodeOptions(rate=8000).decoding()
    with pytest.raises(UsageError, match=r"^--format, --rate"):
        DecodeOptions(format="s16le").decoding()
