"""Input types and converters shared by every billing endpoint: bounded strings, ids, and money.

Bounds are chosen so that no accepted input can overflow a PostgreSQL bigint or integer column:
a bad value is refused here with a 400 rather than failing in the database.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

import msgspec

from chat_common import errors
from chat_common.errors import BadRequestError
from chat_common.money import NANOS_PER_DOLLAR, dollars_to_nanos

# No control characters: they break logs and PostgreSQL refuses NUL in text.
_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"

MAX_MONEY_NANOS = 10**18  # one billion dollars; twice that still fits a bigint with room to spare
MAX_PRICE_NANOS_PER_1K = 10**12  # a thousand dollars per 1K tokens
MAX_TOKENS = 100_000_000
MAX_MODEL_ID = 2**31 - 1
MAX_TTL_SECONDS = 86_400

IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=_PRINTABLE)]
Username = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=_PRINTABLE)]
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=_PRINTABLE)]
ProviderName = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=_PRINTABLE)]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=500, pattern=_PRINTABLE)]
TurnId = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=_PRINTABLE)]
SessionId = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=_PRINTABLE)]
ModelId = Annotated[int, msgspec.Meta(ge=0, le=MAX_MODEL_ID)]
ModelIdList = Annotated[list[ModelId], msgspec.Meta(max_length=1000)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
PositiveNanos = Annotated[int, msgspec.Meta(gt=0, le=MAX_MONEY_NANOS)]
NonNegativeNanos = Annotated[int, msgspec.Meta(ge=0, le=MAX_MONEY_NANOS)]
PriceNanos = Annotated[int, msgspec.Meta(ge=0, le=MAX_PRICE_NANOS_PER_1K)]
TtlSeconds = Annotated[int, msgspec.Meta(ge=1, le=MAX_TTL_SECONDS)]
ContextLength = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)]


def parse_model_id(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or len(raw) > 10 or int(raw) > MAX_MODEL_ID:
        raise errors.ValidationError(
            f"model_id must be an integer from 0 to {MAX_MODEL_ID}",
            details=[{"message": "Invalid model id", "key": "model_id", "source": "path"}],
        )
    return int(raw)


def dollars_to_exact_nanos(value: Decimal, name: str, *, maximum: int = MAX_MONEY_NANOS) -> int:
    """Dollars as given (a Decimal from the JSON text, never a float) to nano-dollars, refusing
    what cannot be represented exactly rather than rounding someone's money."""
    if not value.is_finite():
        raise BadRequestError(f"{name} must be a finite number", details={"field": name})
    if value < 0:
        raise BadRequestError(f"{name} must not be negative", details={"field": name})
    if value > Decimal(maximum) / NANOS_PER_DOLLAR:
        raise BadRequestError(
            f"{name} must be at most {Decimal(maximum) / NANOS_PER_DOLLAR} dollars", details={"field": name}
        )
    nanos = dollars_to_nanos(value)
    if Decimal(nanos) / NANOS_PER_DOLLAR != value:
        raise BadRequestError(f"{name} has more than 9 decimal places", details={"field": name})
    return nanos


def money_in_nanos(
    dollars: Decimal | None,
    nanos: int | None,
    dollars_name: str,
    nanos_name: str,
    *,
    required: bool,
    positive: bool,
    maximum: int = MAX_MONEY_NANOS,
) -> int | None:
    """The one amount given either in dollars or in nano-dollars (never both)."""
    if dollars is not None and nanos is not None:
        raise BadRequestError(f"give either {dollars_name} or {nanos_name}, not both")
    if dollars is None and nanos is None:
        if required:
            raise BadRequestError(f"{dollars_name} (dollars) or {nanos_name} (integer nano-dollars) is required")
        return None
    amount = dollars_to_exact_nanos(dollars, dollars_name, maximum=maximum) if dollars is not None else nanos
    assert amount is not None
    if positive and amount <= 0:
        raise BadRequestError(f"{dollars_name} must be greater than zero", details={"field": dollars_name})
    return amount


def reject_nul_characters(value: Any, name: str) -> None:
    """PostgreSQL cannot store NUL in text or jsonb; free-form JSON is checked before it gets there."""
    if isinstance(value, str):
        if "\x00" in value:
            raise BadRequestError(f"{name} must not contain NUL characters", details={"field": name})
    elif isinstance(value, dict):
        for key, item in value.items():
            reject_nul_characters(key, name)
            reject_nul_characters(item, name)
    elif isinstance(value, list):
        for item in value:
            reject_nul_characters(item, name)
