"""The HTTP edge of billing: exact JSON decoding, JSON replies from already-encoded bytes, and the
mapping of database and framework errors to the error body every service uses."""
from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import Empty
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from chat_common.errors import (
    AppError,
    BadRequestError,
    ConflictError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    http_exception_handler,
)

logger = logging.getLogger(__name__)

# Litestar's own JSON decoding turns 0.1 into a float before any type is applied; money in
# dollars must reach dollars_to_exact_nanos as the decimal the caller wrote.
_EXACT_JSON = msgspec.json.Decoder(float_hook=Decimal)

# No valid request nests anywhere near this; refusing deeper bodies here keeps every recursive
# step after decoding (conversion, checks, encoding) far from Python's recursion limit.
MAX_JSON_DEPTH = 32


class ExactJsonRequest(Request[Any, Any, Any]):
    async def json(self) -> Any:
        if self._json is Empty:
            body = await self.body()
            try:
                value = _EXACT_JSON.decode(body or b"null")
            except msgspec.DecodeError as exc:
                raise BadRequestError(f"request body is not valid JSON: {exc}") from None
            except RecursionError:
                raise BadRequestError(f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
            if _depth(value) > MAX_JSON_DEPTH:
                raise BadRequestError(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
            self._json = value
        return self._json


def _depth(value: Any) -> int:
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in item)
    return deepest


def json_reply(body: bytes, status_code: int = 200) -> Response[bytes]:
    return Response(content=body, status_code=status_code, media_type=MediaType.JSON)


def encode(value: Any) -> bytes:
    return msgspec.json.encode(value)


def _error_reply(error: AppError) -> Response[Any]:
    return Response(content=error.to_body(), status_code=error.status_code)


def framework_error_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Litestar's own 400 and 413 carry the contract's codes, not a generic ``http_error``."""
    if not isinstance(exc, ValidationException):
        if exc.status_code == 400:
            return _error_reply(BadRequestError(str(exc.detail)))
        if exc.status_code == 413:
            return _error_reply(PayloadTooLargeError("request body too large"))
    return http_exception_handler(request, exc)


# serialization_failure, deadlock_detected, lock_not_available, query_canceled (a timeout)
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014"})


def database_error_handler(_: Request[Any, Any, Any], exc: DBAPIError | PoolTimeoutError) -> Response[Any]:
    """Input is validated before it reaches the database; this is the net under that, so a value
    the checks missed is still a client error and an outage is a 503, never a traceback."""
    reason = type(getattr(exc, "orig", None) or exc).__name__
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if sqlstate in _TRANSIENT_SQLSTATES:
        # The transaction rolled back, so nothing was applied and the caller may simply try
        # again (chat_common's ServiceClient retries a 503 by itself).
        logger.warning("database conflict, retry", extra={"db_error": reason, "sqlstate": sqlstate})
        return _error_reply(ServiceUnavailableError("billing database busy; retry the request"))
    if isinstance(exc, IntegrityError):
        logger.warning("database refused a write", extra={"db_error": reason})
        return _error_reply(ConflictError("the request conflicts with stored data"))
    if isinstance(exc, DataError):
        logger.warning("database refused a value", extra={"db_error": reason})
        return _error_reply(BadRequestError("a value in the request is out of range or malformed"))
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeoutError)) or getattr(
        exc, "connection_invalidated", False
    ):
        logger.warning("database unavailable", extra={"db_error": reason})
        return _error_reply(ServiceUnavailableError("billing database unavailable"))
    logger.error("database error", extra={"db_error": reason}, exc_info=exc)
    return _error_reply(AppError())


EXCEPTION_HANDLERS: dict[type[Exception], Any] = {
    HTTPException: framework_error_handler,
    DBAPIError: database_error_handler,
    PoolTimeoutError: database_error_handler,
}
