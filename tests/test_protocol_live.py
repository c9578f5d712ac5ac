"""Protocol version 2 (live channels) in the sans-IO state machine.

Every conversation runs between two real :class:`Connection` objects, fed whole,
one byte at a time and with trailing bytes of the next frame (h11's way). The
crossings that only live audio has (a ``stop`` meeting ``listen_end`` on the wire,
an ``error`` meeting a publisher's data or its ``publish_end``) are played out with
both ends sending before either has read. Version gating keeps a version 1
conversation exactly as it was. Hypothesis drives random bytes into every reachable
version 2 state (only RemoteProtocolError may come out) and splits valid streams
anywhere (the events never change).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterable

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from musiclib.errors import LocalProtocolError, MessageError, RemoteProtocolError
from musiclib.protocol import (
    AUDIO_HEADER,
    HEADER,
    KIND_AUDIO,
    KIND_DATA,
    KIND_MESSAGE,
    MAX_DATA_SIZE,
    NEED_DATA,
    Audio,
    ChannelInfo,
    ChannelList,
    ChannelsRequest,
    Closed,
    Connection,
    Data,
    Error,
    Event,
    GapNotice,
    Hello,
    InfoRequest,
    ListEnd,
    ListenEnd,
    ListenRequest,
    ListenStart,
    ListRequest,
    Message,
    NeedData,
    PublishDone,
    PublishEnd,
    PublishReady,
    PublishRequest,
    Role,
    ServerStatus,
    State,
    StatusRequest,
    StopRequest,
    StreamEnd,
    StreamRequest,
    StreamStart,
    TrackInfo,
    TrackPage,
    Welcome,
    decode_message,
    encode_message,
)

C, S = Role.CLIENT, Role.SERVER
T0 = 1_700_000_000_000_000_000  # a wall clock in nanoseconds
BPF = 4  # s16le stereo: the listens below
PUB_BPF = 2  # s16le mono: the publishes below

CHANNEL = ChannelInfo(
    name="kitchen",
    source="mic",
    sample_format="s16le",
    sample_rate=16000,
    channels=1,
    state="live",
    listeners=2,
    position=320,
    latency_ms=12.5,
)
STATUS = ServerStatus(
    server="musiclib/0.1.0",
    versions=(1, 2),
    tracks=10,
    uptime=61.5,
    connections=1,
    scans=2,
    last_scan=3.25,
    last_scan_took=0.5,
    channels=1,
)


def samples(frames: int, seed: int = 0, bpf: int = BPF) -> bytes:
    """``frames`` frames of distinct bytes, so a misplaced byte shows."""
    return bytes((seed * 7 + i) % 251 for i in range(frames * bpf))


def start(position: int = 0, preroll: int = 0) -> ListenStart:
    return ListenStart(
        channel="kitchen",
        sample_format="s16le",
        sample_rate=16000,
        channels=2,
        position=position,
        preroll=preroll,
    )


def publish(channel: str = "studio") -> PublishRequest:
    return PublishRequest(channel=channel, sample_rate=16000, channels=1, source="test")


# ---- events and feeders (as in tests/test_protocol.py) ------------------------------


def merge(evs: Iterable[Event]) -> list[Event]:
    """Consecutive Data pieces joined: frame boundaries carry no meaning."""
    merged: list[Event] = []
    for event in evs:
        if isinstance(event, Data) and merged and isinstance(merged[-1], Data):
            merged[-1] = Data(merged[-1].payload + event.payload)
        else:
            merged.append(event)
    return merged


def events(conn: Connection) -> list[Event]:
    """Every event available now (until NEED_DATA or Closed)."""
    out: list[Event] = []
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData):
            return merge(out)
        out.append(event)
        if isinstance(event, Closed):
            return merge(out)


Feeder = Callable[[Connection, bytes], list[Event]]


def feed_whole(conn: Connection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    return events(conn)


def feed_bytewise(conn: Connection, data: bytes) -> list[Event]:
    out: list[Event] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        out.extend(events(conn))
    return merge(out)


FEEDERS = [pytest.param(feed_whole, id="whole"), pytest.param(feed_bytewise, id="bytewise")]

# What travels: a message, client or server payload (bytes: a data frame), or an audio frame.
Item = Message | bytes | Audio
Step = tuple[Role, Item]


def wire(conn: Connection, item: Item) -> bytes:
    """The bytes ``conn`` sends for ``item``, through its own state machine."""
    if isinstance(item, Audio):
        head = conn.send_audio_header(item.position, item.time_ns, len(item.payload))
        return head + item.payload
    if isinstance(item, bytes):
        return conn.send_data_header(len(item)) + item
    return conn.send(item)


def as_event(item: Item) -> Event:
    return Data(item) if isinstance(item, bytes) else item


HANDSHAKE: list[Step] = [
    (C, Hello(version=2, client="t")),
    (S, Welcome(version=2, server="s", tracks=1)),
]

TRANSCRIPT: list[Step] = [
    *HANDSHAKE,
    (C, ChannelsRequest()),
    (S, ChannelList(channels=(CHANNEL,))),
    (C, StatusRequest()),
    (S, STATUS),
    # a listen with preroll, a gap, then the source ends
    (C, ListenRequest(channel="kitchen", max_latency_ms=100, preroll_ms=20)),
    (S, start(position=1000, preroll=3)),
    (S, Audio(1000, T0, samples(3))),
    (S, GapNotice(position=1003, frames=7)),
    (S, Audio(1010, T0 + 1, samples(5, 1))),
    (S, ListenEnd(reason="source_ended", message="bye", frames=8, lost=7)),
    # version 1 requests still work in a version 2 conversation
    (C, ListRequest()),
    (S, TrackPage(tracks=(TrackInfo(path="a.wav", title="a", format="wav", size=3),))),
    (S, ListEnd(count=1)),
    # a publish: frames straddle data frames; only publish_end must be whole frames
    (C, publish()),
    (S, PublishReady(channel="studio")),
    (C, b"\x01\x02\x03"),
    (C, b"\x04\x05\x06\x07\x08\x09"),
    (C, b"\x0a"),
    (C, PublishEnd(sent=10)),
    (S, PublishDone(frames=5)),
    # refusals leave both ends idle
    (C, ListenRequest(channel="nowhere")),
    (S, Error(code="not_found", message="no channel 'nowhere'")),
    (C, publish()),
    (S, Error(code="channel_busy", message="busy")),
    # a stop in turn: audio already on its way still arrives, then listen_end
    (C, ListenRequest(channel="kitchen")),
    (S, start(position=0)),
    (S, Audio(0, T0, samples(2))),
    (C, StopRequest()),
    (S, Audio(2, T0 + 5, samples(1, 2))),
    (S, GapNotice(position=3, frames=4)),
    (S, ListenEnd(reason="stopped", message="stopped by the listener", frames=3, lost=4)),
    # the server ends a listen with an error (too slow), then a publish after publish_end
    (C, ListenRequest(channel="kitchen", frames=100)),
    (S, start(position=50)),
    (S, Audio(50, T0, samples(1))),
    (S, Error(code="too_slow", message="fell behind")),
    (C, publish()),
    (S, PublishReady(channel="studio")),
    (C, b"\x00\x01"),
    (C, PublishEnd(sent=2)),
    (S, Error(code="internal", message="oops")),
    (C, ChannelsRequest()),
    (S, ChannelList(channels=())),
]


def replay(
    transcript: list[Step], receiver: Role, feed: Feeder, group: bool = False
) -> tuple[list[Event], list[Event], Connection, Connection]:
    """Play ``transcript`` into a fresh ``receiver``; return (events seen, events expected,
    receiver, sender).

    The other end's bytes come from a real Connection of its role; the receiver sends
    its own side itself, so both state machines stay in step. With ``group``, the
    peer's consecutive frames arrive in one read (trailing bytes after each frame).
    """
    sender = Connection(S if receiver is C else C)
    conn = Connection(receiver)
    got: list[Event] = []
    expected: list[Event] = []
    pending = b""
    for who, item in transcript:
        if who is receiver:
            if pending:
                got.extend(feed(conn, pending))
                pending = b""
            sender.receive_data(wire(conn, item))
            assert merge(events(sender)) == merge([as_event(item)])
            continue
        data = wire(sender, item)
        expected.append(as_event(item))
        if group:
            pending += data
        else:
            got.extend(feed(conn, data))
    if pending:
        got.extend(feed(conn, pending))
    return merge(got), merge(expected), conn, sender


# ---- whole conversations -------------------------------------------------------------


@pytest.mark.parametrize("msg", [item for _, item in TRANSCRIPT if isinstance(item, Message)])
def test_every_v2_message_round_trips(msg: Message) -> None:
    frame = encode_message(msg)
    assert HEADER.unpack_from(frame) == (KIND_MESSAGE, len(frame) - HEADER.size)
    assert decode_message(frame[HEADER.size :]) == msg


@pytest.mark.parametrize("group", [False, True], ids=["frame-by-frame", "with-trailing"])
@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize("receiver", [C, S], ids=lambda r: r.value)
def test_v2_conversation(receiver: Role, feed: Feeder, group: bool) -> None:
    got, expected, conn, sender = replay(TRANSCRIPT, receiver, feed, group)
    assert got == expected
    audio = [item for who, item in TRANSCRIPT if isinstance(item, Audio)]
    assert [e for e in got if isinstance(e, Audio)] == (audio if receiver is C else [])
    assert conn.state is sender.state is State.IDLE
    assert conn.version == sender.version == 2
    assert conn.trailing_data == (b"", False)


def test_audio_frame_layout_is_exact() -> None:
    """Kind 3: length, then position u64 and time_ns i64 big-endian, then the samples."""
    server = _server_at(State.LISTENING)
    data = samples(2)
    frame = server.send_audio_header(0, -5, len(data)) + data
    assert frame[:5] == bytes([KIND_AUDIO]) + struct.pack(">I", 16 + 8)
    assert frame[5:21] == struct.pack(">Qq", 0, -5)
    assert frame[21:] == data


def test_audio_is_handed_out_only_when_whole_and_trailing_bytes_stay() -> None:
    client = _client_at(State.LISTENING)
    frame = _audio_frame(0, samples(3))
    after = encode_message(ListenEnd(reason="complete", message="", frames=3))
    client.receive_data(frame[:-1])
    assert client.next_event() is NEED_DATA
    client.receive_data(frame[-1:] + after[:4])
    assert client.next_event() == Audio(0, T0, samples(3))
    assert client.next_event() is NEED_DATA
    assert client.trailing_data == (after[:4], False)
    client.receive_data(after[4:])
    assert client.next_event() == ListenEnd(reason="complete", message="", frames=3)
    assert client.state is State.IDLE


def test_end_of_file_inside_an_audio_frame_is_a_remote_error() -> None:
    client = _client_at(State.LISTENING)
    client.receive_data(_audio_frame(0, samples(3))[:-2])
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed in an audio frame"):
        client.next_event()


# ---- crossings on the wire -----------------------------------------------------------


class Pair:
    """A client and a server Connection with the bytes in flight between them."""

    def __init__(self, version: int = 2) -> None:
        self.conns = {C: Connection(C), S: Connection(S)}
        self.in_flight = {C: b"", S: b""}  # bytes on their way *to* that role
        self.send(C, Hello(version=version))
        assert self.deliver(S) == [Hello(version=version)]
        self.send(S, Welcome(version=version, server="s"))
        assert self.deliver(C) == [Welcome(version=version, server="s")]

    @property
    def client(self) -> Connection:
        return self.conns[C]

    @property
    def server(self) -> Connection:
        return self.conns[S]

    def send(self, sender: Role, item: Item) -> None:
        to = S if sender is C else C
        self.in_flight[to] += wire(self.conns[sender], item)

    def deliver(self, to: Role, feed: Feeder = feed_whole) -> list[Event]:
        data, self.in_flight[to] = self.in_flight[to], b""
        return feed(self.conns[to], data) if data else []

    def exchange(self, request: Message, reply: Message) -> None:
        self.send(C, request)
        assert self.deliver(S) == [request]
        self.send(S, reply)
        assert self.deliver(C) == [reply]

    def states(self) -> tuple[State, State]:
        return self.client.state, self.server.state


TRAILING = [pytest.param(False, id="alone"), pytest.param(True, id="with-trailing")]


def _next_request_works(pair: Pair, feed: Feeder, already_sent: bool) -> None:
    """Both ends idle: a request and its reply pass (the request may be in flight)."""
    if not already_sent:
        pair.send(C, ListRequest())
        assert pair.deliver(S, feed) == [ListRequest()]
    pair.send(S, ListEnd(count=0))
    assert pair.deliver(C, feed) == [ListEnd(count=0)]
    assert pair.states() == (State.IDLE, State.IDLE)


@pytest.mark.parametrize("trailing", TRAILING)
@pytest.mark.parametrize("feed", FEEDERS)
def test_stop_crossing_listen_end_leaves_both_idle(feed: Feeder, trailing: bool) -> None:
    pair = Pair()
    pair.exchange(ListenRequest(channel="kitchen", frames=2), start())
    pair.send(S, Audio(0, T0, samples(2)))
    pair.send(S, ListenEnd(reason="complete", message="", frames=2))
    pair.send(C, StopRequest())  # the client has not read the end yet
    assert pair.states() == (State.LISTEN_STOPPING, State.IDLE)
    assert pair.deliver(C, feed) == [
        Audio(0, T0, samples(2)),
        ListenEnd(reason="complete", message="", frames=2),
    ]
    if trailing:  # the next request arrives in the same read as the late stop
        pair.send(C, ListRequest())
    got = pair.deliver(S, feed)
    assert got == ([StopRequest(), ListRequest()] if trailing else [StopRequest()])
    assert pair.server.state is (State.LISTING if trailing else State.IDLE)
    _next_request_works(pair, feed, already_sent=trailing)


@pytest.mark.parametrize("feed", FEEDERS)
def test_stop_crossing_an_error_leaves_both_idle(feed: Feeder) -> None:
    pair = Pair()
    pair.exchange(ListenRequest(channel="kitchen"), start(position=7))
    pair.send(S, GapNotice(position=7, frames=3))
    pair.send(S, Error(code="too_slow", message="cut"))
    pair.send(C, StopRequest())
    assert pair.deliver(C, feed) == [
        GapNotice(position=7, frames=3),
        Error(code="too_slow", message="cut"),
    ]
    assert pair.deliver(S, feed) == [StopRequest()]
    assert pair.states() == (State.IDLE, State.IDLE)
    _next_request_works(pair, feed, already_sent=False)


@pytest.mark.parametrize("trailing", TRAILING)
@pytest.mark.parametrize("feed", FEEDERS)
def test_server_error_mid_publish(feed: Feeder, trailing: bool) -> None:
    pair = Pair()
    pair.exchange(publish(), PublishReady(channel="studio"))
    pair.send(C, b"abcd")
    pair.send(S, Error(code="shutting_down", message="bye"))
    assert pair.states() == (State.PUBLISHING, State.PUBLISH_ABORTED)
    pair.send(C, b"efg")  # still on its way: the client has not seen the error
    assert pair.deliver(S, feed) == [Data(b"abcdefg")]
    assert pair.deliver(C, feed) == [Error(code="shutting_down", message="bye")]
    assert pair.states() == (State.PUBLISH_ABORTED, State.PUBLISH_ABORTED)
    pair.send(C, b"h")  # data after the error is still allowed; publish_end is owed
    pair.send(C, PublishEnd(sent=8))
    assert pair.client.state is State.IDLE
    if trailing:
        pair.send(C, ListRequest())
    got = pair.deliver(S, feed)
    assert got[:2] == [Data(b"h"), PublishEnd(sent=8)]
    assert got[2:] == ([ListRequest()] if trailing else [])
    _next_request_works(pair, feed, already_sent=trailing)


@pytest.mark.parametrize("trailing", TRAILING)
@pytest.mark.parametrize("feed", FEEDERS)
def test_error_crossing_publish_end(feed: Feeder, trailing: bool) -> None:
    pair = Pair()
    pair.exchange(publish(), PublishReady(channel="studio"))
    pair.send(C, b"ab")
    pair.send(C, PublishEnd(sent=2))
    pair.send(S, Error(code="shutting_down", message="bye"))
    assert pair.states() == (State.PUBLISH_CLOSING, State.PUBLISH_ABORTED)
    assert pair.deliver(C, feed) == [Error(code="shutting_down", message="bye")]
    assert pair.client.state is State.IDLE
    if trailing:
        pair.send(C, ListRequest())
    got = pair.deliver(S, feed)
    assert got == [Data(b"ab"), PublishEnd(sent=2)] + ([ListRequest()] if trailing else [])
    _next_request_works(pair, feed, already_sent=trailing)


def test_a_publish_end_the_server_did_not_count_is_refused_after_an_abort() -> None:
    pair = Pair()
    pair.exchange(publish(), PublishReady(channel="studio"))
    pair.send(C, b"abcd")
    pair.send(S, Error(code="shutting_down", message="bye"))
    pair.deliver(C)
    pair.in_flight[S] += encode_message(PublishEnd(sent=2))  # a lying publisher
    with pytest.raises(RemoteProtocolError, match="says 2 bytes, 4 were sent"):
        pair.deliver(S)


# ---- what each end may do -----------------------------------------------------------


def test_publisher_counts_are_checked_on_both_sides() -> None:
    pair = Pair()
    pair.exchange(publish(), PublishReady(channel="studio"))
    pair.send(C, b"abcd")
    with pytest.raises(LocalProtocolError, match="says 3 bytes"):
        pair.client.send(PublishEnd(sent=3))
    pair.in_flight[S] += encode_message(PublishEnd(sent=6))
    with pytest.raises(RemoteProtocolError, match="says 6 bytes, 4 were sent"):
        pair.deliver(S)
    assert pair.server.state is State.ERROR


def test_publish_end_must_be_whole_frames() -> None:
    pair = Pair()
    pair.exchange(publish(), PublishReady(channel="studio"))
    pair.send(C, b"abc")  # 1.5 frames of s16le mono
    with pytest.raises(LocalProtocolError, match="whole number of sample frames"):
        pair.client.send(PublishEnd(sent=3))
    pair.in_flight[S] += encode_message(PublishEnd(sent=3))
    with pytest.raises(RemoteProtocolError, match="whole number of sample frames"):
        pair.deliver(S)


def test_listen_end_frame_count_must_match() -> None:
    pair = Pair()
    pair.exchange(ListenRequest(channel="kitchen"), start(position=10))
    pair.send(S, Audio(10, T0, samples(2)))
    pair.send(S, GapNotice(position=12, frames=5))  # a gap is not a frame sent
    with pytest.raises(LocalProtocolError, match="says 7 frames, 2 were sent"):
        pair.server.send(ListenEnd(reason="stopped", message="", frames=7))
    pair.in_flight[C] += encode_message(ListenEnd(reason="stopped", message="", frames=7))
    with pytest.raises(RemoteProtocolError, match="says 7 frames, 2 were sent"):
        pair.deliver(C)
    assert pair.client.state is State.ERROR


def test_audio_counts_restart_with_each_listen() -> None:
    pair = Pair()
    for position in (0, 500):
        pair.exchange(ListenRequest(channel="kitchen"), start(position=position))
        pair.send(S, Audio(position, T0, samples(4)))
        pair.send(S, ListenEnd(reason="source_ended", message="", frames=4))
        assert [type(e) for e in pair.deliver(C)] == [Audio, ListenEnd]
        assert pair.states() == (State.IDLE, State.IDLE)


def test_client_sends_only_what_its_state_allows() -> None:
    pair = Pair()
    with pytest.raises(LocalProtocolError):
        pair.client.send(StopRequest())  # no listen
    with pytest.raises(LocalProtocolError):
        pair.client.send(PublishEnd(sent=0))  # no publish
    with pytest.raises(LocalProtocolError):
        pair.client.send_data_header(2)
    pair.send(C, ListenRequest(channel="kitchen"))
    with pytest.raises(LocalProtocolError):
        pair.client.send(StopRequest())  # no listen_start yet
    pair.deliver(S)
    pair.send(S, start())
    pair.deliver(C)
    with pytest.raises(LocalProtocolError):
        pair.client.send(ListRequest())  # a request during a listen
    with pytest.raises(LocalProtocolError):
        pair.client.send_data_header(4)  # a listener sends no data
    pair.send(C, StopRequest())
    with pytest.raises(LocalProtocolError):
        pair.client.send(StopRequest())  # once
    with pytest.raises(LocalProtocolError, match="only be sent by a server"):
        pair.client.send_audio_header(0, T0, 4)
    with pytest.raises(LocalProtocolError, match="may not send"):
        pair.client.send(ListenEnd(reason="stopped", message="", frames=0))


def test_server_sends_only_what_its_state_allows() -> None:
    pair = Pair()
    with pytest.raises(LocalProtocolError, match="inside a listen"):
        pair.server.send_audio_header(0, T0, 4)
    with pytest.raises(LocalProtocolError):
        pair.server.send(GapNotice(position=0, frames=1))
    with pytest.raises(LocalProtocolError):
        pair.server.send(StopRequest())
    pair.send(C, publish())
    pair.deliver(S)
    with pytest.raises(LocalProtocolError):
        pair.server.send(ListenStart("x", "s16le", 16000, 1))  # not the publish's reply
    pair.send(S, PublishReady(channel="studio"))
    with pytest.raises(LocalProtocolError, match="data may only be sent"):
        pair.server.send_data_header(2)  # publishing data flows to the server only
    with pytest.raises(LocalProtocolError):
        pair.server.send(PublishDone(frames=0))  # before publish_end


def test_server_audio_must_be_contiguous_whole_frames() -> None:
    server = _server_at(State.LISTENING)
    with pytest.raises(LocalProtocolError, match="frame 1 where frame 0"):
        server.send_audio_header(1, T0, 4)  # a hole without a gap
    for length in (0, 3, 6, MAX_DATA_SIZE + 4):
        with pytest.raises(LocalProtocolError, match="not 1"):
            server.send_audio_header(0, T0, length)
    server.send_audio_header(0, T0, 8)
    with pytest.raises(LocalProtocolError, match="gap at frame 5"):
        server.send(GapNotice(position=5, frames=1))
    server.send(GapNotice(position=2, frames=3))
    server.send_audio_header(5, T0, 4)
    assert server.state is State.LISTENING


# ---- bad audio from the peer ----------------------------------------------------------


def _audio_frame(position: int, payload: bytes, time_ns: int = T0) -> bytes:
    body = AUDIO_HEADER.pack(position, time_ns) + payload
    return HEADER.pack(KIND_AUDIO, len(body)) + body


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (_audio_frame(1, samples(1)), "frame 1 where frame 0 was due"),  # a hole, no gap
        (_audio_frame(0, samples(1) + b"x"), "not whole sample frames"),
        (_audio_frame(0, b"\0\0"), "not whole sample frames"),  # half a stereo frame
        (_audio_frame(0, b""), "not whole sample frames"),  # no samples at all
        (HEADER.pack(KIND_AUDIO, 8) + b"\0" * 8, "not whole sample frames"),  # short header
        (HEADER.pack(KIND_AUDIO, 16 + MAX_DATA_SIZE + 4), "exceeds the limit"),  # no body
        (HEADER.pack(KIND_DATA, 4) + b"\0" * 4, "data frame outside"),  # data, not audio
    ],
    ids=["hole", "partial-frame", "half-frame", "empty", "short-header", "oversize", "data"],
)
def test_bad_audio_is_a_remote_error(frame: bytes, match: str) -> None:
    client = _client_at(State.LISTENING)
    client.receive_data(frame)
    with pytest.raises(RemoteProtocolError, match=match) as info:
        client.next_event()
    assert not isinstance(info.value, MessageError)
    assert client.state is State.ERROR


def test_audio_size_limit_is_the_receivers() -> None:
    client = _client_at(State.LISTENING)
    client.max_data_size = 64
    client.receive_data(HEADER.pack(KIND_AUDIO, 16 + 68))  # refused before its body
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        client.next_event()
    client = _client_at(State.LISTENING)
    client.max_data_size = 64
    client.receive_data(_audio_frame(0, samples(16)))  # exactly the limit
    assert client.next_event() == Audio(0, T0, samples(16))


def test_a_gap_must_continue_the_listen() -> None:
    client = _client_at(State.LISTENING)
    client.receive_data(_audio_frame(0, samples(2)) + encode_message(GapNotice(3, 1)))
    assert client.next_event() == Audio(0, T0, samples(2))
    with pytest.raises(RemoteProtocolError, match="gap at frame 3 where frame 2"):
        client.next_event()


@pytest.mark.parametrize(
    "state",
    [State.IDLE, State.LISTEN_HEAD, State.CHANNELS, State.PUBLISHING, State.STREAMING],
    ids=lambda s: s.value,
)
def test_audio_outside_a_listen_is_a_remote_error(state: State) -> None:
    client = _client_at(state)
    client.receive_data(_audio_frame(0, samples(1)))
    with pytest.raises(RemoteProtocolError, match="audio frame outside of a listen"):
        client.next_event()


def test_audio_from_a_client_is_a_remote_error() -> None:
    server = _server_at(State.LISTENING)
    server.receive_data(_audio_frame(0, samples(1)))
    with pytest.raises(RemoteProtocolError, match="outside of a listen"):
        server.next_event()


def test_v2_messages_out_of_turn_are_remote_errors() -> None:
    for state, msg in [
        (State.IDLE, GapNotice(0, 1)),
        (State.IDLE, ListenEnd(reason="x", message="", frames=0)),
        (State.LISTENING, PublishDone(frames=0)),
        (State.LISTEN_HEAD, ChannelList(channels=())),
        (State.CHANNELS, STATUS),  # a status for a channels request
        (State.IDLE, STATUS),
        (State.PUBLISHING, ListenEnd(reason="x", message="", frames=0)),
        (State.PUBLISH_HEAD, PublishDone(frames=0)),
    ]:
        client = _client_at(state)
        client.receive_data(encode_message(msg))
        with pytest.raises(RemoteProtocolError, match="not allowed") as info:
            client.next_event()
        assert not isinstance(info.value, MessageError)
    for state, msg in [
        (State.LISTENING, ListRequest()),  # a request while audio flows
        (State.LISTEN_STOPPING, StopRequest()),  # a second stop
        (State.PUBLISHING, StopRequest()),
        (State.PUBLISH_CLOSING, PublishEnd(sent=0)),
    ]:
        server = _server_at(state)
        server.receive_data(encode_message(msg))
        with pytest.raises(RemoteProtocolError, match="not allowed") as info:
            server.next_event()
        assert not isinstance(info.value, MessageError)


def test_a_bad_v2_request_is_a_recoverable_bad_request() -> None:
    server = _server_at(State.IDLE)
    for body in [
        msgpack.packb({"type": "listen"}),  # no channel
        msgpack.packb({"type": "listen", "channel": "a", "max_latency_ms": 0}),
        msgpack.packb({"type": "publish", "channel": ".x", "sample_rate": 8000, "channels": 1}),
        msgpack.packb({"type": "publish", "channel": "a", "sample_rate": 8000, "channels": 9}),
    ]:
        server.receive_data(HEADER.pack(KIND_MESSAGE, len(body)) + body)
        with pytest.raises(MessageError):
            server.next_event()
        assert server.state is State.IDLE
        server.send(Error(code="bad_request", message="bad"))
    server.receive_data(encode_message(ChannelsRequest()))
    assert server.next_event() == ChannelsRequest()


@pytest.mark.parametrize(
    ("msg", "problem"),
    [
        (ListenRequest(channel="a", max_latency_ms=0), "max_latency_ms"),
        (ListenRequest(channel="a", max_latency_ms=60_001), "max_latency_ms"),
        (ListenRequest(channel="a", preroll_ms=-1), "preroll_ms"),
        (ListenRequest(channel="a", frames=0), "frames"),
        (ListenRequest(channel="a", sample_rate=5), "sample_rate"),
        (PublishRequest(channel="", sample_rate=8000, channels=1), "channel name"),
        (PublishRequest(channel="a/b", sample_rate=8000, channels=1), "channel name"),
        (PublishRequest(channel="x" * 65, sample_rate=8000, channels=1), "channel name"),
        (PublishRequest(channel="a", sample_rate=8000, channels=1, sample_format="u8"), "format"),
        (PublishEnd(sent=-1), "sent"),
        (GapNotice(position=0, frames=0), "gap"),
        (ListenStart("a", "s16le", 16000, 1, position=-1), "position"),
        (dataclasses.replace(STATUS, versions=()), "versions"),
        (dataclasses.replace(STATUS, connections=-1), "counts"),
        (dataclasses.replace(STATUS, uptime=-1.0), "uptime"),
        (dataclasses.replace(STATUS, last_scan=float("inf")), "last_scan"),
    ],
)
def test_invalid_v2_field_values(msg: Message, problem: str) -> None:
    assert problem in (msg.problem() or "")
    with pytest.raises(MessageError, match=problem):
        decode_message(encode_message(msg)[HEADER.size :])


# ---- versions ------------------------------------------------------------------------

V2_REQUESTS: list[Message] = [
    ChannelsRequest(),
    StatusRequest(),
    ListenRequest(channel="kitchen"),
    StopRequest(),
    publish(),
    PublishEnd(sent=0),
]


@pytest.mark.parametrize("request_", V2_REQUESTS, ids=lambda m: m.TYPE)
def test_a_v1_conversation_answers_v2_requests_with_bad_request(request_: Message) -> None:
    pair = Pair(version=1)
    pair.in_flight[S] += encode_message(request_)
    with pytest.raises(MessageError, match="version 1") as info:
        pair.deliver(S)
    assert type(info.value) is MessageError  # recoverable: answer and go on
    assert pair.server.state is State.IDLE
    pair.send(S, Error(code="bad_request", message=str(info.value)))
    assert pair.deliver(C) == [Error(code="bad_request", message=str(info.value))]
    _next_request_works(pair, feed_whole, already_sent=False)


@pytest.mark.parametrize("request_", V2_REQUESTS, ids=lambda m: m.TYPE)
def test_a_v1_client_may_not_send_v2_requests(request_: Message) -> None:
    pair = Pair(version=1)
    with pytest.raises(LocalProtocolError, match="needs protocol version 2"):
        pair.client.send(request_)
    assert pair.client.state is State.IDLE


def test_a_v1_client_refuses_v2_replies_from_the_server() -> None:
    pair = Pair(version=1)
    pair.send(C, ListRequest())
    pair.deliver(S)
    pair.in_flight[C] += encode_message(ChannelList(channels=()))
    with pytest.raises(RemoteProtocolError, match="version 1") as info:
        pair.deliver(C)
    assert not isinstance(info.value, MessageError)
    with pytest.raises(LocalProtocolError, match="version 2"):
        pair.server.send(ChannelList(channels=()))


def test_the_conversation_takes_the_lower_version() -> None:
    """A version 2 client and a server that answers with version 1 (an older one)."""
    client = Connection(C)
    client.send(Hello(version=2))
    client.receive_data(encode_message(Welcome(version=1, server="old")))
    assert isinstance(client.next_event(), Welcome)
    assert client.version == 1
    with pytest.raises(LocalProtocolError, match="needs protocol version 2"):
        client.send(ListenRequest(channel="kitchen"))
    server = Connection(S)
    server.receive_data(encode_message(Hello(version=1)))
    server.next_event()
    server.send(Welcome(version=1, server="new"))
    assert server.version == 1


def test_a_welcome_above_the_hello_version_is_refused() -> None:
    client = Connection(C)
    client.send(Hello(version=1))
    client.receive_data(encode_message(Welcome(version=2, server="confused")))
    with pytest.raises(RemoteProtocolError, match="version 2"):
        client.next_event()
    server = Connection(S)
    server.receive_data(encode_message(Hello(version=1)))
    server.next_event()
    with pytest.raises(LocalProtocolError, match="version 2"):
        server.send(Welcome(version=2, server="s"))
    with pytest.raises(LocalProtocolError, match="positive"):
        server.send(Welcome(version=0, server="s"))
    assert server.state is State.AWAIT_WELCOME
    server.send(Welcome(version=1, server="s"))
    assert server.version == 1


V1_TRANSCRIPT: list[Step] = [
    (C, Hello(version=1, client="old")),
    (S, Welcome(version=1, server="s", tracks=1)),
    (C, ListRequest(query="x")),
    (S, TrackPage(tracks=(TrackInfo(path="a", title="a", format="mp3", size=10),))),
    (S, ListEnd(count=1)),
    (C, InfoRequest(track="x")),
    (S, Error(code="not_found", message="no")),
    (C, StreamRequest(track="a", offset=2)),
    (S, StreamStart(path="a", size=10, version="v", offset=2, length=8)),
    (S, b"abcde"),
    (S, b"fgh"),
    (S, StreamEnd(sent=8, sha256="0" * 64)),
]


@pytest.mark.parametrize("group", [False, True], ids=["frame-by-frame", "with-trailing"])
@pytest.mark.parametrize("feed", FEEDERS)
def test_a_v1_client_against_a_v2_server_works_as_before(feed: Feeder, group: bool) -> None:
    """Same events, same bytes: a version 2 server adds nothing to a version 1 conversation."""
    got, expected, server, client = replay(V1_TRANSCRIPT, S, feed, group)
    assert got == expected
    assert server.state is client.state is State.IDLE
    assert server.version == client.version == 1
    got, expected, client, server = replay(V1_TRANSCRIPT, C, feed, group)
    assert got == expected
    # every frame the server sent is the plain encoding, as a version 1 server's
    server = Connection(S)
    server.receive_data(encode_message(Hello(version=1)))
    server.next_event()
    for who, item in V1_TRANSCRIPT[1:]:
        if who is C:
            assert isinstance(item, Message)
            server.receive_data(encode_message(item))
            assert server.next_event() == item
        elif isinstance(item, Message):
            assert server.send(item) == encode_message(item)
        else:
            assert server.send_data_header(len(item)) == HEADER.pack(KIND_DATA, len(item))


# ---- reaching every state --------------------------------------------------------------

# The steps (from a fresh pair, after a version 2 handshake) that put both ends in a state.
_ROUTES: dict[State, list[Step]] = {
    State.IDLE: [],
    State.CHANNELS: [(C, ChannelsRequest())],
    State.STATUS: [(C, StatusRequest())],
    State.LISTEN_HEAD: [(C, ListenRequest(channel="kitchen"))],
    State.LISTENING: [(C, ListenRequest(channel="kitchen")), (S, start())],
    State.LISTEN_STOPPING: [
        (C, ListenRequest(channel="kitchen")),
        (S, start(position=4)),
        (C, StopRequest()),
    ],
    State.PUBLISH_HEAD: [(C, publish())],
    State.PUBLISHING: [(C, publish()), (S, PublishReady(channel="studio")), (C, b"ab")],
    State.PUBLISH_CLOSING: [
        (C, publish()),
        (S, PublishReady(channel="studio")),
        (C, PublishEnd(sent=0)),
    ],
    State.PUBLISH_ABORTED: [
        (C, publish()),
        (S, PublishReady(channel="studio")),
        (S, Error(code="shutting_down", message="bye")),
    ],
    State.STREAMING: [
        (C, StreamRequest(track="a")),
        (S, StreamStart(path="a", size=10, version="v", length=10)),
    ],
}
V2_STATES = list(_ROUTES)


def _pair_at(state: State) -> Pair:
    pair = Pair()
    for who, item in _ROUTES[state]:
        pair.send(who, item)
        pair.deliver(S if who is C else C)
    assert pair.states() == (state, state)
    return pair


def _client_at(state: State) -> Connection:
    return _pair_at(state).client


def _server_at(state: State) -> Connection:
    return _pair_at(state).server


@pytest.mark.parametrize("state", V2_STATES, ids=lambda s: s.value)
def test_every_route_reaches_its_state(state: State) -> None:
    assert _pair_at(state).states() == (state, state)


def _drain(conn: Connection, limit: int) -> None:
    """Pull events until the peer's bytes run out; a recoverable bad request is answered
    as the server shell answers it. Only RemoteProtocolError may escape."""
    for _ in range(limit):
        try:
            event = conn.next_event()
        except MessageError:
            conn.send(Error(code="bad_request", message="bad"))  # must always be allowed
            continue
        if isinstance(event, (Closed, NeedData)):
            return


@settings(deadline=None)
@given(
    st.binary(max_size=512),
    st.sampled_from([C, S]),
    st.sampled_from(V2_STATES),
    st.booleans(),
)
def test_random_bytes_in_every_v2_state_only_raise_remote_errors(
    data: bytes, role: Role, state: State, eof: bool
) -> None:
    conn = _pair_at(state).conns[role]
    try:
        conn.receive_data(data)
        if eof:
            conn.receive_data(b"")
        _drain(conn, len(data) + 2)
    except RemoteProtocolError:
        pass


# Frames that make sense somewhere in a version 2 conversation, to get random sequences
# past the first header check.
_PEER_MESSAGES = [
    item for _, item in TRANSCRIPT + _ROUTES[State.LISTEN_STOPPING] if isinstance(item, Message)
]
frames_st = st.one_of(
    st.sampled_from(_PEER_MESSAGES).map(encode_message),
    st.builds(
        _audio_frame,
        st.integers(0, 8),
        st.integers(0, 4).map(lambda n: samples(n)),
        st.integers(-(2**63), 2**63 - 1),
    ),
    st.builds(lambda p, n: encode_message(GapNotice(p, n)), st.integers(0, 8), st.integers(1, 4)),
    st.binary(min_size=1, max_size=9).map(lambda b: HEADER.pack(KIND_DATA, len(b)) + b),
    st.binary(max_size=12),
)


@settings(deadline=None)
@given(
    st.lists(frames_st, max_size=12),
    st.sampled_from([C, S]),
    st.sampled_from(V2_STATES),
)
def test_random_bytes_of_plausible_frames_only_raise_remote_errors(
    frames: list[bytes], role: Role, state: State
) -> None:
    conn = _pair_at(state).conns[role]
    data = b"".join(frames)
    try:
        conn.receive_data(data)
        _drain(conn, len(data) + 2)
    except RemoteProtocolError:
        pass


@settings(deadline=None)
@given(st.data(), st.sampled_from([C, S]))
def test_any_split_of_a_valid_v2_stream_gives_the_same_events(
    data: st.DataObject, receiver: Role
) -> None:
    def feed_split(conn: Connection, chunk: bytes) -> list[Event]:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(chunk)), max_size=8)))
        out: list[Event] = []
        for a, b in zip([0, *cuts], [*cuts, len(chunk)], strict=True):
            if b > a:  # b"" would mean end of file
                conn.receive_data(chunk[a:b])
                out.extend(events(conn))
        return merge(out)

    got, expected, conn, _ = replay(TRANSCRIPT, receiver, feed_split, group=True)
    assert got == expected
    assert conn.state is State.IDLE
