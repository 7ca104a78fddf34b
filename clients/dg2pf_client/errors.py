"""Typed errors carrying the server's message and the field it is about."""

from __future__ import annotations


class ApiError(Exception):
    status: int = 0

    def __init__(self, status: int, type_: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{status} {type_}: {message}")
        self.status, self.type, self.message, self.field = status, type_, message, field


class InvalidRequest(ApiError):
    pass


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class TooLarge(ApiError):
    pass


class ServiceUnreachable(ApiError):
    pass


class WaitTimeout(TimeoutError):
    pass


_BY_STATUS = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: TooLarge}


def from_response(status: int, body: object, text: str) -> ApiError:
    # Anything else than the API's error shape (a proxy's page, a body cut off) still gives a message.
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    cls = _BY_STATUS.get(status, InvalidRequest if 400 <= status < 500 else ApiError)
    return cls(status, err.get("type", "error"), err.get("message", text[:500]), err.get("field"))
