"""Scenario 11: three replicas behind HAProxy, against one replica directly (issue 14, item 3).

Three ``musiclib serve --workers 1`` replicas of one folder (each with its own index, as
on separate machines) and the real ``haproxy`` running ``deploy/haproxy.cfg`` with only
its addresses replaced. In the same run, rounds of ``CLIENTS`` concurrent downloads of
the 10 MB file go alternately straight to replica 1 and through HAProxy (interleaved, so
drift hits both alike); the client is scenario 2's (one trio loop in this process,
verified against nothing: throughput and time to first byte only). ``CLIENTS`` is 48,
under the 64 connections per client address the shipped frontend allows (one client
address here).

Then the failover pause: one download of the big file (scenario 1's; larger than every
buffer on the way) through HAProxy with ``fetch.pipe`` and ``get``'s default retries into
a sink that takes 4 MiB/s until the replica serving it is SIGKILLed half a second in, and
then all it gets: the pause is from the kill to the first byte the sink receives after
its longest silence (the resumed stream's first byte; what was in buffers drains first).
The output is then checked whole against the file's sha256, and a "retrying" warning
must have been logged.

On this 2-core machine three replicas cannot add cores: the comparison is what HAProxy
costs (one more process copying every byte through user space), not what replicas
gain, which needs machines of their own. Skipped with a note when haproxy is missing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import trio

from bench import data
from bench.common import DATA, REPO, Row, Scenario, Sizes, Target
from bench.s2_concurrent import Load, _musiclib_one, run_load
from bench.servers import free_port, musiclib_server, wait_indexed

CLIENTS = 48
THROUGHPUT = Target(">= 0.45x direct", "ratio", ">=", 0.45)
TTFB_ADDED = Target("<= 50 ms", "value", "<=", 50.0)
PAUSE = Target("<= 1.0 s", "value", "<=", 1.0)
SINK_RATE = 4 << 20  # bytes per second the failover download's sink takes


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None
    )


def config(front: int, stats: int, replicas: list[str]) -> str:
    """deploy/haproxy.cfg with its addresses replaced (as tests/test_cluster.py does)."""
    text = (REPO / "deploy" / "haproxy.cfg").read_text()
    text = text.replace("bind 127.0.0.1:7650", f"bind 127.0.0.1:{front}")
    text = text.replace("bind 127.0.0.1:7649", f"bind 127.0.0.1:{stats}")
    for n, address in enumerate(replicas, 1):
        text = text.replace(f"server replica{n} 127.0.0.1:765{n}", f"server replica{n} {address}")
    return text


def stats(port: int) -> dict[str, dict[str, str]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/;csv", timeout=10) as r:
        text = r.read().decode().lstrip("# ")
    return {
        row["svname"]: row
        for row in csv.DictReader(io.StringIO(text))
        if row["pxname"] == "replicas"
    }


def wait_up(port: int, names: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            now = stats(port)
            if all(now[n]["status"] == "UP" for n in names):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("HAProxy never saw every replica UP")


class _Count(logging.Handler):
    """Counts the client's "retrying" warnings (proof that the download resumed)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "retrying" in record.getMessage()


class _SlowSink(io.RawIOBase):
    """A binary sink taking ``SINK_RATE`` bytes a second until ``fast`` is set (at the
    kill: what was buffered then drains at once, so the silence that follows is the
    failover's), noting when each write came."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.writes: list[float] = []
        self.lock = threading.Lock()
        self.fast = False

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        with self.lock:
            self.writes.append(time.perf_counter())
        self.digest.update(b)
        if not self.fast:
            time.sleep(len(b) / SINK_RATE)
        return len(b)


def _failover(
    front: int, stats_port: int, medium: data.DataFile, procs: dict[str, object]
) -> float:
    """Seconds from the kill of the serving replica to the resumed stream's first byte."""
    from musiclib.client import open_client
    from musiclib.fetch import Retry, pipe

    sink = _SlowSink()
    killed: list[float] = []
    retries = _Count()
    logging.getLogger("musiclib.client").addHandler(retries)

    async def kill_serving() -> None:
        await trio.sleep(0.5)
        now = await trio.to_thread.run_sync(stats, stats_port)
        name = max(now, key=lambda n: int(now[n]["scur"] or 0))
        killed.append(time.perf_counter())
        procs[name].process.kill()  # type: ignore[attr-defined]
        sink.fast = True

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_serving)
            await pipe(
                lambda: open_client(f"127.0.0.1:{front}"),
                medium.name,
                sink,  # type: ignore[arg-type]
                retry=Retry(),
            )

    trio.run(main)
    logging.getLogger("musiclib.client").removeHandler(retries)
    if sink.digest.hexdigest() != medium.sha256:
        raise RuntimeError("the download resumed after the failover is not the file")
    if not retries.count:
        raise RuntimeError("the kill came after the stream had been sent: nothing resumed")
    after = [t for t in sink.writes if t > killed[0]]
    gaps = [(b - a, b) for a, b in itertools.pairwise(after)]
    resumed = max(gaps)[1] if gaps else after[0]
    return resumed - killed[0]


