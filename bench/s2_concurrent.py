"""Scenario 2: 500 concurrent raw downloads of a 10 MB file from one client process.

All downloads start at once from one trio event loop in this process. For each, the time
to first byte runs from the start of its connection to the first payload byte (musiclib:
the first data chunk, after ``hello`` and ``stream`` sent together, as ``get`` and ``play``
send them, then ``welcome`` and ``stream_start``; the baselines: the
first byte received, which for nginx is its response header sent together with the body).
Aggregate throughput is the payload of all downloads over the wall time from the first
start to the last end. The server's peak RSS is its VmHWM; it started fresh for this
scenario, so that is the peak of this load.

The load runs ``rounds`` rounds (3; one after the other, same server) and the times to
first byte of all rounds are pooled before taking percentiles: on this machine the tail
is bimodal (in some rounds a tenth of the connections wait seconds for their ``welcome``),
and one round alone would hide it or exaggerate it. The notes give each round's p99 and
where the time goes (connect, ``stream_start``, first byte), and a thread
samples the listener's accept queue (/proc/net/tcp) every 50 ms: connections waiting
there are waiting for the server's event loop, not for the network.

Baselines, read by the same trio client code without the protocol: the ``socket.sendfile``
server (a thread per connection) and nginx when installed.

Why: the issue asks for p99 time to first byte <= 250 ms and server RSS <= 150 MiB at
500 concurrent downloads, which tests fairness (a new client must not wait behind every
running stream) and per-connection memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from bench import data
from bench.common import Row, Scenario, Sizes, Target, accept_queue, mib_per_s, percentile
from bench.data import DataFile
from bench.servers import musiclib_server, nginx_server, sendfile_server, wait_indexed

READ_SIZE = 256 * 1024
TTFB_P99 = Target("<= 250 ms", "value", "<=", 250.0)
RSS = Target("<= 150 MiB", "value", "<=", 150.0)


@dataclass
class Load:
    """What one round of concurrent downloads measured."""

    ttfb_ms: list[float] = field(default_factory=list)
    #: milliseconds from the start to intermediate steps (musiclib: connected, stream_start)
    phases_ms: dict[str, list[float]] = field(default_factory=dict)
    nbytes: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mib: float | None = None
    #: most connections seen waiting in the listener's accept queue (sampled)
    max_accept_queue: int | None = None
    #: the queue's length integrated over time: connection-seconds spent waiting for accept
    accept_wait: float | None = None
    #: the longest time the accept queue stayed non-empty, seconds
    accept_stretch: float | None = None
    #: p99 time to first byte of each round, when several were pooled
    round_p99_ms: list[float] = field(default_factory=list)
    #: CPU seconds this (the client's) process used meanwhile: the client shares the
    #: machine's cores with the server, and near one core it is the bottleneck itself
    client_cpu_s: float = 0.0
    #: p99 of a first round run before the pooled ones and not pooled (scenario 9)
    first_burst_p99_ms: float | None = None

    @classmethod
    def pooled(cls, rounds: list[Load]) -> Load:
        """All rounds as one sample: TTFBs pooled, bytes and seconds summed."""
        out = cls()
        for r in rounds:
            out.ttfb_ms += r.ttfb_ms
            for name, values in r.phases_ms.items():
                out.phases_ms.setdefault(name, []).extend(values)
            out.nbytes += r.nbytes
            out.failures += r.failures
            out.seconds += r.seconds
            out.client_cpu_s += r.client_cpu_s
            if r.ttfb_ms:
                out.round_p99_ms.append(percentile(r.ttfb_ms, 99))
        return out

    @property
    def throughput(self) -> float:
        return mib_per_s(self.nbytes, self.seconds) if self.seconds else 0.0

    @property
    def client_cpu_pct(self) -> float:
        """The client's CPU use over the load, in percent of one core."""
        return 100 * self.client_cpu_s / self.seconds if self.seconds else 0.0

    def raw(self) -> dict[str, Any]:
        """Everything measured, for ``bench/results.json``."""
        return {
            "seconds": self.seconds,
            "bytes": self.nbytes,
            "ttfb_ms_p50": self.p(50),
            "ttfb_ms_p99": self.p(99),
            "ttfb_ms_max": max(self.ttfb_ms) if self.ttfb_ms else None,
            "throughput_mib_s": self.throughput,
            "peak_rss_mib": self.peak_rss_mib,
            "failures": len(self.failures),
            "round_p99_ms": self.round_p99_ms,
            "max_accept_queue": self.max_accept_queue,
            "accept_wait_connection_s": self.accept_wait,
            "accept_queue_longest_s": self.accept_stretch,
            "phases_ms_p50": {k: percentile(v, 50) for k, v in self.phases_ms.items()},
            "phases_ms_p99": {k: percentile(v, 99) for k, v in self.phases_ms.items()},
            "client_cpu_pct": self.client_cpu_pct,
            "first_burst_p99_ms": self.first_burst_p99_ms,
        }

    def p(self, pct: float) -> float | None:
        return percentile(self.ttfb_ms, pct) if self.ttfb_ms else None

    def phase(self, name: str, began: float) -> None:
        elapsed = (trio.current_time() - began) * 1000
        self.phases_ms.setdefault(name, []).append(elapsed)

    def phase_summary(self) -> str:
        """p50/p99 of each step, to show where the time to first byte goes."""
        steps = "; ".join(
            f"{name} p50 {percentile(v, 50):.0f} ms, p99 {percentile(v, 99):.0f} ms"
            for name, v in [*self.phases_ms.items(), ("first byte", self.ttfb_ms)]
            if v
        )
        return f"{steps}; client CPU {self.client_cpu_pct:.0f}% of a core"


