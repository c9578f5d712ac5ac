"""End to end: ``musiclib play`` with queues, the loopback gateway, and real players.

The real server (``musiclib serve`` on 127.0.0.1) and the real CLI, over a library made
here: an album whose track numbers are not in path order, a 60 s AAC ``.m4a`` whose
``moov`` atom is at the end (what ffmpeg writes by default), and a 10-minute WAV
(sparse: silence). Two kinds of player:

- **real mpv**, headless (``--ao=null --vo=null --no-terminal``), driven and observed
  through its JSON IPC socket (``--input-ipc-server``): the playlist it holds, the
  duration it reports, a seek. These tests skip, with one reason, when mpv is not
  installed: it is not in the Makefile's SYSTEM_DEPS (on Debian it pulls in about 150
  packages, 0.5 GB, for these few tests).
- **a stand-in named ``mpv``** on PATH (a short Python script): it reads the playlist
  file it is given and fetches every URL with HEAD and Range requests the way a player
  does, writing what it got. These run everywhere and check the bytes exactly.

The gateway's own log (``MUSICLIB_LOG_LEVEL=debug``: ``gateway: GET INDEX RANGE ->
STATUS``) tells which requests the player made.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, client_env, running_server

pytestmark = pytest.mark.e2e

#: seconds a play run may take before the test fails
RUN_TIMEOUT = 60
#: seconds to wait for mpv's IPC socket or a property to become what is expected
IPC_TIMEOUT = 20

ALBUM = [  # path, title, track number: album order is Alpha, Beta, Gamma
    ("Trio/a.flac", "Gamma", 3, 660),
    ("Trio/b.flac", "Alpha", 1, 440),
    ("Trio/c.flac", "Beta", 2, 550),
]
ALBUM_ORDER = ["Trio/b.flac", "Trio/c.flac", "Trio/a.flac"]
LONG_RATE = 8000
LONG_SECONDS = 600

needs_mpv = pytest.mark.skipif(
    shutil.which("mpv") is None,
    reason="mpv is not installed (apt install mpv): the real-player tests need it",
)


def ffmpeg() -> str:
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def run_ffmpeg(*args: str | Path) -> None:
    subprocess.run([ffmpeg(), "-loglevel", "error", *map(str, args)], check=True, timeout=60)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_long_wav(path: Path, seconds: int, rate: int) -> None:
    """A mono 16-bit WAV of ``seconds`` of silence, written sparse (a header and a hole)."""
    data = seconds * rate * 2
    header = b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    header += b"data" + struct.pack("<I", data)
    with path.open("wb") as f:
        f.write(header)
        f.truncate(len(header) + data)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("play-library")
    (root / "Trio").mkdir()
    for path, title, number, freq in ALBUM:
        run_ffmpeg(
            "-f", "lavfi", "-i", f"sine={freq}:duration=2", "-metadata", f"title={title}",
            "-metadata", "artist=Tester", "-metadata", "album=Trio",
            "-metadata", f"track={number}", root / path,
        )  # fmt: skip
    (root / "Late").mkdir()
    wav = root / "late-source.tmp"
    run_ffmpeg("-f", "lavfi", "-i", "sine=330:duration=60", "-ar", "44100", "-f", "wav", wav)
    late = root / "Late" / "late.m4a"
    run_ffmpeg("-i", wav, "-c:a", "aac", "-metadata", "title=Late Index", late)
    wav.unlink()
    data = late.read_bytes()
    assert data.find(b"moov") > data.find(b"mdat") > 0, "ffmpeg put moov first after all"
    (root / "Long").mkdir()
    make_long_wav(root / "Long" / "long.wav", LONG_SECONDS, LONG_RATE)
    return root


@pytest.fixture(scope="module")
def server(library: Path) -> Iterator[ServerProcess]:
    with running_server(library, log_level="info") as srv:
        yield srv


def cli_argv(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "musiclib", *(os.fspath(a) for a in args)]


def play_env(server: ServerProcess, extra: dict[str, str] | None = None) -> dict[str, str]:
    return client_env(
        {"MUSICLIB_SERVER": server.address, "MUSICLIB_LOG_LEVEL": "debug", **(extra or {})}
    )


def run_play(
    server: ServerProcess,
    *args: str | os.PathLike[str],
    cwd: Path,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv("play", *args),
        cwd=cwd,
        env=play_env(server, env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def gateway_requests(stderr: str) -> list[tuple[str, int, str, int]]:
    """(method, index, range, status) of every request the gateway logged."""
    found = re.findall(r"gateway: (GET|HEAD) (\d+) (\S+) -> (\d+)", stderr)
    return [(m, int(i), r, int(s)) for m, i, r, s in found]


def now_playing(stderr: str) -> list[str]:
    return re.findall(r"now playing: (.*)", stderr)


# ---- a stand-in player named mpv: runs everywhere ----------------------------------------

FAKE_MPV = """\
import json, os, sys, urllib.request
args = sys.argv[1:]
out = os.environ["FAKE_MPV_OUT"]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
playlist = next(a.split("=", 1)[1] for a in args if a.startswith("--playlist="))
lines = open(playlist, encoding="utf-8").read().splitlines()
urls = [line for line in lines if line and not line.startswith("#")]
record = {"argv": args, "lines": lines, "mode": os.stat(playlist).st_mode & 0o777,
          "cmdline": open(f"/proc/{os.getpid()}/cmdline", "rb").read().decode(), "tracks": []}
