"""The ``musiclib`` command: parse the command line, call the library, report.

Each command is one function whose docstring is its help. Logic lives in
``server``, ``client``, ``fetch`` and ``player``; this module only turns
their results into output and their errors into one line and an exit code
(the table is in README.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import inspect
import json
import logging
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from . import DEFAULT_SERVER, __version__
from .errors import (
    MusiclibError,
    NotFound,
    OutputError,
    PlayerError,
    PlayerNotFound,
    UsageError,
    collapse,
)
from .logs import JsonLogFormatter, TerminalLogFormatter  # noqa: F401 - part of the CLI's API
from .logs import server_tls as _server_tls
from .logs import setup_logging as _setup_logging

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from . import fetch, playing
    from .client import Client
    from .decode import AudioFormat
    from .fetch import Connector, Decoding, Retry
    from .liveclient import ListenStats
    from .protocol import ListEnd, ServerStatus, TrackInfo

#: whether this module paused the cyclic garbage collector (see _pause_collection)
_paused = False


def _pause_collection() -> None:
    """Pause the cyclic garbage collector while start-up builds what lives as long as the
    process: modules, classes, cyclopts' and trio's tables, next to no garbage.

    The collector would walk those tens of thousands of objects again and again as they
    pile up: 60 collections, 8-9 ms of a 140 ms ``ls``. Paused while this module imports
    cyclopts and the protocol, and, run as the program (:func:`main`), until the command
    line is parsed and trio imported (:meth:`_App.parse_args`); :func:`_resume_collection`
    ends each pause.
    """
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def _resume_collection() -> None:
    """End :func:`_pause_collection`'s pause: ``gc.freeze()`` moves everything alive out of
    the collector's sight for good (no later collection, in a long ``play`` or ``serve``,
    walks it again), and the collector runs again."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()


@contextlib.contextmanager
def _collection_paused() -> Iterator[None]:
    _pause_collection()
    try:
        yield
    finally:
        _resume_collection()


with _collection_paused():  # the bulk of this module's import
    from cyclopts import App, Parameter
    from cyclopts.config import Env

    from .ui import LsSortKey, format_duration, format_table  # noqa: F401 - the CLI's API

#: where cyclopts' bash script reads the word being completed
_BASH_CUR = 'cur="${COMP_WORDS[COMP_CWORD]}"\n'
#: bash: what follows it, so that candidates are compared with the word as the shell
#: will pass it. Without it a second TAB after ``Les\ Ondes\ `` finds nothing: the word
#: still holds the backslashes, the track names do not.
_BASH_DEQUOTE = r"""  # musiclib: the word unquoted, as the command will get it
  local _w="$cur" _u=""
  [[ "$_w" == [\"\']* ]] && _w="${_w:1}"
  while [[ -n "$_w" ]]; do
    if [[ "${_w:0:1}" == "\\" && ${#_w} -gt 1 ]]; then
      _u+="${_w:1:1}"; _w="${_w:2}"
    else
      _u+="${_w:0:1}"; _w="${_w:1}"
    fi
  done
  cur="$_u"
"""


def _dequoting(script: str) -> str:
    """cyclopts' bash completion script, comparing candidates with the unquoted word."""
    return script.replace(_BASH_CUR, _BASH_CUR + _BASH_DEQUOTE, 1)


class _App(App):
    """cyclopts' App, whose bash completion (printed or installed) compares track names
    with the word being completed as the command will get it (:func:`_dequoting`), and
    whose parsing ends the program's start-up (:func:`_pause_collection`)."""

    def generate_completion(self, **kwargs: Any) -> str:
        script: str = super().generate_completion(**kwargs)
        return _dequoting(script) if "complete -F" in script else script

    def parse_args(self, *args: Any, **kwargs: Any) -> Any:
        """Parse; run as the program, start-up ends here (:func:`_pause_collection`).

        (A command line that does not parse raises: the program then ends, paused.)
        """
        parsed = super().parse_args(*args, **kwargs)
        if _paused and inspect.iscoroutinefunction(parsed[0]):
            import trio  # noqa: F401 - cyclopts imports it next, to run the command

        _resume_collection()
        return parsed


app = _App(
    name="musiclib",
    help="A music library server and its client: list, save and play tracks over TCP.",
    version=__version__,
    backend="trio",
    # every option can also come from the environment: MUSICLIB_<COMMAND>_<OPTION>,
    # e.g. MUSICLIB_SERVE_PORT=7651 or MUSICLIB_LS_SORT=artist
    config=Env("MUSICLIB_", command=True),
    # we print "musiclib: interrupted" ourselves (cyclopts would exit 130 silently)
    suppress_keyboard_interrupt=False,
)

log = logging.getLogger("musiclib")


@Parameter(name="*")
@dataclass
class ConnectOptions:
    """Options every client command takes: where the server is and how to get in."""

    server: Annotated[str, Parameter(env_var="MUSICLIB_SERVER")] = DEFAULT_SERVER
    """Server address as HOST:PORT."""

    timeout: float = 30.0
    """Seconds to wait for the server before giving up."""

    token: Annotated[str | None, Parameter(env_var="MUSICLIB_TOKEN")] = None
    """Shared secret, for a server started with --token (visible to other users in the
    process list: prefer --token-file or MUSICLIB_TOKEN)."""

    token_file: Annotated[Path | None, Parameter(env_var="MUSICLIB_TOKEN_FILE")] = None
    """File holding the shared secret (the line break at its end removed): unlike --token,
    not visible in the process list."""

    tls: Annotated[bool, Parameter(negative="")] = False
    """Connect over TLS, trusting the system's certificate authorities."""

    cafile: Path | None = None
    """Connect over TLS, trusting only the certificates in this PEM file."""

    def connector(self, version: int = 1) -> Connector:
        """A factory of connections to the server, one per attempt.

        File commands speak protocol version 1 (so they work with older
        servers too); live commands need version 2.
        """
        from .client import open_client, tls_context  # trio: only commands that connect

        ssl_context = None
        if self.tls or self.cafile:
            ssl_context = tls_context(str(self.cafile) if self.cafile else None)
        token = _token(self.token, self.token_file)
        return lambda: open_client(
            self.server,
            timeout=self.timeout,
            token=token,
            ssl_context=ssl_context,
            version=version,
        )


@Parameter(name="*")
@dataclass
class ClientOptions(ConnectOptions):
    """Options of the commands that transfer audio: those of every client command, and
    retries and quiet."""

    retries: int = 5
    """Reconnections after a dropped connection (resuming where it stopped); 0: none."""

    quiet: Annotated[bool, Parameter(name=["--quiet", "-q"], negative="")] = False
    """No progress bar and no report lines; errors are still printed."""

    def retry(self) -> Retry:
        """The retry policy for transfers."""
        from .fetch import Retry

        if self.retries < 0:
            raise UsageError("--retries must not be negative")
        return Retry(attempts=self.retries)


_DEFAULT_CLIENT = ClientOptions()
_DEFAULT_CONNECT = ConnectOptions()


@Parameter(name="*")
@dataclass
class WavDecodeOptions:
    """Options of decoded streams (``--decode``) that always come as WAV (``play``)."""

    decode: Annotated[bool, Parameter(negative="")] = False
    """Stream decoded samples (through the server's ffmpeg) instead of the original bytes."""

    sample_format: Literal["s16le", "f32le"] = "s16le"
    """With --decode, in a WAV stream: 16-bit PCM or 32-bit IEEE float samples."""

    rate: int | None = None
    """With --decode: sample rate in Hz (default: the source's)."""

    channels: int | None = None
    """With --decode: channel count (default: the source's)."""

    start: float = 0.0
    """With --decode: start this many seconds into the track."""

    duration: float | None = None
    """With --decode: stop after this many seconds."""

    realtime: Annotated[bool, Parameter(negative="")] = False
    """With --decode: a short burst, then playback speed, like a live source."""

    def output(self) -> Literal["wav", "s16le", "f32le"]:
        """What the decoded samples come as."""
        return "wav"

    def decoding(self) -> Decoding | None:
        """The Decoding asked for, or None; decode options without --decode are refused."""
        from .fetch import Decoding

        if not self.decode:
            if self != type(self)():
                options = "--rate, --channels, --start, --duration and --realtime"
                if isinstance(self, DecodeOptions):
                    options = "--format, " + options
                raise UsageError(f"{options} need --decode")
            return None
        return Decoding(
            output=self.output(),
            sample_format=self.sample_format,
            sample_rate=self.rate,
            channels=self.channels,
            start=self.start,
            duration=self.duration,
            realtime=self.realtime,
        )


