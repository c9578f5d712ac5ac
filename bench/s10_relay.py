"""Scenario 10: what a relay hop costs (issue 14, item 5): "each hop adds at most 5 ms p99".

One origin server reads a paced source (ffmpeg's ``-re`` sine, 48 kHz stereo, 20 ms chunks,
stamped when published); a relay server relays its channel
(``--channel mic=relay:ORIGIN``) and a second relay relays the first. N listeners in this
process listen directly on the origin (the baseline), N through one relay, N through two,
all at once, for the same seconds. A chunk's latency is its arrival here minus its
``time_ns``: the origin's stamp, which relays keep, so the figure is end to end. Reported:
p50 and p99 per path, and per hop the difference of the p99s (the target) and of the
medians. Every server runs one process (``--workers 1``); the three servers and this
client share the machine's two cores, as a replica and its listeners would not.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import trio

from bench.common import Row, Scenario, Sizes, Target, median, percentile
from bench.servers import musiclib_server

HOP = Target("<= 5 ms", "value", "<=", 5.0)
#: the origin's source: ffmpeg's sine, read in real time
SOURCE = "mic=ffmpeg:-re -f lavfi -i sine=frequency=440:sample_rate=48000"
#: seconds of listening before latencies are kept (connections, the relays' first chunks)
WARMUP = 1.0


async def _listen(address: str, channel: str, until: float, out: list[float]) -> None:
    """One listener: every chunk's latency in ms, from ``WARMUP`` on, until ``until``."""
    from musiclib.client import open_client
    from musiclib.protocol import Audio

    async with (
        open_client(address, timeout=30, version=2) as client,
        client.listen(channel, max_latency_ms=500) as audio,
    ):
        keep_from = time.monotonic() + WARMUP
        async for event in audio:
            now = time.time_ns()
            if isinstance(event, Audio) and time.monotonic() >= keep_from:
                out.append((now - event.time_ns) / 1e6)
            if time.monotonic() >= until:
                await audio.stop()
                break


async def _measure(paths: dict[str, str], listeners: int, seconds: float) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    until = time.monotonic() + WARMUP + seconds
    with trio.fail_after(WARMUP + seconds + 60):
        async with trio.open_nursery() as nursery:
            for name, address in paths.items():
                for _ in range(listeners):
                    nursery.start_soon(_listen, address, "mic", until, latencies[name])
    return latencies


async def _wait_live(address: str, timeout: float = 30.0) -> None:
    from musiclib.client import open_client

    with trio.fail_after(timeout):
        async with open_client(address, timeout=30, version=2) as client:
            while True:
                found = {c.name: c for c in await client.channels()}
                if "mic" in found and found["mic"].state == "live":
                    return
                await trio.sleep(0.05)


def run(sizes: Sizes) -> Scenario:
    scenario = Scenario("10", "relays: latency added per hop")
    quick = sizes.clients < 500
    listeners = 10 if quick else 30
    seconds = 5.0 if quick else 20.0
    with tempfile.TemporaryDirectory(prefix="musiclib-bench-relay-") as tmp:
        root = Path(tmp, "root")
        root.mkdir()

        def index(n: int) -> tuple[str, str]:
            return ("--index", str(Path(tmp, f"index-{n}.db")))

        with musiclib_server(root, *index(0), "--channel", SOURCE) as origin:
            trio.run(_wait_live, origin.address)
            relay = f"mic=relay:{origin.address}"
            with musiclib_server(root, *index(1), "--channel", relay) as relay1:
                relay2_spec = f"mic=relay:{relay1.address}"
                with musiclib_server(root, *index(2), "--channel", relay2_spec) as relay2:
                    trio.run(_wait_live, relay2.address)
                    paths = {
                        "origin": origin.address,
                        "1 relay": relay1.address,
                        "2 relays": relay2.address,
                    }
                    latencies = trio.run(_measure, paths, listeners, seconds)
    stats = {
        name: (median(values), percentile(values, 99), len(values))
        for name, values in latencies.items()
    }
    base_p99 = stats["origin"][1]
    for name, (p50, p99, count) in stats.items():
        baseline = {} if name == "origin" else {"baseline": base_p99, "baseline_name": "origin"}
        scenario.add(Row(f"{name}: latency p50", p50, "ms", note=f"{count} chunks"))
        scenario.add(Row(f"{name}: latency p99", p99, "ms", **baseline))  # type: ignore[arg-type]
    hops = [("origin", "1 relay"), ("1 relay", "2 relays")]
    for before, after in hops:
        scenario.add(
            Row(
                f"hop {before} -> {after}: added p99",
                stats[after][1] - stats[before][1],
                "ms",
                target=HOP,
                note=f"p50 added {stats[after][0] - stats[before][0]:.2f} ms",
            )
        )
    scenario.notes.append(
        f"{listeners} listeners per path at once, {seconds:g} s each after {WARMUP:g} s of "
        "warm-up; 48 kHz stereo, 20 ms chunks; origin, two relays and the listeners on one "
        "2-core machine"
    )
    scenario.raw = {
        "listeners_per_path": listeners,
        "seconds": seconds,
        "stats_ms": {k: {"p50": v[0], "p99": v[1], "chunks": v[2]} for k, v in stats.items()},
    }
    return scenario
