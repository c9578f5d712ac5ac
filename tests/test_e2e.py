"""End to end: the real server (a subprocess on 127.0.0.1) and the real client CLI.

No mocks: every test runs ``python -m musiclib ...`` against ``python -m
musiclib serve``. Transfers are checked byte for byte (sha256) against the
files on disk; tags are checked against what an independent reader (mutagen,
or a RIFF walker written here for WAV) finds in the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import unicodedata
import wave
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import msgpack
import mutagen
import pytest
from conftest import LIBRARY, ServerProcess, client_env, media_files, run_cli
from mutagen.id3 import ID3
from mutagen.mp4 import MP4Tags

import musiclib
from musiclib.ui import format_duration, format_size

pytestmark = pytest.mark.e2e

#: seconds any background CLI run may take before the test gives up on it
RUN_TIMEOUT = 60

#: codec names ``ls`` reports for the formats the demo library ships
CODECS = {
    "mp3": "mp3",
    "ogg": "vorbis",
    "opus": "opus",
    "flac": "flac",
    "m4a": "aac",
    "wav": "pcm_s16le",
    "aiff": "pcm_s16be",
}

TRACK_FIELDS = (
    "path",
    "title",
    "artist",
    "album",
    "track",
    "duration",
    "codec",
    "sample_rate",
    "channels",
    "bitrate",
    "size",
)

# A "player" that copies its standard input into the file named by its argument.
COPY_PLAYER = """\
import shutil, sys
with open(sys.argv[1], "wb") as out:
    shutil.copyfileobj(sys.stdin.buffer, out)
"""

# A "player" that takes 1000 bytes and quits without reading the rest.
QUITTING_PLAYER = """\
import sys
data = sys.stdin.buffer.read(1000)
sys.exit(0 if len(data) == 1000 else 3)
"""


# ---------------------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def name_of(track: str) -> str:
    return PurePosixPath(track).name


def assert_one_error_line(stderr: str) -> str:
    """stderr is exactly one line, a ``musiclib:`` message, and no traceback; return it."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("musiclib: "), stderr
    return lines[0]


def riff_info(path: Path) -> dict[str, str]:
    """The LIST/INFO chunk of a RIFF WAVE file, e.g. ``{"INAM": "Title"}`` (our own walker)."""
    data = path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE", path
    out: dict[str, str] = {}
    pos = 12
    while pos + 8 <= len(data):  # every round moves on by at least 8 bytes
        cid = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"LIST" and body[:4] == b"INFO":
            sub = 4
            while sub + 8 <= len(body):
                sid = body[sub : sub + 4].decode("ascii")
                (ssize,) = struct.unpack_from("<I", body, sub + 4)
                value = body[sub + 8 : sub + 8 + ssize].split(b"\0", 1)[0]
                out[sid] = value.decode("utf-8")
                sub += 8 + ssize + (ssize & 1)
        pos += 8 + size + (size & 1)
    return out


def _track_number(value: Any) -> int | None:
    if isinstance(value, tuple):  # MP4 trkn: (number, total)
        value = value[0]
    match = re.match(r"\s*(\d+)", str(value)) if value is not None else None
    return int(match.group(1)) if match else None


def expected_tags(path: Path) -> dict[str, Any]:
    """title/artist/album/track as read independently from the file itself."""
    if path.suffix.lower() == ".wav":  # mutagen does not read RIFF INFO
        info = riff_info(path)
        return {
            "title": info.get("INAM"),
            "artist": info.get("IART"),
            "album": info.get("IPRD"),
            "track": _track_number(info.get("IPRT") or info.get("ITRK")),
        }
    audio = mutagen.File(path)
    assert audio is not None and audio.tags is not None, f"{path}: no tags"
    tags = audio.tags
    if isinstance(tags, ID3):
        keys = ("TIT2", "TPE1", "TALB", "TRCK")
    elif isinstance(tags, MP4Tags):
        keys = ("\xa9nam", "\xa9ART", "\xa9alb", "trkn")
    else:
        keys = ("title", "artist", "album", "tracknumber")

    def first(key: str) -> Any:
        value = tags.get(key)
        if value is not None and hasattr(value, "text"):  # an ID3 frame
            value = value.text
        if isinstance(value, list):
            value = value[0] if value else None
        return value

    title, artist, album, track = (first(k) for k in keys)
    return {"title": title, "artist": artist, "album": album, "track": _track_number(track)}


