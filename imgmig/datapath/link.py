"""One proxy <-> cache connection, as the drivers (forward, receive) see it.

A Link is the only object that reads or writes its socket. The drivers speak in frames
(bytes) and in file regions (a memfd, an offset, a count); how those regions cross the
wire is the Link's business: a plain TCP link moves them in the kernel (sendfile out,
splice in), a TLS link passes them through OpenSSL in user space (or, with kernel TLS,
sends them with sendfile again).

The drivers get their link from `open_link` (proxy side: connect, handshake, check the
cache's certificate) or `accept_link` (cache side: handshake on an accepted socket,
which yields the proxy's authenticated node name). Both arm a total deadline that
covers the TLS handshake and the HELLO exchange; the driver's first `settimeout()`
after HELLO disarms it. Both turn on TCP keepalive, so a dead peer is noticed within
`link.dead_peer_timeout` even when no byte is due.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from imgmig.config import HostPort, LinkConfig
from imgmig.datapath.kernel_io import largest_pipe, make_pipe, pipe_size, sendfile_all, splice_in
from imgmig.system.tls import Trust, node_of_peercert

log = logging.getLogger(__name__)

TLS_STEP = 1 << 20  # bytes per SSL_write: one call encrypts ~64 records
RECV_STEP = 256 << 10  # bytes gathered from OpenSSL before one pwrite into the memfd
RECV_PIPE = 4 << 20  # the pipe a plain link splices file bytes through, where fs.pipe-max-size allows
TLS_HANDSHAKE_RECORD = 0x16  # the first byte of any TLS ClientHello
TCP_CLOSE = 7  # tcpi_state of a connection that ended by an error or reset (linux/tcp_states.h)
_PAGE = mmap.ALLOCATIONGRANULARITY
_T = TypeVar("_T")


class LinkRefused(ConnectionError):
    """The peer was not authenticated, or did not finish the handshake in time; the text
    is one line for the log."""


class PeerRefusedUs(LinkRefused):
    """The peer ended the handshake: the refusal is its own, and it logs it; this side only
    reports it as a warning."""


class HandshakeCut(PeerRefusedUs):
    """The peer closed or reset the connection mid-handshake, without a TLS alert: a refusal,
    or a peer that died or restarted then (a proxy tries again)."""


class _Deadline:
    """A per-operation timeout (settimeout) or, until the first settimeout, a total deadline."""

    timeout: float | None = None
    deadline: float | None = None

    def arm_deadline(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def settimeout(self, timeout: float | None) -> None:
        self.deadline = None
        self.timeout = timeout

    def wait_time(self) -> float | None:
        """Seconds the next wait may take; TimeoutError once the deadline has passed."""
        if self.deadline is None:
            return self.timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left if self.timeout is None else min(left, self.timeout)


class PlainLink(_Deadline):
    """TCP without encryption: file bytes never enter Python."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.peer_node: str | None = None  # nothing authenticates a plain link
        self._pipe: tuple[int, int] | None = None  # socket -> pipe -> memfd, made on first use
        self._pipe_size = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        super().settimeout(timeout)
        self.sock.settimeout(timeout)

    def set_idle_timeout(self, seconds: float) -> None:
        """Waits longer than `seconds` (0: no limit) end the transfer. Kernel timeouts, not
        Python's, which would make the socket non-blocking: they also bound the splice from
        the socket, and end a blocking recv or send with EAGAIN (BlockingIOError)."""
        whole = int(seconds)
        timeval = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            self.sock.setsockopt(socket.SOL_SOCKET, option, timeval)

    def _before_wait(self) -> None:
        if self.deadline is not None:
            self.sock.settimeout(self.wait_time())

    def send(self, data: bytes) -> None:
        self._before_wait()
        self.sock.sendall(data)

    def send_file(self, fd: int, offset: int, count: int, mapped: memoryview | None = None) -> None:
        """Send bytes [offset, offset+count) of fd (`mapped`, the same bytes through a mapping
        the caller holds, is for links that must read them: not this one)."""
        sendfile_all(self.sock.fileno(), fd, offset, count)

    def recv(self, size: int) -> bytes:
        """Up to size bytes; b"" at end of stream."""
        self._before_wait()
        return self.sock.recv(size)

    def recv_nowait(self, size: int) -> bytes | None:
        """Up to size bytes without blocking; None when nothing is there, b"" at end of stream."""
        try:
            return self.sock.recv(size, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

    def recv_into(self, window: memoryview) -> int:
        """Up to len(window) bytes read straight into window (a memfd's mapped pages);
        0 at end of stream."""
        self._before_wait()
        return self.sock.recv_into(window)

    def recv_into_file(self, fd: int, offset: int, count: int) -> int:
        """Move up to count bytes from the link into fd at offset; 0 at end of stream."""
        if self._pipe is None:
            self._pipe = make_pipe(largest_pipe(RECV_PIPE))
            self._pipe_size = pipe_size(self._pipe[1])
        return splice_in(self.sock.fileno(), *self._pipe, fd, offset, count, self._pipe_size)

    def shutdown(self, how: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(how)

    def abort(self) -> None:
        """Close with a reset, which reaches the peer even when it has stopped reading."""
        reset_on_close(self.sock)
        self.close()

    def close(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
        self.sock.close()


class TlsLink(_Deadline):
    """TLS 1.3 over TCP. The socket stays non-blocking and every OpenSSL call is made under
    a lock, with the waits for the socket outside it: the cache sends ACK and RESTORED
    frames from other threads while its receiver waits for data, and one SSL object must
    never be used by two threads at once."""

    def __init__(self, sock: ssl.SSLSocket, handshake_left: float) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.peer_node: str | None = None  # set once the handshake authenticated the peer
        self.lock = threading.Lock()
        self.buffer = bytearray(RECV_STEP)
        self.ktls_send = False
        self.arm_deadline(handshake_left)

    def fileno(self) -> int:
        return self.sock.fileno()

    def handshake(self) -> None:
        self._call(self.sock.do_handshake)
        # Python >= 3.12 built with kernel TLS says whether OpenSSL moved the send side into
        # the kernel; only then may sendfile write to this socket.
        uses_ktls = getattr(self.sock._sslobj, "uses_ktls_for_send", None)
        self.ktls_send = bool(uses_ktls and uses_ktls())

    def set_idle_timeout(self, seconds: float) -> None:
        """Waits longer than `seconds` (0: no limit) end the transfer with TimeoutError."""
        self.settimeout(seconds or None)

    def send(self, data: bytes) -> None:
        with memoryview(data) as view:
            self._send_view(view)

    def send_file(self, fd: int, offset: int, count: int, mapped: memoryview | None = None) -> None:
        """Send bytes [offset, offset+count) of fd: sendfile with kernel TLS, else from a
        read-only mapping of the memfd (no copy before OpenSSL encrypts it): `mapped` if the
        caller holds one (a reused image's lasting mapping), else one made for this call."""
        if count <= 0:
            return
        if self.ktls_send:
            self._sendfile(fd, offset, count)
            return
        if mapped is not None:
            self._send_view(mapped)
            return
        start = offset - offset % _PAGE
        # MAP_POPULATE: the pages are mapped in one go, not by a fault per few pages
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with (mmap.mmap(fd, count + offset - start, flags, mmap.PROT_READ, offset=start) as mapped,
              memoryview(mapped) as whole, whole[offset - start:] as view):
            self._send_view(view)

    def recv(self, size: int) -> bytes:
        """Up to size bytes; b"" at end of stream."""
        data = self._call(lambda: self.sock.recv(size))
        if not data:
            self._check_eof()
        return data

    def recv_nowait(self, size: int) -> bytes | None:
        """Up to size bytes without blocking; None when nothing is there, b"" at end of stream.
        Asks OpenSSL first: bytes it already decrypted (pending) never wake a poll(). One
        SSL_read gives one record (16 KiB at most): as many as are there are gathered."""
        with memoryview(self.buffer) as view, view[:min(size, len(self.buffer))] as into:
            with self.lock:
                try:
                    got = self.sock.recv_into(into)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return None
                except ssl.SSLError as exc:
                    raise self._broken(exc) from None
            if not got:
                self._check_eof()
                return b""
            got += self._gather(into, got, len(into))
            return bytes(into[:got])

    def recv_into(self, window: memoryview) -> int:
        """Decrypt up to len(window) bytes straight into window (a memfd's mapped pages),
        gathering what OpenSSL has (one record per call); 0 at end of stream."""
        want = len(window)
        got = self._call(lambda: self.sock.recv_into(window, want))
        if not got:
            self._check_eof()
        return got + self._gather(window, got, want)

    def recv_into_file(self, fd: int, offset: int, count: int) -> int:
        """Decrypt up to count bytes into fd at offset; 0 at end of stream: into one
        buffer, then one pwrite."""
        with memoryview(self.buffer) as view, view[:min(count, len(view))] as into:
            got = self.recv_into(into)
            written = 0
            while written < got:
                written += os.pwrite(fd, into[written:got], offset + written)
        return got

    def shutdown(self, how: int) -> None:
        # The TCP socket's shutdown, not SSLSocket's: that one also detaches OpenSSL, and a
        # thread still reading would then see raw ciphertext.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, how)

    def abort(self) -> None:
        """Close with a reset, which reaches the peer even when it has stopped reading."""
        reset_on_close(self.sock)
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _broken(self, exc: ssl.SSLError) -> ConnectionError:
        if isinstance(exc, (ssl.SSLEOFError, ssl.SSLSyscallError)):
            self._check_eof()
        return _broken(exc)

    def _check_eof(self) -> None:
        """OpenSSL reports a socket error (keepalive timeout, reset) as a bare end of stream;
        TCP's state tells them apart: a peer that closed leaves CLOSE_WAIT or TIME_WAIT."""
        info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        if info[0] == TCP_CLOSE:
            raise ConnectionError(errno.ETIMEDOUT, "the link broke: no answer within link.dead_peer_timeout "
                                  "(keepalive), or the peer reset it")

    def _gather(self, view: memoryview, got: int, want: int) -> int:
        """Take what OpenSSL can give without waiting, after `got` bytes; returns the count."""
        more = 0
        with self.lock:
            while got + more < want:
                try:
                    n = self.sock.recv_into(view[got + more:], want - got - more)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                except ssl.SSLError as exc:
                    raise self._broken(exc) from None
                if not n:
                    break
                more += n
        return more

    def _send_view(self, view: memoryview) -> None:
        sent = 0
        while sent < len(view):
            # a retried SSL_write must offer the same bytes again: `sent` moves only on success
            with view[sent:sent + TLS_STEP] as step:
                sent += self._call(lambda step=step: self.sock.send(step))

    def _sendfile(self, fd: int, offset: int, count: int) -> None:
        while count:
            try:
                sent = os.sendfile(self.sock.fileno(), fd, offset, count)
            except BlockingIOError:
                self._wait(select.POLLOUT)
                continue
            if not sent:
                raise ConnectionError("peer closed the connection")
            offset += sent
            count -= sent

    def _call(self, operation: Callable[[], _T]) -> _T:
        """Run one OpenSSL operation, waiting for the socket (without the lock) as it asks."""
        while True:
            with self.lock:
                try:
                    return operation()
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
                except ssl.SSLError as exc:
                    raise self._broken(exc) from None
            self._wait(events)

    def _wait(self, events: int) -> None:
        timeout = self.wait_time()
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        if not poller.poll(None if timeout is None else max(1, int(timeout * 1000))):
            raise TimeoutError("timed out")


Link = PlainLink | TlsLink


def _broken(exc: ssl.SSLError) -> ConnectionError:
    """An OpenSSL failure as one readable reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return LinkRefused(f"its certificate was refused: {exc.verify_message}")
    if isinstance(exc, ssl.SSLEOFError):
        return ConnectionResetError(errno.ECONNRESET, "the peer closed the connection")
    reason = (exc.reason or type(exc).__name__).lower().replace("_", " ")
    if "did not return a certificate" in reason or "certificate required" in reason:
        return LinkRefused("it sent no client certificate: every proxy needs one (imgmig pki issue)")
    if "alert" in reason:
        return PeerRefusedUs(f"the peer refused the TLS session ({reason}): it does not accept this node's "
                             f"certificate, or this node is not allowed there")
    return ConnectionError(f"TLS failed: {reason}")


def reset_on_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def keep_alive(sock: socket.socket, dead_peer_timeout: float) -> None:
    """Notice a dead peer within dead_peer_timeout: keepalive probes when the link is idle,
    and TCP_USER_TIMEOUT when sent bytes stay unacknowledged."""
    idle = max(1, int(dead_peer_timeout / 2))
    interval = max(1, int(dead_peer_timeout / 6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_peer_timeout * 1000))


def open_link(peer: HostPort, expected_node: str | None, trust: Trust | None, settings: LinkConfig) -> Link:
    """The proxy's side: connect to the cache, then (with TLS) handshake and check that its
    certificate names `expected_node` (or, without one, the host as IP or DNS name), all
    within settings.handshake_timeout, which goes on to cover HELLO."""
    started = time.monotonic()
    sock = socket.create_connection((peer.host, peer.port), timeout=settings.handshake_timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keep_alive(sock, settings.dead_peer_timeout)
        left = settings.handshake_timeout - (time.monotonic() - started)
        if trust is None:
            plain = PlainLink(sock)
            plain.arm_deadline(left)
            return plain
        context = trust.client_context(check_hostname=expected_node is None)
        wrapped = context.wrap_socket(sock, do_handshake_on_connect=False,
                                      server_hostname=peer.host if expected_node is None else None)
    except BaseException:
        sock.close()
        raise
    link = TlsLink(wrapped, left)
    try:
        _handshake(link, settings.handshake_timeout, "the cache")
        link.peer_node = node_of_peercert(wrapped.getpeercert() or {})
        if expected_node is not None and link.peer_node != expected_node:
            raise LinkRefused(f"the cache at {peer} presents a certificate for node {link.peer_node!r}, not "
                              f"{expected_node!r} as proxy.peer says; fix proxy.peer or that cache's certificate")
    except BaseException:
        link.close()
        raise
    _log_path(link)
    return link


def accept_link(sock: socket.socket, trust: Trust | None, settings: LinkConfig) -> Link:
    """The cache's side: on an accepted socket, (with TLS) handshake within
    settings.handshake_timeout, which goes on to cover HELLO. The link's peer_node is the
    node the proxy's certificate names (None with TLS off). Closes sock on failure."""
    try:
        keep_alive(sock, settings.dead_peer_timeout)
        if trust is None:
            plain = PlainLink(sock)
            plain.arm_deadline(settings.handshake_timeout)
            return plain
        deadline = time.monotonic() + settings.handshake_timeout
        _expect_tls(sock, settings.handshake_timeout)
        wrapped = trust.server_context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    link = TlsLink(wrapped, deadline - time.monotonic())
    try:
        _handshake(link, settings.handshake_timeout, "the proxy")
        link.peer_node = node_of_peercert(wrapped.getpeercert() or {})
        if link.peer_node is None:
            raise LinkRefused("its certificate names no node (no DNS subjectAltName); issue it with "
                              "`imgmig pki issue NODE`")
    except BaseException:
        link.close()
        raise
    _log_path(link)
    return link


def _expect_tls(sock: socket.socket, timeout: float) -> None:
    """Refuse a plaintext peer by its first byte, with a reason an operator can act on."""
    sock.settimeout(timeout)
    try:
        first = sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        raise LinkRefused(f"no TLS handshake within {timeout:.0f} s") from None
    finally:
        sock.settimeout(None)
    if not first:
        raise ConnectionAbortedError(errno.ECONNABORTED, "closed before the TLS handshake")
    if first[0] != TLS_HANDSHAKE_RECORD:
        raise LinkRefused("it does not speak TLS (plaintext, or a proxy with tls: off?); this cache accepts "
                          "TLS only: give that proxy a certificate and tls: settings")


def _handshake(link: TlsLink, timeout: float, peer: str) -> None:
    try:
        link.handshake()
    except TimeoutError:
        raise LinkRefused(f"no TLS handshake from {peer} within {timeout:.0f} s") from None
    except LinkRefused:
        raise
    except (ConnectionResetError, BrokenPipeError):
        raise HandshakeCut(f"{peer} closed the connection during the TLS handshake (it does not accept this "
                           f"node's certificate, or it stopped?)") from None
    except ConnectionError as exc:
        raise LinkRefused(f"TLS handshake failed: {exc}") from None


_path_logged = threading.Event()


def _log_path(link: TlsLink) -> None:
    """Say once per process which way file bytes go."""
    if not _path_logged.is_set():
        _path_logged.set()
        how = ("kernel TLS: file bytes go with sendfile" if link.ktls_send
               else "user-space TLS: file bytes pass through OpenSSL")
        log.info("first TLS link: %s (%s)", how, link.sock.version())