async def _musiclib_one(address: str, track: str, load: Load) -> None:
    from musiclib.client import open_client

    began = trio.current_time()
    first: float | None = None
    got = 0
    # the order of musiclib's own stream path (fetch: get's retries, play's later tracks):
    # the stream request goes out with the hello, and its reply begins after the welcome
    async with open_client(address, timeout=120, early=True) as client:
        load.phase("connected", began)
        async with client.stream(track) as stream:
            load.phase("stream_start", began)
            async for chunk in stream:
                if first is None:
                    first = trio.current_time()
                got += len(chunk)
    assert first is not None
    load.ttfb_ms.append((first - began) * 1000)
    load.nbytes += got


async def _raw_one(address: str, request: bytes, header_bytes: int, load: Load) -> None:
    host, _, port = address.rpartition(":")
    began = trio.current_time()
    first: float | None = None
    got = 0
    stream = await trio.open_tcp_stream(host, int(port))
    load.phase("connected", began)
    async with stream:
        if request:
            await stream.send_all(request)
        while chunk := await stream.receive_some(READ_SIZE):
            if first is None:
                first = trio.current_time()
            got += len(chunk)
    assert first is not None
    load.ttfb_ms.append((first - began) * 1000)
    load.nbytes += got - header_bytes


Download = Callable[..., Awaitable[None]]


async def _guarded(one: Download, args: tuple[object, ...], load: Load) -> None:
    try:
        await one(*args, load)
    except Exception as exc:  # one failed download is a finding, not a crash
        load.failures.append(f"{type(exc).__name__}: {exc}")


async def run_load(n: int, one: Download, *args: object) -> Load:
    """Start ``n`` downloads at once; wait for all of them."""
    load = Load()
    began, cpu = trio.current_time(), time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(_guarded, one, args, load)
    load.seconds = trio.current_time() - began
    load.client_cpu_s = time.process_time() - cpu
    return load


class AcceptQueueWatch:
    """Samples the listener's accept queue every 50 ms in a thread.

    Connections in that queue have finished their TCP handshake and wait for the
    server's ``accept()``. Any server shows a burst when 500 connections arrive at once;
    what tells a starved accept loop apart is how long the queue stays non-empty (the
    longest stretch is kept), with the maximum and the integral (connection-seconds of
    waiting) for the JSON.
    """

    INTERVAL = 0.05

    def __init__(self, address: str) -> None:
        self.port = int(address.rpartition(":")[2])
        self.max: int | None = None
        self.integral = 0.0
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        since: float | None = None  # when the queue last became non-empty
        while not self._stop.wait(self.INTERVAL):
            length = accept_queue(self.port)
            if length is None:
                continue
            now = time.monotonic()
            self.max = max(self.max or 0, length)
            self.integral += length * self.INTERVAL
            if length and since is None:
                since = now
            elif not length:
                since = None
            if since is not None:
                self.longest = max(self.longest, now - since + self.INTERVAL)

    def __enter__(self) -> AcceptQueueWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def note(self, load: Load) -> None:
        """Put what was seen into ``load`` (its accept-queue figures)."""
        load.max_accept_queue = self.max
        if self.max is not None:
            load.accept_wait, load.accept_stretch = self.integral, self.longest


