"""``chat-admin``: the billing admin API from a shell. Reads ``BILLING_URL`` and ``SERVICE_TOKEN``
from the environment and prints each reply as JSON.

    chat-admin create-user --username demo --models 4,5,8 --balance 1 [--user-id UUID]
    chat-admin top-up --user-id UUID --amount 2.50
    chat-admin ledger --user-id UUID --limit 20
    chat-admin set-limits --user-id UUID --daily 5 --monthly 50 --per-session 1
    chat-admin set-limits --user-id UUID --clear
    chat-admin limits --user-id UUID [--session-id S]
    chat-admin usage --user-id UUID [--session-id S] [--since ISO] [--until ISO] [--by day|session|model]
    chat-admin balance-aware --user-id UUID [on|off|default]   (or --model-id ID [on|off])
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import msgspec

from chat_billing.balance_aware import cli as balance_aware_cli
from chat_common.client import SEND_ONCE, ServiceClient
from chat_common.errors import AppError, BadRequestError
from chat_common.settings import env_str, service_url

# Dollars travel as JSON numbers written exactly as typed, never through a float.
_BODY = msgspec.json.Encoder(decimal_format="number")


def _dollars(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount of dollars: {text!r}") from None
    if not value.is_finite():
        raise argparse.ArgumentTypeError(f"not an amount of dollars: {text!r}")
    return value


def _model_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"model ids must be integers separated by commas: {text!r}") from None


def _user_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-admin", description="Administer billing: users, money, models.")
    parser.add_argument(
        "--url", default=None,
        help="base URL (default: BILLING_URL or http://127.0.0.1:8003; for export-user, import-user and "
        "erase-user GATEWAY_URL or http://127.0.0.1:8000)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create-user", help="create a user (again with the same --user-id: no change)")
    create.add_argument("--username", required=True)
    create.add_argument("--models", type=_model_ids, default=[], help="entitled model ids, e.g. 4,5,8")
    create.add_argument("--balance", type=_dollars, default=Decimal(0), help="starting balance in dollars")
    create.add_argument("--user-id", type=_user_id, help="a stable id (the UI's configured user, say)")
    create.add_argument("--idempotency-key")

    show = commands.add_parser("user", help="show a user")
    show.add_argument("--user-id", type=_user_id, required=True)

    for name, verb in (("grant", "entitle a user to models"), ("revoke", "take models away from a user")):
        change = commands.add_parser(name, help=verb)
        change.add_argument("--user-id", type=_user_id, required=True)
        change.add_argument("--models", type=_model_ids, required=True, help="model ids, e.g. 4,5")

    for name, verb in (("top-up", "credit dollars to a user"), ("debit", "take dollars from a user")):
        money = commands.add_parser(name, help=verb)
        money.add_argument("--user-id", type=_user_id, required=True)
        money.add_argument("--amount", type=_dollars, required=True, help="dollars")
        money.add_argument("--reason")
        money.add_argument("--idempotency-key", help="repeat a call safely (default: a new key)")

    balance = commands.add_parser("balance", help="show a user's balance")
    balance.add_argument("--user-id", type=_user_id, required=True)

    ledger = commands.add_parser("ledger", help="a user's ledger, newest first")
    ledger.add_argument("--user-id", type=_user_id, required=True)
    ledger.add_argument("--limit", type=int, default=50)
    ledger.add_argument("--offset", type=int, default=0)

    commands.add_parser("models", help="the model catalogue")

    set_limits = commands.add_parser(
        "set-limits",
        help="set spending limits in dollars (UTC day and month, per session); limits not named are kept",
        description="A type 3 whose reservation could take the user past a limit is refused before the AI "
        "is called (codes 109 daily, 110 monthly, 111 per session). Limits not named are kept; --clear "
        "removes every limit (with others named: removes the rest and sets those).",
    )
    set_limits.add_argument("--user-id", type=_user_id, required=True)
    set_limits.add_argument("--daily", type=_dollars, help="dollars per UTC calendar day")
    set_limits.add_argument("--monthly", type=_dollars, help="dollars per UTC calendar month")
    set_limits.add_argument("--per-session", type=_dollars, help="dollars per session")
    set_limits.add_argument("--clear", action="store_true", help="remove the user's limits")

    usage = commands.add_parser(
        "usage", help="turns, tokens and dollars spent, per group and in total (from the receipts)",
        description="Totals equal the ledger's charges exactly. --since is inclusive, --until exclusive.",
    )
    usage.add_argument("--user-id", type=_user_id, required=True)
    usage.add_argument("--session-id")
    usage.add_argument("--since", help="ISO 8601, e.g. 2026-12-01 or 2026-12-01T00:00:00Z")
    usage.add_argument("--until", help="ISO 8601")
    usage.add_argument("--by", choices=["day", "session", "model"])

    receipts = commands.add_parser("receipts", help="a receipt per charge, oldest first")
    receipts.add_argument("--user-id", type=_user_id, required=True)
    receipts.add_argument("--session-id")
    receipts.add_argument("--since")
    receipts.add_argument("--until")
    receipts.add_argument("--limit", type=int, default=100)

    limits = commands.add_parser("limits", help="a user's limits with what is spent and held in the current day and month")
    limits.add_argument("--user-id", type=_user_id, required=True)
    limits.add_argument("--session-id", help="also show what this session has spent and holds")

    export = commands.add_parser(
        "export-user", help="write one user's data to a file (JSON): user, sessions, files, ledger, receipts",
        description="Through the gateway (GATEWAY_URL): the billing user (name, models, balance, limits), every "
        "session with its prompt, summary and entries in order, every file's bytes (base64) and metadata, the "
        "ledger and the receipts, in one JSON file with a format version. The file holds personal data: it is "
        "written readable by its owner only.",
    )
    export.add_argument("--user-id", type=_user_id, required=True)
    export.add_argument("--out", type=Path, required=True, help="the file to write (replaced if it exists)")

    load = commands.add_parser(
        "import-user", help="restore a user from an export-user file (refused if the user exists)",
        description="Through the gateway (GATEWAY_URL). Types 0, 1, 2, 5 and 6 and file downloads then answer as "
        "on the system exported from. A user id this system already has is refused (exit 1).",
    )
    load.add_argument("file", type=Path, help="a file written by export-user")

    erase = commands.add_parser(
        "erase-user", help="erase a user everywhere; the ledger stays under a pseudonymous id",
        description="Through the gateway (GATEWAY_URL): removes the user's sessions, entries, summaries, receipts, "
        "limits, spend, reservations, files (objects and metadata), cached context and name; the ledger rows are "
        "kept under a pseudonymous id. Prints what was removed per store. Safe to repeat; a run cut short is "
        "finished by the next.",
    )
    erase.add_argument("--user-id", type=_user_id, required=True)

    set_model = commands.add_parser("set-model", help="create or replace a catalogue entry")
    set_model.add_argument("--model-id", type=int, required=True)
    set_model.add_argument("--name", required=True)
    set_model.add_argument("--provider", required=True)
    set_model.add_argument("--context-length", type=int, required=True)
    set_model.add_argument("--input-price", type=_dollars, required=True, help="dollars per 1K input tokens")
    set_model.add_argument("--output-price", type=_dollars, required=True, help="dollars per 1K output tokens")
    set_model.add_argument("--inactive", action="store_true", help="keep it out of users' model lists")
    balance_aware_cli.add_parser(commands, _user_id)
    return parser


async def run(args: argparse.Namespace, client: ServiceClient) -> Any:
    def new_key() -> str:
        return f"chat-admin:{uuid.uuid4()}"

    async def send(method: str, path: str, body: dict[str, Any]) -> Any:
        return await client.request(
            method, path, content=_BODY.encode(body), headers={"content-type": "application/json"}
        )

    command = args.command
    if command == balance_aware_cli.COMMAND:
        return await balance_aware_cli.run(args, client, send)
    if command == "create-user":
        body: dict[str, Any] = {
            "username": args.username,
            "models": args.models,
            "balance": args.balance,
            "idempotency_key": args.idempotency_key or new_key(),
        }
        if args.user_id:
            body["user_id"] = args.user_id
        return await send("POST", "/v1/users", body)
    if command == "user":
        return await client.get(f"/v1/users/{args.user_id}")
    if command in ("grant", "revoke"):
        return await send(
            "POST", f"/v1/users/{args.user_id}/models/{command}",
            {"model_ids": args.models, "idempotency_key": new_key()},
        )
    if command in ("top-up", "debit"):
        body = {"amount": args.amount, "idempotency_key": args.idempotency_key or new_key()}
        if args.reason:
            body["reason"] = args.reason
        return await send("POST", f"/v1/users/{args.user_id}/{'credit' if command == 'top-up' else 'debit'}", body)
    if command == "balance":
        return await client.get(f"/v1/users/{args.user_id}/balance")
    if command == "ledger":
        return await client.get(
            f"/v1/users/{args.user_id}/ledger", params={"limit": args.limit, "offset": args.offset}
        )
    if command == "models":
        return await client.get("/v1/models")
    if command == "set-limits":
        named = {
            key: value for key, value in
            (("daily", args.daily), ("monthly", args.monthly), ("per_session", args.per_session))
            if value is not None
        }
        if args.clear:
            reply = await client.request("DELETE", f"/v1/users/{args.user_id}/limits")
            if not named:
                return reply
        elif not named:
            raise BadRequestError("name a limit (--daily, --monthly, --per-session) or --clear")
        return await send("PUT", f"/v1/users/{args.user_id}/limits", named)
    if command in ("usage", "receipts"):
        params: dict[str, Any] | None = {
            key: value for key, value in (
                ("session_id", args.session_id), ("since", args.since), ("until", args.until),
                ("by", getattr(args, "by", None)), ("limit", getattr(args, "limit", None)),
            ) if value is not None
        }
        return await client.get(f"/v1/users/{args.user_id}/{command}", params=params)
    if command == "limits":
        params = {"session_id": args.session_id} if args.session_id else None
        return await client.get(f"/v1/users/{args.user_id}/limits", params=params)
    if command == "set-model":
        return await send(
            "PUT", f"/v1/models/{args.model_id}",
            {
                "name": args.name,
                "provider": args.provider,
                "context_length": args.context_length,
                "input_price_per_1k": args.input_price,
                "output_price_per_1k": args.output_price,
                "active": not args.inactive,
            },
        )
    raise AssertionError(f"unhandled command {command}")  # argparse allows only the ones above


GATEWAY_COMMANDS = ("export-user", "import-user", "erase-user")


def _write_private(path: Path, payload: bytes) -> None:
    """Whole or not at all: a temporary file beside it, then renamed over it."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


