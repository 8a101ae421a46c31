"""Prometheus figures of the money path, served on /metrics by the service plugin."""
from prometheus_client import Counter

LEDGER_OPERATIONS = Counter(
    "billing_ledger_operations_total", "Ledger rows written, by kind", ["kind"]
)
RESERVATION_FAILURES = Counter(
    "billing_reservation_failures_total", "Reservations refused, by reason", ["reason"]
)
