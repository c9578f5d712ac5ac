"""Regenerate musiclib's demo library: short, original, synthesised tracks.

Every track under ``library/`` is made from scratch by this script: a melody over a bass line,
a soft chord pad and a little percussion made from filtered noise bursts, each track with its
own key, mode, tempo and timbre.  Nothing is sampled from a recording, so the result can be
shipped as public domain (CC0).  The tracks are exported in the formats the server has to cope
with (WAV, AIFF, FLAC, MP3, Ogg Vorbis, Opus, AAC in M4A), tagged with title, artist, album,
track number, genre and date, into ``<Artist>/<Album>/<NN - Title>.<ext>`` folders.

Why pydub here: the clips are a few seconds long and live comfortably in memory, and pydub's
tone generators, fades, gain and overlay make the synthesis short to write, while its
``export()`` drives ffmpeg for the encoding and tagging.  This is a build-time tool only; the
server's streaming path does not use pydub.  ffmpeg comes from the ``imageio-ffmpeg`` wheel
(a static build with libmp3lame, libvorbis, libopus and friends); ffprobe is never needed.

Output is deterministic: the composition uses seeded random generators and ffmpeg runs with
its bit-exact flags, so a rerun rewrites identical bytes for every format this ffmpeg build
encodes reproducibly (all of the ones used here, at the time of writing).

Usage::

    python library/generate.py [--out DIR] [--ffmpeg PATH] [--no-verify]
"""

from __future__ import annotations

import argparse
import random
import shutil
import struct
import subprocess
import sys
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias

import mutagen

# pydub looks for ffmpeg on PATH when it is imported and warns when there is none; we point it
# at imageio-ffmpeg's binary in main(), so that warning is noise.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    # pydub has no type information (the project's mypy config may already ignore it).
    from pydub import AudioSegment  # type: ignore[import-untyped,unused-ignore]
    from pydub.effects import normalize  # type: ignore[import-untyped,unused-ignore]
    from pydub.generators import (  # type: ignore[import-untyped,unused-ignore]
        Pulse,
        Sawtooth,
        Sine,
        Square,
        Triangle,
        WhiteNoise,
    )

#: A ``pydub.AudioSegment``; pydub ships no type information.
Segment: TypeAlias = Any

# --------------------------------------------------------------------------------------------
# Output formats
# --------------------------------------------------------------------------------------------

#: Ask ffmpeg for reproducible output: no version strings, fixed Ogg serial numbers, ...
BITEXACT: Final[tuple[str, ...]] = ("-fflags", "+bitexact", "-flags:a", "+bitexact")


@dataclass(frozen=True)
class Encoding:
    """How one container/codec combination is produced with ffmpeg (through pydub)."""

    ext: str
    muxer: str
    codec: str
    bitrate: str | None = None
    params: tuple[str, ...] = ()
    #: Vorbis comments conventionally split TRACKNUMBER and TRACKTOTAL; others use "N/T".
    split_track_total: bool = False
    label: str = ""


ENCODINGS: Final[dict[str, Encoding]] = {
    # ffmpeg writes a RIFF LIST/INFO chunk (INAM, IART, IPRD, IPRT, ...) from -metadata.
    "wav": Encoding("wav", "wav", "pcm_s16le", label="PCM s16le"),
    # AIFF: ffmpeg's aiff muxer only stores tags in an ID3 chunk when asked to.
    "aiff": Encoding("aiff", "aiff", "pcm_s16be", params=("-write_id3v2", "1"), label="PCM s16be"),
    "flac": Encoding(
        "flac",
        "flac",
        "flac",
        params=("-compression_level", "8"),
        split_track_total=True,
        label="FLAC",
    ),
    "mp3": Encoding("mp3", "mp3", "libmp3lame", bitrate="96k", label="MP3 96k CBR"),
    "ogg": Encoding(
        "ogg",
        "ogg",
        "libvorbis",
        params=("-q:a", "2"),
        split_track_total=True,
        label="Vorbis q2",
    ),
    # libopus only takes 48/24/16/12/8 kHz; say 48 kHz explicitly rather than rely on ffmpeg's
    # automatic resampler choice.
    "opus": Encoding(
        "opus",
        "opus",
        "libopus",
        bitrate="64k",
        params=("-ar", "48000"),
        split_track_total=True,
        label="Opus 64k",
    ),
    # The "ipod" muxer writes an .m4a-style MP4; faststart puts the moov atom first so the
    # file can be streamed progressively.
    "m4a": Encoding(
        "m4a",
        "ipod",
        "aac",
        bitrate="96k",
        params=("-movflags", "+faststart"),
        label="AAC-LC 96k",
    ),
}

