"""PROTOCOL.md with no open question: one test for each place a reader had to guess.

A client for this protocol was written in another language from PROTOCOL.md
alone, and it found the places where the text left it guessing (issue 12).
Each test here takes one of those questions, states the answer PROTOCOL.md
now gives, and checks that the reference server does exactly that. The
server is the real one (:class:`musiclib.server.Server`) over trio's memory
streams, and the client side is :class:`Wire`: frames built and read from
the text alone (a 5-byte header, a msgpack map), with no state machine of
ours in between, as the other-language client had.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import subprocess
import unicodedata
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from musiclib.decode import ffmpeg_executable
from musiclib.errors import MessageError, RemoteProtocolError
from musiclib.library import SUPPORTED_EXTENSIONS, Library, read_track
from musiclib.protocol import (
    MAX_FILTER_LENGTH,
    MAX_QUERY_WORDS,
    MAX_TRACK_NAME,
    SUPPORTED_VERSIONS,
    Connection,
    Hello,
    Role,
    StreamEnd,
    StreamRequest,
    StreamStart,
    Welcome,
    decode_message,
    encode_message,
)
from musiclib.server import Server, ServerConfig
from musiclib.text import fold

SPEC = (Path(__file__).resolve().parent.parent / "PROTOCOL.md").read_text(encoding="utf-8")
#: seconds any one read from the server may take before the test gives up (a
#: deadline against hanging, not a timing assertion: memory streams are instant)
READ_DEADLINE = 30.0
#: the messages that end a reply (and the one that ends a handshake)
FINAL = {"welcome", "list_end", "track_info", "rescan_status", "stream_end", "error"}


# ---------------------------------------------------------------------------- the wire


def frame(kind: int, body: bytes) -> bytes:
    return struct.pack(">BI", kind, len(body)) + body


def message(**fields: Any) -> bytes:
    """A kind-1 frame of the map ``fields`` (``type`` among them), as PROTOCOL.md says."""
    return frame(1, msgpack.packb(fields, use_bin_type=True))


class Wire:
    """One connection as a client written from PROTOCOL.md sees it: frames, nothing more."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = b""

    async def send(self, **fields: Any) -> None:
        await self.stream.send_all(message(**fields))

    async def frame(self) -> tuple[int, Any] | None:
        """The next frame: ``(1, map)``, ``(2, bytes)``; ``None`` at a clean end of file."""
        with trio.fail_after(READ_DEADLINE):
            while True:
                if len(self.buf) >= 5:
                    kind, length = struct.unpack_from(">BI", self.buf)
                    if len(self.buf) >= 5 + length:
                        body, self.buf = self.buf[5 : 5 + length], self.buf[5 + length :]
                        return kind, msgpack.unpackb(body) if kind == 1 else body
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    assert not self.buf, "the server closed in the middle of a frame"
                    return None
                self.buf += chunk

    async def reply(self) -> list[Any]:
        """The frames of one reply, up to and including the message that ends it."""
        out: list[Any] = []
        while True:
            got = await self.frame()
            assert got is not None, f"closed in the middle of a reply: {out}"
            kind, body = got
            out.append(body)
            if kind == 1 and body["type"] in FINAL:
                return out

    async def last(self) -> dict[str, Any]:
        """The message that ends the next reply."""
        end: dict[str, Any] = (await self.reply())[-1]
        return end

    async def rest(self) -> list[Any]:
        """Every frame until the server closes the connection."""
        out = []
        while (got := await self.frame()) is not None:
            out.append(got[1])
        return out

    async def tracks(self, **request: Any) -> list[str]:
        """The paths a ``list`` gives, in order."""
        await self.send(type="list", **request)
        reply = await self.reply()
        assert reply[-1]["type"] == "list_end", reply[-1]
        return [t["path"] for page in reply[:-1] for t in page["tracks"]]


