"""The live fan-out (musiclib.live.hub): every frame accounted for, per listener.

A listener that keeps up gets every chunk once; one that falls behind holds no more
than it declared, and its gaps say exactly what it lost; one that stays behind is cut.
Preroll joins history to live audio without a duplicate or a hole. Time runs on
pytest-trio's ``autojump_clock`` where it matters (the lag limit), so nothing here
waits in real time; hypothesis drives chunk sizes, holes, backlogs and join times.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from musiclib.decode import AudioFormat
from musiclib.live.hub import LAG_WINDOW, Chunk, End, Gap, Hub, Subscription

#: 1000 mono s16le frames a second: a frame is 2 bytes and a millisecond
FMT = AudioFormat("s16le", 1000, 1)
BPF = 2
T0 = 1_700_000_000_000_000_000
INTERVAL = 0.02  # seconds between chunks, as a live source sends them
CHUNK = 20  # frames a chunk, at that pace

Item = Chunk | Gap | End


def frames(n: int, first: int = 0) -> bytes:
    """Frames ``first`` .. ``first + n``: each frame's two bytes name its position."""
    return b"".join((p % 65536).to_bytes(2, "big") for p in range(first, first + n))


def span(item: Chunk | Gap) -> int:
    return len(item.data) // BPF if isinstance(item, Chunk) else item.frames


def drain(sub: Subscription) -> list[Item]:
    """Everything ready now, up to and including an End."""
    out: list[Item] = []
    while (item := sub.next_nowait()) is not None:
        out.append(item)
        if isinstance(item, End):
            break
    return out


def check_cover(items: list[Item], start: int) -> tuple[int, int]:
    """Chunks and gaps continue each other from ``start``, and each chunk holds the frames
    of its positions. Returns (audio frames, gap frames)."""
    position, audio, lost = start, 0, 0
    for item in items:
        if isinstance(item, End):
            continue
        assert item.position == position, f"{item!r} where {position} was due"
        if isinstance(item, Chunk):
            assert item.data == frames(span(item), item.position)
            audio += span(item)
        else:
            assert item.frames > 0
            lost += item.frames
        position += span(item)
    return audio, lost


async def run_source(hub: Hub, count: int, size: int = CHUNK, close: bool = True) -> list[Chunk]:
    """Publish ``count`` chunks of ``size`` frames, one every INTERVAL seconds."""
    published = []
    for i in range(count):
        published.append(hub.publish(frames(size, hub.position), T0 + i))
        await trio.sleep(INTERVAL)
    if close:
        hub.close("source_ended", "done")
    return published


async def read_all(sub: Subscription, out: list[Item]) -> None:
    """Every item until the End (a listener that keeps up); fails if it never comes."""
    with trio.fail_after(60):
        await _read_all(sub, out)


async def _read_all(sub: Subscription, out: list[Item]) -> None:
    while True:
        item = await sub.next()
        out.append(item)
        if isinstance(item, End):
            return


# ---- keeping up -----------------------------------------------------------------------


async def test_listeners_that_keep_up_get_every_frame_exactly_once(autojump_clock: object) -> None:
    hub = Hub(FMT)
    hub.publish(frames(CHUNK))  # before anyone listens: nobody gets it without preroll
    subs = [hub.subscribe(max_backlog_frames=2 * CHUNK) for _ in range(3)]
    assert hub.listeners == 3
    got: list[list[Item]] = [[] for _ in subs]
    async with trio.open_nursery() as nursery:
        for sub, out in zip(subs, got, strict=True):
            nursery.start_soon(read_all, sub, out)
        published = await run_source(hub, 50)
    for sub, items in zip(subs, got, strict=True):
        assert items[-1] == End("source_ended", "done")
        assert items[:-1] == published
        assert all(a is b for a, b in zip(items, published, strict=False))  # shared, not copied
        assert check_cover(items, CHUNK) == (50 * CHUNK, 0)
        assert sub.start_position == CHUNK and sub.lost_frames == 0 and not sub.cut
    assert hub.listeners == 0


