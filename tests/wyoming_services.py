"""Wyoming services for the tests and the bench, built from the reference library.

Run as a program (asyncio, in a process of its own: the ``wyoming`` library is
asyncio, musiclib is trio)::

    python tests/wyoming_services.py wake [--port P]   # microWakeWord (pymicro-wakeword)
    python tests/wyoming_services.py asr  [--port P]   # a "recogniser" that counts samples
    python tests/wyoming_services.py detect-file WAV   # the wake detector on a file, paced

A service prints ``READY <port>`` on standard output once it accepts, and
one line per answer it gives on standard error. The wake service answers
``detection`` with the ``timestamp`` of the chunk that fired (so the
client's clock comes back), once per ``REFRACTORY`` seconds of audio; the
``asr`` service answers each ``audio-stop`` with a transcript saying what
it received (``N samples at R Hz W bytes C ch from T ms``) and then closes
the connection, as wyoming-faster-whisper does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import wave

from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info, WakeModel, WakeProgram
from wyoming.server import AsyncEventHandler, AsyncTcpServer
from wyoming.wake import Detect, Detection, NotDetected

#: seconds of audio after a detection during which the same word is not reported again
REFRACTORY = 2.0
MODELS = ("okay_nabu", "alexa", "hey_mycroft", "hey_jarvis")
ATTRIBUTION = Attribution(name="musiclib tests", url="https://example.invalid/")


def wake_info() -> Info:
    models = [
        WakeModel(
            name=m,
            attribution=ATTRIBUTION,
            installed=True,
            description=m.replace("_", " "),
            version="2.5.0",
            languages=["en"],
            phrase=m.replace("_", " "),
        )
        for m in MODELS
    ]
    program = WakeProgram(
        name="microwakeword",
        attribution=ATTRIBUTION,
        installed=True,
        description="pymicro-wakeword",
        version="2.5.0",
        models=models,
    )
    return Info(wake=[program])


class Detector:
    """microWakeWord on 16 kHz 16-bit mono, several models at once."""

    def __init__(self, names: list[str] | None) -> None:
        from pymicro_wakeword import MicroWakeWord, MicroWakeWordFeatures, Model

        self.models = {n: MicroWakeWord.from_builtin(Model(n)) for n in names or MODELS}
        self.features = MicroWakeWordFeatures()
        self.quiet_until: dict[str, float] = {}

    def feed(self, pcm: bytes, seconds: float) -> list[str]:
        """Names detected in ``pcm``; ``seconds`` is the audio time at its start."""
        found = []
        for features in self.features.process_streaming(pcm):
            for name, model in self.models.items():
                if model.process_streaming(features) and seconds >= self.quiet_until.get(name, 0):
                    self.quiet_until[name] = seconds + REFRACTORY
                    found.append(name)
        return found


class WakeHandler(AsyncEventHandler):
    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.names: list[str] | None = None
        self.detector: Detector | None = None
        self.detected = False
        self.samples = 0

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(wake_info().event())
        elif Detect.is_type(event.type):
            self.names = [n for n in (Detect.from_event(event).names or []) if n in MODELS] or None
        elif AudioStart.is_type(event.type):
            self.detector = Detector(self.names)
            self.detected = False
            self.samples = 0
        elif AudioChunk.is_type(event.type):
            if self.detector is None:
                self.detector = Detector(self.names)
            chunk = AudioChunk.from_event(event)
            assert (chunk.rate, chunk.width, chunk.channels) == (16000, 2, 1), chunk
            for name in self.detector.feed(chunk.audio, self.samples / 16000):
                self.detected = True
                print(f"detection {name} at {chunk.timestamp} ms", file=sys.stderr, flush=True)
                await self.write_event(Detection(name=name, timestamp=chunk.timestamp).event())
            self.samples += len(chunk.audio) // 2
        elif AudioStop.is_type(event.type):
            if not self.detected:
                await self.write_event(NotDetected().event())
            self.detector = None
        return True


def asr_info() -> Info:
    model = AsrModel(
        name="sample-counter",
        attribution=ATTRIBUTION,
        installed=True,
        description="says how much audio it got",
        version="1",
        languages=["en"],
    )
    program = AsrProgram(
        name="test-asr",
        attribution=ATTRIBUTION,
        installed=True,
        description="a test recogniser",
        version="1",
        models=[model],
    )
    return Info(asr=[program])


class AsrHandler(AsyncEventHandler):
    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.samples = 0
        self.fmt = (0, 0, 0)
        self.first: int | None = None
        self.asked = False

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(asr_info().event())
        elif Transcribe.is_type(event.type):
            self.asked = True
        elif AudioStart.is_type(event.type):
            self.samples, self.first = 0, None
        elif AudioChunk.is_type(event.type):
            chunk = AudioChunk.from_event(event)
            self.fmt = (chunk.rate, chunk.width, chunk.channels)
            self.samples += len(chunk.audio) // (chunk.width * chunk.channels)
            if self.first is None:
                self.first = chunk.timestamp
        elif AudioStop.is_type(event.type):
            rate, width, channels = self.fmt
            text = (
                f"{self.samples} samples at {rate} Hz {width} bytes {channels} ch "
                f"from {self.first} ms (transcribe asked: {self.asked})"
            )
            print(f"transcript {text}", file=sys.stderr, flush=True)
            await self.write_event(Transcript(text=text).event())
            return False  # close, as wyoming-faster-whisper does
        return True


async def serve(kind: str, port: int) -> None:
    handler = WakeHandler if kind == "wake" else AsrHandler
    server = AsyncTcpServer("127.0.0.1", port)
    await server.start(handler)
    bound = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"READY {bound}", flush=True)
    await asyncio.Event().wait()


def detect_file(path: str, paced: bool) -> None:
    """The baseline: the same detector on a WAV file read in 20 ms chunks (in real time
    with ``paced``); prints ``detection NAME at S s`` and its wall-clock time (ns)."""
    with wave.open(path, "rb") as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (16000, 2, 1)
        pcm = wav.readframes(wav.getnframes())
    detector = Detector(["okay_nabu"])
    step = 320 * 2
    start = time.monotonic()
    print(f"start {time.time_ns()}", flush=True)
    for i in range(0, len(pcm), step):
        seconds = i / 2 / 16000
        if paced:  # the chunk has been "captured" once its last sample's time has come
            delay = start + seconds + 0.02 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        for name in detector.feed(pcm[i : i + step], seconds):
            print(f"detection {name} at {seconds:.2f} s {time.time_ns()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["wake", "asr", "detect-file"])
    parser.add_argument("wav", nargs="?")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--paced", action="store_true")
    args = parser.parse_args()
    if args.kind == "detect-file":
        detect_file(args.wav, args.paced)
        return
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.kind, args.port))


if __name__ == "__main__":
    main()