@Parameter(name="*")
@dataclass
class DecodeOptions(WavDecodeOptions):
    """Options of decoded streams (``--decode``), as WAV or bare samples (``get``)."""

    format: Literal["wav", "s16le", "f32le"] = "wav"
    """With --decode: a WAV file, or bare interleaved samples (s16le, f32le)."""

    def output(self) -> Literal["wav", "s16le", "f32le"]:
        return self.format


_DEFAULT_DECODE = DecodeOptions()
#: for ``play``, which feeds players WAV only: no ``--format`` to offer
_DEFAULT_WAV_DECODE = WavDecodeOptions()


#: the levels --log-level (and MUSICLIB_LOG_LEVEL) take
LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(level: str, where: str) -> str:
    """``level`` if it is one of :data:`LOG_LEVELS` (any case), else a usage error."""
    if level.lower() not in LOG_LEVELS:
        raise UsageError(f"{where} {level!r}: not a log level; use {', '.join(LOG_LEVELS)}")
    return level.lower()


def _token(token: str | None, token_file: Path | None) -> str | None:
    """The token given on the command line, in the environment, or in a file.

    The file is read once: its text without the line break(s) at its end. A
    missing, unreadable or empty file is a usage error, and so is giving both.
    """
    if token_file is None:
        return token or None
    if token:
        raise UsageError("give the token one way: --token (MUSICLIB_TOKEN) or --token-file")
    from .text import read_token_file

    return read_token_file(token_file, f"--token-file {token_file}")


def _lines(_hint: object, value: str, *, delimiter: str | None = None) -> list[str]:
    """An environment variable holding one value per line (``--channel`` specs have spaces)."""
    return [line.strip() for line in value.splitlines() if line.strip()]


@app.command
async def serve(
    *,
    root: Path = Path("library"),
    host: str = "127.0.0.1",
    port: int = 7650,
    burst: float = 1.0,
    max_decodes: int = 32,
    grace: float = 5.0,
    rescan_interval: float = 300.0,
    index: Path | None = None,
    scan_workers: int | None = None,
    checksums: bool = True,
    watch: bool = True,
    max_connections: int = 1000,
    max_per_address: int = 64,
    max_decodes_per_address: int | None = None,
    min_decode_rate: float = 0.5,
    min_decode_window: float = 30.0,
    max_message_size: int = 64 * 1024,
    handshake_timeout: float = 10.0,
    idle_timeout: float = 300.0,
    send_timeout: float = 30.0,
    token: Annotated[str | None, Parameter(env_var="MUSICLIB_TOKEN")] = None,
    token_file: Annotated[Path | None, Parameter(env_var="MUSICLIB_TOKEN_FILE")] = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    channel: Annotated[list[str] | None, Parameter(env_var_split=_lines)] = None,
    lag_limit: float = 10.0,
    follow_symlinks: Literal["inside", "all", "none"] = "inside",
    workers: int | None = None,
    wyoming: str | None = None,
    wyoming_channel: str | None = None,
    wyoming_format: list[str] | None = None,
    wyoming_latency: int = 500,
    log_level: str = "info",
    log_format: Literal["text", "json"] = "text",
) -> int:
    """Index a folder of media files and serve it until Ctrl-C or SIGTERM.

    Parameters
    ----------
    root
        Folder to index and serve (recursively).
    host
        Address to listen on.
    port
        TCP port; 0 picks a free one (the log says which).
    burst
        Seconds of audio a real-time decoded stream sends at once before pacing.
    max_decodes
        Decoded streams (ffmpeg processes) at once; more wait briefly, then get "busy".
    grace
        Seconds running streams get to finish on shutdown.
    rescan_interval
        Seconds between rescans of the root (0: only at start and on request); a rescan
        re-reads only files whose size or modification time changed.
    index
        SQLite file that keeps the index between runs (default: one per root under
        $XDG_CACHE_HOME/musiclib/ or ~/.cache/musiclib/).
    scan_workers
        Processes reading tags when many files are new (default: one per core, at most 4;
        0: read them in the scanning thread).
    checksums
        Compute every file's sha256 in the background after each scan (--no-checksums:
        only when a file is first streamed).
    watch
        Rescan a second after files under the root change (Linux inotify; --no-watch:
        only periodic and requested rescans).
    max_connections
        Connections served at once; one more is refused with "busy" (unless one of them
        has waited over a second for its hello: that one is closed to make room).
    max_per_address
        Connections one client address (IPv4 address, IPv6 /64) may hold at once; one more
        is refused with "busy" (0: no cap of its own).
    max_decodes_per_address
        Decoded streams one client address may run at once (default: a quarter of
        --max-decodes, at least 1; 0: no cap of its own).
    min_decode_rate
        Slowest a client may read a decoded stream, in times real time averaged over
        --min-decode-window seconds of sending; slower is cut with "too_slow" (0: no minimum).
    min_decode_window
        Seconds of sending over which --min-decode-rate is averaged.
    max_message_size
        Largest message frame a client may send, in bytes.
    handshake_timeout
        Seconds a new connection has, in all, to complete its hello (TLS handshake included).
    idle_timeout
        Seconds a connection may wait, in all, for its next complete request.
    send_timeout
        Seconds a client that stopped reading may hold up one chunk.
    token
        Shared secret every client must present (compared in constant time); visible to
        other users in the process list: prefer --token-file or MUSICLIB_TOKEN.
    token_file
        File holding the shared secret (read once at start, line break at its end removed).
    tls_cert
        PEM certificate (chain) to serve TLS with; needs --tls-key.
    tls_key
        PEM private key of --tls-cert.
    channel
        A live channel NAME=SOURCE (repeatable; in the environment one per line): mic,
        mic:DEVICE, track:QUERY (played once in real time), loop:QUERY (forever) or
        ffmpeg:ARGS (any ffmpeg input) or relay:HOST:PORT[/NAME] (another server's channel,
        reconnected by itself); add ?rate=R&channels=C&format=F to set its format
        (defaults: mic 16000 Hz mono, relay its origin's, others 48000 Hz stereo, s16le);
        a relay also takes latency=MS, token-file=PATH (default: --token), tls=1, cafile=PEM.
    lag_limit
        Seconds a live listener may keep losing audio (falling behind) before it is cut.
    follow_symlinks
        Symbolic links to follow: inside (those whose real path stays inside --root),
        all (also links leaving it: anyone who can write under --root can then publish
        any file the server may read), none.
    workers
        Processes accepting on the address (default: one per core; 1: one process). One
        of them scans and runs the live channels, the others serve the index it keeps;
        the limits above are each worker's.
    wyoming
        Also serve the live channels as Wyoming microphones on HOST:PORT (e.g.
        127.0.0.1:10600), for wyoming-satellite --mic-uri and Wyoming services; off by
        default. Wyoming has no authentication: keep it on 127.0.0.1 unless you mean it.
    wyoming_channel
        The channel a Wyoming connection gets (default: the first --channel; a client
        may choose another with select-program).
    wyoming_format
        NAME=RATE[/CHANNELS]: send channel NAME to Wyoming clients in this format
        (repeatable; default 16000 Hz mono 16-bit, what Wyoming services take).
    wyoming_latency
        Milliseconds a Wyoming client may fall behind before its oldest audio is dropped.
    log_level
        debug, info, warning or error.
    log_format
        text: "TIME LEVEL LOGGER: MESSAGE" lines; json: one JSON object per line.
    """
    from .live.channels import parse_channel
    from .server import ServerConfig, run_until_signalled

    _setup_logging(_log_level(log_level, "--log-level"), server=True, fmt=log_format)
    if not root.is_dir():  # noqa: ASYNC240 - one stat before anything runs
        raise UsageError(f"--root {root}: not a folder")
    specs = [parse_channel(text) for text in channel or ()]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise UsageError("--channel: each channel needs a name of its own")
    if any(spec.kind == "mic" for spec in specs):
        from .devices import find_device

        for spec in specs:  # a missing device or extra: one line now, not a dead channel later
            if spec.kind == "mic":
                find_device(spec.arg or None, "input")
    if lag_limit <= 0:
        raise UsageError("--lag-limit must be positive")
    if scan_workers is not None and scan_workers < 0:
        raise UsageError("--scan-workers must not be negative")
    if max_per_address < 0 or (max_decodes_per_address or 0) < 0:
        raise UsageError("--max-per-address and --max-decodes-per-address must not be negative")
    if min_decode_rate < 0 or min_decode_window <= 0:
        raise UsageError("--min-decode-rate must not be negative, --min-decode-window positive")
    if workers is not None and workers < 1:
        raise UsageError("--workers must be at least 1")
    secret = _token(token, token_file)
    wyoming_config = _wyoming_config(wyoming, wyoming_channel, wyoming_format, wyoming_latency)
    if any(spec.relay is not None for spec in specs):
        from .live.relay import prepare_relays

        specs = await prepare_relays(specs, token=secret)  # each origin asked for its format
    config = ServerConfig(
        root=root,
        host=host,
        port=port,
        burst=burst,
        max_decodes=max_decodes,
        grace_period=grace,
        rescan_interval=rescan_interval,
        index=index,
        scan_workers=scan_workers,
        background_checksums=checksums,
        watch=watch,
        max_connections=max_connections,
        max_connections_per_address=max_per_address or None,
        max_decodes_per_address=max_decodes_per_address,
        min_decode_rate=min_decode_rate,
        min_decode_window=min_decode_window,
        max_message_size=max_message_size,
        handshake_timeout=handshake_timeout,
        idle_timeout=idle_timeout,
        send_timeout=send_timeout,
        token=secret,
        ssl_context=_server_tls(tls_cert, tls_key),
        channels=specs,
        lag_limit=lag_limit,
        follow_symlinks=follow_symlinks,
        wyoming=wyoming_config,
    )
    from .workers import default_workers, supervise

    processes = default_workers() if workers is None else workers
    if processes == 1:
        await run_until_signalled(config)
        return 0
    # what each worker needs and cannot receive as a value: module-level functions
    # travel pickled by name (see musiclib.workers)
    await supervise(
        config,
        processes,
        setup_logging=functools.partial(
            _setup_logging, _log_level(log_level, "--log-level"), True, log_format
        ),
        make_tls=functools.partial(_server_tls, tls_cert, tls_key),
    )
    return 0


