"""``play``: a queue of tracks, through a player, by URL or through a pipe.

The queue. Each name the user gives is resolved by the server's own rule
(PROTOCOL.md, "Track names" and "Matching"): a name that resolves to one
track is that track; an ambiguous name, or one that names no track but whose
words match some (a ``list`` query), is every track it matches, in album order
(:meth:`TrackInfo.album_order`: album, then track number, then path; the index has no
disc number, so the discs of a multi-disc album play in path order within a
track number). Several names queue one after the other; ``--shuffle``
shuffles the whole queue once; ``--repeat`` plays it again until the player
is quit.

The two ways to play (the player presets in :mod:`musiclib.player` choose):

- **URLs** (mpv, vlc, ffplay): :mod:`musiclib.gateway` serves the queue on
  127.0.0.1 with ``Range`` support. mpv and vlc get a private playlist file
  and play the whole queue in one run (their next/previous/pause keys work
  across it, and ``--repeat`` is their own loop); ffplay takes one URL per
  run, so the queue is one ffplay after another (``q`` moves to the next
  track, Ctrl-C stops). The player's standard input is the terminal.
- **A pipe** (``--pipe``, ``--decode``, and players that only read standard
  input): one player run per track, fed by :func:`musiclib.fetch.pipe` or
  :func:`musiclib.fetch.save` exactly as a single track always was.

``--save`` by URL: each track is saved by its own verified download
(:func:`musiclib.fetch.save`) when the player first asks for it, one after the
other at network speed; quitting the player does not stop the saves already
started, and tracks the player never reached are not saved. Through a pipe,
the save feeds the player as before. A track is saved once, however often it
plays (``--repeat``, or named twice).

What is shown: when the player is interactive and standard error is a
terminal (the player's status line lives there), musiclib draws no progress
bar, only one line per track, ``now playing: Artist - Title (i/N)``, printed
when the player opens it (between its own lines for the previous and the next
track). A pipe player that is not interactive keeps the progress bar.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import fetch
from .client import Client
from .errors import Ambiguous, MusiclibError, NotFound, PlayerError
from .fetch import Connector, Decoding, Reporter, Retry
from .player import PlayerPlan, open_player, run_player
from .protocol import TrackInfo
from .ui import shown

log = logging.getLogger("musiclib")

#: the most tracks one queue may hold (what one ``list`` reply may hold)
MAX_QUEUE = 100_000


async def tracks_for(client: Client, name: str) -> list[TrackInfo]:
    """Every track ``name`` means, in album order: the one it resolves to, else every
    track its words match (``NotFound`` when none does)."""
    try:
        return [await client.info(name)]
    except Ambiguous as many:
        candidates: Sequence[str] = many.candidates
    except NotFound:
        candidates = ()
    found, _ = await client.list(name)
    if not found and candidates:  # the list rule and the name rule disagree: ask each
        found = [await client.info(path) for path in candidates]
    if not found:
        raise NotFound(f"no track matches {name!r}")
    return sorted(found, key=TrackInfo.album_order)


async def build_queue(
    client: Client, names: Sequence[str], *, shuffle: bool = False, rng: random.Random | None = None
) -> list[TrackInfo]:
    """The queue for ``names``: each name's tracks in album order, names in order;
    ``shuffle`` shuffles the whole of it."""
    queue: list[TrackInfo] = []
    for name in names:
        queue.extend(await tracks_for(client, name))
        if len(queue) > MAX_QUEUE:
            raise NotFound(f"more than {MAX_QUEUE} tracks to play: name fewer")
    if shuffle:
        (rng or random.Random()).shuffle(queue)
    return queue


def describe_track(track: TrackInfo) -> str:
    """``Artist - Title`` (or the title alone), safe for a terminal."""
    title = f"{track.artist} - {track.title}" if track.artist else track.title
    return shown(title, 120)


@dataclass
class Saving:
    """Where and how ``--save``/``-o`` saves the tracks of a queue."""

    destination: Callable[[TrackInfo], Path]
    retry: Retry
    replace: bool = False
    #: what was saved, in order
    saved: list[tuple[fetch.Outcome, Path]] = field(default_factory=list)


@dataclass
class Playback:
    """What a ``play`` did: the player's last exit status and anything to say."""

    status: int = 0
    player: str = ""
    notes: list[str] = field(default_factory=list)
    saved: list[tuple[fetch.Outcome, Path]] = field(default_factory=list)
    #: a save that failed (raised once the player is done)
    error: MusiclibError | None = None


Announce = Callable[[int], None]


