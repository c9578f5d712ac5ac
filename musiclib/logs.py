"""How a musiclib process logs, and loads its TLS certificate: what each worker of
``serve --workers`` runs first (kept apart from the CLI so a worker does not import it)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import ssl


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record and line: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


class TerminalLogFormatter(logging.Formatter):
    """Log lines as text, with control characters escaped and very long lines shortened:
    messages carry names and words from the other side (a title, an error message)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        from .ui import shown

        return shown(super().formatMessage(record), 2000)


def setup_logging(level: str, server: bool, fmt: str = "text") -> None:
    """Log to standard error at ``level``: a server's lines with time, level and
    logger (as text or JSON, ``fmt``), a client's as ``musiclib: MESSAGE``."""
    text = "%(asctime)s %(levelname)s %(name)s: %(message)s" if server else "musiclib: %(message)s"
    logging.basicConfig(level=level.upper(), format=text, stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonLogFormatter() if fmt == "json" else TerminalLogFormatter(text))


def server_tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server's TLS context from ``--tls-cert``/``--tls-key`` (``None``: neither)."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise UsageError("--tls-cert and --tls-key go together")
    import ssl  # only TLS needs it: 12 ms of start-up

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load --tls-cert/--tls-key: {exc}") from None
    return context