def run(sizes: Sizes) -> Scenario:
    medium = data.medium_file(sizes.medium_bytes)
    big = data.big_file(sizes.big_bytes)  # larger than every buffer: the kill is mid-stream
    sc = Scenario("11", f"{CLIENTS} downloads of a 10 MB file: three replicas behind HAProxy")
    haproxy = haproxy_binary()
    if haproxy is None:
        sc.notes.append("skipped: haproxy is not installed (make system-deps)")
        return sc
    rounds = max(sizes.rounds, 2)
    with ExitStack() as stack:
        where = str(DATA)  # the same file system as the data: links, not copies
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=where, prefix="cluster-")))
        root = tmp / "library"  # both files, linked (or copied) into one root
        root.mkdir()
        for f in (medium, big):
            try:
                os.link(f.path, root / f.name)
            except OSError:
                shutil.copyfile(f.path, root / f.name)
        replicas = {}
        for n in (1, 2, 3):
            server = stack.enter_context(
                musiclib_server(root, "--index", str(tmp / f"index{n}.sqlite"))
            )
            replicas[f"replica{n}"] = server
        for server in replicas.values():
            trio.run(wait_indexed, server.address, 2)
        front, stats_port = free_port(), free_port()
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(config(front, stats_port, [s.address for s in replicas.values()]))
        proxy = subprocess.Popen(
            [haproxy, "-db", "-q", "-f", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(lambda: (proxy.terminate(), proxy.wait(10)))
        wait_up(stats_port, list(replicas))
        direct_rounds, proxied_rounds = [], []
        for _ in range(rounds):
            direct_rounds.append(
                trio.run(
                    run_load, CLIENTS, _musiclib_one, replicas["replica1"].address, medium.name
                )
            )
            proxied_rounds.append(
                trio.run(run_load, CLIENTS, _musiclib_one, f"127.0.0.1:{front}", medium.name)
            )
        direct, proxied = Load.pooled(direct_rounds), Load.pooled(proxied_rounds)
        pause = _failover(front, stats_port, big, replicas)
    for name, load in (("direct", direct), ("HAProxy", proxied)):
        if load.failures:
            sc.notes.append(f"{name}: {len(load.failures)} failed; first: {load.failures[0]}")
    sc.add(
        Row(
            "aggregate throughput, HAProxy + 3 replicas",
            proxied.throughput,
            "MiB/s",
            direct.throughput,
            "one replica directly",
            THROUGHPUT,
        )
    )
    sc.add(Row("TTFB p50, HAProxy", proxied.p(50), "ms", direct.p(50), "one replica directly"))
    sc.add(Row("TTFB p99, HAProxy", proxied.p(99), "ms", direct.p(99), "one replica directly"))
    p99_added = (proxied.p(99) or 0.0) - (direct.p(99) or 0.0)
    sc.add(Row("TTFB p99 added by HAProxy", p99_added, "ms", target=TTFB_ADDED))
    sc.add(Row("failover pause (kill -> next byte)", pause, "s", target=PAUSE))
    sc.notes.append(
        f"{rounds} rounds of {CLIENTS} each way, interleaved; get's default retries "
        "(first after 0.5 s); the failover download verified whole"
    )
    sc.raw = {
        "direct": {"throughput": direct.throughput, "p50": direct.p(50), "p99": direct.p(99)},
        "haproxy": {"throughput": proxied.throughput, "p50": proxied.p(50), "p99": proxied.p(99)},
        "failover_pause_s": pause,
    }
    return sc
