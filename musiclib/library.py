"""The music library: scanning, tags, search, name resolution and confined opening.

Everything here is synchronous and thread-safe; the server runs
:meth:`Library.rescan` and the index queries in worker threads.

Why it looks the way it does:

* **mutagen class chosen by extension.** ``mutagen.File`` sniffs by trying
  every format it knows; opening the likely class first halves the cost for
  ogg/flac/opus. Only when that class fails do we fall back to sniffing (an
  ``.ogg`` may hold Opus or FLAC, an ``.mp3`` may really be something else).
* **Tags are read in bounded memory.** mutagen reads through
  :mod:`musiclib.tags`, which shows it only the text tags the index keeps
  (never a picture) and refuses to read more than 16 MiB of one file.
* **A file mutagen cannot parse is still a track.** It is listed with
  ``error`` set to a one-line reason and can still be served; one bad file
  never stops a scan. Only a file that vanished raises (``FileNotFoundError``).
* **Our own RIFF/AIFF chunk walker.** ffmpeg writes WAV tags as a RIFF
  ``LIST``/``INFO`` chunk and AIFF titles as a ``NAME`` chunk; mutagen reads
  neither (only ID3 in those containers). The walker reads chunk headers and
  small text chunks only, seeks over the audio, and gives up quietly on
  anything odd. ID3 values win; INFO/NAME fill the gaps.
* **Files still being written are looked at again.** A scan indexes a file
  modified moments ago as it finds it (so it is listed at once) and remembers
  it; :meth:`Library.recheck` reads it again until it stops changing.
* **An incremental scan over a persistent index.** The walk stats every file
  (cheap); only files whose size or mtime differ from the SQLite index
  (:mod:`musiclib.index`) are opened. Many changed files are read by a pool of
  processes (mutagen is pure Python, so threads would share one core:
  measured in BENCHMARKS.md, scenario 6), and rows are committed in batches
  that readers in other threads see at once.
* **Confinement by real path.** By default symlinks are followed only when
  their real path stays inside the real root, both when scanning and when
  opening (:data:`FollowSymlinks`: ``"all"`` follows every link, like MPD's
  ``follow_outside_symlinks``; ``"none"`` follows none). Whatever the mode,
  a client names tracks only through the index, never a path of its own.
* **Formats mutagen cannot read are probed with ffmpeg.** ``.mka``, ``.caf``
  and the rest of :data:`FFMPEG_EXTENSIONS` get their facts and tags from
  ``ffmpeg -i``'s report, run by the scan (in its worker processes when there
  are many) with a timeout, once per file version like any tag read.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import functools
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

from .errors import Ambiguous, Busy, NotFound, Unreadable
from .index import TRACK_FIELDS, Index, Listing, ListQuery, Row, match_condition, row_of
from .protocol import TrackInfo
from .text import fold

__all__ = [
    "FFMPEG_EXTENSIONS",
    "SUPPORTED_EXTENSIONS",
    "FollowSymlinks",
    "Library",
    "fold",
    "open_confined",
    "read_rows",
    "read_track",
    "scan",
    "walk",
]

log = logging.getLogger("musiclib.library")

# The mutagen class that reads each extension (tried first; sniffing follows if it fails),
# by its name in _mutagen()
_CLASS_BY_EXT: dict[str, str] = {
    "mp3": "MP3",
    "mp2": "MP3",  # MPEG layer II: mutagen's MP3 reads every layer
    "ogg": "BoundedOggVorbis",
    "oga": "BoundedOggVorbis",
    "opus": "BoundedOggOpus",
    "spx": "OggSpeex",
    "oggflac": "OggFLAC",
    "flac": "FLAC",
    "m4a": "BoundedMP4",
    "m4b": "BoundedMP4",  # audiobooks
    "m4p": "BoundedMP4",  # iTunes' protected AAC: listed and served; ffmpeg cannot decode it
    "m4r": "BoundedMP4",  # ringtones
    "mp4": "BoundedMP4",
    "3gp": "BoundedMP4",
    "3g2": "BoundedMP4",
    "aac": "AAC",
    "ac3": "AC3",
    "eac3": "AC3",
    "wav": "WAVE",
    "wave": "WAVE",
    "aif": "AIFF",
    "aiff": "AIFF",
    "aifc": "AIFF",
    "wv": "WavPack",
    "wma": "ASF",
    "asf": "ASF",
    "ape": "MonkeysAudio",
    "mpc": "Musepack",
    "tta": "TrueAudio",
    "ofr": "OptimFROG",  # ffmpeg has no OptimFROG decoder: served, never decoded
    "ofs": "OptimFROG",
    "tak": "TAK",
    "dsf": "DSF",
    "dff": "DSDIFF",
}


@functools.cache
def _mutagen() -> types.SimpleNamespace:
    """mutagen's format classes (and :mod:`musiclib.tags`, built on them), imported at
    the first file read rather than with this module: some 15 ms of start-up that a
    server whose index is current (a warm start), the supervisor of ``serve
    --workers`` and its secondary workers never need (BENCHMARKS.md, scenario 6)."""
    import mutagen
    from mutagen.aac import AAC
    from mutagen.ac3 import AC3
    from mutagen.aiff import AIFF
    from mutagen.asf import ASF, ASFTags
    from mutagen.dsdiff import DSDIFF
    from mutagen.dsf import DSF
    from mutagen.flac import FLAC
    from mutagen.id3 import ID3
    from mutagen.monkeysaudio import MonkeysAudio
    from mutagen.mp3 import MP3
    from mutagen.mp4 import MP4, MP4Tags
    from mutagen.musepack import Musepack
    from mutagen.oggflac import OggFLAC
    from mutagen.oggopus import OggOpus
    from mutagen.oggspeex import OggSpeex
    from mutagen.oggvorbis import OggVorbis
    from mutagen.optimfrog import OptimFROG
    from mutagen.tak import TAK
    from mutagen.trueaudio import TrueAudio
    from mutagen.wave import WAVE
    from mutagen.wavpack import WavPack

    from .tags import BoundedMP4, BoundedOggOpus, BoundedOggVorbis, open_for_tags

    return types.SimpleNamespace(
        File=mutagen.File,
        open_for_tags=open_for_tags,
        AAC=AAC,
        AC3=AC3,
        AIFF=AIFF,
        ASF=ASF,
        ASFTags=ASFTags,
        BoundedMP4=BoundedMP4,
        BoundedOggOpus=BoundedOggOpus,
        BoundedOggVorbis=BoundedOggVorbis,
        DSDIFF=DSDIFF,
        DSF=DSF,
        FLAC=FLAC,
        ID3=ID3,
        MonkeysAudio=MonkeysAudio,
        MP3=MP3,
        MP4=MP4,
        MP4Tags=MP4Tags,
        Musepack=Musepack,
        OggFLAC=OggFLAC,
        OggOpus=OggOpus,
        OggSpeex=OggSpeex,
        OggVorbis=OggVorbis,
        OptimFROG=OptimFROG,
        TAK=TAK,
        TrueAudio=TrueAudio,
        WAVE=WAVE,
        WavPack=WavPack,
    )


#: Extensions mutagen cannot read but ffmpeg can: their facts and tags come from an
#: ffmpeg probe (:func:`_probe`), run by the scan like any tag read.
FFMPEG_EXTENSIONS: frozenset[str] = frozenset({"mka", "webm", "weba", "caf", "w64", "au", "amr"})

#: File extensions (lowercase, no dot) that are scanned; matched case-insensitively.
SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(_CLASS_BY_EXT) | FFMPEG_EXTENSIONS

#: Which symbolic links the library follows: those whose real path stays inside the
#: real root (the default), every one, or none at all.
FollowSymlinks = Literal["inside", "all", "none"]

# codec names as ffmpeg spells them (``ffmpeg -decoders``), except OptimFROG's (none)
_CODEC_BY_CLASS: tuple[tuple[str, str], ...] = (
    ("OggVorbis", "vorbis"),
    ("OggOpus", "opus"),
    ("FLAC", "flac"),
    ("OggFLAC", "flac"),
    ("OggSpeex", "speex"),
    ("WavPack", "wavpack"),
    ("AAC", "aac"),
    ("MonkeysAudio", "ape"),
    ("TrueAudio", "tta"),
    ("OptimFROG", "optimfrog"),
    ("TAK", "tak"),
    ("DSF", "dsd_lsbf_planar"),
)

# ASF codec names (mutagen's) -> ffmpeg's
_WMA_CODECS = {
    "Windows Media Audio Standard": "wmav1",
    "Windows Media Audio 9 Standard": "wmav2",
    "Windows Media Audio 9 Professional": "wmapro",
    "Windows Media Audio 9 Lossless": "wmalossless",
    "Windows Media Audio 9 Voice": "wmavoice",
}
# MP4 sample entry (mutagen's ``codec``) -> ffmpeg's codec name, besides mp4a.40.*
_MP4_CODECS = {"mp4a.69": "mp3", "mp4a.6b": "mp3", "ac-3": "ac3", "ec-3": "eac3"}

# WAVE fmt tag -> codec; PCM variants are refined by bits per sample.
_WAVE_FORMATS = {3: "pcm_f{bits}le", 6: "pcm_alaw", 7: "pcm_mulaw", 0x55: "mp3"}

_FIELDS = ("title", "artist", "album", "track")
# Tag keys per tag flavour, in the order of _FIELDS.
_ID3_KEYS = ("TIT2", "TPE1", "TALB", "TRCK")
_MP4_KEYS = ("\xa9nam", "\xa9ART", "\xa9alb", "trkn")
_VORBIS_KEYS = ("title", "artist", "album", "tracknumber")  # APEv2 uses "track"
_ASF_KEYS = ("Title", "Author", "WM/AlbumTitle", "WM/TrackNumber")

#: Tag values longer than this are cut (a list reply must stay small).
MAX_TAG_CHARS = 1024
#: At most this many candidates travel in an :class:`Ambiguous` error.
MAX_CANDIDATES = 50

# RIFF/AIFF walker bounds: text chunks larger than this are skipped, and at
# most this many chunk headers are read per container.
_MAX_TEXT_CHUNK = 64 * 1024
_MAX_CHUNKS = 1024
_INFO_FIELDS = {
    b"INAM": "title",
    b"IART": "artist",
    b"IPRD": "album",
    b"IPRT": "track",
    b"ITRK": "track",
}
_AIFF_FIELDS = {b"NAME": "title", b"AUTH": "artist"}
_IFF_EXTS = frozenset({"wav", "wave", "aif", "aiff", "aifc"})
_AIFF_EXTS = frozenset({"aif", "aiff", "aifc"})
# AIFF-C compression types -> ffmpeg's codec; NONE and twos are big-endian PCM as in AIFF
_AIFC_CODECS = {
    b"sowt": None,  # little-endian PCM: see _aifc_codec
    b"fl32": "pcm_f32be",
    b"FL32": "pcm_f32be",
    b"fl64": "pcm_f64be",
    b"FL64": "pcm_f64be",
    b"in24": "pcm_s24be",
    b"in32": "pcm_s32be",
    b"alaw": "pcm_alaw",
    b"ALAW": "pcm_alaw",
    b"ulaw": "pcm_mulaw",
    b"ULAW": "pcm_mulaw",
    b"ima4": "adpcm_ima_qt",
}


# --------------------------------------------------------------------------- reading one file


def read_track(root: Path, relpath: str, ffmpeg: str | None = None) -> TrackInfo:
    """Read the facts of ``root/relpath`` (a ``/``-separated path from :func:`scan`).

    Never raises for a file that cannot be parsed: the result then has
    ``error`` set. Raises ``FileNotFoundError`` if the file does not exist.
    The formats of :data:`FFMPEG_EXTENSIONS` are probed with ``ffmpeg`` (``None``:
    ``$MUSICLIB_FFMPEG``, else the one imageio-ffmpeg ships).
    """
    full = os.path.join(root, *relpath.split("/"))
    name = relpath.rsplit("/", 1)[-1]
    ext = _extension(name)
    stem = name[: -len(ext) - 1] if ext else name
    st = os.stat(full)  # FileNotFoundError propagates: the file vanished
    base: dict[str, Any] = {"path": relpath, "title": stem, "format": ext, "size": st.st_size}

    if not stat.S_ISREG(st.st_mode):
        return TrackInfo(**base, error="not a regular file")
    if st.st_size == 0:
        return TrackInfo(**base, error="empty file")

    facts: dict[str, Any] = {}
    error: str | None = None
    try:
        if ext in FFMPEG_EXTENSIONS:
            facts = _probe(full, st.st_size, ffmpeg)
        else:
            audio = _load(full, ext)
            facts = _stream_facts(audio, st.st_size)
            tags = _tag_fields(audio.tags)
            facts.update({k: v for k, v in tags.items() if v is not None})
    except ProbeFailed as exc:
        if not os.path.exists(full):
            raise FileNotFoundError(f"file vanished while reading: {relpath}") from exc
        facts, error = {}, f"not a valid {ext.upper()} file: {exc}"[:200]
    except Exception as exc:  # mutagen raises many kinds on hostile input
        if not os.path.exists(full):
            raise FileNotFoundError(f"file vanished while reading: {relpath}") from exc
        facts, error = {}, _reason(exc, ext, full, relpath)

    if ext in _AIFF_EXTS and isinstance(facts.get("codec"), str):
        facts.update(_aifc_codec(full, facts["codec"]))
    if ext in _IFF_EXTS and not all(facts.get(k) for k in _FIELDS):
        for key, value in _iff_text_fields(full).items():
            facts.setdefault(key, value)
    if isinstance(facts.get("track"), str):
        facts["track"] = _parse_track(facts["track"])
    base.update({k: v for k, v in facts.items() if v is not None})
    return TrackInfo(**base, error=error)


def _extension(name: str) -> str:
    stem, dot, ext = name.rpartition(".")
    return ext.lower() if dot and stem else ""


def _load(path: str, ext: str) -> Any:
    """The mutagen object for ``path``: the extension's class first, then sniffing.

    mutagen reads the file through :func:`musiclib.tags.open_for_tags`, which
    shows it only the tags the index uses and bounds what it may read.
    """
    m = _mutagen()
    errors: list[Exception] = []
    name = _CLASS_BY_EXT.get(ext)
    cls = getattr(m, name) if name is not None else None
    with open(path, "rb") as raw:
        view = m.open_for_tags(raw, path, ext)
        if cls is not None:
            try:
                return cls(view)
            except Exception as exc:  # hostile input raises anything
                errors.append(exc)
        try:
            view.seek(0)
            audio = m.File(view)
        except Exception as exc:
            errors.append(exc)
            audio = None
    if audio is None:  # report the extension's class failure: it is the likelier story
        raise errors[0] if errors else ValueError("unknown audio format")
    return audio


def _reason(exc: BaseException, ext: str, full: str, relpath: str) -> str:
    """A short one-line reason, without the server's absolute paths."""
    # mutagen re-raises an OSError as its own error, with the OSError as context
    cause = exc if isinstance(exc, OSError) else exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return f"cannot read file: {cause.strerror}"
    lines = str(exc).replace(full, relpath).strip().splitlines()
    detail = lines[0] if lines else type(exc).__name__
    return f"not a valid {ext.upper() or 'audio'} file: {detail}"[:200]


