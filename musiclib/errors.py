"""Every exception musiclib raises on purpose, in one tree.

Foreign exceptions become these at one boundary: for a network connection
that is ``musiclib.transport`` (trio's ``BrokenResourceError``,
``TooSlowError``, the socket's ``OSError``), for a child process's pipes the
small helpers in ``decode`` and ``player``. The CLI turns any of them into one line on
standard error and the exit code named on the class. Anything else reaching
the CLI is a bug and is reported as such.

Exit codes (README.md, "Exit codes"): 0 success; 1 an unexpected failure (a
bug), and for ``ls`` a query that matched nothing (``grep``'s convention: not
an error, so no class here); 2 ``UsageError``; 3 ``ProtocolError``,
``TransportError`` and the server errors that are about the connection; 4 the
server refused the request; 5 ``IntegrityError`` and the server's ``changed``
and ``decode_failed``; 6 ``PlayerError``; 7 ``OutputError``; 8 ``DeviceError``;
130 interrupted (Ctrl-C); 143 terminated (SIGTERM), stopped as Ctrl-C stops it.

::

    MusiclibError                      base; ``exit_code`` says how the CLI exits
    ├── ProtocolError                  the conversation broke the wire protocol
    │   ├── LocalProtocolError         we misused the protocol object (our bug)
    │   └── RemoteProtocolError        the peer sent bytes that break the protocol
    │       ├── MessageError           one well-framed message was invalid; the
    │       │                          connection itself is still usable
    │       └── WyomingProtocolError   a Wyoming peer sent bytes that are not Wyoming events
    ├── TransportError                 the byte stream under the protocol failed
    │   ├── ConnectError               could not connect to the server
    │   ├── ConnectionLost             the peer went away mid-conversation
    │   └── Timeout                    the peer was silent for too long
    ├── ServerError                    the server answered a request with an error
    │   ├── NotFound                   no such track (or it lies outside the root)
    │   ├── Unreadable                 the track exists but the server cannot read it
    │   ├── Ambiguous                  the name matches several tracks
    │   ├── BadRequest                 the request was malformed
    │   ├── UnsupportedVersion         no protocol version in common
    │   ├── Unauthorized               the token was missing or wrong
    │   ├── Busy                       the server is at a capacity limit
    │   ├── Changed                    the file changed while it was being served
    │   ├── DecodeFailed               the server could not decode the file
    │   ├── ChannelBusy                the live channel already has a source
    │   ├── TooSlow                    a listener fell behind for too long and was cut
    │   ├── ShuttingDown               the server is stopping
    │   └── InternalError              the server failed; not the client's fault
    ├── WyomingServiceError            a Wyoming service cannot do what was asked, or said error
    ├── IntegrityError                 received bytes do not match the server's checksum
    ├── PlayerError                    the media player could not be used
    │   └── PlayerNotFound             the player program is not installed
    ├── DeviceError                    an audio device could not be used
    ├── OutputError                    a local file could not be written or read
    └── UsageError                     a command line that cannot work as given
        └── ListenError                ``serve`` cannot listen where it was told (port in use...)

``ServerError`` subclasses carry the wire ``code`` they travel as (see
PROTOCOL.md); :func:`server_error` rebuilds the right class from a code.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


class MusiclibError(Exception):
    """Base class of every error musiclib raises deliberately."""

    exit_code: int = 1


class ProtocolError(MusiclibError):
    """The conversation does not follow the musiclib wire protocol."""

    exit_code = 3


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow now."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol; the connection is unusable."""


class MessageError(RemoteProtocolError):
    """One well-framed message was invalid; the connection can continue."""


class WyomingProtocolError(RemoteProtocolError):
    """A Wyoming peer sent bytes that break the Wyoming event format (not musiclib's protocol)."""


class TransportError(MusiclibError):
    """The byte stream carrying the protocol failed."""

    exit_code = 3


class ConnectError(TransportError):
    """The server could not be reached."""


class ConnectionLost(TransportError):
    """The peer closed or reset the connection in the middle of a conversation."""


class Timeout(TransportError):
    """The peer did not send or accept data within the allowed time."""


