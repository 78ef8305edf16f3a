"""Throwaway certificates for the TLS tests: a CA, a server certificate and client certificates.

`make_certs(directory)` writes PEM files: a CA; a server certificate for 127.0.0.1 and localhost
(SAN IP and DNS, serverAuth) signed by it; a client certificate (clientAuth) signed by it; and a
second CA with a client certificate of its own, which the server does not trust. EC P-256 keys:
quick to make.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True, slots=True)
class Certs:
    """Paths of the PEM files `make_certs` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # Another CA, and a client certificate (and key) signed by it, which the server does not trust.
    stranger_ca: Path
    stranger_cert: Path
    stranger_key: Path


@dataclass(frozen=True, slots=True)
class _Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dlrhub tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _ca(common_name: str) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        _builder(common_name, _name(common_name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Issued(certificate, key)


def _leaf(ca: _Issued, common_name: str, *, server: bool) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(common_name, ca.certificate.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
    return _Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _write(directory: Path, stem: str, issued: _Issued) -> tuple[Path, Path]:
    cert = directory / f"{stem}.crt"
    key = directory / f"{stem}.key"
    cert.write_bytes(issued.certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


def make_certs(directory: Path) -> Certs:
    """Writes a fresh CA, server and client certificates (with their keys) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca("dlrhub test CA")
    ca_cert, _ = _write(directory, "ca", ca)
    server_cert, server_key = _write(directory, "server", _leaf(ca, "localhost", server=True))
    client_cert, client_key = _write(directory, "client", _leaf(ca, "dlrhub test client", server=False))
    stranger_ca = _ca("another CA")
    stranger_ca_cert, _ = _write(directory, "stranger-ca", stranger_ca)
    stranger_cert, stranger_key = _write(
        directory, "stranger", _leaf(stranger_ca, "dlrhub stranger", server=False)
    )
    return Certs(
        ca_cert,
        server_cert,
        server_key,
        client_cert,
        client_key,
        stranger_ca_cert,
        stranger_cert,
        stranger_key,
    )