@asynccontextmanager
async def wire(server: Server, *, hello: dict[str, Any] | None = None) -> AsyncIterator[Wire]:
    """A :class:`Wire` to ``server.handle``; says ``hello`` (version 1) first unless
    ``hello`` is ``{}``; closes its end after the block and lets the server finish."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, server_stream, "memory")
        peer = Wire(client_stream)
        if hello is None:
            await peer.send(type="hello", version=1, client="spec")
            welcome = await peer.last()
            assert welcome["type"] == "welcome", welcome
        try:
            yield peer
        finally:
            await client_stream.aclose()


def put(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``serve(files, **config)``: a server over a fresh folder holding ``files``, indexed."""
    libraries: list[Library] = []

    def make(files: dict[str, bytes], *, root: Path | None = None, **config: Any) -> Server:
        root = root or tmp_path / f"lib{len(libraries)}"
        put(root, files)
        library = Library(root, tmp_path / f"index{len(libraries)}.sqlite3", workers=0)
        libraries.append(library)
        library.rescan()
        return Server(library, ServerConfig(root=root, **config))

    yield make
    for library in libraries:
        library.close()


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    """A mono 16-bit WAV of a quiet sawtooth."""
    samples = b"".join(struct.pack("<h", (i % 200) - 100) for i in range(int(seconds * rate)))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples)
    return buf.getvalue()


# ---------------------------------------------------------------------------- track names

NAMES = {
    "Les Ondes Éphémères/Café du Matin/01 - Brume.flac": b"x",
    "Les Ondes Éphémères/Café du Matin/02 - Pâtisserie.opus": b"x",
    "Straße/Nacht.mp3": b"x",
    "Other/Album/track.mp3": b"x",
    "Other/Live/track.mp3": b"x",
    "a/b.mp3": b"x",
    "a/b.mp3 (copy)/b.mp3": b"x",
}


async def test_a_track_name_is_cleaned_then_exact_then_a_list_query(
    serve: Callable[..., Server],
) -> None:
    """How a TRACK name is normalised before matching: components cleaned (``./x``,
    ``a/./b``, ``a//b``, ``a/b/``), then the exact path, then the list rule, which
    folds case (full case folding) and Unicode normalisation (NFC = NFD)."""
    server = serve(NAMES)

    async def info(name: str) -> str:
        await peer.send(type="info", track=name)
        end = await peer.last()
        return str(end["track"]["path"]) if end["type"] == "track_info" else end["code"]

    async with wire(server) as peer:
        for name in ("./a/b.mp3", "a/./b.mp3", "a//b.mp3", "a/b.mp3/", ".//a/b.mp3/."):
            assert await info(name) == "a/b.mp3", name
        # the exact path wins although another path contains it as well
        assert await info("a/b.mp3") == "a/b.mp3"
        # folding: case (ß is "ss"), accents, and NFC and NFD alike
        assert await info("STRASSE nacht") == "Straße/Nacht.mp3"
        brume = "Les Ondes Éphémères/Café du Matin/01 - Brume.flac"
        for name in ("Brume", "café brume", "CAFE BRUME", unicodedata.normalize("NFD", "café b")):
            assert await info(name) == brume, name
        # the exact step compares code points: an NFD spelling of a whole path is no
        # exact match, and the list rule then finds the same track
        assert await info(unicodedata.normalize("NFD", brume)) == brume
        for name in ("", "/a/b.mp3", "a/../a/b.mp3", "a/b\0.mp3", "./", "   ", "\u0301"):
            assert await info(name) == "not_found", repr(name)
        # too long for a query, not an exact path: not found; too long for a name at all:
        # a bad request
        assert await info(" ".join(["b"] * (MAX_QUERY_WORDS + 1))) == "not_found"
        assert await info("b" * (MAX_TRACK_NAME + 1)) == "bad_request"
        assert await info("a/b.mp3") == "a/b.mp3"  # the connection went on


