"""Every format a music folder holds, and which symbolic links are followed (issue 13, 9 and 10).

Two corpora of real files:

* **mutagen's own test data** (``tests/data`` of its sdist on PyPI): odd, truncated and
  hand-made files of every format mutagen reads. It is fetched at test time with pip,
  pinned by version and sha256, and kept under ``.venv`` (or this run's temporary folder),
  rather than vendored: mutagen is GPL-2 and musiclib is MIT. Without PyPI the tests that
  need it skip, saying so.
* **files written here by the ffmpeg imageio-ffmpeg ships**, one per format it can write
  (``spx`` only if it has libspeex), with tags where the format keeps them.

Every audio file of both is listed by the real server, served byte-exact (``get -o``,
verified by the client) and decodes (``get --decode``) or fails with one clean line
(``decode_failed``; never ``internal``, never a traceback in the server's log).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
from conftest import REPO, run_cli, running_server

import musiclib.library as lib_mod
from musiclib.errors import DecodeFailed, NotFound
from musiclib.library import (
    FFMPEG_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    Library,
    open_confined,
    read_track,
    walk,
)

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()

#: the mutagen sdist whose tests/data is the corpus, and its sha256 on PyPI
MUTAGEN_SDIST = "mutagen-1.47.0.tar.gz"
MUTAGEN_SHA256 = "719fadef0a978c31b4cf3c956261b3c58b6948b32023078a2117b1de09f0fc99"
#: seconds pip may take to fetch it
FETCH_TIMEOUT = 180

#: corpus files that are not tracks, by extension, and why (PROTOCOL.md, "Formats")
NOT_TRACKS = {
    "apev2": "a bare APEv2 tag, no audio",
    "id3": "a bare ID3 tag, no audio",
    "jpg": "a picture",
    "mid": "MIDI: notes, not audio; ffmpeg cannot render it",
    "oggtheora": "video (Theora), mutagen's own name for .ogv",
}

#: corpus file -> the codec listed for it: the formats this issue adds
CORPUS_CODECS = {
    "mac-399.ape": "ape",
    "click.mpc": "mpc7",
    "sv8_header.mpc": "mpc8",
    "empty.tta": "tta",
    "silence-2s-44100-16.ofr": "optimfrog",
    "silence-2s-44100-16.ofs": "optimfrog",
    "has-tags.tak": "tak",
    "5644800-2ch-s01-silence.dsf": "dsd_lsbf_planar",
    "5644800-2ch-s01-silence.dff": "dsd_msbf",
    "5644800-2ch-s01-silence-dst.dff": "dst",
    "silence-1.wma": "wmav2",
    "silence-2.wma": "wmapro",
    "silence-3.wma": "wmalossless",
    "empty.spx": "speex",
    "multiplexed.spx": "speex",
    "empty.oggflac": "flac",
    "ep7.m4b": "aac",
    "nero-chapters.m4b": "aac",
    "no-tags.3g2": "aac",
    "silence-44-s.ac3": "ac3",
    "silence-44-s.eac3": "eac3",
}

#: corpus file -> tags read from it
CORPUS_TAGS = {
    "issue_29.wma": {"title": "Señor Flamingos Adieu", "artist": "Kaizers Orchestra", "track": 6},
    "has-tags.tak": {"artist": "The Artist"},
    "with-id3.dsf": {"title": "DSF title"},
    "silence-44-s.wv": {"title": "Silence", "album": "Quod Libet Test Data", "track": 2},
    "nero-chapters.m4b": {"artist": "Aleron Kong"},
}

#: corpus files that are whole recordings: they must decode (others may be cut short)
CORPUS_DECODES = {
    *("mac-399.ape", "click.mpc", "empty.tta", "has-tags.tak", "silence-44-s.tak"),
    *("5644800-2ch-s01-silence.dsf", "5644800-2ch-s01-silence.dff", "with-id3.dsf"),
    *("silence-1.wma", "silence-2.wma", "silence-3.wma", "issue_29.wma"),
    *("empty.spx", "multiplexed.spx", "empty.oggflac", "example.opus", "multipage-setup.ogg"),
    *("ep7.m4b", "ep9.m4b", "nero-chapters.m4b", "no-tags.3g2", "alac.m4a", "has-tags.m4a"),
    *("silence-44-s.ac3", "silence-44-s.eac3", "silence-44-s.wv", "dsd.wv", "with-id3.aif"),
    *("silence-2s-PCM-44100-16-ID3v23.wav", "silence-44-s.mp3", "silence-44-s.flac"),
}

#: formats ffmpeg cannot decode at all: their decoded streams end with decode_failed
UNDECODABLE = {"ofr", "ofs"}

TAGS = {"title": "Tïtle", "artist": "Ärtist", "album": "Älbum", "track": "3/9"}

#: extension -> (ffmpeg output options, codec listed, tags kept by the format)
GENERATED: dict[str, tuple[list[str], str, bool]] = {
    "m4b": (["-c:a", "aac", "-f", "ipod"], "aac", True),
    "m4r": (["-c:a", "aac", "-f", "ipod"], "aac", True),
    "3gp": (["-c:a", "aac", "-f", "3gp"], "aac", False),
    "wma": (["-c:a", "wmav2", "-f", "asf"], "wmav2", True),
    "asf": (["-c:a", "wmav1", "-f", "asf"], "wmav1", True),
    "tta": (["-f", "tta"], "tta", False),
    "aifc": (["-c:a", "pcm_alaw", "-f", "aiff"], "pcm_alaw", False),
    "oggflac": (["-c:a", "flac", "-f", "ogg"], "flac", True),
    "wv": (["-c:a", "wavpack", "-f", "wv"], "wavpack", True),
    "mp2": (["-c:a", "mp2", "-f", "mp2"], "mp2", False),
    "ac3": (["-c:a", "ac3", "-f", "ac3"], "ac3", False),
    "eac3": (["-c:a", "eac3", "-f", "eac3"], "eac3", False),
    "wave": (["-f", "wav"], "pcm_s16le", False),
    "mka": (["-c:a", "flac", "-f", "matroska"], "flac", True),
    "webm": (["-c:a", "libopus", "-f", "webm"], "opus", True),
    "weba": (["-c:a", "libopus", "-f", "webm"], "opus", True),
    "caf": (["-c:a", "pcm_s24be", "-f", "caf"], "pcm_s24be", True),
    "w64": (["-f", "w64"], "pcm_s16le", False),
    "au": (["-f", "au"], "pcm_s16be", True),
    "amr": (["-c:a", "libopencore_amrnb", "-ar", "8000", "-ac", "1", "-f", "amr"], "amr_nb", False),
    "spx": (["-c:a", "libspeex", "-ar", "16000", "-f", "ogg"], "speex", True),
}


def _ffmpeg_has_encoder(name: str) -> bool:
    out = subprocess.run(
        [FFMPEG, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=30
    ).stdout
    return any(line.split()[1:2] == [name] for line in out.splitlines() if line.strip())


def generate(folder: Path, ext: str, seconds: float = 1.5) -> Path:
    """One file of format ``ext`` written by ffmpeg: a sine, stereo unless the format
    says otherwise, tagged with TAGS."""
    options = GENERATED[ext][0]
    path = folder / f"generated.{ext}"
    tags = [arg for key, value in TAGS.items() for arg in ("-metadata", f"{key}={value}")]
    source = f"sine=frequency=440:duration={seconds}:sample_rate=44100"
    cmd = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    cmd += ["-f", "lavfi", "-i", source, "-ac", "2", *tags, *options, str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of one file per format in GENERATED that this ffmpeg can write."""
    folder = tmp_path_factory.mktemp("generated")
    for ext in GENERATED:
        if ext == "spx" and not _ffmpeg_has_encoder("libspeex"):
            continue  # the corpus has Speex files; this ffmpeg cannot write one
        generate(folder, ext)
    return folder


