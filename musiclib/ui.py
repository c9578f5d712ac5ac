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
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any, Final, Literal

from .protocol import ChannelInfo, ServerStatus, TrackInfo
from .text import fold

_TRACK_FIELDS = tuple(f.name for f in dataclasses.fields(TrackInfo))

SortKey = Literal["path", "title", "artist", "album", "duration"]
#: what ``ls --sort`` takes: the server's keys, and two the client sorts by itself
LsSortKey = Literal["path", "title", "artist", "album", "duration", "size", "format"]

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


_NUMBERS = re.compile(r"(\D*)(\d*)")


def natural_key(text: str) -> tuple[tuple[str, int], ...]:
    """A sort key that orders runs of digits by their value: ``2`` before ``10``.

    Text between the numbers is compared folded (case and accents ignored);
    ``01`` and ``1`` are equal here (callers break ties by path).
    """
    return tuple(
        (letters, int(digits) if digits else -1)
        for letters, digits in _NUMBERS.findall(fold(text))
        if letters or digits
    )


def order(
    tracks: Iterable[TrackInfo], sort: LsSortKey = "path", *, reverse: bool = False
) -> list[TrackInfo]:
    """Tracks in the order ``ls`` shows them: natural (``2`` before ``10``), by ``sort``,
    ties by path (naturally, then code point by code point); tracks without the value
    last, also when ``reverse`` turns the rest around.

    The server orders by code point (PROTOCOL.md, "Order"); this is the
    client's order of a list it has whole.
    """

    def tie(t: TrackInfo) -> tuple[Any, ...]:
        return (natural_key(t.path), t.path)

    def value(t: TrackInfo) -> Any:
        if sort == "duration":
            return t.duration
        if sort == "size":
            return t.size
        if sort == "path":
            return ()
        text = getattr(t, sort)
        return natural_key(text) if text else None

    def key(t: TrackInfo) -> tuple[Any, ...]:
        return (value(t), tie(t))

    known = [t for t in tracks if value(t) is not None]
    unknown = [t for t in tracks if value(t) is None]
    return sorted(known, key=key, reverse=reverse) + sorted(unknown, key=tie, reverse=reverse)


def suggestions(query: str, tracks: Iterable[TrackInfo], n: int = 3) -> list[str]:
    """What "did you mean" offers after ``query`` matched nothing in a library holding
    ``tracks`` (a sample of it): at most ``n`` names, closest first.

    First the query with each word that occurs nowhere replaced by the closest
    word that does (``cafe brumme`` -> ``cafe brume``), then the titles, artists,
    albums and file names (without extension and leading track number) closest
    to the whole query (difflib's ratio; case and accents ignored).
    """
    import difflib

    from .protocol import query_words

    wanted = [fold(w) for w in query_words(query)]
    wanted = [w for w in wanted if w]
    if not wanted:
        return []
    tracks = list(tracks)
    names: dict[str, str] = {}  # folded -> as written
    for t in tracks:
        stem = _TRACK_NUMBER.sub("", t.path.rsplit("/", 1)[-1].rsplit(".", 1)[0])
        for name in (t.title, t.artist, t.album, stem):
            if name:
                names.setdefault(fold(name), name)
    haystack = list(names) + [fold(t.path) for t in tracks]
    vocabulary = sorted({w for name in names for w in query_words(name)})
    found: list[str] = []
    fixed = []
    for word in wanted:
        if any(word in name for name in haystack):
            fixed.append(word)
        else:
            nearest = difflib.get_close_matches(word, vocabulary, n=1, cutoff=0.6)
            fixed.append(nearest[0] if nearest else word)
    if fixed != wanted and len(wanted) > 1:
        found.append(" ".join(fixed))
    for name in difflib.get_close_matches(" ".join(wanted), list(names), n=n, cutoff=0.6):
        if name not in {fold(f) for f in found}:
            found.append(names[name])
    return found[:n]


