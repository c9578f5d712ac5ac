"""``musiclib serve --workers N``: several processes serving one address.

One musiclib process runs one event loop on one core. With ``--workers N``
the ``serve`` process becomes a **supervisor**: it binds the listening
sockets, starts N worker processes that accept on them, restarts a worker
that dies, and stops them all on Ctrl-C or SIGTERM. It serves nothing itself.

Why it looks the way it does:

* **One ``SO_REUSEPORT`` socket per worker, all bound by the supervisor.**
  The kernel spreads new connections over the group by a hash of their
  addresses, evenly whatever each worker is busy with (one socket shared by
  all would wake every worker for each connection and favour whichever loop
  is least busy at that instant). The supervisor keeps every worker's socket
  open, so connections the kernel queued for a worker that crashed wait for
  its replacement instead of being reset. Before binding the group, the
  address is bound once without ``SO_REUSEPORT`` (and closed again), so a
  port in use is a clear ``ListenError`` (exit status 2) rather than a quiet
  share with another server of the same user; and ``--port 0`` learns its
  port there.
* **Workers are fresh interpreters** (``sys.executable``, started through
  trio), never forks of a running trio loop. A worker gets its sockets by
  ``pass_fds`` and its settings, pickled, on its standard input; the ``serve``
  command passes the two things that cannot travel as values (how to set up
  logging, how to load the TLS certificate) as module-level functions, which
  pickle by name.
* **Roles.** Worker 0 is the *primary*: it runs the maintainer (scans,
  watcher, background hashing), alone writes the SQLite index, and runs the
  live channels. The others are *secondaries*: they read the same index
  (WAL mode lets readers in other processes see each commit), never write it
  (``PRAGMA query_only``), and learn the scan state and the channel count
  from a :class:`~musiclib.maintainer.StateBoard` the primary keeps in
  shared memory. Every worker's interpreter starts at once (importing
  musiclib is most of a worker's start), but a secondary is handed its
  settings only once the primary is ready, so it never opens an index the
  primary is still checking or rebuilding.
* **Live channels from every worker.** The primary also accepts on a private
  Unix socket, in a directory only this user can enter (created here,
  removed at exit; the supervisor holds the socket, so a secondary's
  connection waits in its queue while the primary restarts). A secondary
  that receives ``channels``, ``listen``, ``publish`` or ``rescan`` hands the
  whole connection to the primary there and relays its bytes
  (:meth:`musiclib.server._ConnectionHandler.forward`), so every listener
  hears the same positions, epochs and preroll wherever it landed. Live
  fan-out therefore runs in the primary alone: relays are the way to
  spread it further.
* **Stopping.** A signal to the supervisor becomes SIGTERM to each worker,
  which drains as one ``serve`` does (stops accepting at once, ``--grace``
  seconds for running streams); the supervisor exits 0 when they have all
  gone. A second signal kills them at once. Workers run in their own process
  group, so a Ctrl-C at the terminal reaches the supervisor only (were it
  to reach the workers too, the supervisor's SIGTERM would be their second
  signal, and they would skip the grace period).
* **No orphans.** Each worker watches its standard input, a pipe whose other
  end only the supervisor holds: end of file means the supervisor is gone
  (even by SIGKILL), and the worker shuts down as on SIGTERM (and removes the
  supervisor's private directory, which nobody else will).
  ``PR_SET_PDEATHSIG`` would be simpler but fires when the parent *thread*
  ends, and trio starts processes from a worker thread that it retires
  after a few idle seconds.
* **A worker that dies is restarted**, after a pause that doubles with each
  death (from :data:`FIRST_BACKOFF` up to :data:`MAX_BACKOFF` seconds) and is
  forgotten once the worker has run :data:`STABLE_AFTER` seconds; each death
  is one log line saying which worker, its pid and how it ended. A worker
  that fails before it was ever ready (a bad index path, say) stops the
  whole server instead: restarting cannot fix that.

Limits (``--max-connections``, ``--max-per-address``, ``--max-decodes``) are
each worker's own. Log lines of a worker start with ``worker N:``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .errors import ListenError, MusiclibError, single_errors
from .index import default_index_path
from .maintainer import StateBoard
from .server import ServerConfig, WorkerRole, listen_reason, run_until_signalled
from .text import how_it_ended

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("musiclib.workers")

#: seconds before a dead worker's first restart; doubled after each death...
FIRST_BACKOFF = 0.25
#: ...up to this many seconds
MAX_BACKOFF = 30.0
#: a worker that ran this many seconds before it died is restarted after FIRST_BACKOFF again
STABLE_AFTER = 60.0
#: seconds a worker gets beyond --grace to exit after SIGTERM, before SIGKILL
STOP_SLACK = 10.0
#: what a worker runs (a fresh interpreter; see worker_main)
_ENTRY = "from musiclib.workers import worker_main; worker_main()"
#: the length prefix of the pickled WorkerSpec on a worker's standard input
_LENGTH = struct.Struct("<Q")
#: the backlog of each listening socket (as trio's open_tcp_listeners; the kernel caps it
#: at net.core.somaxconn)
_BACKLOG = 0xFFFF


def default_workers() -> int:
    """One worker per core this process may run on (its affinity mask, else every core)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