def _stream_facts(audio: Any, size: int) -> dict[str, Any]:
    info = audio.info
    duration = getattr(info, "length", None)
    if not isinstance(duration, (int, float)) or not math.isfinite(duration) or duration < 0:
        duration = None
    sample_rate = _positive_int(getattr(info, "sample_rate", None))
    if sample_rate is None and isinstance(audio, _mutagen().OggOpus):
        sample_rate = 48000  # Opus always decodes at 48 kHz; mutagen has no field for it
    bitrate = _positive_int(getattr(info, "bitrate", None))
    if bitrate is None and duration:
        bitrate = int(size * 8 / duration)
    codec = _codec(audio)
    return {
        "duration": float(duration) if duration is not None else None,
        "codec": codec,
        "sample_rate": sample_rate,
        # WavPack reports mono as ``True``; the wire refuses bools, so int() it.
        "channels": _positive_int(getattr(info, "channels", None)),
        "bitrate": bitrate,
        # the stored samples' depth: PCM and lossless codecs only (PROTOCOL.md, "Track
        # map"); a lossy codec has none, whatever its container states (MP4: 16)
        "bits_per_sample": (
            _positive_int(getattr(info, "bits_per_sample", None)) if _lossless(codec) else None
        ),
    }


#: codecs that store samples of a bit depth, besides every ``pcm_*`` and ``dsd_*`` one
_LOSSLESS_CODECS: Final = frozenset(
    {"flac", "alac", "wavpack", "ape", "tta", "tak", "optimfrog", "wmalossless", "dst"}
)


