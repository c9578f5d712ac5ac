"""The transport boundary: the one place where trio's stream exceptions are seen.

A :class:`Transport` wraps one ``trio.abc.Stream`` (a plain ``SocketStream``,
an ``SSLStream``, a memory stream in tests) and gives the server's and the
client's connections what they do with it: :meth:`~Transport.receive`,
:meth:`~Transport.send`, :meth:`~Transport.sendfile` (zero-copy on plain TCP),
:meth:`~Transport.raw_fd` and :meth:`~Transport.aclose`, and two that never
wait (:meth:`~Transport.receive_nowait`, :meth:`~Transport.send_nowait`: what
the socket has or takes at once, without a turn of the event loop). Every call
that can wait takes a deadline, and every failure leaves as one of musiclib's
own exceptions (:mod:`musiclib.errors`), never as trio's::

    inside (trio, the socket)               outside (musiclib.errors)
    trio.TooSlowError (the call's deadline) -> Timeout         "<peer> sent nothing for N s",
                                                               "<peer> did not accept data for N s"
    trio.BrokenResourceError                -> ConnectionLost  "connection lost: <reason>"
    trio.ClosedResourceError                -> ConnectionLost  (our side closed it meanwhile)
    BrokenPipeError, ConnectionResetError   -> ConnectionLost  (from os.sendfile)
    os.sendfile's other socket errors       -> ConnectionLost  (ENOTCONN, ETIMEDOUT...)
    trio.Cancelled                          -> itself; a cancelled send sets ``broken``
    connecting: TooSlowError, OSError, TLS  -> ConnectError    (:func:`open_stream`)

``b""`` from :meth:`~Transport.receive` is the peer's end of file, not an error.
A send that did not finish (cancelled, timed out, or the peer left) may have
put part of a frame on the wire: the transport is then ``broken`` and refuses
every later send, and the session above tells its protocol object
(``Connection.send_failed``). Closing is best effort: shielded, bounded, silent.

Callers that need their own words catch musiclib's exceptions, not trio's
(the server turns ``Timeout`` into "idle for N s; closing" and the like).
The pipes to child processes (ffmpeg in ``decode`` and ``live.convert``, the
player in ``player``) are not network peers and keep their own small boundary
there: a child that exits just closes its pipe, which they treat as the end.
(``fetch`` catches ``BrokenResourceError`` from a memory channel between two
of its own tasks; no bytes cross a wire there.)
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
from typing import TYPE_CHECKING

import trio

from .errors import ConnectError, ConnectionLost, Timeout

if TYPE_CHECKING:
    import ssl

#: seconds :meth:`Transport.aclose` waits for a graceful close (a TLS close_notify)
CLOSE_TIMEOUT = 1.0
#: bytes read from the file per send when ``sendfile`` cannot be zero-copy
FALLBACK_READ = 256 * 1024

_LOST = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    BrokenPipeError,
    ConnectionResetError,
)


class Transport:
    """One byte stream with deadlines, raising only :mod:`musiclib.errors`.

    ``peer`` names the other side in timeout messages ("the server sent
    nothing for 30 s"). One task may receive while another sends, as on any
    trio stream; two concurrent sends are a bug of the caller.
    """

    def __init__(self, stream: trio.abc.Stream, *, peer: str = "the peer") -> None:
        self.stream = stream
        self.peer = peer
        #: a send stopped part way: part of a frame may be out, nothing more may follow
        self.broken = False

    @property
    def can_sendfile(self) -> bool:
        """Whether :meth:`sendfile` is zero-copy (a plain TCP socket, not TLS or memory)."""
        return isinstance(self.stream, trio.SocketStream)

    def raw_fd(self) -> int | None:
        """The plain TCP socket's descriptor (``None`` under TLS or on a memory stream).

        For a caller that writes with ``os.write`` while no send of ours is
        running (the live fan-out's fast path); it owns the consequences.
        """
        if isinstance(self.stream, trio.SocketStream):
            return self.stream.socket.fileno()
        return None

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        """What the peer sent that is already here, without a turn of the event loop.

        ``None`` when nothing is waiting, or the stream is not a plain TCP socket
        (TLS, memory): then :meth:`receive` is the way. ``b""`` at the peer's end of
        file; ``ConnectionLost`` if the connection broke. Every trio receive yields
        once it has its bytes, and with hundreds of busy streams a turn of the loop
        takes milliseconds; a new connection whose ``hello`` and first request are
        already in the socket reads them here instead (``_ConnectionHandler``: a
        bounded number of times, so that a peer cannot keep the loop to itself).
        """
        fd = self.raw_fd()
        if fd is None:
            return None
        try:
            return os.read(fd, max_bytes)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise _lost(exc) from exc

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Put as much of ``data`` as the socket takes now, without a turn of the loop.

        Returns the bytes taken (0 when the socket is full, or the stream is not a
        plain TCP socket); the caller sends the rest with :meth:`send`. The same
        rules as :meth:`send`: one sender at a time, ``ConnectionLost`` (and the
        transport ``broken``) if the connection broke part way.
        """
        if self.broken:
            raise _refused()
        fd = self.raw_fd()
        if fd is None or not data:
            return 0
        try:
            return os.write(fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self.broken = True
            raise _lost(exc) from exc

    async def receive(self, max_bytes: int, timeout: float) -> bytes:
        """Up to ``max_bytes`` bytes from the peer, ``b""`` at its end of file.

        ``Timeout`` if nothing arrives within ``timeout`` seconds (``math.inf``:
        wait for ever), ``ConnectionLost`` if the connection broke or was closed.
        """
        try:
            with trio.fail_after(timeout):
                data = await self.stream.receive_some(max_bytes)
        except trio.TooSlowError:
            raise Timeout(f"{self.peer} sent nothing for {timeout:g} s") from None
        except _LOST as exc:
            raise _lost(exc) from exc
        return bytes(data)  # a no-op for bytes; memory streams in tests give a bytearray

    async def send(self, data: bytes | bytearray | memoryview, timeout: float) -> None:
        """All of ``data``, accepted by the peer within ``timeout`` seconds.

        ``Timeout`` when the peer stopped reading, ``ConnectionLost`` when it is
        gone (or an earlier send broke the stream); after either, or after a
        cancellation, the transport is ``broken``.
        """
        if self.broken:
            raise _refused()
        done = False
        try:
            with trio.fail_after(timeout):
                await self.stream.send_all(data)
            done = True
        except trio.TooSlowError:
            raise Timeout(self._not_accepted(timeout)) from None
        except _LOST as exc:
            raise _lost(exc) from exc
        finally:
            if not done:  # cancelled too: part of ``data`` may be out, nothing may follow it
                self.broken = True

    async def sendfile(
        self,
        fd: int,
        offset: int,
        count: int,
        timeout: float,
        turns: trio.CapacityLimiter | None = None,
        head: bytes = b"",
    ) -> int:
        """``count`` bytes of the file ``fd`` from ``offset``, within ``timeout`` seconds.

        Zero-copy (``os.sendfile``) on a plain TCP socket, read and sent in
        pieces otherwise. Returns the bytes sent: fewer than ``count`` only if
        the file ended first (it shrank) or a read of it failed (EIO...); the
        caller decides what that means (the bytes on the wire are exactly the
        ones counted, so the transport is not ``broken``). Failures of the
        connection as for :meth:`send`. ``head`` (a frame header, say) goes out first,
        written in the same turn as the file's first bytes.

        ``turns``: each ``sendfile`` call on a plain socket is made holding one of
        its tokens (never while waiting for the socket), so that however many
        streams are sending, only that many do so in one turn of the event loop:
        a turn stays short, and a connection that just arrived waits one short
        turn for its ``welcome``, not hundreds of megabytes of other streams
        (BENCHMARKS.md, scenario 9).
        """
        if self.broken:
            raise _refused()
        done = False
        try:
            with trio.fail_after(timeout):
                if isinstance(self.stream, trio.SocketStream):
                    sent = await _sendfile(self.stream.socket, fd, offset, count, turns, head)
                else:
                    if head:
                        await self.stream.send_all(head)
                    sent = await _send_by_reads(self.stream, fd, offset, count)
            done = True
        except trio.TooSlowError:
            raise Timeout(self._not_accepted(timeout)) from None
        except _LOST as exc:
            raise _lost(exc) from exc
        except OSError as exc:  # the socket's: the file's errors only end the copy early
            raise _lost(exc) from exc
        finally:
            if not done:
                self.broken = True
        await trio.lowlevel.checkpoint()  # let the other connections have a turn
        return sent

    async def aclose(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close the stream: shielded from cancellation, at most ``timeout`` s, never raises."""
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            try:
                await self.stream.aclose()
            except (*_LOST, trio.BusyResourceError, OSError):
                pass  # closing what is already broken: nothing left to do

    def _not_accepted(self, timeout: float) -> str:
        return f"{self.peer} did not accept data for {timeout:g} s"


def _lost(exc: BaseException) -> ConnectionLost:
    return ConnectionLost(f"connection lost: {exc}")


def _refused() -> ConnectionLost:
    return ConnectionLost("connection lost: an earlier send stopped part way")


#: errors of ``os.sendfile`` that come from the socket (the peer is gone), not the file
_SOCKET_ERRNOS = frozenset(
    {
        errno.EPIPE,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ENOTCONN,
        errno.ESHUTDOWN,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
    }
)


async def _sendfile(
    sock: trio.socket.SocketType,
    fd: int,
    offset: int,
    count: int,
    turns: trio.CapacityLimiter | None = None,
    head: bytes = b"",
) -> int:
    """``head``, then up to ``count`` bytes of ``fd`` into the non-blocking ``sock``;
    fewer at end of file or when the file cannot be read (the socket's errors are
    raised). Each attempt holds one of ``turns``' tokens, if given."""
    sent = 0
    pending = memoryview(head)
    while pending or sent < count:
        try:
            async with turns if turns is not None else contextlib.nullcontext():
                while pending:  # the socket's errors only (EPIPE, ECONNRESET...)
                    pending = pending[os.write(sock.fileno(), pending) :]
                if sent == count:
                    break
                n = os.sendfile(sock.fileno(), fd, offset + sent, count - sent)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        except OSError as exc:
            if exc.errno in _SOCKET_ERRNOS or pending:
                raise
            break  # the file's (EIO, EINVAL...): nothing of this call went out
        if n == 0:  # end of file: the file shrank
            break
        sent += n
    return sent


async def _send_by_reads(stream: trio.abc.Stream, fd: int, offset: int, count: int) -> int:
    """Up to ``count`` bytes of ``fd`` into ``stream``, read a piece at a time; fewer at
    end of file or when the file cannot be read."""
    sent = 0
    while sent < count:
        try:
            piece = os.pread(fd, min(FALLBACK_READ, count - sent), offset + sent)
        except OSError:
            break
        if not piece:
            break
        await stream.send_all(piece)
        sent += len(piece)
    return sent


async def open_stream(
    host: str,
    port: int,
    *,
    timeout: float = math.inf,
    ssl_context: ssl.SSLContext | None = None,
    address: str | None = None,
) -> trio.abc.Stream:
    """A TCP connection to ``host:port`` (TLS with ``ssl_context``), within ``timeout`` s.

    Every failure is a ``ConnectError`` naming ``address`` (``host:port`` by
    default) and the most telling reason.
    """
    address = address or f"{host}:{port}"
    stream: trio.abc.Stream
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
            if ssl_context is not None:
                stream = trio.SSLStream(stream, ssl_context, server_hostname=host)
                await stream.do_handshake()
    except trio.TooSlowError:
        raise ConnectError(f"cannot connect to {address}: timed out after {timeout:g} s") from None
    except trio.BrokenResourceError as exc:
        import ssl  # loaded already: only a TLS handshake gets here

        reason = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
        raise ConnectError(f"TLS with {address} failed: {_ssl_reason(reason)}") from None
    except OSError as exc:
        raise ConnectError(f"cannot connect to {address}: {_connect_reason(exc)}") from None
    return stream


def _connect_reason(exc: OSError) -> str:
    """The most telling reason in what ``open_tcp_stream`` raised (it groups the attempts)."""
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror or exc})"
    causes = getattr(exc.__cause__, "exceptions", ())
    for cause in causes:
        if isinstance(cause, OSError) and cause.strerror:
            if len(causes) == 1 and cause.errno == errno.ECONNREFUSED:
                return "connection refused (is 'musiclib serve' running there?)"
            return str(cause.strerror).lower()
    return exc.strerror or str(exc)


def _ssl_reason(exc: BaseException) -> str:
    import ssl

    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the server's certificate is not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        if exc.reason in _NOT_TLS:  # what OpenSSL says of a peer answering in plain bytes
            return "the server does not speak TLS (drop --tls and --cafile, or check the port)"
        return exc.reason or str(exc)
    return str(exc) or "the server closed the connection (is it a TLS server?)"


#: OpenSSL's reasons for a handshake answered by something that is not TLS
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"})