class WorkerFailed(MusiclibError):
    """A worker exited before it was ready; its own log lines say why."""


@dataclass
class WorkerSpec:
    """What a worker is told on its standard input (pickled): who it is and what to serve."""

    number: int
    #: the settings, without the TLS context (``make_tls`` rebuilds it)
    config: ServerConfig
    #: descriptors of this worker's listening sockets (the same numbers in the worker)
    listen_fds: list[int]
    #: the private Unix socket: its descriptor (the primary) or only its path
    internal_fd: int | None
    internal_path: str
    #: the primary's state board
    board_path: str
    #: when the supervisor started (``time.monotonic()``)
    started: float
    #: picklable (module-level) callables: set up logging; build the TLS context
    setup_logging: Callable[[], None] | None = None
    make_tls: Callable[[], ssl.SSLContext | None] | None = None


async def supervise(
    config: ServerConfig,
    workers: int,
    *,
    setup_logging: Callable[[], None] | None = None,
    make_tls: Callable[[], ssl.SSLContext | None] | None = None,
    on_ready: Callable[[list[tuple[str, int]]], None] | None = None,
) -> None:
    """Serve ``config`` with ``workers`` processes until SIGINT or SIGTERM (``serve --workers``).

    ``setup_logging`` and ``make_tls`` run in each worker (module-level
    functions or partials of them: they travel pickled). ``on_ready`` gets
    the bound addresses once every worker accepts connections.
    """
    addresses, groups = await _bind_group(config, workers)
    try:
        await _probe_wyoming(config)
    except ListenError:
        for group in groups:
            for sock in group:
                sock.close()
        raise
    private = Path(tempfile.mkdtemp(prefix="musiclib-workers-"))  # mode 0700
    internal = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    board: StateBoard | None = None
    try:
        internal.bind(str(private / "primary.sock"))
        internal.listen(_BACKLOG)
        board = StateBoard.create(private / "state")
        index = config.index if config.index is not None else default_index_path(config.root)
        template = WorkerSpec(
            number=0,
            config=dataclasses.replace(config, ssl_context=None, index=index),
            listen_fds=[],
            internal_fd=None,
            internal_path=str(private / "primary.sock"),
            board_path=str(private / "state"),
            started=time.monotonic(),
            setup_logging=setup_logging,
            make_tls=make_tls,
        )
        supervisor = _Supervisor(template, groups, internal, config.grace_period)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await supervisor.run(signals, addresses, on_ready)
    finally:
        for group in groups:
            for sock in group:
                sock.close()
        internal.close()
        if board is not None:
            board.close()
        shutil.rmtree(private, ignore_errors=True)
    log.info("stopped")


async def _bind_group(
    config: ServerConfig, workers: int
) -> tuple[list[tuple[str, int]], list[list[socket.socket]]]:
    """The addresses ``config`` names and, for each worker, a socket on each of them.

    The probe binds as one ``serve`` would (no ``SO_REUSEPORT``), so a port
    another server holds fails here; it is closed before the group binds,
    which leaves a moment in which another process of this user could take
    the port: then the group's bind fails the same way.
    """
    where = f"{config.host}:{config.port}"
    try:
        probes = await trio.open_tcp_listeners(config.port, host=config.host)
    except OSError as exc:
        raise ListenError(f"cannot listen on {where}: {listen_reason(exc)}") from None
    bound = [(lst.socket.family, lst.socket.getsockname()) for lst in probes]
    for lst in probes:
        await lst.aclose()
    groups: list[list[socket.socket]] = [[] for _ in range(workers)]
    try:
        for family, sockaddr in bound:
            for group in groups:
                sock = socket.socket(family, socket.SOCK_STREAM)
                group.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(_BACKLOG)
    except OSError as exc:
        for group in groups:
            for sock in group:
                sock.close()
        raise ListenError(f"cannot listen on {where}: {listen_reason(exc)}") from None
    addresses = [(str(addr[0]), int(addr[1])) for _, addr in bound]
    return addresses, [list(group) for group in groups]


