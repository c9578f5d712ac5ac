"""Property tests for :mod:`musiclib.tags`, the bounded tag reader (untrusted bytes).

* **Equivalence**: for generated *valid* files of every trimmed format, what
  :func:`~musiclib.library.read_track` reads through the bounded views equals what
  plain mutagen reads from the whole file, for the fields the index keeps (title,
  artist, album, track) and the stream facts (duration, sample rate, channels).
  The files are built from small untagged base files (0.1 s of silence made once
  by ffmpeg) with hypothesis-generated text, pictures of 0 bytes to a few MiB,
  block orders and ID3 variants (v2.3/v2.4, unsynchronisation, extended header,
  footer, padding, iTunes' plain frame sizes). Where the module documents a loss
  (a whole-tag-unsynchronised v2.3 tag or an ID3 chunk in WAV/AIFF larger than
  ``SMALL_TAG``), the expected tags are none.
* **Robustness**: random bytes, and valid files mutated (bytes flipped, inserted,
  deleted, truncated, size fields set to 0, 2**31, 2**32-1, past the end...,
  mostly in headers) never make ``read_track`` raise (a broken file is listed with
  a one-line ``error``), never read more than ``MAX_READ`` (plus a small margin)
  of the real file, never allocate much more than the file's size, and finish
  within a per-example deadline.

A compressed-frame test checks that zlib inside ID3 frames cannot inflate the memory.

The normal suite runs a few dozen examples per property; ``make fuzz`` (the
``fuzz`` profile) runs 400 per equivalence and 2 000 per robustness property.
"""

from __future__ import annotations

import base64
import io
import os
import re
import struct
import subprocess
import tracemalloc
import zlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mutagen._vorbis import VCommentDict
from mutagen.aiff import AIFF
from mutagen.flac import FLAC, Picture
from mutagen.id3 import APIC, TALB, TIT2, TPE1, TRCK
from mutagen.mp3 import MP3
from mutagen.mp4 import MP4, MP4Cover
from mutagen.oggopus import OggOpus
from mutagen.oggvorbis import OggVorbis
from mutagen.wave import WAVE

from musiclib import library
from musiclib.decode import resolve_ffmpeg
from musiclib.library import read_track
from musiclib.protocol import TrackInfo
from musiclib.tags import MAX_FIELD, MAX_READ, SMALL_TAG