def _wyoming_config(
    address: str | None, channel: str | None, formats: list[str] | None, latency: int
) -> Any:
    """``serve``'s ``--wyoming*`` options as a ``WyomingConfig`` (``None``: off)."""
    if address is None:
        if channel is not None or formats:
            raise UsageError("--wyoming-channel and --wyoming-format go with --wyoming")
        return None
    from .wyoming import WyomingConfig, parse_endpoint, parse_format

    if not 1 <= latency <= 60_000:
        raise UsageError("--wyoming-latency must be 1..60000 ms")
    host, port = parse_endpoint(address)
    return WyomingConfig(
        host=host,
        port=port,
        channel=channel,
        formats=dict(parse_format(text) for text in formats or ()),
        max_latency_ms=latency,
    )


#: how long completing a track name waits for the server, in all
COMPLETION_TIMEOUT = 0.5
#: the most track names one completion offers
COMPLETION_TRACKS = 200


def _complete_tracks(context: Any) -> list[str]:
    """Shell completion of a TRACK or QUERY: the paths of the server's tracks that start
    with the word typed, at most :data:`COMPLETION_TRACKS` of them.

    Runs at each TAB in a ``musiclib __complete`` process: asks the server named
    on the command line (or in the environment), and gives nothing, silently,
    when it does not answer within :data:`COMPLETION_TIMEOUT` seconds.
    """
    import trio

    def typed(name: str, env: str | None = None) -> str | None:
        argument = context.get(name)
        raw = argument.raw if argument is not None and argument.provided else None
        return raw or (os.environ.get(env) if env else None)

    prefix = _shell_unescape(context.incomplete)
    token_file = typed("--token-file", "MUSICLIB_TOKEN_FILE")
    options = ConnectOptions(
        server=typed("--server", "MUSICLIB_SERVER") or DEFAULT_SERVER,
        timeout=COMPLETION_TIMEOUT,
        token=typed("--token", "MUSICLIB_TOKEN"),
        token_file=Path(token_file) if token_file else None,
        tls=bool(getattr(context.get("--tls"), "provided", False)),
        cafile=Path(cafile) if (cafile := typed("--cafile")) else None,
    )

    async def paths() -> list[str]:
        with trio.move_on_after(COMPLETION_TIMEOUT):
            async with options.connector()() as client:
                found, _ = await client.list(prefix or None, limit=COMPLETION_TRACKS)
                return [t.path for t in found if t.path.startswith(prefix)]
        return []

    try:
        return trio.run(paths)
    except Exception:  # completion never fails out loud: no server, a bad option, a bug
        return []


def _shell_unescape(word: str) -> str:
    """The word being completed as the shell will pass it: quotes and backslashes gone."""
    if word[:1] in ("'", '"'):
        word = word[1:]
    return re.sub(r"\\(.)", r"\1", word)


