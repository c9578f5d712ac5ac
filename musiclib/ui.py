"""What people see: track tables, track facts, totals, and progress bars.

Pure formatting, except :class:`ProgressBar`, which draws with rich on
standard error (rich comes with cyclopts) and only when that is a terminal.

Everything here may come from a server that is broken or hostile, or from
real tags in real files: every text bound for a terminal goes through
:func:`printable` (no control character reaches it raw) and long texts through
:func:`shorten`. JSON output is left exact (JSON escapes control characters).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Sequence
from typing import IO, Any, Literal

from .protocol import ChannelInfo, TrackInfo
from .text import fold

_TRACK_FIELDS = tuple(f.name for f in dataclasses.fields(TrackInfo))

SortKey = Literal["path", "title", "artist", "album", "duration"]

#: characters of one table cell, or of one error message, shown at most
SHOWN_CHARS = 300
#: characters of one fact shown by ``info`` (the reference server cuts tags at 1024)
SHOWN_FACT_CHARS = 1100


def format_duration(seconds: float | None) -> str:
    """``m:ss`` (``h:mm:ss`` past an hour); empty when unknown (or not a sane duration)."""
    if seconds is None or not math.isfinite(seconds) or not 0 <= seconds < 1e12:
        return ""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_size(size: int) -> str:
    """Bytes for people: ``512 B``, ``2.7 MB``, ``1.1 GB`` (powers of 1000, like ls -h --si)."""
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def select(
    tracks: Iterable[TrackInfo],
    *,
    artist: str | None = None,
    album: str | None = None,
    fmt: str | None = None,
    sort: SortKey = "path",
) -> list[TrackInfo]:
    """Filter (case- and accent-insensitive substrings; format exactly) and sort tracks."""

    def matches(value: str | None, wanted: str | None) -> bool:
        return wanted is None or (value is not None and fold(wanted) in fold(value))

    chosen = [
        t
        for t in tracks
        if matches(t.artist, artist)
        and matches(t.album, album)
        and (fmt is None or t.format == fmt.lower().lstrip("."))
    ]

    def key(t: TrackInfo) -> tuple[Any, ...]:
        if sort == "duration":
            return (t.duration is None, t.duration or 0.0, t.path)
        value = getattr(t, sort)
        return (value is None, fold(value or ""), t.path)

    return sorted(chosen, key=key)


def totals(tracks: Sequence[TrackInfo]) -> str:
    """``10 tracks, 3:17, 2.7 MB``."""
    count = f"{len(tracks)} track{'' if len(tracks) == 1 else 's'}"
    seconds = sum(t.duration or 0.0 for t in tracks)
    size = sum(t.size for t in tracks)
    return f"{count}, {format_duration(seconds) or '0:00'}, {format_size(size)}"


def format_table(tracks: Sequence[TrackInfo], *, long: bool = False) -> str:
    """The ``ls`` table (path, title, artist, album, time, format; ``long`` adds the
    technical columns), then a totals line."""
    header = ["PATH", "TITLE", "ARTIST", "ALBUM", "TIME", "FORMAT"]
    if long:
        header += ["CODEC", "RATE", "CH", "BITS", "BITRATE", "SIZE"]
    right = {"TIME", "RATE", "CH", "BITS", "BITRATE", "SIZE"}
    rows: list[list[str]] = []
    for t in tracks:
        row = [
            t.path,
            t.title,
            t.artist or "",
            t.album or "",
            format_duration(t.duration),
            t.format + (" (unreadable)" if t.error else ""),
        ]
        if long:
            row += [
                t.codec or "",
                f"{t.sample_rate}" if t.sample_rate else "",
                f"{t.channels}" if t.channels else "",
                f"{t.bits_per_sample}" if t.bits_per_sample else "",
                f"{round(t.bitrate / 1000)}k" if t.bitrate else "",
                format_size(t.size),
            ]
        rows.append(row)
    lines = _columns(header, rows, right)
    lines.append(totals(tracks))
    return "\n".join(lines)


def printable(text: str) -> str:
    """``text`` with control and other unprintable characters shown as ``\\xNN``,
    ``\\uNNNN`` or ``\\UNNNNNNNN``: what a server sends never moves the cursor, clears the
    screen, retitles the terminal or reverses the text's direction."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` as it may be shown on a terminal: printable, at most ``limit`` characters."""
    return shorten(printable(shorten(text, limit)), limit)


def _columns(header: list[str], rows: list[list[str]], right: set[str]) -> list[str]:
    """Rows as aligned text columns (``right``-aligned where named), header first."""
    rows = [[shown(cell) for cell in row] for row in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(
            cell.rjust(w) if name in right else cell.ljust(w)
            for name, cell, w in zip(header, row, widths, strict=True)
        ).rstrip()
        for row in [header, *rows]
    ]


def format_channels(channels: Sequence[ChannelInfo]) -> str:
    """The ``channels`` table: name, source, format, listeners, latency, state."""
    header = ["NAME", "SOURCE", "FORMAT", "LISTENERS", "LATENCY", "STATE", "TIME"]
    rows = [
        [
            c.name,
            c.source,
            f"{c.sample_format} {c.sample_rate} Hz {c.channels} ch",
            str(c.listeners),
            f"{c.latency_ms:.0f} ms",
            c.state,
            format_duration(c.position / c.sample_rate),
        ]
        for c in channels
    ]
    if not rows:
        return "no live channels (serve --channel NAME=SOURCE, or musiclib publish NAME)"
    return "\n".join(_columns(header, rows, {"LISTENERS", "LATENCY", "TIME"}))