for n, url in enumerate(urls):
    with opener.open(urllib.request.Request(url, method="HEAD")) as r:
        size = int(r.headers["Content-Length"])
        head = [r.status, r.headers["Accept-Ranges"], r.headers["Content-Type"]]
    # like a player reading an MP4 index at the end, then the file from the start
    with opener.open(urllib.request.Request(url, headers={"Range": "bytes=-1000"})) as r:
        tail = [r.status, r.headers["Content-Range"], r.read()]
    with opener.open(urllib.request.Request(url, headers={"Range": "bytes=0-"})) as r:
        whole = r.read()
    assert whole.endswith(tail[2]), "the tail differs"
    with open(os.path.join(out, f"{n}.bin"), "wb") as f:
        f.write(whole)
    record["tracks"].append({"url": url, "size": size, "head": head, "tail": tail[:2]})
with open(os.path.join(out, "record.json"), "w") as f:
    json.dump(record, f)
"""


@pytest.fixture
def fake_mpv(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A PATH whose ``mpv`` is the stand-in, and the folder it writes to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "mpv"
    script.write_text(f"#!{sys.executable}\n{FAKE_MPV}")
    script.chmod(0o755)
    out = tmp_path / "heard"
    out.mkdir()
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_MPV_OUT": str(out)}
    return env, out


def test_an_album_is_one_playlist_in_album_order_served_exactly(
    server, library, fake_mpv, tmp_path
):
    env, out = fake_mpv
    work = tmp_path / "work"
    work.mkdir()
    result = run_play(server, "Trio", "--player", "mpv", cwd=work, env=env)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "record.json").read_text())
    assert len(record["tracks"]) == 3
    for n, path in enumerate(ALBUM_ORDER):  # album order, bytes exact through the gateway
        assert sha256(out / f"{n}.bin") == sha256(library / path), path
        track = record["tracks"][n]
        size = (library / path).stat().st_size
        assert track["size"] == size
        assert track["head"] == [200, "bytes", "audio/flac"]
        assert track["tail"] == [206, f"bytes {size - 1000}-{size - 1}/{size}"]
        assert track["url"].startswith("http://127.0.0.1:")
    assert record["lines"][0] == "#EXTM3U"
    assert "#EXTINF:2,Tester - Alpha" in record["lines"]
    assert record["mode"] == 0o600  # a private playlist file...
    token = record["tracks"][0]["url"].split("/")[3]
    assert len(token) >= 22
    assert token not in record["cmdline"]  # ...so the token is not in the process list
    assert now_playing(result.stderr) == [
        "Tester - Alpha (1/3)",
        "Tester - Beta (2/3)",
        "Tester - Gamma (3/3)",
    ]
    requests = gateway_requests(result.stderr)
    assert [r for r in requests if r[0] == "HEAD"] == [
        ("HEAD", i, "(whole)", 200) for i in range(3)
    ]
    assert not list(work.iterdir())  # nothing saved


def test_save_while_playing_by_url_verifies_every_track(server, library, fake_mpv, tmp_path):
    env, _ = fake_mpv
    work = tmp_path / "work"
    work.mkdir()
    result = run_play(server, "Trio", "--player", "mpv", "--save", cwd=work, env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["a.flac", "b.flac", "c.flac"]
    for path, *_ in ALBUM:
        assert sha256(work / Path(path).name) == sha256(library / path)
    assert result.stderr.count("sha256 verified") == 3


def test_a_saved_file_in_the_way_stops_play_before_it_starts(server, fake_mpv, tmp_path):
    env, out = fake_mpv
    (tmp_path / "c.flac").write_bytes(b"mine")
    result = run_play(server, "Trio", "--player", "mpv", "--save", cwd=tmp_path, env=env)
    assert result.returncode == 7, result.stderr
    assert "already exists" in result.stderr
    assert not (out / "record.json").exists()  # the player never started
    assert (tmp_path / "c.flac").read_bytes() == b"mine"


# ---- pipes: --pipe, and players that only read standard input ---------------------------

APPEND_PLAYER = """\
import shutil, sys
with open(sys.argv[1], "ab") as out:
    shutil.copyfileobj(sys.stdin.buffer, out)
