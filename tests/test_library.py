"""Tests for musiclib.library: tags, broken files, scanning, symlinks, resolve, search, rescan."""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import dataclasses
import logging
import os
import random
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
from conftest import count_locates
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mutagen.id3 import TIT2
from mutagen.wave import WAVE

from musiclib import library as lib_mod
from musiclib.errors import Ambiguous, NotFound
from musiclib.index import TRACK_FIELDS
from musiclib.library import (
    SUPPORTED_EXTENSIONS,
    Library,
    fold,
    open_confined,
    read_track,
    scan,
)
from musiclib.protocol import TrackInfo

TAGS = {"title": "Tëst Song", "artist": "Thé Artist", "album": "Some Album", "track": "3/10"}

# extension -> (extra ffmpeg args, codec, sample rate)
FORMATS: dict[str, tuple[list[str], str, int]] = {
    "mp3": ([], "mp3", 44100),
    "ogg": ([], "vorbis", 44100),
    "opus": ([], "opus", 48000),
    "flac": ([], "flac", 44100),
    "m4a": ([], "aac", 44100),
    "wav": ([], "pcm_s16le", 44100),
    "aiff": (["-write_id3v2", "1"], "pcm_s16be", 44100),
    "wv": ([], "wavpack", 44100),
}


def ffmpeg(out: Path, *args: str, seconds: float = 1.0, tags: dict[str, str] | None = None) -> Path:
    """Encode a sine wave into ``out`` (format from its extension)."""
    meta = [a for k, v in (tags or {}).items() for a in ("-metadata", f"{k}={v}")]
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
        *meta, *args, str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tagged file per format, plus a few special ones; generated once."""
    d = tmp_path_factory.mktemp("media")
    for ext, (args, _, _) in FORMATS.items():
        ffmpeg(d / f"tagged.{ext}", *args, tags=TAGS)
    ffmpeg(d / "plain.aiff", tags={"title": "Named Chunk"})  # AIFF NAME chunk, no ID3
    ffmpeg(d / "Untagged Song.flac", "-map_metadata", "-1", seconds=0.5)
    ffmpeg(d / "stereo.mp3", "-ac", "2", "-ar", "22050", seconds=2.0)
    ffmpeg(d / "opus-inside.ogg", "-c:a", "libopus", tags={"title": "Opus In Ogg"})
    ffmpeg(d / "alac.m4a", "-c:a", "alac")
    return d


def put(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def paths(tracks: Iterator[TrackInfo] | tuple[TrackInfo, ...] | list[TrackInfo]) -> list[str]:
    return [t.path for t in tracks]


# --------------------------------------------------------------------------- tags


@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_tags_and_stream_facts_per_format(media: Path, ext: str) -> None:
    info = read_track(media, f"tagged.{ext}")
    _, codec, rate = FORMATS[ext]
    assert info.error is None
    assert info.path == f"tagged.{ext}"
    assert info.format == ext
    assert (info.title, info.artist, info.album, info.track) == (
        "Tëst Song", "Thé Artist", "Some Album", 3,
    )  # fmt: skip
    assert info.codec == codec
    assert info.sample_rate == rate
    assert info.channels == 1
    assert type(info.channels) is int  # mutagen's WavPack says True for mono
    assert info.duration == pytest.approx(1.0, abs=0.1)
    assert info.bitrate is not None and info.bitrate > 0
    assert info.size == (media / f"tagged.{ext}").stat().st_size
    # survives the wire
    assert TrackInfo.from_wire(info.to_wire()) == info


def test_stream_facts_stereo_mp3(media: Path) -> None:
    info = read_track(media, "stereo.mp3")
    assert (info.channels, info.sample_rate, info.codec) == (2, 22050, "mp3")
    assert info.duration == pytest.approx(2.0, abs=0.1)


def test_untagged_file_is_titled_by_its_name(media: Path) -> None:
    info = read_track(media, "Untagged Song.flac")
    assert info.error is None
    assert info.title == "Untagged Song"
    assert (info.artist, info.album, info.track) == (None, None, None)
    assert info.duration == pytest.approx(0.5, abs=0.05)


def test_aiff_name_chunk(media: Path) -> None:
    info = read_track(media, "plain.aiff")
    assert info.error is None
    assert info.title == "Named Chunk"


def test_ogg_holding_opus_falls_back_to_sniffing(media: Path) -> None:
    info = read_track(media, "opus-inside.ogg")
    assert info.error is None
    assert (info.format, info.codec, info.title) == ("ogg", "opus", "Opus In Ogg")


def test_alac_codec(media: Path) -> None:
    info = read_track(media, "alac.m4a")
    assert info.codec == "alac"
    assert info.bitrate is not None and info.bitrate > 0


def test_wav_id3_wins_over_riff_info_field_by_field(media: Path, tmp_path: Path) -> None:
    wav = put(media / "tagged.wav", tmp_path / "both.wav")
    wave_cls: Any = WAVE  # mutagen is untyped
    frame_cls: Any = TIT2
    audio = wave_cls(wav)
    audio.add_tags()
    audio.tags.add(frame_cls(encoding=3, text=["ID3 Title"]))
    audio.save()
    info = read_track(tmp_path, "both.wav")
    assert info.title == "ID3 Title"  # from ID3
    assert (info.artist, info.album, info.track) == ("Thé Artist", "Some Album", 3)  # from INFO


def riff(*chunks: bytes) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def chunk(cid: bytes, data: bytes, pad: bool = True) -> bytes:
    return cid + struct.pack("<I", len(data)) + data + (b"\0" if pad and len(data) % 2 else b"")


FMT = chunk(b"fmt ", struct.pack("<HHIIHH", 1, 2, 8000, 32000, 4, 16))


def test_riff_info_without_pad_bytes_and_latin1(tmp_path: Path) -> None:
    # odd-sized chunks with the pad byte forgotten; a Latin-1 value; LIST after the audio
    info_list = chunk(
        b"LIST",
        b"INFO"
        + chunk(b"INAM", b"Odd", pad=False)
        + chunk(b"IART", "Caf\xe9".encode("latin-1"), pad=False)
        + chunk(b"ITRK", b"07"),
        pad=False,
    )
    (tmp_path / "odd.wav").write_bytes(riff(FMT, chunk(b"data", b"\0" * 32000), info_list))
    info = read_track(tmp_path, "odd.wav")
    assert info.error is None
    assert (info.title, info.artist, info.track) == ("Odd", "Café", 7)
    assert info.duration == pytest.approx(1.0)
    assert (info.sample_rate, info.channels, info.codec) == (8000, 2, "pcm_s16le")


def test_riff_walker_is_bounded_and_tolerant(tmp_path: Path) -> None:
    # a LIST bigger than the cap is skipped, not read
    huge = b"LIST" + struct.pack("<I", 10_000_000) + b"INFO" + chunk(b"INAM", b"Nope")
    (tmp_path / "huge.wav").write_bytes(riff(FMT, huge))
    assert read_track(tmp_path, "huge.wav").title == "huge"
    # a truncated LIST still yields what is complete
    full = riff(FMT, chunk(b"LIST", b"INFO" + chunk(b"INAM", b"Kept") + chunk(b"IART", b"Lost")))
    (tmp_path / "cut.wav").write_bytes(full[:-3])
    cut = read_track(tmp_path, "cut.wav")
    assert (cut.title, cut.artist) == ("Kept", None)
    # garbage after the header ends the walk quietly
    (tmp_path / "junk.wav").write_bytes(riff(FMT) + b"\x01\x02\x03\x04\xff\xff\xff\xff")
    assert read_track(tmp_path, "junk.wav").title == "junk"


def test_track_number_forms() -> None:
    parse = lib_mod._parse_track
    assert [parse(v) for v in ("3", "03/10", " 7 ", 5, "x", "", 0, "0/4", True)] == [
        3, 3, 7, 5, None, None, None, None, None,
    ]  # fmt: skip


# --------------------------------------------------------------------------- broken files


def make_broken(d: Path, media: Path) -> dict[str, str]:
    """Broken files in ``d``; returns name -> the phrase its error must contain."""
    (d / "random.mp3").write_bytes(random.Random(0).randbytes(4096))
    (d / "empty.flac").write_bytes(b"")
    (d / "text.wav").write_text("this is not a wave file\n")
    (d / "truncated.m4a").write_bytes((media / "tagged.m4a").read_bytes()[:2000])
    return {
        "random.mp3": "not a valid MP3 file",
        "empty.flac": "empty",
        "text.wav": "not a valid WAV file",
        "truncated.m4a": "not a valid M4A file",
    }


def test_broken_files_get_an_error_not_an_exception(media: Path, tmp_path: Path) -> None:
    expected = make_broken(tmp_path, media)
    for name, phrase in expected.items():
        info = read_track(tmp_path, name)
        assert info.error is not None, name
        assert phrase in info.error
        assert "\n" not in info.error and len(info.error) <= 200
        assert str(tmp_path) not in info.error
        assert info.title == name.rsplit(".", 1)[0]
        assert info.format == name.rsplit(".", 1)[1]
        assert info.size == (tmp_path / name).stat().st_size
        assert info.duration is None and info.codec is None


def test_broken_files_do_not_stop_the_scan(media: Path, tmp_path: Path) -> None:
    expected = make_broken(tmp_path, media)
    put(media / "tagged.mp3", tmp_path / "b" / "good.mp3")
    put(media / "tagged.flac", tmp_path / "z" / "good.flac")
    found = {t.path: t for t in scan(tmp_path)}
    assert set(found) == set(expected) | {"b/good.mp3", "z/good.flac"}
    assert all(found[n].error for n in expected)
    assert found["b/good.mp3"].error is None and found["z/good.flac"].error is None


def test_read_track_of_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_track(tmp_path, "gone.mp3")


# --------------------------------------------------------------------------- scanning


def test_scan_skips_hidden_part_and_unsupported(media: Path, tmp_path: Path) -> None:
    mp3 = media / "tagged.mp3"
    for rel in (
        "a.mp3",
        "Loud.MP3",
        "sub/deeper/c.ogg",
        ".hidden.mp3",
        ".dir/x.mp3",
        "sub/.y.mp3",
        "down.mp3.part",
        "notes.txt",
        "cover.jpg",
        "noext",
    ):
        put(mp3, tmp_path / rel)
    (tmp_path / "dir.mp3").mkdir()  # a directory with an audio name is not a track
    found = sorted(paths(scan(tmp_path)))
    assert found == ["Loud.MP3", "a.mp3", "sub/deeper/c.ogg"]
    required = {"wav", "mp3", "ogg", "oga", "opus", "flac", "m4a", "mp4", "aac", "aif", "aiff"}
    assert required | {"wv"} <= SUPPORTED_EXTENSIONS


def test_scan_skips_names_that_are_not_utf8_text(media: Path, tmp_path: Path) -> None:
    data = (media / "tagged.mp3").read_bytes()
    for raw in (b"caf\xe9.mp3", b"new\nline.mp3", b"ok\xc3\xa9.mp3"):
        (Path(os.fsdecode(bytes(tmp_path) + b"/" + raw))).write_bytes(data)
    assert paths(scan(tmp_path)) == ["ok\xe9.mp3"]


def test_scan_is_deterministic(media: Path, tmp_path: Path) -> None:
    for rel in ("b/2.mp3", "a/1.mp3", "c.mp3", "a/0.mp3"):
        put(media / "tagged.mp3", tmp_path / rel)
    first = paths(scan(tmp_path))
    assert first == paths(scan(tmp_path))
    assert sorted(first) == ["a/0.mp3", "a/1.mp3", "b/2.mp3", "c.mp3"]


@pytest.fixture
def linked_tree(media: Path, tmp_path: Path) -> tuple[Path, Path]:
    """root/ with symlinks inside and to the outside; returns (root, outside)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    put(media / "tagged.mp3", root / "real" / "song.mp3")
    put(media / "tagged.flac", root / "other" / "piece.flac")
    put(media / "tagged.ogg", outside / "secret.ogg")
    put(media / "tagged.ogg", outside / "dir" / "private.ogg")
    (root / "alias.mp3").symlink_to(root / "real" / "song.mp3")
    (root / "aaa-link").symlink_to(root / "other")  # sorts before "other"
    (root / "hidden-link").symlink_to(root / ".stash")
    put(media / "tagged.opus", root / ".stash" / "stashed.opus")
    (root / "escape.ogg").symlink_to(outside / "secret.ogg")
    (root / "escape-dir").symlink_to(outside / "dir")
    (root / "real" / "loop").symlink_to(root)
    (root / "dangling.mp3").symlink_to(root / "nowhere.mp3")
    return root, outside


