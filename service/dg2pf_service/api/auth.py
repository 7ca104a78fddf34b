"""Bearer-token auth when DG2PF_API_TOKENS is set: 401 without a token, 403 with a wrong one."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import ApiError


def require_token(request: Request) -> None:
    tokens: list[str] = request.app.state.services.settings.api_tokens
    if not tokens:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
    # Compare against every token without stopping early: timing reveals nothing about which matched.
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given.encode(), token.encode())
    if not ok:
        raise ApiError(403, "forbidden", "invalid bearer token")
