"""End to end: ``musiclib serve --workers 2``, the supervisor and its two worker processes.

The real server on 127.0.0.1 and the real client. Which worker served a
connection is what that connection's ``status`` says (``worker``, ``pid``);
the kernel spreads connections over the workers by a hash of their ports,
so a test opens connections until it has met both, in a bounded loop.
Processes are checked in /proc: the workers are the supervisor's children,
their ffmpeg sources theirs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from conftest import (
    LIBRARY,
    ServerProcess,
    children_of,
    client_env,
    running_server,
    serve_on_taken_port,
)
from live_support import IO_TIMEOUT, Heard, alive, assert_same_bytes, check_cover, frames
from test_e2e_live import NOISE, NOISE_CHANNEL, noise_reference

from musiclib.client import Client, open_client
from musiclib.maintainer import CatalogState, StateBoard
from musiclib.protocol import Audio, GapNotice, ServerStatus

pytestmark = pytest.mark.e2e

#: connections opened at most to meet both workers (each lands on either with even odds)
MAX_TRIES = 200
SERVE = [sys.executable, "-m", "musiclib", "serve"]
TRACK = "Les Ondes Éphémères/Café du Matin/01 - Brume.flac"


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid``, zombies included."""
    return [c.pid for c in children_of(pid)]


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children, theirs...)."""
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[ServerProcess]:
    """``serve --workers 2`` over a copy-free root: the shipped library, its index private."""
    if not (LIBRARY / TRACK).is_file():
        pytest.skip("the demo library has not been generated (python library/generate.py)")
    with running_server(LIBRARY, "--workers", "2", "--channel", NOISE_CHANNEL) as srv:
        yield srv


@contextlib.asynccontextmanager
async def on_each_worker(address: str, count: int = 1) -> AsyncIterator[dict[int, list[Client]]]:
    """Open connections until ``count`` of them landed on each of the two workers (the
    others are closed at once); the open clients by worker number, for the block."""
    kept: dict[int, list[Client]] = {0: [], 1: []}
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(MAX_TRIES):
            one = contextlib.AsyncExitStack()
            client = await one.enter_async_context(
                open_client(address, timeout=IO_TIMEOUT, version=2)
            )
            status = await client.status()
            assert status.worker in (0, 1), status
            if len(kept[status.worker]) < count:
                kept[status.worker].append(client)
                stack.push_async_callback(one.aclose)
            else:
                await one.aclose()
            if all(len(clients) >= count for clients in kept.values()):
                break
        else:
            pytest.fail(f"{MAX_TRIES} connections did not land {count} on each worker")
        yield kept


async def statuses(address: str) -> dict[int, ServerStatus]:
    """One status from each worker."""
    found: dict[int, ServerStatus] = {}
    for _ in range(MAX_TRIES):
        async with open_client(address, timeout=IO_TIMEOUT, version=2) as client:
            status = await client.status()
        assert status.worker is not None, status
        found.setdefault(status.worker, status)
        if len(found) == 2:
            return found
    pytest.fail(f"{MAX_TRIES} connections met only the workers {sorted(found)}")


# ---------------------------------------------------------------------------- the board


def test_the_state_board_survives_a_writer_killed_mid_write(tmp_path: Path) -> None:
    """Followers read what the primary last published; a primary killed between the two
    halves of a write leaves readers with the last values, not spinning, and the next
    primary's write is read whole again."""
    board = StateBoard.create(tmp_path / "state")
    follower = StateBoard(tmp_path / "state")
    assert follower.read() == (CatalogState(0, True, 0, None), 0)  # before the first scan
    board.publish(CatalogState(10, False, 2, (3.0, 0.25)), 1)
    state, channels = follower.read()
    assert (state.tracks, state.scanning, state.scans, channels) == (10, False, 2, 1)
    assert state.last_scan is not None and state.last_scan[1] == 0.25
    assert 3.0 <= state.last_scan[0] < 60.0
    struct.pack_into("<Q", board._map, 0, 7)  # an odd sequence number: a write half done
    assert follower.read()[0].tracks == 10
    StateBoard(tmp_path / "state").publish(CatalogState(11, True, 0, None), 0)
    assert follower.read() == (CatalogState(11, True, 0, None), 0)
    board.close()
    follower.close()


