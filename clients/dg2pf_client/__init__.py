"""Python client of the dg2pf service."""

from .client import Client
from .errors import ApiError, Conflict, Forbidden, InvalidRequest, NotFound, ServiceUnreachable, TooLarge, Unauthorized, WaitTimeout

__all__ = ["ApiError", "Client", "Conflict", "Forbidden", "InvalidRequest", "NotFound", "ServiceUnreachable", "TooLarge", "Unauthorized", "WaitTimeout"]
