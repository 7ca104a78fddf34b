"""The one shape of every error response, API and serving alike: {"error": {type, field, message}}."""

from __future__ import annotations


def error_body(type_: str, message: str, field: str | None = None) -> dict:
    return {"error": {"type": type_, "field": field, "message": message}}
