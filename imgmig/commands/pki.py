"""`imgmig pki`: the cluster CA and node certificates, with python3-cryptography.

    imgmig pki init --dir D                    D/ca.crt, D/ca.key
    imgmig pki issue NODE --dir D [--ip A]... [--dns N]...   D/NODE.crt, D/NODE.key

Keys are ECDSA P-256, written 0600 (never readable by anyone else, not even for a
moment: the file is created with that mode). `issue` keeps an existing D/NODE.key, so
issuing again renews the certificate for the same key: install the new NODE.crt and
`systemctl reload` the service. The node name is the first DNS subjectAltName.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

EXIT_USAGE = 2
CA_DAYS = 3650
NODE_DAYS = 365


class PkiError(Exception):
    """One line for the operator."""


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pki = commands.add_parser("pki", help="make the cluster CA and node certificates for TLS")
    steps = pki.add_subparsers(dest="pki_command", required=True)
    init = steps.add_parser("init", help="make a cluster CA: DIR/ca.crt and DIR/ca.key")
    init.add_argument("--dir", required=True, type=Path, help="where the CA lives (keep ca.key offline)")
    init.add_argument("--days", type=int, default=CA_DAYS, help="validity (%(default)s days)")
    init.set_defaults(run=lambda args: _run(lambda: init_ca(args.dir, days=args.days)))
    issue = steps.add_parser("issue", help="certificate and key for a node: DIR/NODE.crt and DIR/NODE.key")
    issue.add_argument("node", help="the node's name, as in its config's `node:`")
    issue.add_argument("--dir", required=True, type=Path, help="the CA's directory (from pki init)")
    issue.add_argument("--ip", action="append", default=[], help="also an IP address SAN (repeatable)")
    issue.add_argument("--dns", action="append", default=[], help="also a DNS name SAN (repeatable)")
    issue.add_argument("--days", type=int, default=NODE_DAYS, help="validity (%(default)s days)")
    issue.set_defaults(run=lambda args: _run(lambda: issue_node(args.dir, args.node, ips=args.ip,
                                                                dns=args.dns, days=args.days)))


def _run(step: Callable[[], list[str]]) -> int:
    try:
        for line in step():
            print(line)
    except PkiError as exc:
        print(f"imgmig pki: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def init_ca(directory: Path, *, days: int = CA_DAYS) -> list[str]:
    ca_crt, ca_key = directory / "ca.crt", directory / "ca.key"
    if ca_key.exists() or ca_crt.exists():
        raise PkiError(f"{directory} already holds a CA ({ca_crt}); a second one would split the cluster: "
                       f"use that one, or another --dir")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imgmig cluster CA")])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    write_key(ca_key, key)
    write_cert(ca_crt, cert)
    return [f"wrote {ca_crt} (give it to every node) and {ca_key} (keep it here, 0600, off the nodes if you can)"]


def issue_node(directory: Path, node: str, *, ips: Sequence[str] = (), dns: Sequence[str] = (),
               days: int = NODE_DAYS, not_before: datetime.datetime | None = None) -> list[str]:
    """Sign a certificate for `node` with DIR's CA; reuse DIR/NODE.key when it exists."""
    if not node or "/" in node or node.startswith(".") or not node.isascii() or not node.isprintable():
        raise PkiError(f"node name {node!r}: use the printable ASCII name from that node's config (`node:`)")
    ca_key = _load_ca_key(directory / "ca.key")
    ca_cert = _load_ca_cert(directory / "ca.crt")
    key_file, cert_file = directory / f"{node}.key", directory / f"{node}.crt"
    reused = key_file.exists()
    key = _load_key(key_file) if reused else ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(node), *(x509.DNSName(name) for name in dns if name != node)]
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise PkiError(f"--ip {ip!r} is not an IP address") from None
    start = not_before or _now() - datetime.timedelta(minutes=5)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    if not reused:
        write_key(key_file, key)
    write_cert(cert_file, cert)
    wrote = f"wrote {cert_file} (for the existing key {key_file})" if reused else f"wrote {cert_file} and {key_file}"
    return [f"{wrote} for node {node}: install them as /etc/imgmig/tls/node.crt "
            f"and node.key (0600) on that node, with ca.crt as /etc/imgmig/tls/ca.crt"]


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    _write(path, data, 0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically: a temporary file created with `mode`, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # regardless of the umask
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(data)
            out.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _load_ca_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if not path.exists():
        raise PkiError(f"{path}: missing; make the CA first with `imgmig pki init --dir {path.parent}`")
    return _load_key(path)  # type: ignore[return-value]


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise PkiError(f"{path}: cannot read it ({exc.strerror}); run as the user who made it") from None
    except (ValueError, TypeError):
        raise PkiError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: not an ECDSA key (imgmig pki makes P-256 keys)")
    return key


def _load_ca_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise PkiError(f"{path}: cannot read it ({exc.strerror}); make the CA with "
                       f"`imgmig pki init --dir {path.parent}`") from None
    except ValueError:
        raise PkiError(f"{path}: not a PEM certificate") from None
