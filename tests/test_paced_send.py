"""How a paced decoded stream cuts its samples into data frames (``_send_paced``).

The clock is trio's MockClock (``autojump_clock``): virtual seconds, no timing
thresholds. The rules checked: every byte goes out once and in order; never more
than ``burst + t`` seconds of audio after ``t`` seconds; what the clock already
allows goes out as one frame (the burst, a catch-up after a stall); what it does
not allow yet goes out one slice at a time, each the moment it is due.
"""

from __future__ import annotations

import pytest
import trio

from musiclib.library_requests import _send_paced
from musiclib.live.pacing import Pacer

RATE = 8000
BPF = 2  # mono s16le
BPS = RATE * BPF
SLICE = BPS // 10  # 0.1 s


class Recorder:
    """A send that keeps (virtual seconds since the pacer's start, payload) per frame."""

    def __init__(self, pacer: Pacer) -> None:
        self.pacer = pacer
        self.frames: list[tuple[float, bytes]] = []

    async def __call__(self, payload: bytes) -> None:
        self.frames.append((trio.current_time() - self.pacer.start, payload))
        await trio.lowlevel.checkpoint()

    def check_never_ahead(self, burst: float) -> None:
        total = 0
        for at, payload in self.frames:
            total += len(payload)
            assert total / BPS <= burst + at + 1e-9, (at, total)


def _audio(seconds: float, offset: int = 0) -> bytes:
    """Distinct bytes, so that order and completeness show."""
    n = round(seconds * BPS)
    return bytes((offset + i) % 251 for i in range(n))


async def test_the_burst_goes_out_as_one_frame_then_a_slice_at_a_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    pacer = Pacer(RATE, burst=1.0)
    send = Recorder(pacer)
    chunk = _audio(3.0)
    sent = await _send_paced(send, pacer, chunk, 0, SLICE, BPF)
    assert sent == len(chunk)
    assert b"".join(p for _, p in send.frames) == chunk
    first_at, first = send.frames[0]
    assert (first_at, len(first)) == (0.0, BPS)  # the whole 1 s burst at once
    rest = send.frames[1:]
    assert [len(p) for _, p in rest] == [SLICE] * 20  # then 2 s in 0.1 s slices
    for k, (at, _) in enumerate(rest, start=1):
        assert at == pytest.approx(k * 0.1)  # each the moment it is due
    send.check_never_ahead(1.0)


@pytest.mark.parametrize("burst", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("chunk_seconds", [0.013, 0.1, 0.37, 1.5])
async def test_chunks_of_any_size_never_run_ahead_and_lose_nothing(
    autojump_clock: trio.abc.Clock, burst: float, chunk_seconds: float
) -> None:
    """Chunks as a pipe gives them (not whole slices, odd sizes), one after another."""
    pacer = Pacer(RATE, burst=burst)
    send = Recorder(pacer)
    chunks = [_audio(chunk_seconds, offset=i) + b"\x01" for i in range(12)]  # odd lengths
    sent = 0
    for chunk in chunks:
        sent = await _send_paced(send, pacer, chunk, sent, SLICE, BPF)
    assert sent == sum(len(c) for c in chunks)
    assert b"".join(p for _, p in send.frames) == b"".join(chunks)
    send.check_never_ahead(burst)
    # no slower than the clock: the last byte leaves when its frame is due, not later
    last_at = send.frames[-1][0]
    assert last_at == pytest.approx(max(0.0, -(-sent // BPF) / RATE - burst), abs=1e-6)


async def test_a_stall_is_caught_up_in_one_frame(autojump_clock: trio.abc.Clock) -> None:
    """ffmpeg (or the client) held the stream back 2 s: what became due meanwhile
    goes out at once, and pacing resumes slice by slice."""
    pacer = Pacer(RATE, burst=0.0)
    send = Recorder(pacer)
    sent = await _send_paced(send, pacer, _audio(0.2), 0, SLICE, BPF)
    await trio.sleep(2.0)  # nothing to send meanwhile
    before = len(send.frames)
    sent = await _send_paced(send, pacer, _audio(3.0), sent, SLICE, BPF)
    at, caught_up = send.frames[before]
    assert at == pytest.approx(2.2)
    # 0.2 s went out by 0.2 s; by 2.2 s, 2.2 s were due: the 2 s in between in one frame
    assert abs(len(caught_up) - 2 * BPS) <= BPF
    assert all(len(p) <= SLICE for _, p in send.frames[before + 1 :])
    send.check_never_ahead(0.0)
    assert sent == round(3.2 * BPS)
