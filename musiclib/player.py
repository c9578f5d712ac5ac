"""External media players: presets, start-up, feeding, and clean exits.

A player is any program that reads the stream on its standard input. For the
players we know, the arguments that make them do so are appended to what the
user wrote, so ``--player "mpv --volume=50"`` runs ``mpv --volume=50
--no-video -``. The process is always reaped: closing the :class:`Player`
(also by cancellation, e.g. Ctrl-C) terminates it if it is still running.

A player's exit status decides: 0 is success, also when it stopped reading
early (the user quit mpv with ``q``); anything else, a signal included, is a
failure the CLI reports with exit status 6.

Players that can open URLs get them instead of a pipe (:class:`Preset`,
:func:`plan_player`): ``play`` then serves the queue on a loopback HTTP
endpoint (:mod:`musiclib.gateway`) and the player reads, seeks and measures
each track itself. Per player:

=========  =====================================  ============  ===========
player     URL mode (the default)                 whole queue?  ``--pipe``
=========  =====================================  ============  ===========
mpv        ``--playlist=FILE.m3u``                one run       ``-`` (stdin)
vlc/cvlc   the playlist file as an argument       one run       ``-``
ffplay     ``-i URL``                             one run each  ``pipe:0``
mplayer    (pipe only: untested with URLs)        one run each  ``-``
aplay...   (pipe only, ``--decode``)              one run each  stdin
other      (pipe only: runs as given)             one run each  stdin
=========  =====================================  ============  ===========

The playlist file (private, mode 0600) keeps the endpoint's token out of the
process list, where every local user could read it; ffplay takes one URL on
its command line, so there the token is visible to local users while it plays
(on Linux the gateway also refuses other users' connections).
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, overload

import trio

from .errors import PlayerError, PlayerNotFound, UsageError

#: arguments that make a known player read the stream from standard input
STDIN_ARGS: dict[str, tuple[str, ...]] = {
    "mpv": ("--no-video", "--", "-"),
    "ffplay": ("-nodisp", "-autoexit", "-loglevel", "warning", "-i", "pipe:0"),
    "cvlc": ("--play-and-exit", "-"),
    "vlc": ("--play-and-exit", "-"),
    "mplayer": ("-really-quiet", "-"),
    # these two play only WAV/PCM, so only decoded streams (``--decode``)
    "aplay": ("-q",),
    "paplay": (),
}
#: players that cannot decode compressed formats themselves
PCM_ONLY: frozenset[str] = frozenset({"aplay", "paplay"})
#: tried in this order when no player is named
DEFAULT_PLAYERS: tuple[str, ...] = ("mpv", "ffplay", "cvlc")
#: seconds a player gets to exit after SIGTERM before it is killed
TERMINATE_GRACE = 1.0


@dataclass(frozen=True)
class Preset:
    """What musiclib knows about one player program."""

    #: appended to make it read standard input (the pipe)
    stdin_args: tuple[str, ...]
    #: appended before a playlist file or URL; ``None``: it only reads standard input
    url_args: tuple[str, ...] | None = None
    #: how it takes the playlist file (``{}`` is its path); ``None``: one URL per run
    playlist_arg: str | None = None
    #: appended to play the queue again and again (``--repeat``), when it loops itself
    repeat_args: tuple[str, ...] = ()
    #: it draws its own status on the terminal and takes keys there
    interactive: bool = False


PRESETS: dict[str, Preset] = {
    "mpv": Preset(
        ("--no-video", "--", "-"),
        url_args=("--no-video",),
        playlist_arg="--playlist={}",
        repeat_args=("--loop-playlist=inf",),
        interactive=True,
    ),
    "ffplay": Preset(
        STDIN_ARGS["ffplay"],
        url_args=("-nodisp", "-autoexit", "-loglevel", "warning", "-i"),
        interactive=True,
    ),
    **{
        vlc: Preset(
            STDIN_ARGS[vlc],
            url_args=("--play-and-exit",),
            playlist_arg="{}",
            repeat_args=("--loop",),
            interactive=True,
        )
        for vlc in ("cvlc", "vlc")
    },
    "mplayer": Preset(STDIN_ARGS["mplayer"], interactive=True),
    "aplay": Preset(STDIN_ARGS["aplay"]),
    "paplay": Preset(STDIN_ARGS["paplay"]),
}


@dataclass(frozen=True)
class PlayerPlan:
    """How ``play`` will run the player: its command as written, and pipe or URLs."""

    #: the command as the user wrote it (or the default player, bare)
    argv: tuple[str, ...]
    preset: Preset | None
    #: True: URLs of the gateway; False: the stream on standard input
    url: bool

    @property
    def name(self) -> str:
        return PurePath(self.argv[0]).name

    @property
    def interactive(self) -> bool:
        """A player that draws on the terminal and takes keys there (mpv, vlc, ffplay)."""
        return self.preset is not None and self.preset.interactive

    @property
    def whole_queue(self) -> bool:
        """One run plays the whole queue (mpv, vlc with a playlist file)."""
        return self.url and self.preset is not None and self.preset.playlist_arg is not None

    def pipe_argv(self) -> list[str]:
        """The command that reads one track on standard input."""
        argv = list(self.argv)
        extra = self.preset.stdin_args if self.preset is not None else ()
        if extra and argv[-1] not in _STDIN_NAMES:
            argv.extend(extra)
        return argv

    def url_argv(self, target: str, *, repeat: bool = False) -> list[str]:
        """The command that plays ``target``: the playlist file's path when the player
        takes the whole queue (:attr:`whole_queue`), else one URL."""
        assert self.url and self.preset is not None and self.preset.url_args is not None
        argv = [*self.argv, *self.preset.url_args]
        if self.preset.playlist_arg is None:
            return [*argv, target]
        if repeat:
            argv.extend(self.preset.repeat_args)
        return [*argv, self.preset.playlist_arg.format(target)]


def plan_player(
    spec: str | None,
    environ: Mapping[str, str] = os.environ,
    *,
    decoded: bool = False,
    pipe: bool = False,
) -> PlayerPlan:
    """How to run the player ``spec`` (else ``MUSICLIB_PLAYER``, else the first of
    :data:`DEFAULT_PLAYERS` on PATH): by URL when it can open them, unless ``pipe`` is
    asked for, the stream is ``decoded`` (a WAV stream has no ranges), or the command
    already names standard input (``mpv -``)."""
    argv = _written_command(spec, environ, decoded=decoded)
    preset = PRESETS.get(PurePath(argv[0]).name.removesuffix(".exe"))
    url = (
        preset is not None
        and preset.url_args is not None
        and not (pipe or decoded or argv[-1] in _STDIN_NAMES)
    )
    return PlayerPlan(tuple(argv), preset, url)


def player_command(
    spec: str | None, environ: Mapping[str, str] = os.environ, *, decoded: bool = False
) -> list[str]:
    """The argv for ``spec`` (a shell-like command line), the environment, or a default,
    with what makes a known player read standard input appended.

    ``decoded`` says the player will get a WAV stream rather than original bytes.
    """
    argv = _written_command(spec, environ, decoded=decoded)
    extra = STDIN_ARGS.get(PurePath(argv[0]).name.removesuffix(".exe"), ())
    if extra and argv[-1] not in _STDIN_NAMES:
        argv.extend(extra)
    return argv


#: how players are told to read standard input
_STDIN_NAMES = ("-", "pipe:0", "fd://0")


def _written_command(spec: str | None, environ: Mapping[str, str], *, decoded: bool) -> list[str]:
    """The player command as written (``spec``, else ``MUSICLIB_PLAYER``), else the
    first of :data:`DEFAULT_PLAYERS` on PATH; checked, nothing appended."""
    spec = spec or environ.get("MUSICLIB_PLAYER") or None
    if spec is None:
        for name in DEFAULT_PLAYERS:
            if shutil.which(name):
                return [name]
        raise PlayerNotFound(
            "no media player found: install mpv (e.g. 'apt install mpv') "
            "or name one with --player CMD"
        )
    try:
        argv = shlex.split(spec)
    except ValueError as exc:
        raise UsageError(f"cannot parse player command {spec!r}: {exc}") from None
    if not argv:
        raise UsageError("the player command is empty")
    name = PurePath(argv[0]).name.removesuffix(".exe")
    if name in PCM_ONLY and not decoded:
        raise UsageError(f"{name} plays only decoded audio: add --decode")
    return argv


class Player:
    """A running player process; feed it with :meth:`feed`, finish with :meth:`finish`."""

    def __init__(self, process: trio.Process, argv: list[str]) -> None:
        self.process = process
        self.argv = argv
        self.name = PurePath(argv[0]).name
        #: False once the player stopped reading (it quit or was killed)
        self.listening = True

    async def feed(self, chunk: bytes) -> bool:
        """Write ``chunk`` to the player; False (and no exception) if it has gone."""
        if not self.listening:
            return False
        assert self.process.stdin is not None
        try:
            await self.process.stdin.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.listening = False
        return self.listening

    @overload
    async def finish(self) -> int: ...
    @overload
    async def finish(self, timeout: float) -> int | None: ...

    async def finish(self, timeout: float = math.inf) -> int | None:
        """Close the player's input and wait for it to play what it has; its exit status
        (``None`` if it is still running after ``timeout`` seconds)."""
        assert self.process.stdin is not None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.process.stdin.aclose()
        with trio.move_on_after(timeout):
            return await self.process.wait()
        return None

    def describe_exit(self, status: int) -> str:
        """One line saying how the player ended."""
        return describe_exit(self.name, status)


async def _start_player(argv: list[str], **options: Any) -> trio.Process:
    """Start the player ``argv`` (``options`` go to trio's ``open_process``); a missing or
    non-executable program is a PlayerNotFound / PlayerError naming it and the fix."""
    try:
        return await trio.lowlevel.open_process(argv, **options)
    except FileNotFoundError:
        raise PlayerNotFound(
            f"player {argv[0]!r} not found: install it or choose another with --player"
        ) from None
    except PermissionError:
        raise PlayerError(f"player {argv[0]!r} is not executable") from None


@asynccontextmanager
async def open_player(argv: list[str]) -> AsyncIterator[Player]:
    """Start ``argv`` with a pipe on its standard input; always reap it on the way out."""
    process = await _start_player(argv, stdin=subprocess.PIPE)
    player = Player(process, argv)
    try:
        yield player
    finally:
        with trio.CancelScope(shield=True):
            await _reap(process)


def describe_exit(name: str, status: int) -> str:
    """One line saying how the player ``name`` ended with exit ``status`` (negative: a signal)."""
    from .text import how_it_ended

    return f"{name} {how_it_ended(status)}"


async def run_player(argv: Sequence[str]) -> int:
    """Run a player that reads URLs, its standard input left to it (the terminal: its
    keys work), until it exits; its exit status. Cancelled, it is stopped and reaped."""
    process = await _start_player(list(argv), env=_no_proxy_for_loopback())
    try:
        return await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            await _reap(process)


def _no_proxy_for_loopback(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment for a player given loopback URLs: ``no_proxy`` names 127.0.0.1, so
    that an ``http_proxy`` set for the web (which ffmpeg, inside mpv and ffplay,
    follows) never sees a URL with the gateway's token in it."""
    env = dict(environ)
    for name in ("no_proxy", "NO_PROXY"):
        hosts = [h for h in env.get(name, "").split(",") if h.strip()]
        env[name] = ",".join([*hosts, "127.0.0.1", "localhost"])
    return env


async def _reap(process: trio.Process) -> None:
    """Terminate (then kill) the process if it still runs, and wait for it."""
    if process.stdin is not None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await process.stdin.aclose()
    if process.returncode is None:
        with trio.move_on_after(0.05):  # it may be exiting on its own already
            await process.wait()
    if process.returncode is None:
        process.terminate()
        with trio.move_on_after(TERMINATE_GRACE):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