def http_get(name: str) -> bytes:
    """The HTTP/1.0 request nginx is sent for the file ``name`` (it closes at the end)."""
    return f"GET /{name} HTTP/1.0\r\nHost: bench\r\n\r\n".encode()


def _rounds(rounds: int, n: int, address: str, one: Download, *args: object) -> Load:
    with AcceptQueueWatch(address) as watch:
        load = Load.pooled([trio.run(run_load, n, one, address, *args) for _ in range(rounds)])
    watch.note(load)
    return load


def _musiclib(rounds: int, n: int, medium: DataFile) -> Load:
    with musiclib_server(medium.root) as server:
        trio.run(wait_indexed, server.address, 1)
        load = _rounds(rounds, n, server.address, _musiclib_one, medium.name)
        load.peak_rss_mib = server.peak_rss_mib()
    return load


def _sendfile(rounds: int, n: int, medium: DataFile) -> Load:
    with sendfile_server(medium.path, "raw") as server:
        load = _rounds(rounds, n, server.address, _raw_one, b"", 0)
        load.peak_rss_mib = server.peak_rss_mib()
    return load


def _nginx(rounds: int, n: int, medium: DataFile) -> Load | None:
    request = http_get(medium.name)
    with nginx_server(medium.root) as nginx:
        if nginx is None:
            return None
        probe = trio.run(run_load, 1, _raw_one, nginx.address, request, 0)
        header_bytes = probe.nbytes - medium.size  # the response header, counted once
        load = _rounds(rounds, n, nginx.address, _raw_one, request, header_bytes)
        load.peak_rss_mib = nginx.peak_rss_mib()
    return load


def run(sizes: Sizes) -> Scenario:
    n = sizes.clients
    medium = data.medium_file(sizes.medium_bytes)
    rounds = sizes.rounds
    title = f"{n} concurrent downloads of a {medium.size / 1e6:.0f} MB file, {rounds} rounds"
    sc = Scenario("2", title)
    ml = _musiclib(rounds, n, medium)
    sf = _sendfile(rounds, n, medium)
    ngx = _nginx(rounds, n, medium)
    if ngx is None:
        sc.notes.append("nginx baseline skipped: nginx is not installed")
    loads = {"musiclib": ml, "sendfile": sf, "nginx": ngx}
    for name, load in loads.items():
        if load is None:
            continue
        expected = rounds * n * medium.size
        if load.failures or load.nbytes != expected:
            sc.notes.append(
                f"{name}: {len(load.failures)} of {rounds * n} downloads failed, "
                f"{load.nbytes} of {expected} bytes; first error: "
                + (load.failures[0] if load.failures else "-")
            )
    for name, load in loads.items():
        if load is not None:
            each = ", ".join(f"{v:.0f}" for v in load.round_p99_ms)
            sc.notes.append(f"{name}: {load.phase_summary()}; p99 of each round: {each} ms")
    _rows(sc, ml, sf, ngx)
    sc.raw = {name: load.raw() for name, load in loads.items() if load is not None}
    return sc


def _rows(sc: Scenario, ml: Load, sf: Load, ngx: Load | None) -> None:
    for base, label in ((sf, "sendfile"), (ngx, "nginx")):
        b = base if base is not None else Load()
        known = base is not None
        sc.add(
            Row(
                "aggregate throughput",
                ml.throughput,
                "MiB/s",
                b.throughput if known else None,
                label,
            )
        )
        sc.add(Row("TTFB p50", ml.p(50), "ms", b.p(50) if known else None, label))
        sc.add(Row("TTFB p99", ml.p(99), "ms", b.p(99) if known else None, label, TTFB_P99))
        sc.add(
            Row(
                "accept queue non-empty, longest stretch",
                ml.accept_stretch,
                "s",
                b.accept_stretch if known else None,
                label,
            )
        )
        sc.add(
            Row(
                "server peak RSS (VmHWM)",
                ml.peak_rss_mib,
                "MiB",
                b.peak_rss_mib if known else None,
                label,
                RSS,
            )
        )