async def test_list_queries_and_track_names_match_the_same_way(
    serve: Callable[..., Server],
) -> None:
    """Issue 13 as well: whatever ``list`` finds once, ``info`` finds; several are
    ``ambiguous`` with the very tracks ``list`` gave; none is ``not_found``."""
    server = serve(NAMES)
    queries = [
        "cafe brume",
        "Cafe",
        "café",
        "track",
        "album track",
        "b.mp3",
        "copy",
        "strasse",
        "nothing like it",
        "Patisserie OPUS",
        "02 -",
    ]
    async with wire(server) as peer:
        for query in queries:
            listed = await peer.tracks(query=query)
            await peer.send(type="info", track=query)
            end = await peer.last()
            if len(listed) == 1:
                assert end["type"] == "track_info" and end["track"]["path"] == listed[0], query
            elif listed:
                assert (end["type"], end["code"]) == ("error", "ambiguous"), query
                assert end["candidates"] == listed, query  # the same tracks, the same order
                assert not end.get("fatal")
            else:
                assert (end["type"], end["code"]) == ("error", "not_found"), query


# ---------------------------------------------------------------------------- which files


def test_the_extension_list_in_protocol_md_is_the_servers() -> None:
    """Which files are tracks: PROTOCOL.md's list of extensions is exactly the server's."""
    section = SPEC[SPEC.index("## Which files are tracks") :]
    listed = section[: section.index("(the part after")]
    assert set(re.findall(r"`(\w+)`", listed)) == SUPPORTED_EXTENSIONS