async def test_a_listener_waiting_with_a_backlog_below_one_chunk_gets_every_chunk(
    autojump_clock: object,
) -> None:
    """A declared latency shorter than the source's chunks (max_latency_ms=5 on 20 ms
    chunks) must not make every chunk a loss: the newest chunk is never behind."""
    hub = Hub(FMT)
    sub = hub.subscribe(max_backlog_frames=5, lag_limit=0.5)
    items: list[Item] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, sub, items)
        published = await run_source(hub, 100)  # 2 s, far past the lag limit
    assert items == [*published, End("source_ended", "done")]
    assert sub.lost_frames == 0 and not sub.cut


# ---- falling behind ----------------------------------------------------------------------


async def test_a_stalled_listener_holds_its_backlog_and_learns_exactly_what_it_lost() -> None:
    hub = Hub(FMT)
    sub = hub.subscribe(max_backlog_frames=50, lag_limit=1e9)
    for _ in range(30):
        hub.publish(frames(CHUNK, hub.position))
        assert sub.backlog_frames <= 50
    items = drain(sub)
    # what it lost, in one gap, then the newest audio that fits its backlog
    assert items[0] == Gap(0, 30 * CHUNK - 40)
    assert [span(i) for i in items[1:]] == [CHUNK, CHUNK]
    assert items[-1] == Chunk(29 * CHUNK, items[-1].time_ns, frames(CHUNK, 29 * CHUNK))
    assert check_cover(items, 0) == (40, 30 * CHUNK - 40)
    assert sub.lost_frames == 30 * CHUNK - 40
    # caught up: the next chunk arrives alone, and nothing more was lost
    hub.publish(frames(CHUNK, hub.position))
    assert drain(sub) == [Chunk(30 * CHUNK, hub.last_time_ns, frames(CHUNK, 30 * CHUNK))]


async def test_losses_after_a_partial_read_continue_where_the_listener_left() -> None:
    hub = Hub(FMT)
    sub = hub.subscribe(max_backlog_frames=3 * CHUNK, lag_limit=1e9)
    got: list[Item] = []
    for i in range(40):
        hub.publish(frames(CHUNK, hub.position))
        if i % 7 == 0:  # reads one item now and then: never enough
            item = sub.next_nowait()
            assert item is not None
            got.append(item)
        assert sub.backlog_frames <= 3 * CHUNK
    got += drain(sub)
    audio, lost = check_cover(got, 0)
    assert audio + lost == 40 * CHUNK
    assert lost == sub.lost_frames > 0
    assert [type(i) for i in got[-3:]] == [Chunk] * 3  # it ends with the newest audio


async def test_a_slow_listener_does_not_touch_another_listeners_items(
    autojump_clock: object,
) -> None:
    hub = Hub(FMT)
    fast = hub.subscribe(max_backlog_frames=CHUNK)
    slow = hub.subscribe(max_backlog_frames=CHUNK, lag_limit=0.3)  # will be cut, too
    items: list[Item] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, fast, items)
        published = await run_source(hub, 50)
    assert items == [*published, End("source_ended", "done")]
    assert fast.lost_frames == 0 and not fast.cut
    assert slow.cut and slow.lost_frames > 0


async def test_staying_behind_for_the_lag_limit_cuts_the_listener(
    autojump_clock: object,
) -> None:
    hub = Hub(FMT)
    cut_at: list[float] = []
    sub = hub.subscribe(max_backlog_frames=2 * CHUNK, lag_limit=1.0)
    sub.on_cut = lambda: cut_at.append(trio.current_time())
    other = hub.subscribe(max_backlog_frames=10**6)
    began = trio.current_time()
    first_loss: float | None = None
    for i in range(150):  # 3 s of audio; the listener reads nothing
        hub.publish(frames(CHUNK, hub.position), T0 + i)
        if first_loss is None and sub.lost_frames:
            first_loss = trio.current_time()
        await trio.sleep(INTERVAL)
    assert first_loss is not None and first_loss - began < 0.1
    assert len(cut_at) == 1  # once, synchronously
    assert 1.0 <= cut_at[0] - first_loss <= 1.0 + INTERVAL + 1e-9
    assert sub.cut and sub.backlog_frames == 0  # its queue is freed at once
    end = sub.next_nowait()
    assert isinstance(end, End) and end.reason == "too_slow"
    assert await sub.next() == end  # and stays the end
    assert hub.listeners == 1  # the other one, which never lost anything
    assert other.lost_frames == 0 and other.backlog_frames == 150 * CHUNK


