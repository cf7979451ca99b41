"""Test certificates: a CA, a server certificate for localhost/127.0.0.1 and a client certificate."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _issue(
    name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        alt = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def make_pki(d: Path) -> Pki:
    """Write a fresh CA, server and client certificate with their keys into `d`."""
    ca_cert, ca_key = _issue("test-ca", None, server=False)
    files: dict[str, bytes] = {"ca.pem": ca_cert.public_bytes(serialization.Encoding.PEM)}
    for who, server in (("server", True), ("client", False)):
        cert, key = _issue(who if not server else "localhost", (ca_cert.subject, ca_key), server)
        files[f"{who}.pem"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{who}-key.pem"] = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    for name, data in files.items():
        (d / name).write_bytes(data)
    return Pki(d / "ca.pem", d / "server.pem", d / "server-key.pem", d / "client.pem", d / "client-key.pem")
