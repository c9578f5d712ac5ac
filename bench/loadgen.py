"""A lean load generator: many downloads from one ``epoll`` loop, timed by the kernel.

Scenario 2 reads its 500 downloads with trio and, for musiclib, with musiclib's own
client. That measures what a user of the client meets, but on this 2-core machine the
client takes most of a core itself, and each time to first byte then includes the
client's own queue: the first payload byte has long arrived in the socket when the
client's event loop gets round to that connection (nginx's p99 in that harness was
230-658 ms, of which the connect alone took ~100 ms). To compare *servers*, this
generator is the same small code for every server:

- one thread, one ``epoll``, non-blocking sockets; every connection is started (its
  ``connect`` issued and its request sent) before any is read;
- the start is the wall clock (``CLOCK_REALTIME``) taken right before ``connect``, the
  first byte is the kernel's receive time of the segment that carried it
  (``SO_TIMESTAMPNS``), so a generator that is busy (or descheduled) does not add its
  own delay to the figure;
- payload is read into one reused buffer (a copy, as any client makes), or discarded
  in the kernel (``MSG_TRUNC``) when ``discard`` is set;
- for musiclib the frames are parsed (headers and messages; payload is only counted),
  so a download ends at its ``stream_end`` and any ``error`` is a failure; for a raw
  server (nginx, HTTP/1.0) a download ends at end of file.

It verifies sizes (every download must carry the expected payload), not contents: the
scenario checks one download's sha256 with the real client separately.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from dataclasses import dataclass, field

import msgpack

HEADER = struct.Struct(">BI")
KIND_MESSAGE, KIND_DATA = 1, 2
READ = 1 << 20
_TS = struct.Struct("qq")  # struct timespec
#: Linux's SO_TIMESTAMPNS (asm-generic; Python 3.11's socket module does not name it)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


@dataclass
class Download:
    """One connection's progress and timings."""

    sock: socket.socket
    started_ns: int
    framed: bool
    first_ns: int | None = None
    payload: int = 0
    total: int = 0
    done: bool = False
    error: str | None = None
    # framed parsing: bytes of a header or message gathered so far, and what they are
    pending: bytearray = field(default_factory=bytearray)
    want: int = HEADER.size
    in_message: bool = False
    data_left: int = 0  # payload bytes left in the current data frame
    unsent: bytes = b""  # the request, when the connection was not ready for it at once


@dataclass
class Result:
    """What one load measured; times in milliseconds."""

    ttfb_ms: list[float]
    payload: list[int]
    failures: list[str]
    seconds: float
    cpu_seconds: float