"""


def append_player(tmp_path: Path) -> tuple[str, Path]:
    script = tmp_path / "append_player.py"
    script.write_text(APPEND_PLAYER)
    heard = tmp_path / "heard.bin"
    return shlex.join([sys.executable, str(script), str(heard)]), heard


def test_a_stdin_player_gets_the_queue_track_after_track(server, library, tmp_path):
    player, heard = append_player(tmp_path)
    result = run_play(server, "Trio", "--player", player, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = b"".join((library / p).read_bytes() for p in ALBUM_ORDER)
    assert heard.read_bytes() == expected
    assert gateway_requests(result.stderr) == []  # no URLs for a player that reads stdin
    assert len(now_playing(result.stderr)) == 3


def test_several_names_queue_in_the_order_given(server, library, tmp_path):
    player, heard = append_player(tmp_path)
    result = run_play(server, "Gamma", "Alpha", "--player", player, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    order = ["Trio/a.flac", "Trio/b.flac"]
    assert heard.read_bytes() == b"".join((library / p).read_bytes() for p in order)


def test_shuffle_plays_each_track_once(server, library, tmp_path):
    player, heard = append_player(tmp_path)
    result = run_play(server, "Trio", "--shuffle", "--player", player, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    titles = [line.split(" (")[0] for line in now_playing(result.stderr)]
    assert sorted(titles) == ["Tester - Alpha", "Tester - Beta", "Tester - Gamma"]
    by_title = {title: path for path, title, *_ in ALBUM}
    played = [by_title[t.removeprefix("Tester - ")] for t in titles]
    assert heard.read_bytes() == b"".join((library / p).read_bytes() for p in played)


def test_pipe_save_feeds_the_player_and_verifies_each(server, library, tmp_path):
    player, heard = append_player(tmp_path)
    result = run_play(server, "Trio", "--player", player, "--save", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert heard.read_bytes() == b"".join((library / p).read_bytes() for p in ALBUM_ORDER)
    for path, *_ in ALBUM:
        assert sha256(tmp_path / Path(path).name) == sha256(library / path)


def test_an_ambiguous_name_is_a_queue_for_play_and_an_error_for_get(server, tmp_path):
    got = subprocess.run(
        cli_argv("get", "Trio", "--save"),
        cwd=tmp_path,
        env=play_env(server),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert got.returncode == 4, got.stderr
    assert "matches 3 tracks" in got.stderr
    assert not list(tmp_path.iterdir())


def test_a_name_that_matches_nothing_is_exit_4(server, tmp_path):
    player, heard = append_player(tmp_path)
    result = run_play(server, "Trio", "no-such-thing-anywhere", "--player", player, cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    assert "no-such-thing-anywhere" in result.stderr
    assert not heard.exists()  # nothing played: the whole queue is resolved first


# ---- real mpv ---------------------------------------------------------------------------


class Mpv:
    """A ``musiclib play`` running a headless mpv, and mpv's JSON IPC socket."""

    def __init__(self, process: subprocess.Popen[str], ipc: Path) -> None:
        self.process = process
        self.ipc = ipc
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._id = 0

    def connect(self) -> None:
        deadline = time.monotonic() + IPC_TIMEOUT
        while True:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(IPC_TIMEOUT)
            try:
                sock.connect(str(self.ipc))
            except OSError:
                sock.close()
                if time.monotonic() > deadline or self.process.poll() is not None:
                    pytest.fail(f"mpv's IPC socket never opened: {self.finish()[1]}")
                time.sleep(0.05)
                continue
            self._sock = sock
            return

    def command(self, *args: Any) -> dict[str, Any]:
        """One IPC command and its reply (events in between are skipped)."""
        assert self._sock is not None
        self._id += 1
        self._sock.sendall(
            json.dumps({"command": list(args), "request_id": self._id}).encode() + b"\n"
        )
        for _ in range(10_000):
            while b"\n" not in self._buffer:
                data = self._sock.recv(65536)
                if not data:
                    raise ConnectionError("mpv closed its IPC socket")
                self._buffer += data
            line, self._buffer = self._buffer.split(b"\n", 1)
            reply = json.loads(line)
            if reply.get("request_id") == self._id:
                return dict(reply)
        raise AssertionError("no reply from mpv")

    def wait_for(self, prop: str, accept: Any = lambda v: v is not None) -> Any:
        """The value of ``prop`` once ``accept`` takes it (within IPC_TIMEOUT)."""
        deadline = time.monotonic() + IPC_TIMEOUT
        while True:
            reply = self.command("get_property", prop)
            if reply.get("error") == "success" and accept(reply.get("data")):
                return reply["data"]
            if time.monotonic() > deadline:
                pytest.fail(f"mpv's {prop} stayed {reply}")
            time.sleep(0.05)

    def quit(self) -> None:
        with contextlib.suppress(OSError):
            self.command("quit")

    def finish(self) -> tuple[int, str]:
        try:
            _, err = self.process.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate(timeout=10)
            pytest.fail(f"play did not end: {err}")
        if self._sock is not None:
            self._sock.close()
        return self.process.returncode, err


