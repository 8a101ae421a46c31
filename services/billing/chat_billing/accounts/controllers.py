from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from chat_billing.accounts.schemas import (
    AmountRequest,
    BalanceReply,
    LedgerEntryReply,
    LedgerPage,
)
from chat_billing.accounts.services import AccountService
from chat_common.errors import parse_uuid

Accounts = NamedDependency[AccountService]


class AccountController(Controller):
    path = "/v1/users/{user_id:str}"
    tags = ["accounts"]

    @get("/balance")
    async def balance(self, user_id: FromPath[str], accounts: Accounts) -> BalanceReply:
        return await accounts.balance(parse_uuid(user_id, "user_id"))

    @post("/credit", status_code=200)
    async def credit(
        self, user_id: FromPath[str], data: JSONBody[AmountRequest], accounts: Accounts
    ) -> LedgerEntryReply:
        """Add money: ``amount`` in dollars or ``amount_nanos``; replies with the ledger entry."""
        return await accounts.credit(parse_uuid(user_id, "user_id"), data)

    @post("/debit", status_code=200)
    async def debit(
        self, user_id: FromPath[str], data: JSONBody[AmountRequest], accounts: Accounts
    ) -> LedgerEntryReply:
        """Take money; 402 when the balance does not cover it."""
        return await accounts.debit(parse_uuid(user_id, "user_id"), data)

    @get("/ledger")
    async def ledger(
        self,
        user_id: FromPath[str],
        accounts: Accounts,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
        offset: Annotated[int, QueryParameter(ge=0, le=10**12)] = 0,
    ) -> LedgerPage:
        """Newest first."""
        return await accounts.ledger(parse_uuid(user_id, "user_id"), limit, offset)