async def _probe_wyoming(config: ServerConfig) -> None:
    """Fail now, as one line and exit status 2, if ``--wyoming``'s address is taken.

    The primary binds it (it runs the live channels); were it found taken
    there, the primary would fail before it was ever ready, which stops the
    server, but only after a worker started and died. Probed as the address
    itself is bound (no ``SO_REUSEPORT``), then closed: the same short window
    as the main address's probe.
    """
    wyoming = config.wyoming
    if wyoming is None:
        return
    try:
        probes = await trio.open_tcp_listeners(wyoming.port, host=wyoming.host)
    except OSError as exc:
        where = f"{wyoming.host}:{wyoming.port}"
        reason = listen_reason(exc, option="--wyoming")
        raise ListenError(f"--wyoming: cannot listen on {where}: {reason}") from None
    for lst in probes:
        await lst.aclose()


class _Supervisor:
    """Starts, watches, restarts and stops the workers of one ``serve --workers``."""

    def __init__(
        self,
        template: WorkerSpec,
        groups: list[list[socket.socket]],
        internal: socket.socket,
        grace: float,
    ) -> None:
        self.template = template
        self.groups = groups
        self.internal = internal
        self.grace = grace
        self.stopping = trio.Event()
        self.running: dict[int, trio.Process] = {}
        #: set once each worker has been ready (accepting) for the first time
        self.ready = [trio.Event() for _ in groups]

    async def run(
        self,
        signals: AsyncIterator[int],
        addresses: list[tuple[str, int]],
        on_ready: Callable[[list[tuple[str, int]]], None] | None,
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals, signals, nursery)
            async with trio.open_nursery() as workers:
                # every interpreter starts at once (its imports are most of a start); a
                # secondary gets its settings only once the primary is ready (_run_one)
                for number in range(len(self.groups)):
                    workers.start_soon(self._keep, number)
                if all([await _ready_unless_stopping(e, self.stopping) for e in self.ready]):
                    for host, port in addresses:
                        shown = f"[{host}]" if ":" in host else host
                        log.info("listening on %s:%d (%d workers)", shown, port, len(self.groups))
                    if on_ready is not None:
                        on_ready(addresses)
            nursery.cancel_scope.cancel()  # the workers are gone: stop watching signals

    async def _watch_signals(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            if self.stopping.is_set():
                self._kill_all("stopping every worker at once")
                continue
            self.stopping.set()
            # no new connections: each listening socket closes when its worker closes it too
            for group in self.groups:
                for sock in group:
                    sock.close()
            self.internal.close()
            for process in list(self.running.values()):
                _signal(process, signal.SIGTERM)
            nursery.start_soon(self._kill_late)

    async def _kill_late(self) -> None:
        """A worker still running long after its grace period is stuck: kill it."""
        await trio.sleep(self.grace + STOP_SLACK)
        self._kill_all(f"workers still running {self.grace + STOP_SLACK:g} s after SIGTERM")

    def _kill_all(self, why: str) -> None:
        if self.running:
            log.warning("%s: killing them", why)
        for process in list(self.running.values()):
            _signal(process, signal.SIGKILL)

    async def _keep(self, number: int) -> None:
        """Run worker ``number``, again and again after each unexpected death."""
        backoff = FIRST_BACKOFF
        while not self.stopping.is_set():
            began = trio.current_time()
            pid, status = await self._run_one(number)
            if self.stopping.is_set():
                return
            how = how_it_ended(status, "was killed by")
            if not self.ready[number].is_set():
                self.stopping.set()
                for process in list(self.running.values()):
                    _signal(process, signal.SIGTERM)
                raise WorkerFailed(f"worker {number} could not start: it {how} (its log says why)")
            if trio.current_time() - began >= STABLE_AFTER:
                backoff = FIRST_BACKOFF
            log.error("worker %d (pid %d) %s; restarting it in %g s", number, pid, how, backoff)
            with trio.move_on_after(backoff):
                await self.stopping.wait()
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _run_one(self, number: int) -> tuple[int, int]:
        """Start worker ``number``, wait until it exits: its pid and exit status."""
        primary = number == 0
        listen = self.groups[number]
        spec = dataclasses.replace(
            self.template,
            number=number,
            listen_fds=[sock.fileno() for sock in listen],
            internal_fd=self.internal.fileno() if primary else None,
        )
        fds = [*spec.listen_fds, *([spec.internal_fd] if spec.internal_fd is not None else [])]
        if self.stopping.is_set() or min(fds) < 0:  # closed by a signal meanwhile
            return 0, 0
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-c", _ENTRY],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=fds,
                process_group=0,  # a Ctrl-C reaches the supervisor only (see the module's text)
            )
        except OSError:
            if self.stopping.is_set():  # its sockets were closed by a signal meanwhile
                return 0, 0
            raise
        self.running[number] = process  # (started after a stop's SIGTERM: it gets one once ready)
        try:
            assert process.stdin is not None and process.stdout is not None
            # the primary has opened and checked the index: only now may the others read it
            # (a secondary waits in _read_spec meanwhile, its imports done)
            if not primary and not await _ready_unless_stopping(self.ready[0], self.stopping):
                return process.pid, await _reaped(process)  # never told anything: no log line
            payload = pickle.dumps(spec)
            with contextlib.suppress(trio.BrokenResourceError):  # it died at once: seen below
                await process.stdin.send_all(_LENGTH.pack(len(payload)) + payload)
            if await _read_line(process.stdout) == b"ready":
                log.debug("worker %d (pid %d) is ready", number, process.pid)
                self.ready[number].set()
                if self.stopping.is_set():  # asked to stop while it started: now it can hear it
                    _signal(process, signal.SIGTERM)
            return process.pid, await process.wait()
        finally:
            self.running.pop(number, None)
            with trio.CancelScope(shield=True):
                await _reaped(process)
                for pipe in (process.stdin, process.stdout):
                    if pipe is not None:
                        await pipe.aclose()


