"""End to end: hostile networks and hostile files.

The real server (``python -m musiclib serve``, a subprocess on 127.0.0.1) is
fed garbage, silence and stalls; its library is filled with broken files and
changed under it while it streams; it is asked for tokens, TLS and a
connection limit, stopped with SIGTERM, and its client is stopped with
Ctrl-C. Every peer here is a real socket or the real CLI; every wait has a
deadline, and the only time limits asserted from above are the ones the spec
states itself ("refused within a second", "exits within the grace period").

The bad-input test also builds the table of inputs and outcomes that
WRITEUP.md carries between ``<!-- bad-inputs:start -->`` and
``<!-- bad-inputs:end -->``: the table comes from what the test saw, and the
test fails (printing the table to paste) when the two differ.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pty
import random
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import termios
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trustme
from conftest import (
    LIBRARY,
    REPO,
    ServerProcess,
    client_env,
    run_cli,
    running_server,
)
from test_e2e import Proxy, assert_one_error_line, frame, name_of, sha256
from test_e2e_decode import RawStream, ffmpeg_children

from musiclib.errors import RemoteProtocolError
from musiclib.protocol import (
    PROTOCOL_VERSION,
    Closed,
    Connection,
    Data,
    Error,
    Event,
    Hello,
    ListEnd,
    ListRequest,
    Message,
    NeedData,
    Role,
    StreamRequest,
    StreamStart,
    TrackPage,
    Welcome,
)

pytestmark = pytest.mark.e2e

#: seconds any single socket read or CLI run may take before the test gives up
IO_TIMEOUT = 30.0
#: seconds between polls of a condition that has a deadline
POLL = 0.05
#: bytes of a file that a server streaming it to a paused peer is still in the
#: middle of, not done with: more than the socket buffers between them hold (the
#: tests check where the server stands in the file, through /proc)
HUGE = 16 << 20

_LISTENING = re.compile(r"listening on \[?([0-9A-Fa-f.:]+)\]?:(\d+)")
_INDEXED = re.compile(r"indexed \d+ tracks")
#: one line of the server log: "DATE TIME LEVEL LOGGER: MESSAGE"
_LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<message>.*)$")


# ---------------------------------------------------------------------------- helpers


def serving(root: Path, *args: str, log_level: str = "info") -> Any:
    """conftest's ``running_server`` at the log level these tests read (info by default)."""
    return running_server(root, *args, log_level=log_level)


def lines_naming(log: str, port: int) -> list[str]:
    """The log lines that name the peer ``127.0.0.1:port``."""
    pattern = re.compile(rf"127\.0\.0\.1:{port}(?!\d)")
    return [line for line in log.splitlines() if pattern.search(line)]


def write_wav(path: Path, payload: bytes) -> bytes:
    """A mono 16-bit 8 kHz WAV holding ``payload`` as its samples; returns the file's bytes."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(payload)
    data = buf.getvalue()
    path.write_bytes(data)
    return data


def smallest(tracks: list[str], suffix: str = "") -> str:
    chosen = [t for t in tracks if t.endswith(suffix)] or pytest.skip(f"no {suffix} track")
    return min(chosen, key=lambda t: (LIBRARY / t).stat().st_size)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` every POLL seconds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(POLL)


def process_gone(pid: int) -> bool:
    """True once ``/proc/PID`` is gone (exited and reaped; a zombie still counts as there)."""
    return not os.path.exists(f"/proc/{pid}")


def file_position(pid: int, path: Path) -> int | None:
    """Where process ``pid`` stands in its open ``path`` (from /proc), or None if not open."""
    real = os.path.realpath(path)
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != real:
                    continue
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            except OSError:  # closed meanwhile
                continue
            match = re.search(r"^pos:\s*(\d+)", info, re.M)
            if match:
                return int(match.group(1))
    return None


def settled_position(pid: int, path: Path, timeout: float = IO_TIMEOUT) -> int:
    """Wait until ``pid`` has ``path`` open and its position stops moving for 0.5 s."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        pos = file_position(pid, path)
        if pos != last:
            last, since = pos, time.monotonic()
        elif pos is not None and time.monotonic() - since >= 0.5:
            return pos
        time.sleep(POLL)
    pytest.fail(f"the server's position in {path.name} never settled (last: {last})")


