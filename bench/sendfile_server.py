"""The baseline server: one file, sent with ``socket.sendfile``, a thread per connection.

``python -m bench.sendfile_server --file PATH --mode raw|framed [--sha256 HEX]``

* ``raw``: on accept, send the whole file with ``socket.sendfile`` (zero-copy) and close.
  This is the floor any file server on this machine can reach from Python.
* ``framed``: speak just enough of the musiclib protocol (through ``musiclib.protocol``,
  the sans-IO state machine) to answer ``hello`` and one ``stream`` request, and send the
  file as musiclib data frames: a 5-byte header, then the 256 KiB body with ``sendfile``,
  then ``stream_end`` with the precomputed checksum. Compared with ``raw``, the
  difference is the framing alone; compared with the real server, it isolates the
  server's own costs (hashing, copying through user space, the event loop).

It prints ``listening on 127.0.0.1:PORT`` on standard output when ready and runs until
SIGTERM. Threads keep it simple: each blocks in ``sendfile`` and the kernel does the work.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path

CHUNK = 256 * 1024


def serve_raw(conn: socket.socket, path: Path) -> None:
    with open(path, "rb") as f:
        conn.sendfile(f)
    conn.shutdown(socket.SHUT_WR)


def serve_framed(conn: socket.socket, path: Path, sha256: str) -> None:
    from musiclib import protocol as p

    proto = p.Connection(p.Role.SERVER)

    def next_event() -> object:
        while True:
            event = proto.next_event()
            if not isinstance(event, p.NeedData):
                return event
            proto.receive_data(conn.recv(65536))

    hello = next_event()
    if not isinstance(hello, p.Hello):
        return
    # the hello's version, as a musiclib server answers a client of file requests (version 1)
    version = min(hello.version, p.PROTOCOL_VERSION)
    conn.sendall(proto.send(p.Welcome(version=version, server="bench-sendfile")))
    while isinstance(next_event(), p.StreamRequest):  # the request's fields do not matter
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = p.StreamStart(path=path.name, size=size, version="0", length=size)
            conn.sendall(proto.send(start))
            offset = 0
            while offset < size:
                n = min(CHUNK, size - offset)
                conn.sendall(proto.send_data_header(n))
                conn.sendfile(f, offset, n)
                offset += n
        conn.sendall(proto.send(p.StreamEnd(sent=size, sha256=sha256 or None)))


def handle(conn: socket.socket, path: Path, mode: str, sha256: str) -> None:
    with conn:
        try:
            if mode == "raw":
                serve_raw(conn, path)
            else:
                serve_framed(conn, path, sha256)
        except (ConnectionError, BrokenPipeError):
            pass  # the client went away


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--mode", choices=("raw", "framed"), default="raw")
    parser.add_argument("--sha256", default="")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    with listener:
        while True:
            conn, _ = listener.accept()
            thread = threading.Thread(
                target=handle, args=(conn, args.file, args.mode, args.sha256), daemon=True
            )
            thread.start()


if __name__ == "__main__":
    main()