# The loaded profile sets the scale: the suite's default ("musiclib", 300 examples) runs
# 15 examples per equivalence and 40 per robustness property (about 20 s in all);
# `make fuzz` ("fuzz", 40 000) runs 400 and 2 000 (about 3 minutes on two cores).
_SCALE = settings.default.max_examples
EQUIV = max(15, _SCALE // 100)
MUTATE = max(40, _SCALE // 20)
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
equivalence = settings(
    max_examples=EQUIV, deadline=None, suppress_health_check=_SUPPRESS, print_blob=True
)
# a hang is a bug: each robustness example must finish well within this (tracemalloc on)
robustness = settings(
    max_examples=MUTATE,
    deadline=timedelta(seconds=5),
    suppress_health_check=_SUPPRESS,
    print_blob=True,
)

EXTS = ("mp3", "flac", "ogg", "opus", "m4a", "wav", "aiff")
PLAIN: dict[str, Callable[[str], Any]] = {
    "mp3": MP3,
    "flac": FLAC,
    "ogg": OggVorbis,
    "opus": OggOpus,
    "m4a": MP4,
    "wav": WAVE,
    "aiff": AIFF,
}
MiB = 1024 * 1024


class Blob(bytes):
    """Bytes that hypothesis reports by what they were made of, not byte by byte."""

    note = ""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes: {self.note}>"


def blob(data: bytes, note: str) -> Blob:
    out = Blob(data)
    out.note = note
    return out


class Files(dict[str, bytes]):
    def __repr__(self) -> str:
        return f"<files {sorted(self)}>"


# --------------------------------------------------------------------------- base files


def _encode(out: Path) -> bytes:
    rate = 48000 if out.suffix == ".opus" else 44100
    codec = {".ogg": ["-c:a", "libvorbis"], ".m4a": ["-c:a", "aac"]}.get(out.suffix, [])
    cmd = [
        resolve_ffmpeg(None), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"anullsrc=r={rate}:cl=stereo", "-t", "0.1",
        "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:a", "+bitexact", *codec,
        str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return out.read_bytes()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """0.1 s of stereo silence in each container, untagged."""
    folder = tmp_path_factory.mktemp("base")
    files = Files({ext: _encode(folder / f"base.{ext}") for ext in EXTS})
    if files["mp3"][:3] == b"ID3":  # keep the MPEG frames only
        files["mp3"] = files["mp3"][10 + _syncsafe(files["mp3"][6:10]) :]
    return files


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder the examples write their file into (hypothesis shares no tmp_path)."""
    return tmp_path_factory.mktemp("examples")


# --------------------------------------------------------------------------- checking


def _syncsafe(raw: bytes) -> int:
    return (raw[0] << 21) | (raw[1] << 14) | (raw[2] << 7) | raw[3]


def _to_syncsafe(n: int) -> bytes:
    return bytes(((n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F))


def assert_equivalent(path: Path, *, tags_dropped: bool = False) -> TrackInfo:
    """read_track (bounded) agrees with plain mutagen reading the whole file."""
    ext = path.suffix[1:]
    info = read_track(path.parent, path.name)
    try:
        plain = PLAIN[ext](str(path))
    except Exception as exc:  # a generated file can be broken (an extended header flag
        # with no header and no frame after it): then both readers must say so
        assert info.error is not None, f"mutagen failed ({exc!r}), the bounded read did not"
        return info
    assert info.error is None, info.error
    want = {} if tags_dropped else library._tag_fields(plain.tags)
    facts = library._stream_facts(plain, path.stat().st_size)
    assert (info.title, info.artist, info.album, info.track) == (
        want.get("title") or path.stem,
        want.get("artist"),
        want.get("album"),
        want.get("track"),
    )
    assert (info.duration, info.sample_rate, info.channels) == (
        facts["duration"],
        facts["sample_rate"],
        facts["channels"],
    )
    return info


class _Counting(io.RawIOBase):
    """A real file whose reads are counted (in ``total``)."""

    def __init__(self, raw: Any, totals: list[int]) -> None:
        self._raw = raw
        self._totals = totals
        self._i = len(totals)
        totals.append(0)

    def read(self, n: int | None = -1) -> bytes:
        data: bytes = self._raw.read(n)
        self._totals[self._i] += len(data)
        return data

    def readinto(self, b: Any) -> int:
        n: int = self._raw.readinto(b)
        self._totals[self._i] += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pos: int = self._raw.seek(offset, whence)
        return pos

    def tell(self) -> int:
        pos: int = self._raw.tell()
        return pos

    def fileno(self) -> int:
        fd: int = self._raw.fileno()
        return fd

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()
        super().close()


#: bytes the bounded reader may read beyond MAX_READ (its own walkers' headers)
READ_MARGIN = 1 * MiB
#: what reading one file may allocate: a little more than the file, never what a size
#: field claims (mutagen keeps a Python object per ID3 frame / MP4 atom: a few hundred
#: bytes for ten of the file's)
ALLOC_BASE = 4 * MiB
ALLOC_PER_BYTE = 16


def assert_robust(folder: Path, name: str, data: bytes) -> TrackInfo:
    path = folder / name
    path.write_bytes(data)
    totals: list[int] = []
    real_open = open

    def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        assert mode == "rb", mode
        return _Counting(real_open(file, mode, *args, **kwargs), totals)

    tracemalloc.start()
    try:
        with mock.patch.object(library, "open", counting_open, create=True):
            info = read_track(folder, name)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(info, TrackInfo)
    assert info.size == len(data) and info.path == name
    if info.error is not None:
        assert info.error and "\n" not in info.error and len(info.error) <= 200, info.error
    # the first open is mutagen's (through BudgetFile); a second is the RIFF/AIFF text walker
    assert all(n <= MAX_READ + READ_MARGIN for n in totals), f"read {totals} bytes"
    limit = ALLOC_BASE + ALLOC_PER_BYTE * len(data)
    assert peak <= limit, f"allocated {peak / MiB:.1f} MiB reading a {len(data)} byte file"
    return info


# --------------------------------------------------------------------------- strategies

texts = st.text(max_size=300)
# mostly short, sometimes long, values; a field longer than MAX_FIELD bytes is skipped
# by design, so none here is
maybe_text = st.none() | texts
track_numbers = st.none() | st.integers(0, 2**31 + 5)
picture_sizes = st.one_of(
    st.integers(0, 2048),
    st.sampled_from([SMALL_TAG - 64, SMALL_TAG + 1, 3 * MiB]),
)


@st.composite
def fields(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "title": draw(maybe_text),
        "artist": draw(maybe_text),
        "album": draw(maybe_text),
        "track": draw(track_numbers),
        "total": draw(st.none() | st.integers(0, 999)),
    }


def picture_bytes(n: int) -> bytes:
    """``n`` bytes of a picture, with 0xFF bytes (so that unsynchronisation has work)."""
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def track_text(f: dict[str, Any]) -> str | None:
    if f["track"] is None:
        return None
    return f"{f['track']}/{f['total']}" if f["total"] is not None else str(f["track"])


# --------------------------------------------------------------------------- ID3v2 in mp3


def _unsync(data: bytes) -> bytes:
    return re.sub(rb"\xff(?=[\x00\xe0-\xff]|\Z)", b"\xff\x00", data)


def _id3_text(text: str, major: int) -> bytes:
    return b"\x03" + text.encode("utf-8") if major == 4 else b"\x01" + text.encode("utf-16")


@st.composite
def id3_tags(draw: st.DrawFn) -> tuple[Blob, bool]:
    """An ID3v2.3/2.4 tag built byte by byte; and whether the bounded reader drops it
    by design (v2.3, unsynchronised as a whole, larger than SMALL_TAG)."""
    major = draw(st.sampled_from([3, 4]))
    f = draw(fields())
    payloads: list[tuple[bytes, bytes]] = []
    for fid, key in ((b"TIT2", "title"), (b"TPE1", "artist"), (b"TALB", "album")):
        if f[key] is not None:
            payloads.append((fid, _id3_text(f[key], major)))
    if (track := track_text(f)) is not None:
        payloads.append((b"TRCK", _id3_text(track, major)))
    for size in draw(st.lists(picture_sizes, max_size=3)):
        head = b"\x00image/png\x00\x03" + draw(st.sampled_from([b"\x00", b"cover\x00"]))
        payloads.append((b"APIC", head + picture_bytes(size)))
    if draw(st.booleans()):
        payloads.append((b"TXXX", b"\x00note\x00" + b"x" * draw(st.integers(0, 300))))
    payloads = draw(st.permutations(payloads))
    unsync = draw(st.sampled_from(["none", "tag", "frames"] if major == 4 else ["none", "tag"]))
    plain_sizes = major == 4 and draw(st.booleans())  # old iTunes: plain ints in v2.4
    frames = []
    for fid, data in payloads:
        flags = 0
        if unsync != "none" and major == 4:
            data, flags = _unsync(data), 0x0002
        n = len(data)
        size = n.to_bytes(4, "big") if major == 3 or plain_sizes else _to_syncsafe(n)
        frames.append(fid + size + flags.to_bytes(2, "big") + data)
    body = b"".join(frames)
    flags = 0
    if unsync == "tag":
        flags |= 0x80
        if major == 3:
            body = _unsync(body)
    extended = draw(st.sampled_from(["none", "header", "flag only"]))
    if extended != "none":
        flags |= 0x40
    if extended == "header":
        ext = (
            b"\x00\x00\x00\x06\x00\x00\x00\x00\x00\x00"
            if major == 3
            else b"\x00\x00\x00\x06\x01\x00"
        )
        body = ext + body
    footer = major == 4 and draw(st.booleans())
    if footer:
        flags |= 0x10
    else:
        body += bytes(draw(st.sampled_from([0, 1, 10, 1024, 4000])))
    head = bytes((major, 0, flags)) + _to_syncsafe(len(body))
    tag = b"ID3" + head + body + (b"3DI" + head if footer else b"")
    dropped = major == 3 and unsync == "tag" and len(body) > SMALL_TAG
    note = (
        f"v2.{major} {[(fid.decode(), len(d)) for fid, d in payloads]} {f} unsync={unsync} "
        f"plain_sizes={plain_sizes} extended={extended} footer={footer}"
    )
    return blob(tag, note), dropped


@equivalence
@given(tag=id3_tags())
def test_mp3_id3v2_tags_read_bounded_equal_mutagen(
    base: dict[str, bytes], work: Path, tag: tuple[bytes, bool]
) -> None:
    data, dropped = tag
    path = work / "song.mp3"
    path.write_bytes(data + base["mp3"])
    assert_equivalent(path, tags_dropped=dropped)


# --------------------------------------------------------------------------- FLAC


def _flac_blocks(data: bytes) -> tuple[bytes, bytes]:
    """STREAMINFO's data and the audio frames of a FLAC file."""
    assert data[:4] == b"fLaC"
    pos, streaminfo = 4, b""
    while True:
        code, n = data[pos] & 0x7F, int.from_bytes(data[pos + 1 : pos + 4], "big")
        if code == 0:
            streaminfo = data[pos + 4 : pos + 4 + n]
        pos += 4 + n
        if data[pos - 4 - n] & 0x80:
            return streaminfo, data[pos:]


def vorbis_comments(draw: st.DrawFn, f: dict[str, Any]) -> list[tuple[str, str]]:
    """The comments of ``f`` (keys in any case, "track" or "tracknumber"), filler and
    METADATA_BLOCK_PICTURE comments, in any order."""
    out: list[tuple[str, str]] = []
    for key in ("title", "artist", "album"):
        if f[key] is not None:
            out.append((draw(st.sampled_from([key, key.upper(), key.title()])), f[key]))
    if (track := track_text(f)) is not None:
        out.append((draw(st.sampled_from(["tracknumber", "TRACKNUMBER"])), track))
    for size in draw(st.lists(picture_sizes, max_size=2)):
        picture = Picture()
        picture.data = picture_bytes(size * 3 // 4)
        out.append(("METADATA_BLOCK_PICTURE", base64.b64encode(picture.write()).decode()))
    for n in draw(st.lists(st.integers(0, 2000), max_size=3)):
        out.append(("COMMENT", "c" * n))
    return list(draw(st.permutations(out)))


@st.composite
def flac_files(draw: st.DrawFn, base: bytes) -> Blob:
    streaminfo, audio = _flac_blocks(base)
    blocks: list[tuple[int, bytes]] = []
    comments = VCommentDict()  # type: ignore[no-untyped-call]
    comments.vendor = draw(st.sampled_from(["", "reference libFLAC 1.4.3 20230623"]))
    comments.extend(vorbis_comments(draw, draw(fields())))
    if draw(st.integers(0, 4)):  # mostly one comment block; sometimes none
        blocks.append((4, comments.write(framing=False)))  # type: ignore[no-untyped-call]
    for size in draw(st.lists(picture_sizes, max_size=3)):
        picture = Picture()
        picture.data = picture_bytes(size)
        blocks.append((6, picture.write()))
    for size in draw(st.lists(st.sampled_from([0, 1, 100, 8192, SMALL_TAG + 3]), max_size=2)):
        blocks.append((1, bytes(size)))
    if draw(st.booleans()):
        blocks.append((2, b"musl" + draw(st.binary(max_size=64))))  # APPLICATION
    blocks = [(0, streaminfo), *draw(st.permutations(blocks))]
    out = [b"fLaC"]
    for i, (code, payload) in enumerate(blocks):
        last = 0x80 if i == len(blocks) - 1 else 0
        out.append(bytes((code | last,)) + len(payload).to_bytes(3, "big") + payload)
    note = f"{[(code, len(p)) for code, p in blocks]} {list(comments)[:8]}"
    return blob(b"".join(out) + audio, note)


@equivalence
@given(data=st.data())
def test_flac_blocks_read_bounded_equal_mutagen(
    base: dict[str, bytes], work: Path, data: st.DataObject
) -> None:
    path = work / "song.flac"
    path.write_bytes(data.draw(flac_files(base["flac"])))
    assert_equivalent(path)


# --------------------------------------------------------------------------- Ogg Vorbis / Opus


@pytest.mark.parametrize("ext", ["ogg", "opus"])
@equivalence
@given(data=st.data())
def test_ogg_comment_packets_read_bounded_equal_mutagen(
    base: dict[str, bytes], work: Path, ext: str, data: st.DataObject
) -> None:
    path = work / f"song.{ext}"
    path.write_bytes(base[ext])
    ogg = PLAIN[ext](str(path))
    ogg.tags.clear()
    ogg.tags.extend(vorbis_comments(data.draw, data.draw(fields())))
    ogg.save()
    assert_equivalent(path)


# --------------------------------------------------------------------------- MP4


@equivalence
@given(f=fields(), covers=st.lists(picture_sizes, max_size=3), data=st.data())
def test_mp4_ilst_items_read_bounded_equal_mutagen(
    base: dict[str, bytes], work: Path, f: dict[str, Any], covers: list[int], data: st.DataObject
) -> None:
    path = work / "song.m4a"
    path.write_bytes(base["m4a"])
    mp4 = MP4(str(path))
    items: list[tuple[str, Any]] = [
        (key, [f[field]])
        for key, field in (("\xa9nam", "title"), ("\xa9ART", "artist"), ("\xa9alb", "album"))
        if f[field] is not None
    ]
    if f["track"] is not None:
        items.append(("trkn", [(f["track"] % 65536, (f["total"] or 0) % 65536)]))
    if covers:
        items.append(("covr", [MP4Cover(picture_bytes(n)) for n in covers]))
    if data.draw(st.booleans()):
        items.append(("\xa9cmt", ["x" * data.draw(st.integers(0, 5000))]))
    for key, value in data.draw(st.permutations(items)):
        mp4[key] = value
    mp4.save()
    assert_equivalent(path)


# --------------------------------------------------------------------------- WAV / AIFF


def _id3_chunk_size(data: bytes, order: str) -> int:
    for cid in (b"id3 ", b"ID3 "):
        at = data.find(cid, 12)
        if at >= 0:
            return int.from_bytes(data[at + 4 : at + 8], "little" if order == "<" else "big")
    return 0


@pytest.mark.parametrize("ext", ["wav", "aiff"])
@equivalence
@given(f=fields(), pictures=st.lists(picture_sizes, max_size=2), major=st.sampled_from([3, 4]))
def test_iff_id3_chunks_read_bounded_equal_mutagen(
    base: dict[str, bytes],
    work: Path,
    ext: str,
    f: dict[str, Any],
    pictures: list[int],
    major: int,
) -> None:
    path = work / f"song.{ext}"
    path.write_bytes(base[ext])
    iff = PLAIN[ext](str(path))
    iff.add_tags()
    for cls, key in ((TIT2, "title"), (TPE1, "artist"), (TALB, "album")):
        if f[key] is not None:
            iff.tags.add(cls(encoding=3, text=[f[key]]))
    if (track := track_text(f)) is not None:
        iff.tags.add(TRCK(encoding=3, text=[track]))
    for i, size in enumerate(pictures):
        iff.tags.add(
            APIC(encoding=0, mime="image/png", type=3, desc=str(i), data=picture_bytes(size))
        )
    iff.save(v2_version=major)
    data = path.read_bytes()
    dropped = _id3_chunk_size(data, "<" if ext == "wav" else ">") > SMALL_TAG
    assert_equivalent(path, tags_dropped=dropped)


# --------------------------------------------------------------------------- robustness

SPECIAL_SIZES = (0, 1, 6, 7, 8, 9, 0x7F, 0x80, 0xFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF)
MARKERS = (
    b"ID3", b"3DI", b"TIT2", b"TPE1", b"TALB", b"TRCK", b"APIC", b"TXXX",
    b"fLaC", b"OggS", b"\x01vorbis", b"\x03vorbis", b"\x05vorbis", b"OpusHead", b"OpusTags",
    b"title=", b"TITLE=", b"METADATA_BLOCK_PICTURE=",
    b"ftyp", b"moov", b"trak", b"mdia", b"mdhd", b"stsd", b"udta", b"meta", b"hdlr", b"ilst",
    b"\xa9nam", b"\xa9ART", b"trkn", b"covr", b"data", b"mdat", b"free",
    b"RIFF", b"WAVE", b"fmt ", b"data", b"id3 ", b"ID3 ", b"FORM", b"COMM", b"SSND",
    b"\xff\xfb", b"Xing", b"Info",
)  # fmt: skip


def interesting_offsets(data: bytes) -> list[int]:
    """Offsets in and around the headers of ``data``'s structures."""
    found: set[int] = set()
    for marker in MARKERS:
        at = data.find(marker)
        for _ in range(8):
            if at < 0:
                break
            found.update(range(max(0, at - 8), min(len(data), at + 32)))
            at = data.find(marker, at + 1)
    if data[:4] == b"fLaC":  # every block header
        pos = 4
        for _ in range(32):
            if pos + 4 > len(data):
                break
            found.update(range(pos, pos + 4))
            pos += 4 + int.from_bytes(data[pos + 1 : pos + 4], "big")
    found.update(range(min(len(data), 64)))
    return sorted(found)


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> Blob:
    """``data`` with one to four changes, mostly in headers."""
    spots = interesting_offsets(data)
    out = bytearray(data)
    done: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        if spots and draw(st.integers(0, 3)):
            pos = min(draw(st.sampled_from(spots)), len(out) - 1)
        else:
            pos = draw(st.integers(0, len(out) - 1))
        op = draw(st.sampled_from(["size", "size", "flip", "byte", "insert", "delete", "truncate"]))
        if op == "size":  # a 32-bit size field set to something hostile
            value = draw(
                st.sampled_from(SPECIAL_SIZES)
                | st.integers(0, 2**32 - 1)
                | st.integers(len(out) - pos - 16, len(out) - pos + 16).map(lambda v: v % 2**32)
            )
            how = draw(st.sampled_from(["big", "little", "syncsafe", "big24"]))
            if how == "syncsafe":
                raw = _to_syncsafe(value % 2**28)
            elif how == "big24":
                raw = (value % 2**24).to_bytes(3, "big")
            else:
                raw = value.to_bytes(4, how)  # type: ignore[arg-type]
            out[pos : pos + len(raw)] = raw
            done.append(f"{pos}: {raw.hex()}")
        elif op == "flip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
            done.append(f"{pos}: ^ -> {out[pos]:02x}")
        elif op == "byte":
            out[pos] = draw(st.sampled_from([0, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
            done.append(f"{pos}: = {out[pos]:02x}")
        elif op == "insert":
            out[pos:pos] = inserted = draw(st.binary(min_size=1, max_size=16))
            done.append(f"{pos}: + {inserted.hex()}")
        elif op == "delete":
            n = draw(st.integers(1, 64))
            del out[pos : pos + n]
            done.append(f"{pos}: - {n}")
        else:
            del out[pos:]
            done.append(f"{pos}: cut")
    return blob(bytes(out), f"{len(data)} bytes changed at {'; '.join(done)}")


@pytest.fixture(scope="module")
def valid(base: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Valid tagged files to mutate: each format small, and with a tag past SMALL_TAG."""
    folder = tmp_path_factory.mktemp("valid")
    out = Files()
    for ext in EXTS:
        for big in (False, True):
            path = folder / f"song.{ext}"
            path.write_bytes(base[ext])
            picture = picture_bytes(SMALL_TAG + 1000 if big else 3000)
            audio = PLAIN[ext](str(path))
            if ext in ("mp3", "wav", "aiff"):
                if audio.tags is None:
                    audio.add_tags()
                audio.tags.add(TIT2(encoding=3, text=["A Title"]))
                audio.tags.add(TPE1(encoding=3, text=["An Artist"]))
                audio.tags.add(APIC(encoding=0, mime="image/png", type=3, desc="", data=picture))
                audio.tags.add(TRCK(encoding=3, text=["3/9"]))
            elif ext == "m4a":
                audio["\xa9nam"] = ["A Title"]
                audio["covr"] = [MP4Cover(picture)]
                audio["trkn"] = [(3, 9)]
            else:
                audio["title"] = ["A Title"]
                p = Picture()
                p.data = picture
                if ext == "flac":
                    audio.add_picture(p)
                else:
                    audio["metadata_block_picture"] = [base64.b64encode(p.write()).decode()]
                audio["tracknumber"] = ["3"]
            audio.save()
            out[f"{ext}-{'big' if big else 'small'}"] = path.read_bytes()
    return out


KINDS = sorted(f"{ext}-{size}" for ext in EXTS for size in ("small", "big"))


@robustness
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_mutated_files_are_listed_not_raised(
    valid: dict[str, bytes], work: Path, kind: str, data: st.DataObject
) -> None:
    original = valid[kind]
    mutated = data.draw(mutations(original), label="mutated")
    ext = kind.split("-")[0]
    assert_robust(work, f"m.{ext}", mutated)


PREFIXES = (
    b"",
    b"ID3\x04\x00\x00",
    b"ID3\x03\x00\x40",
    b"fLaC",
    b"OggS\x00\x02",
    b"RIFF\xff\xff\xff\xffWAVE",
    b"FORM\x00\x00\x10\x00AIFF",
    b"\x00\x00\x00\x18ftypM4A ",
)


@robustness
@given(
    prefix=st.sampled_from(PREFIXES),
    body=st.binary(max_size=4096),
    ext=st.sampled_from([*EXTS, "wv", "aac", "oga", "mp4", "aif", "xyz"]),
)
def test_random_bytes_are_listed_not_raised(
    work: Path, prefix: bytes, body: bytes, ext: str
) -> None:
    assert_robust(work, f"r.{ext}", prefix + body)


@robustness
@given(
    ext=st.sampled_from(["mp3", "flac", "ogg", "opus", "m4a", "wav", "aiff"]),
    tag=id3_tags(),
    data=st.data(),
)
def test_mutated_id3_tags_are_listed_not_raised(
    base: dict[str, bytes], work: Path, ext: str, tag: tuple[bytes, bool], data: st.DataObject
) -> None:
    """Generated ID3 tags (all the variants above), mutated, in front of any format."""
    mutated = data.draw(mutations(tag[0] + base["mp3"]), label="mutated")
    assert_robust(work, f"i.{ext}", mutated)


# --------------------------------------------------------------------------- compressed frames


@pytest.mark.parametrize("ext", ["mp3", "ogg", "wav"])
def test_a_compressed_id3_frame_cannot_inflate_the_memory(
    base: dict[str, bytes], work: Path, ext: str
) -> None:
    """ID3v2.3/2.4 frames may be zlib-compressed, and mutagen inflated every one it
    parsed: this 80 KB tag (a 16 MiB title, 200 comments of 64 KiB) took 48 MB to read,
    a 1 MiB tag of such frames gigabytes. Inflating is now bounded per file: the tag
    in front of an mp3, the same bytes in a file named .ogg that mutagen sniffs, and
    in an ID3 chunk of a WAV file."""
    big = zlib.compress(b"\x03" + b"a" * (16 * MiB), 9)
    frames = [(b"TIT2", big)] + [
        (b"TXXX", zlib.compress(b"\x03%d\x00" % i + b"a" * MAX_FIELD, 9)) for i in range(200)
    ]

    def frame(fid: bytes, packed: bytes) -> bytes:
        data = _to_syncsafe(16 * MiB) + packed  # the data length indicator, then zlib
        return fid + _to_syncsafe(len(data)) + b"\x00\x09" + data  # compressed, length

    body = b"".join(frame(fid, packed) for fid, packed in frames)
    tag = b"ID3\x04\x00\x00" + _to_syncsafe(len(body)) + body
    assert len(tag) < SMALL_TAG  # given to mutagen as it is
    if ext == "wav":
        path = work / "bomb.wav"
        path.write_bytes(base["wav"])
        wave = WAVE(str(path))
        wave.add_tags()
        wave.save()
        data = path.read_bytes()
        at = data.index(b"id3 ")
        data = data[:at] + b"id3 " + len(tag).to_bytes(4, "little") + tag
        data = data[:4] + (len(data) - 8).to_bytes(4, "little") + data[8:]
    else:
        data = tag + base["mp3"]
    info = assert_robust(work, f"bomb.{ext}", data)
    assert info.duration is not None and info.error is None


def test_a_file_of_tiny_mp4_atoms_cannot_inflate_the_memory(work: Path) -> None:
    """mutagen keeps an object per MP4 atom header it reads: 100 000 empty atoms
    (800 KB) took 21 MB to read, and the 2 million of a 16 MiB file would take
    400 MB. A file is read at most MAX_READS times: here 60 000 atoms are one too
    many, and the file is listed with an error."""
    inner = b"".join(struct.pack(">I4s", 8, b"free") for _ in range(60_000))
    moov = struct.pack(">I4s", 8 + len(inner), b"moov") + inner
    data = struct.pack(">I4s4sI", 16, b"ftyp", b"M4A ", 0) + moov
    info = assert_robust(work, "atoms.m4a", data)
    assert info.error is not None and "reads" in info.error
    # sniffed by mutagen.File (the error told is the .ogg reader's)
    assert assert_robust(work, "atoms.ogg", data).error is not None
