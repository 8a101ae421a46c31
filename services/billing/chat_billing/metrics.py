"""Prometheus figures of the money path, served on /metrics by the service plugin."""
from prometheus_client import Counter

LEDGER_OPERATIONS = Counter(
    "billing_ledger_operations_total", "Ledger rows written, by kind", ["kind"]
)
RESERVATION_FAILURES = Counter(
    "billing_reservation_failures_total",
    "Reservations refused, by reason (the error code: insufficient_balance, model_not_entitled,"
    " daily_limit_exceeded, monthly_limit_exceeded, session_limit_exceeded, not_found, ...)",
    ["reason"],
)
# What charges took from balances (the ledger's charged_nanos), and what they could not.
SPENT_NANOS = Counter(
    "billing_spent_nanos_total", "Nano-dollars taken by charges, by kind (turn: a settle, summary: a fold)",
    ["kind"],
)
# Balance-aware reserves made smaller than asked (migration 0006), instead of a refusal.
SMALLER_RESERVATIONS = Counter(
    "billing_reservations_smaller_total",
    "Balance-aware reservations made smaller than asked, where the balance or a limit would have refused them",
)
SHORTFALL_NANOS = Counter(
    "billing_shortfall_nanos_total", "Nano-dollars charges could not take (the balance ran out), by kind",
    ["kind"],
)


def count_charge(kind: str, charged_nanos: int, shortfall_nanos: int) -> None:
    """A charge applied just now (not a repeat answered with its first outcome)."""
    if charged_nanos:
        SPENT_NANOS.labels(kind).inc(charged_nanos)
    if shortfall_nanos:
        SHORTFALL_NANOS.labels(kind).inc(shortfall_nanos)
