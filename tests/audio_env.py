"""A sound system for tests on a machine without a sound card.

Two stand-ins for real devices, both reached by PortAudio through ALSA:

* A private PulseAudio daemon with two null sinks, ``mic`` and ``spk``
  (:func:`running_pulse`). The default source is ``mic.monitor``: what
  ``paplay -d mic`` plays is what a program recording from the default device
  hears, so ``mic`` is a microphone the test speaks into. The default sink is
  ``spk``: what a program plays on the default device can be recorded from
  ``spk.monitor`` with ``parec``. PortAudio sees the daemon as the ALSA
  devices ``pulse`` and ``default`` (the pulse plugin of libasound2-plugins).

* An ALSA PCM of ``type file`` with an ``infile`` (:func:`file_input`):
  recording from it yields exactly the bytes of a file. With ``slave.pcm
  "null"`` it is unpaced (it delivers as fast as it is read: 2 s of audio in a
  few ms); with ``paced=True`` its slave is the pulse daemon, which clocks it
  in real time while the samples still come from the file. Past the end of
  the file it goes on delivering stale bytes of its ring buffer (not silence,
  not an error): read only as much as the file holds.

What was measured here (PulseAudio 16.1, alsa-lib 1.2.8, PortAudio 19.6):

* At the null sinks' own format (:data:`PULSE_FORMAT`, s16le 44100 Hz
  stereo) every sample passes untouched both ways: recorded from ``mic`` and
  played to ``spk``, the bytes are the source's, byte for byte, from its
  first frame to its last. Recording f32le at that rate gives exactly
  sample / 32768. At another rate or channel count pulse resamples and remixes.
* Two things in pulse break that unless handled, and :func:`running_pulse`
  handles both. A null sink with nobody asking for low latency renders 2 s
  at a time, so a recorder gets nothing for up to 2 s and then a burst (and
  ``paplay`` of 0.1 s takes 2 s to drain): two ``parec --latency-msec=10``
  "keepers" hold both sinks at 10 ms, and a suspend/resume of each sink
  resets the 2 s it had already rendered ahead. And when a new stream joins
  a sink, pulse rewinds what the sink rendered ahead; the monitor cannot
  take back what it already delivered, so the first 5-10 ms of every
  ``paplay`` were lost: the sinks are loaded with ``norewinds=1``.
* With no one playing into ``mic``, ``mic.monitor`` delivers silence in real
  time, like a microphone in a quiet room.

PortAudio reads the ALSA configuration and lists the devices once, in
``Pa_Initialize`` (at ``import sounddevice``). So the environment must be set
before that, or PortAudio initialised again: :func:`reinit_portaudio` (used by
:func:`running_pulse` and :func:`file_input` whenever sounddevice is already
imported) terminates and initialises it, which also makes alsa-lib reread its
configuration. No stream may be open while that happens. A server or client
started as a subprocess simply inherits the environment: :attr:`Pulse.env`
and :attr:`FileInput.env`.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib.util
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from musiclib.decode import AudioFormat

#: the null sinks' sample format (PulseAudio's default, spelled out when loading them)
PULSE_FORMAT = AudioFormat("s16le", 44100, 2)
#: the sink a test plays into; its monitor is the default source (the "microphone")
MIC_SINK = "mic"
#: the default sink (the "speaker"); its monitor is what a test records
SPEAKER_SINK = "spk"
#: the ALSA PCM that :func:`file_input` defines
FILE_INPUT = "filemic"
#: seconds the daemon gets to start answering, and to exit
PULSE_TIMEOUT = 10.0

_INSTALL = "make test installs it when run as root"


def portaudio_problem() -> str | None:
    """Why PortAudio cannot be used from the tests, or ``None`` if it can."""
    if importlib.util.find_spec("sounddevice") is None:
        return "the sounddevice package is not installed (pip install -e '.[dev]')"
    if ctypes.util.find_library("portaudio") is None:
        return f"PortAudio (libportaudio2) is not installed ({_INSTALL})"
    return None


def _alsa_pulse_plugin() -> bool:
    patterns = ("/usr/lib/*/alsa-lib", "/usr/lib/alsa-lib", "/usr/lib64/alsa-lib")
    return any(
        glob.glob(os.path.join(pattern, "libasound_module_pcm_pulse.so")) for pattern in patterns
    )


def pulse_problem() -> str | None:
    """Why the private PulseAudio daemon cannot be used, or ``None`` if it can."""
    if shutil.which("pulseaudio") is None:
        return f"PulseAudio is not installed ({_INSTALL})"
    for tool in ("pactl", "paplay", "parec"):
        if shutil.which(tool) is None:
            return f"the PulseAudio tools (pulseaudio-utils: {tool}) are not installed ({_INSTALL})"
    if not _alsa_pulse_plugin():
        return f"ALSA's pulse plugin (libasound2-plugins) is not installed ({_INSTALL})"
    return portaudio_problem()


def reinit_portaudio() -> None:
    """Make PortAudio (and alsa-lib) read the environment again, if it was initialised.

    PortAudio lists devices once, in ``Pa_Initialize``; terminating it also
    frees alsa-lib's cached configuration. No stream may be open.
    """
    sd = sys.modules.get("sounddevice")
    if sd is not None:
        sd._terminate()
        sd._initialize()


@contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block (PortAudio reinitialised both ways)."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    reinit_portaudio()
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reinit_portaudio()


def noise(frames: int, fmt: AudioFormat = PULSE_FORMAT, seed: int = 1) -> bytes:
    """``frames`` frames of reproducible s16le noise: never silent, easy to find again."""
    if fmt.sample_format != "s16le":
        raise ValueError("noise() makes s16le samples")
    return random.Random(seed).randbytes(frames * fmt.bytes_per_frame)


def write_wav(path: Path, data: bytes, fmt: AudioFormat = PULSE_FORMAT) -> Path:
    """Write s16le ``data`` as a WAV file of ``fmt``'s rate and channels."""
    if fmt.sample_format != "s16le":
        raise ValueError("write_wav() writes s16le samples")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(fmt.channels)
        out.setsampwidth(2)
        out.setframerate(fmt.sample_rate)
        out.writeframes(data)
    return path


