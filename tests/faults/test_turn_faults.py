"""Chat turns under load while one part of the system is SIGKILLed and started again (or Redis is
flushed ten times): no acknowledged turn is lost, none is stored twice, every stored turn is
charged exactly once, balances equal their ledgers, each stored turn saw the turn stored before
it, a session whose gateway died takes a turn again within 15 s, and money held for a turn that
died is back within 60 s.

Each scenario: 20 WebSocket clients (12 on sessions of their own, 4 pairs sharing one) make
type-3 turns with unique messages back to back; after half a second the part is killed and
started again on the same port (PostgreSQL on the same data directory, Redis empty), the load
goes on 1.5 s more and stops; then a bounded wait for recovery (no open reservation of
the scenario's users, empty sessions outbox) and the checks. Figures are printed (``-s``) and
every failed check is listed in the assertion message.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from devstack.stack import Stack

from .fault_support import Load, ensure_running, report, verify, wait_for_recovery

LOAD_BEFORE_SECONDS = 0.5  # load before the fault
DOWN_SECONDS = 0.5  # how long a killed part stays dead before it is started again
LOAD_AFTER_SECONDS = 1.5  # load after the part is back
SESSION_RESUME_BOUND = 15.0  # a session whose gateway died takes a turn within this, from the kill
HOLD_RELEASE_BOUND = 60.0  # money held for a dead turn is back within this, from the fault
FLUSHES = 10
FLUSH_GAP_SECONDS = 0.3

SCENARIOS = ["gateway", "sessions", "billing", "redis", "ai", "postgres", "redis-flushall"]


async def inject(stack: Stack, scenario: str) -> float:
    """The fault; returns when it began (monotonic) once the part is running again."""
    if scenario == "redis-flushall":
        import redis.asyncio as redis

        client = redis.from_url(stack.infra.redis_url)
        began = time.monotonic()
        try:
            for _ in range(FLUSHES):
                await client.flushall()
                await asyncio.sleep(FLUSH_GAP_SECONDS)
        finally:
            await client.aclose()
        return began
    began = time.monotonic()
    killed = await asyncio.to_thread(stack.kill_part, scenario)
    assert killed, f"{scenario} was not running"
    await asyncio.sleep(DOWN_SECONDS)
    await asyncio.to_thread(stack.restart_part, scenario)
    print(f"{scenario}: killed {len(killed)} process(es), back after {time.monotonic() - began:.1f} s")
    return began


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_turns_survive_a_fault(fault_stack: Stack, scenario: str) -> None:
    stack = fault_stack
    await asyncio.to_thread(ensure_running, stack)
    load = Load(stack, scenario.replace("-", ""))
    await load.setup()
    load.start()
    try:
        await asyncio.sleep(LOAD_BEFORE_SECONDS)
        fault_at = await inject(stack, scenario)
        back_at = time.monotonic()
        await asyncio.sleep(LOAD_AFTER_SECONDS)
    finally:
        await load.finish()  # no client outlives its scenario, whatever happened

    figures: dict[str, object] = {}
    failures: list[str] = []
    # every session takes a turn again; for the gateway's death that is bounded from the kill
    bound = SESSION_RESUME_BOUND if scenario == "gateway" else 30.0
    resumed: list[float] = []
    stuck = []
    for session in load.sessions:
        after = [t for t in session.successes if t > fault_at]
        first = after[0] if after else await load.turn_until_success(session, fault_at + bound)
        if first is None:
            stuck.append(session.session_id)
        else:
            resumed.append(first - fault_at)
    figures["sessions_resumed"] = f"{len(resumed)}/{len(load.sessions)}"
    figures["slowest_resume_after_fault_s"] = round(max(resumed), 1) if resumed else None
    if stuck:
        failures.append(f"{len(stuck)} session(s) took no turn within {bound:.0f} s of the fault")
    figures["acked_after_restart"] = sum(1 for a in load.acks if a.at > back_at)
    if not figures["acked_after_restart"]:
        failures.append("no turn was acknowledged after the part came back")

    recovery = await wait_for_recovery(stack, load, fault_at, fault_at + HOLD_RELEASE_BOUND)
    figures.update(recovery)
    if recovery["holds_clear_after_s"] is None:
        failures.append(f"not recovered {HOLD_RELEASE_BOUND:.0f} s after the fault: "
                        f"{recovery['open_reservations']} reservation(s) open, outbox {recovery['outbox']}")

    figures.update(await verify(stack, load))
    print(report(scenario, figures, load.errors))
    for key, what in [
        ("lost", "acknowledged turn(s) not stored"),
        ("duplicated", "user message(s) stored twice"),
        ("uncharged", "stored turn(s) without a settle"),
        ("double_charged", "stored turn(s) settled more than once"),
        ("charged_not_stored", "settle(s) of a turn never stored"),
        ("ledger_mismatch_users", "user(s) whose ledger does not sum to the balance"),
        ("wrong_history", "stored turn(s) that did not see the turn stored before them"),
        ("unpaired_entries", "entries not in a user+assistant pair of one turn"),
        ("replies_to_another_message", "success replies that answer another message"),
        ("extra_sessions", "sessions nobody asked for"),
    ]:
        value = figures[key]
        count = len(value) if isinstance(value, list) else value
        if count:
            sample = f" (e.g. {value[:2]})" if isinstance(value, list) else ""
            failures.append(f"{count} {what}{sample}")
    if figures["negative_balances"]:
        failures.append(f"{figures['negative_balances']} negative balance(s)")
    assert not failures, f"{scenario}: " + "; ".join(failures)