class Peer:
    """A raw TCP connection to the server, read with the client's protocol object.

    Bytes go out raw (anything at all), and whatever the server answers is
    decoded by ``Connection(Role.CLIENT)``; a reset counts as the end.
    """

    def __init__(self, port: int, *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(("127.0.0.1", port))
        self.port: int = self.sock.getsockname()[1]
        self.conn = Connection(Role.CLIENT)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_message(self, msg: Message) -> None:
        self.sock.sendall(self.conn.send(msg))

    def hello(self, **fields: Any) -> Welcome:
        self.send_message(Hello(version=PROTOCOL_VERSION, client="test_hostile", **fields))
        welcome = self.event()
        assert isinstance(welcome, Welcome), welcome
        return welcome

    def event(self, read_size: int = 65536) -> Event:
        """The next event from the server; each read bounded by IO_TIMEOUT."""
        while True:
            event = self.conn.next_event()
            if not isinstance(event, NeedData):
                return event
            try:
                data = self.sock.recv(read_size)
            except ConnectionResetError:
                data = b""
            self.conn.receive_data(data)

    def list_count(self) -> int:
        """Ask for the whole list; the count in ``list_end`` (pages checked against it)."""
        self.send_message(ListRequest())
        listed = 0
        while True:
            event = self.event()
            if isinstance(event, TrackPage):
                listed += len(event.tracks)
            else:
                assert isinstance(event, ListEnd), event
                assert event.count == listed
                return listed

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------- 1. garbage in

HANDSHAKE_TIMEOUT = 2.0
MAX_MESSAGE_SIZE = 4096
MARK_START = "<!-- bad-inputs:start -->"
MARK_END = "<!-- bad-inputs:end -->"
WRITEUP = REPO / "WRITEUP.md"
TABLE_SECTION = "### Bad inputs tried (generated by tests/test_hostile.py)"


def hello_frame(**fields: Any) -> bytes:
    return frame({"type": "hello", "version": PROTOCOL_VERSION, "client": "test", **fields})


def hello_of_size(size: int) -> bytes:
    """A valid hello frame whose body is exactly ``size`` bytes (padded in ``client``)."""
    for pad in range(size, 0, -1):
        body = msgpack.packb({"type": "hello", "version": 1, "client": "x" * pad})
        if len(body) == size:
            return struct.pack(">BI", 1, size) + body
    raise AssertionError(f"no hello of {size} bytes")


def tls_client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello), made in memory."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    data = outgoing.read()
    assert data[:1] == b"\x16", "not a TLS handshake record"
    return data


@dataclass(frozen=True)
class BadInput:
    """One hostile peer: a name for the table, what it sends, and how."""

    name: str
    payload: bytes
    after_hello: bool = False  # send ``payload`` after a proper handshake
    then_eof: bool = False  # shut down our sending side after ``payload``


