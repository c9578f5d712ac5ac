"""WAV headers: read back by the stdlib ``wave`` module, by struct, and by ffmpeg."""

from __future__ import annotations

import io
import math
import struct
import subprocess
import wave
from pathlib import Path
from typing import BinaryIO, cast

import imageio_ffmpeg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from musiclib.wav import UNKNOWN_SIZE, header_size, patch_sizes, wav_header

QUIET_FFMPEG = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error"]


def s16_samples(frames: int, channels: int) -> bytes:
    """A recognisable 16-bit signal: a different ramp in each channel."""
    values = [(i * 37 + c * 1000) % 65536 - 32768 for i in range(frames) for c in range(channels)]
    return struct.pack(f"<{len(values)}h", *values)


def f32_samples(frames: int, channels: int) -> bytes:
    """Finite floats in [-1, 1], different in each channel."""
    values = [math.sin(i / 7 + c) for i in range(frames) for c in range(channels)]
    return struct.pack(f"<{len(values)}f", *values)


def parse(header: bytes) -> dict[str, int | bytes]:
    """The fields of a header ``wav_header`` wrote, by plain struct parsing."""
    riff, riff_size, wave_id = struct.unpack_from("<4sI4s", header, 0)
    fmt_id, fmt_size = struct.unpack_from("<4sI", header, 12)
    tag, channels, rate, byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", header, 20)
    fields: dict[str, int | bytes] = {
        "riff": riff,
        "riff_size": riff_size,
        "wave": wave_id,
        "fmt_id": fmt_id,
        "fmt_size": fmt_size,
        "tag": tag,
        "channels": channels,
        "rate": rate,
        "byte_rate": byte_rate,
        "block_align": block_align,
        "bits": bits,
    }
    at = 20 + fmt_size
    if fmt_size == 18:
        (fields["cb_size"],) = struct.unpack_from("<H", header, 36)
        fact_id, fact_size, frames = struct.unpack_from("<4sII", header, at)
        fields.update(fact_id=fact_id, fact_size=fact_size, fact_frames=frames)
        at += 12
    data_id, data_size = struct.unpack_from("<4sI", header, at)
    fields.update(data_id=data_id, data_size=data_size, data_at=at + 8)
    return fields


def ffmpeg_f32(path: Path) -> bytes:
    done = subprocess.run(
        [*QUIET_FFMPEG, "-i", str(path), "-f", "f32le", "-"],
        capture_output=True,
        check=True,
    )
    return done.stdout


def read_wave(path: Path) -> tuple[int, int, int, int, bytes]:
    with wave.open(str(path), "rb") as w:
        n = w.getnframes()
        return w.getnchannels(), w.getframerate(), w.getsampwidth(), n, w.readframes(n)


# ---- s16le: the stdlib wave module agrees ----------------------------------


@pytest.mark.parametrize(("rate", "channels"), [(44100, 2), (16000, 1), (48000, 6)])
def test_s16le_known_length_reads_back_with_wave(tmp_path: Path, rate: int, channels: int) -> None:
    data = s16_samples(1234, channels)
    path = tmp_path / "a.wav"
    path.write_bytes(wav_header("s16le", rate, channels, len(data)) + data)
    assert read_wave(path) == (channels, rate, 2, 1234, data)


@pytest.mark.parametrize("mode", ["w+b", "wb"])
def test_s16le_patched_reads_back_with_wave(tmp_path: Path, mode: str) -> None:
    data = s16_samples(5000, 2)
    path = tmp_path / "a.wav"
    with cast(BinaryIO, open(path, mode)) as f:
        f.write(wav_header("s16le", 22050, 2, None))
        f.write(data)
        patch_sizes(f, len(data))
        assert f.tell() == header_size("s16le") + len(data)
    assert read_wave(path) == (2, 22050, 2, 5000, data)
    assert path.read_bytes() == wav_header("s16le", 22050, 2, len(data)) + data


def test_s16le_fields() -> None:
    header = wav_header("s16le", 44100, 2, 400)
    assert len(header) == header_size("s16le") == 44
    assert parse(header) == {
        "riff": b"RIFF",
        "riff_size": 36 + 400,
        "wave": b"WAVE",
        "fmt_id": b"fmt ",
        "fmt_size": 16,
        "tag": 1,
        "channels": 2,
        "rate": 44100,
        "byte_rate": 44100 * 4,
        "block_align": 4,
        "bits": 16,
        "data_id": b"data",
        "data_size": 400,
        "data_at": 44,
    }


# ---- f32le: struct parsing, and ffmpeg decodes it back unchanged -------------


def test_f32le_fields() -> None:
    header = wav_header("f32le", 48000, 3, 12 * 100)
    assert len(header) == header_size("f32le") == 58
    assert parse(header) == {
        "riff": b"RIFF",
        "riff_size": 58 - 8 + 1200,
        "wave": b"WAVE",
        "fmt_id": b"fmt ",
        "fmt_size": 18,
        "tag": 3,
        "channels": 3,
        "rate": 48000,
        "byte_rate": 48000 * 12,
        "block_align": 12,
        "bits": 32,
        "cb_size": 0,
        "fact_id": b"fact",
        "fact_size": 4,
        "fact_frames": 100,
        "data_id": b"data",
        "data_size": 1200,
        "data_at": 58,
    }


def test_ffmpeg_reads_f32le_back_unchanged(tmp_path: Path) -> None:
    data = f32_samples(3000, 2)
    path = tmp_path / "f.wav"
    path.write_bytes(wav_header("f32le", 44100, 2, len(data)) + data)
    assert ffmpeg_f32(path) == data