def _cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = REPO / ".venv"
    if venv.is_dir() and os.access(venv, os.W_OK):
        return venv / "musiclib-test-cache"
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mutagen's tests/data, fetched from PyPI once and cached (see the module docstring)."""
    data = _cache_root(tmp_path_factory) / MUTAGEN_SDIST.removesuffix(".tar.gz") / "data"
    if data.is_dir():
        return data
    with tempfile.TemporaryDirectory() as scratch:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
        cmd += ["--no-deps", "--no-binary", ":all:", "--dest", scratch]
        cmd += [MUTAGEN_SDIST.removesuffix(".tar.gz").replace("-", "==")]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.skip(f"mutagen's test files: PyPI did not answer within {FETCH_TIMEOUT} s")
        sdist = Path(scratch) / MUTAGEN_SDIST
        if done.returncode != 0 or not sdist.is_file():
            reason = (done.stderr.strip().splitlines() or ["no file"])[-1]
            pytest.skip(f"mutagen's test files could not be fetched from PyPI: {reason}")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        assert digest == MUTAGEN_SHA256, f"{MUTAGEN_SDIST} from PyPI has sha256 {digest}"
        unpacked = Path(scratch) / "data"
        unpacked.mkdir()
        prefix = MUTAGEN_SDIST.removesuffix(".tar.gz") + "/tests/data/"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix(prefix)
                if member.isfile() and member.name.startswith(prefix) and "/" not in name:
                    source = tar.extractfile(member)
                    assert source is not None
                    (unpacked / name).write_bytes(source.read())
        data.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(unpacked, data)
        except OSError:  # another run got there first
            if not data.is_dir():
                raise
    return data