@app.command(name="ls")
async def ls(
    *query: Annotated[str, Parameter(completer=_complete_tracks)],
    artist: str | None = None,
    album: str | None = None,
    format: str | None = None,
    sort: LsSortKey = "path",
    reverse: Annotated[bool, Parameter(name=["--reverse", "-r"], negative="")] = False,
    limit: int | None = None,
    offset: int = 0,
    long: Annotated[bool, Parameter(name=["--long", "-l"], negative="")] = False,
    paths: Annotated[bool, Parameter(name=["--paths", "-1"], negative="")] = False,
    json_output: Annotated[bool, Parameter(name="--json", negative="")] = False,
    options: ConnectOptions = _DEFAULT_CONNECT,
) -> int:
    """List the library's tracks, optionally only those matching QUERY.

    Exit status 1 when a query or filter matches nothing (like grep).

    Parameters
    ----------
    query
        Words that must all appear in the title, artist, album or path (case and accents
        ignored); several words need no quotes.
    artist
        Only tracks whose artist contains this (case and accents ignored).
    album
        Only tracks whose album contains this (case and accents ignored).
    format
        Only tracks of this format (file extension: mp3, flac, ...).
    sort
        Order of the list, natural (2 before 10); ties by path.
    reverse
        Reverse the order (tracks without the sorted value stay last).
    limit
        Show at most this many tracks (with --offset, to page through a big library; a
        page of the path, title, artist, album or duration order is the server's, which
        is by code point: 10 before 2).
    offset
        Skip this many tracks of the sorted list first.
    long
        Add the technical columns: codec, sample rate, channels, bit depth, bitrate, size.
    paths
        Print only the paths, one per line (for scripts; control characters escaped).
    json_output
        Print a JSON array of track objects (every field, exact) instead of a table, as
        the tracks arrive, in the server's order (path, title, artist, album or duration:
        by code point, 10 before 2); with --reverse, or --sort size or format, sorted
        here as the table is.
    """
    from .client import MAX_LIST_TRACKS
    from .protocol import LIST_SORTS
    from .ui import JsonArrayWriter, json_array, order, select, track_dict

    if (limit is not None and limit < 0) or offset < 0:
        raise UsageError("--limit and --offset must not be negative")
    if paths and (json_output or long):
        raise UsageError("--paths prints paths only: drop --json and --long")
    words = " ".join(query) or None
    filtered = bool(words or artist or album or format)
    # A page of a server order is the server's (paging stays cheap in any library);
    # anything else is sorted here, naturally, over the whole list (bounded by the
    # protocol's 100 000 tracks a reply).
    by_server = (limit is not None or offset > 0) and sort in LIST_SORTS and not reverse
    hint = ""
    async with options.connector()() as client:
        assert client.welcome is not None
        # --json in one of the server's orders is written as it arrives, whatever the
        # library's size, from a server that pages and filters (it states its versions:
        # newer than paging); anything else is held whole, as the table needs it
        if json_output and sort in LIST_SORTS and not reverse and client.welcome.versions:
            writer = JsonArrayWriter(sys.stdout)
            async with client.list_pages(
                words, artist=artist, album=album, format=format, sort=sort, offset=offset,
                limit=limit,
            ) as pages:  # fmt: skip
                async for page in pages:
                    writer.write(track_dict(t) for t in page)
            writer.close()
            assert pages.end is not None
            end = pages.end
            matched = end.count if end.total is None else end.total
            if not matched and filtered:
                hint = await _did_you_mean(client, words or artist or album or "")
            return _ls_report(end, offset, end.count, matched, hint, words, artist, album, format)
        if by_server:
            asked = MAX_LIST_TRACKS if limit is None else min(limit, MAX_LIST_TRACKS)
            tracks, end = await client.list(
                words, artist=artist, album=album, format=format, sort=sort, offset=offset,
                limit=asked,
            )  # fmt: skip
        else:
            tracks, end = await client.list(
                words, artist=artist, album=album, format=format, limit=MAX_LIST_TRACKS
            )
        total = end.total
        if total is None:  # an older server: it ignored the filters, so apply them here
            tracks = select(tracks, artist=artist, album=album, fmt=format)
            total = len(tracks)
            by_server = False
        if not total and filtered:
            hint = await _did_you_mean(client, words or artist or album or "")
    if not by_server:
        if total > len(tracks):
            log.warning(
                "sorted the first %d of %d matches (by path); narrow the query, or page "
                "with --limit and --offset",
                len(tracks),
                total,
            )
        tracks = order(tracks, sort, reverse=reverse)
        tracks = tracks[offset:] if limit is None else tracks[offset : offset + limit]
    if json_output:
        print(json_array(track_dict(t) for t in tracks))
    elif paths:
        from .ui import printable

        for t in tracks:
            print(printable(t.path))
    elif tracks or not filtered:
        print(_track_table(tracks, long))
    return _ls_report(end, offset, len(tracks), total, hint, words, artist, album, format)


def _ls_report(
    end: ListEnd,
    offset: int,
    count: int,
    total: int,
    hint: str,
    words: str | None,
    artist: str | None,
    album: str | None,
    format: str | None,
) -> int:
    """What ``ls`` says on standard error once ``count`` tracks of ``total`` from
    ``offset`` on are out, and its exit status (1: a query or filter matched nothing)."""
    if not total and (words or artist or album or format):
        what = " ".join(
            f"{name} {value!r}"
            for name, value in (("", words), ("--artist", artist), ("--album", album))
            if value
        ).strip()
        from .ui import shown

        log.warning("no track matches %s%s", shown(what or f"--format {format}"), hint)
        return 1
    last = offset + count
    if count and (offset or last < total):
        more = f" (--offset {last} for the next ones)" if last < total else ""
        log.warning("tracks %d-%d of %d%s", offset + 1, last, total, more)
    elif not count and total:
        log.warning("%d tracks match, none shown from --offset %d", total, offset)
    if end.scanning:
        log.warning("the server is still indexing its library; the list may be incomplete")
    return 0


def _track_table(tracks: list[TrackInfo], long: bool) -> str:
    """The table fitted to the terminal (rich), or plain and stable for a pipe."""
    if sys.stdout.isatty():
        from .ui import format_table_for_terminal

        width = shutil.get_terminal_size().columns
        return format_table_for_terminal(tracks, long=long, width=width)
    return format_table(tracks, long=long)


#: tracks fetched per look-up when a miss looks for "did you mean" candidates: a few
#: hundred KiB at most, whatever the library's size
SUGGEST_TRACKS = 500


async def _did_you_mean(client: Client, query: str) -> str:
    """``"; did you mean 'Brume'?"`` for a query that matched nothing, or ``""``.

    Bounded for any library: the candidates are at most :data:`SUGGEST_TRACKS`
    tracks sharing the first three letters of each word (five words at most),
    and as many of the whole list.
    """
    from .protocol import query_words
    from .ui import shown, suggestions

    pool: dict[str, TrackInfo] = {}
    probes = [None, *{w[:3] for w in query_words(query)[:5] if len(w) >= 3}]
    for probe in probes:
        try:
            found, _ = await client.list(probe, limit=SUGGEST_TRACKS)
        except MusiclibError:  # only a hint: a server that cannot give it gives none
            return ""
        pool.update((t.path, t) for t in found)
    names = suggestions(query, pool.values())
    if not names:
        return ""
    return "; did you mean " + " or ".join(repr(shown(n, 80)) for n in names) + "?"


async def _info_or_hint(client: Client, track: str, checksum: bool = False) -> TrackInfo:
    """``client.info(track)``; a miss (``NotFound``) says which names are close."""
    try:
        found: TrackInfo = await client.info(track, checksum=checksum)
        return found
    except NotFound as miss:
        hint = await _did_you_mean(client, track)
        if not hint:
            raise
        raise NotFound(miss.message + hint) from None


def _one_track(words: tuple[str, ...], command: str) -> str:
    """The TRACK of ``info``/``get``: its words, unquoted or not, as one name."""
    if not words:
        raise UsageError(
            f"which track? musiclib {command} TRACK (a path, a file name or words of it; "
            "musiclib ls lists them)"
        )
    return " ".join(words)


@app.command
async def info(
    *track: Annotated[str, Parameter(completer=_complete_tracks)],
    json_output: Annotated[bool, Parameter(name="--json", negative="")] = False,
    options: ConnectOptions = _DEFAULT_CONNECT,
) -> int:
    """Every known fact of one track: tags, codec, rate, channels, bit depth, bitrate,
    duration, size, sha256, path.

    Parameters
    ----------
    track
        Path relative to the library root, a file name, or words that find one track
        (several words need no quotes).
    json_output
        Print a JSON object (every field) instead of lines.
    """
    from .ui import format_info, track_dict

    name = _one_track(track, "info")
    async with options.connector()() as client:
        found = await _info_or_hint(client, name, checksum=True)
    if json_output:
        print(json.dumps(track_dict(found), indent=2, ensure_ascii=False))
    else:
        print(format_info(found))
    return 0


@app.command
async def completion(
    shell: Literal["bash", "zsh", "fish"] | None = None,
) -> int:
    """Print the shell completion script: commands, options, and track names asked of the
    server as you type (nothing, quickly, when no server answers).

    Load it with ``eval "$(musiclib completion bash)"`` in ~/.bashrc, or let
    ``musiclib --install-completion`` install it for the current shell.

    Parameters
    ----------
    shell
        Shell to complete in (default: detected from $SHELL).
    """
    print(app.generate_completion(prog_name="musiclib", shell=shell))
    return 0