BAD_INPUTS = [
    *(
        BadInput(f"256 random bytes (seed {seed})", random.Random(seed).randbytes(256))
        for seed in (1, 2, 3)
    ),
    BadInput("a hello frame cut in half, then EOF", hello_frame()[:16], then_eof=True),
    BadInput("a frame header announcing 0xFFFFFFF0 bytes", struct.pack(">BI", 1, 0xFFFFFFF0)),
    BadInput(f"a 5000-byte hello (limit {MAX_MESSAGE_SIZE})", hello_of_size(5000)),
    BadInput("a hello with `version` as a string", hello_frame(version="1")),
    BadInput("a hello with protocol version 99", hello_frame(version=99)),
    BadInput("a msgpack array instead of a map, as hello", frame([1, 2, 3])),
    BadInput(
        "a `stream` request with wrong field types, after hello",
        frame({"type": "stream", "track": 5, "offset": "zero"}),
        after_hello=True,
    ),
    BadInput(
        "an unknown message type, after hello",
        frame({"type": "launch_missiles"}),
        after_hello=True,
    ),
    BadInput(
        "a message frame that is not msgpack, after hello",
        struct.pack(">BI", 1, 4) + b"\xc1\xc1\xc1\xc1",
        after_hello=True,
    ),
    BadInput(
        "a data frame (kind 2), after hello",
        struct.pack(">BI", 2, 4) + b"data",
        after_hello=True,
    ),
    BadInput(
        "a `welcome` sent by the client, after hello",
        frame({"type": "welcome", "version": 1, "server": "evil"}),
        after_hello=True,
    ),
    BadInput("an HTTP request (`GET / HTTP/1.1`)", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    BadInput("a line of the course's text protocol (`LIST`)", b"LIST\r\n"),
    BadInput("a TLS ClientHello", tls_client_hello()),
    BadInput("nothing at all (connect and wait)", b""),
]


def what_the_peer_got(peer: Peer, began: float) -> str:
    """Read the server's answer to the end: e.g. "fatal bad_request, closed"."""
    got: list[str] = []
    while True:
        try:
            event = peer.event()
        except RemoteProtocolError as exc:  # the answer itself broke the protocol
            return f"an unparseable answer ({exc})"
        if isinstance(event, Error):
            got.append(f"{'fatal ' if event.fatal else ''}`{event.code}`")
            if not event.fatal:  # the server says the connection goes on: does it?
                peer.list_count()
                got.append("connection usable")
                return ", ".join(got)
        elif isinstance(event, Closed):
            if got:
                got.append("closed")
            elif time.monotonic() - began >= HANDSHAKE_TIMEOUT:
                got.append("no answer; closed at the handshake timeout")
            else:
                got.append("no answer; closed at once")
            return ", ".join(got)
        else:
            got.append(f"`{type(event).__name__}`")


def try_bad_input(port: int, bad: BadInput) -> tuple[str, int]:
    """Play one hostile peer; what it got, and its port (to find it in the log)."""
    began = time.monotonic()
    peer = Peer(port)
    try:
        if bad.after_hello:
            peer.hello()
        if bad.payload:
            peer.send(bad.payload)
        if bad.then_eof:
            peer.sock.shutdown(socket.SHUT_WR)
        return what_the_peer_got(peer, began), peer.port
    finally:
        peer.close()


def server_said(log: str, port: int) -> str:
    """What the server logged about the peer at ``port``: "LEVEL: message" per line."""
    said = []
    for line in lines_naming(log, port):
        match = _LOG_LINE.match(line)
        if match is None:
            said.append(line)
            continue
        message = re.sub(rf"^127\.0\.0\.1:{port}: ", "", match["message"])
        said.append(f"{match['level']}: {message}")
    return "; ".join(said) if said else "nothing"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("input", "what the peer got", "what the server logged (level)", "other clients")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def documented_table() -> str | None:
    text = WRITEUP.read_text(encoding="utf-8")
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 or end < start:
        return None
    return text[start + len(MARK_START) : end].strip()


def test_garbage_in(tmp_path, shipped_tracks):
    """Each bad peer gets a clean answer and one log line; everyone else is served."""
    with serving(
        LIBRARY,
        "--handshake-timeout",
        f"{HANDSHAKE_TIMEOUT:g}",
        "--max-message-size",
        str(MAX_MESSAGE_SIZE),
    ) as srv:
        good = Peer(srv.port)  # a well-behaved client, connected all along
        try:
            good.hello()
            assert good.list_count() == len(shipped_tracks)
            observed = []
            for bad in BAD_INPUTS:
                got, port = try_bad_input(srv.port, bad)
                others = good.list_count()
                observed.append((bad, got, port, others))
            good.send_message(ListRequest(query="zzz-no-such-words"))
            assert isinstance(good.event(), ListEnd)
        finally:
            good.close()

        # afterwards the real CLI is served as ever
        listed = run_cli("ls", "--json", server=srv.address)
        assert listed.returncode == 0, listed.stderr
        assert sorted(t["path"] for t in json.loads(listed.stdout)) == shipped_tracks
        track = smallest(shipped_tracks)
        fetched = run_cli("get", track, "--save", server=srv.address, cwd=tmp_path)
        assert fetched.returncode == 0, fetched.stderr
        assert sha256(tmp_path / name_of(track)) == sha256(LIBRARY / track)
        # the log lines of the last peers may lag a little behind their sockets
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(
            lines_naming(srv.log(), port) for _, _, port, _ in observed
        ):
            time.sleep(POLL)
        log = srv.log()

    assert "Traceback" not in log, log
    rows = [
        (
            bad.name,
            got,
            server_said(log, port),
            "served" if others == len(shipped_tracks) else f"listed {others} tracks",
        )
        for bad, got, port, others in observed
    ]
    table = render_table(rows)
    print(table)

    # nobody else suffered
    assert all(others == len(shipped_tracks) for *_, others in observed), table
    # WRITEUP.md carries this very table
    assert documented_table() == table, (
        f"WRITEUP.md's bad-input table (between {MARK_START} and {MARK_END}, under "
        f"{TABLE_SECTION!r} at the end of the threat model) is not what the test saw; "
        f"paste this:\n\n{table}\n"
    )
    # and the server logs one line per bad peer, naming it
    counts = {bad.name: len(lines_naming(log, port)) for bad, _, port, _ in observed}
    assert all(n == 1 for n in counts.values()), (
        f"log lines per bad peer (want exactly 1 each): {counts}\n\n{table}\n\nlog:\n{log}"
    )


# ---------------------------------------------------------------------------- 2. slow peers


def test_slow_peers_do_not_hold_up_the_server(tmp_path, shipped_tracks):
    root = tmp_path / "root"
    root.mkdir()
    write_wav(root / "huge.wav", random.Random(50).randbytes(50 << 20))
    track = smallest(shipped_tracks)
    shutil.copyfile(LIBRARY / track, root / name_of(track))
    work = tmp_path / "work"
    work.mkdir()
    idle: list[socket.socket] = []
    # 200 silent peers from one address: no per-address cap (test_slow_peers.py tests it)
    limits = ("--handshake-timeout", "3", "--send-timeout", "3", "--max-per-address", "0")
    with serving(root, *limits) as srv:
        stalled: Peer | None = None
        try:
            began = time.monotonic()
            for _ in range(200):
                idle.append(socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT))

            # a reader that takes the first chunk of a big download, then stops reading
            stalled = Peer(srv.port, rcvbuf=4096)
            stalled.hello()
            stalled.send_message(StreamRequest(track="huge.wav"))
            start = stalled.event(read_size=4096)
            assert isinstance(start, StreamStart), start
            first = stalled.event(read_size=4096)
            assert isinstance(first, Data), first
            read = len(first.payload)

            # meanwhile, others are served
            listed = run_cli("ls", "--json", server=srv.address, timeout=30)
            assert listed.returncode == 0, listed.stderr
            assert sorted(t["path"] for t in json.loads(listed.stdout)) == sorted(
                ["huge.wav", name_of(track)]
            )
            fetched = run_cli(
                "get", name_of(track), "--save", server=srv.address, cwd=work, timeout=30
            )
            assert fetched.returncode == 0, fetched.stderr
            assert sha256(work / name_of(track)) == sha256(LIBRARY / track)

            # every silent connection is closed at its handshake timeout
            poller = select.poll()
            by_fd = {s.fileno(): s for s in idle}
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            still_open = set(by_fd)
            deadline = began + 3 + 10
            while still_open and time.monotonic() < deadline:
                for fd, _ in poller.poll(200):
                    try:
                        data = by_fd[fd].recv(1)
                    except ConnectionResetError:
                        data = b""
                    assert data == b"", "the server sent a silent peer something"
                    poller.unregister(fd)
                    still_open.discard(fd)
            assert not still_open, f"{len(still_open)} of 200 silent connections still open"

            # the stalled reader is dropped at the send timeout: after what was in
            # flight, its socket ends
            srv.wait_for_log(rf"127\.0\.0\.1:{stalled.port}: stopped reading for 3 s", 3 + 15)
            deadline = time.monotonic() + IO_TIMEOUT
            ended = False
            while time.monotonic() < deadline and read <= 60 << 20:
                try:
                    chunk = stalled.sock.recv(1 << 20)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    ended = True
                    break
                read += len(chunk)
            assert ended, f"the stalled reader's socket never ended ({read} bytes read)"
            assert read < (50 << 20), "the whole file arrived: the reader never stalled"
        finally:
            for sock in idle:
                sock.close()
            if stalled is not None:
                stalled.close()
        log = srv.log()
    assert "Traceback" not in log
    assert len(re.findall(r"silent for 3 s; closing", log)) == 200, log[-3000:]