def format_devices(devices: Sequence[Any]) -> str:
    """The ``devices`` table; ``*`` marks the default input and output."""
    header = ["#", "NAME", "API", "IN", "OUT", "RATE", ""]
    rows = [
        [
            str(d.index),
            d.name,
            d.hostapi,
            str(d.max_input_channels),
            str(d.max_output_channels),
            f"{d.default_samplerate:g}",
            " ".join(
                w
                for w, on in (
                    ("default input", d.is_default_input),
                    ("default output", d.is_default_output),
                )
                if on
            ),
        ]
        for d in devices
    ]
    if not rows:
        return "no audio devices found"
    return "\n".join(_columns(header, rows, {"#", "IN", "OUT", "RATE"}))


def track_dict(track: TrackInfo) -> dict[str, Any]:
    """Every field of a track, ``None`` included (``ls --json`` and ``info --json``).

    Field by field: ``dataclasses.asdict`` deep-copies and took 0.2 s of a
    10 000-track ``ls --json`` (BENCHMARKS.md, scenario 6).
    """
    return {name: getattr(track, name) for name in _TRACK_FIELDS}


def json_array(items: Iterable[dict[str, Any]]) -> str:
    """A JSON array with one object per line: readable, and made by the C encoder
    (``indent`` makes ``json`` fall back to its pure-Python encoder, 3x slower)."""
    lines = ",\n".join("  " + json.dumps(item, ensure_ascii=False) for item in items)
    return f"[\n{lines}\n]" if lines else "[]"


def format_info(track: TrackInfo) -> str:
    """Every known fact of one track, one per line."""
    facts: list[tuple[str, str]] = [
        ("path", track.path),
        ("title", track.title),
        ("artist", track.artist or ""),
        ("album", track.album or ""),
        ("track", str(track.track) if track.track is not None else ""),
        ("duration", format_duration(track.duration)),
        ("format", track.format),
        ("codec", track.codec or ""),
        ("sample rate", f"{track.sample_rate} Hz" if track.sample_rate else ""),
        ("channels", str(track.channels) if track.channels else ""),
        ("bit depth", f"{track.bits_per_sample} bits" if track.bits_per_sample else ""),
        ("bitrate", f"{round(track.bitrate / 1000)} kbit/s" if track.bitrate else ""),
        ("size", f"{track.size} bytes ({format_size(track.size)})"),
        ("sha256", track.sha256 or ""),
        ("error", track.error or ""),
    ]
    width = max(len(name) for name, _ in facts)
    return "\n".join(
        f"{name.rjust(width)}  {shown(value, SHOWN_FACT_CHARS)}" for name, value in facts if value
    )


class ProgressBar:
    """A rich progress bar on standard error: bytes, rate and ETA, or for a player the
    elapsed and total time of the track. Draws nothing unless stderr is a terminal.

    Used as a :class:`musiclib.fetch.Reporter` (``begin``/``advance``) inside ``with``.
    """

    def __init__(
        self,
        label: str,
        *,
        duration: float | None = None,
        stream: IO[str] | None = None,
        enabled: bool = True,
    ) -> None:
        self._stream = stream or sys.stderr
        self.enabled = enabled and self._stream.isatty()
        self._label = shown(label, 60)
        if duration is not None and not (math.isfinite(duration) and 0 < duration < 1e9):
            duration = None
        self._duration = duration  # set: show playback time instead of bytes
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            console = Console(file=self._stream)
            if self._duration:
                columns: list[Any] = [
                    TextColumn("[bold]{task.description}"),
                    *_playback_columns(self._duration),
                ]
            else:
                columns = [
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    TimeRemainingColumn(),
                ]
            self._progress = Progress(*columns, console=console, transient=False)
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def begin(self, total: int | None, done: int = 0) -> None:
        if self._progress is not None:
            label = _markup_free(self._label)
            self._task = self._progress.add_task(label, total=total, completed=done)

    def advance(self, n: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)


def _markup_free(text: str) -> str:
    """``text`` with rich's markup escaped: a title ``[blink]`` is shown as written."""
    from rich.markup import escape

    return escape(text)


def _playback_columns(duration: float) -> list[Any]:
    """A bar and ``elapsed / total`` from the time since playback began.

    The bytes fed to a player say little about what it has played (mpv reads a
    short track into its cache at once), so the clock is the honest measure.
    """
    from rich.progress import ProgressColumn, Task
    from rich.progress_bar import ProgressBar as Bar
    from rich.text import Text

    def played(task: Task) -> float:
        return min(task.elapsed or 0.0, duration)

    class PlayedBar(ProgressColumn):
        def render(self, task: Task) -> Bar:
            return Bar(total=duration, completed=played(task), width=40)

    class PlayedTime(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{format_duration(played(task))} / {format_duration(duration)}")

    return [PlayedBar(), PlayedTime()]