def test_symlinks_followed_only_inside_root(linked_tree: tuple[Path, Path]) -> None:
    root, _ = linked_tree
    found = sorted(paths(scan(root)))
    # the directory link to "other" is not walked twice: the real name wins;
    # a link into a hidden directory is followed (its target is inside the root)
    assert found == [
        "alias.mp3", "hidden-link/stashed.opus", "other/piece.flac", "real/song.mp3",
    ]  # fmt: skip


def test_open_track_confined(linked_tree: tuple[Path, Path]) -> None:
    root, outside = linked_tree
    lib = Library(root)
    lib.rescan()
    with lib.open_track(lib.resolve("alias.mp3")) as f:
        assert f.read() == (root / "real" / "song.mp3").read_bytes()
    for rel in (
        "escape.ogg",
        "escape-dir/private.ogg",
        "../outside/secret.ogg",
        str(outside / "secret.ogg"),
        "dangling.mp3",
        "real",
        "nope.mp3",
        "a\0b",
    ):
        with pytest.raises(NotFound):
            lib.open_track(TrackInfo(path=rel, title="x", format="ogg", size=1))
    with pytest.raises(NotFound):
        open_confined(root, "real/../../outside/secret.ogg")


def test_open_track_of_a_vanished_file(media: Path, tmp_path: Path) -> None:
    put(media / "tagged.mp3", tmp_path / "a.mp3")
    lib = Library(tmp_path)
    lib.rescan()
    track = lib.resolve("a.mp3")
    (tmp_path / "a.mp3").unlink()
    with pytest.raises(NotFound):
        lib.open_track(track)