async def test_a_secondarys_remembered_names_are_dropped_at_the_primarys_next_commit(
    tmp_path: Path,
) -> None:
    """A secondary answers a name it resolved before from memory, and not after the
    primary committed a rescan that renamed or replaced it: the primary's index says
    each commit on the board (as ``Server`` wires it), before its next batch."""
    from musiclib.errors import NotFound
    from musiclib.library import Library
    from musiclib.server import Server, ServerConfig, WorkerRole

    root = tmp_path / "lib"
    root.mkdir()
    (root / "a.flac").write_bytes(os.urandom(3000))
    (root / "b.flac").write_bytes(os.urandom(2000))
    index = tmp_path / "index.sqlite"
    board = StateBoard.create(tmp_path / "state")
    config = ServerConfig(root=root, index=index)
    internal = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    writer = Library(root, index=index, workers=0)
    primary = Server(writer, config, worker=WorkerRole(0, [], "", internal, board, 0.0))
    writer.rescan()
    reader = Library(root, index=index, read_only=True)
    asked: list[str] = []
    real = reader.locate

    def locate(name: str) -> tuple[object, int]:
        asked.append(name)
        return real(name)

    reader.locate = locate  # type: ignore[method-assign]
    secondary = Server(
        reader, config, worker=WorkerRole(1, [], "", None, StateBoard(tmp_path / "state"), 0.0)
    )
    found = await secondary.maintainer.locate("a.flac")
    assert await secondary.maintainer.locate("a.flac") == found
    assert (await secondary.maintainer.locate("b.flac"))[0].size == 2000
    assert asked == ["a.flac", "b.flac"]

    os.rename(root / "a.flac", root / "c.flac")
    (root / "b.flac").write_bytes(os.urandom(5000))
    writer.rescan()  # the primary's scan: two commits (the new rows, then the deletion)
    with pytest.raises(NotFound):
        await secondary.maintainer.locate("a.flac")
    assert (await secondary.maintainer.locate("b.flac"))[0].size == 5000
    assert (await primary.maintainer.locate("c.flac"))[0].path == "c.flac"
    for lib in (reader, writer):
        lib.close()
    internal.close()
    board.close()


# ---------------------------------------------------------------------------- serving


async def test_both_workers_serve_and_each_sends_the_exact_bytes(workers: ServerProcess) -> None:
    """Connections land on both workers, each a child of the supervisor; a download
    through either is the file, byte for byte, with the right sha256."""
    want = (LIBRARY / TRACK).read_bytes()
    pids = children(workers.process.pid)
    async with on_each_worker(workers.address) as by_worker:
        for number, (client,) in by_worker.items():
            status = await client.status()
            assert status.pid in pids, (status, pids)
            assert status.tracks == 10 and status.channels == 1, status
            async with client.stream(TRACK) as reader:
                got = b"".join([chunk async for chunk in reader])
            assert_same_bytes(got, want, f"{TRACK} from worker {number}")
            assert reader.end is not None
            assert reader.end.sha256 == hashlib.sha256(want).hexdigest()
    log = workers.log()
    assert "worker 0: " in log and "worker 1: " in log
    assert log.count("listening on") == 1, log  # the supervisor says it once, for all


async def test_a_rescan_asked_of_either_worker_is_seen_by_both(workers: ServerProcess) -> None:
    """The primary alone scans; a secondary hands the rescan to it. Every worker's
    status then counts the scans the primary finished, and says it is not scanning."""
    before = await statuses(workers.address)
    async with on_each_worker(workers.address) as by_worker:
        for (client,) in by_worker.values():
            reply = await client.rescan(wait=True)
            assert reply.tracks == 10 and not reply.scanning
    after = await statuses(workers.address)
    for number in (0, 1):
        assert after[number].scans >= before[number].scans + 2, (before, after)
        assert after[number].tracks == 10 and not after[number].scanning, after
        assert after[number].last_scan is not None
    assert workers.log().count("worker 1: indexed") == 0  # never scans


# ---------------------------------------------------------------------------- live channels