async def _ready_unless_stopping(ready: trio.Event, stopping: trio.Event) -> bool:
    """Wait until ``ready`` is set (``True``) or ``stopping`` is (``False``)."""
    async with trio.open_nursery() as nursery:

        async def wait_then_cancel(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait_then_cancel, ready)
        nursery.start_soon(wait_then_cancel, stopping)
    return ready.is_set() and not stopping.is_set()


async def _reaped(process: trio.Process) -> int:
    """Kill ``process`` if it still runs; its exit status once it is reaped."""
    if process.returncode is None:
        _signal(process, signal.SIGKILL)
    return await process.wait()


def _signal(process: trio.Process, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    """One line from a worker's standard output (``b""``: it closed it, or died)."""
    data = b""
    while b"\n" not in data and len(data) < 4096:
        try:
            chunk = await stream.receive_some(4096)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""
        if not chunk:
            return b""
        data += chunk
    return data.partition(b"\n")[0]


# ---------------------------------------------------------------------- the worker's side


class _WorkerNumber(logging.Filter):
    """Starts every log line of a worker with ``worker N:``."""

    def __init__(self, number: int) -> None:
        super().__init__()
        self.prefix = f"worker {number}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_worker_prefixed", False):
            record.msg = self.prefix + str(record.msg)
            record._worker_prefixed = True
        return True


def _read_spec(fd: int) -> WorkerSpec:
    """The :class:`WorkerSpec` the supervisor wrote on ``fd`` (length, then pickle)."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise EOFError("the supervisor closed the pipe before the worker's settings")
            data += chunk
        return data

    (length,) = _LENGTH.unpack(exactly(_LENGTH.size))
    spec = pickle.loads(exactly(length))  # from our own supervisor, through a private pipe
    if not isinstance(spec, WorkerSpec):
        raise TypeError("not a WorkerSpec")
    return spec


class _Orphaned:
    """Set once this worker's supervisor is gone (its pipe ended)."""

    gone = False


async def _supervisor_gone() -> None:
    """Return once standard input (the supervisor's pipe) reaches end of file."""
    while True:
        await trio.lowlevel.wait_readable(0)
        try:
            if not os.read(0, 4096):
                break
        except BlockingIOError:
            continue
    _Orphaned.gone = True
    log.warning("the supervisor is gone; stopping")


def _announce_ready(_addresses: list[tuple[str, int]]) -> None:
    """Tell the supervisor this worker accepts connections; standard output is then
    /dev/null (nobody reads it any more, and a full pipe would block us)."""
    os.write(1, b"ready\n")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


def worker_main() -> None:
    """A worker process: read its spec from standard input, serve until told to stop."""
    try:
        spec = _read_spec(0)
    except EOFError:  # the supervisor died while this secondary waited for the primary
        sys.exit(1)
    if spec.setup_logging is not None:
        spec.setup_logging()
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerNumber(spec.number))
    try:
        tls = spec.make_tls() if spec.make_tls is not None else None
        role = WorkerRole(
            number=spec.number,
            sockets=[socket.socket(fileno=fd) for fd in spec.listen_fds],
            internal_path=spec.internal_path,
            internal=None if spec.internal_fd is None else socket.socket(fileno=spec.internal_fd),
            board=StateBoard(Path(spec.board_path)),
            started=spec.started,
        )
        config = dataclasses.replace(spec.config, ssl_context=tls)
        run = functools.partial(
            run_until_signalled,
            config,
            _announce_ready,
            worker=role,
            stop_when=_supervisor_gone,
        )
        with single_errors():  # the one error out of the server's nurseries, not a group
            trio.run(run)
    except (MusiclibError, OSError) as exc:
        log.error("cannot serve: %s", exc)
        sys.exit(1)
    finally:
        if _Orphaned.gone:  # nobody else will remove the private directory now
            shutil.rmtree(Path(spec.internal_path).parent, ignore_errors=True)
    sys.exit(0)
