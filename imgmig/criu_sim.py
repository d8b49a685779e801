"""A simulated CRIU client speaking the exact `--stream` wire protocol.

It makes real pipes and passes one end with SCM_RIGHTS on a 1-byte dummy payload, as
criu/img-streamer.c does. Tests and the benchmark use it for what a real CRIU will not
do on demand (10,000 files, a dump dying half-way, garbage); it never stands in for
the real-CRIU tests.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

from imgmig.protocol import criu_wire
from imgmig.roles.endpoints import CAPTURE_SOCKET, SERVE_SOCKET

_LEN = struct.Struct("<I" if sys.byteorder == "little" else ">I")


def connect(images_dir: Path | str, serve: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(Path(images_dir) / (SERVE_SOCKET if serve else CAPTURE_SOCKET)))
    return sock


class DumpClient:
    """`criu dump --stream`: open_image() returns the write end of the image's pipe."""

    def __init__(self, images_dir: Path | str) -> None:
        self.sock = connect(images_dir)

    def open_image(self, name: str) -> int:
        read_end, write_end = os.pipe()
        self.sock.sendall(criu_wire.encode_request(name))
        socket.send_fds(self.sock, [b"\0"], [read_end])
        os.close(read_end)
        return write_end

    def write_image(self, name: str, data: bytes) -> None:
        fd = self.open_image(name)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)

    def dump(self, images: Iterable[tuple[str, bytes]]) -> None:
        for name, data in images:
            self.write_image(name, data)
        self.close()

    def close(self) -> None:
        self.sock.close()


class RestoreClient:
    """`criu restore --stream`: read_image() returns the bytes, or None if absent."""

    def __init__(self, images_dir: Path | str) -> None:
        self.sock = connect(images_dir, serve=True)

    def read_image(self, name: str) -> bytes | None:
        self.sock.sendall(criu_wire.encode_request(name))
        if not self._reply():
            return None
        read_end, write_end = os.pipe()
        socket.send_fds(self.sock, [b"\0"], [write_end])
        os.close(write_end)
        chunks = []
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 20):
                chunks.append(chunk)
        return b"".join(chunks)

    def _reply(self) -> bool:
        head = recv_exact(self.sock, 4)
        (length,) = _LEN.unpack(head)
        return criu_wire.decode_reply_body(recv_exact(self.sock, length))

    def close(self) -> None:
        self.sock.close()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the streamer closed the connection")
        buf += chunk
    return bytes(buf)
