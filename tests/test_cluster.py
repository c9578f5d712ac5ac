"""Replicas behind HAProxy (issue 14, items 3 and 4): failover without a lost byte, drain.

The real ``haproxy`` binary runs ``deploy/haproxy.cfg`` itself, with only its addresses
replaced (:func:`cluster_config` checks each replacement hit exactly one line, so the
shipped file keeps the shape tested here), in front of real ``musiclib serve``
replicas on 127.0.0.1, each with its own copy of the files (another inode, another
modification time) and its own index, as on separate machines. Clients are the real
``musiclib get``.

"Mid-transfer" is made certain, not timed: a download to standard output blocks
when the test stops reading its pipe (a 200 MB file is far larger than every buffer
between the replica and the test), so after the first MiB of each has been read, all
of them are stalled in the middle of their stream until the test reads on. Which
replica serves them is read from HAProxy's statistics (current sessions per server).

Costs (2 cores, shared): about 40-60 s for the file, most of it the 200 MB item-4
test (three copies written, six downloads of 200 MB hashed by the test).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from conftest import REPO, STARTUP_TIMEOUT, STOP_TIMEOUT, ServerProcess, client_env

from musiclib.client import Client, open_client
from musiclib.errors import IntegrityError
from musiclib.fetch import Connector, Retry, pipe, save
from musiclib.protocol import Error, Hello, Welcome, decode_message, encode_message
from musiclib.wav import wav_header

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
)
CONFIG = REPO / "deploy" / "haproxy.cfg"
MIB = 1 << 20
#: seconds a whole download (or HAProxy's view of the replicas) may take before the test fails
DEADLINE = 180.0

needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (`make system-deps` installs it as root)"
)


# ---- the shipped configuration and the protocol cannot drift apart ----------------------------


def _config_line(keyword: str) -> str:
    lines = [ln.strip() for ln in CONFIG.read_text().splitlines() if ln.strip().startswith(keyword)]
    assert len(lines) == 1, f"expected one {keyword!r} line in {CONFIG}, found {lines}"
    return lines[0][len(keyword) :].strip()


def test_health_check_sends_the_hello_musiclib_encodes() -> None:
    sent = bytes.fromhex(_config_line("tcp-check send-binary"))
    assert sent == encode_message(Hello(version=1, client="haproxy-check"))
    assert decode_message(sent[5:]) == Hello(version=1, client="haproxy-check")


def _check_regex() -> re.Pattern[str]:
    return re.compile(_config_line("tcp-check expect rbinary"))


@pytest.mark.parametrize(
    "reply",
    [
        Welcome(version=1, server="musiclib/0.1.0", tracks=1, versions=(1, 2), max_message_size=1),
        Welcome(version=1, server="musiclib/0.1.0", scanning=True),
        Welcome(version=1, server="x" * 300, tracks=123_456),
        Error("unauthorized", "a token is needed", fatal=True),
    ],
)
def test_health_check_accepts_a_working_replica(reply: Welcome | Error) -> None:
    """A welcome, or the ``unauthorized`` of a replica started with --token (the check has
    no token): either one comes from a replica that accepted, had room and answered."""
    dump = encode_message(reply).hex()
    assert _check_regex().search(dump)
    assert _check_regex().search(dump.upper())  # whichever case HAProxy's dump uses


@pytest.mark.parametrize(
    "reply",
    [
        Error("busy", "the server is at its connection limit", fatal=True),
        Error("unsupported_version", "speaks 2", fatal=True, versions=(2,)),
        Error("bad_request", "no", fatal=True),
        Error("internal", "internal server error", fatal=True),
    ],
)
def test_health_check_refuses_a_replica_that_cannot_serve(reply: Error) -> None:
    assert not _check_regex().search(encode_message(reply).hex())
    assert not _check_regex().search(b"HTTP/1.1 200 OK\r\n\r\n".hex())


# ---- files, replicas, HAProxy -----------------------------------------------------------------


def write_track(path: Path, mib: int, seed: int) -> str:
    """A WAV file of ``mib`` MiB of seeded noise, every MiB distinct (a resume off by a
    whole block would not go unseen); its sha256. Written fast: one random MiB, stamped
    with its block number."""
    block = bytearray(random.Random(seed).randbytes(MIB))
    digest = hashlib.sha256()
    with path.open("wb") as f:
        header = wav_header("s16le", 44100, 2, mib * MIB)
        f.write(header)
        digest.update(header)
        for n in range(mib):
            block[:8] = n.to_bytes(8, "big")
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def spread(original: Path, roots: list[Path]) -> None:
    """A copy of ``original`` in each root: another inode and another mtime each, as
    separate machines would have."""
    for n, root in enumerate(roots):
        root.mkdir(parents=True, exist_ok=True)
        copy = root / original.name
        shutil.copyfile(original, copy)
        stamp = time.time() - 3600 * (n + 1)
        os.utime(copy, (stamp, stamp))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_help() -> str:
    run = subprocess.run(
        [sys.executable, "-m", "musiclib", "serve", "--help"],
        capture_output=True,
        text=True,
        env=client_env({"COLUMNS": "200"}),
        timeout=60,
        check=False,
    )
    return run.stdout


def cluster_config(front: int, stats: int, replicas: list[int]) -> str:
    """deploy/haproxy.cfg with its addresses replaced, and nothing else."""
    text = CONFIG.read_text()
    servers = [ln for ln in text.splitlines() if ln.strip().startswith("server replica")]
    assert len(servers) == 3, servers
    for old, new in (("bind 127.0.0.1:7650", front), ("bind 127.0.0.1:7649", stats)):
        assert text.count(old) == 1, old
        text = text.replace(old, f"bind 127.0.0.1:{new}")
    ours = "\n".join(f"    server replica{n} 127.0.0.1:{p}" for n, p in enumerate(replicas, 1))
    return text.replace("\n".join(servers), ours)


@dataclass
class Replica:
    """One ``musiclib serve`` of the cluster."""

    name: str
    root: Path
    server: ServerProcess
    #: the test killed or stopped it itself (its exit status is then its own business)
    ended: bool = False

    @property
    def port(self) -> int:
        return self.server.port


@dataclass
class Cluster:
    """Replicas and the HAProxy in front of them."""

    tmp: Path
    replicas: list[Replica] = field(default_factory=list)
    front: int = 0
    stats_port: int = 0
    haproxy: subprocess.Popen[bytes] | None = None
    haproxy_log: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.front}"

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's view of each replica (its CSV statistics), by server name."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/;csv", timeout=10) as r:
            text = r.read().decode().lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows if row["pxname"] == "replicas"}

    def wait_stats(self, ok: object, what: str) -> dict[str, dict[str, str]]:
        """Poll the statistics until ``ok(stats)`` holds; fail after DEADLINE."""
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                stats = self.stats()
            except OSError:
                stats = {}
            if stats and ok(stats):  # type: ignore[operator]
                return stats
            if time.monotonic() > deadline:
                pytest.fail(f"HAProxy never showed {what}: {stats}\n{self.log()}")
            time.sleep(0.1)

    def busiest(self, at_least: int = 1) -> Replica:
        """The replica serving the most connections now (at least ``at_least``)."""

        def enough(stats: dict[str, dict[str, str]]) -> bool:
            return max(int(stats[r.name]["scur"] or 0) for r in self.live()) >= at_least

        stats = self.wait_stats(enough, f"a replica with {at_least} connections")
        return max(self.live(), key=lambda r: int(stats[r.name]["scur"] or 0))

    def sessions(self, replica: Replica) -> int:
        return int(self.stats()[replica.name]["scur"] or 0)

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if not r.ended]

    def log(self) -> str:
        return self.haproxy_log.read_text() if self.haproxy_log else ""


def start_replica(name: str, root: Path, index: Path, *extra: str) -> Replica:
    argv = [sys.executable, "-m", "musiclib", "serve", "--root", str(root), "--port", "0"]
    # Behind HAProxy every client has HAProxy's address: the per-address caps live there.
    argv += ["--index", str(index), "--max-per-address", "0", "--max-decodes-per-address", "0"]
    argv += ["--log-level", "info", *extra]
    server = ServerProcess.start(argv)
    replica = Replica(name, root, server)
    match = server.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)", timeout=STARTUP_TIMEOUT)
    server.port = int(match.group(1))
    server.address = f"127.0.0.1:{server.port}"
    return replica


@contextlib.contextmanager
def cluster(
    tmp: Path, roots: list[Path], *extra: str, checksums: bool = False
) -> Iterator[Cluster]:
    """One replica per root (its own index) and HAProxy in front; waits until every
    replica has indexed its root (and hashed it, with ``checksums``) and HAProxy sees
    them all UP. On the way out: replicas not ended by the test must exit 0 on SIGTERM,
    and none may have logged a traceback."""
    assert HAPROXY is not None
    workers = ("--workers", "1") if "--workers" in serve_help() else ()
    result = Cluster(tmp)
    with contextlib.ExitStack() as stack:
        for n, root in enumerate(roots, 1):
            replica = start_replica(f"replica{n}", root, tmp / f"index{n}.sqlite", *workers, *extra)
            result.replicas.append(replica)
            stack.callback(_stop_replica, replica)
        for replica in result.replicas:
            replica.server.wait_for_log(r"indexed \d+ tracks", timeout=DEADLINE)
            if checksums:
                replica.server.wait_for_log(r"stored the sha256 of [1-9]", timeout=DEADLINE)
        for _attempt in range(5):  # a free port can be taken before HAProxy binds it
            result.front, result.stats_port = free_port(), free_port()
            cfg = tmp / "haproxy.cfg"
            cfg.write_text(
                cluster_config(result.front, result.stats_port, [r.port for r in result.replicas])
            )
            result.haproxy_log = tmp / "haproxy.log"
            with result.haproxy_log.open("wb") as log:
                result.haproxy = subprocess.Popen(
                    [HAPROXY, "-db", "-f", str(cfg)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                result.haproxy.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                break  # still running: it bound its ports
        else:
            pytest.fail(f"haproxy did not start:\n{result.log()}")
        stack.callback(_stop_haproxy, result.haproxy)
        result.wait_stats(
            lambda s: all(s[r.name]["status"] == "UP" for r in result.replicas),
            "every replica UP",
        )
        yield result


def _stop_replica(replica: Replica) -> None:
    status = replica.server.stop()
    if not replica.ended:
        assert status == 0, f"{replica.name} exited {status}; log:\n{replica.server.log()}"
    assert "Traceback" not in replica.server.log(), replica.server.log()


def _stop_haproxy(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


# ---- clients ----------------------------------------------------------------------------------


class Download:
    """A ``musiclib get`` to standard output, read (and hashed) by the test at its pace."""

    def __init__(self, address: str, track: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "musiclib", "get", track, *args],
            cwd=REPO,
            env=client_env({"MUSICLIB_SERVER": address}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.digest = hashlib.sha256()
        self.received = 0
        self.data = bytearray()  # kept only when asked (small files)

    def read(self, n: int, keep: bool = False) -> None:
        """Read exactly ``n`` bytes of the download (fails the test after DEADLINE)."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + DEADLINE
        while n > 0:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                pytest.fail(f"no byte from get within {DEADLINE:g} s")
            chunk = os.read(fd, min(n, MIB))
            if not chunk:
                pytest.fail(f"get ended early: {self.finish()}")
            self.consume(chunk, keep)
            n -= len(chunk)

    def consume(self, chunk: bytes, keep: bool) -> None:
        self.digest.update(chunk)
        self.received += len(chunk)
        if keep:
            self.data += chunk

    def read_rest(self, keep: bool = False) -> tuple[int, str]:
        """Read to the end; the exit status and standard error."""
        assert self.process.stdout is not None
        while chunk := self.process.stdout.read1(MIB):
            self.consume(chunk, keep)
        return self.finish()

    def finish(self) -> tuple[int, str]:
        try:
            _, err = self.process.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return self.process.returncode, err.decode("utf-8", "replace")