@contextlib.contextmanager
def mpv_play(
    server: ServerProcess,
    tmp_path: Path,
    *args: str,
    mpv_args: str = "",
    cwd: Path | None = None,
    connect_ipc: bool = True,
) -> Iterator[Mpv]:
    """``musiclib play ARGS`` with a headless mpv; with ``connect_ipc``, connected to mpv's IPC
    socket first (a test that only waits for the end must not: at ``--speed=8`` a
    short track, one mpv per track with ``--pipe``, can end before the socket is seen)."""
    ipc = tmp_path / "mpv.sock"
    player = f"mpv --ao=null --vo=null --no-terminal --input-ipc-server={ipc} {mpv_args}"
    process = subprocess.Popen(
        cli_argv("play", *args, "--player", player),
        cwd=cwd or tmp_path,
        env=play_env(server),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: play and its player, killed together
    )
    mpv = Mpv(process, ipc)
    failed = True
    try:
        if connect_ipc:
            mpv.connect()
        yield mpv
        failed = False
    finally:
        if failed and process.poll() is None:
            process.send_signal(signal.SIGINT)  # as Ctrl-C: play stops its player
        with contextlib.suppress(Exception):
            process.wait(timeout=10 if failed else RUN_TIMEOUT)
        # whatever is left of the group (play, or a player it left behind) goes now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@needs_mpv
def test_mpv_plays_an_album_as_one_queue_in_order(server, tmp_path):
    with mpv_play(server, tmp_path, "Trio", mpv_args="--pause") as mpv:
        playlist = mpv.wait_for("playlist", lambda v: v and len(v) == 3)
        names = [entry["filename"].rsplit("/", 1)[-1] for entry in playlist]
        assert names == ["b.flac", "c.flac", "a.flac"]
        assert [entry.get("title") for entry in playlist] == [
            "Tester - Alpha",
            "Tester - Beta",
            "Tester - Gamma",
        ]
        token = playlist[0]["filename"].split("/")[3]
        pid = mpv.wait_for("pid")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert token not in cmdline and "--playlist=" in cmdline
        mpv.command("set_property", "speed", 8)
        mpv.command("set_property", "pause", False)
        status, err = mpv.finish()  # mpv exits at the end of its playlist
    assert status == 0, err
    assert now_playing(err) == [
        "Tester - Alpha (1/3)",
        "Tester - Beta (2/3)",
        "Tester - Gamma (3/3)",
    ]
    first_asked = list(dict.fromkeys(i for m, i, _, _ in gateway_requests(err) if m == "GET"))
    assert first_asked == [0, 1, 2]


