"""Who may post to a webhook: a source-address allow list, then credentials.

An allow list (`10.0.0.0/8,2001:db8::/32`: networks in CIDR notation, or single addresses) is
checked against the peer address of the connection: behind a reverse proxy or a load balancer,
that is the proxy's address, never a forwarded header. A request from elsewhere gets 403.

Credentials are HTTP Basic (`basic:USER:PASSWORD`) or a shared token (`token:SECRET`, sent as
`Authorization: Bearer SECRET` or as the `token` query parameter, for providers that cannot set
headers); without them a request gets 401. Both are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from dataclasses import dataclass

from aiohttp import web

from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.normalise import Rejection

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class WebhookAuth:
    """Credentials a webhook requires: HTTP Basic, or a shared token."""

    scheme: str
    secret: bytes

    @classmethod
    def parse(cls, spec: str) -> WebhookAuth:
        scheme, _, rest = spec.partition(":")
        if scheme == "basic" and ":" in rest:
            return cls("basic", rest.encode())
        if scheme == "token" and rest:
            return cls("token", rest.encode())
        raise ValueError("webhook auth must be basic:USER:PASSWORD or token:SECRET")

    def allows(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        kind, _, value = header.partition(" ")
        if self.scheme == "basic":
            try:
                given = base64.b64decode(value, validate=True) if kind.lower() == "basic" else b""
            except binascii.Error:
                given = b""
            return hmac.compare_digest(given, self.secret)
        given_text = value if kind.lower() == "bearer" else request.query.get("token", "")
        return hmac.compare_digest(given_text.encode(), self.secret)


@dataclass(frozen=True, slots=True)
class AllowList:
    """The source networks a webhook accepts."""

    networks: tuple[Network, ...]

    @classmethod
    def parse(cls, spec: str) -> AllowList:
        """Comma-separated networks (`10.0.0.0/8`) or addresses (`192.0.2.7`); raises ValueError."""
        networks = []
        for entry in filter(None, (part.strip() for part in spec.split(","))):
            try:
                networks.append(ipaddress.ip_network(entry))
            except ValueError as error:
                raise ValueError(f"{entry!r} is not a network in CIDR notation: {error}") from None
        if not networks:
            raise ValueError("the allow list names no network")
        return cls(tuple(networks))

    def allows(self, peer: str | None) -> bool:
        if not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # an IPv4 client of a dual-stack socket
        return any(address in network for network in self.networks)


@dataclass(frozen=True, slots=True)
class Access:
    """What one webhook requires; with neither part, it takes anyone's requests."""

    auth: WebhookAuth | None = None
    allow_from: AllowList | None = None

    @property
    def open(self) -> bool:
        return self.auth is None and self.allow_from is None

    def refusal(self, request: web.Request) -> tuple[int, Rejection, dict[str, str]] | None:
        """Why `request` may not post here (HTTP status, error, headers), or None when it may."""
        if self.allow_from is not None and not self.allow_from.allows(request.remote):
            description = f"requests from {request.remote} are not accepted on this webhook"
            return 403, Rejection("", ErrorReason.ADDRESS_NOT_ALLOWED, description), {}
        if self.auth is not None and not self.auth.allows(request):
            challenge = {"WWW-Authenticate": 'Basic realm="dlrhub"'} if self.auth.scheme == "basic" else {}
            return 401, Rejection("", ErrorReason.UNAUTHENTICATED, "missing or wrong credentials"), challenge
        return None
