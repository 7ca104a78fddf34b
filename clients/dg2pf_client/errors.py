"""Typed errors carrying the server's message and the field it is about."""

from __future__ import annotations

from http import HTTPStatus


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


class NotTheService(ApiError):
    """The URL answered, but not as the dg2pf API does (a web page, another server, a cut-off body)."""


class WaitTimeout(TimeoutError):
    pass


_BY_STATUS = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: TooLarge}


def from_response(status: int, body: object, text: str) -> ApiError:
    # Anything else than the API's error shape (a proxy's page, a body cut off) still gives a message.
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    cls = _BY_STATUS.get(status, InvalidRequest if 400 <= status < 500 else ApiError)
    message = err.get("message") or " ".join(text[:500].split())
    if not message:  # an empty body: say what came back
        reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
        message = f"HTTP {status} {reason} with an empty answer: is the URL a dg2pf service?"
    return cls(status, err.get("type", "error"), message, err.get("field"))