async def run_gateway(args: argparse.Namespace, client: ServiceClient) -> Any:
    if args.command == "export-user":
        document = await client.get(f"/v1/admin/users/{args.user_id}/export")
        payload = msgspec.json.encode(document)
        _write_private(args.out, payload)
        sessions = document.get("sessions") or []
        billing = document.get("billing") or {}
        return {
            "user_id": document.get("user_id"),
            "out": str(args.out),
            "format": document.get("format"),
            "version": document.get("version"),
            "bytes": len(payload),
            "sessions": len(sessions),
            "entries": sum(len(s.get("entries") or []) for s in sessions),
            "files": len(document.get("files") or []),
            "ledger": len(billing.get("ledger") or []),
            "receipts": len(billing.get("receipts") or []),
        }
    if args.command == "import-user":
        payload = args.file.read_bytes()
        return await client.request(
            "POST", "/v1/admin/users/import", content=payload, headers={"content-type": "application/json"},
            retry=SEND_ONCE,  # a repeat after a lost reply would read "user already exists"
        )
    return await client.request("POST", f"/v1/admin/users/{args.user_id}/erase")


def _print_json(value: Any, stream: Any) -> None:
    stream.write(msgspec.json.format(msgspec.json.encode(value), indent=2).decode() + "\n")


def _print_error(body: Any) -> None:
    """One line on stderr: the error body as compact JSON."""
    sys.stderr.write(msgspec.json.encode(body).decode() + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = env_str("SERVICE_TOKEN")
    if not token:
        _print_error({"error": {"code": "unauthorized", "message": "SERVICE_TOKEN is not set"}})
        return 2
    on_gateway = args.command in GATEWAY_COMMANDS
    if on_gateway:
        base_url = args.url or env_str("GATEWAY_URL", "http://127.0.0.1:8000").rstrip("/")
    else:
        base_url = args.url or service_url("billing", 8003)

    async def call() -> Any:
        if on_gateway:
            # an export or erase of a long history takes a while; none of these is retried blindly
            client = ServiceClient("gateway", base_url, token, timeout=600.0)
        else:
            client = ServiceClient("billing", base_url, token)
        try:
            return await (run_gateway(args, client) if on_gateway else run(args, client))
        finally:
            await client.aclose()

    try:
        reply = asyncio.run(call())
    except AppError as error:
        _print_error(error.to_body())
        return 1
    except OSError as error:  # the export or import file
        _print_error({"error": {"code": "file_error", "message": f"{error.strerror or error}: {error.filename}"}})
        return 1
    _print_json(reply, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
