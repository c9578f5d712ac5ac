"""Tag reading in bounded memory, whatever a file holds.

mutagen reads whole structures: an ID3v2 tag (up to 256 MiB), every FLAC
metadata block (a PICTURE by its own length field, up to 4 GiB), an Ogg
stream's whole comment packet, every item of an MP4 ``ilst``. A 200 MB cover
picture in one tag was read whole, during a scan. The index keeps no
pictures and cuts every text at ``MAX_TAG_CHARS``, so mutagen is shown only
what the index uses:

* **ID3v2** (mp3, mp2, tta): a tag larger than :data:`SMALL_TAG` is walked frame
  header by frame header, seeking over the frames, and mutagen reads a copy
  holding only the title, artist, album and track frames (each at most
  :data:`MAX_FIELD` bytes) in its place. A v2.2/v2.3 tag unsynchronised as a
  whole cannot be walked that way; it is dropped (the file keeps its name as
  title).
* **FLAC**: mutagen sees the STREAMINFO and the first Vorbis comment block
  only; pictures, padding and the other blocks are seeked over, and a
  comment block larger than :data:`SMALL_TAG` is rebuilt from the comments
  the index uses.
* **Ogg Vorbis and Opus**: the comment packet is followed from page header to
  page header and only the comments the index uses, each at most
  :data:`MAX_FIELD` bytes, are read; ``METADATA_BLOCK_PICTURE`` and anything
  else long are seeked over.
* **MP4**: only the ``©nam``, ``©ART``, ``©alb`` and ``trkn`` items of
  ``ilst`` are read, never ``covr``.
* **WAV and AIFF**: an ID3 chunk larger than :data:`SMALL_TAG` is hidden from
  mutagen (its tags are lost; the RIFF ``INFO`` and AIFF ``NAME`` chunks
  still give a title), so the stream facts are still read.
* **A budget under all of it**: mutagen reads a file through a
  :class:`BudgetFile`, which refuses to read more than :data:`MAX_READ` bytes
  of one file in all, or to read more than :data:`MAX_READS` times (a file of
  a million tiny MP4 atoms). A format not trimmed above (an Ogg FLAC or Speex
  comment, an APEv2 tag of WavPack, Monkey's Audio or Musepack, an ASF
  header, the ID3 tag of DSF and DSDIFF...) that would need more fails with
  :class:`TagsTooLarge`, and the file is listed with that error.

* **Compressed ID3 frames** (v2.3/v2.4 allow zlib per frame) are inflated by
  mutagen whatever the tag's size: a 1 MiB tag of them could inflate to
  gigabytes. mutagen's ID3 frame parser is given a ``zlib`` whose
  ``decompress`` inflates at most :data:`MAX_INFLATE` bytes per file read
  through :func:`open_for_tags` (:data:`MAX_FIELD` per frame outside of it); a
  frame past that is junk to mutagen, which drops it.

The views are :class:`SplicedFile` objects: byte strings and ranges of the
real file, read-only, which mutagen takes for the file itself.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO, Final, Literal, Protocol

import mutagen.id3._frames
from mutagen._vorbis import VCommentDict
from mutagen.mp4 import MP4, MP4Tags
from mutagen.oggopus import OggOpus
from mutagen.oggvorbis import OggVorbis

__all__ = [
    "MAX_FIELD",
    "MAX_INFLATE",
    "MAX_READ",
    "MAX_READS",
    "SMALL_TAG",
    "BoundedMP4",
    "BoundedOggOpus",
    "BoundedOggVorbis",
    "BudgetFile",
    "SplicedFile",
    "TagsTooLarge",
    "open_for_tags",
]

#: bytes mutagen may read of one file in all
MAX_READ: Final = 16 * 1024 * 1024
#: reads mutagen may make of one file in all: mutagen keeps an object per MP4 atom it
#: reads a header of (some 200 bytes for 8 of the file's), so a file of tiny atoms
#: cost 26 times its size
MAX_READS: Final = 50_000
#: a tag structure up to this size is given to mutagen as it is
SMALL_TAG: Final = 1024 * 1024
#: a wanted field longer than this is skipped (the index keeps 1024 characters)
MAX_FIELD: Final = 64 * 1024
#: bytes compressed ID3 frames may inflate to, in all, while one file is read
MAX_INFLATE: Final = 256 * 1024
#: at most this many Vorbis comments are looked at, and this many FLAC blocks / ID3 frames
_MAX_ITEMS: Final = 10_000

_ID3_WANTED: Final = frozenset({b"TIT2", b"TPE1", b"TALB", b"TRCK"})
_ID3_22_WANTED: Final = frozenset({b"TT2", b"TP1", b"TAL", b"TRK"})
_VORBIS_WANTED: Final = frozenset({"title", "artist", "album", "tracknumber", "track"})
_MP4_WANTED: Final = frozenset({b"\xa9nam", b"\xa9ART", b"\xa9alb", b"trkn"})
_FRAME_ID = re.compile(rb"[A-Z0-9]{3,4}")


class TagsTooLarge(ValueError):
    """Reading a file's tags would need more than :data:`MAX_READ` bytes."""