def write_script(tmp_path: Path, name: str, text: str) -> Path:
    script = tmp_path / name
    script.write_text(text)
    return script


def player_cmd(script: Path, *args: str | Path) -> str:
    return shlex.join([sys.executable, str(script), *map(str, args)])


def largest(tracks: list[str]) -> str:
    return max(tracks, key=lambda t: (LIBRARY / t).stat().st_size)


def unique_substring(tracks: list[str]) -> tuple[str, str]:
    """A (substring, track) pair: part of one track's title that no other path contains."""
    for track in tracks:
        stem = PurePosixPath(track).stem
        word = stem.split(" - ", 1)[-1]
        if len(word) >= 4 and sum(word.casefold() in t.casefold() for t in tracks) == 1:
            return word, track
    pytest.skip("no track has a title that no other path contains")


class Proxy:
    """A threaded TCP proxy on 127.0.0.1 in front of a server, for cutting and pausing.

    Only the server-to-client direction is touched, and only once: the first
    connection to carry N bytes that way is cut (``cut_after=N``: both sides
    shut down) or paused (``pause_after=N``: it waits for :attr:`gate`).
    Shorter connections before it (a ``get --save`` first asks which file a
    name means) and every connection after it are forwarded untouched.
    """

    def __init__(
        self, upstream_port: int, *, cut_after: int | None = None, pause_after: int | None = None
    ) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self.cut_after = cut_after
        self.pause_after = pause_after
        self.gate = threading.Event()  # set it to let a paused connection go on
        self.paused = threading.Event()  # set once the pause point is reached
        self.cut = threading.Event()  # set once the cut happened
        self.connections = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._spawn(self._accept_loop)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.2)
                if not ready:
                    continue
                client, _ = self._listener.accept()
            except (OSError, ValueError):  # closed underneath us
                return
            self.connections += 1
            try:
                upstream = socket.create_connection(self._upstream, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream, False)
            self._spawn(self._pump, upstream, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        done = self.cut.is_set() or self.paused.is_set()
        cut_after = self.cut_after if downstream and not done else None
        pause_after = self.pause_after if downstream and not done else None
        forwarded = 0
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([src], [], [], 0.2)
                if not ready:
                    continue
                data = src.recv(64 * 1024)
            except (OSError, ValueError):
                break
            if not data:
                break
            try:
                if cut_after is not None and forwarded + len(data) >= cut_after:
                    dst.sendall(data[: cut_after - forwarded])
                    for sock in (dst, src):
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                    self.cut.set()
                    return
                if pause_after is not None and forwarded + len(data) >= pause_after:
                    head = pause_after - forwarded
                    dst.sendall(data[:head])
                    forwarded += head
                    data = data[head:]
                    pause_after = None
                    self.paused.set()
                    if not self.gate.wait(RUN_TIMEOUT):
                        break
                if data:
                    dst.sendall(data)
                    forwarded += len(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self.gate.set()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)
        for sock in [self._listener, *sockets]:
            sock.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def frame(message: dict[str, Any]) -> bytes:
    """One message frame, built here from the wire format (kind 1, u32 length, msgpack map)."""
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">BI", 1, len(body)) + body


