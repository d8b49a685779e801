"""This node's TLS identity: the cluster CA, its certificate and key, as SSL contexts.

The files are checked before anything starts (present, readable, PEM, within their
validity, signed by the CA, key matching the certificate, naming this node), so that
a problem is one line naming the file and what to run. The key is read from systemd's
credentials directory when the unit passes it there (LoadCredential=node.key:...), so a
DynamicUser service never needs read access to /etc/imgmig/tls/node.key.

`Trust.reload()` (SIGHUP, `systemctl reload`) builds new contexts from the same files;
connections made afterwards use them, connections under way keep theirs.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from imgmig.config import ConfigError, TlsConfig

log = logging.getLogger(__name__)

KEY_CREDENTIAL = "node.key"
ISSUE_HINT = "make one with `imgmig pki issue NODE --dir DIR` on the machine holding the CA"
# OpenSSL's kernel TLS (Python >= 3.12, kernel CONFIG_TLS): sendfile then stays usable.
KTLS_OPTION = getattr(ssl, "OP_ENABLE_KTLS", 0)


@dataclass(frozen=True)
class Identity:
    """What the files say: this node's name, and until when its certificate is valid."""
    node: str
    not_after: datetime.datetime
    ca_pem: str
    cert: Path
    key: Path


def key_path(tls: TlsConfig) -> Path:
    """The key systemd passed as a credential, else the configured path."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        passed = Path(directory) / KEY_CREDENTIAL
        if passed.exists():
            return passed
    return tls.key


def node_of(cert: x509.Certificate) -> str | None:
    """The node a certificate names: its first DNS subjectAltName (`imgmig pki issue` puts
    the node name there first)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    names = san.get_values_for_type(x509.DNSName)
    return names[0] if names else None


def node_of_peercert(peercert: dict[str, object]) -> str | None:
    """The same, for what ssl.SSLSocket.getpeercert() reports."""
    for kind, value in peercert.get("subjectAltName", ()):  # type: ignore[attr-defined]
        if kind == "DNS":
            return str(value)
    return None


def load_identity(tls: TlsConfig, node: str) -> Identity:
    """Check the CA, certificate and key; ConfigError (one line) on the first problem."""
    key_file = key_path(tls)
    ca = _load_cert(tls.ca, "the cluster CA certificate (`imgmig pki init --dir DIR` makes one)")
    cert = _load_cert(tls.cert, f"this node's certificate ({ISSUE_HINT})")
    key = _load_key(key_file)
    now = datetime.datetime.now(datetime.UTC)
    for path, item in ((tls.ca, ca), (tls.cert, cert)):
        not_before, not_after = validity(item)
        if not_after < now:
            raise ConfigError(f"{path}: the certificate expired on {not_after:%Y-%m-%d %H:%M} UTC; "
                              f"{ISSUE_HINT}, install it and run `systemctl reload imgmig-cache imgmig-proxy`")
        if not_before > now:
            raise ConfigError(f"{path}: the certificate is not valid before {not_before:%Y-%m-%d %H:%M} "
                              f"UTC; check this node's clock")
    if not _signed_by(cert, ca):
        raise ConfigError(f"{tls.cert}: not signed by the CA in {tls.ca}; {ISSUE_HINT} with that CA")
    if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
        raise ConfigError(f"{key_file}: this key does not match the certificate {tls.cert}; install the key "
                          f"that `imgmig pki issue` wrote next to that certificate")
    named = node_of(cert)
    if named != node:
        raise ConfigError(f"{tls.cert}: the certificate names node {named!r} but this node is {node!r} (key "
                          f"'node'); issue one with `imgmig pki issue {node} --dir DIR` or fix 'node'")
    return Identity(node, validity(cert)[1], tls.ca.read_text(), tls.cert, key_file)


def validity(cert: x509.Certificate) -> tuple[datetime.datetime, datetime.datetime]:
    """not-before and not-after as aware UTC times: cryptography >= 42 has *_utc (and deprecates
    the naive ones), bookworm's 38 only the naive ones."""
    if hasattr(cert, "not_valid_after_utc"):
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    return (cert.not_valid_before.replace(tzinfo=datetime.UTC),
            cert.not_valid_after.replace(tzinfo=datetime.UTC))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing: {what}; or set tls: in the config") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror}); under systemd pass it with "
                          f"LoadCredential= (see docs/systemd.md), else make it readable by the daemon") from None


def _load_cert(path: Path, what: str) -> x509.Certificate:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path}: not a PEM certificate: {what}") from None


def _load_key(path: Path) -> object:
    data = _read(path, f"this node's private key ({ISSUE_HINT})")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: not an unencrypted PEM private key; {ISSUE_HINT}") from None


def _public_bytes(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """cryptography 38 (Debian bookworm) has no verify_directly_issued_by: check by hand."""
    if cert.issuer != ca.subject:
        return False
    public = ca.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                          cert.signature_hash_algorithm)  # type: ignore[arg-type]
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _context(identity: Identity, purpose: int, check_hostname: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = check_hostname
    context.options |= KTLS_OPTION
    context.load_verify_locations(cadata=identity.ca_pem)
    context.load_cert_chain(identity.cert, identity.key)
    return context


class Trust:
    """The SSL contexts of this node, rebuilt from the files by reload()."""

    def __init__(self, tls: TlsConfig, node: str) -> None:
        self.tls, self.node = tls, node
        self.lock = threading.Lock()
        self._build()

    def _build(self) -> None:
        identity = load_identity(self.tls, self.node)
        try:
            server = _context(identity, ssl.PROTOCOL_TLS_SERVER)
            # No session resumption (every link authenticates in full), and no tickets left
            # unread in a peer that hangs up early, which would turn its close into a reset.
            server.num_tickets = 0
            by_node = _context(identity, ssl.PROTOCOL_TLS_CLIENT)
            by_host = _context(identity, ssl.PROTOCOL_TLS_CLIENT, check_hostname=True)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{self.tls.cert}: OpenSSL refused the certificate or key ({exc}); "
                              f"{ISSUE_HINT}") from None
        with self.lock:
            self.identity, self.server, self.by_node, self.by_host = identity, server, by_node, by_host

    def server_context(self) -> ssl.SSLContext:
        with self.lock:
            return self.server

    def client_context(self, *, check_hostname: bool) -> ssl.SSLContext:
        with self.lock:
            return self.by_host if check_hostname else self.by_node

    def reload(self) -> bool:
        """Re-read the files; on a problem keep the contexts in use and say why."""
        try:
            self._build()
        except ConfigError as exc:
            log.error("TLS reload failed, new connections keep the previous certificate: %s", exc)
            return False
        log.info("TLS reloaded: certificate %s valid until %s UTC; new connections use it", self.tls.cert,
                 f"{self.identity.not_after:%Y-%m-%d}")
        return True


def describe_data_path() -> str:
    if KTLS_OPTION:
        return "kernel TLS requested (sendfile where the kernel has CONFIG_TLS, checked per connection)"
    return "file bytes are encrypted in user space (this Python has no ssl.OP_ENABLE_KTLS)"


def log_start(trust: Trust | None, source: str) -> None:
    """Say at every start how the link is protected (a warning when it is not)."""
    if trust is None:
        log.warning("TLS is off (tls: off in %s): any process that reaches the cache's port can send it "
                    "checkpoints, and images cross the network in clear text; use this only in a lab", source)
        return
    log.info("TLS on: node %s, certificate %s valid until %s UTC, CA %s; %s", trust.node, trust.tls.cert,
             f"{trust.identity.not_after:%Y-%m-%d}", trust.tls.ca, describe_data_path())