async def test_a_channel_sounds_the_same_on_either_worker(workers: ServerProcess) -> None:
    """Two listeners on each worker: every chunk is the source's frames at its position
    (so all four agree wherever they overlap), contiguous, with no gap."""
    reference = await trio.to_thread.run_sync(noise_reference)
    heard: list[tuple[int, Heard]] = []

    async def listen(number: int, client: Client) -> None:
        async with client.listen("noise", frames=NOISE.sample_rate // 2, preroll_ms=200) as audio:
            assert audio.start is not None
            listened = Heard(audio.start)
            async for event in audio:
                listened.events.append(event)
            listened.end = audio.end
        heard.append((number, listened))

    with trio.fail_after(IO_TIMEOUT):
        async with (
            on_each_worker(workers.address, count=2) as by_worker,
            trio.open_nursery() as nursery,
        ):
            for number, clients in by_worker.items():
                for client in clients:
                    nursery.start_soon(listen, number, client)
    assert sorted(number for number, _ in heard) == [0, 0, 1, 1]
    for number, listened in heard:
        listened.assert_contiguous_audio()
        listened.assert_matches(reference, f"a listener on worker {number}")
        assert listened.end is not None and listened.end.reason == "complete", listened.end
    starts = {listened.start.epoch for _, listened in heard}
    assert len(starts) == 1, starts  # one channel, the primary's, whoever relayed it


async def test_a_publish_through_the_secondary_is_heard_on_both_workers(
    workers: ServerProcess,
) -> None:
    """A client publishes numbered samples to the secondary (handed to the primary with
    its data frames); a listener on each worker hears every frame at its own position."""
    rate, chunk, total = 16000, 320, 16000
    heard: dict[int, tuple[int, list[Audio | GapNotice]]] = {}

    async def listen(number: int, client: Client, joined: trio.Event) -> None:
        async with client.listen("said", frames=total // 2) as audio:
            assert audio.start is not None
            joined.set()
            heard[number] = (audio.start.position, [event async for event in audio])
            assert audio.end is not None and audio.end.reason == "complete", audio.end

    with trio.fail_after(IO_TIMEOUT):
        async with on_each_worker(workers.address, count=2) as by_worker:
            publisher, _ = by_worker[1]
            listeners = {0: by_worker[0][0], 1: by_worker[1][1]}
            async with (
                publisher.publish("said", sample_rate=rate, channels=1) as pub,
                trio.open_nursery() as nursery,
            ):
                joined = {number: trio.Event() for number in listeners}
                for number, client in listeners.items():
                    nursery.start_soon(listen, number, client, joined[number])
                for event in joined.values():
                    await event.wait()
                begin, sent = trio.current_time(), 0
                while sent < total:
                    await pub.send(frames(chunk, sent))
                    sent += chunk
                    await trio.sleep_until(begin + sent / rate)
    for number, (start, events) in heard.items():
        assert check_cover(events, start) == (total // 2, 0), number
    assert sorted(heard) == [0, 1]


# ---------------------------------------------------------------------------- processes


async def test_sigterm_stops_the_supervisor_and_every_worker(tmp_path: Path) -> None:
    """With a listener connected through the secondary, SIGTERM: exit status 0 (checked
    by running_server), and no worker or ffmpeg left of any of them."""
    with running_server(LIBRARY, "--workers", "2", "--channel", NOISE_CHANNEL) as srv:
        left = descendants(srv.process.pid)
        assert len(children(srv.process.pid)) == 2, left
        assert len(left) >= 3, left  # and the primary's ffmpeg source
        async with on_each_worker(srv.address) as by_worker:
            (secondary,) = by_worker[1]
            async with secondary.listen("noise") as audio:
                await audio.__anext__()
                status = await trio.to_thread.run_sync(srv.stop)
                async for _ in audio:  # the channel ends: the listen says so
                    pass
    assert status == 0, srv.log()
    assert [pid for pid in left if alive(pid)] == []
    assert "worker 0: stopped" in srv.log() and "worker 1: stopped" in srv.log()


async def test_a_killed_worker_is_logged_restarted_and_serves_again(
    workers: ServerProcess,
) -> None:
    """SIGKILL a secondary, then the primary: each death is one log line, each worker
    comes back with a new pid, and the primary's return brings the channel back."""
    for number in (1, 0):
        old = (await statuses(workers.address))[number].pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        workers.wait_for_log(
            rf"worker {number} \(pid {old}\) was killed by SIGKILL; restarting it in",
            timeout=IO_TIMEOUT,
        )
        with trio.fail_after(IO_TIMEOUT):
            while True:
                new = (await statuses(workers.address))[number]
                if new.pid != old and new.channels == 1:
                    break
                await trio.sleep(0.1)
        assert new.pid in children(workers.process.pid)
    # the new primary scans and runs the channel; it is heard through the secondary
    workers.wait_for_log(r"(?s)was killed by SIGKILL.*worker 0: indexed", timeout=IO_TIMEOUT)
    async with on_each_worker(workers.address) as by_worker:
        (secondary,) = by_worker[1]
        async with secondary.listen("noise", frames=4800) as audio:
            got = [event async for event in audio]
        assert got and audio.end is not None and audio.end.reason == "complete"


def test_a_port_in_use_is_a_usage_error_with_workers(tmp_path: Path) -> None:
    """The supervisor binds once without SO_REUSEPORT first: a taken port is exit 2 and
    one line, not a silent share with the other server."""
    result = serve_on_taken_port(
        lambda port: ["--root", str(tmp_path), "--port", str(port), "--workers", "2"]
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "address already in use" in lines[0], result.stderr


def test_a_wyoming_port_in_use_is_a_usage_error_with_workers(tmp_path: Path) -> None:
    """``--wyoming`` on a taken port: one line naming the option, exit 2, at once (the
    supervisor probes it before any worker starts; the primary used to die with a
    traceback and stop the server with exit status 1)."""
    result = serve_on_taken_port(
        lambda port: [
            *("--root", str(tmp_path), "--port", "0", "--workers", "2"),
            *("--wyoming", f"127.0.0.1:{port}", "--index", str(tmp_path / "index.sqlite")),
        ]
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--wyoming" in lines[0] and "address already in use" in lines[0], result.stderr
    assert "with --wyoming" in lines[0]  # the hint names the option that fixes it


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """SIGKILL the supervisor: its workers see their standard input end and stop (no
    orphan keeps the port or an ffmpeg), and remove the supervisor's private directory."""
    argv = [*SERVE, "--root", tmp_path, "--port", "0", "--workers", "2", "--log-level", "debug"]
    private = tmp_path / "tmp"  # where the supervisor makes its private directory
    private.mkdir()
    srv = ServerProcess.start([*argv, "--channel", NOISE_CHANNEL], {"TMPDIR": str(private)})
    process = srv.process
    left: list[int] = []
    try:
        srv.wait_for_log(r"listening on 127\.0\.0\.1:\d+ \(2 workers\)", timeout=IO_TIMEOUT)
        left = descendants(process.pid)
        assert len(left) >= 3, left  # two workers and the primary's ffmpeg
        process.kill()
        process.wait(timeout=IO_TIMEOUT)
        srv.wait_for_log(r"worker 0: stopped", timeout=IO_TIMEOUT)
        srv.wait_for_log(r"worker 1: stopped", timeout=IO_TIMEOUT)
        deadline = time.monotonic() + IO_TIMEOUT
        while any(alive(pid) for pid in left) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in left if alive(pid)] == [], srv.log()
        assert "the supervisor is gone; stopping" in srv.log()
        assert list(private.iterdir()) == []  # the workers removed it
    finally:
        for pid in [*left, *descendants(process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
            process.wait()


def _with_environ(marker: str) -> list[int]:
    """Pids of the processes whose environment holds ``marker`` (this user's, readable)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def test_a_primary_that_cannot_start_stops_the_server_and_the_waiting_secondary(
    tmp_path: Path,
) -> None:
    """Every worker's interpreter starts at once, the secondary waiting for its settings
    until the primary is ready: a primary that fails (an index under a regular file)
    stops the server, with one line, and leaves no secondary behind."""
    (tmp_path / "file").write_bytes(b"")
    marker = f"MUSICLIB_TEST_MARK={tmp_path}"
    argv = [*SERVE, "--root", str(LIBRARY), "--port", "0", "--workers", "3"]
    argv += ["--index", str(tmp_path / "file" / "index.sqlite3")]
    env = client_env({"MUSICLIB_TEST_MARK": str(tmp_path)})
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=IO_TIMEOUT)
    assert done.returncode != 0
    assert "worker 0 could not start" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "worker 1" not in done.stderr, done.stderr
    deadline = time.monotonic() + IO_TIMEOUT
    while _with_environ(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _with_environ(marker) == []
