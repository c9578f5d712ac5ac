"""Download clients shared by the scenarios: plain sockets, sans-IO framing, the musiclib API.

Every function downloads one stream and returns what it received, so the caller can both
time it and check it. "Verified" means the client hashes every payload byte with sha256
and the caller compares the digest with the known one, the same work the musiclib client
does against ``stream_end.sha256``.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass

import trio

CHUNK = 256 * 1024


@dataclass
class Received:
    """What one download got: payload bytes, digest (if hashed), the sender's digest."""

    nbytes: int
    sha256: str | None = None
    claimed_sha256: str | None = None


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def plain_download(address: str, *, verify: bool, request: bytes = b"") -> Received:
    """Connect, send ``request`` (nothing for the sendfile server), read to end of file."""
    digest = hashlib.sha256() if verify else None
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    with socket.create_connection(_split(address)) as sock:
        if request:
            sock.sendall(request)
        while n := sock.recv_into(view):
            if digest is not None:
                digest.update(view[:n])
            total += n
    return Received(total, digest.hexdigest() if digest else None)


def framed_download(address: str, track: str, *, verify: bool) -> Received:
    """One musiclib stream read with blocking sockets and the sans-IO protocol object only."""
    from musiclib import protocol as p

    conn = p.Connection(p.Role.CLIENT)
    digest = hashlib.sha256() if verify else None
    total = 0
    with socket.create_connection(_split(address)) as sock:
        sock.sendall(conn.send(p.Hello(version=p.PROTOCOL_VERSION, client="bench")))
        while True:
            event = conn.next_event()
            if isinstance(event, p.NeedData):
                conn.receive_data(sock.recv(CHUNK))
            elif isinstance(event, p.Welcome):
                sock.sendall(conn.send(p.StreamRequest(track=track)))
            elif isinstance(event, p.Data):
                if digest is not None:
                    digest.update(event.payload)
                total += len(event.payload)
            elif isinstance(event, p.StreamEnd):
                return Received(total, digest.hexdigest() if digest else None, event.sha256)
            elif not isinstance(event, p.StreamStart):
                raise RuntimeError(f"unexpected {event!r}")


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("closed inside a frame")
        got += n


def exact_framed_download(address: str, track: str, *, verify: bool) -> Received:
    """One musiclib stream read frame by frame into a reused buffer: no protocol object.

    The 5-byte header is read exactly, then the body straight into a preallocated
    buffer; only the few message frames are decoded (with ``musiclib.protocol``). This is
    the cost of the frame format itself, apart from how a reader buffers it.
    """
    from musiclib import protocol as p

    digest = hashlib.sha256() if verify else None
    header = bytearray(p.HEADER.size)
    body = bytearray(p.MAX_DATA_SIZE)
    total = 0
    with socket.create_connection(_split(address)) as sock:
        sock.sendall(p.encode_message(p.Hello(version=p.PROTOCOL_VERSION, client="bench")))
        sock.sendall(p.encode_message(p.StreamRequest(track=track)))
        while True:
            _recv_exact(sock, memoryview(header))
            kind, length = p.HEADER.unpack(header)
            view = memoryview(body)[:length]
            _recv_exact(sock, view)
            if kind == p.KIND_DATA:
                if digest is not None:
                    digest.update(view)
                total += length
                continue
            msg = p.decode_message(bytes(view))
            if isinstance(msg, p.StreamEnd):
                return Received(total, digest.hexdigest() if digest else None, msg.sha256)
            if not isinstance(msg, (p.Welcome, p.StreamStart)):
                raise RuntimeError(f"unexpected {msg!r}")


async def api_download(address: str, track: str, *, verify: bool) -> Received:
    """One original stream through ``musiclib.client`` (what ``musiclib get`` builds on)."""
    from musiclib.client import open_client

    digest = hashlib.sha256() if verify else None
    total = 0
    async with open_client(address) as client, client.stream(track) as stream:
        async for chunk in stream:
            if digest is not None:
                digest.update(chunk)
            total += len(chunk)
        assert stream.end is not None
        claimed = stream.end.sha256
    return Received(total, digest.hexdigest() if digest else None, claimed)


def api_download_sync(address: str, track: str, *, verify: bool) -> Received:
    return trio.run(lambda: api_download(address, track, verify=verify))
