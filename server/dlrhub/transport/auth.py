"""Bearer-token authentication with roles, for the gRPC API.

Tokens are configured as `ROLES:TOKEN` pairs separated by commas
(`ingest:abc,read:def,ingest+read:ghi`, env DLRHUB_TOKENS) or as a JSON file
(`{"tokens": [{"name": "billing", "token": "...", "roles": ["read"]}]}`,
DLRHUB_TOKENS_FILE). Callers send `authorization: Bearer TOKEN`.

Roles: `ingest` may call Ingest and RenormaliseQuarantine; `read` may call
GetMessage, ListMessages, Stream, StreamBatches and ListQuarantine; `admin` may
call DismissQuarantine and PruneMessages (they close or delete data). No token
or an unknown one is UNAUTHENTICATED; a token without the role is
PERMISSION_DENIED. Health checks (and reflection, unless turned off) stay
open. Tokens are compared in constant time, against every configured token.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.errors import DlrhubError, PermissionDenied, Unauthenticated, to_status

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
ROLES = frozenset({"ingest", "read", "admin"})
_SERVICE = "/deliveryreport.v1.DeliveryReportService/"
# The role each method of the service needs. tests/test_auth.py checks every method is listed.
METHOD_ROLES = {
    _SERVICE + "Ingest": "ingest",
    _SERVICE + "GetMessage": "read",
    _SERVICE + "ListMessages": "read",
    _SERVICE + "Stream": "read",
    _SERVICE + "StreamBatches": "read",
    _SERVICE + "ListQuarantine": "read",
    _SERVICE + "RenormaliseQuarantine": "ingest",
    _SERVICE + "DismissQuarantine": "admin",
    _SERVICE + "PruneMessages": "admin",
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    secret: bytes
    roles: frozenset[str]


@dataclass(frozen=True, slots=True)
class Tokens:
    tokens: tuple[Token, ...]

    @classmethod
    def parse(cls, spec: str) -> Tokens:
        """`ingest:abc,read:def,ingest+read:ghi`."""
        tokens = []
        for number, entry in enumerate(filter(None, (part.strip() for part in spec.split(","))), 1):
            roles, colon, secret = entry.partition(":")
            if not colon:
                raise ValueError(f"token {number}: expected ROLES:TOKEN (roles joined with +)")
            tokens.append(_token(f"token {number}", secret.strip(), [r.strip() for r in roles.split("+")]))
        return cls(tuple(tokens))

    @classmethod
    def load(cls, path: Path) -> Tokens:
        """A JSON file: {"tokens": [{"name": ..., "token": ..., "roles": [...]}]}."""
        try:
            entries = json.loads(path.read_text())["tokens"]
            return cls(tuple(_token(e.get("name", ""), e["token"], e["roles"]) for e in entries))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
            expected = "{'tokens': [{'token': ..., 'roles': [...]}]}"
            raise ValueError(f"{path}: expected {expected} ({error})") from None

    def roles_of(self, secret: str) -> frozenset[str] | None:
        """The roles of a token, or None if it is not configured. Constant time per token."""
        given = secret.encode()
        found: frozenset[str] | None = None
        for token in self.tokens:
            if hmac.compare_digest(given, token.secret):
                found = token.roles
        return found


def _token(name: str, secret: object, roles: object) -> Token:
    label = name or "a token"
    if not isinstance(secret, str) or not secret:
        raise ValueError(f"{label}: the secret is empty or not a string")
    if not isinstance(roles, list) or not roles or not all(isinstance(role, str) for role in roles):
        raise ValueError(f"{label}: needs a list of roles from {sorted(ROLES)}, got {roles!r}")
    unknown = set(roles) - ROLES
    if unknown:
        names = ", ".join(map(repr, sorted(unknown)))
        raise ValueError(f"{label}: unknown role {names}; roles are {sorted(ROLES)}")
    return Token(name, secret.encode(), frozenset(roles))


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks the bearer token and its role before a call reaches the servicer."""

    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if method.startswith(OPEN_PREFIXES) or handler is None:
            return handler
        error = self._check(method, handler_call_details.invocation_metadata)
        return handler if error is None else _denied(handler, error)

    def _check(self, method: str, metadata: Any) -> DlrhubError | None:
        header = next((value for key, value in metadata or () if key == "authorization"), "")
        scheme, _, secret = str(header).partition(" ")
        if scheme.lower() != "bearer" or not secret:
            return Unauthenticated(
                "missing token: send 'authorization: Bearer TOKEN'", ErrorReason.MISSING_TOKEN
            )
        roles = self._tokens.roles_of(secret.strip())
        if roles is None:
            return Unauthenticated("unknown token", ErrorReason.UNKNOWN_TOKEN)
        needed = METHOD_ROLES.get(method)
        if needed is None or needed not in roles:
            rpc = method.rsplit("/", 1)[-1]
            return PermissionDenied(
                f"this token may not call {rpc}: it needs the {needed or 'unknown'} role",
                ErrorReason.MISSING_ROLE,
                metadata={"method": rpc, "role": needed or ""},
            )
        return None


def _denied(handler: Handler, error: DlrhubError) -> Handler:
    """A handler of the same kind as `handler` that only aborts with `error`."""
    status = to_status(error)

    async def abort(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await abort(request, context)
        yield  # pragma: no cover - makes this an async generator

    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **options)
    return grpc.unary_unary_rpc_method_handler(abort, **options)
