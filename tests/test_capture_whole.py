"""The proxy's capture of small images: one that CRIU writes whole enters the store once,
complete; a larger one is in the store before its end, as any image (store.SMALL_IMAGE)."""

from __future__ import annotations

import os
import socket
import threading

from imgmig.datapath.capture import CaptureSession
from imgmig.datapath.store import SMALL_IMAGE, ImageStore, State
from imgmig.protocol import criu_wire

WAIT = 10.0


def offer(sock: socket.socket, name: str) -> int:
    """As criu dump --stream: the request, then the pipe's read end on a 1-byte payload."""
    read_end, write_end = os.pipe()
    sock.sendall(criu_wire.encode_request(name))
    socket.send_fds(sock, [b"\0"], [read_end])
    os.close(read_end)
    return write_end


def test_a_small_image_enters_the_store_once_whole_and_a_large_one_from_its_first_bytes():
    store = ImageStore(1 << 30)
    checkpoint = store.begin("node-a-1", "node-a")
    seen: list[tuple[str, bool, int]] = []

    def record() -> bool:  # evaluated by the changing thread on every change of the store
        seen.extend((image.name, image.complete, image.size) for image in checkpoint.listed)
        return checkpoint.state is not State.RECEIVING

    watcher = threading.Thread(target=store.wait_until, args=(record,), kwargs={"timeout": WAIT})
    watcher.start()
    criu, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    session = CaptureSession(daemon, store, checkpoint, threading.Event())
    capture = threading.Thread(target=session.run)
    capture.start()

    small = offer(criu, "small.img")
    os.write(small, b"s" * 3000)
    os.write(small, b"t" * 1000)
    os.close(small)
    large = offer(criu, "large.img")
    payload = b"L" * (SMALL_IMAGE + 4096)
    done = 0
    while done < len(payload):
        done += os.write(large, payload[done:done + 16384])
    store.wait_until(lambda: "large.img" in checkpoint.images, timeout=WAIT)
    os.close(large)
    inventory = offer(criu, "inventory.img")
    os.write(inventory, b"inv")
    os.close(inventory)
    criu.close()
    capture.join(WAIT)
    watcher.join(WAIT)

    assert checkpoint.state is State.COMPLETE
    assert [i.name for i in checkpoint.listed] == ["small.img", "large.img", "inventory.img"]
    assert all(i.complete for i in checkpoint.listed)
    assert os.pread(checkpoint.images["small.img"].fd, 8192, 0) == b"s" * 3000 + b"t" * 1000
    assert os.pread(checkpoint.images["large.img"].fd, len(payload) + 1, 0) == payload
    assert {entry for entry in seen if entry[0] == "small.img"} == {("small.img", True, 4000)}, \
        "the small image was seen only whole"
    assert any(name == "large.img" and not complete for name, complete, _ in seen), \
        "the large image was in the store before its end"
    store.close()
