"""One exception hierarchy for every service, mapped to HTTP statuses in one place.

Internal services answer errors as ``{"error": {"code": <code>, "message": <text>}}`` with the
status below; :mod:`chat_common.client` turns such a reply back into the same exception, so a
``NotFoundError`` raised in the sessions service is a ``NotFoundError`` in the gateway.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any, Literal

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

logger = logging.getLogger(__name__)


class AppError(Exception):
    status_code = 500
    code = "internal_error"
    default_message = "Internal Server Error"

    def __init__(self, message: str | None = None, *, details: Any = None) -> None:
        self.message = message or self.default_message
        self.details = details
        super().__init__(self.message)

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}


class BadRequestError(AppError):
    status_code = 400
    code = "bad_request"
    default_message = "Bad request"


class ValidationError(BadRequestError):
    """400 ``validation_error``: a parameter or body that does not have its declared shape (a
    malformed id, an unknown body field). The same answer Litestar gives for a value that does
    not decode into its type; ``details`` is a list of ``{message, key, source}``."""

    code = "validation_error"
    default_message = "Validation failed"


def uuid_or_none(value: object) -> uuid.UUID | None:
    """The UUID ``value`` spells (any case, with or without hyphens or braces), or None: for
    checks that answer a malformed id their own way rather than with a ValidationError."""
    try:
        return uuid.UUID(value)  # type: ignore[arg-type]
    except (ValueError, TypeError, AttributeError):
        return None


def parse_uuid(value: str, key: str, source: Literal["path", "query", "body"] = "path") -> uuid.UUID:
    """An id taken as a string (so a malformed one reaches the handler instead of missing the
    route with a 404) and parsed: every service answers a malformed one alike."""
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise ValidationError(
            f"{key} must be a UUID", details=[{"message": "Invalid UUID", "key": key, "source": source}]
        ) from None


class UnauthorizedError(AppError):
    status_code = 401
    code = "unauthorized"
    default_message = "Authentication required"


class InsufficientBalanceError(AppError):
    status_code = 402
    code = "insufficient_balance"
    default_message = "Insufficient balance"


class SpendLimitError(AppError):
    """A reservation refused by a spending limit (billing): which one is the subclass; the
    details carry ``limit_nanos``, ``spent_nanos``, ``held_nanos`` and ``required_nanos``."""

    status_code = 402
    code = "spend_limit_exceeded"
    default_message = "Spending limit reached"


class DailyLimitError(SpendLimitError):
    code = "daily_limit_exceeded"
    default_message = "Daily spending limit reached"


class MonthlyLimitError(SpendLimitError):
    code = "monthly_limit_exceeded"
    default_message = "Monthly spending limit reached"


class SessionLimitError(SpendLimitError):
    code = "session_limit_exceeded"
    default_message = "Session spending limit reached"


class ForbiddenError(AppError):
    status_code = 403
    code = "forbidden"
    default_message = "Forbidden"


class ModelNotEntitledError(ForbiddenError):
    code = "model_not_entitled"
    default_message = "User Does Not Have Model Access"


class NotFoundError(AppError):
    status_code = 404
    code = "not_found"
    default_message = "Not found"


class ConflictError(AppError):
    status_code = 409
    code = "conflict"
    default_message = "Conflict"


class StaleTurnError(ConflictError):
    """A fenced append whose ``expected_entry_count`` no longer matches the session: another
    turn was stored first, so this one is refused and nothing is written."""

    code = "stale_turn"
    default_message = "the session changed since the turn read it"


class PayloadTooLargeError(AppError):
    status_code = 413
    code = "payload_too_large"
    default_message = "Payload too large"


class UnsupportedMediaTypeError(AppError):
    status_code = 415
    code = "unsupported_media_type"
    default_message = "Unsupported file type"


class QuotaExceededError(AppError):
    status_code = 413
    code = "quota_exceeded"
    default_message = "Storage quota exceeded"


class TooManyRequestsError(AppError):
    status_code = 429
    code = "rate_limited"
    default_message = "Too many requests"


class UpstreamError(AppError):
    status_code = 502
    code = "upstream_error"
    default_message = "A downstream service failed"


class ServiceUnavailableError(AppError):
    status_code = 503
    code = "unavailable"
    default_message = "Service unavailable"


class OutcomeUnknownError(ServiceUnavailableError):
    """The request went out but no answer came back (a timeout, or the connection cut after
    sending): the call may or may not have been applied. Raised by the internal client so a
    caller can look the outcome up (by its turn id or idempotency key) before acting on it."""

    code = "outcome_unknown"
    default_message = "The call's outcome is unknown"


def _all_subclasses(cls: type[AppError]) -> list[type[AppError]]:
    found: list[type[AppError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def error_class_for(code: str, status: int) -> type[AppError]:
    """The exception class an error reply stands for (by code, else by status)."""
    classes: list[type[AppError]] = [AppError, *_all_subclasses(AppError)]
    for cls in classes:
        if cls.code == code:
            return cls
    for cls in classes:
        if cls.status_code == status:
            return cls
    return UpstreamError if status >= 500 else BadRequestError


def app_error_handler(_: Request[Any, Any, Any], exc: AppError) -> Response[Any]:
    if exc.status_code >= 500:
        logger.error("request failed: %s", exc.message)
    return Response(content=exc.to_body(), status_code=exc.status_code)


def http_exception_handler(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if isinstance(exc, ValidationException):
        body = {"error": {"code": "validation_error", "message": _validation_message(exc), "details": exc.extra}}
        return Response(content=body, status_code=400)
    code = {
        400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
        405: "method_not_allowed", 413: "payload_too_large", 429: "rate_limited",
    }.get(
        exc.status_code, "http_error"
    )
    return Response(content={"error": {"code": code, "message": exc.detail}}, status_code=exc.status_code)


def _validation_message(exc: ValidationException) -> str:
    """A malformed UUID parameter reads as ``parse_uuid`` says it, whichever of them refused it."""
    extra = exc.extra
    if isinstance(extra, list) and len(extra) == 1 and isinstance(extra[0], dict):
        problem = extra[0]
        if problem.get("message") == "Invalid UUID" and isinstance(problem.get("key"), str):
            return f"{problem['key']} must be a UUID"
    return exc.detail


# A dependency that is down or restarting: the request may simply be sent again (503, which
# the internal client retries). Services add their own kinds (the object store's errors).
_UNAVAILABLE: list[type[BaseException]] = [ConnectionError, asyncio.TimeoutError]

# What a driver's own errors stand for, added by the module that loads the driver
# (chat_common.db for PostgreSQL), so a service without a database loads no database driver.
Classifier = Callable[[BaseException], "AppError | None"]
_CLASSIFIERS: list[Classifier] = []


def register_unavailable(*kinds: type[BaseException]) -> None:
    """Errors of these kinds (anywhere in the cause chain) are answered 503, not 500."""
    _UNAVAILABLE.extend(kind for kind in kinds if kind not in _UNAVAILABLE)


def register_classifier(classify: Classifier) -> None:
    """``classify(cause)`` names the client-facing error of one exception of the cause chain,
    or None when it does not know it. Asked first, for each cause in turn."""
    if classify not in _CLASSIFIERS:
        _CLASSIFIERS.append(classify)


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def classify_unexpected(exc: BaseException) -> AppError | None:
    """The client-facing error an unexpected exception stands for, or None for a real bug.

    Input is validated before it reaches the database; this is the net under that, so a value
    the checks missed is still a client error and an outage is a 503, never a traceback."""
    chain = _causes(exc)
    for classify in _CLASSIFIERS:
        for cause in chain:
            known = classify(cause)
            if known is not None:
                return known
    for cause in chain:
        if isinstance(cause, tuple(_UNAVAILABLE)):
            return ServiceUnavailableError("a dependency is unavailable; retry the request")
        # msgspec raises UnicodeDecodeError (not a DecodeError) for a body that is not UTF-8.
        if isinstance(cause, UnicodeDecodeError):
            return BadRequestError("request body is not valid UTF-8")
    return None


def unhandled_exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    known = classify_unexpected(exc)
    if known is not None:
        logger.warning("request failed: %s (%s)", known.message, type(exc).__name__)
        return Response(content=known.to_body(), status_code=known.status_code)
    logger.exception("unhandled error", exc_info=exc)
    return Response(content=AppError().to_body(), status_code=500)


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    AppError: app_error_handler,
    HTTPException: http_exception_handler,
    Exception: unhandled_exception_handler,
}
