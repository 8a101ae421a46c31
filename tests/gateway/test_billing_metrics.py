"""Billing's /metrics: spend (what charges took) and reservation refusals by reason (issue 14)."""
from __future__ import annotations

from devstack.stack import Stack

from .conftest import assert_error, assert_ok, connect, new_user
from .test_metrics import scrape, value


async def test_spend_and_refusals_by_reason_move(stack: Stack) -> None:
    billing = stack.url("billing")
    before = scrape(billing)
    user = new_user(stack, balance=2.0)
    async with connect(stack.ws_url) as client:
        session = assert_ok(await client.chat(user, "NEW", "spend a little"), 3)["session_id"]
        stack.admin("PUT", f"/v1/users/{user}/limits", {"daily": 0.001})
        assert_error(await client.chat(user, session, "past the limit"), 109, 3)
        stack.admin("PUT", f"/v1/users/{user}/limits", {"daily": None, "per_session": 0.001})
        assert_error(await client.chat(user, session, "past the session's"), 111, 3)
    after = scrape(billing)
    charged = sum(r["charged_nanos"] for r in stack.admin("GET", f"/v1/users/{user}/ledger")["items"]
                  if r["kind"] == "settle")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("billing_spent_nanos_total", kind="turn") >= charged > 0
    assert moved("billing_reservation_failures_total", reason="daily_limit_exceeded") >= 1
    assert moved("billing_reservation_failures_total", reason="session_limit_exceeded") >= 1