def corpus_tracks(corpus: Path) -> list[str]:
    return sorted(p.name for p in corpus.iterdir() if lib_mod._extension(p.name) not in NOT_TRACKS)


# ---------------------------------------------------------------------------- reading


def test_the_corpus_is_listed_but_for_the_documented_exceptions(corpus: Path) -> None:
    """Every file of mutagen's test data is a track, except those of NOT_TRACKS, which
    PROTOCOL.md's "Formats" leaves out; none of those extensions is listed."""
    exts = {lib_mod._extension(p.name) for p in corpus.iterdir()}
    assert exts - SUPPORTED_EXTENSIONS == set(NOT_TRACKS)
    assert not set(NOT_TRACKS) & SUPPORTED_EXTENSIONS
    assert [relpath for relpath, _ in walk(corpus)] == corpus_tracks(corpus)


def test_the_corpus_is_read_without_surprises(corpus: Path) -> None:
    """Each file gives its facts, or one short line saying why not; the new formats
    give the codec ffmpeg calls them by, and their tags."""
    tracks = {name: read_track(corpus, name) for name in corpus_tracks(corpus)}
    for name, track in tracks.items():
        if track.error is not None:
            assert "\n" not in track.error and len(track.error) <= 200, (name, track.error)
            assert str(corpus) not in track.error
    for name, codec in CORPUS_CODECS.items():
        track = tracks[name]
        assert (track.codec, track.error) == (codec, None), name
        assert track.sample_rate and track.duration is not None, track
    for name, tags in CORPUS_TAGS.items():
        assert {key: getattr(tracks[name], key) for key in tags} == tags, name


def test_every_generated_format_is_read(generated: Path) -> None:
    """ffmpeg's files of every format: the codec, the stream facts and, where the format
    keeps them, the tags (through mutagen, or ffmpeg's probe for FFMPEG_EXTENSIONS)."""
    for path in sorted(generated.iterdir()):
        ext = path.suffix[1:]
        _, codec, tagged = GENERATED[ext]
        track = read_track(generated, path.name)
        assert track.error is None, track
        assert (track.format, track.codec) == (ext, codec), track
        assert track.duration is not None and abs(track.duration - 1.5) < 0.1, track
        assert track.sample_rate in (8000, 16000, 44100, 48000), track
        if ext not in ("amr", "spx", "tta"):  # mono by request; TTA: mutagen does not say
            assert track.channels == 2, track
        if tagged:
            assert (track.title, track.artist, track.album, track.track) == (
                "Tïtle",
                "Ärtist",
                "Älbum",
                3,
            ), track
        else:
            assert track.title in ("Tïtle", "generated"), track