def _lossless(codec: str | None) -> bool:
    return codec is not None and (codec in _LOSSLESS_CODECS or codec.startswith(("pcm_", "dsd_")))


def _positive_int(value: object) -> int | None:
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        return int(value)
    return None


def _codec(audio: Any) -> str | None:
    m = _mutagen()
    info = audio.info
    bits = getattr(info, "bits_per_sample", 0) or 16
    if isinstance(audio, m.MP3):
        layer = getattr(info, "layer", 3)
        return "mp3" if layer == 3 else f"mp{layer}"
    if isinstance(audio, m.MP4):
        codec = str(getattr(info, "codec", "") or "").lower()
        if codec.startswith("mp4a.40"):
            return "aac"
        return _MP4_CODECS.get(codec, codec) or None
    if isinstance(audio, m.ASF):
        return _WMA_CODECS.get(str(getattr(info, "codec_type", "")), "wma")
    if isinstance(audio, m.AC3):
        return "eac3" if getattr(info, "codec", "") == "ec-3" else "ac3"
    if isinstance(audio, m.Musepack):
        return "mpc8" if getattr(info, "version", 7) >= 8 else "mpc7"
    if isinstance(audio, m.DSDIFF):
        return "dst" if getattr(info, "compression", "DSD") == "DST" else "dsd_msbf"
    if isinstance(audio, m.WAVE):
        fmt = getattr(info, "audio_format", 1)
        if fmt in (1, 0xFFFE):  # PCM, WAVE_FORMAT_EXTENSIBLE (almost always PCM)
            return "pcm_u8" if bits == 8 else f"pcm_s{bits}le"
        return _WAVE_FORMATS.get(fmt, "pcm").format(bits=bits)
    if isinstance(audio, m.AIFF):
        return f"pcm_s{bits}be"
    for cls, name in _CODEC_BY_CLASS:
        if isinstance(audio, getattr(m, cls)):
            return name
    return type(audio).__name__.lower()


def _tag_fields(tags: Any) -> dict[str, Any]:
    """title/artist/album/track from any mutagen tag object (``None``: no tags)."""
    if tags is None:
        return {}
    m = _mutagen()
    if isinstance(tags, m.ID3):
        keys: tuple[str, ...] = _ID3_KEYS
    elif isinstance(tags, m.MP4Tags):
        keys = _MP4_KEYS
    elif isinstance(tags, m.ASFTags):
        keys = _ASF_KEYS
    else:
        keys = _VORBIS_KEYS
    out: dict[str, Any] = {}
    for field, key in zip(_FIELDS, keys, strict=True):
        value = tags.get(key)
        if value is None and key == "tracknumber":
            value = tags.get("track")  # APEv2
        out[field] = _first_value(value)
    if isinstance(out["track"], tuple):  # MP4 trkn: (number, total)
        out["track"] = out["track"][0] if out["track"] else None
    if out["track"] is not None:
        out["track"] = _parse_track(out["track"])
    return out


def _first_value(value: Any) -> Any:
    """The first value of a tag: ID3 frames, lists, APEv2 values, plain strings."""
    if value is None:
        return None
    if hasattr(value, "text") and not isinstance(value, str):  # ID3 text frame
        value = value.text
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None or isinstance(value, tuple):
        return value
    if not isinstance(value, str):
        value = str(value)  # APETextValue and friends
    return _clean_text(value)


def _clean_text(value: str) -> str | None:
    value = value.split("\0", 1)[0].strip()
    return value[:MAX_TAG_CHARS] or None


_TRACK_RE = re.compile(r"\s*(\d{1,9})")


