"""Small text helpers shared by the server and the client: matching (the server's search,
the client's filters), reading a secret from a file (``--token-file``, a relay's
``?token-file=``) and saying how a child process ended (a player, a worker)."""

from __future__ import annotations

import signal
import unicodedata
from pathlib import Path

from .errors import UsageError


def fold(text: str) -> str:
    """Case- and accent-insensitive form: NFKD, combining marks dropped, casefolded."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def read_token_file(path: Path, label: str) -> str:
    """The token in ``path``: its text without the line break(s) at its end.

    A missing, unreadable, non-UTF-8 or empty file is a ``UsageError`` whose
    message starts with ``label`` (the option that named the file).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{label}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{label}: not UTF-8 text") from None
    token = text.rstrip("\r\n")
    if not token:
        raise UsageError(f"{label}: empty")
    return token


def how_it_ended(status: int, signalled: str = "was stopped by") -> str:
    """``exited with status 1``, or for a negative ``status`` (trio's and subprocess's way of
    saying a signal ended it) ``signalled`` and the signal's name: ``was stopped by SIGTERM``."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"{signalled} {name}"
    return f"exited with status {status}"
