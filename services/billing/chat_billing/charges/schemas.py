"""``POST /v1/charges``: the body is ``chat_common.contracts.ChargeBatch`` (same field names)
with billing's bounds; the reply is ``chat_common.contracts.ChargeBatchResult``."""
from __future__ import annotations

from typing import Annotated

import msgspec

from chat_billing.inputs import ModelName, NonNegativeNanos, TurnId
from chat_billing.reservations.schemas import ReceiptIn
from chat_common.contracts import ChargeKind

MAX_CHARGES_PER_BATCH = 500

_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
ChargeKey = Annotated[str, msgspec.Meta(min_length=1, max_length=300, pattern=_PRINTABLE)]
# Ids are checked per item (a malformed one refuses that item, not the batch).
IdText = Annotated[str, msgspec.Meta(max_length=100)]


class ChargeIn(msgspec.Struct, forbid_unknown_fields=True):
    key: ChargeKey
    kind: ChargeKind
    user_id: IdText
    session_id: IdText
    turn_id: TurnId
    cost_nanos: NonNegativeNanos
    reservation_id: IdText | None = None
    model_name: ModelName | None = None
    receipt: ReceiptIn | None = None


class ChargeBatchIn(msgspec.Struct, forbid_unknown_fields=True):
    items: Annotated[list[ChargeIn], msgspec.Meta(max_length=MAX_CHARGES_PER_BATCH)]