def _parse_track(value: object) -> int | None:
    """``3``, ``"3"``, ``"03/10"`` -> 3; anything else (or 0) -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    else:
        match = _TRACK_RE.match(str(value))
        if not match:
            return None
        number = int(match.group(1))
    return number if 0 < number < 2**31 else None


# --------------------------------------------------------------------------- ffmpeg's probe

#: seconds ffmpeg may take to probe one file (it reads a few MiB at most)
PROBE_TIMEOUT = 10.0
#: bytes of ffmpeg's report that are looked at
_PROBE_OUTPUT_MAX = 256 * 1024

_DURATION_RE = re.compile(r"^\s*Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", re.M)
_BITRATE_RE = re.compile(r"^\s*Duration: .*?bitrate: (\d+) kb/s", re.M)
_AUDIO_RE = re.compile(r"^\s*Stream #\d+:\d+.*?: Audio: ([^\n]*)$", re.M)
_METADATA_RE = re.compile(r"^(\s*)([^\s:][^:]*?)\s*: (.*)$")
_LAYOUTS = {"mono": 1, "stereo": 2, "downmix": 2, "quad": 4, "hexagonal": 6, "octagonal": 8}
_PROBE_TAGS = {"title": "title", "artist": "artist", "album": "album", "track": "track"}
# "[matroska @ 0x55d0c0ffee00] ": addresses mean nothing to a client
_LOG_PREFIX = re.compile(r"^\[[^\]]* @ 0x[0-9a-fA-F]+\]\s*")


class ProbeFailed(Exception):
    """ffmpeg could not tell what a file holds; the message says why, in one line."""


@functools.cache
def _default_ffmpeg() -> str:
    """``$MUSICLIB_FFMPEG``, else imageio-ffmpeg's (as :mod:`musiclib.decode` finds it,
    without importing trio into the scan's worker processes)."""
    configured = os.environ.get("MUSICLIB_FFMPEG")
    if configured:
        return shutil.which(configured) or configured
    import imageio_ffmpeg

    exe: str = imageio_ffmpeg.get_ffmpeg_exe()
    return exe


