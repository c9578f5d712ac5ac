"""``--channel NAME=SOURCE`` parsing, channel formats and the order of a query's tracks."""

from __future__ import annotations

import pytest

from musiclib.decode import AudioFormat
from musiclib.errors import UsageError
from musiclib.live.channels import (
    ChannelSpec,
    channel_format,
    parse_channel,
)
from musiclib.protocol import TrackInfo


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("kitchen=mic", ChannelSpec("kitchen", "mic")),
        ('desk=mic:"USB Audio"', ChannelSpec("desk", "mic", "USB Audio")),
        ("desk=mic:USB Audio", ChannelSpec("desk", "mic", "USB Audio")),
        ("lobby=track:Lantern Walk", ChannelSpec("lobby", "track", "Lantern Walk")),
        ("lobby=loop:'Tin Lanterns'", ChannelSpec("lobby", "loop", "Tin Lanterns")),
        (
            'radio=ffmpeg:-re -i "/srv/a feed.ogg"',
            ChannelSpec("radio", "ffmpeg", '-re -i "/srv/a feed.ogg"'),
        ),
        (
            "k=mic?rate=48000&channels=2&format=f32le",
            ChannelSpec("k", "mic", "", "f32le", 48000, 2),
        ),
        # a query string of other keys is part of the argument (a URL, say)
        (
            "r=ffmpeg:-i http://h/feed?id=3",
            ChannelSpec("r", "ffmpeg", "-i http://h/feed?id=3"),
        ),
    ],
)
def test_channel_specs_parse(text: str, spec: ChannelSpec) -> None:
    assert parse_channel(text) == spec


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("kitchen", "expected NAME=SOURCE"),
        ("kitchen=", "expected NAME=SOURCE"),
        ("bad name=mic", "a channel name is"),
        (".hidden=mic", "a channel name is"),
        ("k=radio", "unknown source 'radio'"),
        ("k=track:", "needs an argument"),
        ("k=mic?rate=10", "sample rate must be"),
        ("k=mic?channels=99", "channels must be"),
        ("k=mic?rate=fast", "whole numbers"),
        ("k=mic?format=u8", "unknown sample format"),
        ('k=ffmpeg:-i "unclosed', "cannot split"),
    ],
)
def test_bad_channel_specs_say_why(text: str, reason: str) -> None:
    with pytest.raises(UsageError, match=reason):
        parse_channel(text)


def test_channel_formats_default_by_kind_and_take_overrides() -> None:
    assert channel_format(parse_channel("k=mic")) == AudioFormat("s16le", 16000, 1)
    assert channel_format(parse_channel("k=loop:x")) == AudioFormat("s16le", 48000, 2)
    assert channel_format(parse_channel("k=ffmpeg:-i x?rate=22050")) == AudioFormat(
        "s16le", 22050, 2
    )


def test_several_matches_play_in_album_order() -> None:
    def track(path: str, album: str | None, number: int | None) -> TrackInfo:
        return TrackInfo(path=path, title=path, format="mp3", size=1, album=album, track=number)

    tracks = [
        track("b/2.mp3", "Beta", 2),
        track("a/10.mp3", "alpha", 10),
        track("a/9.mp3", "Alpha", 9),
        track("z.mp3", None, None),
        track("b/1.mp3", "Beta", 1),
    ]
    ordered = [t.path for t in sorted(tracks, key=TrackInfo.album_order)]
    assert ordered == ["a/9.mp3", "a/10.mp3", "b/1.mp3", "b/2.mp3", "z.mp3"]
