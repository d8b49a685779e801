"""The control ops of a lazy migration on running daemons, with the simulated CRIU client
for the images (no userfaultfd needed): `lazy_source` on the proxy (the dump's page-server
socket, never a listening port) and `lazy_check` on the cache (how `imgmig restore`, the
doorbell's too, knows to restore lazily)."""

from __future__ import annotations

import os
import socket

import pytest

from imgmig import criu_sim
from imgmig.commands.common import CommandError, ControlClient
from imgmig.commands.files import pack as pack_files
from imgmig.protocol import tunnel_wire as tw
from imgmig.roles.endpoints import CONTROL_SOCKET


def ended_within_a_record(sock: socket.socket) -> bool:
    """The page server's view: its stream ended, short of a whole request record."""
    sock.settimeout(10)
    rest = b""
    while chunk := sock.recv(4096):
        rest += chunk
    return len(rest) % tw.PS_IOV_SIZE != 0


def test_lazy_source_takes_only_a_unix_socket_for_this_connections_ticket(daemons) -> None:
    pair = daemons(roles=("proxy",))
    path = pair.proxy_dir / CONTROL_SOCKET
    dump_end, proxy_end = socket.socketpair()
    with dump_end, proxy_end, socket.socket() as tcp:
        with ControlClient(path, "proxy") as proxy, ControlClient(path, "proxy") as other:
            ticket = proxy.request("expect")["ticket"]
            with pytest.raises(CommandError, match="no dump announced on this connection"):
                other.request("lazy_source", ticket=ticket, fd=proxy_end.fileno())  # another connection's ticket
            with pytest.raises(CommandError, match="not a UNIX stream socket"):
                proxy.request("lazy_source", ticket=ticket, fd=tcp.fileno())
            assert proxy.request("lazy_source", ticket=ticket, fd=proxy_end.fileno()) == {"ticket": ticket}
            with pytest.raises(CommandError, match="has its page server already"):
                proxy.request("lazy_source", ticket=ticket, fd=proxy_end.fileno())
        # the connection ended before any dump began: the dump that would have served these
        # pages fails (migrate's own copy of the proxy's end, proxy_end, is still open)
        assert ended_within_a_record(dump_end)


@pytest.mark.parametrize("with_files", [False, True])
def test_a_lazy_checkpoint_is_marked_and_recognised(daemons, tmp_path, with_files: bool) -> None:
    """The marker comes after the files image (`migrate --lazy --files`), before CRIU's."""
    pair = daemons()
    dump_end, proxy_end = socket.socketpair()
    with dump_end, proxy_end, ControlClient(pair.proxy_dir / CONTROL_SOCKET, "proxy") as proxy:
        if with_files:
            (tmp_path / "job").write_text("carried")
            files, _ = pack_files([str(tmp_path / "job")])
            ticket = proxy.request("expect", fd=files, files=True)["ticket"]
            os.close(files)
        else:
            ticket = proxy.request("expect")["ticket"]
        proxy.request("lazy_source", ticket=ticket, fd=proxy_end.fileno())
        criu_sim.DumpClient(pair.proxy_dir).dump([("core-1.img", b"c" * 100), ("inventory.img", b"i" * 10)])
        with ControlClient(pair.cache_dir / CONTROL_SOCKET, "cache") as cache:
            checkpoint = _claim(cache)
            assert cache.request("lazy_check", timeout=None, id=checkpoint) == {"id": checkpoint, "lazy": True}
            assert (cache.request("files", timeout=None, id=checkpoint)["files"] is not None) == with_files
            if (fd := cache.take_fd()) is not None:
                os.close(fd)
            images = cache.request("lazy_images", timeout=None, id=checkpoint)["images"]
            # neither the marker nor the files image goes to CRIU's directory
            assert [image["name"] for image in images] == ["core-1.img", "inventory.img"]
            # the restore failed before it reached the page server: the right goes back, the
            # proxy drops its lazy copy, and the dump that would have served the pages fails
            cache.request("confirm", id=checkpoint, running=False, detail="criu restore failed")
        assert ended_within_a_record(dump_end)
        pair.proxy_log.wait_for(f"the lazy restore on .* failed; checkpoint {checkpoint} is dropped here too")


def _claim(cache: ControlClient) -> str:
    """The first checkpoint the cache lets this restore claim (it may still be arriving)."""
    checkpoint = None
    while checkpoint is None:
        checkpoint = cache.request("claim")["claimed"]
    return checkpoint


def test_a_full_copy_checkpoint_is_not_lazy(daemons) -> None:
    pair = daemons()
    criu_sim.DumpClient(pair.proxy_dir).dump([("core-1.img", b"c" * 100), ("inventory.img", b"i" * 10)])
    with ControlClient(pair.cache_dir / CONTROL_SOCKET, "cache") as cache:
        checkpoint = _claim(cache)
        assert cache.request("lazy_check", timeout=None, id=checkpoint) == {"id": checkpoint, "lazy": False}
        with pytest.raises(CommandError, match="not a lazy one"):
            cache.request("lazy_images", timeout=None, id=checkpoint)