def _probe(full: str, size: int, ffmpeg: str | None) -> dict[str, Any]:
    """Stream facts and tags of a file mutagen cannot read, from ``ffmpeg -i``'s report.

    ffmpeg reads the headers (a few MiB at most), prints what it found and exits;
    it gets :data:`PROBE_TIMEOUT` seconds, its own session (a terminal's Ctrl-C is
    the server's to handle) and no standard input. Raises :class:`ProbeFailed`.
    """
    try:
        exe = ffmpeg or _default_ffmpeg()
    except RuntimeError as exc:  # imageio-ffmpeg found no binary
        raise ProbeFailed(f"no ffmpeg to probe it with ({exc})") from None
    cmd = [exe, "-hide_banner", "-nostdin", "-i", "file:" + full]
    with tempfile.TemporaryFile() as report:
        try:
            process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=report,
                start_new_session=True,
            )
        except OSError as exc:
            raise ProbeFailed(f"cannot run ffmpeg to probe it: {exc.strerror or exc}") from None
        try:
            process.wait(timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise ProbeFailed(f"ffmpeg took over {PROBE_TIMEOUT:g} s to probe it") from None
        report.seek(0)
        text = report.read(_PROBE_OUTPUT_MAX).decode("utf-8", "replace")
    return _parse_probe(text.replace(full, os.path.basename(full)), size)


def _parse_probe(text: str, size: int) -> dict[str, Any]:
    """Facts from ffmpeg's report of one input (``ffmpeg -i FILE``, on standard error)."""
    audio = _AUDIO_RE.search(text)
    if "Input #0" not in text or audio is None:
        lines = [line for line in text.splitlines() if line.strip()]
        if "Input #0" in text:
            raise ProbeFailed("it holds no audio stream")
        last = _LOG_PREFIX.sub("", lines[-1]).strip() if lines else "ffmpeg said nothing"
        raise ProbeFailed(last.removeprefix("Error opening input files: "))
    facts: dict[str, Any] = {}
    found = _DURATION_RE.search(text)
    if found:
        hours, minutes, seconds = found.groups()
        facts["duration"] = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    parts = [part.strip() for part in audio.group(1).split(",")]
    codec = parts[0].split(" ", 1)[0] or None
    facts["codec"] = codec
    for part in parts[1:]:
        if part.endswith(" Hz"):
            facts["sample_rate"] = _positive_int(_number(part[:-3]))
        elif part.endswith(" kb/s"):
            facts["bitrate"] = _positive_int((_number(part[:-5]) or 0) * 1000)
    facts["channels"] = _channels(parts[2] if len(parts) > 2 else "")
    if _lossless(codec) and len(parts) > 3:
        depth = re.match(r"[su](\d+)p?(?: \((\d+) bit\))?$", parts[3])
        if depth:
            facts["bits_per_sample"] = int(depth.group(2) or depth.group(1))
    if "bitrate" not in facts:
        overall = _BITRATE_RE.search(text)
        if overall:
            facts["bitrate"] = _positive_int(int(overall.group(1)) * 1000)
        elif facts.get("duration"):
            facts["bitrate"] = int(size * 8 / facts["duration"])
    facts.update(_probe_tags(text[: audio.end()]))
    return facts


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _channels(layout: str) -> int | None:
    """Channels of an ffmpeg layout: ``stereo``, ``5.1(side)``, ``7.1``, ``3 channels``..."""
    name = layout.split("(", 1)[0].strip()
    if name in _LAYOUTS:
        return _LAYOUTS[name]
    if re.fullmatch(r"\d+\.\d+", name):  # 5.1: five full-range channels and one LFE
        return sum(int(n) for n in name.split("."))
    counted = re.fullmatch(r"(\d+) channels", name)
    return _positive_int(int(counted.group(1))) if counted else None


def _probe_tags(text: str) -> dict[str, Any]:
    """title/artist/album/track from the ``Metadata:`` blocks of the input and of the
    streams up to the first audio one (the input's values first)."""
    out: dict[str, Any] = {}
    in_block = False
    for line in text.splitlines():
        if line.strip() == "Metadata:":
            in_block = True
            continue
        found = _METADATA_RE.match(line) if in_block else None
        if found is None or len(found.group(1)) < 4:
            in_block = False
            continue
        field = _PROBE_TAGS.get(found.group(2).strip().lower())
        if field and field not in out:
            value = _clean_text(found.group(3))
            out[field] = _parse_track(value) if field == "track" else value
    return out


# --------------------------------------------------------------------------- RIFF / AIFF text


def _reader_of(f: BinaryIO) -> Callable[[int, int], bytes]:
    """``read_at(pos, n)``: up to ``n`` bytes of ``f`` from ``pos`` (the chunk walker's view
    of a file)."""

    def read_at(pos: int, n: int) -> bytes:
        f.seek(pos)
        return f.read(n)

    return read_at


def _iff_text_fields(path: str) -> dict[str, str]:
    """Tags from a WAV ``LIST/INFO`` chunk or AIFF ``NAME``/``AUTH`` chunks; ``{}`` if none.

    Reads the 12-byte header, chunk headers and small text chunks only.
    """
    out: dict[str, str] = {}
    try:
        with open(path, "rb", buffering=0) as f:
            read_at = _reader_of(f)
            head = read_at(0, 12)
            if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
                for cid, pos, size in _walk_chunks(read_at, 12, "<"):
                    if cid == b"LIST" and 4 <= size <= _MAX_TEXT_CHUNK:
                        data = read_at(pos, size)
                        if data[:4] == b"INFO":
                            _collect_info(data, out)
            elif head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
                for cid, pos, size in _walk_chunks(read_at, 12, ">"):
                    field = _AIFF_FIELDS.get(cid)
                    if field and size <= _MAX_TEXT_CHUNK and field not in out:
                        value = read_at(pos, size)
                        text = _decode_text(value) if len(value) == size else None
                        if text:
                            out[field] = text
    except OSError as exc:
        log.debug("cannot read RIFF/AIFF chunks of %s: %s", path, exc)
    return out


def _aifc_codec(path: str, codec: str) -> dict[str, Any]:
    """The codec (and depth) of an AIFF-C file from its ``COMM`` chunk's compression
    type (mutagen reads the sample size only, so calls A-law "pcm_s8be"); ``{}`` for
    plain AIFF, uncompressed AIFF-C, or anything odd."""
    try:
        with open(path, "rb", buffering=0) as f:
            read_at = _reader_of(f)
            head = read_at(0, 12)
            if head[:4] != b"FORM" or head[8:12] != b"AIFC":
                return {}
            for cid, pos, size in _walk_chunks(read_at, 12, ">"):
                if cid == b"COMM":
                    kind = read_at(pos + 18, 4) if size >= 22 else b""
                    break
            else:
                return {}
    except OSError:
        return {}
    if kind in (b"", b"NONE", b"twos"):
        return {}
    if kind == b"sowt":
        return {"codec": codec[:-2] + "le"} if codec.endswith("be") else {}
    new = _AIFC_CODECS.get(kind) or kind.decode("latin-1").strip().lower() or None
    facts: dict[str, Any] = {"codec": new}
    if not _lossless(new):
        facts["bits_per_sample"] = None
    elif new and new[-4:-2].isdigit():  # pcm_f32be: the depth is in the name
        facts["bits_per_sample"] = int(new[-4:-2])
    return facts


def _collect_info(data: bytes, out: dict[str, str]) -> None:
    def read_at(pos: int, n: int) -> bytes:
        return data[pos : pos + n]

    for cid, pos, size in _walk_chunks(read_at, 4, "<"):
        field = _INFO_FIELDS.get(cid)
        value = data[pos : pos + size]
        if field and field not in out and len(value) == size:  # a cut-off value is dropped
            text = _decode_text(value)
            if text:
                out[field] = text


def _walk_chunks(
    read_at: Callable[[int, int], bytes], pos: int, order: str
) -> Iterator[tuple[bytes, int, int]]:
    """Yield ``(chunk id, data offset, data size)`` for the IFF chunks from ``pos`` on.

    Chunks are padded to an even size; writers that forget the pad byte are
    tolerated. Stops at the first header that is short or not a printable id.
    """
    odd = False
    for _ in range(_MAX_CHUNKS):
        header = read_at(pos, 9 if odd else 8)
        if odd and header[:1] == b"\0":  # the standard pad byte
            pos, header = pos + 1, header[1:]
        elif odd and not _is_chunk_id(header[:4]) and _is_chunk_id(header[1:5]):
            pos, header = pos + 1, header[1:]  # a non-zero pad byte
        if len(header) < 8 or not _is_chunk_id(header[:4]):
            return
        (size,) = struct.unpack(order + "I", header[4:8])
        yield header[:4], pos + 8, size
        pos += 8 + size
        odd = bool(size & 1)


def _is_chunk_id(cid: bytes) -> bool:
    return len(cid) == 4 and all(0x20 <= b <= 0x7E for b in cid)


def _decode_text(raw: bytes) -> str | None:
    raw = raw.split(b"\0", 1)[0]
    try:
        text = raw.decode("utf-8")  # what ffmpeg writes
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # what the RIFF spec assumes
    return _clean_text(text)


# --------------------------------------------------------------------------- scanning


def _worker_ignores_signals() -> None:
    """Scan workers leave Ctrl-C and SIGTERM to the server, which stops them itself: a
    terminal's Ctrl-C reaches the whole process group, and a worker dying of it would
    break the pool in the middle of an orderly shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def default_workers() -> int:
    """Tag-reading processes for a big scan: one per core, at most four."""
    return max(1, min(4, os.cpu_count() or 1))


def _inside(real: str, real_root: str) -> bool:
    prefix = real_root if real_root.endswith(os.sep) else real_root + os.sep
    return real == real_root or real.startswith(prefix)


def _may_follow(follow: FollowSymlinks, real: str, real_root: str, plain: str = "") -> bool:
    """Whether a path whose real path is ``real`` may be used (``plain``: the path as
    named, under the real root, for ``"none"``; the walk checks links itself)."""
    if follow == "all":
        return True
    if follow == "none" and plain and real != plain:
        return False
    return _inside(real, real_root)


#: characters a listed name may not hold: Unicode's control characters (category Cc)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _surrogates(name: str) -> bool:
    """True for a name that was not valid UTF-8 on disk (``os`` escapes such bytes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def walk(
    root: Path,
    follow: FollowSymlinks = "inside",
    on_folder: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, os.stat_result]]:
    """Yield ``(relative path, stat)`` for every supported file under ``root``.

    Hidden names (leading ``.``), ``*.part`` files, names that are not UTF-8
    (they could not travel in a reply) and names holding a control character
    (U+0000-U+001F, U+007F-U+009F: a newline in a path breaks every
    line-based tool) are skipped; any other character is fine. Symlinks
    are followed as ``follow`` says (by default only when their real path
    stays inside the real root); each real directory is listed once (so a
    loop ends), plain directories before symlinked ones so that files keep
    their canonical path. Unreadable directories are skipped.
    Within a directory, files come in name order, then subdirectories. The
    stat is the target's (symlinks followed), taken before any tag is read.
    ``on_folder`` is called with each directory not reached through a
    symlink just before it is listed: the server's change watcher watches it
    there.
    """
    real_root = os.path.realpath(root)
    visited: set[str] = set()
    plain: list[tuple[str, str]] = [(real_root, "")]  # (directory, relative prefix): a stack
    linked: list[tuple[str, str]] = []  # symlinked directories, walked after the plain ones
    while plain or linked:
        directory, prefix = plain.pop() if plain else linked.pop(0)
        real = os.path.realpath(directory)
        if real in visited or not _may_follow(follow, real, real_root):
            continue
        visited.add(real)
        if on_folder is not None and real == directory:  # not reached through a symlink
            on_folder(directory)
        # listed and stat'ed through a descriptor of the directory: the kernel then looks
        # up one name per stat, not the whole path (0.26 -> 0.21 s for 100 000 files)
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("skipping unreadable directory %s: %s", directory, exc)
            continue
        try:
            try:
                with os.scandir(fd) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                log.debug("skipping unreadable directory %s: %s", directory, exc)
                continue
            subdirs: list[tuple[str, str]] = []
            for entry in entries:
                name = entry.name
                if name.startswith(".") or name.endswith(".part"):
                    continue
                # printable ASCII (most names) needs neither check (0.04-0.08 s of 100 000)
                if not (name.isascii() and name.isprintable()) and (
                    _surrogates(name) or _CONTROL.search(name)
                ):
                    where = os.path.join(directory, name)
                    log.debug("skipping %r: not UTF-8, or a control character", where)
                    continue
                relpath = prefix + name
                try:
                    is_link = entry.is_symlink()
                    if is_link and follow == "none":
                        continue
                    if entry.is_dir():
                        where = os.path.join(directory, name)
                        (linked if is_link else subdirs).append((where, relpath + "/"))
                        continue
                    if not entry.is_file() or _extension(name) not in SUPPORTED_EXTENSIONS:
                        continue
                    if is_link:
                        real_file = os.path.realpath(os.path.join(directory, name))
                        if not _may_follow(follow, real_file, real_root):
                            continue
                    st = entry.stat()
                except OSError as exc:  # vanished or unreadable meanwhile
                    log.debug("skipping %s: %s", os.path.join(directory, name), exc)
                    continue
                yield relpath, st
            plain.extend(reversed(subdirs))
        finally:
            os.close(fd)


def scan(root: Path, follow: FollowSymlinks = "inside") -> Iterator[TrackInfo]:
    """Yield a :class:`TrackInfo` for every file :func:`walk` finds (files that vanish
    meanwhile are skipped)."""
    real_root = Path(os.path.realpath(root))
    for relpath, _ in walk(root, follow):
        try:
            yield read_track(real_root, relpath)
        except OSError as exc:
            log.debug("skipping %s: %s", relpath, exc)


#: One file for a tag-reading worker: relative path, size, mtime (ns), inode.
WorkItem = tuple[str, int, int, int]


def read_rows(root: str, items: Sequence[WorkItem], ffmpeg: str | None = None) -> list[Row]:
    """Index rows for ``items`` (files that vanished are left out).

    A module-level function of plain arguments so that a process pool can run
    it; the size and mtime stored are those the walk saw, so a file changed
    while it is read is read again by the next scan.
    """
    rows = []
    for relpath, size, mtime_ns, inode in items:
        try:
            info = read_track(Path(root), relpath, ffmpeg)
        except OSError as exc:
            log.debug("skipping %s: %s", relpath, exc)
            continue
        if info.size != size:
            info = dataclasses.replace(info, size=size)
        rows.append(row_of(info, mtime_ns, inode))
    return rows


# --------------------------------------------------------------------------- opening


def _split_name(name: str) -> list[str]:
    """Components of a user-supplied relative name; refuses unsafe names with NotFound."""
    if not name or "\0" in name or name.startswith("/"):
        raise NotFound(f"invalid track name {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise NotFound(f"invalid track name {name!r}")
    return parts


def open_confined(root: Path, relpath: str, follow: FollowSymlinks = "inside") -> BinaryIO:
    """Open ``root/relpath`` for binary reading if ``follow`` allows its real path.

    ``relpath`` names a file below the root (``..`` and absolute names are
    refused whatever the mode); by default its real path must be inside the
    real root, ``"all"`` allows any real path (the name still comes from the
    index, which only the scan fills), ``"none"`` allows no symlink on the way.
    A path refused so, a missing file, a name too long and a non-regular file
    (a directory, a FIFO, a socket, a device) all raise :class:`NotFound`.
    Other ``OSError`` (permission denied, too many open files...) propagate:
    :meth:`Library.open_track` says what they mean to a client.
    """
    parts = _split_name(relpath)
    real_root = os.path.realpath(root)
    plain = os.path.join(real_root, *parts)
    real = os.path.realpath(plain)
    if real == real_root or not _may_follow(follow, real, real_root, plain):
        raise NotFound(f"no track {relpath!r}")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(real, flags)  # O_NONBLOCK: opening a FIFO must not hang
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise NotFound(f"no track {relpath!r}") from exc
    except OSError as exc:
        # ELOOP: replaced by a symlink since the check; ENXIO: a socket (or a device
        # with no driver); ENAMETOOLONG: no file can have that name
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.ENODEV, errno.ENAMETOOLONG):
            raise NotFound(f"no track {relpath!r}") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotFound(f"no track {relpath!r}")
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _open_failure(relpath: str, exc: OSError) -> Busy | Unreadable:
    """What an ``OSError`` from opening a track means to a client."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return Busy("the server has too many files open; try again shortly")
    reason = (exc.strerror or type(exc).__name__).lower()
    return Unreadable(f"the server cannot read {relpath!r}: {reason}")


# --------------------------------------------------------------------------- reading many


class _TagReaders:
    """Reads the tags of a list of files that grows while the walk finds them, in order;
    in a pool of processes once :attr:`parallel_min` files are waiting.

    The walk appends each new or changed file to ``todo`` and calls :meth:`feed`;
    once there are enough, the pool starts and is given whole batches, so its
    processes start up (some 0.1-0.2 s each: an interpreter importing mutagen)
    and read the first batches while the walk goes on, not after it. The
    scanning thread then takes the rows with :meth:`rows`, batch by batch in
    ``todo``'s order, keeping at most ``in_flight`` batches per worker submitted.
    If the pool breaks (a worker killed by the OOM killer or a stray signal), the
    files it had not answered for are read in the scanning thread instead: a scan
    finishes whatever happens to its helpers. Leaving the ``with`` block stops
    the pool (waiting for the batches being read, dropping the others).
    """

    def __init__(
        self,
        root: str,
        todo: list[WorkItem],
        *,
        workers: int,
        pool: Literal["process", "thread"],
        ffmpeg: str | None,
        batch: int,
        parallel_min: int,
        in_flight: int,
    ) -> None:
        self.root, self.todo, self.workers, self.pool = root, todo, workers, pool
        self.ffmpeg, self.batch, self.parallel_min = ffmpeg, batch, parallel_min
        self.window = max(1, in_flight * workers)
        self._executor: concurrent.futures.Executor | None = None
        self._broken = False
        #: submitted batches, oldest first: (end in todo, its rows to come)
        self._futures: collections.deque[tuple[int, concurrent.futures.Future[list[Row]]]]
        self._futures = collections.deque()
        self._submitted = 0  # todo[:_submitted] was given to the pool
        self._done = 0  # the rows of todo[:_done] were handed out

    def __enter__(self) -> _TagReaders:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def feed(self, *, final: bool = False) -> None:
        """Start the pool once it pays off, and give it batches while it has room (whole
        ones only, unless the walk is over: ``final``)."""
        if self._executor is None:
            if self._broken or self.workers < 1 or len(self.todo) < self.parallel_min:
                return
            self._executor = self._start()
        while len(self._futures) < self.window:
            end = min(self._submitted + self.batch, len(self.todo))
            if end == self._submitted or (end - self._submitted < self.batch and not final):
                return
            items = self.todo[self._submitted : end]
            future = self._executor.submit(read_rows, self.root, items, self.ffmpeg)
            self._futures.append((end, future))
            self._submitted = end

    def _start(self) -> concurrent.futures.Executor:
        if self.pool == "thread":
            return concurrent.futures.ThreadPoolExecutor(self.workers)
        # spawn: forking a process that runs trio's threads is unsafe
        return concurrent.futures.ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_ignores_signals,
        )

    def rows(self, stop: threading.Event) -> Iterator[list[Row]]:
        """The rows of every file in ``todo`` (the walk is over), batch by batch, in order."""
        self.feed(final=True)
        while self._futures:
            if stop.is_set():
                raise ScanStopped
            end, future = self._futures[0]
            try:
                rows = future.result()
            except concurrent.futures.BrokenExecutor as exc:
                log.warning("tag-reading workers failed (%s); reading in one thread", exc)
                self._broken = True
                self._futures.clear()
                self.__exit__()
                break
            self._futures.popleft()
            self._done = end
            self.feed(final=True)
            yield rows
        while self._done < len(self.todo):  # whatever the pool did not do
            if stop.is_set():
                raise ScanStopped
            items = self.todo[self._done : self._done + self.batch]
            self._done += len(items)
            yield read_rows(self.root, items, self.ffmpeg)


# --------------------------------------------------------------------------- the library


class ScanStopped(Exception):
    """The scan was asked to stop (the server is shutting down); the index keeps
    everything committed so far, and the next scan carries on from there."""


class Library:
    """The tracks under one root directory, indexed in SQLite (:mod:`musiclib.index`).

    Reads (:meth:`search`, :meth:`resolve`, :meth:`listing`) may run in any
    thread while another thread runs :meth:`rescan`; they see every batch the
    scan has committed. ``index=None`` keeps the index in the user's cache
    directory. ``workers`` tag-reading processes help a scan with many files
    to read (``0``: read in the scanning thread); ``pool="thread"`` exists to
    measure threads against processes (BENCHMARKS.md, scenario 6).
    ``follow_symlinks`` says which symbolic links are followed (:data:`FollowSymlinks`),
    when scanning and when opening; ``ffmpeg`` probes the formats mutagen cannot
    read (``None``: ``$MUSICLIB_FFMPEG``, else imageio-ffmpeg's). ``read_only``:
    another process keeps the index (see :class:`~musiclib.index.Index`); this one
    only reads it and must not scan.
    """

    #: a scan reads tags in a pool only when at least this many files changed
    PARALLEL_MIN = 256
    #: files per task sent to a worker
    BATCH = 64
    #: tasks per worker in flight at most: enough that a worker never waits for the
    #: scanning thread (busy committing, or not scheduled on a busy machine), few
    #: enough that a stop is noticed within a few batches
    IN_FLIGHT = 4
    #: the scan commits at least this often (seconds)...
    COMMIT_SECONDS = 0.25
    #: ...or every this many rows, whichever comes first (each commit recounts the
    #: table and rewrites the same index pages: 512 cost 0.4 s more of 100 000)
    COMMIT_ROWS = 4096

    def __init__(
        self,
        root: Path,
        index: Path | None = None,
        *,
        workers: int | None = None,
        pool: Literal["process", "thread"] = "process",
        follow_symlinks: FollowSymlinks = "inside",
        ffmpeg: str | None = None,
        read_only: bool = False,
    ) -> None:
        if follow_symlinks not in ("inside", "all", "none"):
            raise ValueError(
                f"follow_symlinks must be inside, all or none, not {follow_symlinks!r}"
            )
        try:
            resolved = Path(root).resolve(strict=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"library root does not exist: {root}") from None
        if not resolved.is_dir():
            raise NotADirectoryError(f"library root is not a directory: {root}")
        self._root = resolved
        self.index = Index(resolved, index, read_only=read_only)
        self.workers = default_workers() if workers is None else workers
        self.pool = pool
        self.follow_symlinks: FollowSymlinks = follow_symlinks
        self.ffmpeg = ffmpeg
        self.scanning: bool = False
        self._scan_lock = threading.Lock()
        # files found changing (see rescan's settle): path -> (size, mtime_ns) last read
        self._unsettled: dict[str, tuple[int, int]] = {}
        self._too_many_unsettled = False

    @property
    def root(self) -> Path:
        """The resolved library root."""
        return self._root

    @property
    def count(self) -> int:
        """Tracks in the index now (kept up to date by the writer, no query)."""
        return self.index.count

    def close(self) -> None:
        """Close the index. A scan still running in another thread fails at its next write."""
        self.index.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ scanning

    #: at most this many unsettled files are remembered; beyond, the next look is a rescan
    MAX_UNSETTLED = 4096

    def rescan(
        self,
        stop: threading.Event | None = None,
        *,
        settle: float = 0.0,
        on_folder: Callable[[str], None] | None = None,
    ) -> int:
        """Bring the index up to date with the disk (blocking); return the track count.

        Files whose size and mtime match the index are not opened. New and
        changed files are read (in a process pool when there are many) and
        committed in batches, so readers see them as they come; files no
        longer on disk are dropped at the end, so nothing disappears while the
        scan runs. A renamed file keeps its sha256 (same inode, size, mtime).
        ``stop`` ends the scan early with :class:`ScanStopped`.

        A file read now that was modified less than ``settle`` seconds ago (or
        in the future) may still be being written, by a copy in progress: it is
        indexed as found, so it is listed at once, and remembered as
        :attr:`unsettled` until :meth:`recheck` finds it unchanged.
        ``on_folder`` is called with each folder the walk lists (see :func:`walk`).
        """
        stop = stop or threading.Event()
        with self._scan_lock:
            self.scanning = True
            try:
                if stop.is_set():
                    raise ScanStopped
                fresh_after = time.time_ns() - int(settle * 1e9)
                # what the walk finds is taken out; what is left is gone from the disk
                known = self.index.versions()
                found = 0
                todo: list[WorkItem] = []
                with self._readers(todo) as readers:
                    for relpath, st in walk(self._root, self.follow_symlinks, on_folder):
                        found += 1
                        old = known.pop(relpath, None)
                        if old is None or old[0] != st.st_size or old[1] != st.st_mtime_ns:
                            todo.append((relpath, st.st_size, st.st_mtime_ns, st.st_ino))
                            readers.feed()  # the pool reads while the walk goes on
                            if settle > 0 and st.st_mtime_ns > fresh_after:
                                self._remember_unsettled(relpath, st.st_size, st.st_mtime_ns)
                        if found % 4096 == 0 and stop.is_set():
                            raise ScanStopped
                    if stop.is_set():
                        raise ScanStopped
                    gone = list(known)
                    carried = {v[:3]: v[3] for v in known.values() if v[3] is not None}
                    if todo:
                        log.info("reading %d new or changed files of %d", len(todo), found)
                    self._read_into_index(readers, carried, stop)
                if stop.is_set():  # a stopped scan may not have seen every file
                    raise ScanStopped
                if gone:
                    self.index.delete(gone)
                return self.index.count
            finally:
                self.scanning = False

    @property
    def unsettled(self) -> bool:
        """Whether a scan found files still changing, to be looked at again (:meth:`recheck`)."""
        return bool(self._unsettled) or self._too_many_unsettled

    def _remember_unsettled(self, relpath: str, size: int, mtime_ns: int) -> None:
        if relpath in self._unsettled or len(self._unsettled) < self.MAX_UNSETTLED:
            self._unsettled[relpath] = (size, mtime_ns)
        else:
            self._too_many_unsettled = True

    def recheck(self, stop: threading.Event | None = None, *, settle: float = 0.0) -> None:
        """Look again at the :attr:`unsettled` files (blocking), ``settle`` seconds or so
        after the last look: one unchanged since then has settled and is forgotten; one
        that changed is read again and stays unsettled; one that is gone is dropped
        from the index. After too many unsettled files, this is a whole :meth:`rescan`.
        """
        if self._too_many_unsettled:
            self._unsettled.clear()
            self._too_many_unsettled = False
            self.rescan(stop, settle=settle)
            return
        with self._scan_lock:
            real_root = os.path.realpath(self._root)
            items = sorted(self._unsettled.items())
            todo: list[WorkItem] = []
            gone: list[str] = []
            for relpath, seen in items:
                full = os.path.join(real_root, *relpath.split("/"))
                try:
                    st = os.stat(full)
                    if not _may_follow(
                        self.follow_symlinks, os.path.realpath(full), real_root, full
                    ):
                        raise FileNotFoundError(relpath)
                except OSError:
                    gone.append(relpath)
                    del self._unsettled[relpath]
                    continue
                if (st.st_size, st.st_mtime_ns) == seen:
                    del self._unsettled[relpath]  # quiet since the last look: settled
                else:
                    todo.append((relpath, st.st_size, st.st_mtime_ns, st.st_ino))
                    self._unsettled[relpath] = (st.st_size, st.st_mtime_ns)
            if todo:
                log.info("reading %d files again that were still changing", len(todo))
                with self._readers(todo) as readers:
                    self._read_into_index(readers, {}, stop or threading.Event())
            if gone:
                self.index.delete(gone)

    def _read_into_index(
        self, readers: _TagReaders, carried: dict[tuple[int, int, int], str], stop: threading.Event
    ) -> None:
        pending: list[Row] = []
        last = time.monotonic()
        sha_at = TRACK_FIELDS.index("sha256")
        size_at, mtime_at = TRACK_FIELDS.index("size"), len(TRACK_FIELDS)
        for rows in readers.rows(stop):
            for row in rows:
                digest = carried.get((row[size_at], row[mtime_at], row[mtime_at + 1]))
                if digest is not None:  # a renamed file: same inode, size and mtime
                    row = (*row[:sha_at], digest, *row[sha_at + 1 :])
                pending.append(row)
            now = time.monotonic()
            if len(pending) >= self.COMMIT_ROWS or now - last >= self.COMMIT_SECONDS:
                self.index.put(pending)
                pending, last = [], now
        if pending:
            self.index.put(pending)

    def _readers(self, todo: list[WorkItem]) -> _TagReaders:
        """What reads the tags of ``todo`` (and of what the walk adds to it), in a pool
        when it pays off; a context manager that stops the pool."""
        return _TagReaders(
            str(self._root),
            todo,
            workers=self.workers,
            pool=self.pool,
            ffmpeg=self.ffmpeg,
            batch=self.BATCH,
            parallel_min=self.PARALLEL_MIN,
            in_flight=self.IN_FLIGHT,
        )

    # ------------------------------------------------------------------ reading

    def tracks(self) -> list[TrackInfo]:
        """Every track, sorted by path."""
        return self.index.search(ListQuery())

    def search(self, query: str | None = None, **filters: Any) -> list[TrackInfo]:
        """Tracks matching ``query`` and ``filters`` (the fields of :class:`ListQuery`).

        Words must all appear in title, artist, album or path; matching
        ignores case and accents; no query (or a blank one) lists all.
        """
        return self.index.search(ListQuery(query, **filters))

    def listing(self, query: ListQuery, first: int = 512) -> Listing:
        """A :class:`Listing` for a list reply sent in batches (its ``total`` and
        ``first`` tracks read at once, from one snapshot)."""
        return self.index.listing(query, first)

    def resolve(self, name: str) -> TrackInfo:
        """The one track a user means by ``name`` (see :meth:`locate`)."""
        return self.locate(name)[0]

    def locate(self, name: str) -> tuple[TrackInfo, int]:
        """The one track a user means by ``name`` (PROTOCOL.md, "Track names"), and
        the mtime (ns) of the file version its row describes (with its ``size``: what
        its stored ``sha256`` is the digest of, so a stream needs no second query).

        The name is cleaned first (empty and ``.`` components dropped). Then:
        the track whose path is exactly that; else the tracks a ``list`` with
        the name as its query would give (the same words, the same folding):
        one is the answer, several raise :class:`Ambiguous` with the first
        :data:`MAX_CANDIDATES` paths. Absolute names, ``..`` components, NUL,
        names with no word left and names too long for a query raise
        :class:`NotFound`, as does a name matching nothing.
        """
        key = "/".join(_split_name(name))
        exact = self.index.lookup(key)
        if exact is not None:
            return exact
        query = ListQuery(query=key)
        if query.problem():  # more words or characters than any list query may have
            raise NotFound(f"no track has the path {name!r}, and it is too long to search for")
        condition, params = match_condition(query)
        if not params:  # only spaces (or marks) left: that would match every track
            raise NotFound(f"invalid track name {name!r}")
        count, paths = self.index.paths_where(condition, params, MAX_CANDIDATES)
        if count > 1:
            raise Ambiguous(f"{name!r} matches {count} tracks", candidates=paths)
        found = self.index.lookup(paths[0]) if count else None
        if found is None:  # nothing, or deleted in between
            raise NotFound(f"no track matches {name!r}")
        return found

    def stored_sha256(self, track: TrackInfo, st: os.stat_result) -> str | None:
        """The index's sha256 of ``track`` if it is of the version ``st`` describes."""
        return self.index.sha256(track.path, st.st_size, st.st_mtime_ns)

    def store_sha256(self, track: TrackInfo, st: os.stat_result, digest: str) -> None:
        """Remember ``digest`` for the version of ``track`` that ``st`` describes."""
        self.index.set_sha256(track.path, st.st_size, st.st_mtime_ns, digest)

    def open_track(self, track: TrackInfo) -> BinaryIO:
        """Open ``track`` for binary reading, confined to the root (see :func:`open_confined`).

        Every failure is an error a client can be told: :class:`NotFound` (gone,
        outside the root, not a regular file), :class:`Busy` (the server is out
        of file descriptors) or :class:`Unreadable` (permission denied, an I/O
        error...), never an ``OSError``.
        """
        try:
            return open_confined(self._root, track.path, self.follow_symlinks)
        except OSError as exc:
            failure = _open_failure(track.path, exc)
            log.warning("cannot open %s: %s", track.path, exc.strerror or exc)
            raise failure from exc

    def track_path(self, track: TrackInfo) -> tuple[Path, os.stat_result]:
        """The checked real path of ``track`` and its stat, for a program that opens it itself.

        The same checks as :meth:`open_track` apply. ffmpeg opens the file by
        this path a moment later; someone able to write inside the root could
        swap it in between, which is noted in WRITEUP.md.
        """
        with self.open_track(track) as f:
            st = os.fstat(f.fileno())
        parts = _split_name(track.path)
        return Path(os.path.realpath(os.path.join(os.path.realpath(self._root), *parts))), st