# ---------------------------------------------------------------------------- 3. broken files


def test_broken_files_are_listed_served_and_refused_for_decoding(
    start_server, tmp_path, shipped_tracks
):
    root = tmp_path / "root"
    root.mkdir()
    m4a = smallest(shipped_tracks, ".m4a")
    broken = {
        "random.mp3": random.Random(3).randbytes(48 * 1024),
        "empty.flac": b"",
        "truncated.m4a": (LIBRARY / m4a).read_bytes()[:3000],
        "text.wav": b"This is not a WAV file, only some text.\n" * 50,
    }
    for name, data in broken.items():
        (root / name).write_bytes(data)
    good = smallest(shipped_tracks)
    shutil.copyfile(LIBRARY / good, root / name_of(good))
    srv = start_server(root)

    listed = run_cli("ls", "--json", server=srv.address)
    assert listed.returncode == 0, listed.stderr
    by_path = {t["path"]: t for t in json.loads(listed.stdout)}
    assert sorted(by_path) == sorted([*broken, name_of(good)])
    for name in broken:
        assert isinstance(by_path[name]["error"], str) and by_path[name]["error"], by_path[name]
        assert by_path[name]["size"] == len(broken[name])
    assert by_path[name_of(good)]["error"] is None

    for name, data in broken.items():
        work = tmp_path / f"get-{name}"
        work.mkdir()
        fetched = run_cli("get", name, "--save", server=srv.address, cwd=work)
        assert fetched.returncode == 0, (name, fetched.stderr)
        assert (work / name).read_bytes() == data, name
        assert os.listdir(work) == [name]

        work = tmp_path / f"decode-{name}"
        work.mkdir()
        decoded = run_cli("get", name, "--decode", "-o", "x.wav", server=srv.address, cwd=work)
        assert decoded.returncode == 5, (name, decoded.stderr)
        line = assert_one_error_line(decoded.stderr)
        assert line.startswith(f"musiclib: cannot decode {name}"), line
        assert os.listdir(work) == [], (name, os.listdir(work))
    assert "Traceback" not in srv.log()


# ---------------------------------------------------------------------------- 4. changed files


def huge_wav_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(random.Random(seed).randbytes(HUGE))
    return buf.getvalue()


@dataclass
class Download:
    """A ``get --save`` run in the background through a proxy; its result once it ended."""

    proxy: Proxy
    process: subprocess.Popen[bytes]
    status: int | None = None
    stderr: str = ""


