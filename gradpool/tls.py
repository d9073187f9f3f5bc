"""Certificates for a network of one's own: a certificate authority and a server certificate it signs for
the names the coordinator is reached by (``gradpool coordinator certs``). Nodes trust the authority with
``--ca-cert``; a coordinator reached from the internet is better served a certificate of a public CA."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Tls:
    ca: Path  # the authority's certificate: what a node trusts with --ca-cert
    cert: Path  # the server's certificate
    key: Path  # its private key (readable by its owner only)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _alternative(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def make_tls(root: Path, names: list[str] | None = None, prefix: str = "", days: int = 825) -> Tls:
    """A new CA and a server certificate it signs for ``names`` (host names or IP addresses; 127.0.0.1 by
    default), as PEM files ``ca.pem``, ``cert.pem`` and ``key.pem`` under ``root`` (each name after
    ``prefix``). Every key is new; the CA's key is not kept, so nothing else can be signed with it."""
    names = names or ["127.0.0.1"]
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"gradpool {prefix or 'network'} CA"))
        .issuer_name(_name(f"gradpool {prefix or 'network'} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_alternative(n) for n in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem = serialization.Encoding.PEM
    return Tls(
        ca=_write(root / f"{prefix}ca.pem", ca.public_bytes(pem)),
        cert=_write(root / f"{prefix}cert.pem", server.public_bytes(pem)),
        key=_write(root / f"{prefix}key.pem", key_pem, private=True),
    )