def _timestamp(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = _TS.unpack_from(data)
            return sec * 1_000_000_000 + nsec
    return None


def _recv_stamped(d: Download, size: int) -> tuple[bytes, int]:
    """Read up to ``size`` bytes with the kernel's receive time (for the first payload)."""
    data, anc, _flags, _addr = d.sock.recvmsg(size, socket.CMSG_SPACE(_TS.size))
    stamp = _timestamp(anc)
    return data, stamp if stamp is not None else time.time_ns()


class _Loop:
    def __init__(self, discard: bool) -> None:
        self.buf = bytearray(READ)
        self.view = memoryview(self.buf)
        self.flags = socket.MSG_TRUNC if discard else 0

    def payload(self, d: Download, most: int) -> int:
        """Consume up to ``most`` payload bytes (copied into the reused buffer, or dropped)."""
        n = d.sock.recv_into(self.view, min(most, READ), self.flags)
        d.total += n
        return n

    def read(self, d: Download) -> bool:
        """Read what is there; False when the socket would block or the download ended."""
        try:
            if not d.framed:
                return self._read_raw(d)
            return self._read_framed(d)
        except BlockingIOError:
            return False

    def _read_raw(self, d: Download) -> bool:
        if d.first_ns is None:
            data, stamp = _recv_stamped(d, READ)
            if data:
                d.first_ns = stamp
            n = len(data)
            d.total += n
        else:
            n = self.payload(d, READ)
        d.payload += n
        if not n:
            d.done = True
        return n > 0

    def _read_framed(self, d: Download) -> bool:
        if d.data_left:
            n = self.payload(d, d.data_left)
            if not n:
                d.error = "connection closed inside a data frame"
                return False
            d.data_left -= n
            d.payload += n
            return True
        # a header or a message body: small reads into `pending`
        want = d.want - len(d.pending)
        if d.first_ns is None:
            data, stamp = _recv_stamped(d, want)
        else:
            data, stamp = d.sock.recv(want), 0
        if not data:
            d.error = "connection closed before stream_end"
            return False
        d.total += len(data)
        d.pending += data
        if len(d.pending) < d.want:
            return True
        frame = bytes(d.pending)
        d.pending.clear()
        if d.in_message:
            msg = msgpack.unpackb(frame, raw=False)
            d.in_message, d.want = False, HEADER.size
            kind = msg.get("type")
            if kind == "stream_end":
                d.done = True
                return False
            if kind == "error":
                d.error = f"error {msg.get('code')}: {msg.get('message')}"
                return False
            return True
        kind, length = HEADER.unpack(frame)
        if kind == KIND_DATA:
            if d.first_ns is None:
                d.first_ns = stamp  # the payload follows this header in the same segment
            d.data_left = length
        elif kind == KIND_MESSAGE:
            d.in_message, d.want = True, length
        else:
            d.error = f"unexpected frame kind {kind}"
            return False
        return True


def run(address: str, request: bytes, n: int, *, framed: bool, discard: bool = False) -> Result:
    """Start ``n`` downloads at once (``request`` sent on each); read all to the end."""
    host, _, port = address.rpartition(":")
    target = (host.strip("[]"), int(port))
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    loop = _Loop(discard)
    poll = select.epoll(n + 1)
    live: dict[int, Download] = {}
    cpu, began = time.process_time(), time.monotonic()
    failures: list[str] = []
    finished: list[Download] = []
    for _ in range(n):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        started = time.time_ns()
        code = sock.connect_ex(target)
        if code not in (0, errno.EINPROGRESS):
            failures.append(f"connect: {errno.errorcode.get(code, code)}")
            sock.close()
            continue
        d = Download(sock, started, framed)
        live[sock.fileno()] = d
        # on loopback the handshake is done by now: send at once, as a client would
        try:
            sent = sock.send(request)
        except OSError:  # not connected yet (EAGAIN, ENOTCONN): when writable
            sent = 0
        if sent == len(request):
            poll.register(sock.fileno(), select.EPOLLIN)
        else:
            d.unsent = request[sent:]
            poll.register(sock.fileno(), select.EPOLLOUT)
    while live:
        for fd, events in poll.poll(1.0):
            d = live[fd]
            if events & select.EPOLLOUT:
                code = d.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    d.error = f"connect: {errno.errorcode.get(code, code)}"
                else:
                    d.sock.sendall(d.unsent)  # small: fits the empty send buffer
                    poll.modify(fd, select.EPOLLIN)
                    continue
            else:
                while loop.read(d) and not d.done and d.error is None:
                    pass
            if d.done or d.error is not None or events & (select.EPOLLERR | select.EPOLLHUP):
                if not d.done and d.error is None:
                    d.error = "connection reset"
                poll.unregister(fd)
                d.sock.close()
                del live[fd]
                finished.append(d)
    poll.close()
    seconds, cpu_s = time.monotonic() - began, time.process_time() - cpu
    ttfb: list[float] = []
    payload: list[int] = []
    for d in finished:
        if d.error is not None:
            failures.append(d.error)
        elif d.first_ns is None:
            failures.append("no payload")
        else:
            ttfb.append((d.first_ns - d.started_ns) / 1e6)
            payload.append(d.payload)
    return Result(ttfb, payload, failures, seconds, cpu_s)