@contextlib.contextmanager
def paused_download(srv: ServerProcess, track: str, cwd: Path, *args: str) -> Iterator[Download]:
    """``get TRACK --save ARGS`` through a proxy that pauses it after 1 MiB.

    Yields once the pause is reached; on the way out the proxy lets go and the
    run is waited for (bounded), its exit status and stderr kept.
    """
    with Proxy(srv.port, pause_after=1 << 20) as proxy:
        argv = [sys.executable, "-m", "musiclib", "get", track, "--save", *args]
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=client_env({"MUSICLIB_SERVER": proxy.address}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        download = Download(proxy, process)
        try:
            assert proxy.paused.wait(IO_TIMEOUT), "the download never got going"
            yield download
        finally:
            proxy.gate.set()
            try:
                _, err = process.communicate(timeout=IO_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                _, err = process.communicate(timeout=10)
            download.status = process.returncode
            download.stderr = err.decode("utf-8", "replace")


def finish(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Wait (bounded) for a process whose stderr is a pipe: its status and stderr."""
    _, err = process.communicate(timeout=IO_TIMEOUT)
    return process.returncode, err.decode("utf-8", "replace")


def test_a_file_changed_while_it_streams_never_yields_a_wrong_file(start_server, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    path = root / "huge.wav"
    old, new = huge_wav_bytes(1), huge_wav_bytes(2)
    assert len(old) == len(new)
    path.write_bytes(old)
    srv = start_server(root)
    pid = srv.process.pid

    # (a) truncated to half while the server is in the middle of it
    work = tmp_path / "truncated"
    work.mkdir()
    with paused_download(srv, "huge.wav", work, "--retries", "0") as run:
        assert settled_position(pid, path) < len(old), "the server read the whole file"
        os.truncate(path, len(old) // 2)
    status, err = run.status, run.stderr
    assert status == 5, err
    line = assert_one_error_line(err)
    assert re.search(r"changed|shrank|sha256|received", line), line
    assert os.listdir(work) == [], "a changed file left something behind"

    # (b) rewritten in place (same inode, same size) while the server reads it
    path.write_bytes(old)
    work = tmp_path / "rewritten"
    work.mkdir()
    with paused_download(srv, "huge.wav", work, "--retries", "0") as run:
        assert settled_position(pid, path) < len(old), "the server read the whole file"
        with open(path, "r+b") as f:
            f.write(new)
    status, err = run.status, run.stderr
    if status == 0:
        saved = (work / "huge.wav").read_bytes()
        assert saved in (old, new), "a silently wrong file: a mix of old and new bytes"
        assert os.listdir(work) == ["huge.wav"]
    else:
        assert status == 5, err
        assert_one_error_line(err)
        assert os.listdir(work) == [], "a changed file left something behind"

    # (c) replaced by a rename: the server goes on with the old inode, consistently
    path.write_bytes(old)
    work = tmp_path / "renamed"
    work.mkdir()
    with paused_download(srv, "huge.wav", work, "--retries", "0") as run:
        assert settled_position(pid, path) < len(old), "the server read the whole file"
        replacement = root / "replacement.tmp"
        replacement.write_bytes(new)
        os.replace(replacement, path)
    status, err = run.status, run.stderr
    assert status == 0, err
    assert os.listdir(work) == ["huge.wav"]
    assert hashlib.sha256((work / "huge.wav").read_bytes()).digest() == (
        hashlib.sha256(old).digest()
    ), "the rename-over download is not the old file"


# ---------------------------------------------------------------------------- 5. rescans


def listed_sizes(address: str) -> dict[str, int]:
    listed = run_cli("ls", "--json", server=address)
    assert listed.returncode == 0, listed.stderr
    return {t["path"]: t["size"] for t in json.loads(listed.stdout)}


def test_rescan_picks_up_added_changed_renamed_and_deleted_files(
    start_server, tmp_path, shipped_tracks
):
    mp3 = smallest(shipped_tracks, ".mp3")
    ogg = smallest(shipped_tracks, ".ogg")
    flac = smallest(shipped_tracks, ".flac")
    wav = smallest(shipped_tracks, ".wav")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copyfile(LIBRARY / mp3, root / "a.mp3")
    shutil.copyfile(LIBRARY / ogg, root / "b.ogg")
    shutil.copyfile(LIBRARY / wav, root / "d.wav")
    srv = start_server(root)
    assert sorted(listed_sizes(srv.address)) == ["a.mp3", "b.ogg", "d.wav"]

    shutil.copyfile(LIBRARY / flac, root / "c.flac")
    (root / "b.ogg").unlink()
    (root / "sub").mkdir()
    (root / "d.wav").rename(root / "sub" / "renamed.wav")
    with open(root / "a.mp3", "ab") as f:
        f.write(b"\0" * 1234)
    rescanned = run_cli("rescan", "--wait", server=srv.address)
    assert rescanned.returncode == 0, rescanned.stderr
    assert rescanned.stdout.decode().strip() == "3 tracks (done)"
    assert listed_sizes(srv.address) == {
        "a.mp3": (LIBRARY / mp3).stat().st_size + 1234,
        "c.flac": (LIBRARY / flac).stat().st_size,
        "sub/renamed.wav": (LIBRARY / wav).stat().st_size,
    }


def test_periodic_rescan_and_a_rescan_during_a_download(start_server, tmp_path, shipped_tracks):
    root = tmp_path / "root"
    root.mkdir()
    big = write_wav(root / "big.wav", random.Random(5).randbytes(8 << 20))
    mp3 = smallest(shipped_tracks, ".mp3")
    shutil.copyfile(LIBRARY / mp3, root / "a.mp3")
    srv = start_server(root, "--rescan-interval", "1")

    shutil.copyfile(LIBRARY / smallest(shipped_tracks, ".flac"), root / "new.flac")
    deadline = time.monotonic() + 10
    while "new.flac" not in listed_sizes(srv.address):
        assert time.monotonic() < deadline, "the periodic rescan never listed new.flac"
        time.sleep(0.2)

    work = tmp_path / "work"
    work.mkdir()
    with paused_download(srv, "big.wav", work) as run:
        rescanned = run_cli("rescan", "--wait", server=srv.address)
        assert rescanned.returncode == 0, rescanned.stderr
        assert rescanned.stdout.decode().strip() == "3 tracks (done)"
    assert run.status == 0, run.stderr
    assert (work / "big.wav").read_bytes() == big


# ---------------------------------------------------------------------------- 6. token


def test_token(start_server, tmp_path):
    srv = start_server(LIBRARY, "--token", "s3cret")
    for args in ([], ["--token", "wrong"]):
        refused = run_cli("ls", *args, server=srv.address)
        assert refused.returncode == 3, refused.stderr
        line = assert_one_error_line(refused.stderr)
        assert "token" in line, line
        assert "s3cret" not in line
    by_option = run_cli("ls", "--token", "s3cret", server=srv.address)
    assert by_option.returncode == 0, by_option.stderr
    by_env = run_cli("ls", server=srv.address, env={"MUSICLIB_TOKEN": "s3cret"})
    assert by_env.returncode == 0, by_env.stderr
    assert by_env.stdout == by_option.stdout

    peer = Peer(srv.port)
    try:
        peer.send_message(Hello(version=PROTOCOL_VERSION, client="no token"))
        refusal = peer.event()
        assert isinstance(refusal, Error), refusal
        assert (refusal.code, refusal.fatal) == ("unauthorized", True)
        assert isinstance(peer.event(), Closed)
    finally:
        peer.close()
    wait_until(lambda: lines_naming(srv.log(), peer.port) != [], 10, "the refusal logged")
    assert "s3cret" not in srv.log()


# ---------------------------------------------------------------------------- 7. TLS


@pytest.fixture
def certificates(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA, and a chain and key for 127.0.0.1 and localhost signed by it (trustme)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, ca_pem = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    return chain, key, ca_pem


def test_tls(start_server, certificates, tmp_path, shipped_tracks):
    chain, _, ca = certificates
    # the combined PEM (key and chain in one file) serves as both
    srv = start_server(LIBRARY, "--tls-cert", str(chain), "--tls-key", str(chain))

    trusted = run_cli("ls", "--json", "--cafile", ca, server=srv.address)
    assert trusted.returncode == 0, trusted.stderr
    assert sorted(t["path"] for t in json.loads(trusted.stdout)) == shipped_tracks
    track = smallest(shipped_tracks)
    fetched = run_cli("get", track, "--save", "--cafile", ca, server=srv.address, cwd=tmp_path)
    assert fetched.returncode == 0, fetched.stderr
    assert sha256(tmp_path / name_of(track)) == sha256(LIBRARY / track)

    untrusted = run_cli("ls", "--tls", server=srv.address)
    assert untrusted.returncode == 3, untrusted.stderr
    line = assert_one_error_line(untrusted.stderr)
    assert re.search(r"certificate.*not trusted", line), line

    plain = run_cli("ls", server=srv.address)
    assert plain.returncode == 3, plain.stderr
    assert_one_error_line(plain.stderr)

    with serving(LIBRARY) as plain_srv:
        tls_to_plain = run_cli("ls", "--cafile", ca, server=plain_srv.address)
        assert tls_to_plain.returncode == 3, tls_to_plain.stderr
        assert_one_error_line(tls_to_plain.stderr)
    assert "Traceback" not in srv.log()


def test_tls_with_a_token(start_server, certificates):
    chain, key, ca = certificates
    srv = start_server(LIBRARY, "--tls-cert", str(chain), "--tls-key", str(key), "--token", "t0k")
    ok = run_cli("ls", "--cafile", ca, "--token", "t0k", server=srv.address)
    assert ok.returncode == 0, ok.stderr
    refused = run_cli("ls", "--cafile", ca, server=srv.address)
    assert refused.returncode == 3, refused.stderr
    assert "token" in assert_one_error_line(refused.stderr)
    assert "t0k" not in srv.log()


# ---------------------------------------------------------------------------- 8. bind warning

BIND_WARNING = "listening beyond this machine without a token"


@pytest.mark.parametrize(
    ("args", "warned"),
    [
        (("--host", "0.0.0.0"), True),
        (("--host", "0.0.0.0", "--token", "x"), False),
        ((), False),
    ],
    ids=["all-interfaces", "all-interfaces-with-token", "default-host"],
)
def test_bind_warning(args, warned):
    with serving(LIBRARY, *args) as srv:
        token = ["--token", "x"] if "--token" in args else []
        listed = run_cli("ls", *token, server=srv.address)  # traffic to 127.0.0.1 only
        assert listed.returncode == 0, listed.stderr
        log = srv.log()
    assert (BIND_WARNING in log) is warned, log
    if warned:
        (line,) = [line for line in log.splitlines() if BIND_WARNING in line]
        assert " WARNING " in line, line


# ---------------------------------------------------------------------------- 9. connection limit


def test_connection_limit(tmp_path):
    with serving(LIBRARY, "--max-connections", "3") as srv:
        held = []
        try:
            for _ in range(3):
                held.append(Peer(srv.port))
                held[-1].hello()
            busy = run_cli("ls", server=srv.address)
            assert busy.returncode == 3, busy.stderr
            refusal = assert_one_error_line(busy.stderr)

            held.pop().close()
            deadline = time.monotonic() + 10
            while (again := run_cli("ls", server=srv.address)).returncode != 0:
                assert time.monotonic() < deadline, again.stderr
                time.sleep(0.1)
            for peer in held:  # the held ones are still served
                assert peer.list_count() > 0
        finally:
            for peer in held:
                peer.close()
    assert "busy" in refusal, refusal  # last, so that the wording does not hide the rest


# ---------------------------------------------------------------------------- 10. shutdown


def connect_refused(port: int) -> bool:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=0.5)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    sock.close()
    return False


def test_sigterm_stops_accepting_gives_grace_then_exits(tmp_path, shipped_tracks):
    root = tmp_path / "root"
    root.mkdir()
    (root / "huge.wav").write_bytes(huge_wav_bytes(10))
    longest = max(
        (t for t in shipped_tracks if not t.endswith((".wav", ".aiff"))),
        key=lambda t: (LIBRARY / t).stat().st_size,
    )
    shutil.copyfile(LIBRARY / longest, root / name_of(longest))
    work = tmp_path / "work"
    work.mkdir()
    grace = 2.0
    with serving(root, "--grace", f"{grace:g}") as srv:
        idle = Peer(srv.port)
        paced = RawStream(srv.port, name_of(longest))  # real time, with its ffmpeg running
        try:
            idle.hello()
            paced.read_at_least(paced.bytes_per_second // 2)
            (decoder,) = ffmpeg_children(srv)
            with paused_download(srv, "huge.wav", work, "--retries", "0") as run:
                settled_position(srv.process.pid, root / "huge.wav")  # stuck mid-file

                srv.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                while not connect_refused(srv.port):  # "stops accepting at once"
                    assert time.monotonic() - signalled < 1.0, "still accepting 1 s after SIGTERM"
                    time.sleep(POLL)

                # an idle connection is closed at once, surely before the grace period ends
                idle.sock.settimeout(grace)
                assert isinstance(idle.event(), Closed)

                # the running paced stream goes on through the grace period, then is cut
                before = paced.received
                with contextlib.suppress(ConnectionResetError, RemoteProtocolError):
                    while not isinstance(paced.next_event(), Closed):
                        pass
                cut = time.monotonic() - signalled
                assert paced.received > before, "the paced stream stopped at once"
                assert cut >= grace * 0.9, f"the paced stream was cut {cut:.2f} s after SIGTERM"

                # then the server exits, cleanly, leaving no ffmpeg behind
                left = grace + 5 - (time.monotonic() - signalled)
                status = srv.process.wait(timeout=max(left, 0.1))
                assert status == 0, srv.log()
                wait_until(lambda: process_gone(decoder.pid), 2, "the ffmpeg child gone")
        finally:
            paced.abort()
            idle.close()
    # the slow download was cut at the end of the grace period: a lost connection
    assert run.status == 3, run.stderr
    assert os.listdir(work) == ["huge.wav.part"]
    assert "shutting down" in srv.log()


# ---------------------------------------------------------------------------- 11. Ctrl-C

SLOW_PLAYER = """\
import os, sys, time
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    f.write(str(os.getpid()))
os.replace(tmp, sys.argv[1])
while sys.stdin.buffer.read(1):
    time.sleep(0.1)
"""


def cli_in_own_session(
    *args: str | os.PathLike[str], server: str, cwd: Path, **streams: Any
) -> subprocess.Popen[bytes]:
    """The CLI in a session of its own, so a SIGINT reaches it alone."""
    streams.setdefault("stdin", subprocess.DEVNULL)
    streams.setdefault("stdout", subprocess.DEVNULL)
    streams.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(
        [sys.executable, "-m", "musiclib", *map(os.fspath, args)],
        cwd=cwd,
        env=client_env({"MUSICLIB_SERVER": server}),
        start_new_session=True,
        **streams,
    )


@contextlib.contextmanager
def reaped(process: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def test_ctrl_c_keeps_the_part_and_the_next_run_resumes(start_server, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    data = write_wav(root / "big.wav", random.Random(11).randbytes(8 << 20))
    srv = start_server(root)
    work = tmp_path / "work"
    work.mkdir()
    part = work / "big.wav.part"
    with Proxy(srv.port, pause_after=1 << 20) as proxy:
        process = cli_in_own_session("get", "big.wav", "--save", server=proxy.address, cwd=work)
        with reaped(process):
            assert proxy.paused.wait(IO_TIMEOUT), "the download never got going"
            wait_until(lambda: part.exists() and part.stat().st_size > 0, 10, "a .part")
            process.send_signal(signal.SIGINT)
            status, err = finish(process)
    assert status == 130, err
    assert os.listdir(work) == [part.name]
    kept = part.read_bytes()
    assert 0 < len(kept) < len(data)
    assert kept == data[: len(kept)], "the kept .part is not a prefix of the file"

    again = run_cli("get", "big.wav", "--save", server=srv.address, cwd=work)
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stderr
    assert os.listdir(work) == ["big.wav"]
    assert (work / "big.wav").read_bytes() == data
    # last, so that a wrong message does not hide the rest
    line = assert_one_error_line(err)  # says what was kept and what to do
    assert line.startswith(f"musiclib: interrupted: kept {part} ("), line
    assert line.endswith(f" of {len(data)} bytes): run the same command again to resume"), line


def test_a_save_of_several_blocks_is_byte_identical_also_resumed_mid_block(start_server, tmp_path):
    """A file saved with ``-o`` is written past the page cache in 2 MiB blocks, its tail
    (not a whole 4 KiB) through it (issue 15): several blocks and an odd tail come out
    byte for byte, and so does a save cut in the middle of a block, whose retry goes on
    from an unaligned offset with ordinary writes."""
    root = tmp_path / "root"
    root.mkdir()
    data = write_wav(root / "big.wav", random.Random(15).randbytes((5 << 20) + 1234))
    srv = start_server(root)
    work = tmp_path / "work"
    work.mkdir()
    whole = run_cli("get", "big.wav", "-o", "whole.wav", server=srv.address, cwd=work)
    assert whole.returncode == 0, whole.stderr
    assert (work / "whole.wav").read_bytes() == data
    with Proxy(srv.port, cut_after=(3 << 20) + 4321) as proxy:
        cut = run_cli("get", "big.wav", "-o", "cut.wav", server=proxy.address, cwd=work)
        assert proxy.cut.is_set()
    assert cut.returncode == 0, cut.stderr
    assert "retrying" in cut.stderr
    assert (work / "cut.wav").read_bytes() == data
    assert sorted(os.listdir(work)) == ["cut.wav", "whole.wav"]


def start_slow_play(
    srv: ServerProcess, track: str, tmp_path: Path, **streams: Any
) -> tuple[subprocess.Popen[bytes], int]:
    """``play TRACK`` with a player that reads a byte every 0.1 s; the CLI and the player pid."""
    script = tmp_path / "slow_player.py"
    script.write_text(SLOW_PLAYER)
    pidfile = tmp_path / "player.pid"
    pidfile.unlink(missing_ok=True)
    player = shlex.join([sys.executable, str(script), str(pidfile)])
    process = cli_in_own_session(
        "play", track, "--player", player, server=srv.address, cwd=tmp_path, **streams
    )
    wait_until(pidfile.exists, 15, "the player started")
    return process, int(pidfile.read_text())


@pytest.mark.parametrize(
    ("signum", "expected", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_or_sigterm_during_play_stops_the_player(
    server, shipped_tracks, tmp_path, signum, expected, said
):
    track = smallest(shipped_tracks)
    process, player = start_slow_play(server, track, tmp_path)
    with reaped(process):
        time.sleep(0.3)  # well into the transfer, the player reading slowly
        assert process.poll() is None
        process.send_signal(signum)
        status, err = finish(process)
        stopped = time.monotonic()
    assert status == expected, err
    while not process_gone(player):
        if time.monotonic() - stopped >= 2:
            with contextlib.suppress(ProcessLookupError):
                os.kill(player, signal.SIGKILL)
            pytest.fail("the player outlived musiclib by 2 s")
        time.sleep(POLL)
    assert assert_one_error_line(err) == f"musiclib: {said}"


def read_available(fd: int) -> bytes:
    """Whatever the pty master has to give right now."""
    out = b""
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError as exc:  # EIO: no slave left open
            if exc.errno == errno.EIO:
                break
            raise
        if not chunk:
            break
        out += chunk
    return out


def test_ctrl_c_during_play_leaves_the_terminal_as_it_was(server, shipped_tracks, tmp_path):
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        process, player = start_slow_play(
            server,
            smallest(shipped_tracks),
            tmp_path,
            stdin=slave,
            stdout=slave,
            stderr=slave,
        )
        with reaped(process):
            time.sleep(0.3)
            process.send_signal(signal.SIGINT)
            status = process.wait(timeout=IO_TIMEOUT)
        output = read_available(master).decode("utf-8", "replace")
        assert status == 130, output
        assert "Traceback" not in output, output
        wait_until(lambda: process_gone(player), 2, "the player gone")
        assert termios.tcgetattr(slave) == before
        assert "musiclib: interrupted" in output, output
    finally:
        os.close(master)
        os.close(slave)