#: a track number at the start of a file name: ``01 - ``, ``2. ``, ``03_``
_TRACK_NUMBER: Final = re.compile(r"^\d+\s*[-._]?\s*")


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
    lines = _columns(header, _rows(tracks, long), right)
    lines.append(totals(tracks))
    return "\n".join(lines)


#: ``ls`` columns on a terminal: header, right-aligned, shrinks (a text column), and the
#: order they are given up in when the terminal is too narrow (lowest first)
_TERMINAL_COLUMNS: Final = {
    "PATH": (False, True, 12),
    "TITLE": (False, True, 10),
    "ARTIST": (False, True, 6),
    "ALBUM": (False, True, 5),
    "TIME": (True, False, 11),
    "FORMAT": (False, False, 1),
    "CODEC": (False, False, 8),
    "RATE": (True, False, 7),
    "CH": (True, False, 3),
    "BITS": (True, False, 2),
    "BITRATE": (True, False, 4),
    "SIZE": (True, False, 9),
}
#: the narrowest a shrinking column gets before columns are given up
_MIN_TEXT_WIDTH: Final = 14
_GAP: Final = 2


def format_table_for_terminal(
    tracks: Sequence[TrackInfo], *, long: bool = False, width: int = 80
) -> str:
    """The ``ls`` table fitted to a terminal ``width`` columns wide, then the totals line.

    Widths are measured in terminal cells (rich's ``cell_len``: CJK and emoji
    take two) and rich draws the table. When the natural table is too wide,
    the text columns (path, title, artist, album) shrink in proportion to
    their widths and end in an ellipsis; when even that leaves one narrower
    than 12 cells, the least useful columns are left out and a last line names
    them. Text is escaped (:func:`shown`) and never read as rich markup.

    Imports rich (some 30 ms): call it only when drawing for a terminal.
    """
    import io

    from rich.cells import cell_len
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    headers = ["PATH", "TITLE", "ARTIST", "ALBUM", "TIME", "FORMAT"]
    if long:
        headers += ["CODEC", "RATE", "CH", "BITS", "BITRATE", "SIZE"]
    rows = [[shown(cell) for cell in row] for row in _rows(tracks, long)]
    natural = {
        h: max([cell_len(h), *(cell_len(r[i]) for r in rows)]) for i, h in enumerate(headers)
    }
    shown_headers = list(headers)
    hidden: list[str] = []

    def fixed() -> int:
        return sum(natural[h] for h in shown_headers if not _TERMINAL_COLUMNS[h][1])

    def texts() -> list[str]:
        return [h for h in shown_headers if _TERMINAL_COLUMNS[h][1]]

    def room() -> int:
        return width - fixed() - _GAP * (len(shown_headers) - 1)

    while (
        len(shown_headers) > 1
        and sum(natural[h] for h in shown_headers) + _GAP * (len(shown_headers) - 1) > width
        and room() < _MIN_TEXT_WIDTH * len(texts())
    ):
        drop = min(shown_headers, key=lambda h: _TERMINAL_COLUMNS[h][2])
        shown_headers.remove(drop)
        hidden.append(drop)
    widths = {h: natural[h] for h in shown_headers}
    want = sum(natural[h] for h in texts())
    if want > room() > 0:  # shrink the text columns in proportion, none below its share
        left = room()
        for i, h in enumerate(texts()):
            share = left if i == len(texts()) - 1 else max(1, natural[h] * room() // want)
            widths[h] = min(natural[h], share)
            left -= widths[h]
    table = Table(box=None, pad_edge=False, show_edge=False, padding=(0, _GAP, 0, 0))
    for h in shown_headers:
        right = _TERMINAL_COLUMNS[h][0]
        table.add_column(
            h,
            justify="right" if right else "left",
            no_wrap=True,
            overflow="ellipsis",
            width=max(widths[h], 1),
        )
    path = shown_headers.index("PATH") if "PATH" in shown_headers else -1
    for row in rows:
        cells = [row[headers.index(h)] for h in shown_headers]
        if path >= 0:  # a path differs at its end: cut at its start
            cells[path] = _tail(cells[path], widths["PATH"], cell_len)
        table.add_row(*(Text(cell) for cell in cells))
    out = io.StringIO()
    console = Console(
        file=out, width=max(width, 1) + _GAP, color_system=None, highlight=False, emoji=False
    )
    console.print(table)
    lines = [line.rstrip() for line in out.getvalue().splitlines()]
    lines.append(totals(tracks))
    if hidden:
        lines.append(f"(not shown, the terminal is too narrow: {', '.join(sorted(hidden))})")
    return "\n".join(lines)


def _tail(text: str, width: int, cell_len: Callable[[str], int]) -> str:
    """``text`` in at most ``width`` terminal cells: its end, after an ellipsis."""
    if cell_len(text) <= width:
        return text
    kept, used = [], 1  # the ellipsis takes one cell
    for char in reversed(text):
        used += cell_len(char)
        if used > width:
            break
        kept.append(char)
    return "…" + "".join(reversed(kept))


def _rows(tracks: Sequence[TrackInfo], long: bool) -> list[list[str]]:
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
    return rows


def format_status(status: ServerStatus, address: str, *, complete: bool = True) -> str:
    """What ``musiclib status`` prints: one fact per line. ``complete=False``: the status
    was pieced together from an older server's welcome, which says no more than its
    version, versions, tracks and whether it scans."""
    if not complete:
        last = uptime = connections = scans = channels = "unknown (an older server)"
    else:
        if status.last_scan is None:
            last = "none finished yet"
        else:
            took = status.last_scan_took or 0.0
            last = f"{_ago(status.last_scan)} ago, took {took:.2f} s"
        uptime, scans = _ago(status.uptime), str(status.scans)
        connections, channels = str(status.connections), str(status.channels)
    facts = [
        ("server", f"{status.server} at {address}"),
        ("protocol", "versions " + ", ".join(str(v) for v in status.versions)),
        ("tracks", str(status.tracks)),
        ("scan", "running" if status.scanning else "idle"),
        ("last scan", last),
        ("scans", scans),
        ("uptime", uptime),
        ("connections", connections),
        ("live channels", channels),
    ]
    if status.worker is not None:  # serve --workers: which process answered, whose connections
        who = f"{status.worker}" + (f" (pid {status.pid})" if status.pid is not None else "")
        facts.insert(facts.index(("connections", connections)), ("worker", who))
    width = max(len(name) for name, _ in facts)
    return "\n".join(f"{name.rjust(width)}  {shown(value)}" for name, value in facts)


def _ago(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 10 min``, ``3 d 4 h``."""
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


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


#: one compact JSON text, non-ASCII kept; one encoder made once (``json.dumps`` with an
#: argument makes a new one per call)
_to_json: Final = json.JSONEncoder(ensure_ascii=False).encode


def json_array(items: Iterable[dict[str, Any]]) -> str:
    """A JSON array with one object per line: readable, and made by the C encoder
    (``indent`` makes ``json`` fall back to its pure-Python encoder, 3x slower)."""
    lines = ",\n".join("  " + _to_json(item) for item in items)
    return f"[\n{lines}\n]" if lines else "[]"


class JsonArrayWriter:
    """:func:`json_array`'s text (and ``print``'s newline), written to ``out`` piece by
    piece as the items come: ``ls --json`` of a library of any size holds one page.

    The bytes are those of ``print(json_array(all_items))``: ``[``, one object per
    line, ``]``; ``[]`` when there were none. A listing cut short by an error
    leaves an array with no ``]``, which no JSON reader takes for a whole one.
    """

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._before = "[\n  "  # what comes before the next item

    def write(self, items: Iterable[dict[str, Any]]) -> None:
        """Write ``items`` (in one ``write`` call)."""
        text = ",\n  ".join(_to_json(item) for item in items)
        if text:
            self._out.write(self._before + text)
            self._before = ",\n  "

    def close(self) -> None:
        """End the array (the stream itself is left open)."""
        self._out.write("[]\n" if self._before.startswith("[") else "\n]\n")


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