def test_open_confined_refuses_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.mp3")
    with pytest.raises(NotFound):
        open_confined(tmp_path, "pipe.mp3")  # must not hang waiting for a writer
    assert paths(scan(tmp_path)) == []


def test_unreadable_directory_is_skipped(
    media: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(media / "tagged.mp3", tmp_path / "locked" / "x.mp3")
    put(media / "tagged.mp3", tmp_path / "open" / "y.mp3")
    real_open = os.open

    def open_(path: str, flags: int, *args: object, **kwargs: object) -> int:
        # the walk opens each directory to list it (tests run as root: no chmod 000)
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", open_)
    assert paths(scan(tmp_path)) == ["open/y.mp3"]


# --------------------------------------------------------------------------- Library


def test_library_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Library(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        Library(tmp_path / "file")
    (tmp_path / "link").symlink_to(tmp_path)
    assert Library(tmp_path / "link").root == tmp_path.resolve()


@pytest.fixture
def music(media: Path, tmp_path: Path) -> Library:
    layout = {
        "Beyoncé/Lemonade/01 Formation.mp3": "tagged.mp3",
        "Beyoncé/Lemonade/02 Sorry.flac": "tagged.flac",
        "Björk/Homogenic/track.mp3": "tagged.mp3",
        "Other/Album/track.mp3": "tagged.mp3",
        "Other/Album/Intro.ogg": "tagged.ogg",
        "Other/Live/Intro.ogg": "tagged.ogg",
        "single.wav": "tagged.wav",
        "Untagged Song.flac": "Untagged Song.flac",
    }
    for rel, src in layout.items():
        put(media / src, tmp_path / rel)
    lib = Library(tmp_path)
    assert lib.rescan() == len(layout)
    return lib


def test_tracks_sorted_by_path(music: Library) -> None:
    got = paths(music.tracks())
    assert got == sorted(got)
    assert len(got) == 8


def test_resolve_stages(music: Library) -> None:
    assert music.resolve("Other/Album/track.mp3").path == "Other/Album/track.mp3"  # exact
    assert music.resolve("./Other//Album/track.mp3").path == "Other/Album/track.mp3"
    assert music.resolve("02 Sorry.flac").path == "Beyoncé/Lemonade/02 Sorry.flac"  # bare name
    assert music.resolve("Album/Intro.ogg").path == "Other/Album/Intro.ogg"  # part of a path
    assert music.resolve("homogenic").path == "Björk/Homogenic/track.mp3"  # any case
    # the list rule: every word in title, artist, album or path, case and accents folded
    assert music.resolve("BEYONCE sorry").path == "Beyoncé/Lemonade/02 Sorry.flac"
    assert music.resolve("single.wav").path == "single.wav"
    # words are substrings, as for list: "ack.mp3" is in both track.mp3 paths
    with pytest.raises(Ambiguous):
        music.resolve("ack.mp3")


def test_resolve_ambiguous_lists_candidates(music: Library) -> None:
    with pytest.raises(Ambiguous) as err:
        music.resolve("track.mp3")
    assert err.value.candidates == ("Björk/Homogenic/track.mp3", "Other/Album/track.mp3")
    assert "'track.mp3' matches 2 tracks" in str(err.value)
    with pytest.raises(Ambiguous) as err:
        music.resolve("intro")
    assert err.value.candidates == ("Other/Album/Intro.ogg", "Other/Live/Intro.ogg")


def test_resolve_not_found_and_refused(music: Library) -> None:
    with pytest.raises(NotFound, match="no track matches 'nothing here'"):
        music.resolve("nothing here")
    for bad in (
        "",
        "/single.wav",
        "../single.wav",
        "Other/../single.wav",
        "sin\0gle.wav",
        "/",
        "./",
    ):
        with pytest.raises(NotFound):
            music.resolve(bad)


def test_search(music: Library) -> None:
    def search(q: str | None) -> list[str]:
        return paths(music.search(q))

    assert search(None) == search("") == search("   ") == paths(music.tracks())
    assert search("beyonce") == [
        "Beyoncé/Lemonade/01 Formation.mp3",
        "Beyoncé/Lemonade/02 Sorry.flac",
    ]
    assert search("BJORK") == ["Björk/Homogenic/track.mp3"]
    assert search("sorry LEMONADE") == ["Beyoncé/Lemonade/02 Sorry.flac"]
    assert search("sorry live") == []
    # tags count as well as paths: every tagged fixture says "Thé Artist"
    assert len(search("the artist")) == 7
    assert search("untagged") == ["Untagged Song.flac"]


def test_fold() -> None:
    assert fold("Beyoncé ÅNGSTRÖM Straße ﬁ") == "beyonce angstrom strasse fi"


def test_rescan_picks_up_added_and_deleted(music: Library, media: Path) -> None:
    root = music.root
    (root / "Other" / "Live" / "Intro.ogg").unlink()
    put(media / "tagged.opus", root / "New" / "fresh.opus")
    assert music.rescan() == 8
    got = paths(music.tracks())
    assert "Other/Live/Intro.ogg" not in got
    assert "New/fresh.opus" in got
    assert music.resolve("intro").path == "Other/Album/Intro.ogg"  # no longer ambiguous


def test_rescan_publishes_progress_and_sets_scanning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    (root / "old.mp3").write_bytes(b"")
    lib = Library(root, tmp_path / "index.sqlite3", workers=0)
    assert lib.rescan() == 1
    (root / "old.mp3").unlink()
    step = lib.BATCH
    for i in range(3 * step):
        (root / f"t{i:04}.mp3").write_bytes(b"")
    lib.COMMIT_ROWS, lib.COMMIT_SECONDS = step, 1e9  # commit after every batch
    seen: list[tuple[bool, int, bool]] = []
    real_read_rows = lib_mod.read_rows

    def watching(
        root: str, items: list[lib_mod.WorkItem], ffmpeg: str | None = None
    ) -> list[tuple[object, ...]]:
        visible = paths(lib.tracks())
        seen.append((lib.scanning, len(visible), "old.mp3" in visible))
        return real_read_rows(root, items, ffmpeg)

    monkeypatch.setattr(lib_mod, "read_rows", watching)
    assert not lib.scanning
    assert lib.rescan() == 3 * step
    # readers saw tracks appear batch by batch while the deleted one stayed until the end
    assert seen == [(True, 1, True), (True, step + 1, True), (True, 2 * step + 1, True)]
    assert not lib.scanning
    assert len(lib.tracks()) == 3 * step and lib.search("old") == []


def test_scanning_is_reset_when_the_scan_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_walk(
        root: Path, follow: str = "inside", on_folder: object = None
    ) -> Iterator[tuple[str, object]]:
        raise RuntimeError("boom")
        yield  # pragma: no cover

    monkeypatch.setattr(lib_mod, "walk", failing_walk)
    lib = Library(tmp_path)
    with pytest.raises(RuntimeError):
        lib.rescan()
    assert lib.scanning is False


def test_readers_during_a_threaded_rescan(media: Path, tmp_path: Path) -> None:
    for i in range(150):
        put(media / "tagged.mp3", tmp_path / f"d{i % 7}" / f"{i:03}.mp3")
    lib = Library(tmp_path)
    worker = threading.Thread(target=lib.rescan)
    worker.start()
    while worker.is_alive():  # reads never fail and always see sorted, consistent views
        got = paths(lib.tracks())
        assert got == sorted(got)
        assert len(lib.search("thé")) <= 150
    worker.join()
    assert len(lib.tracks()) == 150
    assert not lib.scanning


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ext=st.sampled_from(sorted(FORMATS)),
    cut=st.floats(min_value=0.0, max_value=1.0),
    flip=st.integers(min_value=0, max_value=10_000),
)
def test_mangled_files_never_raise(
    media: Path, tmp_path: Path, ext: str, cut: float, flip: int
) -> None:
    data = bytearray((media / f"tagged.{ext}").read_bytes())
    data = data[: int(len(data) * cut)]
    if data:
        data[flip % len(data)] ^= 0xFF
    (tmp_path / f"m.{ext}").write_bytes(bytes(data))
    info = read_track(tmp_path, f"m.{ext}")
    assert info.size == len(data)
    assert info.error is None or "\n" not in info.error
    TrackInfo.from_wire(info.to_wire())  # always valid on the wire


def test_an_unwritable_cache_falls_back_to_a_temporary_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, media: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("the cache directory cannot be created under a file")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    root = tmp_path / "lib"
    put(media / "tagged.mp3", root / "a.mp3")
    with caplog.at_level(logging.WARNING, logger="musiclib.index"):
        lib = Library(root)
    assert "using a temporary one" in caplog.text
    assert not lib.index.path.is_relative_to(blocker)
    assert lib.rescan() == 1 and paths(lib.tracks()) == ["a.mp3"]
    lib.close()
    assert not lib.index.path.parent.exists()  # the temporary folder went with it


def test_the_default_index_is_per_root_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with Library(tmp_path / "one") as one, Library(tmp_path / "two") as two:
        assert one.index.path.parent == two.index.path.parent == tmp_path / "cache" / "musiclib"
        assert one.index.path != two.index.path
        assert one.index.path.name.startswith("one-")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: absolute only
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with Library(tmp_path / "one") as lib:
        assert lib.index.path.parent == tmp_path / "home" / ".cache" / "musiclib"


def test_a_broken_worker_pool_falls_back_to_reading_in_the_scanning_thread(
    media: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "lib"
    for i in range(12):
        put(media / "tagged.flac", root / f"{i:02}.flac")
    lib = Library(root, tmp_path / "index.sqlite3", workers=2)
    lib.PARALLEL_MIN, lib.BATCH = 1, 2

    def broken_pool(*args: object, **kwargs: object) -> concurrent.futures.Executor:
        pool = concurrent.futures.ThreadPoolExecutor(1)
        original = pool.submit
        calls = []

        def submit(fn: Any, *a: Any) -> concurrent.futures.Future[Any]:
            calls.append(a)
            if len(calls) < 3:
                return original(fn, *a)
            failed: concurrent.futures.Future[Any] = concurrent.futures.Future()
            failed.set_exception(concurrent.futures.process.BrokenProcessPool("worker died"))
            return failed

        pool.submit = submit  # type: ignore[method-assign]
        return pool

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", broken_pool)
    assert lib.rescan() == 12  # two batches from the pool, the rest in the thread
    assert paths(lib.tracks()) == [f"{i:02}.flac" for i in range(12)]
    assert all(t.error is None and t.codec == "flac" for t in lib.tracks())


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_tags_are_read_in_order_while_the_walk_still_finds_files(
    media: Path, tmp_path: Path, pool: Any
) -> None:
    """The pool starts once enough files wait, reads whole batches while the list
    still grows, and the rows come back in the list's order (the last batch short)."""
    root = tmp_path / "lib"
    names = [f"{i:02}.flac" for i in range(11)]
    for name in names:
        put(media / "tagged.flac", root / name)
    todo: list[lib_mod.WorkItem] = []
    knobs = {"batch": 3, "parallel_min": 4, "in_flight": 1}
    with lib_mod._TagReaders(str(root), todo, workers=2, pool=pool, ffmpeg=None, **knobs) as r:
        for i, name in enumerate(names):
            found = (root / name).stat()
            todo.append((name, found.st_size, found.st_mtime_ns, found.st_ino))
            r.feed()
            started = r._executor is not None
            assert started == (i >= 3)  # from the fourth file on: the walk goes on meanwhile
        assert r._submitted == 6  # whole batches, at most in_flight x workers of them
        rows = [row for batch in r.rows(threading.Event()) for row in batch]
    assert [row[0] for row in rows] == names
    assert all(row[TRACK_FIELDS.index("codec")] == "flac" for row in rows)


def test_the_index_columns_follow_the_track_fields(tmp_path: Path) -> None:
    """A field added to TrackInfo must get a column (and a new schema version)."""
    import sqlite3

    from musiclib.index import COLUMNS, Index

    index = Index(tmp_path, tmp_path / "index.sqlite3")
    with sqlite3.connect(index.path) as conn:
        columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(tracks)"))
    index.close()
    assert columns == COLUMNS
    assert COLUMNS[: len(dataclasses.fields(TrackInfo))] == tuple(
        f.name for f in dataclasses.fields(TrackInfo)
    )


# --------------------------------------------------------------------------- the name cache


async def test_a_resolved_name_is_remembered_until_a_rescan_changes_the_index(
    tmp_path: Path,
) -> None:
    """A stream's name and stored sha256 come from memory (no worker thread) while the
    index is unchanged; after a rescan that renamed, replaced or deleted files, never
    from before it: the renamed name is not found, the replaced file is the new one."""
    from musiclib.maintainer import Maintainer
    from musiclib.server import ServerConfig

    root = tmp_path / "lib"
    root.mkdir()
    (root / "a.flac").write_bytes(os.urandom(3000))
    (root / "b.flac").write_bytes(os.urandom(2000))
    lib = Library(root, index=tmp_path / "index.sqlite", workers=0)
    lib.rescan()
    asked = count_locates(lib)
    maintainer = Maintainer(lib, ServerConfig(root=root))

    first = await maintainer.locate("a.flac")
    assert await maintainer.locate("a.flac") == first
    assert await maintainer.locate("./a.flac") == first  # another spelling: its own entry
    assert asked == ["a.flac", "./a.flac"]
    replaced = await maintainer.locate("b.flac")
    assert replaced[0].size == 2000

    # a rescan that changes nothing leaves the index's generation (and the cache) alone
    lib.rescan()
    await maintainer.locate("a.flac")
    assert asked == ["a.flac", "./a.flac", "b.flac"]

    os.rename(root / "a.flac", root / "c.flac")
    (root / "b.flac").write_bytes(os.urandom(5000))
    lib.rescan()
    with pytest.raises(NotFound):
        await maintainer.locate("a.flac")
    assert (await maintainer.locate("c.flac"))[0].path == "c.flac"
    assert (await maintainer.locate("b.flac"))[0].size == 5000

    (root / "c.flac").unlink()
    lib.rescan()
    with pytest.raises(NotFound):
        await maintainer.locate("c.flac")
    lib.close()


async def test_the_stored_sha256_of_a_version_is_read_once(tmp_path: Path) -> None:
    """A stored digest is kept per file version (path, size, mtime): the next stream of
    that version needs no query; another version of the file is asked of the index."""
    from musiclib.maintainer import Maintainer
    from musiclib.server import ServerConfig

    root = tmp_path / "lib"
    root.mkdir()
    (root / "a.flac").write_bytes(b"one")
    lib = Library(root, index=tmp_path / "index.sqlite", workers=0)
    lib.rescan()
    maintainer = Maintainer(lib, ServerConfig(root=root))
    st = (root / "a.flac").stat()
    track = lib.resolve("a.flac")
    lib.store_sha256(track, st, "d" * 64)
    queries: list[str] = []
    real = lib.stored_sha256

    def stored(track: TrackInfo, st: os.stat_result) -> str | None:
        queries.append(track.path)
        return real(track, st)

    lib.stored_sha256 = stored  # type: ignore[method-assign]
    assert await maintainer.stored_sha256(track, st) == "d" * 64
    assert await maintainer.stored_sha256(track, st) == "d" * 64
    assert queries == ["a.flac"]
    (root / "a.flac").write_bytes(b"two, longer")
    assert await maintainer.stored_sha256(track, (root / "a.flac").stat()) is None
    assert queries == ["a.flac", "a.flac"]
    lib.close()


async def test_requests_for_one_name_share_one_lookup(
    autojump_clock: object,
) -> None:
    """500 streams of one new name cost one worker-thread lookup, not 500; a lookup
    during which the index changed is answered but not remembered; a failed one is
    tried again by each request that waited for it."""
    import trio
    import trio.testing

    from musiclib.maintainer import TrackCache

    generation = [1]
    asked: list[str] = []
    release = trio.Event()

    async def lookup(name: str) -> tuple[TrackInfo, int]:
        asked.append(name)
        await release.wait()
        if name == "missing":
            raise NotFound(f"no track matches {name!r}")
        return TrackInfo(path=name, title=name, format="flac", size=generation[0]), 0

    cache = TrackCache(lambda: generation[0], lookup)
    got: list[tuple[TrackInfo, int]] = []

    async def ask(name: str) -> None:
        got.append(await cache.locate(name))

    async with trio.open_nursery() as nursery:
        for _ in range(500):
            nursery.start_soon(ask, "x")
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert asked == ["x"] and len(got) == 500 and len({id(g) for g in got}) == 1

    # the index moves on while a lookup runs: its answer is given, not kept
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "y")
        await trio.testing.wait_all_tasks_blocked()
        generation[0] = 2
        release.set()
    assert asked == ["x", "y"] and len(cache) == 0  # generation 2 dropped "x" as well
    await cache.locate("y")
    assert asked == ["x", "y", "y"] and len(cache) == 1

    # a failure: those who waited for it ask again themselves
    failures: list[Exception] = []

    async def ask_missing() -> None:
        try:
            await cache.locate("missing")
        except NotFound as exc:
            failures.append(exc)

    release = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ask_missing)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert len(failures) == 3 and asked.count("missing") == 3
