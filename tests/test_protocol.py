"""The sans-IO protocol: framing, every message, every limit, the state machine.

Every conversation is fed three ways (whole, one byte at a time, and with
trailing bytes of the next frame), as h11's tests do; hypothesis checks that
peer bytes can only ever raise RemoteProtocolError.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterable

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from musiclib.errors import LocalProtocolError, MessageError, RemoteProtocolError
from musiclib.protocol import (
    HEADER,
    KIND_DATA,
    KIND_MESSAGE,
    LIST_SORTS,
    MAX_DATA_SIZE,
    MAX_FILTER_LENGTH,
    MAX_QUERY_WORDS,
    MAX_TRACK_NAME,
    NEED_DATA,
    PAGE_BUDGET,
    Audio,
    Closed,
    Connection,
    Data,
    Error,
    Event,
    GapNotice,
    Hello,
    InfoReply,
    InfoRequest,
    ListEnd,
    ListenEnd,
    ListenRequest,
    ListRequest,
    Message,
    NeedData,
    PublishDone,
    Role,
    ServerStatus,
    State,
    StatusRequest,
    StreamEnd,
    StreamRequest,
    StreamStart,
    TrackInfo,
    TrackPage,
    Welcome,
    decode_message,
    encode_message,
    paginate,
    query_words,
)

TRACK = TrackInfo(
    path="Ärtist/Album/01 - Song.flac",
    title="Song",
    format="flac",
    size=1234,
    artist="Ärtist",
    album="Album",
    track=1,
    duration=12.5,
    codec="flac",
    sample_rate=44100,
    channels=2,
    bitrate=789000,
)
SHA = hashlib.sha256(b"x").hexdigest()

ALL_MESSAGES: list[Message] = [
    Hello(version=1, client="test/1"),
    Welcome(version=1, server="musiclib/0", tracks=3, scanning=True),
    Welcome(version=2, server="musiclib/0", versions=(1, 2), max_message_size=65536),
    ListRequest(query="song"),
    ListRequest(),
    ListRequest(
        query="é", artist="a", album="b", format="flac", sort="duration", offset=20, limit=10
    ),
    ListRequest(limit=0),
    TrackPage(tracks=(TRACK, TrackInfo(path="a.wav", title="a", format="wav", size=0))),
    ListEnd(count=2, scanning=False),
    ListEnd(count=10, total=10_000, scanning=True),
    InfoRequest(track="song"),
    InfoReply(track=TRACK),
    StreamRequest(track="a/b.mp3", offset=10),
    StreamStart(path="a/b.mp3", size=100, version="64-1", offset=10, length=90),
    StreamStart(path="a/b.mp3", size=100, version="64-1", length=100, sha256=SHA),
    StreamEnd(sent=90, sha256=SHA),
    Error(code="ambiguous", message="2 tracks", candidates=("a", "b")),
    Error(code="bad_request", message="no", fatal=True),
    Error(code="unsupported_version", message="no", fatal=True, versions=(1, 2)),
    ListRequest(query=" ".join(["w"] * MAX_QUERY_WORDS), artist="a" * MAX_FILTER_LENGTH),
    InfoRequest(track="x" * MAX_TRACK_NAME),
]


def events(conn: Connection) -> list[Event]:
    """Every event available now, coalescing Data pieces."""
    out: list[Event] = []
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData):
            return out
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].payload + event.payload)
        else:
            out.append(event)
        if isinstance(event, Closed):
            return out


Feeder = Callable[[Connection, bytes], list[Event]]


def feed_whole(conn: Connection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    return events(conn)


def feed_bytewise(conn: Connection, data: bytes) -> list[Event]:
    out: list[Event] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        for event in events(conn):
            if isinstance(event, Data) and out and isinstance(out[-1], Data):
                out[-1] = Data(out[-1].payload + event.payload)
            else:
                out.append(event)
    return out


FEEDERS = [pytest.param(feed_whole, id="whole"), pytest.param(feed_bytewise, id="bytewise")]


# A transcript: (sender, what) where ``what`` is a message or a data payload.
Step = tuple[Role, Message | bytes]

TRANSCRIPT: list[Step] = [
    (Role.CLIENT, Hello(version=1, client="t")),
    (Role.SERVER, Welcome(version=1, server="s", tracks=1)),
    (Role.CLIENT, ListRequest(query="x")),
    (Role.SERVER, TrackPage(tracks=(TRACK,))),
    (Role.SERVER, ListEnd(count=1)),
    (Role.CLIENT, InfoRequest(track="x")),
    (Role.SERVER, Error(code="not_found", message="no")),
    (Role.CLIENT, StreamRequest(track="a", offset=2)),
    (Role.SERVER, StreamStart(path="a", size=10, version="v", offset=2, length=8)),
    (Role.SERVER, b"abcde"),
    (Role.SERVER, b"fgh"),
    (Role.SERVER, StreamEnd(sent=8, sha256=SHA)),
    (Role.CLIENT, ListRequest()),
    (Role.SERVER, ListEnd(count=0, scanning=True)),
]


def _send(conn: Connection, what: Message | bytes) -> bytes:
    if isinstance(what, bytes):
        return conn.send_data_header(len(what)) + what
    return conn.send(what)


def replay(receiver: Role, feed: Feeder, group: bool = False) -> tuple[list[Event], list[Event]]:
    """Play TRANSCRIPT into a fresh ``receiver``; return (events seen, events expected).

    The sender's bytes come from a real Connection of the other role; the
    receiver sends its own side itself, so both state machines stay in step.
    With ``group``, consecutive frames from the peer arrive in one read.
    """
    sender = Connection(Role.SERVER if receiver is Role.CLIENT else Role.CLIENT)
    conn = Connection(receiver)
    got: list[Event] = []
    expected: list[Event] = []
    pending = b""
    for who, what in TRANSCRIPT:
        if who is receiver:
            if pending:
                got.extend(feed(conn, pending))
                pending = b""
            sender.receive_data(_send(conn, what))
            events(sender)
            continue
        data = _send(sender, what)
        expected.append(Data(what) if isinstance(what, bytes) else what)
        if group:
            pending += data
        else:
            got.extend(feed(conn, data))
    if pending:
        got.extend(feed(conn, pending))
    return _merge(got), _merge(expected)


def _merge(evs: list[Event]) -> list[Event]:
    merged: list[Event] = []
    for event in evs:
        if isinstance(event, Data) and merged and isinstance(merged[-1], Data):
            merged[-1] = Data(merged[-1].payload + event.payload)
        else:
            merged.append(event)
    return merged


# ---- round trips -----------------------------------------------------------


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: Message) -> None:
    frame = encode_message(msg)
    kind, length = HEADER.unpack_from(frame)
    assert (kind, length) == (KIND_MESSAGE, len(frame) - HEADER.size)
    assert decode_message(frame[HEADER.size :]) == msg


def test_track_info_round_trips_and_leaves_out_none() -> None:
    wire = TRACK.to_wire()
    assert "sha256" not in wire and "error" not in wire
    assert TrackInfo.from_wire(wire) == TRACK
    assert TrackInfo.from_wire({**wire, "future_field": [1, 2]}) == TRACK


@pytest.mark.parametrize("group", [False, True], ids=["frame-by-frame", "with-trailing"])
@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize("receiver", [Role.CLIENT, Role.SERVER], ids=lambda r: r.value)
def test_whole_conversation(receiver: Role, feed: Feeder, group: bool) -> None:
    got, expected = replay(receiver, feed, group)
    assert got == expected
    assert len(expected) > 3


def test_trailing_bytes_stay_buffered_for_the_next_event() -> None:
    server = Connection(Role.SERVER)
    hello = encode_message(Hello(version=1))
    request = encode_message(ListRequest(query="q"))
    server.receive_data(hello + request[:3])
    assert server.next_event() == Hello(version=1)
    assert server.next_event() is NEED_DATA
    assert server.trailing_data == (request[:3], False)
    server.send(Welcome(version=1, server="s"))
    server.receive_data(request[3:])
    assert server.next_event() == ListRequest(query="q")


def test_request_split_across_reads_and_two_requests_in_one_read() -> None:
    server = Connection(Role.SERVER)
    data = encode_message(Hello(version=1)) + encode_message(ListRequest())
    server.receive_data(data[:2])
    assert server.next_event() is NEED_DATA
    server.receive_data(data[2:])
    assert server.next_event() == Hello(version=1)
    server.send(Welcome(version=1, server="s"))
    assert server.next_event() == ListRequest()


def _early_client(request: Message) -> tuple[Connection, bytes]:
    """A client that sent ``hello`` and ``request`` without waiting: it and the bytes."""
    client = Connection(Role.CLIENT)
    sent = client.send(Hello(version=2, client="t")) + client.send(request)
    assert client.state is State.AWAIT_WELCOME
    return client, sent


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize("welcomed", [1, 2])
def test_a_client_may_send_its_first_request_before_the_welcome(
    feed: Feeder, welcomed: int
) -> None:
    client, sent = _early_client(StreamRequest(track="a", offset=2))
    server = Connection(Role.SERVER)
    # the server reads the hello, answers it, and only then reads the early request
    server.receive_data(sent)
    assert server.next_event() == Hello(version=2, client="t")
    reply = [
        Welcome(version=welcomed, server="s"),
        StreamStart(path="a", size=10, version="v", offset=2, length=8),
    ]
    welcome = _send(server, reply[0])
    assert server.next_event() == StreamRequest(track="a", offset=2)
    got = feed(client, welcome)
    assert got == reply[:1] and client.state is State.STREAM_HEAD and client.version == welcomed
    got = feed(client, _send(server, reply[1]) + _send(server, b"abcdefgh"))
    assert got == [reply[1], Data(b"abcdefgh")] and client.state is State.STREAMING


def test_a_refused_hello_drops_the_early_request() -> None:
    client, _ = _early_client(InfoRequest(track="x"))
    client.receive_data(encode_message(Error(code="busy", message="full", fatal=True)))
    assert client.next_event() == Error(code="busy", message="full", fatal=True)
    assert client.state is State.CLOSED


def test_only_one_version_1_request_may_go_before_the_welcome() -> None:
    client, _ = _early_client(ListRequest())
    with pytest.raises(LocalProtocolError, match="one request"):
        client.send(InfoRequest(track="x"))
    for late in (StatusRequest(), ListenRequest(channel="c"), Hello(version=1)):
        fresh = Connection(Role.CLIENT)
        fresh.send(Hello(version=2))
        with pytest.raises(LocalProtocolError, match="every protocol version"):
            fresh.send(late)
        assert fresh.state is State.AWAIT_WELCOME


def test_a_server_still_refuses_a_request_before_its_welcome() -> None:
    # the early request is the client's to send; the server answers the hello first
    server = Connection(Role.SERVER)
    server.receive_data(encode_message(Hello(version=1)) + encode_message(ListRequest()))
    assert server.next_event() == Hello(version=1)
    with pytest.raises(RemoteProtocolError, match="not allowed in state await_welcome"):
        server.next_event()
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER).send(Welcome(version=1, server="s"))


@settings(deadline=None)
@given(st.binary(max_size=512), st.sampled_from([1, 2]))
def test_bytes_after_an_early_request_only_raise_remote_errors(data: bytes, version: int) -> None:
    client = Connection(Role.CLIENT)
    client.send(Hello(version=version))
    client.send(StreamRequest(track="a"))
    welcome = encode_message(Welcome(version=version, server="s"))
    try:
        for chunk in (welcome, data, b""):
            client.receive_data(chunk)
            for _ in range(len(chunk) + 2):
                if isinstance(client.next_event(), (Closed, NeedData)):
                    break
    except RemoteProtocolError:
        pass


def test_data_frames_are_handed_out_as_they_arrive() -> None:
    client = _client_in_stream(length=10)
    client.receive_data(HEADER.pack(KIND_DATA, 10) + b"abc")
    assert client.next_event() == Data(b"abc")
    assert client.next_event() is NEED_DATA
    client.receive_data(b"defghij")
    assert client.next_event() == Data(b"defghij")
    client.receive_data(encode_message(StreamEnd(sent=10, sha256=SHA)))
    assert client.next_event() == StreamEnd(sent=10, sha256=SHA)
    assert client.state is State.IDLE


def test_unknown_length_stream() -> None:
    client = _client_in_stream(length=None)
    end = StreamEnd(sent=4, frames=2)
    client.receive_data(HEADER.pack(KIND_DATA, 4) + b"abcd" + encode_message(end))
    assert events(client) == [Data(b"abcd"), end]


def _client_in_stream(length: int | None) -> Connection:
    """A client inside an original stream of ``length`` bytes, or a decoded stream
    (s16le mono: 2 bytes a frame) of unknown length for ``None``."""
    client = Connection(Role.CLIENT)
    client.send(Hello(version=1))
    client.receive_data(encode_message(Welcome(version=1, server="s")))
    assert isinstance(client.next_event(), Welcome)
    if length is None:
        client.send(StreamRequest(track="a", mode="decoded"))
        start = StreamStart(
            path="a",
            size=10,
            version="v",
            mode="decoded",
            sample_format="s16le",
            sample_rate=8000,
            channels=1,
        )
    else:
        client.send(StreamRequest(track="a"))
        start = StreamStart(path="a", size=length, version="v", length=length)
    client.receive_data(encode_message(start))
    assert isinstance(client.next_event(), StreamStart)
    return client


# ---- limits --------------------------------------------------------------


def test_oversized_message_is_refused_before_its_body_arrives() -> None:
    server = Connection(Role.SERVER, max_message_size=100)
    server.receive_data(HEADER.pack(KIND_MESSAGE, 101))  # header only, no body
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        server.next_event()
    assert server.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_message_at_exactly_the_limit_is_accepted() -> None:
    msg = Hello(version=1, client="x" * 50)
    frame = encode_message(msg)
    server = Connection(Role.SERVER, max_message_size=len(frame) - HEADER.size)
    server.receive_data(frame)
    assert server.next_event() == msg


def test_oversized_data_frame_is_refused_before_its_body_arrives() -> None:
    client = _client_in_stream(length=None)
    client.max_data_size = 1000
    client.receive_data(HEADER.pack(KIND_DATA, 1001))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        client.next_event()


def test_giant_length_prefix() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(HEADER.pack(KIND_MESSAGE, 0xFFFFFFFF))
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_more_payload_than_announced_is_refused() -> None:
    client = _client_in_stream(length=4)
    client.receive_data(HEADER.pack(KIND_DATA, 5) + b"12345")
    with pytest.raises(RemoteProtocolError, match="exceed"):
        client.next_event()


def test_stream_end_short_or_miscounted_is_refused() -> None:
    client = _client_in_stream(length=4)
    client.receive_data(HEADER.pack(KIND_DATA, 3) + b"123" + encode_message(StreamEnd(sent=3)))
    with pytest.raises(RemoteProtocolError, match="short"):
        events(client)
    client = _client_in_stream(length=None)
    client.receive_data(HEADER.pack(KIND_DATA, 3) + b"123" + encode_message(StreamEnd(sent=4)))
    with pytest.raises(RemoteProtocolError, match="says 4 bytes"):
        events(client)


def test_empty_data_frame_is_refused() -> None:
    client = _client_in_stream(length=4)
    client.receive_data(HEADER.pack(KIND_DATA, 0))
    with pytest.raises(RemoteProtocolError, match="empty"):
        client.next_event()


@pytest.mark.parametrize("title", ["t" * 50, "é" * 50, "\U0001f3b5" * 50])
def test_pages_respect_the_budget_and_keep_every_track(title: str) -> None:
    # pages are sized by an estimate, not by encoding: multi-byte text must not break it
    tracks = [
        TrackInfo(path=f"artist/album/{i:05d}.flac", title=title, format="flac", size=i)
        for i in range(3000)
    ]
    pages = list(paginate(tracks))
    assert len(pages) > 1
    assert [t for p in pages for t in p.tracks] == tracks
    for page in pages:
        assert len(encode_message(page)) <= PAGE_BUDGET + 64
    assert list(paginate([])) == []


# ---- the state machine ----------------------------------------------------


def test_local_misuse_raises_local_errors() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="not allowed"):
        client.send(ListRequest())  # before hello
    with pytest.raises(LocalProtocolError, match="may not send"):
        client.send(Welcome(version=1, server="s"))
    with pytest.raises(LocalProtocolError):
        client.send_data_header(10)
    with pytest.raises(LocalProtocolError, match="offset"):
        client.send(StreamRequest(track="a", offset=-1))
    server = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        server.send(Welcome(version=1, server="s"))  # before hello arrived


def test_server_may_not_send_more_payload_than_announced() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode_message(Hello(version=1)) + encode_message(StreamRequest("a")))
    assert isinstance(server.next_event(), Hello)
    server.send(Welcome(version=1, server="s"))
    assert isinstance(server.next_event(), StreamRequest)
    server.send(StreamStart(path="a", size=4, version="v", length=4))
    server.send_data_header(4)
    with pytest.raises(LocalProtocolError):
        server.send_data_header(1)
    with pytest.raises(LocalProtocolError, match="says 3"):
        server.send(StreamEnd(sent=3, sha256=SHA))
    with pytest.raises(LocalProtocolError, match="sha256"):
        server.send(StreamEnd(sent=4))  # an original stream ends with the file's digest
    server.send(StreamEnd(sent=4, sha256=SHA))
    assert server.state is State.IDLE


def test_peer_speaking_out_of_turn_raises_remote_errors() -> None:
    client = Connection(Role.CLIENT)
    client.send(Hello(version=1))
    client.receive_data(encode_message(ListEnd(count=0)))  # before welcome
    with pytest.raises(RemoteProtocolError, match="not allowed"):
        client.next_event()
    server = Connection(Role.SERVER)
    server.receive_data(encode_message(Welcome(version=1, server="s")))
    with pytest.raises(RemoteProtocolError, match="may not send"):
        server.next_event()


def test_bad_request_keeps_the_connection_usable() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode_message(Hello(version=1)))
    server.next_event()
    server.send(Welcome(version=1, server="s"))
    bad = msgpack.packb({"type": "stream", "track": 42})
    unknown = msgpack.packb({"type": "dance"})
    garbage = b"\xc1\xc1"
    for body in (bad, unknown, garbage, msgpack.packb([1, 2])):
        server.receive_data(HEADER.pack(KIND_MESSAGE, len(body)) + body)
        with pytest.raises(MessageError):
            server.next_event()
        assert server.state is State.IDLE
        server.send(Error(code="bad_request", message="bad"))
    server.receive_data(encode_message(ListRequest()))
    assert server.next_event() == ListRequest()


def test_a_bad_hello_is_fatal() -> None:
    server = Connection(Role.SERVER)
    body = msgpack.packb({"type": "hello", "version": "one"})
    server.receive_data(HEADER.pack(KIND_MESSAGE, len(body)) + body)
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert not isinstance(info.value, MessageError)


def test_unknown_frame_kind_is_fatal() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"LIST\r\n")
    with pytest.raises(RemoteProtocolError, match="frame kind"):
        server.next_event()
    assert server.state is State.ERROR


def test_data_from_a_client_is_fatal() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(HEADER.pack(KIND_DATA, 1) + b"x")
    with pytest.raises(RemoteProtocolError, match="outside of a stream"):
        server.next_event()


def test_fatal_error_closes_and_an_error_ends_a_stream() -> None:
    client = _client_in_stream(length=10)
    client.receive_data(HEADER.pack(KIND_DATA, 2) + b"ab" + encode_message(Error("changed", "x")))
    assert events(client) == [Data(b"ab"), Error("changed", "x")]
    assert client.state is State.IDLE
    client.send(ListRequest())
    client.receive_data(encode_message(Error("internal", "bye", fatal=True)))
    assert events(client) == [Error("internal", "bye", fatal=True)]
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(ListRequest())


def test_end_of_file() -> None:
    client = Connection(Role.CLIENT)
    client.send(Hello(version=1))
    client.receive_data(b"")
    assert client.next_event() == Closed()
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"more")
    partial = Connection(Role.CLIENT)
    partial.send(Hello(version=1))
    partial.receive_data(encode_message(Welcome(version=1, server="s"))[:4])
    partial.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed in a frame header"):
        partial.next_event()
    mid = _client_in_stream(length=10)
    mid.receive_data(HEADER.pack(KIND_DATA, 10) + b"abc")
    mid.receive_data(b"")
    assert mid.next_event() == Data(b"abc")
    with pytest.raises(RemoteProtocolError, match="middle of a data frame"):
        mid.next_event()


def test_data_header_bounds() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode_message(Hello(version=1)) + encode_message(StreamRequest("a")))
    server.next_event()
    server.send(Welcome(version=1, server="s"))
    server.next_event()
    size = 2 * MAX_DATA_SIZE
    server.send(StreamStart(path="a", size=size, version="v", length=size))
    with pytest.raises(LocalProtocolError):
        server.send_data_header(0)
    with pytest.raises(LocalProtocolError):
        server.send_data_header(MAX_DATA_SIZE + 1)
    assert len(server.send_data_header(MAX_DATA_SIZE)) == HEADER.size


@pytest.mark.parametrize(
    "msg",
    [
        StreamStart(path="a", size=10, version="v", offset=5, length=6),
        StreamStart(path="a", size=-1, version="v"),
        StreamStart(path="a", size=1, version="v", sha256="0" * 63),
        ListRequest(sort="size"),
        ListRequest(offset=-1),
        ListRequest(limit=-1),
        ListRequest(offset=2**63),
        StreamEnd(sent=1, sha256="ABC"),
        StreamEnd(sent=-1),
        Hello(version=0),
        Welcome(version=1, server="s", versions=(2,)),
        # an original stream states its length, exactly size - offset
        StreamStart(path="a", size=10, version="v"),
        StreamStart(path="a", size=10, version="v", offset=12, length=-2),
        # the bounds of a list request's filters (PROTOCOL.md, "list")
        ListRequest(query="x" * (MAX_FILTER_LENGTH + 1)),
        ListRequest(query=" ".join("w" * (MAX_QUERY_WORDS + 1))),
        ListRequest(artist="x" * (MAX_FILTER_LENGTH + 1)),
        ListRequest(album="x" * (MAX_FILTER_LENGTH + 1)),
        ListRequest(format="x" * (MAX_FILTER_LENGTH + 1)),
        InfoRequest(track="x" * (MAX_TRACK_NAME + 1)),
        StreamRequest(track="x" * (MAX_TRACK_NAME + 1)),
        StreamRequest(track="a", offset=2**63),
        # fields of decoded streams are refused in original mode, and the reverse
        StreamRequest(track="a", start=1.0),
        StreamRequest(track="a", duration=1.0),
        StreamRequest(track="a", sample_rate=8000),
        StreamRequest(track="a", channels=1),
        StreamRequest(track="a", sample_format="s16le"),
        StreamRequest(track="a", mode="decoded", start=float("inf")),
        StreamRequest(track="a", mode="decoded", start=float("nan")),
        StreamRequest(track="a", mode="decoded", duration=1e9),
    ],
)
def test_invalid_field_values(msg: Message) -> None:
    assert msg.problem()
    with pytest.raises(MessageError):
        decode_message(encode_message(msg)[HEADER.size :])


@pytest.mark.parametrize(
    "data",
    [
        {"type": "hello", "version": True},
        {"type": "hello", "version": 1.0},
        {"type": "hello"},
        {"type": "tracks", "tracks": "nope"},
        {"type": "tracks", "tracks": [{"path": "a"}]},
        {"type": "tracks", "tracks": [[1]]},
        {"type": "error", "code": "x", "message": "y", "candidates": [1]},
        {"type": 7},
        {"no_type": 1},
    ],
)
def test_wrong_field_types(data: dict[str, object]) -> None:
    with pytest.raises(MessageError):
        decode_message(msgpack.packb(data))


def test_trailing_bytes_inside_a_message_body_are_refused() -> None:
    body = msgpack.packb({"type": "list"}) + b"\x00"
    with pytest.raises(MessageError):
        decode_message(body)


# ---- properties ------------------------------------------------------------

messages = st.sampled_from(ALL_MESSAGES)


def _feed_all(conn: Connection, chunks: Iterable[bytes]) -> list[Event]:
    out: list[Event] = []
    for chunk in chunks:
        if chunk:  # b"" would mean end of file
            conn.receive_data(chunk)
            out.extend(events(conn))
    return _merge(out)


@settings(deadline=None)
@given(st.binary(max_size=2048), st.sampled_from([Role.CLIENT, Role.SERVER]))
def test_random_bytes_only_raise_remote_errors(data: bytes, role: Role) -> None:
    conn = Connection(role)
    if role is Role.CLIENT:
        conn.send(Hello(version=1))
    try:
        conn.receive_data(data)
        conn.receive_data(b"")
        for _ in range(len(data) + 2):
            if isinstance(conn.next_event(), (Closed, NeedData)):
                break
    except RemoteProtocolError:
        pass


@settings(deadline=None)
@given(st.data(), st.sampled_from([Role.CLIENT, Role.SERVER]))
def test_any_split_of_a_valid_stream_gives_the_same_events(
    data: st.DataObject, receiver: Role
) -> None:
    def feed_split(conn: Connection, chunk: bytes) -> list[Event]:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(chunk)), max_size=6)))
        pieces = [chunk[a:b] for a, b in zip([0, *cuts], [*cuts, len(chunk)], strict=True)]
        return _feed_all(conn, pieces)

    got, expected = replay(receiver, feed_split, group=True)
    assert got == expected


text = st.text(max_size=40)
opt_int = st.none() | st.integers(0, 2**40)
tracks = st.builds(
    TrackInfo,
    path=text,
    title=text,
    format=text,
    size=st.integers(0, 2**53),
    artist=st.none() | text,
    duration=st.none() | st.floats(0, 1e6, allow_nan=False),
    sample_rate=opt_int,
)
generated_messages = st.one_of(
    st.builds(Hello, version=st.integers(1, 2**31), client=text),
    st.builds(
        ListRequest,
        query=st.none() | text,
        artist=st.none() | text,
        format=st.none() | text,
        sort=st.sampled_from(LIST_SORTS),
        offset=st.integers(0, 2**63 - 1),
        limit=st.none() | st.integers(0, 2**63 - 1),
    ),
    st.builds(ListEnd, count=st.integers(0, 2**40), total=opt_int, scanning=st.booleans()),
    st.builds(TrackPage, tracks=st.lists(tracks, max_size=5).map(tuple)),
    st.builds(StreamRequest, track=text, offset=st.integers(0, 2**63 - 1)),
    st.builds(  # every value a decoded stream allows, bounds included
        StreamRequest,
        track=text,
        mode=st.just("decoded"),
        sample_format=st.none() | st.sampled_from(["s16le", "f32le"]),
        sample_rate=st.none() | st.integers(1000, 384_000),
        channels=st.none() | st.integers(1, 8),
        start=st.floats(0, 1e9, exclude_max=True),
        duration=st.none() | st.floats(0, 1e9, exclude_min=True, exclude_max=True),
        pacing=st.sampled_from(["none", "realtime"]),
    ),
    st.builds(Error, code=text, message=text, candidates=st.lists(text, max_size=4).map(tuple)),
    st.builds(InfoReply, track=tracks),
    st.just(StatusRequest()),
    st.builds(  # every value a status allows
        ServerStatus,
        server=text,
        versions=st.lists(st.integers(1, 2**31), min_size=1, max_size=4).map(tuple),
        tracks=st.integers(0, 2**53),
        uptime=st.floats(0, 1e12, exclude_max=True),
        connections=st.integers(0, 2**31),
        scanning=st.booleans(),
        scans=st.integers(0, 2**40),
        last_scan=st.none() | st.floats(0, 1e12, exclude_max=True),
        last_scan_took=st.none() | st.floats(0, 1e12, exclude_max=True),
        channels=st.integers(0, 2**31),
    ),
)


@settings(deadline=None)
@given(generated_messages)
def test_generated_messages_round_trip(msg: Message) -> None:
    assert decode_message(encode_message(msg)[HEADER.size :]) == msg


#: Unicode's White_Space property, spelled out as PROTOCOL.md does ("Matching")
WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)
spaces = st.text(st.sampled_from(sorted(WHITE_SPACE)), min_size=1, max_size=3)
# words that may hold anything else, quotes and the characters Python alone calls spaces
# (no lone surrogates: they are not text a peer can send, UTF-8 has no encoding for them)
words = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters=sorted(WHITE_SPACE)),
    min_size=1,
    max_size=8,
)


@settings(deadline=None)
@given(st.lists(words, max_size=40), st.data())
def test_a_query_is_its_words_between_white_space(parts: list[str], data: st.DataObject) -> None:
    """Words are split at White_Space and nowhere else; a list request accepts at most
    MAX_QUERY_WORDS of them and MAX_FILTER_LENGTH characters, on either side of the wire."""
    query = data.draw(st.one_of(st.just(""), spaces))
    for word in parts:
        query += word + data.draw(spaces)
    assert query_words(query) == parts
    request = ListRequest(query=query)
    ok = len(parts) <= MAX_QUERY_WORDS and len(query) <= MAX_FILTER_LENGTH
    assert (request.problem() is None) is ok
    body = msgpack.packb({"type": "list", "query": query})
    if ok:
        assert decode_message(body) == request
    else:
        with pytest.raises(MessageError, match="query must"):
            decode_message(body)


def test_protocol_module_imports_no_io_libraries() -> None:
    code = (
        "import sys, musiclib.protocol; "
        "bad = [m for m in ('trio', 'socket', 'asyncio', 'musiclib.server', 'musiclib.client') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_example_in_protocol_md_is_exact() -> None:
    """Feed PROTOCOL.md's example through real connection objects of both roles."""

    seen = _replay_example("## Example\n", 6)
    assert seen[0] == Hello(version=1, client="demo")
    assert seen[1] == Welcome(
        version=1, server="musiclib/0.1.0", tracks=1, versions=(1, 2), max_message_size=65536
    )
    assert seen[3] == StreamStart(path="a/x.mp3", size=3, version="3-0", length=3)
    assert seen[4] == Data(b"ID3")
    assert seen[5] == StreamEnd(sent=3, sha256=hashlib.sha256(b"ID3").hexdigest())