REQUIRED_ENCODERS: Final[frozenset[str]] = frozenset(e.codec for e in ENCODINGS.values())

# --------------------------------------------------------------------------------------------
# Music theory and patterns
# --------------------------------------------------------------------------------------------

MODES: Final[dict[str, tuple[int, ...]]] = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "lydian": (0, 2, 4, 6, 7, 9, 11),
}

#: Melody rhythms, in eighth notes per bar (each sums to 8).
RHYTHMS: Final[dict[str, tuple[tuple[int, ...], ...]]] = {
    "lively": (
        (2, 2, 2, 2),
        (1, 1, 2, 2, 2),
        (3, 1, 2, 2),
        (2, 1, 1, 4),
        (1, 1, 1, 1, 2, 2),
        (2, 2, 1, 1, 2),
        (3, 3, 2),
    ),
    "steady": ((2, 2, 2, 2), (4, 2, 2), (2, 2, 4), (3, 1, 4), (2, 2, 1, 1, 2), (3, 3, 2)),
    "calm": ((4, 4), (8,), (4, 2, 2), (6, 2), (2, 2, 4), (3, 1, 4)),
}

#: Bass patterns: (start eighth, length in eighths, chord tone 0/1/2 = root/third/fifth, octave).
BASS_PATTERNS: Final[dict[str, tuple[tuple[int, int, int, int], ...]]] = {
    "whole": ((0, 8, 0, 0),),
    "half": ((0, 4, 0, 0), (4, 4, 2, -1)),
    "pulse": ((0, 3, 0, 0), (3, 1, 0, 0), (4, 2, 2, 0), (6, 2, 0, 1)),
    "walk": ((0, 2, 0, 0), (2, 2, 1, 0), (4, 2, 2, 0), (6, 2, 1, 0)),
    "octaves": tuple((i, 1, 0, i % 2) for i in range(8)),
}

#: Drum patterns, 16 steps (sixteenth notes) per bar: kick, snare, hi-hat.
DRUM_PATTERNS: Final[dict[str, tuple[str, str, str]]] = {
    "four": ("x...x...x...x...", "....x.......x...", "..x...x...x...x."),
    "backbeat": ("x.....x.x.......", "....x.......x...", "x.x.x.x.x.x.x.x."),
    "busy": ("x..x..x.x.......", "....x..x....x...", "xxxxxxxxxxxxxxxx"),
    "sparse": ("x.......x.......", "............x...", "....x.......x..."),
    "hats": ("", "", "x..x..x.x..x..x."),
    "none": ("", "", ""),
}

#: Builds a pydub SignalGenerator for (frequency in Hz, sample rate).
WaveFactory = Callable[[float, int], Any]


def _pulse25(freq: float, rate: int) -> Any:
    return Pulse(freq, duty_cycle=0.25, sample_rate=rate)


WAVES: Final[dict[str, WaveFactory]] = {
    "sine": lambda f, r: Sine(f, sample_rate=r),
    "triangle": lambda f, r: Triangle(f, sample_rate=r),
    "square": lambda f, r: Square(f, sample_rate=r),
    "saw": lambda f, r: Sawtooth(f, sample_rate=r),
    "pulse25": _pulse25,
}


def midi_to_hz(note: int) -> float:
    return 440.0 * float(2.0 ** ((note - 69) / 12.0))


# --------------------------------------------------------------------------------------------
# The tracks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Album:
    artist: str
    title: str
    year: int
    genre: str


@dataclass(frozen=True)
class Track:
    album: Album
    number: int
    title: str
    fmt: str
    rate: int
    channels: int
    root: int  # MIDI note of the tonic, around middle C
    mode: str
    bpm: int
    bars: int
    progression: tuple[int, ...]  # scale degrees (0 = I), repeated; the last bar is always I
    lead: str
    bass: str
    bass_pattern: str
    drums: str
    rhythm: str
    seed: int
    pad: bool = True
    lead_cutoff: int = 5000