async def play_urls(
    connect: Connector,
    queue: Sequence[TrackInfo],
    plan: PlayerPlan,
    *,
    repeat: bool = False,
    saving: Saving | None = None,
    announce: Announce | None = None,
) -> Playback:
    """Play ``queue`` by URL (see the module docstring); saves run alongside."""
    from .gateway import open_gateway  # h11 and the rest: 12 ms that --pipe does not need

    result = Playback(player=plan.name)
    send_save, receive_save = trio.open_memory_channel[int](max(len(queue), 1))
    asked: set[str] = set()

    def opened(index: int) -> None:
        if announce is not None:
            announce(index)
        path = queue[index].path
        if saving is not None and path not in asked:  # each track once: never blocks
            asked.add(path)
            send_save.send_nowait(index)

    async with trio.open_nursery() as saves:
        if saving is not None:
            saves.start_soon(_save_each, connect, queue, saving, receive_save, result)
        with send_save:
            async with open_gateway(connect, queue, on_open=opened) as gateway:
                if plan.whole_queue:
                    with _playlist_file(gateway.url, len(queue), queue) as playlist:
                        result.status = await run_player(
                            plan.url_argv(str(playlist), repeat=repeat)
                        )
                else:
                    await _one_run_each(plan, gateway.url, len(queue), repeat, result)
    return result


async def _one_run_each(
    plan: PlayerPlan, url: Callable[[int], str], count: int, repeat: bool, result: Playback
) -> None:
    """ffplay: a run per URL, in order; a run that fails ends the queue."""
    while True:
        for index in range(count):
            result.status = await run_player(plan.url_argv(url(index)))
            if result.status != 0:
                return
        if not repeat:
            return


async def _save_each(
    connect: Connector,
    queue: Sequence[TrackInfo],
    saving: Saving,
    indexes: trio.MemoryReceiveChannel[int],
    result: Playback,
) -> None:
    """Save each track the player reached, in the order it reached them."""
    async with indexes:
        async for index in indexes:
            track = queue[index]
            dest = saving.destination(track)
            try:
                outcome = await fetch.save(
                    connect, track.path, dest, retry=saving.retry, replace=saving.replace
                )
            except MusiclibError as exc:
                log.error("%s: not saved: %s", track.path, exc)
                result.error = result.error or exc
                continue
            result.saved.append((outcome, dest))
            saving.saved.append((outcome, dest))


@contextmanager
def _playlist_file(
    url: Callable[[int], str], count: int, queue: Sequence[TrackInfo]
) -> Iterator[Path]:
    """An extended M3U of the queue's URLs in a private folder (mode 0700), removed after."""
    folder = Path(tempfile.mkdtemp(prefix="musiclib-play-"))
    try:
        path = folder / "queue.m3u"
        lines = ["#EXTM3U"]
        for index in range(count):
            track = queue[index]
            seconds = round(track.duration) if track.duration is not None else -1
            title = describe_track(track).replace("\n", " ")
            lines += [f"#EXTINF:{seconds},{title}", url(index)]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def play_pipes(
    connect: Connector,
    queue: Sequence[TrackInfo],
    plan: PlayerPlan,
    *,
    repeat: bool = False,
    decoding: Decoding | None = None,
    retry: Retry,
    saving: Saving | None = None,
    announce: Announce | None = None,
    reporter: Callable[[TrackInfo], Reporter] | None = None,
) -> Playback:
    """Play ``queue`` through standard input, one player run per track (a player that
    fails ends the queue; one that quits early with status 0 moves to the next track)."""
    import dataclasses

    result = Playback(player=plan.name)
    saved_paths: set[str] = set()
    argv = plan.pipe_argv()
    while True:
        heard_any = False
        for index, track in enumerate(queue):
            if announce is not None:
                announce(index)
            decoded = decoding
            if decoded is not None:
                decoded = dataclasses.replace(decoded, source_duration=track.duration)
            report = reporter(track) if reporter is not None else None
            async with open_player(argv) as player:
                with _bar(report):
                    if saving is not None and track.path not in saved_paths:
                        saved_paths.add(track.path)
                        dest = saving.destination(track)
                        outcome = await fetch.save(
                            connect,
                            track.path,
                            dest,
                            player=player,
                            decoding=decoded,
                            retry=retry,
                            reporter=report,
                            replace=saving.replace,
                        )
                        result.saved.append((outcome, dest))
                        saving.saved.append((outcome, dest))
                    else:
                        outcome = await fetch.pipe(
                            connect,
                            track.path,
                            player,
                            decoding=decoded,
                            retry=retry,
                            reporter=report,
                        )
            if outcome.player_note:
                result.notes.append(outcome.player_note)
            result.status = outcome.player_status or 0
            if result.status:
                raise PlayerError(player.describe_exit(result.status))
            heard_any = heard_any or not outcome.stopped_early
        if not repeat or not heard_any:  # a player that takes nothing would loop for ever
            return result


@contextmanager
def _bar(reporter: Reporter | None) -> Iterator[None]:
    """Enter ``reporter`` if it is a context manager (the progress bar)."""
    enter = getattr(reporter, "__enter__", None)
    if enter is None:
        yield
        return
    enter()
    try:
        yield
    finally:
        reporter.__exit__(None, None, None)  # type: ignore[union-attr]