async def test_which_files_are_tracks_and_names_that_are_not_utf8(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    """Regular files with a listed extension (any case); hidden, ``.part``, control
    characters and names that are not UTF-8 are left out (no escaped spelling is
    invented); every other character is fine, unassigned code points included."""
    root = tmp_path / "lib"
    kept = [
        "Loud.MP3",
        "no\u00a0break.flac",  # a no-break space: not printable to Python, fine here
        "family \U0001f468\u200d\U0001f469\u200d\U0001f467.ogg",  # zero-width joiners
        "new \U0001fae8.opus",  # unassigned in Python 3.11's Unicode tables
        "dir.mp3 album/x.wav",
    ]
    left_out = [".hidden.mp3", "x/.y/z.mp3", "down.mp3.part", "part.part/a.mp3", "notes.txt"]
    left_out += ["new\nline.mp3", "bell\x07.mp3", "c1\x85.mp3", "noext", "a.MP3X"]
    put(root, dict.fromkeys(kept + left_out, b"x"))
    os.mkfifo(root / "fifo.mp3")
    (root / "folder.flac").mkdir()
    # Latin-1 names, not UTF-8: a file, and a folder with a file in it
    os.mkdir(os.fsencode(root) + b"/latin\xe9")
    for raw in (b"/caf\xe9.mp3", b"/latin\xe9/in.mp3"):
        with open(os.fsencode(root) + raw, "wb") as f:
            f.write(b"x")
    server = serve({}, root=root)
    async with wire(server) as peer:
        assert await peer.tracks() == sorted(kept)
        await peer.send(type="info", track="caf")
        assert (await peer.last())["code"] == "not_found"


async def test_symlinks_that_stay_inside_the_root(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    """Followed, under the link's own path; a file and a link to it are two tracks; a
    folder is walked once, under its plain path; links that leave the root are absent."""
    root, outside = tmp_path / "lib", tmp_path / "outside"
    put(root, {"real/song.wav": b"x", "other/piece.flac": b"y"})
    put(outside, {"secret.mp3": b"z", "dir/private.mp3": b"z"})
    (root / "alias.wav").symlink_to(root / "real" / "song.wav")
    (root / "aaa-other").symlink_to(root / "other")  # sorts first, still walked once
    (root / "hidden-link").symlink_to(root / ".stash")
    put(root, {".stash/stashed.opus": b"s"})
    (root / "real" / "loop").symlink_to(root)
    (root / "escape.mp3").symlink_to(outside / "secret.mp3")
    (root / "escape-dir").symlink_to(outside / "dir")
    (root / "dangling.mp3").symlink_to(root / "nowhere.mp3")
    server = serve({}, root=root)
    async with wire(server) as peer:
        assert await peer.tracks() == [
            "alias.wav",
            "hidden-link/stashed.opus",
            "other/piece.flac",
            "real/song.wav",
        ]
        for name, size in (("alias.wav", 1), ("real/song.wav", 1)):
            await peer.send(type="stream", track=name)
            reply = await peer.reply()
            assert reply[0]["path"] == name and reply[0]["size"] == size
            assert reply[-1]["type"] == "stream_end"
        for name in ("escape.mp3", "escape-dir/private.mp3", "aaa-other/piece.flac"):
            await peer.send(type="info", track=name)
            end = await peer.last()
            # the outside is absent, and so is the second name of a folder walked once:
            # a name that is no listed path is only a query
            assert end["code"] == "not_found", name


# ---------------------------------------------------------------------------- bad messages


@pytest.mark.parametrize(
    "first",
    [
        message(type="list"),
        message(type="no_such_type"),
        message(type="hello", version=0),
        message(type="hello", version="1"),
        message(type="hello"),
        message(type="welcome", version=1, server="me"),
        frame(1, b"\xc1"),
        frame(2, b"data"),
        frame(9, b""),
    ],
    ids=[
        "request",
        "unknown-type",
        "version-0",
        "version-str",
        "no-version",
        "server-message",
        "not-msgpack",
        "data",
        "unknown-kind",
    ],
)
async def test_anything_but_a_valid_hello_first_is_a_fatal_bad_request(
    serve: Callable[..., Server], first: bytes
) -> None:
    server = serve({"a.mp3": b"x"})
    async with wire(server, hello={}) as peer:
        await peer.stream.send_all(first)
        got = await peer.rest()
    assert len(got) == 1, got
    assert got[0]["type"] == "error" and got[0]["code"] == "bad_request" and got[0]["fatal"]


async def test_an_unknown_type_in_idle_is_answered_a_known_one_out_of_turn_is_fatal(
    serve: Callable[..., Server],
) -> None:
    """Parsing comes before the state: in ``idle`` a message that does not parse
    (unknown type, a version 2 type in version 1, a bad field) gets a non-fatal
    ``bad_request``; a well-formed message the client may not send now is fatal."""
    server = serve({"a.mp3": b"x"})
    async with wire(server) as peer:
        for bad in (
            {"type": "no_such_type"},
            {"type": "channels"},  # version 2 only: unknown in a version 1 conversation
            {"type": "list", "sort": "size"},
            {"type": "hello", "version": "2"},  # does not parse: checked before the state
        ):
            await peer.send(**bad)
            end = await peer.last()
            assert end["code"] == "bad_request" and not end.get("fatal"), bad
        assert await peer.tracks() == ["a.mp3"]  # still usable
    for out_of_turn in (
        {"type": "hello", "version": 1},
        {"type": "list_end", "count": 0},
        {"type": "publish_end", "sent": 0},
    ):
        async with wire(server, hello={}) as peer:
            await peer.send(type="hello", version=2)
            assert (await peer.last())["type"] == "welcome"
            await peer.send(**out_of_turn)
            got = await peer.rest()
        assert [(m["type"], m["code"], m["fatal"]) for m in got] == [
            ("error", "bad_request", True)
        ], out_of_turn


async def test_which_error_wins_connection_limit_then_token_then_version(
    serve: Callable[..., Server],
) -> None:
    """Framing and parsing first (bad_request), then busy, unauthorized, and
    unsupported_version last: a wrong token learns nothing, not even the versions."""
    busy = serve({"a.mp3": b"x"}, token="sesame", max_connections=0)
    guarded = serve({"a.mp3": b"x"}, token="sesame")

    async def first_answer(server: Server, data: bytes) -> dict[str, Any]:
        async with wire(server, hello={}) as peer:
            await peer.stream.send_all(data)
            got = await peer.rest()
        assert len(got) == 1 and got[0]["fatal"], got
        answer: dict[str, Any] = got[0]
        return answer

    assert (await first_answer(busy, message(type="hello", version=9)))["code"] == "busy"
    assert (await first_answer(busy, message(type="list")))["code"] == "bad_request"
    wrong_all = message(type="hello", version=9, token="nope")
    answer = await first_answer(guarded, wrong_all)
    assert answer["code"] == "unauthorized" and "versions" not in answer
    answer = await first_answer(guarded, message(type="hello", version=9, token="sesame"))
    assert answer["code"] == "unsupported_version"


# ---------------------------------------------------------------------------- versions, limits


async def test_the_versions_a_server_speaks_are_machine_readable(
    serve: Callable[..., Server],
) -> None:
    server = serve({"a.mp3": b"x"}, max_message_size=4096)
    speaks = sorted(SUPPORTED_VERSIONS)
    for version in speaks:
        async with wire(server, hello={}) as peer:
            await peer.send(type="hello", version=version)
            welcome = await peer.last()
        assert welcome["version"] == version and welcome["versions"] == speaks
        assert welcome["max_message_size"] == 4096
    async with wire(server, hello={}) as peer:
        await peer.send(type="hello", version=max(speaks) + 1)
        (refusal,) = await peer.rest()
    assert refusal["code"] == "unsupported_version" and refusal["versions"] == speaks
    # additive: a receiver ignores the keys it does not know (PROTOCOL.md, "Messages"),
    # which is how a client older than these fields reads this welcome: as before
    client = Connection(Role.CLIENT)
    client.send(Hello(version=max(speaks)))
    client.receive_data(message(**welcome, later_field={"anything": [1]}))
    assert client.next_event() == Welcome(
        version=max(speaks), server=welcome["server"], tracks=1, versions=tuple(speaks),
        max_message_size=4096,
    )  # fmt: skip


async def test_limits_are_inclusive_and_the_message_limit_is_stated(
    serve: Callable[..., Server],
) -> None:
    """At most N allows N: a message body of exactly ``max_message_size`` bytes is
    served, one byte more is a fatal bad_request; the query limits likewise."""
    limit = 300
    server = serve({"a.mp3": b"x"}, max_message_size=limit)

    def list_of_size(size: int) -> bytes:
        pad = 0
        while True:  # an unknown key pads the body (receivers ignore it)
            body = msgpack.packb({"type": "list", "pad": "p" * pad})
            if len(body) >= size:
                assert len(body) == size
                return frame(1, body)
            pad += 1

    async with wire(server) as peer:
        await peer.stream.send_all(list_of_size(limit))
        assert (await peer.last())["type"] == "list_end"
        await peer.stream.send_all(list_of_size(limit + 1))
        got = await peer.rest()
    assert [(m["code"], m["fatal"]) for m in got] == [("bad_request", True)]

    server = serve({"w.mp3": b"x"})
    words = " ".join(["w"] * MAX_QUERY_WORDS)
    async with wire(server) as peer:
        for fields, ok in (
            ({"query": words}, True),
            ({"query": words + " w"}, False),
            ({"query": " ".join(["w"] * 999)}, False),  # SQLite's depth limit, once
            ({"query": "w" * MAX_FILTER_LENGTH}, True),
            ({"query": "w" * (MAX_FILTER_LENGTH + 1)}, False),
            ({"artist": "w" * (MAX_FILTER_LENGTH + 1)}, False),
            ({"album": "w" * (MAX_FILTER_LENGTH + 1)}, False),
            ({"format": "w" * (MAX_FILTER_LENGTH + 1)}, False),
            ({"offset": 2**63 - 1, "limit": 2**63 - 1}, True),
        ):
            await peer.send(type="list", **fields)
            end = await peer.last()
            if ok:
                assert end["type"] == "list_end", fields
            else:
                assert end["code"] == "bad_request" and not end.get("fatal"), fields
        assert await peer.tracks(query=words) == ["w.mp3"]


# ---------------------------------------------------------------------------- list


async def test_sort_is_ascending_by_code_point_of_folded_keys_then_path(
    serve: Callable[..., Server],
) -> None:
    names = ["10.mp3", "2.mp3", "Zed.mp3", "apple.mp3", "Éclair.mp3", "eclair.wav", "b/a.mp3"]
    server = serve(dict.fromkeys(names, b"x"))
    async with wire(server) as peer:
        by_path = await peer.tracks()
        by_title = await peer.tracks(sort="title")
        by_artist = await peer.tracks(sort="artist")  # no artist tags: all last, by path
    assert by_path == sorted(names)  # code points: "10" < "2", "Z" < "a" < "É"
    assert by_path[:4] == ["10.mp3", "2.mp3", "Zed.mp3", "apple.mp3"]
    stem = {n: n.rsplit("/", 1)[-1].rsplit(".", 1)[0] for n in names}
    assert by_title == sorted(names, key=lambda n: (fold(stem[n]), n))
    assert by_title.index("eclair.wav") + 1 == by_title.index("Éclair.mp3")  # a tie: by path
    assert by_artist == by_path


async def test_a_query_splits_at_white_space_only(serve: Callable[..., Server]) -> None:
    names = ['say "hi".mp3', "rock-n-roll.mp3", "rock n roll.mp3", "AC/DC/x.mp3"]
    server = serve(dict.fromkeys(names, b"x"))
    async with wire(server) as peer:
        assert await peer.tracks(query='"hi"') == ['say "hi".mp3']  # quotes are characters
        assert await peer.tracks(query='"say hi"') == []  # two words: '"say' and 'hi"'
        assert await peer.tracks(query="rock-n") == ["rock-n-roll.mp3"]
        assert await peer.tracks(query="rock\u00a0roll") == ["rock n roll.mp3", "rock-n-roll.mp3"]
        assert await peer.tracks(query="rock\u3000\t roll\n") == await peer.tracks(
            query="rock roll"
        )
        assert await peer.tracks(query="ac/dc") == ["AC/DC/x.mp3"]
        # not White_Space, although Python's str.split would split there
        assert await peer.tracks(query="rock\x1froll") == []


# ---------------------------------------------------------------------------- streams


@pytest.mark.parametrize(
    ("fields", "ok"),
    [
        ({"offset": 0}, True),
        ({"offset": 2**63 - 1}, True),
        ({"offset": 2**63}, False),
        ({"offset": -1}, False),
        ({"start": 5}, False),
        ({"duration": 1}, False),
        ({"sample_rate": 8000}, False),
        ({"channels": 1}, False),
        ({"sample_format": "s16le"}, False),
        ({"pacing": "realtime"}, True),
        ({"mode": "decoded", "offset": 1}, False),
        ({"mode": "decoded", "sample_rate": 999}, False),
        ({"mode": "decoded", "sample_rate": 384001}, False),
        ({"mode": "decoded", "channels": 0}, False),
        ({"mode": "decoded", "channels": 9}, False),
        ({"mode": "decoded", "start": -0.001}, False),
        ({"mode": "decoded", "start": 1e9}, False),
        ({"mode": "decoded", "start": float("nan")}, False),
        ({"mode": "decoded", "duration": 0}, False),
        ({"mode": "decoded", "duration": float("inf")}, False),
        ({"mode": "decoded", "sample_format": "s24le"}, False),
        ({"mode": "video"}, False),
        ({"pacing": "fast"}, False),
    ],
)
def test_the_range_of_every_stream_field(fields: dict[str, Any], ok: bool) -> None:
    """Inclusive ranges, checked by the protocol (the same for every server): a
    request outside them is a non-fatal bad_request (see the next test)."""
    body = msgpack.packb({"type": "stream", "track": "a", **fields})
    if ok:
        assert isinstance(decode_message(body), StreamRequest)
    else:
        with pytest.raises(MessageError):
            decode_message(body)


@pytest.mark.parametrize(
    ("fields", "ok"),
    [
        ({"sample_rate": 1000, "channels": 1}, True),
        ({"sample_rate": 384000, "channels": 8}, True),
        ({"sample_rate": 384001}, False),
        ({"start": 0, "duration": 0.01}, True),
        ({"start": 0, "duration": 0}, False),
    ],
)
async def test_stream_ranges_at_the_server(
    serve: Callable[..., Server], fields: dict[str, Any], ok: bool
) -> None:
    server = serve({"tone.wav": wav_bytes(0.05)})
    async with wire(server) as peer:
        await peer.send(type="stream", track="tone.wav", mode="decoded", **fields)
        reply = await peer.reply()
        if ok:
            assert reply[0]["type"] == "stream_start" and reply[-1]["type"] == "stream_end"
        else:
            assert reply[-1]["code"] == "bad_request" and not reply[-1].get("fatal")
        await peer.send(type="stream", track="tone.wav", start=1)  # original: no start
        end = await peer.last()
        assert end["code"] == "bad_request" and not end.get("fatal")


async def test_a_start_past_the_end_is_an_empty_stream(serve: Callable[..., Server]) -> None:
    """Like an offset past the end of the file: stream_start, no data, stream_end 0."""
    data = wav_bytes(0.5)
    server = serve({"tone.wav": data})
    async with wire(server) as peer:
        for start in (0.5, 3.0, 1e6):
            await peer.send(type="stream", track="tone.wav", mode="decoded", start=start)
            reply = await peer.reply()
            assert [m["type"] for m in reply] == ["stream_start", "stream_end"], start
            assert reply[0]["start"] == start and "length" not in reply[0]
            assert (reply[1]["sent"], reply[1]["frames"]) == (0, 0)
        await peer.send(type="stream", track="tone.wav", offset=len(data) + 10)
        start_msg, end = await peer.reply()
        assert (start_msg["offset"], start_msg["length"]) == (len(data), 0)
        assert end["sent"] == 0 and len(end["sha256"]) == 64


async def test_original_streams_always_state_length_and_the_whole_files_sha256(
    serve: Callable[..., Server],
) -> None:
    data = os.urandom(100_000)
    server = serve({"a.mp3": data})
    async with wire(server) as peer:
        for offset in (0, 1234, len(data)):
            await peer.send(type="stream", track="a.mp3", offset=offset)
            reply = await peer.reply()
            head, end = reply[0], reply[-1]
            assert head["length"] == head["size"] - head.get("offset", 0) == len(data) - offset
            assert b"".join(reply[1:-1]) == data[offset:]
            assert end["sha256"] == hashlib.sha256(data).hexdigest()
    # and a client refuses a server that leaves them out
    client = Connection(Role.CLIENT)
    client.send(Hello(version=1))
    client.receive_data(encode_message(Welcome(version=1, server="s")))
    client.next_event()
    client.send(StreamRequest(track="a"))
    client.receive_data(message(type="stream_start", path="a", size=3, version="v"))
    with pytest.raises(RemoteProtocolError, match="length"):
        client.next_event()
    client = Connection(Role.CLIENT)
    client.send(Hello(version=1))
    client.receive_data(encode_message(Welcome(version=1, server="s")))
    client.next_event()
    client.send(StreamRequest(track="a"))
    client.receive_data(encode_message(StreamStart(path="a", size=0, version="v", length=0)))
    client.next_event()
    client.receive_data(encode_message(StreamEnd(sent=0)))
    with pytest.raises(RemoteProtocolError, match="sha256"):
        client.next_event()


def test_bits_per_sample_is_for_pcm_and_lossless_codecs_only(tmp_path: Path) -> None:
    """A lossy codec stores no samples of a depth: no bits_per_sample, even from an MP4
    container that states 16 for its AAC."""
    ffmpeg = ffmpeg_executable()
    expected = {"pcm.wav": 16, "lossless.flac": 16, "lossy.m4a": None, "lossy.mp3": None}
    codecs = {"pcm.wav": [], "lossless.flac": [], "lossy.m4a": ["-c:a", "aac"]}
    codecs["lossy.mp3"] = ["-c:a", "libmp3lame"]
    for name, args in codecs.items():
        subprocess.run(
            [ffmpeg, "-v", "error", "-f", "lavfi", "-i", "sine=d=0.3", *args, tmp_path / name],
            check=True,
            timeout=60,
        )
    got = {name: read_track(tmp_path, name).bits_per_sample for name in expected}
    assert got == expected
    assert read_track(tmp_path, "lossy.m4a").codec == "aac"


# ---------------------------------------------------------------------------- the conversation


async def test_requests_sent_early_are_answered_in_order(serve: Callable[..., Server]) -> None:
    """Pipelining: requests sent before the previous reply ended wait, and are
    answered one at a time in the order sent, each reply whole."""
    data = os.urandom(300_000)
    files = {"a.mp3": data, "b.flac": b"bb", "tone.wav": wav_bytes(0.5)}
    server = serve(files, chunk_size=64 * 1024)
    async with wire(server, hello={}) as peer:
        await peer.stream.send_all(
            message(type="hello", version=1)
            + message(type="stream", track="a.mp3")
            + message(type="stream", track="tone.wav", mode="decoded", sample_rate=8000)
            + message(type="list")
            + message(type="info", track="nothing")
            + message(type="list", sort="bogus")
            + message(type="info", track="b")
            + message(type="stream", track="b.flac", offset=1)
        )
        assert (await peer.last())["type"] == "welcome"
        stream = await peer.reply()
        assert b"".join(stream[1:-1]) == data and stream[-1]["type"] == "stream_end"
        decoded = await peer.reply()  # the server reads while it decodes: the rest waits
        assert decoded[-1]["type"] == "stream_end" and decoded[-1]["frames"] == 4000
        listed = [t["path"] for t in (await peer.reply())[0]["tracks"]]
        assert listed == ["a.mp3", "b.flac", "tone.wav"]
        assert (await peer.last())["code"] == "not_found"
        assert (await peer.last())["code"] == "bad_request"
        assert (await peer.last())["track"]["path"] == "b.flac"
        assert (await peer.reply())[1:-1] == [b"b"]


async def test_a_handshake_timeout_closes_without_a_frame(
    serve: Callable[..., Server], autojump_clock: trio.testing.MockClock
) -> None:
    """Nothing, or part of a hello, until the deadline: the connection just ends,
    with no error frame (and likewise at the idle timeout)."""
    server = serve({"a.mp3": b"x"}, handshake_timeout=5, idle_timeout=30)
    hello = message(type="hello", version=1)
    for sent in (b"", hello[:3], hello[:-1]):
        async with wire(server, hello={}) as peer:
            await peer.stream.send_all(sent)
            with trio.fail_after(60):  # virtual time: jumps at once
                assert await peer.stream.receive_some(65536) == b""
    async with wire(server) as peer:
        with trio.fail_after(60):
            assert await peer.stream.receive_some(65536) == b""


def test_the_spec_has_no_open_question_left() -> None:
    """The answers are in PROTOCOL.md, where an implementer looks for them."""
    for heading in (
        "### Bad messages, and which error wins",
        "#### Matching",
        "#### Order",
        "## Which files are tracks",
        "## Track names",
    ):
        assert heading in SPEC, heading
    assert "`versions`" in SPEC and "`max_message_size`" in SPEC
    assert "(pipelining)" in SPEC
    assert "gets no `error` frame" in SPEC
