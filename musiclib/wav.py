"""WAV (RIFF/WAVE) headers for the raw samples of a decoded stream.

Pure and small: :mod:`struct` only, no audio library. A header written before
the length is known (streaming to a player) states 0xFFFFFFFF as both the
RIFF size and the data size, as ffmpeg and sox do on pipes; mpv, ffplay and
aplay then read to the end of the stream. A file can be fixed up once the
length is known with :func:`patch_sizes`.

Layouts (offsets in bytes)::

    s16le (44 bytes)                     f32le (58 bytes)
     0 "RIFF" <riff size>                 0 "RIFF" <riff size>
     8 "WAVE"                             8 "WAVE"
    12 "fmt " 16                         12 "fmt " 18
    20 format 1 (PCM) ... 16 bits        20 format 3 (IEEE float) ... 32 bits, cbSize 0
    36 "data" <data size>                38 "fact" 4 <sample frames>
    44 samples                           50 "data" <data size>
                                         58 samples
"""

from __future__ import annotations

import io
import os
import struct
from typing import BinaryIO

#: sample format -> (WAVE format tag, bits per sample)
_FORMATS: dict[str, tuple[int, int]] = {
    "s16le": (1, 16),  # WAVE_FORMAT_PCM
    "f32le": (3, 32),  # WAVE_FORMAT_IEEE_FLOAT
}
#: what a 32-bit size field says when the size is unknown or too large
UNKNOWN_SIZE = 0xFFFFFFFF
#: header size -> offset of the ``fact`` frame count (``None``: no fact chunk)
_LAYOUTS: dict[int, int | None] = {44: None, 58: 46}


def header_size(sample_format: str) -> int:
    """Bytes of the header :func:`wav_header` writes for ``sample_format``."""
    tag, _ = _format(sample_format)
    return 44 if tag == 1 else 58


def wav_header(
    sample_format: str, sample_rate: int, channels: int, data_bytes: int | None
) -> bytes:
    """A RIFF/WAVE header for ``data_bytes`` of interleaved samples (``None``: not known yet).

    Sizes that do not fit in 32 bits are clamped to 0xFFFFFFFF.
    """
    tag, bits = _format(sample_format)
    if not 1 <= channels <= 0xFFFF:
        raise ValueError(f"channels must be 1 to 65535, not {channels}")
    if not 1 <= sample_rate <= 0xFFFFFFFF:
        raise ValueError(f"sample rate must be 1 to {0xFFFFFFFF}, not {sample_rate}")
    if data_bytes is not None and data_bytes < 0:
        raise ValueError("data_bytes must not be negative")
    block_align = channels * bits // 8
    if block_align > 0xFFFF or block_align * sample_rate > 0xFFFFFFFF:
        raise ValueError("too many channels or too high a rate for a WAV header")
    size = header_size(sample_format)
    fmt = struct.pack(
        "<HHIIHH", tag, channels, sample_rate, block_align * sample_rate, block_align, bits
    )
    if data_bytes is None:
        riff_size = data_size = UNKNOWN_SIZE
        frames = 0
    else:
        riff_size = _clamp(size - 8 + data_bytes)
        data_size = _clamp(data_bytes)
        frames = _clamp(data_bytes // block_align)
    parts = [b"RIFF", struct.pack("<I", riff_size), b"WAVE"]
    if tag == 1:
        parts += [b"fmt ", struct.pack("<I", 16), fmt]
    else:
        parts += [b"fmt ", struct.pack("<I", 18), fmt, struct.pack("<H", 0)]  # cbSize 0
        parts += [b"fact", struct.pack("<II", 4, frames)]
    parts += [b"data", struct.pack("<I", data_size)]
    header = b"".join(parts)
    assert len(header) == size
    return header


def patch_sizes(f: BinaryIO, data_bytes: int) -> None:
    """Write the real sizes into a header that :func:`wav_header` wrote with ``None``.

    ``f`` must be seekable and hold exactly such a header at offset 0 followed
    by ``data_bytes`` bytes of samples (the file's size is checked against
    that). Sets the RIFF size, the data size and, for float files, the
    ``fact`` frame count; leaves the position at the end of the file.

    A file open for writing only (standard output redirected to a file) gets
    its sizes too, but its ``fact`` count stays 0 ("unknown"): finding the
    channel count would need reading the header. Readers take the frame count
    of PCM and float data from the data size anyway.
    """
    if data_bytes < 0:
        raise ValueError("data_bytes must not be negative")
    if not f.seekable():
        raise io.UnsupportedOperation("cannot patch the sizes of a WAV stream that is not seekable")
    if _appending(f):
        raise io.UnsupportedOperation("cannot patch the sizes of a file opened for appending")
    end = f.seek(0, os.SEEK_END)
    size = end - data_bytes
    if size not in _LAYOUTS:
        raise ValueError(
            f"the file has {end} bytes, not a WAV header of "
            f"{' or '.join(map(str, _LAYOUTS))} bytes and {data_bytes} bytes of samples"
        )
    fact_at = _LAYOUTS[size]
    block_align = None
    if f.readable():
        f.seek(0)
        head = f.read(size)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE" or head[size - 8 : size - 4] != b"data":
            f.seek(0, os.SEEK_END)
            raise ValueError("the file does not start with a header written by wav_header")
        (block_align,) = struct.unpack_from("<H", head, 32)
    f.seek(4)
    f.write(struct.pack("<I", _clamp(size - 8 + data_bytes)))
    if fact_at is not None and block_align:
        f.seek(fact_at)
        f.write(struct.pack("<I", _clamp(data_bytes // block_align)))
    f.seek(size - 4)
    f.write(struct.pack("<I", _clamp(data_bytes)))
    f.seek(0, os.SEEK_END)


def _appending(f: BinaryIO) -> bool:
    """Whether writes to ``f`` go to the end whatever its position (``O_APPEND``)."""
    mode = getattr(f, "mode", "")
    if isinstance(mode, str) and "a" in mode:
        return True
    try:
        import fcntl

        return bool(fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_APPEND)
    except (ImportError, OSError, ValueError):  # no fcntl (Windows), or no descriptor
        return False


def _format(sample_format: str) -> tuple[int, int]:
    try:
        return _FORMATS[sample_format]
    except KeyError:
        known = ", ".join(_FORMATS)
        raise ValueError(f"unknown sample format {sample_format!r} (known: {known})") from None


def _clamp(size: int) -> int:
    return min(size, UNKNOWN_SIZE)