KETTLE = Album("Aurora Kettle", "Tin Lanterns", 2023, "Chiptune")
ONDES = Album("Les Ondes Éphémères", "Café du Matin", 2024, "Electronic")
PATCH = Album("The Quiet Modules", "Patch Notes", 2025, "Ambient")
NIGHT = Album("The Quiet Modules", "Night Shift", 2025, "Synthpop")

# Columns: album, number, title, format, sample rate, channels, tonic (MIDI), mode, bpm, bars,
# chord progression, lead wave, bass wave, bass pattern, drums, melody rhythm, seed.
# fmt: off
TRACKS: Final[tuple[Track, ...]] = (
    Track(KETTLE, 1, "Lantern Walk", "mp3", 44100, 2, 60, "major", 120, 8, (0, 4, 5, 3),
          "square", "triangle", "octaves", "four", "lively", 101, lead_cutoff=3500),
    Track(KETTLE, 2, "Copper Rain", "ogg", 44100, 1, 57, "minor", 92, 8, (0, 5, 2, 6),
          "pulse25", "square", "pulse", "backbeat", "steady", 102, lead_cutoff=3000),
    Track(KETTLE, 3, "Paper Boats", "wav", 22050, 1, 65, "major", 104, 4, (0, 3, 4, 0),
          "triangle", "sine", "half", "sparse", "steady", 103, pad=False),
    Track(ONDES, 1, "Brume", "flac", 32000, 1, 62, "dorian", 84, 4, (0, 3, 0, 6),
          "sine", "triangle", "whole", "hats", "calm", 201),
    Track(ONDES, 2, "Pâtisserie", "opus", 48000, 2, 67, "mixolydian", 112, 8, (0, 6, 3, 0),
          "saw", "triangle", "pulse", "backbeat", "lively", 202, lead_cutoff=2200),
    Track(ONDES, 3, "Rue des Lilas", "m4a", 44100, 2, 63, "major", 100, 8, (1, 4, 0, 5),
          "triangle", "sine", "walk", "four", "steady", 203),
    Track(PATCH, 1, "Low Battery", "opus", 48000, 1, 64, "minor", 72, 6, (0, 5, 3, 4),
          "sine", "sine", "whole", "sparse", "calm", 301),
    Track(PATCH, 2, "Idle Loop", "aiff", 22050, 1, 58, "lydian", 104, 4, (0, 1, 0, 4),
          "triangle", "triangle", "half", "hats", "calm", 302, pad=False),
    Track(NIGHT, 1, "Blinking Cursor", "mp3", 44100, 1, 61, "minor", 128, 12, (0, 5, 6, 4),
          "pulse25", "saw", "octaves", "busy", "lively", 401, lead_cutoff=2500),
    Track(NIGHT, 2, "Überstunden", "ogg", 44100, 2, 57, "dorian", 138, 12, (0, 3, 6, 3),
          "square", "triangle", "pulse", "four", "lively", 402, lead_cutoff=2800),
)
# fmt: on

COMMENT: Final = "Synthesised by musiclib library/generate.py. CC0 1.0 / public domain."
BEATS_PER_BAR: Final = 4
TAIL_MS: Final = 1500  # let the last note ring out after the final bar
HALF_BAR: Final = 4  # eighths
STEREO: Final = 2
MIN_SECONDS: Final = 10.0
MAX_SECONDS: Final = 30.0

# --------------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------------