class BudgetFile:
    """A read-only file that refuses to read more than ``budget`` bytes in all, or
    more than :data:`MAX_READS` times."""

    def __init__(self, raw: BinaryIO, name: str, budget: int = MAX_READ) -> None:
        self._raw = raw
        self.name = name
        self._left = budget
        self._reads_left = MAX_READS

    def read(self, n: int | None = -1) -> bytes:
        # At most what the file holds from here: a read past its end is short, not
        # refused, and allocates no more than it returns (a raw read(n) allocates n
        # bytes first, whatever the file holds).
        left_in_file = max(0, os.fstat(self._raw.fileno()).st_size - self._raw.tell())
        n = left_in_file if n is None or n < 0 else min(n, left_in_file)
        if n > self._left:
            raise TagsTooLarge(f"its tags need more than {MAX_READ // (1024 * 1024)} MiB read")
        self._reads_left -= 1
        if self._reads_left < 0:
            raise TagsTooLarge(f"its tags need more than {MAX_READS} reads")
        data = self._raw.read(n)
        self._left -= len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()


#: part of a :class:`SplicedFile`: bytes, or ``(offset, length)`` of the real file
Part = bytes | tuple[int, int]


class SplicedFile:
    """A read-only file made of byte strings and ranges of another file."""

    def __init__(self, raw: BudgetFile, parts: list[Part]) -> None:
        self._raw = raw
        self.name = raw.name
        self._parts: list[tuple[int, Part]] = []  # (start in the view, part)
        start = 0
        for part in parts:
            self._parts.append((start, part))
            start += len(part) if isinstance(part, bytes) else part[1]
        self._size = start
        self._pos = 0

    def read(self, n: int | None = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        out: list[bytes] = []
        for start, part in self._parts:
            length = len(part) if isinstance(part, bytes) else part[1]
            lo, hi = max(self._pos, start), min(end, start + length)
            if lo >= hi:
                continue
            if isinstance(part, bytes):
                out.append(part[lo - start : hi - start])
            else:
                self._raw.seek(part[0] + lo - start)
                out.append(self._raw.read(hi - lo))
        data = b"".join(out)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the file")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def open_for_tags(raw: BinaryIO, name: str, ext: str) -> BudgetFile | SplicedFile:
    """``raw`` as mutagen should read it for a file of extension ``ext``.

    Also starts this thread's allowance for inflating compressed ID3 frames
    (:data:`MAX_INFLATE`): mutagen reads the file in this thread next.
    """
    _inflating.left = MAX_INFLATE
    budget = BudgetFile(raw, name)
    size = os.fstat(raw.fileno()).st_size
    parts: list[Part] | None = None
    if ext in ("mp3", "mp2", "tta"):  # an ID3v2 tag at the start
        parts = _id3_parts(budget, size)
    elif ext == "flac":
        parts = _flac_parts(budget, size)
    elif ext in ("wav", "wave", "aif", "aiff", "aifc"):
        parts = _iff_parts(budget, size)
    if parts is None:
        budget.seek(0)
        return budget
    return SplicedFile(budget, parts)


# --------------------------------------------------------------------------- ID3v2

_inflating = threading.local()  # .left: bytes compressed frames may still inflate to


class _BoundedZlib:
    """The ``zlib`` mutagen's ID3 frame parser sees: ``decompress`` stops at this
    thread's allowance (and at MAX_FIELD a frame outside :func:`open_for_tags`)."""

    error = zlib.error

    @staticmethod
    def decompress(data: bytes) -> bytes:
        left = getattr(_inflating, "left", MAX_FIELD)
        inflater = zlib.decompressobj()
        out = inflater.decompress(data, max(1, left))
        if inflater.unconsumed_tail or not inflater.eof or len(out) > left:
            raise zlib.error(f"a compressed frame inflates past {left} bytes")
        _inflating.left = left - len(out)
        return out


_frames = vars(mutagen.id3._frames)
assert _frames["zlib"] in (zlib, _BoundedZlib), "mutagen's ID3 frames no longer inflate this way"
_frames["zlib"] = _BoundedZlib


def _syncsafe(raw: bytes) -> int:
    return (raw[0] << 21) | (raw[1] << 14) | (raw[2] << 7) | raw[3]


def _to_syncsafe(n: int) -> bytes:
    return bytes(((n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F))


def _id3_parts(f: BudgetFile, size: int) -> list[Part] | None:
    """The file with a big ID3v2 tag at its start cut down to the wanted frames;
    ``None`` when there is none, or it is small enough as it is."""
    f.seek(0)
    head = f.read(10)
    if len(head) < 10 or head[:3] != b"ID3" or any(b & 0x80 for b in head[6:10]):
        return None
    major, flags = head[3], head[5]
    body = _syncsafe(head[6:10])
    if body <= SMALL_TAG or major not in (2, 3, 4):
        return None
    end = 10 + body + (10 if major == 4 and flags & 0x10 else 0)
    frames = b""
    if flags & 0x80 and major < 4:  # unsynchronised as a whole: frame sizes lie
        flags &= ~0x80
    elif major == 2:
        frames = _walk_id3_frames(f, 10, 10 + body, 6, 3, _plain_size)
    else:
        pos = 10
        if flags & 0x40:  # an extended header: skipped, and not copied
            ext = f.read(4)
            if len(ext) < 4:
                return None
            if _FRAME_ID.fullmatch(ext):
                pass  # the flag without the header (some taggers): frames start here
            else:
                pos += _syncsafe(ext) if major == 4 else 4 + int.from_bytes(ext, "big")
        size_of = _plain_size
        if major == 4 and not _plain_sizes(f, pos, 10 + body):
            size_of = _syncsafe_size
        frames = _walk_id3_frames(f, pos, 10 + body, 10, 4, size_of, syncsafe=major == 4)
    header = b"ID3" + bytes((major, head[4], flags & ~0x50)) + _to_syncsafe(len(frames))
    return [header + frames, (end, max(0, size - end))]


def _plain_size(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def _syncsafe_size(raw: bytes) -> int:
    # as mutagen reads one: the high bit of each byte ignored
    return (raw[0] & 0x7F) << 21 | (raw[1] & 0x7F) << 14 | (raw[2] & 0x7F) << 7 | raw[3] & 0x7F


def _plain_sizes(f: BudgetFile, pos: int, end: int) -> bool:
    """Whether an ID3v2.4 tag's frame sizes are plain integers (old iTunes) rather
    than syncsafe ones: mutagen's rule (``determine_bpi``), on frame headers only."""

    def walk(size_of: Callable[[bytes], int]) -> tuple[int, int]:
        found, at = 0, pos
        for _ in range(_MAX_ITEMS):
            if at >= end - 10:
                break
            f.seek(at)
            header = f.read(10)
            if len(header) < 10:
                return found, 10**9  # past the end of the file
            if header == bytes(10):
                return found, -((end - at) % 10)
            at += 10 + size_of(header[4:8])
            found += bool(_FRAME_ID.fullmatch(header[:4]))
        return found, at - end

    as_syncsafe, syncsafe_past = walk(_syncsafe_size)
    as_plain, plain_past = walk(_plain_size)
    return as_plain > as_syncsafe or (
        as_plain == as_syncsafe and syncsafe_past >= 1 and plain_past <= 1
    )


def _walk_id3_frames(
    f: BudgetFile,
    pos: int,
    end: int,
    header_size: int,
    id_size: int,
    size_of: Callable[[bytes], int],
    syncsafe: bool = False,
) -> bytes:
    """The wanted frames between ``pos`` and ``end``, read one by one, their headers
    included (ID3v2.4 sizes rewritten syncsafe, so that mutagen reads them as we did)."""
    wanted = _ID3_WANTED if id_size == 4 else _ID3_22_WANTED
    kept: list[bytes] = []
    for _ in range(_MAX_ITEMS):
        if pos + header_size > end:
            break
        f.seek(pos)
        header = f.read(header_size)
        frame_id = header[:id_size]
        if len(header) < header_size or not frame_id.strip(b"\0"):
            break  # padding, or the end of the file
        n = size_of(header[id_size : id_size + (3 if id_size == 3 else 4)])
        if frame_id in wanted and n <= MAX_FIELD:
            data = f.read(n)
            if len(data) < n:
                break
            if syncsafe:
                header = frame_id + _to_syncsafe(n) + header[8:]
            kept.append(header + data)
        pos += header_size + n
    return b"".join(kept)


# --------------------------------------------------------------------------- WAV / AIFF


def _iff_parts(f: BudgetFile, size: int) -> list[Part] | None:
    """The file with a big ID3 chunk renamed ``JUNK``, so that mutagen skips it (its
    tags are lost; the RIFF INFO / AIFF NAME chunks still give a title); ``None``
    when there is no big one."""
    f.seek(0)
    head = f.read(12)
    order: Literal["little", "big"]
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        order = "little"
    elif head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        order = "big"
    else:
        return None
    pos = 12
    for _ in range(_MAX_ITEMS):
        f.seek(pos)
        header = f.read(8)
        if len(header) < 8:
            return None
        n = int.from_bytes(header[4:8], order)
        if header[:4].rstrip().lower() == b"id3" and n > SMALL_TAG:
            return [(0, pos), b"JUNK", (pos + 4, size - pos - 4)]
        pos += 8 + n + (n & 1)
    return None


# --------------------------------------------------------------------------- FLAC


def _flac_parts(f: BudgetFile, size: int) -> list[Part] | None:
    """The file as STREAMINFO, the first comment block (cut down if big) and the
    audio; ``None`` (let mutagen look) when the blocks cannot be walked."""
    f.seek(0)
    head = f.read(10)
    pos = 0
    if head[:3] == b"ID3" and len(head) == 10:  # an ID3 tag in front: not used
        pos = 10 + _syncsafe(head[6:10]) + (10 if head[5] & 0x10 else 0)
        f.seek(pos)
        head = f.read(4)
    if head[:4] != b"fLaC":
        return None
    pos += 4
    kept: list[tuple[int, bytes]] = []
    for _ in range(_MAX_ITEMS):
        f.seek(pos)
        header = f.read(4)
        if len(header) < 4 or header[0] & 0x7F == 127:
            return None
        code, n = header[0] & 0x7F, int.from_bytes(header[1:4], "big")
        if pos + 4 + n > size:
            return None
        if code == 0 and not kept:  # STREAMINFO
            kept.append((0, f.read(n)))
        elif code == 4 and len(kept) == 1:  # the first VORBIS_COMMENT
            if n <= SMALL_TAG:
                kept.append((4, f.read(n)))
            else:
                comments = _read_comments(_FileRange(f, pos + 4, n))
                kept.append((4, comments.write(framing=False)))  # type: ignore[no-untyped-call]
        pos += 4 + n
        if header[0] & 0x80:
            break
    else:
        return None
    if not kept:
        return None
    blocks = [b"fLaC"]
    for i, (code, data) in enumerate(kept):
        last = 0x80 if i == len(kept) - 1 else 0
        blocks.append(bytes((code | last,)) + len(data).to_bytes(3, "big") + data)
    return [b"".join(blocks), (pos, size - pos)]


# --------------------------------------------------------------------------- Vorbis comments


class _Source(Protocol):
    def read(self, n: int) -> bytes: ...

    def skip(self, n: int) -> None: ...


class _FileRange:
    """``length`` bytes of a file from ``start``, read in order."""

    def __init__(self, f: BudgetFile, start: int, length: int) -> None:
        self._f = f
        self._pos = start
        self._end = start + length

    def read(self, n: int) -> bytes:
        n = max(0, min(n, self._end - self._pos))
        self._f.seek(self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def skip(self, n: int) -> None:
        self._pos = min(self._end, self._pos + n)


class _OggPacket:
    """The bytes of the packet of stream ``serial`` that starts on the next page of
    it, read straight from the pages' data (only page headers are read otherwise)."""

    def __init__(self, fileobj: Any, serial: int) -> None:
        self._f = fileobj
        self._serial = serial
        self._next = fileobj.tell()  # where the next page starts
        self._at = 0  # where the packet's next bytes are on the current page
        self._left = 0  # and how many of them are there
        self._ends_here = False  # the packet ends on the current page

    def _next_page(self) -> bool:
        if self._ends_here:
            return False
        for _ in range(_MAX_ITEMS):
            self._f.seek(self._next)
            header = self._f.read(27)
            if len(header) < 27 or header[:4] != b"OggS":
                return False
            lacing = self._f.read(header[26])
            if len(lacing) < header[26]:
                return False
            data = self._next + 27 + len(lacing)
            self._next = data + sum(lacing)
            if struct.unpack_from("<I", header, 14)[0] != self._serial:
                continue
            self._at, self._left = data, 0
            for value in lacing:  # the packet's segments: up to the first short one
                self._left += value
                if value < 255:
                    self._ends_here = True
                    break
            return True
        return False

    def _take(self, n: int, keep: bool) -> bytes:
        out: list[bytes] = []
        while n > 0:
            if not self._left:
                if not self._next_page():
                    break
                continue
            step = min(n, self._left)
            if keep:
                self._f.seek(self._at)
                data = self._f.read(step)
                if len(data) < step:
                    break
                out.append(data)
            self._at += step
            self._left -= step
            n -= step
        return b"".join(out)

    def read(self, n: int) -> bytes:
        return self._take(n, keep=True)

    def skip(self, n: int) -> None:
        self._take(n, keep=False)


def _read_comments(source: _Source) -> VCommentDict:
    """The wanted comments of a Vorbis comment structure, each at most MAX_FIELD bytes."""
    comments = VCommentDict()  # type: ignore[no-untyped-call]
    (length,) = struct.unpack("<I", source.read(4).ljust(4, b"\0"))
    vendor = source.read(min(length, MAX_FIELD))
    source.skip(length - len(vendor))
    comments.vendor = vendor.decode("utf-8", "replace")
    (count,) = struct.unpack("<I", source.read(4).ljust(4, b"\0"))
    for _ in range(min(count, _MAX_ITEMS)):
        raw = source.read(4)
        if len(raw) < 4:
            break
        (length,) = struct.unpack("<I", raw)
        if length > MAX_FIELD:
            source.skip(length)
            continue
        entry = source.read(length)
        if len(entry) < length:
            break
        key, sep, value = entry.partition(b"=")
        name = key.decode("ascii", "replace").lower()
        if sep and name in _VORBIS_WANTED:
            comments.append((name, value.decode("utf-8", "replace")))
    return comments


class _OggVorbisComments(VCommentDict):
    """A Vorbis stream's comments, read by :func:`_read_comments`."""

    _magic = b"\x03vorbis"

    def __init__(self, fileobj: Any = None, info: Any = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if fileobj is None:
            return
        packet = _OggPacket(fileobj, info.serial)
        if packet.read(len(self._magic)) != self._magic:
            raise ValueError("no comment header where it belongs")
        found = _read_comments(packet)
        self.vendor = found.vendor
        self.extend(found)


class _OggOpusComments(_OggVorbisComments):
    _magic = b"OpusTags"


class BoundedOggVorbis(OggVorbis):
    """:class:`~mutagen.oggvorbis.OggVorbis` reading only the comments the index uses."""

    _Tags = _OggVorbisComments  # type: ignore[assignment]


class BoundedOggOpus(OggOpus):
    """:class:`~mutagen.oggopus.OggOpus` reading only the comments the index uses."""

    _Tags = _OggOpusComments  # type: ignore[assignment]


# --------------------------------------------------------------------------- MP4


class _TextMP4Tags(MP4Tags):
    """MP4 tags with only the items the index uses read (never ``covr``)."""

    def load(self, atoms: Any, fileobj: Any) -> None:
        try:
            ilst = atoms.path(b"moov", b"udta", b"meta", b"ilst")[-1]
        except KeyError:
            pass
        else:
            ilst.children = [
                atom
                for atom in ilst.children
                if atom.name in _MP4_WANTED and atom.length <= MAX_FIELD
            ]
        super().load(atoms, fileobj)  # type: ignore[no-untyped-call]


class BoundedMP4(MP4):
    """:class:`~mutagen.mp4.MP4` reading only the items the index uses."""

    MP4Tags = _TextMP4Tags