@needs_mpv
def test_mpv_knows_a_long_wav_s_true_length_and_seeks_past_the_download(server, tmp_path):
    size = (LONG_SECONDS * LONG_RATE * 2) + 44
    cache = "--cache=no --demuxer-max-bytes=128KiB --demuxer-readahead-secs=1"
    with mpv_play(server, tmp_path, "Long/long.wav", mpv_args=f"--pause {cache}") as mpv:
        duration = mpv.wait_for("duration")
        assert duration == pytest.approx(LONG_SECONDS, abs=0.01)
        # mpv refuses a seek until playback is set up ("error running command", seen
        # under load), later than it knows the duration: time-pos appears then
        mpv.wait_for("time-pos")
        reply = mpv.command("seek", 500, "absolute")
        assert reply["error"] == "success", reply
        position = mpv.wait_for("time-pos", lambda v: v is not None and v >= 499)
        assert position == pytest.approx(500, abs=1)
        mpv.quit()
        status, err = mpv.finish()
    assert status == 0, err
    ranges = [r for m, i, r, s in gateway_requests(err) if m == "GET" and s == 206]
    starts = [int(r.removeprefix("bytes=").split("-")[0]) for r in ranges]
    assert 0 in starts  # (logged when each request ends: the order may vary)
    # the seek became a request from about 500 s in (16000 bytes a second), far past
    # anything a 128 KiB demuxer cache had read
    assert any(abs(start - 500 * LONG_RATE * 2) < 64 * 1024 for start in starts), ranges
    assert max(starts) < size


@needs_mpv
def test_mpv_plays_an_m4a_whose_index_is_at_the_end(server, library, tmp_path):
    size = (library / "Late" / "late.m4a").stat().st_size
    with mpv_play(
        server, tmp_path, "Late Index", mpv_args="--pause --demuxer-max-bytes=64KiB"
    ) as mpv:
        duration = mpv.wait_for("duration")
        assert duration == pytest.approx(60, abs=0.2)
        mpv.wait_for("time-pos")  # (playback set up: a seek before it fails)
        assert mpv.command("seek", 57, "absolute")["error"] == "success"
        mpv.command("set_property", "pause", False)
        status, err = mpv.finish()  # to the end, then exit 0 (a file it cannot play: 2)
    assert status == 0, err
    starts = [
        int(r.removeprefix("bytes=").split("-")[0])
        for m, _, r, s in gateway_requests(err)
        if m == "GET" and s == 206
    ]
    assert any(start > size // 2 for start in starts), err  # it asked for the index at the end


@needs_mpv
def test_mpv_save_while_playing(server, library, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with mpv_play(
        server, tmp_path, "Trio", "--save", mpv_args="--speed=8", cwd=work, connect_ipc=False
    ) as mpv:
        status, err = mpv.finish()
    assert status == 0, err
    for path, *_ in ALBUM:
        assert sha256(work / Path(path).name) == sha256(library / path)
    assert err.count("sha256 verified") == 3


@needs_mpv
def test_mpv_through_a_pipe_still_plays(server, tmp_path):
    with mpv_play(
        server, tmp_path, "Trio", "--pipe", mpv_args="--speed=8", connect_ipc=False
    ) as mpv:
        status, err = mpv.finish()
    assert status == 0, err
    assert len(now_playing(err)) == 3
    assert gateway_requests(err) == []


@needs_mpv
def test_mpv_repeat_loops_the_playlist(server, tmp_path):
    with mpv_play(server, tmp_path, "Trio", "--repeat", mpv_args="--pause") as mpv:
        assert mpv.wait_for("loop-playlist") == "inf"
        assert len(mpv.wait_for("playlist", lambda v: v and len(v) == 3)) == 3
        mpv.quit()
        status, err = mpv.finish()
    assert status == 0, err