async def test_losing_audio_once_then_catching_up_is_not_a_cut(autojump_clock: object) -> None:
    hub = Hub(FMT)
    sub = hub.subscribe(max_backlog_frames=2 * CHUNK, lag_limit=1.0)
    items: list[Item] = []

    async def listener() -> None:
        await trio.sleep(0.3)  # one stall: about 13 chunks lost
        await read_all(sub, items)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listener)
        await run_source(hub, 150)
    assert not sub.cut and items[-1] == End("source_ended", "done")
    gaps = [i for i in items if isinstance(i, Gap)]
    # lost during the stall only (a chunk more may go while it reads its backlog)
    assert gaps and all(g.position + g.frames <= 300 + 3 * CHUNK for g in gaps)
    assert sum(g.frames for g in gaps) == sub.lost_frames >= 200
    assert sum(check_cover(items, 0)) == 150 * CHUNK


async def test_losses_further_apart_than_the_lag_window_are_not_a_streak(
    autojump_clock: object,
) -> None:
    hub = Hub(FMT)
    sub = hub.subscribe(max_backlog_frames=2 * CHUNK, lag_limit=1.0)
    items: list[Item] = []

    async def listener() -> None:
        while True:  # stall 0.2 s, then keep up for longer than the lag window
            await trio.sleep(0.2)
            with trio.move_on_after(LAG_WINDOW + 0.2):
                while True:
                    items.append(await sub.next())
                    if isinstance(items[-1], End):
                        return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listener)
        await run_source(hub, 250)  # 5 s: three stalls, more than the lag limit in total
    assert not sub.cut
    assert sum(isinstance(i, Gap) for i in items) >= 3
    assert sum(check_cover(items, 0)) == 250 * CHUNK


async def test_a_cancelled_wait_loses_nothing() -> None:
    hub = Hub(FMT)
    sub = hub.subscribe(max_backlog_frames=100)
    chunk = hub.publish(frames(5))
    with trio.CancelScope() as scope:
        scope.cancel()
        await sub.next()
    assert scope.cancelled_caught
    assert sub.backlog_frames == 5
    assert await sub.next() == chunk


# ---- preroll and history ---------------------------------------------------------------


def test_preroll_is_the_last_frames_trimmed_inside_a_chunk_then_live() -> None:
    hub = Hub(FMT, history_seconds=10)
    for _ in range(5):
        hub.publish(frames(CHUNK, hub.position), T0)
    sub = hub.subscribe(max_backlog_frames=10**6, preroll_frames=30)
    assert sub.start_position == 70
    hub.publish(frames(CHUNK, hub.position), T0 + 1)
    items = drain(sub)
    assert items == [
        Chunk(70, T0, frames(10, 70)),  # the end of the fourth chunk
        Chunk(80, T0, frames(20, 80)),
        Chunk(100, T0 + 1, frames(20, 100)),  # live, no duplicate, no hole
    ]


def test_preroll_larger_than_history_gets_all_of_it() -> None:
    hub = Hub(FMT, history_seconds=0.05)  # 50 frames
    for _ in range(10):
        hub.publish(frames(CHUNK, hub.position), T0)
    sub = hub.subscribe(max_backlog_frames=10**6, preroll_frames=10**6)
    items = drain(sub)
    assert 50 <= sum(span(i) for i in items if not isinstance(i, End)) < 50 + CHUNK
    assert check_cover(items, sub.start_position)[1] == 0
    assert items[-1] == Chunk(180, T0, frames(CHUNK, 180))