def recv_until_eof(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the peer sends until it closes (socket timeout set by the caller)."""
    data = bytearray()
    while len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """Read one message frame (socket timeout set by the caller)."""
    buf = b""
    while len(buf) < 5:
        chunk = sock.recv(5 - len(buf))
        assert chunk, "the server closed the connection"
        buf += chunk
    kind, length = struct.unpack(">BI", buf)
    assert kind == 1 and length < 1 << 20
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "the server closed the connection"
        body += chunk
    message = msgpack.unpackb(body, raw=False)
    assert isinstance(message, dict)
    return message


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def big_root(tmp_path: Path, shipped_tracks: list[str]) -> Iterator[Path]:
    """A root with an 8 MiB WAV (far more than the loopback buffers hold) and one shipped track."""
    root = tmp_path / "bigroot"
    root.mkdir()
    with wave.open(str(root / "big.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(random.Random(7).randbytes(8 << 20))
    small = min(shipped_tracks, key=lambda t: (LIBRARY / t).stat().st_size)
    shutil.copyfile(LIBRARY / small, root / name_of(small))
    yield root


# ---------------------------------------------------------------------------- 1. ls


def test_ls_json_lists_every_shipped_track_with_its_tags(cli, shipped_tracks):
    result = cli("ls", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    paths = [t["path"] for t in listed]
    assert sorted(paths) == shipped_tracks  # each exactly once
    for entry in listed:
        path = LIBRARY / entry["path"]
        for field in TRACK_FIELDS:
            assert field in entry, (entry["path"], field)
        tags = expected_tags(path)
        assert tags["artist"] and tags["album"], f"{path}: the shipped file lacks tags"
        assert entry["title"] == (tags["title"] or path.stem)
        assert entry["artist"] == tags["artist"]
        assert entry["album"] == tags["album"]
        assert entry["track"] == tags["track"]
        assert entry["size"] == path.stat().st_size
        assert entry["error"] is None
        ext = path.suffix[1:].lower()
        assert entry["format"] == ext
        assert entry["codec"] == CODECS.get(ext, entry["codec"]) and entry["codec"]
        info = mutagen.File(path).info
        assert entry["channels"] == info.channels
        assert entry["sample_rate"] == (48000 if ext == "opus" else info.sample_rate)
        assert entry["duration"] == pytest.approx(info.length, abs=0.5)
        assert entry["duration"] > 0
        assert isinstance(entry["bitrate"], int) and entry["bitrate"] > 0


def test_ls_table_lists_every_path(cli, shipped_tracks):
    result = cli("ls")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode("utf-8")
    lines = text.rstrip("\n").splitlines()
    assert lines[0].split()[:2] == ["PATH", "TITLE"]
    for track in shipped_tracks:
        assert sum(line.startswith(track + " ") for line in lines) == 1, track
    total = sum((LIBRARY / t).stat().st_size for t in shipped_tracks)
    assert lines[-1].startswith(f"{len(shipped_tracks)} tracks, ")  # count, time, size
    assert lines[-1].endswith(f", {format_size(total)}")


def _fold(text: str) -> str:
    """Case- and accent-insensitive form, as the spec describes ``ls QUERY`` matching."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def test_ls_query_filters(cli, shipped_tracks):
    everything = json.loads(cli("ls", "--json").stdout)
    haystacks = {
        t["path"]: _fold(" ".join(t[k] or "" for k in ("title", "artist", "album", "path")))
        for t in everything
    }
    for track in everything:
        query = _fold(track["title"])
        hits = [p for p, hay in haystacks.items() if all(w in hay for w in query.split())]
        if hits == [track["path"]]:
            break
    else:
        pytest.skip("no title matches only its own track")
    # upper case and accents stripped: matching ignores both
    result = cli("ls", "--json", query.upper())
    assert result.returncode == 0, result.stderr
    assert [t["path"] for t in json.loads(result.stdout)] == [track["path"]]
    nothing = cli("ls", "--json", "no-such-word-anywhere")
    assert nothing.returncode == 1, nothing.stderr  # nothing matched: like grep
    assert json.loads(nothing.stdout) == []


# ---------------------------------------------------------------------------- 2. get


def test_get_save_every_track_is_byte_identical(cli, shipped_track, tmp_path):
    result = cli("get", shipped_track, "--save", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    name = name_of(shipped_track)
    assert os.listdir(tmp_path) == [name]  # and no .part left behind
    assert sha256(tmp_path / name) == sha256(LIBRARY / shipped_track)
    assert result.stdout == b""


def test_get_to_stdout_every_track_is_byte_identical(cli, shipped_track, tmp_path):
    result = cli("get", shipped_track, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (LIBRARY / shipped_track).read_bytes()
    assert os.listdir(tmp_path) == []


def test_get_output_path_and_output_folder(cli, shipped_tracks, tmp_path):
    track = shipped_tracks[0]
    dest = tmp_path / "elsewhere.bin"
    result = cli("get", track, "-o", dest, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sha256(dest) == sha256(LIBRARY / track)
    folder = tmp_path / "folder"
    folder.mkdir()
    result = cli("get", track, "--output", folder, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert os.listdir(folder) == [name_of(track)]
    assert sha256(folder / name_of(track)) == sha256(LIBRARY / track)
    assert sorted(os.listdir(tmp_path)) == ["elsewhere.bin", "folder"]


def test_get_by_file_name_and_by_substring(cli, shipped_tracks, tmp_path):
    names = [name_of(t) for t in shipped_tracks]
    by_name = next(t for t in shipped_tracks if names.count(name_of(t)) == 1)
    result = cli("get", name_of(by_name))
    assert result.returncode == 0, result.stderr
    assert result.stdout == (LIBRARY / by_name).read_bytes()

    word, by_word = unique_substring(shipped_tracks)
    result = cli("get", word.swapcase(), "--save", cwd=tmp_path)  # case does not matter
    assert result.returncode == 0, result.stderr
    assert sha256(tmp_path / name_of(by_word)) == sha256(LIBRARY / by_word)


# ---------------------------------------------------------------------------- 3. play


def test_play_every_track_feeds_the_player_exact_bytes(cli, shipped_track, tmp_path):
    script = write_script(tmp_path, "copy_player.py", COPY_PLAYER)
    copy = tmp_path / "copy.out"
    result = cli("play", shipped_track, "--player", player_cmd(script, copy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert sha256(copy) == sha256(LIBRARY / shipped_track)
    assert sorted(os.listdir(tmp_path)) == ["copy.out", "copy_player.py"]  # nothing saved


@pytest.mark.parametrize("how", ["--save", "-o"])
def test_play_and_save_at_once(cli, shipped_tracks, tmp_path, how):
    track = largest(shipped_tracks)
    script = write_script(tmp_path, "copy_player.py", COPY_PLAYER)
    copy = tmp_path / "copy.out"
    dest = tmp_path / "saved.bin"
    extra = ["--save"] if how == "--save" else ["-o", str(dest)]
    result = cli("play", track, "--player", player_cmd(script, copy), *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = tmp_path / name_of(track) if how == "--save" else dest
    expected = sha256(LIBRARY / track)
    assert sha256(saved) == expected
    assert sha256(copy) == expected
    assert not list(tmp_path.glob("*.part"))


def test_player_quitting_early_does_not_stop_the_save(cli, shipped_tracks, tmp_path):
    track = largest(shipped_tracks)
    script = write_script(tmp_path, "quitter.py", QUITTING_PLAYER)
    result = cli("play", track, "--player", player_cmd(script), "--save", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert sha256(tmp_path / name_of(track)) == sha256(LIBRARY / track)
    assert not list(tmp_path.glob("*.part"))


def test_player_quitting_early_without_save_ends_cleanly(cli, shipped_tracks, tmp_path):
    track = largest(shipped_tracks)
    script = write_script(tmp_path, "quitter.py", QUITTING_PLAYER)
    result = cli("play", track, "--player", player_cmd(script), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["quitter.py"]


def test_player_from_environment(cli, shipped_tracks, tmp_path):
    track = shipped_tracks[0]
    script = write_script(tmp_path, "copy_player.py", COPY_PLAYER)
    copy = tmp_path / "copy.out"
    env = {"MUSICLIB_PLAYER": player_cmd(script, copy)}
    result = cli("play", track, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert sha256(copy) == sha256(LIBRARY / track)


# ---------------------------------------------------------------------------- 4. resume


def test_cut_connection_leaves_part_and_second_run_resumes(server, shipped_tracks, tmp_path):
    track = largest(shipped_tracks)
    size = (LIBRARY / track).stat().st_size
    name = name_of(track)
    with Proxy(server.port, cut_after=size // 2) as proxy:
        first = run_cli(
            "get", track, "--save", "--retries", "0", server=proxy.address, cwd=tmp_path
        )
        assert proxy.cut.is_set()
        assert first.returncode != 0
        assert_one_error_line(first.stderr)
        part = tmp_path / (name + ".part")
        assert os.listdir(tmp_path) == [part.name]  # nothing at NAME yet
        kept = part.stat().st_size
        assert 0 < kept < size
        assert part.read_bytes() == (LIBRARY / track).read_bytes()[:kept]

        second = run_cli("get", track, "--save", server=proxy.address, cwd=tmp_path)
        assert second.returncode == 0, second.stderr
        assert "resumed" in second.stderr
        assert proxy.connections == 2  # two runs, each on one connection: info, then bytes
    assert os.listdir(tmp_path) == [name]
    assert sha256(tmp_path / name) == sha256(LIBRARY / track)
    # the server really was asked for the rest only
    server.wait_for_log(re.escape(f"stream {track} from byte {kept}"))


@pytest.mark.parametrize("to_stdout", [False, True], ids=["save", "stdout"])
def test_get_survives_a_cut_connection_by_itself(server, shipped_tracks, tmp_path, to_stdout):
    track = largest(shipped_tracks)
    size = (LIBRARY / track).stat().st_size
    name = name_of(track)
    args = ("get", track) if to_stdout else ("get", track, "--save")
    with Proxy(server.port, cut_after=size // 3) as proxy:
        run = run_cli(*args, server=proxy.address, cwd=tmp_path)
        assert proxy.cut.is_set()
    assert run.returncode == 0, run.stderr
    assert "retrying" in run.stderr  # one line about the retry, then success
    assert "Traceback" not in run.stderr
    got = run.stdout if to_stdout else (tmp_path / name).read_bytes()
    assert hashlib.sha256(got).hexdigest() == sha256(LIBRARY / track)
    assert os.listdir(tmp_path) == ([] if to_stdout else [name])
    # the retry asked only for what was missing
    assert re.search(rf"stream {re.escape(track)} from byte [1-9]", server.log())


# ---------------------------------------------------------------------------- 5. traversal


@pytest.mark.parametrize(
    "name",
    ["../pyproject.toml", "/etc/passwd", "../../etc/passwd", "x/../../README.md"],
)
@pytest.mark.parametrize("save", [False, True])
def test_names_outside_the_root_are_refused(cli, tmp_path, name, save):
    result = cli("get", name, *(["--save"] if save else []), cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    line = assert_one_error_line(result.stderr)
    assert re.search(r"no track|invalid track name", line), line
    assert result.stdout == b""
    assert os.listdir(tmp_path) == []


def test_symlinks_leaving_the_root_are_invisible(start_server, shipped_tracks, tmp_path):
    mp3 = next(t for t in shipped_tracks if t.endswith(".mp3"))
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(LIBRARY / mp3, outside / "secret.mp3")
    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    shutil.copyfile(LIBRARY / mp3, root / "inside" / "real.mp3")
    (root / "evil.mp3").symlink_to("/etc/passwd")
    (root / "leak.mp3").symlink_to(outside / "secret.mp3")
    (root / "outdir").symlink_to(outside, target_is_directory=True)
    (root / "alias.mp3").symlink_to(Path("inside") / "real.mp3")
    srv = start_server(root)
    work = tmp_path / "work"
    work.mkdir()

    listed = run_cli("ls", "--json", server=srv.address)
    assert listed.returncode == 0, listed.stderr
    assert sorted(t["path"] for t in json.loads(listed.stdout)) == ["alias.mp3", "inside/real.mp3"]

    for name in ["evil.mp3", "leak.mp3", "outdir/secret.mp3", "secret"]:
        result = run_cli("get", name, "--save", server=srv.address, cwd=work)
        assert result.returncode == 4, (name, result.stderr)
        assert_one_error_line(result.stderr)
        assert os.listdir(work) == []

    inside = run_cli("get", "alias.mp3", "--save", server=srv.address, cwd=work)
    assert inside.returncode == 0, inside.stderr
    assert sha256(work / "alias.mp3") == sha256(LIBRARY / mp3)


# ---------------------------------------------------------------------------- 6. concurrency


def test_two_downloads_at_once(server, shipped_tracks, tmp_path, cli_popen):
    first, second = sorted(shipped_tracks, key=lambda t: (LIBRARY / t).stat().st_size)[-2:]
    procs = [
        cli_popen("get", track, "--save", server=server.address, cwd=tmp_path)
        for track in (first, second)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
        assert proc.returncode == 0, err.decode()
    for track in (first, second):
        assert sha256(tmp_path / name_of(track)) == sha256(LIBRARY / track)


def test_other_clients_are_served_while_a_download_is_stalled(
    start_server, big_root, tmp_path, cli_popen
):
    srv = start_server(big_root)
    small = next(p.name for p in big_root.iterdir() if p.name != "big.wav")
    work = tmp_path / "work"
    work.mkdir()
    with Proxy(srv.port, pause_after=1 << 20) as proxy:
        download = cli_popen("get", "big.wav", "--save", server=proxy.address, cwd=work)
        assert proxy.paused.wait(RUN_TIMEOUT), "the download never got going"
        listed = run_cli("ls", "--json", server=srv.address)
        assert listed.returncode == 0, listed.stderr
        assert sorted(t["path"] for t in json.loads(listed.stdout)) == sorted(["big.wav", small])
        other = run_cli("get", small, server=srv.address)
        assert other.returncode == 0, other.stderr
        assert other.stdout == (big_root / small).read_bytes()
        assert download.poll() is None  # still stalled behind the proxy
        proxy.gate.set()
        _, err = download.communicate(timeout=RUN_TIMEOUT)
    assert download.returncode == 0, err.decode()
    assert sha256(work / "big.wav") == sha256(big_root / "big.wav")


# ---------------------------------------------------------------------------- 7. errors


def test_unknown_track(cli, tmp_path):
    result = cli("get", "no-such-track-anywhere", "--save", cwd=tmp_path)
    assert result.returncode == 4
    assert "no-such-track-anywhere" in assert_one_error_line(result.stderr)
    assert os.listdir(tmp_path) == []


def test_ambiguous_name_lists_the_candidates(cli, shipped_tracks):
    folder = shipped_tracks[0].split("/", 1)[0]
    candidates = [t for t in shipped_tracks if folder.casefold() in t.casefold()]
    assert len(candidates) >= 2
    result = cli("get", folder)
    assert result.returncode == 4
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("musiclib: ")
    assert result.stdout == b""
    missing = [c for c in candidates if c not in result.stderr]
    assert not missing, f"candidates not shown: {missing}\nstderr: {result.stderr}"


def test_server_unreachable(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    for args in (["ls"], ["get", "x", "--save"]):
        result = run_cli(*args, server=address, cwd=tmp_path)
        assert result.returncode == 3, result.stderr
        assert address in assert_one_error_line(result.stderr)


def test_player_not_found(cli, shipped_tracks, tmp_path):
    result = cli("play", shipped_tracks[0], "--player", "definitely-not-a-player-xyz", cwd=tmp_path)
    assert result.returncode == 6
    assert "definitely-not-a-player-xyz" in assert_one_error_line(result.stderr)
    assert os.listdir(tmp_path) == []


def test_bad_command_line(cli):
    result = cli("ls", "--no-such-option")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- 8. robustness


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.0\r\n\r\n", struct.pack(">BI", 1, 0xFFFFFFFF)],
    ids=["http", "huge-frame"],
)
def test_garbage_gets_an_error_frame_and_the_server_goes_on(cli, server, garbage, shipped_tracks):
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(garbage)
        answer = recv_until_eof(sock)
    assert len(answer) > 5
    kind, length = struct.unpack_from(">BI", answer)
    assert kind == 1 and len(answer) == 5 + length
    message = msgpack.unpackb(answer[5:], raw=False)
    assert message["type"] == "error"
    assert message["code"] == "bad_request"
    assert message["fatal"] is True

    result = cli("ls", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == len(shipped_tracks)
    assert "Traceback" not in server.log()


def test_hello_then_garbage_then_normal_service(cli, server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(frame({"type": "hello", "version": 1, "client": "test"}))
        welcome = recv_frame(sock)
        assert welcome["type"] == "welcome"
        # a well-framed but invalid request: answered, and the connection stays usable
        sock.sendall(frame({"type": "stream", "track": 5}))
        assert recv_frame(sock)["code"] == "bad_request"
        sock.sendall(frame({"type": "info", "track": "no-such-track-anywhere"}))
        reply = recv_frame(sock)
        assert reply["type"] == "error" and reply["code"] == "not_found"
    assert cli("ls").returncode == 0


# ---------------------------------------------------------------------------- 9. stopping


def test_sigterm_with_an_idle_client_exits_zero(start_server):
    srv: ServerProcess = start_server(LIBRARY)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as sock:
        sock.sendall(frame({"type": "hello", "version": 1, "client": "test"}))
        assert recv_frame(sock)["type"] == "welcome"
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(timeout=15) == 0, srv.log()
        assert recv_until_eof(sock) == b""  # the idle connection was closed
    assert "stopped" in srv.log()


def test_sigterm_lets_a_running_download_finish(start_server, big_root, tmp_path, cli_popen):
    # a generous grace period: the point is that a running stream may finish, not how fast
    srv = start_server(big_root, "--grace", "30")
    with Proxy(srv.port, pause_after=1 << 20) as proxy:
        download = cli_popen("get", "big.wav", "--save", server=proxy.address, cwd=tmp_path)
        assert proxy.paused.wait(RUN_TIMEOUT), "the download never got going"
        srv.process.send_signal(signal.SIGTERM)
        srv.wait_for_log("shutting down")
        proxy.gate.set()  # the rest must arrive within the grace period
        _, err = download.communicate(timeout=RUN_TIMEOUT)
    assert download.returncode == 0, err.decode()
    assert sha256(tmp_path / "big.wav") == sha256(big_root / "big.wav")
    assert srv.process.wait(timeout=15) == 0, srv.log()


def test_version(tmp_path):
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == musiclib.__version__


# ---------------------------------------------------------------------------- progress


def run_on_a_terminal(args: list[str], cwd: Path, address: str) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as its stdin, stdout and stderr; its output."""
    import pty

    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "musiclib", *args],
        cwd=cwd,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=client_env({"MUSICLIB_SERVER": address, "COLUMNS": "120"}),
    )
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                output += data
            elif process.poll() is not None:
                break
        status = process.wait(timeout=30)
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    return status, output.decode("utf-8", "replace")


def test_progress_bar_on_a_terminal_and_only_there(server, shipped_tracks, tmp_path):
    track = largest(shipped_tracks)
    size_kb = f"{(LIBRARY / track).stat().st_size / 1000:.1f}"
    status, shown = run_on_a_terminal(["get", track, "--save"], tmp_path, server.address)
    assert status == 0, shown
    assert "━" in shown  # rich's bar
    assert f"{size_kb}/{size_kb} kB" in shown  # bytes done / total when it ends
    assert "saved " in shown
    (tmp_path / name_of(track)).unlink()
    status, shown = run_on_a_terminal(["get", track, "--save", "--quiet"], tmp_path, server.address)
    assert status == 0, shown
    assert "━" not in shown and "saved " not in shown  # --quiet: nothing at all
    assert sha256(tmp_path / name_of(track)) == sha256(LIBRARY / track)
    (tmp_path / name_of(track)).unlink()
    piped = run_cli("get", track, "--save", server=server.address, cwd=tmp_path)
    assert piped.returncode == 0
    assert "━" not in piped.stderr  # not a terminal: no bar


def test_play_progress_shows_the_track_time(server, shipped_tracks, tmp_path):
    track = min(shipped_tracks, key=lambda t: (LIBRARY / t).stat().st_size)
    script = write_script(tmp_path, "copy_player.py", COPY_PLAYER)
    copy = tmp_path / "copy.out"
    status, shown = run_on_a_terminal(
        ["play", track, "--player", player_cmd(script, copy)], tmp_path, server.address
    )
    assert status == 0, shown
    listed = json.loads(run_cli("ls", "--json", server=server.address).stdout)
    length = next(t["duration"] for t in listed if t["path"] == track)
    assert f" / {format_duration(length)}" in shown  # elapsed / total
    assert copy.read_bytes() == (LIBRARY / track).read_bytes()


def test_json_log_records(tmp_path):
    from conftest import running_server

    shutil.copy(LIBRARY / largest(media_files(LIBRARY)), tmp_path / "a.flac")
    with running_server(tmp_path, "--log-format", "json", log_level="info") as srv:
        assert run_cli("get", "nothing-here", server=srv.address).returncode == 4
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(b"LIST\r\n")  # a bad peer: one warning record
            while sock.recv(65536):
                pass
        srv.wait_for_log("protocol error", timeout=10)
        records = [json.loads(line) for line in srv.log().splitlines() if line.strip()]
    assert records and all(set(r) >= {"time", "level", "logger", "message"} for r in records)
    assert any(r["message"].startswith("listening on 127.0.0.1:") for r in records)
    assert any(r["level"] == "warning" and "protocol error" in r["message"] for r in records)


def test_a_full_disk_and_a_missing_folder_are_one_line_and_exit_7(server, shipped_tracks, tmp_path):
    track = largest(shipped_tracks)
    with open("/dev/full", "wb") as full:  # every write fails with ENOSPC
        run = subprocess.run(
            [sys.executable, "-m", "musiclib", "get", track],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=client_env({"MUSICLIB_SERVER": server.address}),
            timeout=60,
        )
    assert run.returncode == 7, run.stderr
    assert_one_error_line(run.stderr)
    assert "disk is full" in run.stderr
    missing = run_cli(
        "get", track, "-o", str(tmp_path / "no" / "such" / "x.mp3"), server=server.address
    )
    assert missing.returncode == 7
    assert_one_error_line(missing.stderr)
    assert "folder does not exist" in missing.stderr


def test_a_stream_request_sent_with_the_hello_is_answered_after_the_welcome(server, shipped_tracks):
    """PROTOCOL.md, "Conversation": a request may follow the hello without waiting."""
    track = shipped_tracks[0]
    size = (LIBRARY / track).stat().st_size
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        hello = frame({"type": "hello", "version": 1, "client": "early/1"})
        sock.sendall(hello + frame({"type": "stream", "track": track}))  # one write
        welcome = recv_frame(sock)
        assert welcome["type"] == "welcome" and welcome["version"] == 1
        start = recv_frame(sock)
        assert start["type"] == "stream_start" and start["size"] == size, start


def test_get_sends_its_hello_with_its_first_request_and_a_refusal_reads_the_same(
    start_server, shipped_tracks, tmp_path
):
    """``get`` does not wait for the welcome; a refused hello still gives the one error line
    a command that waits for it (``ls``) gives."""
    srv = start_server(LIBRARY, "--token", "s3cret")
    track = shipped_tracks[0]
    refused = [
        run_cli(*args, server=srv.address, cwd=tmp_path)
        for args in (["ls"], ["get", track, "--save"], ["play", track, "--player", "cat"])
    ]
    lines = {assert_one_error_line(r.stderr) for r in refused}
    assert len(lines) == 1 and "token" in lines.pop(), [r.stderr for r in refused]
    assert len({r.returncode for r in refused}) == 1 and refused[0].returncode != 0
    ok = run_cli(
        "get", track, "--save", server=srv.address, cwd=tmp_path, env={"MUSICLIB_TOKEN": "s3cret"}
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / name_of(track)).read_bytes() == (LIBRARY / track).read_bytes()
