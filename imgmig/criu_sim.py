"""A simulated CRIU client speaking the exact `--stream` wire protocol.

It makes real pipes and passes one end with SCM_RIGHTS on a 1-byte dummy payload, as
criu/img-streamer.c does; the dump side is datapath/stream_client.py, which a lazy dump
uses for real. Tests and the benchmark use it for what a real CRIU will not
do on demand (10,000 files, a dump dying half-way, garbage); it never stands in for
the real-CRIU tests.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from pathlib import Path

from imgmig.datapath import stream_client
from imgmig.datapath.stream_client import write_all
from imgmig.protocol import criu_wire
from imgmig.roles.endpoints import CAPTURE_SOCKET, SERVE_SOCKET

__all__ = ["DumpClient", "RestoreClient", "connect", "recv_exact", "write_all"]

_LEN = struct.Struct("<I" if sys.byteorder == "little" else ">I")


def connect(images_dir: Path | str, serve: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(Path(images_dir) / (SERVE_SOCKET if serve else CAPTURE_SOCKET)))
    return sock


class DumpClient(stream_client.DumpClient):
    """`criu dump --stream -D images_dir`."""

    def __init__(self, images_dir: Path | str) -> None:
        super().__init__(Path(images_dir) / CAPTURE_SOCKET)


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


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the streamer closed the connection")
        buf += chunk
    return bytes(buf)