def test_history_is_bounded() -> None:
    hub = Hub(FMT, history_seconds=1.0)  # 1000 frames
    for i in range(500):
        hub.publish(frames(7 + i % 13, hub.position), T0)
        kept = hub._history_frames
        assert kept == sum(span(x) for x in hub._history)
        assert kept <= 1000 + 19  # at most one chunk more than the limit
        assert kept >= min(1000, hub.position)


def test_a_hole_in_the_source_is_a_gap_live_and_in_preroll() -> None:
    hub = Hub(FMT)
    live = hub.subscribe(max_backlog_frames=10**6)
    first = hub.publish(frames(10))
    hub.publish_chunk(Chunk(25, T0, frames(10, 25)))
    assert hub.position == 35
    assert drain(live) == [
        first,
        Gap(10, 15),
        Chunk(25, T0, frames(10, 25)),
    ]
    assert live.lost_frames == 0  # the source's hole is not the listener's loss
    late = hub.subscribe(max_backlog_frames=10**6, preroll_frames=20)
    assert late.start_position == 15
    assert drain(late) == [Gap(15, 10), Chunk(25, T0, frames(10, 25))]


def test_publishing_checks_positions_and_whole_frames() -> None:
    hub = Hub(FMT)
    assert hub.frames_of(b"\0" * 8) == 4
    for bad in (b"", b"\0", b"\0" * 7):
        with pytest.raises(ValueError, match="whole frames of 2 bytes"):
            hub.frames_of(bad)
    sub = hub.subscribe(max_backlog_frames=100)
    with pytest.raises(ValueError):
        hub.publish(b"\0" * 3)
    with pytest.raises(ValueError):
        hub.publish_chunk(Chunk(0, 0, b""))
    assert hub.position == 0 and hub.chunks == 0 and drain(sub) == []
    hub.publish(frames(5))
    with pytest.raises(ValueError, match="overlaps"):
        hub.publish_chunk(Chunk(3, 0, frames(2, 3)))
    assert hub.position == 5 and hub.chunks == 1
    assert [i.position for i in drain(sub)] == [0]


# ---- the end -------------------------------------------------------------------------------


async def test_close_delivers_the_queue_then_the_end(autojump_clock: object) -> None:
    hub = Hub(FMT)
    sub = hub.subscribe(max_backlog_frames=10**6)
    published = [hub.publish(frames(CHUNK, hub.position)) for _ in range(3)]
    hub.close("source_failed", "the device went away")
    hub.close("shutdown", "later: ignored")
    assert hub.closed and hub.end == End("source_failed", "the device went away")
    assert hub.listeners == 0
    items = [await sub.next() for _ in range(4)]
    assert items == [*published, End("source_failed", "the device went away")]
    assert await sub.next() == items[-1]
    position = hub.position
    hub.publish(frames(1))  # a source still stopping: dropped, nobody hears it
    assert hub.position == position and await sub.next() == items[-1]


async def test_close_wakes_a_waiting_listener(autojump_clock: object) -> None:
    hub = Hub(FMT)
    sub = hub.subscribe(max_backlog_frames=100)
    got: list[Item] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, sub, got)
        await trio.testing.wait_all_tasks_blocked()
        hub.close("shutdown", "bye")
    assert got == [End("shutdown", "bye")]


def test_subscribing_to_a_closed_hub_ends_at_once() -> None:
    hub = Hub(FMT)
    hub.publish(frames(CHUNK))
    hub.close("source_ended", "over")
    sub = hub.subscribe(max_backlog_frames=100)
    assert sub.next_nowait() == End("source_ended", "over")
    assert hub.listeners == 0 and sub.start_position == CHUNK


async def test_closing_a_subscription_frees_it_and_wakes_its_reader(
    autojump_clock: object,
) -> None:
    hub = Hub(FMT)
    with hub.subscribe(max_backlog_frames=100) as sub:
        hub.publish(frames(5))
        assert sub.backlog_frames == 5
    assert hub.listeners == 0 and sub.backlog_frames == 0
    assert sub.next_nowait() == End("closed", "the subscription was closed")
    sub.close()  # twice is fine
    waiting = hub.subscribe(max_backlog_frames=100)
    got: list[Item] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all, waiting, got)
            await trio.testing.wait_all_tasks_blocked()
            waiting.close()  # e.g. from another task serving the same listener
    assert got == [End("closed", "the subscription was closed")]