def test_ffmpeg_reads_open_length_f32le_to_the_end(tmp_path: Path) -> None:
    data = f32_samples(3000, 1)
    path = tmp_path / "f.wav"
    path.write_bytes(wav_header("f32le", 8000, 1, None) + data)
    assert ffmpeg_f32(path) == data


@pytest.mark.parametrize(("mode", "fact"), [("w+b", 1500), ("wb", 0)])
def test_f32le_patched(tmp_path: Path, mode: str, fact: int) -> None:
    """A readable file gets its fact count; a write-only one keeps 0 ("unknown")."""
    data = f32_samples(1500, 2)
    path = tmp_path / "f.wav"
    with cast(BinaryIO, open(path, mode)) as f:
        f.write(wav_header("f32le", 32000, 2, None))
        f.write(data)
        patch_sizes(f, len(data))
        assert f.tell() == 58 + len(data)
    raw = path.read_bytes()
    fields = parse(raw)
    assert fields["riff_size"] == len(raw) - 8
    assert fields["data_size"] == len(data)
    assert fields["fact_frames"] == fact
    assert raw[58:] == data
    assert ffmpeg_f32(path) == data


# ---- open length, clamping, misuse ------------------------------------------


@pytest.mark.parametrize("sample_format", ["s16le", "f32le"])
def test_open_length_header(sample_format: str) -> None:
    fields = parse(wav_header(sample_format, 44100, 2, None))
    assert fields["riff_size"] == UNKNOWN_SIZE == 0xFFFFFFFF
    assert fields["data_size"] == 0xFFFFFFFF
    assert fields.get("fact_frames", 0) == 0


@pytest.mark.parametrize("sample_format", ["s16le", "f32le"])
def test_sizes_beyond_4_gib_are_clamped(sample_format: str) -> None:
    fields = parse(wav_header(sample_format, 48000, 2, 5 * 2**30))
    assert fields["riff_size"] == fields["data_size"] == 0xFFFFFFFF
    if sample_format == "f32le":
        assert fields["fact_frames"] == 5 * 2**30 // 8  # still fits in 32 bits


def test_patch_beyond_4_gib_clamps(tmp_path: Path) -> None:
    size = 5 * 2**30
    with open(tmp_path / "big.wav", "w+b") as f:
        f.write(wav_header("f32le", 48000, 2, None))
        f.truncate(58 + size)  # sparse: no 5 GiB written
        patch_sizes(f, size)
        f.seek(0)
        fields = parse(f.read(58))
    assert fields["riff_size"] == fields["data_size"] == 0xFFFFFFFF
    assert fields["fact_frames"] == size // 8


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("s24le", 44100, 2, 0), "unknown sample format"),
        (("s16le", 44100, 0, 0), "channels"),
        (("s16le", 0, 2, 0), "sample rate"),
        (("s16le", 44100, 2, -1), "negative"),
        (("f32le", 44100, 20000, 0), "too many channels"),
    ],
)
def test_bad_arguments(args: tuple[str, int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        wav_header(*args)


def test_patch_refuses_a_size_that_does_not_match() -> None:
    f = io.BytesIO(wav_header("s16le", 44100, 2, None) + bytes(400))
    before = f.getvalue()
    with pytest.raises(ValueError, match="444 bytes"):
        patch_sizes(f, 396)
    assert f.getvalue() == before


def test_patch_refuses_what_is_not_our_header() -> None:
    f = io.BytesIO(b"X" * 44 + bytes(400))
    with pytest.raises(ValueError, match="wav_header"):
        patch_sizes(f, 400)
    assert f.getvalue() == b"X" * 44 + bytes(400)


def test_patch_refuses_an_appending_file(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    original = wav_header("s16le", 44100, 2, None) + bytes(40)
    path.write_bytes(original)
    with open(path, "ab") as f, pytest.raises(io.UnsupportedOperation, match="appending"):
        patch_sizes(f, 40)
    assert path.read_bytes() == original


# ---- property: every field is consistent --------------------------------------


@given(
    sample_format=st.sampled_from(["s16le", "f32le"]),
    rate=st.integers(1000, 384000),
    channels=st.integers(1, 8),
    frames=st.one_of(st.none(), st.integers(0, 2**31)),
)
def test_fields_are_consistent(
    sample_format: str, rate: int, channels: int, frames: int | None
) -> None:
    width = 2 if sample_format == "s16le" else 4
    data_bytes = None if frames is None else frames * channels * width
    header = wav_header(sample_format, rate, channels, data_bytes)
    fields = parse(header)
    assert len(header) == header_size(sample_format) == fields["data_at"]
    assert fields["tag"] == (1 if sample_format == "s16le" else 3)
    assert fields["bits"] == 8 * width
    assert fields["channels"] == channels
    assert fields["rate"] == rate
    assert fields["block_align"] == channels * width
    assert fields["byte_rate"] == rate * channels * width
    if data_bytes is None:
        assert fields["riff_size"] == fields["data_size"] == 0xFFFFFFFF
    else:
        assert fields["data_size"] == min(data_bytes, 0xFFFFFFFF)
        assert fields["riff_size"] == min(len(header) - 8 + data_bytes, 0xFFFFFFFF)
    if sample_format == "f32le":
        assert fields["fact_frames"] == (0 if frames is None else min(frames, 0xFFFFFFFF))