def __getattr__(name: str) -> Any:
    """``install_completion``: cyclopts' ``--install-completion`` command, built when it is
    first needed (``--help``, the completion script, the command itself), since its module
    and ``subprocess`` cost every other command about 4 ms of start-up."""
    if name == "install_completion":
        from cyclopts.completion.install import create_install_completion_command

        return create_install_completion_command(app.install_completion, add_to_startup=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# what app.register_install_completion_command() registers, loaded lazily (and so with
# its help here, which the command list shows without loading it)
app.command(
    f"{__name__}:install_completion",
    name="--install-completion",
    help="Install shell completion for this application.\n\nThis command generates and "
    "installs the completion script to the appropriate location for your shell. After "
    "installation, you may need to restart your shell or source your shell configuration "
    "file.",
)


@app.command
async def rescan(
    *,
    wait: Annotated[bool, Parameter(negative="")] = False,
    json_output: Annotated[bool, Parameter(name="--json", negative="")] = False,
    options: ConnectOptions = _DEFAULT_CONNECT,
) -> int:
    """Ask the server to re-read its library folder (new, changed and deleted files).

    Parameters
    ----------
    wait
        Wait until the scan has finished, then print the track count.
    json_output
        Print a JSON object: tracks, scanning, waited.
    """
    async with options.connector()() as client:
        status = await client.rescan(wait=wait)
    if json_output:
        report = {"tracks": status.tracks, "scanning": status.scanning, "waited": wait}
        print(json.dumps(report))
    elif wait:  # (scripts read this line: kept as it was)
        print(f"{status.tracks} tracks ({'scanning' if status.scanning else 'done'})")
    else:
        print(
            f"rescan started ({status.tracks} tracks indexed now); "
            "musiclib rescan --wait waits for it, musiclib status shows it"
        )
    return 0


@app.command
async def status(
    *,
    json_output: Annotated[bool, Parameter(name="--json", negative="")] = False,
    options: ConnectOptions = _DEFAULT_CONNECT,
) -> int:
    """How the server is: version, protocol versions, tracks, scans, uptime, connections.

    Parameters
    ----------
    json_output
        Print a JSON object (every field) instead of lines.
    """
    from .errors import BadRequest, UnsupportedVersion
    from .ui import format_status

    note = ""
    try:
        async with options.connector(version=2)() as client:
            try:
                found = await client.status()
            except BadRequest:  # a server older than status: what its welcome says
                found, note = _status_of(client), "older than status"
    except UnsupportedVersion:  # a server of version 1 only
        async with options.connector()() as client:
            found, note = _status_of(client), "protocol version 1 only"
    if json_output:
        data = dataclasses.asdict(found)
        if note:
            data.update(uptime=None, connections=None, scans=None, channels=None)
        print(json.dumps({"address": options.server, **data}, ensure_ascii=False))
    else:
        print(format_status(found, options.server, complete=not note))
    if note:
        log.warning("the server is %s: it does not say its uptime, connections or scans", note)
    return 0


def _status_of(client: Client) -> ServerStatus:
    """A status made of what a server's welcome said (uptime and the rest unknown: 0)."""
    from .protocol import ServerStatus

    welcome = client.welcome
    assert welcome is not None
    return ServerStatus(
        server=welcome.server,
        versions=welcome.versions or (welcome.version,),
        tracks=welcome.tracks,
        uptime=0.0,
        connections=0,
        scanning=welcome.scanning,
    )


@app.command
async def get(
    *track: Annotated[str, Parameter(completer=_complete_tracks)],
    save: Annotated[bool, Parameter(negative="")] = False,
    output: Annotated[str | None, Parameter(name=["--output", "-o"])] = None,
    force: Annotated[bool, Parameter(negative="")] = False,
    json_output: Annotated[bool, Parameter(name="--json", negative="")] = False,
    audio: DecodeOptions = _DEFAULT_DECODE,
    options: ClientOptions = _DEFAULT_CLIENT,
) -> int:
    """Download a track: its original bytes, or decoded samples with --decode.

    Saving goes to FILE.part first and is renamed once verified; running the
    same command again resumes an interrupted download of original bytes.
    An existing file is not replaced without --force.
    Without --save or -o the stream goes to standard output.

    Parameters
    ----------
    track
        Path relative to the library root, a file name, or words that find one track
        (several words need no quotes: they are one name).
    save
        Save into the current folder under the track's own name (with --decode, its new
        extension).
    output
        Save to this path; a folder (an existing one, or any path ending in /): under the
        track's own name.
    force
        Replace a file that exists already.
    json_output
        With --save or -o: report the saved file as a JSON object on standard output.
    """
    from . import fetch

    name = _one_track(track, "get")
    decoding = audio.decoding()
    saving = save or output is not None
    if json_output and not saving:
        raise UsageError("--json reports a saved file: add --save or -o PATH")
    if not saving and sys.stdout.isatty():
        raise UsageError(
            "refusing to write audio to a terminal: use --save, -o PATH, or redirect the output"
        )
    from .ui import ProgressBar

    connect, retry = options.connector(), options.retry()
    # info, then the stream on the same connection; both retried after a dropped connection
    async with fetch.first_reply(
        connect, retry, name, lambda client: _info_or_hint(client, name)
    ) as (client, found):
        connect = fetch.reusing(client, connect)
        if decoding is not None:
            decoding = dataclasses.replace(decoding, source_duration=found.duration)
        bar = ProgressBar(found.title, enabled=not options.quiet)
        if saving:
            dest = _destination(found, name, output, decoding, force)
            try:
                with bar:
                    outcome = await fetch.save(
                        connect,
                        found.path,
                        dest,
                        decoding=decoding,
                        retry=retry,
                        reporter=bar,
                        replace=force,
                    )
            except BaseException as exc:
                if isinstance(collapse(exc), KeyboardInterrupt):
                    raise KeyboardInterrupt(_kept_part(dest, found.size)) from None
                raise
            if json_output:
                print(json.dumps(_saved_json(outcome, dest), ensure_ascii=False))
            elif not options.quiet:
                _report_saved(outcome, dest)
        else:
            with bar:
                await fetch.pipe(
                    connect,
                    found.path,
                    sys.stdout.buffer,
                    decoding=decoding,
                    retry=retry,
                    reporter=bar,
                )
    return 0


def _kept_part(dest: Path, size: int) -> str:
    """What an interrupted save left, and how to go on: for ``musiclib: interrupted: ...``."""
    from .fetch import part_path
    from .ui import printable

    part = part_path(dest)
    try:
        kept = part.stat().st_size
    except OSError:
        return "nothing was kept (a decoded download starts over when run again)"
    return (
        f"kept {printable(str(part))} ({kept} of {size} bytes): "
        "run the same command again to resume"
    )


def _saved_json(outcome: fetch.Outcome, dest: Path) -> dict[str, object]:
    """The final report of a save, for ``--json``."""
    return {
        "path": outcome.path,
        "saved_to": str(dest),
        "size": outcome.size if outcome.frames is None else dest.stat().st_size,
        "frames": outcome.frames,
        "resumed_from": outcome.resumed_from,
        "verified": outcome.frames is None,
    }


def _report_saved(outcome: fetch.Outcome, dest: Path) -> None:
    if outcome.frames is not None:
        log.info("saved %s to %s (%d sample frames)", outcome.path, dest, outcome.frames)
    else:
        resumed = f", resumed at byte {outcome.resumed_from}" if outcome.resumed_from else ""
        log.info(
            "saved %s to %s (%d bytes%s, sha256 verified)",
            outcome.path,
            dest,
            outcome.size,
            resumed,
        )


@app.command
async def play(
    *tracks: Annotated[str, Parameter(completer=_complete_tracks)],
    player: Annotated[str | None, Parameter(env_var="MUSICLIB_PLAYER")] = None,
    shuffle: Annotated[bool, Parameter(negative="")] = False,
    repeat: Annotated[bool, Parameter(negative="")] = False,
    pipe: Annotated[bool, Parameter(negative="")] = False,
    save: Annotated[bool, Parameter(negative="")] = False,
    output: Annotated[str | None, Parameter(name=["--output", "-o"])] = None,
    force: Annotated[bool, Parameter(negative="")] = False,
    json_output: Annotated[bool, Parameter(name="--json", negative="")] = False,
    audio: WavDecodeOptions = _DEFAULT_WAV_DECODE,
    options: ClientOptions = _DEFAULT_CLIENT,
) -> int:
    """Play tracks through a media player, as one queue, optionally saving them too.

    Each TRACK is a path, a file name, or words: a name that matches several
    tracks (an album, an artist) queues them all in album order (album, track
    number, path); unlike for get, that is not an error. mpv, vlc and ffplay
    get URLs of a private loopback endpoint, so they seek anywhere and know each
    track's length; other players (and --pipe, --decode) read standard input.
    With --decode the player gets a WAV stream decoded by the server (so aplay
    and paplay work too).

    Parameters
    ----------
    tracks
        Paths, file names, or words; several names play one after the other.
    player
        Player command line. mpv, vlc/cvlc and ffplay get URLs (mpv and vlc the whole
        queue as a playlist); with --pipe they, mplayer (and, with --decode, aplay and
        paplay) get the arguments that make them read standard input; any other
        command reads standard input as given. Default: the first of mpv, ffplay, cvlc.
    shuffle
        Play the queue in random order.
    repeat
        Play the queue again and again, until the player is quit (or Ctrl-C).
    pipe
        Feed the player through standard input, one run per track, instead of URLs
        (no seeking; an MP4 with its index at the end may not play).
    save
        Also save each track into the current folder under its own name, as it plays.
    output
        Also save to this path (a folder, or a path ending in /: under the track's own
        name; a file name only for a single track).
    force
        Replace a saved file that exists already.
    json_output
        With --save or -o: report each saved file as one JSON object per line.
    """
    from . import fetch, playing
    from .player import describe_exit, plan_player
    from .ui import ProgressBar

    if not tracks:
        raise UsageError("name at least one TRACK to play (see musiclib play --help)")
    decoding = audio.decoding()
    plan = plan_player(player, decoded=decoding is not None, pipe=pipe)
    if shutil.which(plan.argv[0]) is None:
        raise PlayerNotFound(
            f"player {plan.argv[0]!r} not found: install it or choose another with --player"
        )
    connect, retry = options.connector(), options.retry()
    # the queue, then the first stream on the same connection, as for get: the hello goes
    # out with the first question, retried after a dropped connection
    async with fetch.first_reply(
        connect,
        retry,
        " ".join(tracks),
        lambda client: playing.build_queue(client, tracks, shuffle=shuffle),
    ) as (client, queue):
        connect = fetch.reusing(client, connect)
        saving = None
        if save or output is not None:
            saving = _queue_saving(queue, tracks, output, decoding, force, retry)
        # mpv, vlc and ffplay draw their own status on the terminal: no bar competes with it
        on_terminal = plan.interactive and sys.stderr.isatty()
        total = len(queue)

        def announce(index: int) -> None:
            if not options.quiet and (plan.url or on_terminal or total > 1):
                track = playing.describe_track(queue[index])
                print(f"musiclib: now playing: {track} ({index + 1}/{total})", file=sys.stderr)

        if plan.url:
            result = await playing.play_urls(
                connect, queue, plan, repeat=repeat, saving=saving, announce=announce
            )
        else:

            def bar(track: TrackInfo) -> ProgressBar:
                enabled = not options.quiet and not on_terminal
                return ProgressBar(track.title, duration=track.duration, enabled=enabled)

            result = await playing.play_pipes(
                connect,
                queue,
                plan,
                repeat=repeat,
                decoding=decoding,
                retry=retry,
                saving=saving,
                announce=announce,
                reporter=bar,
            )
    for outcome, dest in result.saved:
        if json_output:
            print(json.dumps(_saved_json(outcome, dest), ensure_ascii=False))
        elif not options.quiet:
            _report_saved(outcome, dest)
    for note in result.notes:
        log.warning("%s", note)
    if result.status:  # a player that failed is exit 6, also when the save succeeded
        raise PlayerError(describe_exit(result.player, result.status))
    if result.error is not None:
        raise result.error
    return 0


def _queue_saving(
    queue: list[TrackInfo],
    typed: tuple[str, ...],
    output: str | None,
    decoding: Decoding | None,
    force: bool,
    retry: Retry,
) -> playing.Saving:
    """Where each track of ``queue`` is saved, checked before anything plays: every
    file free (or ``force``), no two tracks under one name, ``-o FILE`` for one track."""
    from .playing import Saving

    unique = list({t.path: t for t in queue}.values())
    single = typed[0] if len(unique) == 1 and len(typed) == 1 else None
    is_folder = output is not None and (output.endswith(("/", os.sep)) or Path(output).is_dir())
    if output is not None and not is_folder and len(unique) > 1:
        raise UsageError(f"-o {output}: {len(unique)} tracks to save need a folder (end it with /)")
    dests: dict[str, Path] = {}
    taken: dict[Path, str] = {}
    for track in unique:
        dest = _destination(track, single or track.path, output, decoding, force)
        if dest in taken:
            raise OutputError(
                f"{taken[dest]} and {track.path} would both be saved as {dest}: "
                "play them one at a time"
            )
        dests[track.path], taken[dest] = dest, track.path
    return Saving(lambda track: dests[track.path], retry, replace=force)


@app.command(name="channels")
async def channels_command(
    *,
    json_output: Annotated[bool, Parameter(name="--json", negative="")] = False,
    options: ConnectOptions = _DEFAULT_CONNECT,
) -> int:
    """List the server's live channels: name, source, format, listeners, latency, state.

    Parameters
    ----------
    json_output
        Print one JSON object per channel and line instead of a table.
    """
    from .ui import format_channels

    async with options.connector(version=2)() as client:
        found = await client.channels()
    if json_output:
        for info in found:
            print(json.dumps(dataclasses.asdict(info), ensure_ascii=False))
    else:
        print(format_channels(found))
    return 0


@app.command
async def listen(
    channel: str,
    *,
    format: Literal["s16le", "f32le", "wav"] | None = None,
    rate: int | None = None,
    channels: int | None = None,
    max_latency: int = 500,
    preroll: int = 0,
    duration: float | None = None,
    output: Annotated[Path | None, Parameter(name=["--output", "-o"])] = None,
    force: Annotated[bool, Parameter(negative="")] = False,
    speaker: Annotated[bool, Parameter(negative="")] = False,
    device: str | None = None,
    player: Annotated[str | None, Parameter(env_var="MUSICLIB_PLAYER")] = None,
    fill_gaps: bool = True,
    wyoming: str | None = None,
    wake: list[str] | None = None,
    transcribe: Annotated[bool, Parameter(negative="")] = False,
    language: str | None = None,
    json_output: Annotated[bool, Parameter(name="--json", negative="")] = False,
    options: ClientOptions = _DEFAULT_CLIENT,
) -> int:
    """Receive a live channel: to standard output, a WAV file, the speaker, or a player.

    Each chunk is written as it arrives. Audio the server had to drop because
    this listener fell behind is reported, and replaced by silence of the same
    length (--no-fill-gaps: left out). Ctrl-C stops cleanly (a WAV file is
    finished); a second Ctrl-C quits at once.

    Parameters
    ----------
    channel
        The channel's name (see musiclib channels).
    format
        s16le or f32le: bare interleaved samples; wav: a WAV stream (default: wav for -o,
        --player and --speaker, else the channel's own sample format, bare).
    rate
        Sample rate in Hz (default: the channel's own; another rate is converted by ffmpeg).
    channels
        Channel count (default: the channel's own).
    max_latency
        Milliseconds this listener may fall behind before the server drops its oldest audio.
    preroll
        Start with this many milliseconds of the most recent audio (at most 10000).
    duration
        Stop after this many seconds of the channel's audio.
    output
        Write to this file (a WAV file unless --format s16le/f32le), header exact at the end.
        An existing file is refused unless --force.
    force
        Replace the --output file if it exists (a symbolic link is replaced, not followed).
    speaker
        Play on this machine's speaker (needs musiclib[devices]).
    device
        With --speaker: the output device (a part of its name, or its index).
    player
        Feed a media player (a WAV stream on its standard input), e.g. mpv.
    fill_gaps
        Write silence for lost audio, so the output keeps the channel's timing.
    wyoming
        Send the channel to a Wyoming service at tcp://HOST:PORT instead (16 kHz mono
        16-bit): a wake-word detector (each detection printed with the channel time it
        fired at), or with --transcribe a speech recogniser. Reconnects by itself when
        the service restarts.
    wake
        With --wyoming: the wake word(s) to ask for (default: all the service has).
    transcribe
        With --wyoming: send each utterance (ended by 0.7 s of quiet, or after --duration
        seconds) to a speech recogniser and print its transcript.
    language
        With --transcribe: the language asked of the recogniser.
    json_output
        With --wyoming: print each answer as one JSON object per line.
    """
    from . import liveclient

    if wyoming is not None:
        return await _listen_wyoming(
            channel,
            wyoming,
            wake,
            transcribe,
            language,
            json_output,
            duration,
            max_latency,
            preroll,
            options,
            others=(format, rate, channels, output, speaker, player),
        )
    if wake or transcribe or language or json_output:
        raise UsageError("--wake, --transcribe, --language and --json go with --wyoming")
    from .player import open_player, player_command

    targets = sum([output is not None, speaker, player is not None])
    if targets > 1:
        raise UsageError("choose one of -o, --speaker and --player")
    if device is not None and not speaker:
        raise UsageError("--device goes with --speaker")
    if duration is not None and not duration > 0:
        raise UsageError("--duration must be positive")
    if not 1 <= max_latency <= 60_000 or not 0 <= preroll <= 10_000:
        raise UsageError("--max-latency must be 1..60000 ms and --preroll 0..10000 ms")
    raw = format in ("s16le", "f32le")
    if (speaker or player is not None) and raw:
        raise UsageError("--speaker and --player take the samples as they are; drop --format")
    if not targets and sys.stdout.isatty():
        raise UsageError(
            "refusing to write audio to a terminal: use -o FILE, --speaker, --player, "
            "or redirect the output"
        )
    if speaker:
        from .devices import find_device

        find_device(device, "output")  # a missing device or extra: say so before connecting
    argv = player_command(player, decoded=True) if player is not None else None
    if argv is not None and shutil.which(argv[0]) is None:
        raise PlayerNotFound(f"player {argv[0]!r} not found: install it or choose another")
    listen_options = liveclient.ListenOptions(
        sample_format=format if raw else None,
        sample_rate=rate,
        channels=channels,
        max_latency_ms=max_latency,
        preroll_ms=preroll,
        duration=duration,
        fill_gaps=fill_gaps,
    )

    @contextlib.asynccontextmanager
    async def open_sink(fmt: AudioFormat, frames: int | None) -> AsyncIterator[liveclient.Sink]:
        if output is not None:
            if raw:
                sink: liveclient.Sink = liveclient.RawFileSink(output, replace=force)
            else:
                sink = liveclient.WavFileSink(output, fmt, replace=force)
        elif speaker:
            from .devices import open_output

            async with open_output(device, fmt) as out:
                spk = liveclient.SpeakerSink(out)
                try:
                    yield spk
                finally:
                    await spk.close()
                    if out.underruns:
                        log.warning("the speaker ran dry %d times (underruns)", out.underruns)
            return
        elif argv is not None:
            async with open_player(argv) as p:
                yield liveclient.PlayerSink(p, fmt, frames if fill_gaps else None)
                await p.finish()
            return
        else:
            known = frames if fill_gaps else None  # without the silence, fewer may come
            header = b"" if format != "wav" else _stream_wav_header(fmt, known)
            sink = liveclient.FdSink(sys.stdout.fileno(), header)
        try:
            yield sink
        finally:
            await sink.close()

    retry = options.retry()
    stats = await liveclient.listen(
        options.connector(version=2),
        channel,
        listen_options,
        open_sink,
        retry_delays=retry.delays(),
    )
    _say_listened(options, channel, stats)
    return 0


async def _listen_wyoming(
    channel: str,
    uri: str,
    wake: list[str] | None,
    transcribe: bool,
    language: str | None,
    json_output: bool,
    duration: float | None,
    max_latency: int,
    preroll: int,
    options: ClientOptions,
    *,
    others: tuple[object, ...],
) -> int:
    """``listen --wyoming``: the channel to a Wyoming service, its answers to stdout."""
    from . import liveclient
    from .wyoming import Answer, ServiceTarget, format_answer, listen_to_service, parse_service_uri

    if any(o not in (None, False) for o in others):
        raise UsageError(
            "--wyoming sends the audio to the service: drop --format, --rate, "
            "--channels, -o, --speaker and --player"
        )
    if transcribe and wake:
        raise UsageError("--wake is for a wake-word service, --transcribe for a recogniser")
    if language and not transcribe:
        raise UsageError("--language goes with --transcribe")
    if duration is not None and not duration > 0:
        raise UsageError("--duration must be positive")
    if not 1 <= max_latency <= 60_000 or not 0 <= preroll <= 10_000:
        raise UsageError("--max-latency must be 1..60000 ms and --preroll 0..10000 ms")
    host, port = parse_service_uri(uri)
    target = ServiceTarget(
        host,
        port,
        mode="transcribe" if transcribe else "detect",
        wake=tuple(wake or ()),
        max_utterance=duration if transcribe else None,
        language=language,
    )
    listen_options = liveclient.ListenOptions(
        max_latency_ms=max_latency,
        preroll_ms=preroll,
        duration=None if transcribe else duration,  # --transcribe: the longest utterance
    )

    def emit(answer: Answer) -> None:
        line = json.dumps(answer.as_dict(), ensure_ascii=False) if json_output else None
        print(line or format_answer(answer), flush=True)

    retry = options.retry()
    stats = await listen_to_service(
        options.connector(version=2),
        channel,
        listen_options,
        target,
        emit,
        retry_delays=retry.delays(),
    )
    _say_listened(options, channel, stats)
    return 0


def _say_listened(options: ClientOptions, channel: str, stats: ListenStats) -> None:
    """The one summary line a listen ends with (unless ``--quiet``)."""
    if not options.quiet and stats.start is not None:
        end = stats.end
        why = end.message if end is not None else "stopped"
        log.info("%s: %s (%s)", channel, stats.summary(), why)


def _stream_wav_header(fmt: AudioFormat, frames: int | None) -> bytes:
    from .wav import wav_header

    size = None if frames is None else frames * fmt.bytes_per_frame
    return wav_header(fmt.sample_format, fmt.sample_rate, fmt.channels, size)


@app.command
async def publish(
    channel: str,
    *,
    from_: Annotated[str, Parameter(name="--from", allow_leading_hyphen=True)] = "mic",
    format: Literal["s16le", "f32le"] = "s16le",
    rate: int | None = None,
    channels: int | None = None,
    realtime: Annotated[bool, Parameter(negative="")] = False,
    options: ClientOptions = _DEFAULT_CLIENT,
) -> int:
    """Feed a live channel of the server: from a microphone, a file, or standard input.

    The channel exists while this runs; listeners hear it end when it stops.
    Ctrl-C stops cleanly.

    Parameters
    ----------
    channel
        The channel's name: letters, digits, '-', '_' and '.'.
    from_
        mic, mic:DEVICE, a media file (decoded and paced in real time), or - for raw
        samples on standard input (--format, --rate and --channels say what they are).
    format
        Sample format sent (and, with --from -, read).
    rate
        Sample rate in Hz (default: a file's own, else 16000).
    channels
        Channel count (default: a file's own, else 1).
    realtime
        With --from -: pace standard input in real time (for a file piped in; a live
        recorder such as arecord is paced already).
    """
    import trio

    from . import liveclient
    from .decode import AudioFormat

    if realtime and from_ != "-":
        raise UsageError("--realtime goes with --from - (files are always paced)")
    source: liveclient.PublishSource
    if from_ == "-":
        fmt = AudioFormat(format, rate or 16000, channels or 1)
        _check_format(fmt)
        source = liveclient.stdin_source(fmt, sys.stdin.fileno(), realtime=realtime)
    elif from_ == "mic" or from_.startswith("mic:"):
        device = from_[4:] or None
        fmt = AudioFormat(format, rate or 16000, channels or 1)
        _check_format(fmt)
        from .devices import find_device

        find_device(device, "input")
        source = liveclient.mic_source(device, fmt)
    else:
        path = Path(from_)
        if not path.is_file():  # noqa: ASYNC240 - one stat before anything runs
            raise UsageError(f"--from {from_}: no such file (or use mic, mic:DEVICE or -)")
        from .library import read_track

        facts = await trio.to_thread.run_sync(read_track, path.parent, path.name)
        fmt = AudioFormat(
            format, rate or facts.sample_rate or 48000, channels or facts.channels or 2
        )
        _check_format(fmt)
        source = liveclient.file_source(path, fmt)
    async with options.connector(version=2)() as client:
        stats = await liveclient.publish(client, channel, source)
    if stats.accepted is not None and stats.accepted != stats.frames:
        log.warning("the server took %d of the %d frames sent", stats.accepted, stats.frames)
    if not options.quiet:
        lost = f", {stats.lost} not sent (the network fell behind)" if stats.lost else ""
        log.info(
            "%s: published %d frames (%.2f s) from %s%s",
            channel,
            stats.frames,
            stats.frames / fmt.sample_rate,
            source.description,
            lost,
        )
    return 0


def _check_format(fmt: AudioFormat) -> None:
    problem = fmt.problem()
    if problem:
        raise UsageError(problem)


@app.command
async def devices(
    *,
    json_output: Annotated[bool, Parameter(name="--json", negative="")] = False,
) -> int:
    """List this machine's audio devices (microphones and speakers) for --device and mic:NAME.

    Parameters
    ----------
    json_output
        Print one JSON object per device and line instead of a table.
    """
    from .devices import list_devices
    from .ui import format_devices

    found = list_devices()
    if json_output:
        for dev in found:
            print(json.dumps(dataclasses.asdict(dev), ensure_ascii=False))
    else:
        print(format_devices(found))
    return 0


def _destination(
    info: TrackInfo, typed: str, output: str | None, decoding: Decoding | None, force: bool
) -> Path:
    """Where ``get``/``play`` save: see :func:`musiclib.fetch.destination`."""
    from .fetch import destination, file_name

    name = file_name(info.path, typed, info.format, decoding)
    return destination(output, name, replace=force)


def describe(exc: MusiclibError, shown: int = 10) -> str:
    """The error as one line; an ambiguous name lists (the first few) candidates.

    What the server wrote (a message, candidate paths) is shortened and its
    control characters escaped: it goes to a terminal.
    """
    from .ui import shown as on_terminal

    text = on_terminal(str(exc))
    candidates = getattr(exc, "candidates", ())
    if candidates:
        more = len(candidates) - shown
        listed = ", ".join(on_terminal(c) for c in candidates[:shown])
        text += ": " + listed + (f" and {more} more" if more > 0 else "")
    return text


#: options people reach for that a client command spells otherwise
_CLIENT_MISTAKES = {
    "--port": "give the server as --server HOST:PORT (e.g. --server 127.0.0.1:7660)",
    "--host": "give the server as --server HOST:PORT (e.g. --server myhost:7650)",
    "-p": "give the server as --server HOST:PORT (e.g. --server 127.0.0.1:7660)",
}


def _bad_command_line(bad: Exception) -> str:
    """One line for a command line cyclopts could not parse, saying what to do."""
    from cyclopts.exceptions import UnknownOptionError

    if isinstance(bad, UnknownOptionError):
        token = bad.token.keyword or bad.token.value
        option = token.split("=", 1)[0]
        command = " ".join(bad.command_chain or ()) or "musiclib"
        hint = _CLIENT_MISTAKES.get(option) if command != "serve" else None
        if hint is not None:
            return f"{command} has no {option} option: {hint}"
    text = " ".join(str(bad).split())
    return f"{text} (see musiclib --help)"


#: set when the process was asked to stop with SIGTERM (handled as an interrupt)
_terminated = False


def _terminate_as_interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops a client command as Ctrl-C does: every task cancelled, the player
    and ffmpeg reaped, a resumable ``.part`` kept, the terminal restored. Python's
    default for SIGTERM is to die at once, leaving the player running on its own.
    (``serve`` replaces this with its own graceful shutdown while it runs.)"""
    global _terminated
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started in the background by a shell without job control, which ignores
        # SIGINT for it: nothing can stop the command cleanly, so end as SIGTERM does
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
        return
    _terminated = True
    signal.raise_signal(signal.SIGINT)  # trio's SIGINT handler knows where it is safe


def main(argv: list[str] | None = None) -> None:
    """Entry point: run a command; any musiclib error becomes one line and its exit code.

    Always ends in ``SystemExit``. Run as the program (``argv`` None: the
    ``musiclib`` script, ``python -m musiclib``), the garbage collector waits until the
    command line is parsed (:func:`_pause_collection`), and the process exits at once
    (:func:`_exit_at_once`) rather than spend ~20 ms tearing down every module.
    """
    if argv is not None:  # called in-process (tests, tools): SystemExit as usual
        _run(argv)
        return
    _pause_collection()  # until the command line is parsed
    try:
        _run(None)
    except SystemExit as exiting:
        _exit_at_once(exiting.code)
        raise


def _exit_at_once(code: object) -> None:
    """``os._exit(code)`` once the output is flushed, when nothing is left to finish.

    Interpreter shutdown after a client command (module teardown, garbage
    collection of trio's and cyclopts' objects) measured 20-25 ms, more than
    the command's own work. Skipped (returns, the caller exits normally) when
    a thread that is not a daemon still runs (normal exit joins it), when a
    module whose exit hook matters was loaded (:mod:`multiprocessing`: ``serve``'s
    tag readers are reaped by it; sounddevice: it terminates PortAudio), when the
    status is not a number, or when flushing fails (a reader that left: the
    normal path says nothing about it).
    """
    import threading

    if code is not None and not isinstance(code, int):
        return
    if sys.modules.keys() & {"multiprocessing", "sounddevice"}:
        return
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()[1:]):
        return
    try:
        logging.shutdown()  # what atexit would do: flush and close the handlers
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code or 0)


def _run(argv: list[str] | None) -> None:
    """:func:`main`'s work: parse, run, turn errors into one line and an exit code."""
    if hasattr(signal, "SIGTERM") and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    if not logging.getLogger().handlers:
        try:
            level = _log_level(os.environ.get("MUSICLIB_LOG_LEVEL", "info"), "MUSICLIB_LOG_LEVEL")
        except UsageError as bad_level:
            print(f"musiclib: {bad_level}", file=sys.stderr)
            sys.exit(bad_level.exit_code)
        _setup_logging(level, server=False)
    from cyclopts.exceptions import CycloptsError

    try:
        app(argv if argv is not None else sys.argv[1:], print_error=False, exit_on_error=False)
    except CycloptsError as bad:  # a command line that does not parse
        print(f"musiclib: {_bad_command_line(bad)}", file=sys.stderr)
        sys.exit(UsageError.exit_code)
    except BaseException as raised:  # the boundary: re-raised unless we can say it in a line
        exc = collapse(raised)
        if isinstance(exc, MusiclibError):
            if isinstance(exc, OutputError):  # stdout may hold bytes it cannot take: drop them
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            print(f"musiclib: {describe(exc)}", file=sys.stderr)
            sys.exit(exc.exit_code)
        if isinstance(exc, KeyboardInterrupt):  # its text, if any, says what was kept
            note = f": {exc}" if str(exc) else ""
            how, status = ("terminated", 143) if _terminated else ("interrupted", 130)
            print(f"musiclib: {how}{note}", file=sys.stderr)
            sys.exit(status)
        if isinstance(exc, BrokenPipeError):  # our reader left (e.g. `| head`): not an error
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        if isinstance(exc, OSError):
            print(f"musiclib: {exc.strerror or exc}", file=sys.stderr)
            sys.exit(1)
        raise
