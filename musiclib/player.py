"""External media players: presets, start-up, feeding, and clean exits.

A player is any program that reads the stream on its standard input. For the
players we know, the arguments that make them do so are appended to what the
user wrote, so ``--player "mpv --volume=50"`` runs ``mpv --volume=50
--no-video -``. The process is always reaped: closing the :class:`Player`
(also by cancellation, e.g. Ctrl-C) terminates it if it is still running.

A player's exit status decides: 0 is success, also when it stopped reading
early (the user quit mpv with ``q``); anything else, a signal included, is a
failure the CLI reports with exit status 6.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import PurePath
from typing import overload

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


def player_command(
    spec: str | None, environ: Mapping[str, str] = os.environ, *, decoded: bool = False
) -> list[str]:
    """The argv for ``spec`` (a shell-like command line), the environment, or a default.

    ``decoded`` says the player will get a WAV stream rather than original bytes.
    """
    spec = spec or environ.get("MUSICLIB_PLAYER") or None
    if spec is None:
        for name in DEFAULT_PLAYERS:
            if shutil.which(name):
                return [name, *STDIN_ARGS[name]]
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
    extra = STDIN_ARGS.get(name, ())
    if extra and argv[-1] not in ("-", "pipe:0", "fd://0"):
        argv.extend(extra)
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
        if status < 0:
            try:
                how = signal.Signals(-status).name
            except ValueError:
                how = f"signal {-status}"
            return f"{self.name} was stopped by {how}"
        return f"{self.name} exited with status {status}"


@asynccontextmanager
async def open_player(argv: list[str]) -> AsyncIterator[Player]:
    """Start ``argv`` with a pipe on its standard input; always reap it on the way out."""
    try:
        process = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE)
    except FileNotFoundError:
        raise PlayerNotFound(
            f"player {argv[0]!r} not found: install it or choose another with --player"
        ) from None
    except PermissionError:
        raise PlayerError(f"player {argv[0]!r} is not executable") from None
    player = Player(process, argv)
    try:
        yield player
    finally:
        with trio.CancelScope(shield=True):
            await _reap(process)


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
