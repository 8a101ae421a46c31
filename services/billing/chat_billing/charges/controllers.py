from __future__ import annotations

from litestar import Controller, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from chat_billing.charges.schemas import ChargeBatchIn
from chat_billing.charges.services import ChargeService
from chat_common.contracts import ChargeBatchResult

Charges = NamedDependency[ChargeService]


class ChargeController(Controller):
    path = "/v1/charges"
    tags = ["charges"]

    # 500 items at their longest bounds stay under this; the app-wide limit is 64 KiB.
    @post("/", status_code=200, request_max_body_size=1024 * 1024)
    async def charge(self, data: JSONBody[ChargeBatchIn], charges: Charges) -> ChargeBatchResult:
        """Apply owed charges (up to 500), each exactly once per key: ``turn`` settles its
        reservation, ``summary`` is a debit of its own. One result per item, in order:
        ``charged``, ``already`` (applied before) or ``refused`` (with a message)."""
        return await charges.apply(data)
