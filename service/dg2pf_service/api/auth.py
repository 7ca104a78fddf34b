"""Bearer-token auth when DG2PF_API_TOKENS is set: 401 without a token, 403 with a wrong one.

``guard.RequestGuard`` checks it for every request before a body is read; ``require_token`` says the
same for the routes (and so the OpenAPI declares 401/403 on them)."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import ApiError

CHALLENGE = {"WWW-Authenticate": "Bearer"}


def token_error(tokens: list[str], authorization: str) -> tuple[int, str, str, dict[str, str] | None] | None:
    """None when the request may go on, else (status, type, message, headers) of the refusal."""
    if not tokens:
        return None
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return 401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'", CHALLENGE
    # Compare against every token without stopping early: timing reveals nothing about which matched.
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given.encode(), token.encode())
    return None if ok else (403, "forbidden", "invalid bearer token", None)


def require_token(request: Request) -> None:
    refused = token_error(request.app.state.services.settings.api_tokens, request.headers.get("authorization", ""))
    if refused is not None:
        status, type_, message, headers = refused
        raise ApiError(status, type_, message, headers=headers)
