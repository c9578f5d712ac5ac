"""The checksum cache: one computation per file version, shared, remembered, honest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from musiclib import checksums
from musiclib.checksums import ChecksumCache
from musiclib.errors import Changed


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "track.flac"
    path.write_bytes(os.urandom(3 * checksums.READ_SIZE + 123))
    return path


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = checksums._hash_and_close

    def counting(fd: int, st: os.stat_result, stop: object) -> str:
        calls.append(fd)
        return real(fd, st, stop)  # type: ignore[arg-type]

    monkeypatch.setattr(checksums, "_hash_and_close", counting)
    return calls


async def test_concurrent_requests_share_one_computation_and_it_is_remembered(
    data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_hashes(monkeypatch)
    cache = ChecksumCache()
    expected = hashlib.sha256(data_file.read_bytes()).hexdigest()
    results: list[str] = []
    with open(data_file, "rb") as f:
        st = os.fstat(f.fileno())
        assert cache.known(st) is None

        async def ask() -> None:
            results.append(await cache.sha256(f.fileno(), st))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(ask)
        assert results == [expected] * 10
        assert len(calls) == 1
        assert cache.known(st) == expected
        assert await cache.sha256(f.fileno(), st) == expected
        assert len(calls) == 1
        assert f.tell() == 0  # pread: the caller's file position is untouched


async def test_a_new_version_is_hashed_again(data_file: Path) -> None:
    cache = ChecksumCache()
    with open(data_file, "rb") as f:
        first = await cache.sha256(f.fileno(), os.fstat(f.fileno()))
    with open(data_file, "ab") as f:
        f.write(b"more")
    with open(data_file, "rb") as f:
        st = os.fstat(f.fileno())
        assert cache.known(st) is None
        second = await cache.sha256(f.fileno(), st)
    assert second != first
    assert second == hashlib.sha256(data_file.read_bytes()).hexdigest()


async def test_a_file_that_shrinks_is_not_remembered(data_file: Path) -> None:
    cache = ChecksumCache()
    with open(data_file, "rb") as f:
        st = os.fstat(f.fileno())
        os.truncate(data_file, 1000)
        with pytest.raises(Changed):
            await cache.sha256(f.fileno(), st)
        assert cache.known(st) is None


async def test_a_cancelled_requester_leaves_nothing_pending(data_file: Path) -> None:
    cache = ChecksumCache()
    with open(data_file, "rb") as f:
        st = os.fstat(f.fileno())
        with trio.CancelScope() as scope:
            scope.cancel()
            await cache.sha256(f.fileno(), st)
        assert not cache._pending
        # the next request computes it (and the closed-early worker broke nothing)
        digest = await cache.sha256(f.fileno(), st)
    assert digest == hashlib.sha256(data_file.read_bytes()).hexdigest()


async def test_memory_is_bounded(tmp_path: Path) -> None:
    cache = ChecksumCache(max_entries=5)
    for i in range(12):
        path = tmp_path / f"{i}.wav"
        path.write_bytes(bytes([i]) * 10)
        with open(path, "rb") as f:
            await cache.sha256(f.fileno(), os.fstat(f.fileno()))
        assert len(cache._known) <= 5
