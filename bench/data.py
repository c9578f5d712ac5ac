"""The benchmark's input files, generated once under ``bench/data/`` and reused.

* ``big/noise-<N>MiB.flac``: random bytes (``os.urandom`` in 16 MiB pieces) for the 1 GiB
  download and the client-memory scenario. The name ends in ``.flac`` only so that the
  server lists it (as an unreadable FLAC, which it still serves byte for byte).
* ``medium/medium-10MB.flac``: the same, 10 000 000 bytes, for the 500 concurrent downloads.
* ``audio/paced-40s.mp3``: a real 40 s MP3 (44.1 kHz stereo, tagged) encoded with the
  imageio-ffmpeg binary, for the decoded and playback scenarios.
* ``tree-<N>/``: N hard links, 100 to a folder, to six one-second tagged files (MP3, Ogg
  Vorbis, FLAC, Opus, M4A, WAV) kept in ``tree-src/``, for the index build.

Every random file has a ``.sha256`` sidecar so that baselines can verify without hashing
twice. A file is complete once renamed into place; a tree once its ``.complete`` marker
exists (hidden names are not scanned). Interrupted generation is simply redone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.common import DATA, MIB

PIECE = 16 * MIB
AUDIO_SECONDS = 40
_TREE_SOURCES = {
    "mp3": ["-c:a", "libmp3lame", "-b:a", "128k"],
    "ogg": ["-c:a", "libvorbis", "-q:a", "3"],
    "flac": ["-c:a", "flac"],
    "opus": ["-c:a", "libopus", "-b:a", "64k"],
    "m4a": ["-c:a", "aac", "-b:a", "128k"],
    "wav": ["-c:a", "pcm_s16le"],
}


@dataclass(frozen=True)
class DataFile:
    """A generated file: where it is, its library root and name, size and checksum."""

    path: Path
    sha256: str

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def ffmpeg() -> str:
    """The ffmpeg binary the server itself uses (imageio-ffmpeg's), for generating audio."""
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def random_file(folder: str, name: str, size: int) -> DataFile:
    """``DATA/folder/name`` holding ``size`` random bytes, created if missing."""
    path = DATA / folder / name
    sidecar = path.with_name(path.name + ".sha256")
    if path.exists() and sidecar.exists() and path.stat().st_size == size:
        return DataFile(path, sidecar.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"  generating {path.relative_to(DATA.parent)} ({size / MIB:.0f} MiB)", flush=True)
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        left = size
        while left:
            piece = os.urandom(min(PIECE, left))
            digest.update(piece)
            f.write(piece)
            left -= len(piece)
    sidecar.write_text(digest.hexdigest() + "\n")
    os.replace(tmp, path)
    return DataFile(path, digest.hexdigest())


def big_file(size: int) -> DataFile:
    return random_file("big", f"noise-{size // MIB}MiB.flac", size)


def medium_file(size: int) -> DataFile:
    return random_file("medium", f"medium-{size // 1_000_000}MB.flac", size)


def _encode(args: list[str], out: Path) -> None:
    tmp = out.with_name("tmp-" + out.name)
    cmd = [ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args, str(tmp)]
    subprocess.run(cmd, check=True, timeout=120)
    os.replace(tmp, out)


def paced_track() -> DataFile:
    """A 40 s MP3 at 44.1 kHz stereo: a tone with a little noise, tagged."""
    out = DATA / "audio" / f"paced-{AUDIO_SECONDS}s.mp3"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"  generating {out.relative_to(DATA.parent)}", flush=True)
        expr = "0.3*sin(440*2*PI*t)+0.05*(random(0)-0.5)|0.3*sin(660*2*PI*t)"
        source = ["-f", "lavfi", "-i", f"aevalsrc={expr}:s=44100:d={AUDIO_SECONDS}"]
        codec = ["-c:a", "libmp3lame", "-b:a", "192k"]
        tags = ["-metadata", "title=Paced", "-metadata", "artist=Bench"]
        _encode([*source, *codec, *tags], out)
    return DataFile(out, "")


def _tree_sources() -> list[Path]:
    src = DATA / "tree-src"
    src.mkdir(parents=True, exist_ok=True)
    out = []
    for ext, codec in _TREE_SOURCES.items():
        path = src / f"short.{ext}"
        if not path.exists():
            tags = ["title=Short " + ext, "artist=Bench", "album=Tree", "track=1"]
            _encode(
                ["-f", "lavfi", "-i", "sine=frequency=330:duration=1:sample_rate=44100"]
                + codec
                + [arg for tag in tags for arg in ("-metadata", tag)],
                path,
            )
        out.append(path)
    return out


def tree(files: int) -> Path:
    """``DATA/tree-N``: ``files`` hard links in folders of 100 (10 albums a artist)."""
    root = DATA / f"tree-{files}"
    marker = root / ".complete"
    if marker.exists():
        return root
    print(f"  generating {root.relative_to(DATA.parent)} ({files} hard links)", flush=True)
    sources = _tree_sources()
    shutil.rmtree(root, ignore_errors=True)
    for i in range(files):
        src = sources[i % len(sources)]
        folder = root / f"Artist {i // 1000:02d}" / f"Album {i // 100 % 10}"
        if i % 100 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        os.link(src, folder / f"{i:05d} - Track{src.suffix}")
    marker.write_text(f"{files}\n")
    return root