async def test_oldest_backlog_is_the_oldest_audio_any_listener_waits_for() -> None:
    hub = Hub(FMT)
    assert hub.oldest_backlog_ns() == 0
    a = hub.subscribe(max_backlog_frames=10**6)
    hub.publish(frames(5), T0 + 10)
    b = hub.subscribe(max_backlog_frames=10**6)
    hub.publish(frames(5, 5), T0 + 20)
    assert hub.oldest_backlog_ns() == T0 + 10
    drain(a)
    assert hub.oldest_backlog_ns() == T0 + 20
    drain(b)
    assert hub.oldest_backlog_ns() == 0


# ---- properties ------------------------------------------------------------------------

# A source's life: (frames in the chunk, frames of hole before it).
source_chunks = st.lists(
    st.tuples(st.integers(1, 40), st.sampled_from([0, 0, 0, 0, 1, 7])), min_size=1, max_size=40
)


@settings(deadline=None)
@given(source_chunks, st.integers(0, 200), st.integers(0, 40), st.integers(0, 300))
def test_preroll_joins_history_and_live_without_duplicate_or_hole(
    chunks: list[tuple[int, int]], preroll: int, join: int, history: int
) -> None:
    hub = Hub(FMT, history_seconds=history / 1000)
    join = min(join, len(chunks))

    def play(part: list[tuple[int, int]]) -> None:
        for size, hole in part:
            position = hub.position + hole
            hub.publish_chunk(Chunk(position, T0 + position, frames(size, position)))

    play(chunks[:join])
    joined_at = hub.position
    kept = hub._history_frames
    sub = hub.subscribe(max_backlog_frames=10**6, preroll_frames=preroll)
    play(chunks[join:])
    hub.close("source_ended", "done")
    items = drain(sub)
    assert items[-1] == End("source_ended", "done")
    # the preroll is exactly the last min(preroll, kept history) frames, chunks or holes
    assert sub.start_position == joined_at - min(preroll, kept)
    audio, holes = check_cover(items, sub.start_position)
    assert audio + holes == hub.position - sub.start_position
    assert sub.lost_frames == 0
    for item in items:  # each chunk keeps the time of the chunk it came from
        if isinstance(item, Chunk):
            assert item.time_ns <= T0 + item.position


@settings(deadline=None)
@given(
    source_chunks,
    st.integers(1, 120),
    st.integers(0, 60),
    st.lists(st.integers(0, 3), min_size=1, max_size=40),
)
def test_a_listener_behind_is_bounded_and_accounts_for_every_frame(
    chunks: list[tuple[int, int]], backlog: int, preroll: int, reads: list[int]
) -> None:
    async def main() -> None:
        hub = Hub(FMT)
        hub.publish(frames(50))  # history for the preroll
        sub = hub.subscribe(max_backlog_frames=backlog, preroll_frames=preroll, lag_limit=1e9)
        got: list[Item] = []
        for i, (size, hole) in enumerate(chunks):
            position = hub.position + hole
            hub.publish_chunk(Chunk(position, T0, frames(size, position)))
            # never more than declared, but the newest chunk is never dropped
            assert sub.backlog_frames <= max(backlog + min(preroll, 50), size)
            for _ in range(reads[i % len(reads)]):
                item = sub.next_nowait()
                if item is None:
                    break
                got.append(item)
        hub.close("source_ended", "done")
        got += drain(sub)
        assert got[-1] == End("source_ended", "done")
        audio, gaps = check_cover(got, sub.start_position)
        assert audio + gaps == hub.position - sub.start_position
        holes = sum(hole for _, hole in chunks)
        assert gaps == sub.lost_frames + holes
        last_size, _ = chunks[-1]
        newest = got[-2]
        assert isinstance(newest, Chunk) and span(newest) == last_size  # the newest audio

    trio.run(main, clock=trio.testing.MockClock())