class Synth:
    """Builds notes and drum hits at one sample rate, caching what repeats."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._cache: dict[tuple[object, ...], Segment] = {}

    def silence(self, ms: int) -> Segment:
        # AudioSegment.silent() defaults to 11025 Hz: always pass the rate.
        return AudioSegment.silent(duration=ms, frame_rate=self.rate)

    def tone(
        self, wave: str, note: int, ms: int, volume: float, attack: int, release: int
    ) -> Segment:
        """One enveloped note: ``attack`` ms fade-in, ``release`` ms fade-out at the end."""
        key = ("tone", wave, note, ms, volume, attack, release)
        if key not in self._cache:
            gen = WAVES[wave](midi_to_hz(note), self.rate)
            seg = gen.to_audio_segment(duration=ms, volume=volume)
            self._cache[key] = seg.fade_in(min(attack, ms // 2)).fade_out(min(release, ms))
        return self._cache[key]

    def noise(self, ms: int, volume: float, seed: int) -> Segment:
        """White noise from pydub's generator, which draws on the global ``random``: seed it."""
        state = random.getstate()
        random.seed(seed)
        try:
            return WhiteNoise(sample_rate=self.rate).to_audio_segment(duration=ms, volume=volume)
        finally:
            random.setstate(state)

    def kick(self) -> Segment:
        body = Sine(52, sample_rate=self.rate).to_audio_segment(duration=240, volume=-2.0)
        knock = Sine(98, sample_rate=self.rate).to_audio_segment(duration=60, volume=-8.0)
        click = self.noise(14, -10.0, seed=1).low_pass_filter(1800).fade_out(12)
        hit = body.fade_out(220).overlay(knock.fade_out(55)).overlay(click)
        return hit.fade_in(2)

    def snare(self) -> Segment:
        rattle = self.noise(190, -4.0, seed=2).high_pass_filter(900).low_pass_filter(6000)
        tone = Triangle(185, sample_rate=self.rate).to_audio_segment(duration=80, volume=-8.0)
        return rattle.fade_out(180).overlay(tone.fade_out(75)).fade_in(1)

    def hat(self) -> Segment:
        cutoff = min(6500, self.rate // 4)
        tick = self.noise(50, -6.0, seed=3)
        # pydub's filters are first order (6 dB/octave): run it twice for a crisper tick.
        return tick.high_pass_filter(cutoff).high_pass_filter(cutoff).fade_out(45).fade_in(1)


def place(bus: Segment, seg: Segment, at_ms: float) -> Segment:
    """Overlay ``seg`` onto ``bus`` at ``at_ms`` (pydub positions are whole milliseconds)."""
    return bus.overlay(seg, position=round(at_ms))


def chord_tones(progression_degree: int) -> tuple[int, int, int]:
    """Diatonic triad on a scale degree, as scale degrees."""
    return (progression_degree, progression_degree + 2, progression_degree + 4)


def degree_to_midi(root: int, scale: Sequence[int], degree: int) -> int:
    octave, step = divmod(degree, len(scale))
    return root + 12 * octave + scale[step]


def compose_melody(track: Track, chords: Sequence[int]) -> list[list[tuple[int, int | None]]]:
    """Per bar, a list of (length in eighths, scale degree or None for a rest).

    A seeded random walk over the scale that lands on chord tones on strong beats; bars 4-5 of
    each 8-bar period repeat bars 0-1 (a motif), and the last bar resolves to the tonic.
    """
    rng = random.Random(track.seed)
    rhythms = RHYTHMS[track.rhythm]
    low, high = -2, 9  # melody range in scale degrees around the upper tonic
    pos = rng.choice((0, 2, 4))
    bars: list[list[tuple[int, int | None]]] = []
    for index, chord in enumerate(chords):
        last = index == len(chords) - 1
        if last:
            third = chord_tones(0)[rng.choice((1, 2))]
            bars.append([(2, third), (6, 0 if abs(pos) < abs(pos - 7) else 7)])
            continue
        if index >= 4 and index % 8 in (4, 5) and chords[index - 4] == chord:
            bars.append(list(bars[index - 4]))
            continue
        notes: list[tuple[int, int | None]] = []
        eighth = 0
        for length in rng.choice(rhythms):
            strong = eighth % 4 == 0
            if eighth > 0 and rng.random() < 0.08:
                notes.append((length, None))
                eighth += length
                continue
            if strong or rng.random() < 0.4:
                candidates = [
                    t + 7 * o
                    for t in chord_tones(chord)
                    for o in (-1, 0, 1)
                    if low <= t + 7 * o <= high
                ]
                candidates.sort(key=lambda d: (abs(d - pos), d))
                pos = candidates[0] if rng.random() < 0.7 else candidates[1]
            else:
                pos += rng.choice((-2, -1, -1, 1, 1, 2))
                if pos < low or pos > high:
                    pos = max(low, min(high, 2 * (low if pos < low else high) - pos))
            notes.append((length, pos))
            eighth += length
        bars.append(notes)
    return bars


@dataclass(frozen=True)
class Timing:
    """Where things fall in one track."""

    beat_ms: float
    bars: int
    chords: tuple[int, ...]  # scale degree of each bar's chord

    @classmethod
    def of(cls, track: Track) -> Timing:
        chords = [track.progression[i % len(track.progression)] for i in range(track.bars - 1)]
        return cls(60000.0 / track.bpm, track.bars, (*chords, 0))

    @property
    def eighth_ms(self) -> float:
        return self.beat_ms / 2

    @property
    def bar_ms(self) -> float:
        return self.beat_ms * BEATS_PER_BAR

    @property
    def total_ms(self) -> int:
        return round(self.bar_ms * self.bars) + TAIL_MS

    def is_last(self, bar: int) -> bool:
        return bar == self.bars - 1


def lead_stem(track: Track, synth: Synth, timing: Timing) -> Segment:
    """The melody, an octave above the tonic, softened by a low-pass filter."""
    scale = MODES[track.mode]
    release_share = 0.5 if track.lead in ("sine", "triangle") else 0.75
    bus = synth.silence(timing.total_ms)
    for bar, notes in enumerate(compose_melody(track, timing.chords)):
        at = bar * timing.bar_ms
        for length, degree in notes:
            if degree is not None:
                ms = round(length * timing.eighth_ms * 0.92)
                if timing.is_last(bar) and length >= HALF_BAR:
                    ms = round(length * timing.eighth_ms) + TAIL_MS - 200  # ring out
                note = degree_to_midi(track.root + 12, scale, degree)
                tone = synth.tone(track.lead, note, ms, -14.0, 8, round(ms * release_share))
                bus = place(bus, tone, at)
            at += length * timing.eighth_ms
    return bus.low_pass_filter(track.lead_cutoff)


def bass_stem(track: Track, synth: Synth, timing: Timing) -> Segment:
    """The bass line, an octave below the tonic, following the chords."""
    scale = MODES[track.mode]
    bus = synth.silence(timing.total_ms)
    for bar, chord in enumerate(timing.chords):
        last = timing.is_last(bar)
        for start, length, tone_index, octave in BASS_PATTERNS[
            "whole" if last else track.bass_pattern
        ]:
            note = degree_to_midi(
                track.root - 12 + 12 * octave, scale, chord_tones(chord)[tone_index]
            )
            ms = round(length * timing.eighth_ms * 0.95) + (TAIL_MS - 200 if last else 0)
            tone = synth.tone(track.bass, note, ms, -12.0, 6, round(ms * 0.6))
            bus = place(bus, tone, bar * timing.bar_ms + start * timing.eighth_ms)
    return bus.low_pass_filter(900)


def pad_stem(track: Track, synth: Synth, timing: Timing) -> Segment:
    """A soft sustained sine triad per bar (silence if the track has no pad)."""
    scale = MODES[track.mode]
    bus = synth.silence(timing.total_ms)
    if not track.pad:
        return bus
    for bar, chord in enumerate(timing.chords):
        ms = round(timing.bar_ms) + (TAIL_MS if timing.is_last(bar) else 120)
        for degree in chord_tones(chord):
            note = degree_to_midi(track.root, scale, degree)
            tone = synth.tone("sine", note, ms, -24.0, round(ms * 0.3), round(ms * 0.45))
            bus = place(bus, tone, bar * timing.bar_ms)
    return bus


def drum_stem(track: Track, synth: Synth, timing: Timing) -> Segment:
    """Kick, snare and hi-hat; silent in the first bar, one last kick on the final downbeat."""
    kick_steps, snare_steps, hat_steps = DRUM_PATTERNS[track.drums]
    voices = ((kick_steps, synth.kick()), (snare_steps, synth.snare()), (hat_steps, synth.hat()))
    step_ms = timing.beat_ms / 4
    bus = synth.silence(timing.total_ms)
    for bar in range(1, timing.bars):
        for steps, hit in voices:
            for step, mark in enumerate(steps):
                if mark == "x" and not (timing.is_last(bar) and step > 0):
                    bus = place(bus, hit, bar * timing.bar_ms + step * step_ms)
    return bus.apply_gain(-7.0)


def render(track: Track) -> Segment:
    """Synthesise one track: the four stems mixed (and panned, for stereo tracks)."""
    synth = Synth(track.rate)
    timing = Timing.of(track)
    stereo = track.channels == STEREO
    stems = (  # (stem, gain in dB, pan when stereo)
        (lead_stem(track, synth, timing), 0.0, -0.25),
        (bass_stem(track, synth, timing), -1.0, 0.0),
        (pad_stem(track, synth, timing), 0.0, 0.3),
        (drum_stem(track, synth, timing), 0.0, 0.1),
    )
    mix = synth.silence(timing.total_ms).set_channels(track.channels)
    for stem, gain, pan in stems:
        leveled = stem.apply_gain(gain)
        mix = mix.overlay(leveled.pan(pan) if stereo else leveled)
    mix = normalize(mix, headroom=1.5)
    return mix.fade_in(20).fade_out(1200)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def relative_path(track: Track) -> Path:
    enc = ENCODINGS[track.fmt]
    name = f"{track.number:02d} - {track.title}.{enc.ext}"
    return Path(nfc(track.album.artist), nfc(track.album.title), nfc(name))


def album_size(track: Track) -> int:
    return sum(1 for t in TRACKS if t.album == track.album)


def tags_for(track: Track) -> dict[str, str]:
    enc = ENCODINGS[track.fmt]
    total = album_size(track)
    tags = {
        "title": track.title,
        "artist": track.album.artist,
        "album_artist": track.album.artist,
        "album": track.album.title,
        "track": str(track.number) if enc.split_track_total else f"{track.number}/{total}",
        "genre": track.album.genre,
        "date": str(track.album.year),
        "comment": COMMENT,
    }
    if enc.split_track_total:
        tags["tracktotal"] = str(total)
    return {key: nfc(value) for key, value in tags.items()}


def export(track: Track, audio: Segment, path: Path) -> None:
    """Encode with ffmpeg via pydub, writing to ``<path>.part`` then renaming over ``path``."""
    enc = ENCODINGS[track.fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        # Hand pydub an open file: given a path it opens the file itself and leaves it open.
        with part.open("wb") as handle:
            audio.export(
                handle,
                format=enc.muxer,
                codec=enc.codec,
                bitrate=enc.bitrate,
                parameters=[*BITEXACT, *enc.params],
                tags=tags_for(track),
                id3v2_version="4",
            )
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def riff_info(path: Path) -> dict[str, str]:
    """The LIST/INFO chunk of a RIFF WAVE file as {"INAM": ..., ...}."""
    data = path.read_bytes()
    info: dict[str, str] = {}
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return info
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, offset)
        body = data[offset + 8 : offset + 8 + size]
        if chunk_id == b"LIST" and body[:4] == b"INFO":
            sub = 4
            while sub + 8 <= len(body):
                sub_id, sub_size = struct.unpack_from("<4sI", body, sub)
                value = body[sub + 8 : sub + 8 + sub_size].split(b"\0", 1)[0]
                info[sub_id.decode("ascii", "replace")] = value.decode("utf-8", "replace")
                sub += 8 + sub_size + (sub_size & 1)
        offset += 8 + size + (size & 1)
    return info


def read_tags(path: Path) -> tuple[float, dict[str, str]]:
    """Duration in seconds and {title, artist, album, tracknumber} as the file stores them."""
    audio = mutagen.File(path, easy=True)
    if audio is None:
        raise ValueError("mutagen does not recognise the file")
    length = float(audio.info.length)
    if path.suffix == ".wav":
        info = riff_info(path)
        return length, {
            "title": info.get("INAM", ""),
            "artist": info.get("IART", ""),
            "album": info.get("IPRD", ""),
            "tracknumber": info.get("IPRT", info.get("ITRK", "")),
        }
    tags = audio.tags
    if tags is None:
        return length, {}
    if path.suffix == ".aiff":  # plain ID3 frames (no "easy" wrapper for AIFF)
        frames = {"title": "TIT2", "artist": "TPE1", "album": "TALB", "tracknumber": "TRCK"}
        return length, {k: str(tags[f].text[0]) for k, f in frames.items() if f in tags}
    found: dict[str, str] = {}
    for key in ("title", "artist", "album", "tracknumber"):
        values = tags.get(key)
        if values:
            found[key] = str(values[0])
    return length, found


def verify(ffmpeg: str, track: Track, path: Path) -> list[str]:
    """Problems found with one generated file (empty list: all good)."""
    problems: list[str] = []
    decoded = subprocess.run(
        [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        text=True,
        check=False,
    )
    if decoded.returncode != 0 or decoded.stderr.strip():
        problems.append(f"ffmpeg decode: rc={decoded.returncode} {decoded.stderr.strip()}")
    try:
        length, tags = read_tags(path)
    except (mutagen.MutagenError, OSError, ValueError, LookupError, AttributeError) as exc:
        return [*problems, f"mutagen: {exc}"]
    if not MIN_SECONDS <= length <= MAX_SECONDS:
        problems.append(f"duration {length:.2f} s is outside {MIN_SECONDS:g}-{MAX_SECONDS:g} s")
    expected = {
        "title": track.title,
        "artist": track.album.artist,
        "album": track.album.title,
    }
    for key, value in expected.items():
        if tags.get(key) != nfc(value):
            problems.append(f"tag {key}: expected {value!r}, found {tags.get(key)!r}")
    if tags.get("tracknumber", "").split("/")[0] != str(track.number):
        problems.append(f"tag tracknumber: found {tags.get('tracknumber')!r}")
    return problems


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def find_ffmpeg(explicit: str | None) -> str | None:
    if explicit:
        return explicit if Path(explicit).is_file() else shutil.which(explicit)
    try:
        import imageio_ffmpeg  # type: ignore[import-untyped,unused-ignore]

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        return shutil.which("ffmpeg")


def missing_encoders(ffmpeg: str) -> set[str]:
    listing = subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-encoders"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    available = {line.split()[1] for line in listing.splitlines() if len(line.split()) > 1}
    return set(REQUIRED_ENCODERS - available)


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="library root to write into (default: the folder this script lives in)",
    )
    parser.add_argument(
        "--ffmpeg", help="ffmpeg executable (default: imageio-ffmpeg's, else ffmpeg on PATH)"
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip decoding every file with ffmpeg and reading its tags back with mutagen",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ffmpeg = find_ffmpeg(args.ffmpeg)
    if ffmpeg is None:
        print(
            "error: ffmpeg not found. Install the imageio-ffmpeg package "
            "(pip install imageio-ffmpeg), put ffmpeg on PATH, or pass --ffmpeg PATH.",
            file=sys.stderr,
        )
        return 2
    try:
        missing = missing_encoders(ffmpeg)
    except OSError as exc:
        print(f"error: cannot run ffmpeg at {ffmpeg}: {exc}", file=sys.stderr)
        return 2
    if missing:
        print(
            f"error: {ffmpeg} lacks the encoders {', '.join(sorted(missing))}; "
            "use a fuller build (imageio-ffmpeg's static ffmpeg has them all).",
            file=sys.stderr,
        )
        return 2
    AudioSegment.converter = ffmpeg  # pydub otherwise runs whatever "ffmpeg" is on PATH

    out: Path = args.out
    total = 0
    failures = 0
    for track in TRACKS:
        path = out / relative_path(track)
        audio = render(track)
        export(track, audio, path)
        size = path.stat().st_size
        total += size
        enc = ENCODINGS[track.fmt]
        layout = "stereo" if track.channels == STEREO else "mono"
        rate = 48000 if track.fmt == "opus" else track.rate
        print(
            f"{human(size):>10}  {relative_path(track).as_posix()}  "
            f"[{enc.label}, {layout}, {rate} Hz, {len(audio) / 1000:.1f} s]",
            flush=True,
        )
        if not args.no_verify:
            for problem in verify(ffmpeg, track, path):
                failures += 1
                print(f"    FAILED: {problem}", flush=True)
    print(f"{human(total):>10}  total, {len(TRACKS)} files in {out}")
    if failures:
        print(f"error: {failures} verification problem(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
