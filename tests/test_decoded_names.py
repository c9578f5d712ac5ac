"""How a decoded stream finds its track: through the maintainer's name cache.

A decoded stream resolves its name with ``Maintainer.locate`` (the same
remembered lookups as an original stream) instead of a worker-thread query of
its own (BENCHMARKS.md, "Issue 15, item 4"). What must hold: streams of one
name ask the index once while it is unchanged; after a rescan that renamed or
replaced a file, no stream is served from before it; names that are not found
or ambiguous get their errors as before, with no decoder started.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import count_locates

from musiclib.client import Client
from musiclib.decode import ffmpeg_executable
from musiclib.errors import Ambiguous, NotFound, single_errors
from musiclib.library import Library
from musiclib.server import Server, ServerConfig

RATE = 8000


def _tone(path: Path, frequency: int, seconds: float) -> None:
    cmd = [ffmpeg_executable(), "-v", "error", "-f", "lavfi"]
    cmd += ["-i", f"sine=frequency={frequency}:duration={seconds}"]
    subprocess.run([*cmd, "-ac", "1", "-ar", str(RATE), str(path)], check=True)


@asynccontextmanager
async def connected(server: Server) -> AsyncIterator[Client]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with single_errors():  # the client's error itself, not a group of one
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle, server_stream, "memory")
            client = Client(client_stream, timeout=60)
            await client.handshake()
            try:
                yield client
            finally:
                await client.aclose()


async def _decode(server: Server, name: str) -> bytes:
    async with connected(server) as client, client.decode(name, sample_rate=RATE) as stream:
        data = b"".join([chunk async for chunk in stream])
        assert stream.end is not None and stream.end.frames * 2 == len(data)
        return data


@pytest.fixture
def library(tmp_path: Path) -> Library:
    root = tmp_path / "lib"
    root.mkdir()
    _tone(root / "low.wav", 300, 0.5)
    _tone(root / "high.wav", 900, 0.25)
    lib = Library(root, index=tmp_path / "index.sqlite", workers=0)
    lib.rescan()
    return lib


async def test_decoded_streams_of_one_name_ask_the_index_once(library: Library) -> None:
    asked = count_locates(library)
    server = Server(library, ServerConfig(root=library.root))
    first = await _decode(server, "low.wav")
    assert len(first) == round(0.5 * RATE) * 2
    async with trio.open_nursery() as nursery:  # five at once: still the one lookup
        for _ in range(5):
            nursery.start_soon(_decode, server, "low.wav")
    assert await _decode(server, "low.wav") == first
    assert asked == ["low.wav"]
    library.close()


async def test_after_a_rescan_a_decoded_stream_is_never_served_from_before_it(
    library: Library,
) -> None:
    server = Server(library, ServerConfig(root=library.root))
    low = await _decode(server, "low.wav")
    high = await _decode(server, "high.wav")
    root = library.root
    (root / "low.wav").rename(root / "renamed.wav")
    (root / "high.wav").unlink()
    _tone(root / "high.wav", 900, 1.0)  # replaced: four times as long
    library.rescan()
    with pytest.raises(NotFound):
        await _decode(server, "low.wav")
    assert await _decode(server, "renamed.wav") == low
    replaced = await _decode(server, "high.wav")
    assert len(replaced) == 4 * len(high)
    library.close()


async def test_unknown_and_ambiguous_names_start_no_decoder(library: Library) -> None:
    server = Server(library, ServerConfig(root=library.root))
    with pytest.raises(NotFound):
        await _decode(server, "nothing-like-this.wav")
    with pytest.raises(Ambiguous):
        await _decode(server, "wav")  # both tracks match the word
    assert server.decode_slots.in_use == 0
    library.close()
