"""Bearer-key authentication. Each key belongs to a tenant; every stored row is the tenant's.

Keys are kept as SHA-256 digests and looked up by digest, so the comparison does not leak a
key's prefix through timing. The application keeps no plain key: `create_app` builds the digest
table and drops the keys from the settings it keeps (a key given by `key_env` stays in the
process's environment, where the operator put it).
"""

from __future__ import annotations

import hashlib

from starlette.requests import HTTPConnection

from relay.errors import AuthenticationError, PermissionDenied
from relay.loopback import is_loopback

OPEN_TENANT = "default"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_table(keys: dict[str, str]) -> dict[str, str]:
    """{plain key: tenant} -> {digest: tenant}."""
    return {digest(key): tenant for key, tenant in keys.items()}


def tenant_of(request: HTTPConnection) -> str:
    """The tenant of an HTTP request or a WebSocket's upgrade request."""
    table: dict[str, str] = request.app.state.key_table
    if not table:
        # No keys configured: `relay serve` refuses to bind anywhere but loopback; this check
        # holds however the app is served (another ASGI server, another bind address).
        client = request.client
        if client is None or not is_loopback(client.host):
            raise PermissionDenied(
                "This Relay has no API keys configured and only serves loopback clients."
            )
        return OPEN_TENANT
    header = request.headers.get("authorization")
    if not header:
        raise AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="authentication_required",
        )
    scheme, _, key = header.partition(" ")
    tenant = table.get(digest(key.strip())) if scheme.lower() == "bearer" else None
    if tenant is None:
        raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
    return tenant