class ServerError(MusiclibError):
    """The server refused or failed a request; ``code`` is the wire error code."""

    code: str = "internal"
    exit_code = 4

    def __init__(self, message: str, *, candidates: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.candidates: tuple[str, ...] = tuple(candidates)


class NotFound(ServerError):
    """No track matches the name, or the name points outside the library root."""

    code = "not_found"


class Unreadable(ServerError):
    """The track exists but the server cannot read it (permission denied, an I/O error)."""

    code = "unreadable"


class Ambiguous(ServerError):
    """The name matches several tracks; ``candidates`` lists them."""

    code = "ambiguous"


class BadRequest(ServerError):
    """The request was well framed but malformed."""

    code = "bad_request"
    exit_code = 3


class UnsupportedVersion(ServerError):
    """Client and server share no protocol version."""

    code = "unsupported_version"
    exit_code = 3


class Busy(ServerError):
    """The server is at one of its capacity limits; try again later."""

    code = "busy"
    exit_code = 3


class Unauthorized(ServerError):
    """The server wants a token and the client's was missing or wrong."""

    code = "unauthorized"
    exit_code = 3


class Changed(ServerError):
    """The file changed on the server while it was being streamed."""

    code = "changed"
    exit_code = 5


class DecodeFailed(ServerError):
    """The server could not decode the file (ffmpeg's reason in the message)."""

    code = "decode_failed"
    exit_code = 5


class ChannelBusy(ServerError):
    """The live channel already has a source (a publisher, or one the server reads)."""

    code = "channel_busy"
    exit_code = 3


class TooSlow(ServerError):
    """The listener kept falling behind the live channel and was disconnected."""

    code = "too_slow"
    exit_code = 3


class ShuttingDown(ServerError):
    """The server is stopping and takes no more audio or listeners."""

    code = "shutting_down"
    exit_code = 3


class InternalError(ServerError):
    """The server failed in a way that is not the client's fault."""

    code = "internal"
    exit_code = 3


class WyomingServiceError(MusiclibError):
    """A Wyoming service offers nothing of what was asked, or answered with ``error``."""

    exit_code = 4


class IntegrityError(MusiclibError):
    """The bytes received do not match the size or checksum the server stated."""

    exit_code = 5


class PlayerError(MusiclibError):
    """The media player could not be started or failed."""

    exit_code = 6


class PlayerNotFound(PlayerError):
    """The player program is not installed or not on PATH."""


class DeviceError(MusiclibError):
    """A microphone or speaker could not be used (missing, busy, or the devices extra is
    not installed)."""

    exit_code = 8


class OutputError(MusiclibError):
    """A local file could not be written (disk full, permission denied...)."""

    exit_code = 7


class UsageError(MusiclibError):
    """The command line asks for something that cannot work as given."""

    exit_code = 2


class ListenError(UsageError):
    """The server cannot listen on the address and port it was given (in use, not ours...)."""


_BY_CODE: dict[str, type[ServerError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        Unreadable,
        Ambiguous,
        BadRequest,
        UnsupportedVersion,
        Unauthorized,
        Busy,
        Changed,
        DecodeFailed,
        ChannelBusy,
        TooSlow,
        ShuttingDown,
        InternalError,
    )
}

#: Every error code a server may send, in the order PROTOCOL.md lists them.
ERROR_CODES: tuple[str, ...] = tuple(_BY_CODE)


def server_error(code: str, message: str, candidates: Sequence[str] = ()) -> ServerError:
    """Rebuild the exception for a wire error ``code``; unknown codes become ``ServerError``."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = ServerError(f"{message} (error code {code!r})", candidates=candidates)
        err.code = code
        return err
    return cls(message, candidates=candidates)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def collapse(exc: BaseException) -> BaseException:
    """The one exception worth reporting from a (possibly nested) exception group.

    trio's nurseries wrap errors in groups; a user should see the error that
    caused the failure, not the tree. A ``KeyboardInterrupt`` wins, then the
    first musiclib error, then a lone leaf; anything else stays the group.
    """
    leaves = list(_leaves(exc))
    for wanted in (KeyboardInterrupt, MusiclibError):
        for leaf in leaves:
            if isinstance(leaf, wanted):
                return leaf
    return leaves[0] if len(leaves) == 1 else exc


@contextmanager
def single_errors() -> Iterator[None]:
    """Let the one meaningful exception out of a nursery instead of a group (see ``collapse``)."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = collapse(group)
        if leaf is group:
            raise
        context = leaf.__context__
        try:
            raise leaf
        finally:
            leaf.__context__ = context  # its own context, not the group being unwrapped
            del leaf  # no reference cycle through this frame's traceback
