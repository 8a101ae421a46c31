"""Money in exact integer units: nano-dollars (1e-9 $). Every catalogue price per 1,000 tokens
is a whole number of nano-dollars per token, so a turn's cost is exact; only the protocol's
display of a balance is a float of dollars."""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

NANOS_PER_DOLLAR = 1_000_000_000


def dollars_to_nanos(amount: float | int | str | Decimal) -> int:
    """Exact for any decimal written with up to nine places (floats go through their repr)."""
    try:
        value = Decimal(str(amount)) if not isinstance(amount, Decimal) else amount
    except InvalidOperation as exc:
        raise ValueError(f"not an amount of dollars: {amount!r}") from exc
    if not value.is_finite():
        raise ValueError(f"not an amount of dollars: {amount!r}")
    return int((value * NANOS_PER_DOLLAR).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def nanos_to_dollars(nanos: int) -> float:
    return float(Decimal(nanos) / NANOS_PER_DOLLAR)


def token_cost_nanos(
    input_tokens: int, output_tokens: int, input_price_nanos_per_1k: int, output_price_nanos_per_1k: int
) -> int:
    """Cost of a call, rounded up to the next nano-dollar."""
    numerator = input_tokens * input_price_nanos_per_1k + output_tokens * output_price_nanos_per_1k
    return -(-numerator // 1000)
