"""TLS, and mutual TLS, for the gRPC and HTTP ports from certificate and key files."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from dlrhub.config import Settings


def files(settings: Settings) -> tuple[Path, Path, Path | None] | None:
    """(certificate, key, client CA) when TLS is configured, else None; a partial set is an error."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ValueError("TLS needs both DLRHUB_TLS_CERT and DLRHUB_TLS_KEY")
    if settings.tls_client_ca and not settings.tls_cert:
        raise ValueError("DLRHUB_TLS_CLIENT_CA (mutual TLS) needs DLRHUB_TLS_CERT and DLRHUB_TLS_KEY")
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return settings.tls_cert, settings.tls_key, settings.tls_client_ca


def grpc_credentials(cert: Path, key: Path, client_ca_path: Path | None) -> grpc.ServerCredentials:
    client_ca = client_ca_path.read_bytes() if client_ca_path else None
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def http_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