@contextlib.contextmanager
def downloads(count: int, address: str, track: str, *args: str) -> Iterator[list[Download]]:
    started = [Download(address, track, *args) for _ in range(count)]
    try:
        yield started
    finally:
        for d in started:
            if d.process.poll() is None:
                d.process.kill()
            d.process.communicate()


def read_all(started: list[Download]) -> list[tuple[int, str]]:
    """Read every download to its end at once (a stalled one may be cut by its replica)."""
    with ThreadPoolExecutor(len(started)) as pool:
        return list(pool.map(lambda d: d.read_rest(), started))


def saved_get(address: str, track: str, dest: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "musiclib", "get", track, "-o", str(dest), "--quiet"],
        cwd=REPO,
        env=client_env({"MUSICLIB_SERVER": address}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_saved(processes: list[subprocess.Popen[bytes]]) -> list[tuple[int, str]]:
    results = []
    for p in processes:
        try:
            _, err = p.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        results.append((p.returncode, err.decode("utf-8", "replace")))
    return results


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# ---- item 4: six downloads, a replica killed mid-transfer ---------------------------------------


@needs_haproxy
@pytest.mark.e2e
def test_six_downloads_survive_a_replica_killed_mid_transfer(tmp_path: Path) -> None:
    """Issue 14, item 4 exactly: three replicas with their own copy of a 200 MB file, six
    downloads through HAProxy with get's default retries, the replica serving some of
    them SIGKILLed while all six are in the middle of their stream: all six exit 0 with
    the file byte for byte."""
    original = tmp_path / "big.wav"
    expected = write_track(original, 200, seed=14)
    roots = [tmp_path / f"machine{n}" for n in (1, 2, 3)]
    spread(original, roots)
    original.unlink()
    with cluster(tmp_path, roots) as c, downloads(6, c.address, "big.wav") as started:
        for d in started:
            d.read(MIB)  # every one is now mid-stream, stalled on its pipe
        victim = c.busiest()
        serving = c.sessions(victim)
        victim.server.process.kill()
        victim.ended = True
        results = read_all(started)
    for d, (status, err) in zip(started, results, strict=True):
        assert status == 0, err
        assert d.received == 200 * MIB + 44
        assert d.digest.hexdigest() == expected
    resumed = sum("retrying" in err for _, err in results)
    assert resumed >= serving >= 1, [err for _, err in results]


# ---- the Tests: 20 downloads while a replica is killed ----------------------------------


@needs_haproxy
@pytest.mark.e2e
def test_twenty_saved_downloads_while_a_replica_is_killed(tmp_path: Path) -> None:
    """Twenty ``get -o`` through HAProxy, a replica killed as soon as it serves two of
    them: every file is saved whole and verified (resumed from its .part elsewhere, or
    started elsewhere), every exit status 0."""
    original = tmp_path / "mid.wav"
    expected = write_track(original, 24, seed=20)
    roots = [tmp_path / f"machine{n}" for n in (1, 2, 3)]
    spread(original, roots)
    original.unlink()
    out = tmp_path / "out"
    with cluster(tmp_path, roots) as c:
        processes = []
        for n in range(20):
            (out / str(n)).mkdir(parents=True)
            processes.append(saved_get(c.address, "mid.wav", out / str(n) / "mid.wav"))
        victim = c.busiest(at_least=2)
        victim.server.process.kill()
        victim.ended = True
        results = wait_saved(processes)
    for n, (status, err) in enumerate(results):
        assert status == 0, err
        assert sha256_of(out / str(n) / "mid.wav") == expected
        assert not (out / str(n) / "mid.wav.part").exists()


# ---- drain: SIGTERM ----------------------------------------------------------------------------


@needs_haproxy
@pytest.mark.e2e
def test_sigterm_drains_a_replica_without_failing_a_client(tmp_path: Path) -> None:
    """A replica stopped with SIGTERM stops accepting at once, so HAProxy's check takes it
    out and new downloads go to the others, while its own streams (stalled on the
    test's pipes meanwhile) finish there, byte for byte, without a retry; then it exits 0."""
    original = tmp_path / "big.wav"
    expected = write_track(original, 64, seed=3)
    roots = [tmp_path / f"machine{n}" for n in (1, 2, 3)]
    spread(original, roots)
    original.unlink()
    # a long grace, and a send timeout the stalls cannot reach: what is tested is the drain
    with (
        cluster(tmp_path, roots, "--grace", "120", "--send-timeout", "120") as c,
        downloads(4, c.address, "big.wav") as running,
    ):
        for d in running:
            d.read(MIB)
        victim = c.busiest()
        victim.server.process.send_signal(signal.SIGTERM)
        victim.ended = True  # it must still exit 0: checked below
        deadline = time.monotonic() + DEADLINE
        while not refused(victim.port):  # the listener closes at once
            assert time.monotonic() < deadline, "the draining replica still accepts"
            time.sleep(0.05)
        c.wait_stats(lambda s: s[victim.name]["status"] == "DOWN", f"{victim.name} DOWN")
        out = tmp_path / "out"
        out.mkdir()
        later = [saved_get(c.address, "big.wav", out / f"{n}.wav") for n in range(4)]
        for n, (status, err) in enumerate(wait_saved(later)):
            assert status == 0, err
            assert "retrying" not in err, err  # HAProxy sent it to a live replica at once
            assert sha256_of(out / f"{n}.wav") == expected
        assert victim.server.process.poll() is None, "the replica quit before its streams"
        results = read_all(running)
        assert victim.server.process.wait(timeout=DEADLINE) == 0, victim.server.log()
    for d, (status, err) in zip(running, results, strict=True):
        assert status == 0, err
        assert "retrying" not in err, err  # finished on the draining replica itself
        assert d.digest.hexdigest() == expected


# ---- two replicas, two different files under one name -----------------------------------------


@needs_haproxy
@pytest.mark.e2e
def test_a_pipe_never_splices_two_replicas_copies(tmp_path: Path) -> None:
    """Two replicas whose files of one name differ (same size): a download to standard
    output whose replica is killed mid-stream resumes on the other, sees that its
    sha256 differs, and fails (exit 5) before writing a byte of it: what came out is
    a prefix of one file only."""
    roots = [tmp_path / "machine1", tmp_path / "machine2"]
    for n, root in enumerate(roots):
        root.mkdir()
        write_track(root / "same.wav", 40, seed=100 + n)
    contents = [(root / "same.wav").read_bytes() for root in roots]
    with cluster(tmp_path, roots, checksums=True) as c, downloads(1, c.address, "same.wav") as one:
        d = one[0]
        d.read(MIB, keep=True)
        victim = c.busiest()
        victim.server.process.kill()
        victim.ended = True
        status, err = d.read_rest(keep=True)
    assert status == 5, err
    assert "another sha256" in err, err
    served = contents[c.replicas.index(victim)]
    assert MIB <= len(d.data) < len(served)
    assert served.startswith(bytes(d.data))


# ---- the client's checks, with a deterministic cut (no HAProxy needed) ---------------------------


async def _cut_relay(
    target: int, cut_after: int, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Forward one connection to 127.0.0.1:``target``, and cut it (both ways) once
    ``cut_after`` bytes came back: a replica dying mid-stream, at a known byte."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    async with listeners[0] as listener:
        client = await listener.accept()
    server = await trio.open_tcp_stream("127.0.0.1", target)
    async with client, server, trio.open_nursery() as nursery:

        async def up() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await client.receive_some():
                    await server.send_all(data)

        async def down() -> None:
            left = cut_after
            while left > 0 and (data := await server.receive_some(min(left, 65536))):
                await client.send_all(data)
                left -= len(data)
            nursery.cancel_scope.cancel()

        nursery.start_soon(up)
        nursery.start_soon(down)


@dataclass
class Machines:
    servers: list[ServerProcess]
    contents: list[bytes]


@pytest.fixture
def two_different_copies(tmp_path: Path) -> Iterator[Machines]:
    """Two real servers; ``same.wav`` differs between them (8 MiB each, sha256 known)."""
    roots = [tmp_path / "a", tmp_path / "b"]
    with contextlib.ExitStack() as stack:
        servers = []
        for n, root in enumerate(roots):
            root.mkdir()
            write_track(root / "same.wav", 8, seed=200 + n)
            replica = start_replica(f"r{n}", root, tmp_path / f"i{n}.sqlite")
            stack.callback(_stop_replica, replica)
            replica.server.wait_for_log(r"stored the sha256 of [1-9]", timeout=DEADLINE)
            servers.append(replica.server)
        yield Machines(servers, [(root / "same.wav").read_bytes() for root in roots])


def _first_cut_then(target: int, relay_port: int) -> Connector:
    """A connector: the first connection through the cutting relay, the others to ``target``."""
    calls = [0]

    def connect() -> contextlib.AbstractAsyncContextManager[Client]:
        calls[0] += 1
        port = relay_port if calls[0] == 1 else target
        return open_client(f"127.0.0.1:{port}", timeout=30)

    return connect


@pytest.mark.e2e
async def test_a_save_resumed_on_another_copy_starts_over(
    two_different_copies: Machines, tmp_path: Path
) -> None:
    """First attempt from server A, cut after 3 MiB; the resume reaches server B, whose
    file of that name differs: the .part is dropped at B's stream_start (not after a
    whole download) and the file saved is B's, whole."""
    a, b = two_different_copies.servers
    dest = tmp_path / "same.wav"
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(_cut_relay, a.port, 3 * MIB)
        connect = _first_cut_then(b.port, relay)
        outcome = await save(connect, "same.wav", dest, retry=Retry(3, 0.05))
    copy_b = two_different_copies.contents[1]
    assert dest.read_bytes() == copy_b
    assert outcome.attempt_offset == 0  # the last attempt started from the first byte
    # A's first bytes, then B's file once: not B's rest too (found out only at the end)
    assert outcome.received <= 3 * MIB + len(copy_b)


@pytest.mark.e2e
async def test_a_pipe_resumed_on_another_copy_fails_before_its_bytes(
    two_different_copies: Machines,
) -> None:
    a, b = two_different_copies.servers
    sink = io.BytesIO()
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(_cut_relay, a.port, 3 * MIB)
        connect = _first_cut_then(b.port, relay)
        with pytest.raises(IntegrityError, match="another sha256"):
            await pipe(connect, "same.wav", sink, retry=Retry(3, 0.05))
    out = sink.getvalue()
    assert 0 < len(out) < 3 * MIB
    assert two_different_copies.contents[0].startswith(out)