def test_aifc_compression_types(tmp_path: Path) -> None:
    """AIFF-C says its codec in its COMM chunk (mutagen reports only a sample size)."""
    cases = {
        "pcm_alaw": ("pcm_alaw", 8),
        "pcm_mulaw": ("pcm_mulaw", 8),
        "pcm_s16le": ("pcm_s16le", 16),
        "pcm_f32be": ("pcm_f32be", 32),
        "pcm_s24be": ("pcm_s24be", 24),
        "adpcm_ima_qt": ("adpcm_ima_qt", None),
    }
    for encoder, (codec, bits) in cases.items():
        path = tmp_path / f"{encoder}.aifc"
        cmd = [FFMPEG, "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "sine=duration=0.5"]
        subprocess.run([*cmd, "-c:a", encoder, "-f", "aiff", str(path)], check=True, timeout=60)
        track = read_track(tmp_path, path.name)
        assert (track.codec, track.bits_per_sample, track.error) == (codec, bits, None), encoder


@pytest.mark.parametrize("ext", ["wv", "dsf"])
def test_big_tags_of_new_formats_stay_within_the_read_budget(
    corpus: Path, tmp_path: Path, ext: str
) -> None:
    """A 17 MiB tag item (APEv2 in WavPack, ID3 in DSF) is more than the 16 MiB mutagen
    may read of one file: the file is listed with that reason, its name as title."""
    import mutagen
    from mutagen.apev2 import APEBinaryValue
    from mutagen.id3 import APIC

    source = {"wv": "silence-44-s.wv", "dsf": "without-id3.dsf"}[ext]
    path = tmp_path / f"big.{ext}"
    shutil.copyfile(corpus / source, path)
    audio: Any = mutagen.File(path)
    blob = os.urandom(17 * 1024 * 1024)
    if ext == "wv":
        audio.tags["Cover Art (Front)"] = APEBinaryValue(b"cover.jpg\0" + blob)
    else:
        audio.add_tags()
        audio.tags.add(APIC(encoding=3, mime="image/jpeg", type=3, desc="", data=blob))
    audio.save()
    track = read_track(tmp_path, path.name)
    assert track.error is not None and "16 MiB" in track.error, track
    assert track.title == "big"


@pytest.mark.parametrize("ext", ["mp2", "tta"])
def test_a_big_id3_tag_in_front_is_trimmed(tmp_path: Path, ext: str) -> None:
    """MPEG layer II and True Audio files may start with an ID3v2 tag, as MP3 files do:
    a 17 MiB picture in it is seeked over and the title still read."""
    from mutagen.id3 import APIC, ID3, TIT2

    path = generate(tmp_path, ext)
    tags = ID3()
    tags.add(TIT2(encoding=3, text=["Big"]))
    tags.add(APIC(encoding=3, mime="image/png", type=3, desc="", data=os.urandom(17 << 20)))
    tags.save(path)
    track = read_track(tmp_path, path.name)
    assert (track.title, track.error, track.codec) == ("Big", None, GENERATED[ext][1])
    assert track.duration is not None and abs(track.duration - 1.5) < 0.1, track


# ---------------------------------------------------------------------------- ffmpeg's probe


def test_ffmpegs_report_is_parsed() -> None:
    """Layouts, bit depths, per-input tags; a stream's own tags after its line are not
    the track's."""
    report = """\
Input #0, matroska,webm, from 'x.mka':
  Metadata:
    TITLE           : Première
    ARTIST          : Someone
    track           : 07/12
  Duration: 01:02:03.50, start: 0.000000, bitrate: 2116 kb/s
  Stream #0:0(eng): Audio: flac, 96000 Hz, 5.1(side), s32 (24 bit)
    Metadata:
      title           : not the track's title
At least one output file must be specified
"""
    facts = lib_mod._parse_probe(report, 1000)
    assert facts == {
        "duration": 3723.5,
        "codec": "flac",
        "sample_rate": 96000,
        "channels": 6,
        "bits_per_sample": 24,
        "bitrate": 2116000,
        "title": "Première",
        "artist": "Someone",
        "track": 7,
    }
    assert lib_mod._channels("mono") == 1
    assert lib_mod._channels("7.1(wide)") == 8
    assert lib_mod._channels("3 channels") == 3
    assert lib_mod._channels("something new") is None


def test_a_file_ffmpeg_cannot_read_is_listed_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.mka").write_bytes(b"not matroska at all" * 100)
    track = read_track(tmp_path, "junk.mka")
    assert track.error == "not a valid MKA file: Invalid data found when processing input"
    assert track.title == "junk" and track.codec is None


def test_a_file_without_audio_is_listed_with_that_reason(tmp_path: Path) -> None:
    path = tmp_path / "video.webm"
    cmd = [FFMPEG, "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=d=0.2:s=32x32"]
    subprocess.run([*cmd, "-c:v", "libvpx", str(path)], check=True, timeout=60)
    assert (
        read_track(tmp_path, path.name).error == "not a valid WEBM file: it holds no audio stream"
    )


def test_a_probe_that_hangs_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ffmpeg gets PROBE_TIMEOUT seconds; a stuck one is killed and the file listed."""
    stuck = tmp_path / "stuck-ffmpeg"
    stuck.write_text("#!/bin/sh\nexec sleep 60\n")
    stuck.chmod(0o755)
    monkeypatch.setattr(lib_mod, "PROBE_TIMEOUT", 0.2)
    (tmp_path / "a.caf").write_bytes(b"caff")
    track = read_track(tmp_path, "a.caf", str(stuck))
    assert track.error == "not a valid CAF file: ffmpeg took over 0.2 s to probe it"


def test_a_missing_ffmpeg_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.caf").write_bytes(b"caff")
    track = read_track(tmp_path, "a.caf", str(tmp_path / "no-such-ffmpeg"))
    assert track.error is not None
    assert track.error.startswith("not a valid CAF file: cannot run ffmpeg to probe it:")


def test_the_ffmpeg_only_formats_are_documented() -> None:
    """PROTOCOL.md's "Formats" names each format whose facts come from ffmpeg's probe."""
    protocol = (REPO / "PROTOCOL.md").read_text(encoding="utf-8")
    section = protocol[protocol.index("**Formats.**") : protocol.index("**Symbolic links**")]
    assert {ext for ext in FFMPEG_EXTENSIONS if f"`{ext}`" not in section} == set()


# ---------------------------------------------------------------------------- symbolic links


@pytest.fixture
def linked(tmp_path: Path) -> tuple[Path, Path]:
    """root/ with links inside, links leaving it, and loops through the outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder in (root / "real", outside / "dir"):
        folder.mkdir(parents=True)
    (root / "real" / "song.wav").write_bytes(b"RIFF inside")
    (outside / "secret.wav").write_bytes(b"RIFF outside")
    (outside / "dir" / "far.wav").write_bytes(b"RIFF far")
    (root / "alias.wav").symlink_to(root / "real" / "song.wav")
    (root / "escape.wav").symlink_to(outside / "secret.wav")
    (root / "escape-dir").symlink_to(outside / "dir")
    (root / "real" / "loop").symlink_to(root)
    (outside / "dir" / "back").symlink_to(root)  # leaves the root, and comes back
    (outside / "dir" / "self").symlink_to(outside / "dir")
    (root / "dangling.wav").symlink_to(root / "nowhere.wav")
    return root, outside


def test_each_mode_walks_its_links(linked: tuple[Path, Path]) -> None:
    """inside: links whose real path stays inside, under the link's own path; all: links
    leaving the root too, each real folder once (loops end); none: no link at all."""
    root, _ = linked
    assert [p for p, _ in walk(root)] == ["alias.wav", "real/song.wav"]
    assert [p for p, _ in walk(root, "all")] == [
        "alias.wav",
        "escape.wav",
        "real/song.wav",
        "escape-dir/far.wav",
    ]
    assert [p for p, _ in walk(root, "none")] == ["real/song.wav"]


def test_open_confined_in_each_mode(linked: tuple[Path, Path]) -> None:
    root, _ = linked
    with open_confined(root, "alias.wav") as f:
        assert f.read() == b"RIFF inside"
    for name in ("escape.wav", "escape-dir/far.wav"):
        with pytest.raises(NotFound):
            open_confined(root, name)
        with open_confined(root, name, "all") as f:
            assert f.read().startswith(b"RIFF")
    for name in ("alias.wav", "real/loop/real/song.wav", "escape.wav"):
        with pytest.raises(NotFound):
            open_confined(root, name, "none")
    with open_confined(root, "real/song.wav", "none") as f:
        assert f.read() == b"RIFF inside"
    for mode in ("inside", "all", "none"):  # names never climb out, whatever the mode
        for name in ("../outside/secret.wav", "/etc/passwd", "real/../../outside/secret.wav"):
            with pytest.raises(NotFound):
                open_confined(root, name, mode)  # type: ignore[arg-type]


def test_a_library_follows_its_mode(linked: tuple[Path, Path], tmp_path: Path) -> None:
    root, outside = linked
    with Library(root, tmp_path / "all.sqlite3", workers=0, follow_symlinks="all") as lib:
        lib.rescan()
        track = lib.resolve("escape-dir/far.wav")
        with lib.open_track(track) as f:
            assert f.read() == b"RIFF far"
        assert lib.track_path(track)[0] == (outside / "dir" / "far.wav").resolve()
    with Library(root, tmp_path / "none.sqlite3", workers=0, follow_symlinks="none") as lib:
        lib.rescan()
        assert [t.path for t in lib.tracks()] == ["real/song.wav"]
    with pytest.raises(ValueError, match="follow_symlinks"):
        Library(root, tmp_path / "x.sqlite3", follow_symlinks="some")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- end to end


def _listed(address: str) -> dict[str, dict[str, Any]]:
    done = run_cli("ls", "--json", server=address)
    assert done.returncode == 0, done.stderr
    return {track["path"]: track for track in json.loads(done.stdout)}


def _fetch_both(address: str, work: Path, index: int, path: str) -> tuple[str, str | None]:
    """``get -o`` then ``get --decode -o`` of one track; returns (path, decode failure)."""
    saved, decoded = work / f"{index}.orig", work / f"{index}.wav"
    done = run_cli("get", path, "-o", saved, server=address)
    assert done.returncode == 0, (path, done.stderr)
    done = run_cli("get", path, "--decode", "-o", decoded, server=address)
    if done.returncode == 0:
        assert decoded.read_bytes()[:4] == b"RIFF", path
        return path, None
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("musiclib: "), (path, done.stderr)
    assert done.returncode == DecodeFailed.exit_code, (path, done.stderr)
    assert "internal" not in lines[0].lower() and not decoded.exists(), (path, done.stderr)
    return path, lines[0]


@pytest.mark.e2e
def test_every_file_is_listed_served_and_decoded(
    corpus: Path, generated: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(corpus, root / "mutagen")
    shutil.copytree(generated, root / "ffmpeg")
    expected = {f"mutagen/{name}" for name in corpus_tracks(corpus)}
    expected |= {f"ffmpeg/{p.name}" for p in generated.iterdir()}
    work = tmp_path / "work"
    work.mkdir()
    with running_server(root) as server:
        listed = _listed(server.address)
        assert set(listed) == expected
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = dict(
                pool.map(
                    lambda job: _fetch_both(server.address, work, *job), enumerate(sorted(listed))
                )
            )
    for index, path in enumerate(sorted(listed)):
        assert (work / f"{index}.orig").read_bytes() == (root / path).read_bytes(), path
    # every failure was one clean line (_fetch_both); these are the ones that may fail
    failed = {path: reason for path, reason in results.items() if reason is not None}
    assert not {p for p in failed if p.startswith("ffmpeg/")}, failed
    assert {p for p in listed if lib_mod._extension(p) in UNDECODABLE} <= set(failed)
    sound = {f"mutagen/{name}" for name in CORPUS_DECODES}
    assert not sound & set(failed), failed


@pytest.mark.e2e
def test_follow_symlinks_on_the_command_line(linked: tuple[Path, Path], tmp_path: Path) -> None:
    root, outside = linked
    with running_server(root) as server:
        assert set(_listed(server.address)) == {"alias.wav", "real/song.wav"}
        done = run_cli("get", "escape.wav", "-o", tmp_path / "x", server=server.address)
        assert done.returncode == NotFound.exit_code, done.stderr
    with running_server(root, "--follow-symlinks", "all") as server:
        assert set(_listed(server.address)) == {
            "alias.wav",
            "escape.wav",
            "real/song.wav",
            "escape-dir/far.wav",
        }
        done = run_cli("get", "escape-dir/far.wav", "-o", tmp_path / "far", server=server.address)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "far").read_bytes() == (outside / "dir" / "far.wav").read_bytes()
    with running_server(root, "--follow-symlinks", "none") as server:
        assert set(_listed(server.address)) == {"real/song.wav"}
    done = run_cli("serve", "--root", root, "--follow-symlinks", "outside")
    assert done.returncode == 2 and "--follow-symlinks" in done.stderr, done.stderr