def _stop(process: subprocess.Popen[bytes], timeout: float = PULSE_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL if needed, and always reap."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


class Recording:
    """``parec`` recording a source into memory until :meth:`stop` (a reader thread drains it)."""

    def __init__(self, argv: list[str], env: Mapping[str, str]) -> None:
        self._process = subprocess.Popen(
            argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
        )
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self._process.stdout is not None
        while chunk := self._process.stdout.read1(65536):
            self._chunks.append(chunk)

    def stop(self) -> bytes:
        """Stop ``parec`` and return everything it recorded."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)  # parec flushes and exits
        try:
            self._process.wait(timeout=PULSE_TIMEOUT)
        finally:
            _stop(self._process)
            self._reader.join(timeout=PULSE_TIMEOUT)
        return b"".join(self._chunks)


@dataclass
class Pulse:
    """A running private PulseAudio daemon (see :func:`running_pulse`)."""

    directory: Path
    #: what a process needs to reach the daemon: XDG_RUNTIME_DIR, HOME, PULSE_SERVER
    env: dict[str, str]
    format: AudioFormat = PULSE_FORMAT
    _keepers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def tool_env(self) -> dict[str, str]:
        """The whole environment for a pulse tool (``os.environ`` plus :attr:`env`)."""
        return {**os.environ, **self.env}

    def pactl(self, *args: str) -> str:
        """Run ``pactl`` on the daemon; its output."""
        done = subprocess.run(
            ["pactl", *args],
            env=self.tool_env(),
            capture_output=True,
            text=True,
            timeout=PULSE_TIMEOUT,
            check=True,
        )
        return done.stdout

    def play_into_mic(self, wav: Path, *, timeout: float = 30.0) -> None:
        """Play ``wav`` into the ``mic`` sink, in real time; returns once it has played.

        A default paplay buffers 2 s and takes that long to drain; with 20 ms it
        could not keep its buffer filled on a loaded machine and pulse played
        silence in the holes (the sound arrived cut into pieces): 200 ms holds.
        """
        subprocess.run(
            ["paplay", "-d", MIC_SINK, "--latency-msec=200", str(wav)],
            env=self.tool_env(),
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=True,
        )

    def _parec(self, source: str, fmt: AudioFormat) -> list[str]:
        return [
            "parec",
            "-d",
            source,
            "--raw",
            f"--format={fmt.sample_format}",
            f"--rate={fmt.sample_rate}",
            f"--channels={fmt.channels}",
            "--latency-msec=10",
        ]

    def start_recording_speaker(self, fmt: AudioFormat | None = None) -> Recording:
        """Start recording what is played on ``spk``; :meth:`Recording.stop` returns it."""
        return Recording(
            self._parec(SPEAKER_SINK + ".monitor", fmt or self.format), self.tool_env()
        )

    def record_speaker(self, seconds: float, fmt: AudioFormat | None = None) -> bytes:
        """Record ``seconds`` of what is played on ``spk`` (exactly that many frames)."""
        fmt = fmt or self.format
        size = round(seconds * fmt.sample_rate) * fmt.bytes_per_frame
        process = subprocess.Popen(
            self._parec(SPEAKER_SINK + ".monitor", fmt),
            env=self.tool_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        timer = threading.Timer(seconds + PULSE_TIMEOUT, process.kill)
        timer.start()
        try:
            assert process.stdout is not None
            data = process.stdout.read(size)
        finally:
            timer.cancel()
            _stop(process)
        if len(data) != size:
            raise RuntimeError(f"parec delivered {len(data)} of {size} bytes")
        return data


def _wait_until_answering(pulse: Pulse, daemon: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + PULSE_TIMEOUT
    while True:
        if daemon.poll() is not None:
            text = log.read_text(errors="replace")
            raise RuntimeError(f"pulseaudio exited with status {daemon.returncode}:\n{text}")
        done = subprocess.run(
            ["pactl", "info"], env=pulse.tool_env(), capture_output=True, timeout=PULSE_TIMEOUT
        )
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"pulseaudio did not answer within {PULSE_TIMEOUT:g} s")
        time.sleep(0.05)


@contextmanager
def running_pulse(directory: Path) -> Iterator[Pulse]:
    """Run a private PulseAudio daemon in ``directory`` and point this process at it.

    The daemon runs in the foreground as our child (so it is reaped, not left
    a zombie) with a private XDG_RUNTIME_DIR and HOME under ``directory``;
    those and PULSE_SERVER are set in ``os.environ`` for the block, so this
    process and every child reach it. It runs as root too (it only warns).
    On the way out: ``pulseaudio -k``, then SIGTERM/SIGKILL if it lingers.
    """
    runtime = directory / "runtime"
    home = directory / "home"
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "XDG_RUNTIME_DIR": str(runtime),
        "HOME": str(home),
        "PULSE_SERVER": f"unix:{runtime / 'pulse' / 'native'}",
    }
    pulse = Pulse(directory, env)
    fmt = PULSE_FORMAT
    spec = f"format={fmt.sample_format} rate={fmt.sample_rate} channels={fmt.channels}"
    log = directory / "pulseaudio.log"
    argv = [
        "pulseaudio",
        "--daemonize=no",
        "-n",
        "--exit-idle-time=-1",
        "--log-target=stderr",
        "--load=module-native-protocol-unix",
        f"--load=module-null-sink sink_name={MIC_SINK} {spec} norewinds=1",
        f"--load=module-null-sink sink_name={SPEAKER_SINK} {spec} norewinds=1",
    ]
    with open(log, "wb") as log_file:
        daemon = subprocess.Popen(
            argv,
            env=pulse.tool_env(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    try:
        _wait_until_answering(pulse, daemon, log)
        pulse.pactl("set-default-source", MIC_SINK + ".monitor")
        pulse.pactl("set-default-sink", SPEAKER_SINK)
        for sink in (MIC_SINK, SPEAKER_SINK):
            keeper = subprocess.Popen(
                pulse._parec(sink + ".monitor", fmt),
                env=pulse.tool_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            pulse._keepers.append(keeper)
        time.sleep(0.2)  # the keepers connect
        for sink in (MIC_SINK, SPEAKER_SINK):
            pulse.pactl("suspend-sink", sink, "1")
            pulse.pactl("suspend-sink", sink, "0")
        with patched_environ(env):
            yield pulse
    finally:
        for keeper in pulse._keepers:
            _stop(keeper)
        if daemon.poll() is None:
            subprocess.run(
                ["pulseaudio", "-k"],
                env=pulse.tool_env(),
                capture_output=True,
                timeout=PULSE_TIMEOUT,
                check=False,
            )
            with suppress(subprocess.TimeoutExpired):  # _stop() insists below
                daemon.wait(timeout=PULSE_TIMEOUT)
        _stop(daemon)


@dataclass(frozen=True)
class FileInput:
    """An ALSA input device that plays back a file's bytes (see :func:`file_input`)."""

    #: the PCM's name, as PortAudio lists it and as ``open_input`` takes it
    name: str
    #: the raw samples it delivers
    path: Path
    #: what a process needs to see the device: XDG_CONFIG_HOME (alsa/asoundrc in it)
    env: dict[str, str]


def write_file_input_config(
    config_home: Path, infile: Path, *, name: str = FILE_INPUT, paced: bool = False
) -> dict[str, str]:
    """Write ``config_home/alsa/asoundrc`` defining the PCM ``name`` that reads ``infile``.

    alsa-lib reads ``$XDG_CONFIG_HOME/alsa/asoundrc`` after ``~/.asoundrc``;
    returns the environment that makes it do so. ``infile`` holds raw
    samples in exactly the format the device will be opened with (the
    ``null`` slave takes any). ``paced=True`` clocks the device with the
    pulse daemon (which must be running) instead of not at all.
    """
    text = str(infile.absolute())
    if any(c in text for c in '"\\\n'):
        raise ValueError(f"an ALSA configuration cannot name {text!r} simply")
    (config_home / "alsa").mkdir(parents=True, exist_ok=True)
    (config_home / "alsa" / "asoundrc").write_text(
        f"pcm.{name} {{\n"
        f"    type file\n"
        f'    slave.pcm "{"pulse" if paced else "null"}"\n'
        f'    file "/dev/null"\n'
        f'    infile "{text}"\n'
        f'    format "raw"\n'
        f"}}\n"
    )
    return {"XDG_CONFIG_HOME": str(config_home)}


@contextmanager
def file_input(
    directory: Path, data: bytes, *, name: str = FILE_INPUT, paced: bool = False
) -> Iterator[FileInput]:
    """An ALSA input device ``name`` that yields ``data``, visible to this process for the block.

    Recording from it gives ``data`` byte for byte from its first frame, in
    blocks of any size; after ``data`` it gives stale bytes, so read no more.
    """
    infile = directory / f"{name}.raw"
    infile.write_bytes(data)
    env = write_file_input_config(directory / "config", infile, name=name, paced=paced)
    with patched_environ(env):
        yield FileInput(name, infile, env)