def _replay_example(heading: str, frames: int) -> list[Event]:
    """Feed one example section of PROTOCOL.md through a client and a server object:
    each frame must parse, and the sender must produce exactly those bytes."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "PROTOCOL.md").read_text()
    section = doc[doc.index(heading) :]
    section = section[: section.find("\n## ", 1) if "\n## " in section[1:] else None]
    lines = re.findall(r"^\s+([CS]) ([0-9a-f]{2}) ([0-9a-f]{8}) \| ([0-9a-f ]+)$", section, re.M)
    assert len(lines) == frames
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    seen: list[Event] = []
    for who, kind, length, body in lines:
        frame = bytes.fromhex(kind + length + body.replace(" ", ""))
        assert int(length, 16) == len(frame) - HEADER.size
        sender, receiver = (client, server) if who == "C" else (server, client)
        receiver.receive_data(frame)
        got = events(receiver)
        seen.extend(got)
        for event in got:  # keep the sender's state machine in step
            if isinstance(event, Message):
                assert _send(sender, event) == frame
            elif isinstance(event, Data):
                assert _send(sender, event.payload) == frame
            elif isinstance(event, Audio):
                head = sender.send_audio_header(event.position, event.time_ns, len(event.payload))
                assert head + event.payload == frame
    assert client.state is server.state is State.IDLE
    return seen


def test_the_version_2_example_in_protocol_md_is_exact() -> None:
    """The live example: a listen with a gap and a stop, then a publish."""
    seen = _replay_example("## Example, version 2", 13)
    assert seen[0] == Hello(version=2, client="demo")
    assert seen[4] == Audio(320, 1_796_000_000_000_000_000, b"\x01\x00\xff\xff")
    assert seen[5] == GapNotice(position=322, frames=160)
    assert seen[7] == ListenEnd(
        reason="stopped", message="stopped by the listener", frames=2, lost=160
    )
    assert seen[10] == Data(b"\x01\x00\xff\xff")
    assert seen[12] == PublishDone(frames=2)


def _client_in_decoded_stream(fmt: str = "s16le", channels: int = 2) -> Connection:
    client = Connection(Role.CLIENT)
    client.send(Hello(version=1))
    client.receive_data(encode_message(Welcome(version=1, server="s")))
    client.next_event()
    client.send(StreamRequest(track="a", mode="decoded", sample_format=fmt, channels=channels))
    start = StreamStart(
        path="a",
        size=10,
        version="v",
        mode="decoded",
        sample_format=fmt,
        sample_rate=16000,
        channels=channels,
    )
    client.receive_data(encode_message(start))
    assert client.next_event() == start
    return client


def test_decoded_stream_counts_whole_frames() -> None:
    client = _client_in_decoded_stream("s16le", 2)  # 4 bytes a frame
    client.receive_data(HEADER.pack(KIND_DATA, 8) + b"\0" * 8)
    client.receive_data(encode_message(StreamEnd(sent=8, frames=2)))
    assert events(client) == [Data(b"\0" * 8), StreamEnd(sent=8, frames=2)]
    for sent, frames, match in [(8, 3, "frames"), (6, 1, "whole number")]:
        client = _client_in_decoded_stream("s16le", 2)
        client.receive_data(HEADER.pack(KIND_DATA, sent) + b"\0" * sent)
        client.receive_data(encode_message(StreamEnd(sent=sent, frames=frames)))
        with pytest.raises(RemoteProtocolError, match=match):
            events(client)


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        (StreamRequest(track="a", mode="video"), "mode"),
        (StreamRequest(track="a", pacing="warp"), "pacing"),
        (StreamRequest(track="a", mode="decoded", offset=3), "offset"),
        (StreamRequest(track="a", mode="decoded", sample_format="u8"), "sample_format"),
        (StreamRequest(track="a", mode="decoded", sample_rate=10), "sample_rate"),
        (StreamRequest(track="a", mode="decoded", channels=0), "channels"),
        (StreamRequest(track="a", mode="decoded", start=-1), "start"),
        (StreamRequest(track="a", mode="decoded", duration=0), "duration"),
        (StreamStart(path="a", size=1, version="v", mode="decoded"), "must state"),
    ],
)
def test_decoded_request_validation(request_: Message, problem: str) -> None:
    assert problem in (request_.problem() or "")
    with pytest.raises(MessageError, match=problem):
        decode_message(encode_message(request_)[HEADER.size :])
