"""The sans-IO Wyoming codec: the reference library's bytes, every limit, any input.

Each stream is fed whole, one byte at a time and with the next event's bytes
behind it (as tests/test_protocol.py does); hypothesis checks that peer bytes
can only ever raise WyomingProtocolError, and that any split of valid bytes
decodes to the same events.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from musiclib import wyoming_protocol as wp
from musiclib.errors import LocalProtocolError, WyomingProtocolError

FMT = wp.SPEECH_FORMAT
EVENTS = [
    wp.describe(),
    wp.audio_start(FMT, 0),
    wp.audio_chunk(FMT, b"\x01\x00" * 320, 20),
    wp.audio_stop(40),
    wp.detect(["okay_nabu"]),
    wp.transcribe("en"),
    wp.Event("transcript", {"text": "héllo ✓"}),
    wp.mic_info([("kitchen", "a mic", FMT)], "1.0"),
]


def decode_all(data: bytes, step: int | None = None) -> list[wp.Event]:
    decoder = wp.WyomingDecoder()
    events: list[wp.Event] = []
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in [*pieces, b""]:
        decoder.receive_data(piece)
        while True:
            event = decoder.next_event()
            if isinstance(event, wp.NeedData):
                break
            if isinstance(event, wp.Closed):
                return events
            events.append(event)
    raise AssertionError("no CLOSED after end of file")


def test_round_trip_whole_bytewise_and_back_to_back() -> None:
    data = b"".join(wp.encode(e) for e in EVENTS)
    for step in (None, 1, 7):
        assert decode_all(data, step) == EVENTS


def test_bytes_match_the_reference_library() -> None:
    wyoming_event = pytest.importorskip("wyoming.event", reason="the voice extra is not installed")
    for event in EVENTS:
        ours = wp.encode(event)
        theirs = io.BytesIO()
        wyoming_event.write_event(
            wyoming_event.Event(event.type, dict(event.data), event.payload or None), theirs
        )
        ref = theirs.getvalue()
        # the same line apart from the version each writes, then the same data and payload
        our_line, _, our_rest = ours.partition(b"\n")
        ref_line, _, ref_rest = ref.partition(b"\n")
        mine, its = json.loads(our_line), json.loads(ref_line)
        mine.pop("version"), its.pop("version")
        assert mine == its
        assert our_rest == ref_rest
        # and the reference reads what we write
        back = wyoming_event.read_event(io.BytesIO(ours))
        assert back.type == event.type and back.data == dict(event.data)
        assert (back.payload or b"") == event.payload


def test_data_in_the_line_is_merged_under_the_data_bytes() -> None:
    line = json.dumps({"type": "x", "data": {"a": 1, "b": 1}, "data_length": 8}).encode()
    assert decode_all(line + b"\n" + b'{"b": 2}') == [wp.Event("x", {"a": 1, "b": 2})]


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"not json\n", "not JSON"),
        (b"[1]\n", "not a JSON object"),
        (b'{"data": {}}\n', "'type'"),
        (b'{"type": ""}\n', "'type'"),
        (b'{"type": "x", "data": 3}\n', "'data' is not an object"),
        (b'{"type": "x", "data_length": -1}\n', "not a length"),
        (b'{"type": "x", "payload_length": true}\n', "not a length"),
        (b'{"type": "x", "payload_length": 99999999}\n', "limit"),
        (b'{"type": "x", "data_length": 3}\nabc', "not JSON"),
        (b'{"type": "x", "data_length": 2}\n[]', "not a JSON object"),
        (b'{"type": "x", "payload_length": 4}\nab', "closed in the middle"),
        (b'{"type": "x"', "closed in the middle"),
        (b"\xff\n", "not JSON"),
    ],
)
def test_malformed_input_is_a_clear_remote_error(data: bytes, says: str) -> None:
    with pytest.raises(WyomingProtocolError, match=says):
        decode_all(data)


def test_line_limit_is_checked_before_the_line_ends() -> None:
    decoder = wp.WyomingDecoder(max_line=100)
    decoder.receive_data(b"x" * 100)
    with pytest.raises(WyomingProtocolError, match="longer than 100"):
        decoder.next_event()
    with pytest.raises(LocalProtocolError):  # a failed decoder stays failed
        decoder.next_event()


def test_limits_on_data_and_payload_are_checked_from_the_line() -> None:
    decoder = wp.WyomingDecoder(max_data=10, max_payload=10)
    decoder.receive_data(b'{"type": "x", "data_length": 11}\n')
    with pytest.raises(WyomingProtocolError, match="data of 11 bytes"):
        decoder.next_event()
    decoder = wp.WyomingDecoder(max_payload=10)
    decoder.receive_data(b'{"type": "x", "payload_length": 11}\n')
    with pytest.raises(WyomingProtocolError, match="payload of 11 bytes"):
        decoder.next_event()


def test_local_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        wp.encode(wp.Event(""))
    with pytest.raises(LocalProtocolError):
        wp.encode(wp.Event("x", {"bad": object()}))


def test_typed_parsers() -> None:
    head = wp.parse_audio(wp.audio_chunk(FMT, b"\0\0" * 4, 1234))
    assert head == wp.AudioHead(FMT, 1234)
    with pytest.raises(WyomingProtocolError, match="whole frames"):
        wp.parse_audio(wp.Event("audio-chunk", FMT.fields(), b"\0\0\0"))
    with pytest.raises(WyomingProtocolError, match="rate"):
        wp.parse_audio(wp.Event("audio-start", {"rate": "16000", "width": 2, "channels": 1}))
    assert wp.parse_detection(wp.Event("detection", {"name": "n", "timestamp": 5})) == (
        wp.Detection("n", 5)
    )
    assert wp.parse_error(wp.error("boom", "x")) == "boom (x)"
    info = wp.parse_info(
        wp.Event("info", {"wake": [{"name": "p", "models": [{"name": "alexa"}, 3]}], "asr": []})
    )
    assert info.wake_models == ("alexa",) and info.asr_programs == () and info.kinds == ("wake",)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_arbitrary_bytes_raise_only_remote_errors(data: bytes, step: int) -> None:
    try:
        events = decode_all(data, step)
    except WyomingProtocolError:
        return
    for event in events:  # and the typed parsers on whatever decoded
        for parse in (wp.parse_audio, wp.parse_detection, wp.parse_transcript, wp.parse_error,
                      wp.parse_select, wp.parse_info):  # fmt: skip
            with contextlib.suppress(WyomingProtocolError):
                parse(event)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.builds(
            wp.Event,
            st.text(min_size=1, max_size=12).filter(lambda t: "\n" not in t),
            st.dictionaries(st.text(max_size=6), json_values, max_size=4),
            st.binary(max_size=64),
        ),
        max_size=5,
    ),
    st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8),
)
def test_any_split_of_valid_bytes_gives_the_same_events(
    events: list[wp.Event], cuts: list[int]
) -> None:
    data = b"".join(wp.encode(e) for e in events)
    decoder = wp.WyomingDecoder()
    got: list[wp.Event] = []
    at = 0
    for size in [*cuts * (len(data) // max(1, sum(cuts)) + 1)]:
        decoder.receive_data(data[at : at + size]) if at < len(data) else None
        at += size
        while isinstance(event := decoder.next_event(), wp.Event):
            got.append(event)
    decoder.receive_data(b"")
    assert isinstance(decoder.next_event(), wp.Closed)
    assert got == [wp.Event(e.type, e.data, e.payload) for e in events]


def test_the_codec_imports_no_trio() -> None:
    code = "import sys, musiclib.wyoming_protocol; print('trio' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
