"""The writing side of CRIU's `--stream` protocol, as `criu dump --stream` speaks it to
streamer-capture.sock (criu/img-streamer.c): per image, its name, then the read end of a
pipe passed with SCM_RIGHTS on a 1-byte payload; the image's bytes go into the pipe.

A lazy dump (commands/lazy.py) hands its non-page images to the proxy this way, as one
checkpoint; the simulated CRIU of the tests (criu_sim.py) uses it too.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path

from imgmig.protocol import criu_wire


class DumpClient:
    """One dump's connection to a capture socket (`<proxy.images_dir>/streamer-capture.sock`):
    open_image() returns the write end of the image's pipe."""

    def __init__(self, capture_socket: Path | str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(capture_socket))

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


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
