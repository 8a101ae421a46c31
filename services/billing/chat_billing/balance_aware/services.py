"""Turn balance-aware turns on or off for a user or a model; one statement each."""
from __future__ import annotations

import uuid

from chat_billing.accounts.services import UserNotFound
from chat_billing.balance_aware.schemas import ModelView, UserReply
from chat_billing.pg import Pg
from chat_common.errors import NotFoundError

USER_SET = (
    "INSERT INTO balance_aware_users AS b (user_id, enabled) SELECT u.id, $2 FROM users u WHERE u.id = $1"
    " ON CONFLICT (user_id) DO UPDATE SET enabled = EXCLUDED.enabled, updated_at = now()"
    " RETURNING user_id"
)
USER_CLEAR = (
    "WITH gone AS (DELETE FROM balance_aware_users WHERE user_id = $1)"
    " SELECT true FROM users WHERE id = $1"
)
# One row per entitled model (one row of NULL model when none); no row: no such user.
USER_SHOW = (
    "SELECT b.enabled, b.updated_at, m.id AS model_id, m.name, balance_aware(u.id, m.id) AS effective"
    " FROM users u LEFT JOIN balance_aware_users b ON b.user_id = u.id"
    " LEFT JOIN entitlements e ON e.user_id = u.id LEFT JOIN models m ON m.id = e.model_id"
    " WHERE u.id = $1 ORDER BY m.id"
)
MODEL_SET = (
    "INSERT INTO balance_aware_models AS b (model_id, enabled) SELECT m.id, $2 FROM models m WHERE m.id = $1"
    " ON CONFLICT (model_id) DO UPDATE SET enabled = EXCLUDED.enabled, updated_at = now()"
    " RETURNING model_id"
)
MODEL_SHOW = (
    "SELECT m.id, m.name, coalesce(b.enabled, false) AS enabled, b.updated_at"
    " FROM models m LEFT JOIN balance_aware_models b ON b.model_id = m.id WHERE m.id = $1"
)


class ModelNotFound(NotFoundError):
    default_message = "model not found"


class BalanceAwareService:
    def __init__(self, pg: Pg) -> None:
        self.pg = pg

    async def set_user(self, user_id: uuid.UUID, enabled: bool | None) -> UserReply:
        if enabled is None:
            found = await self.pg.pool.fetchval(USER_CLEAR, user_id)
        else:
            found = await self.pg.pool.fetchval(USER_SET, user_id, enabled)
        if found is None:
            raise UserNotFound()
        return await self.show_user(user_id)

    async def show_user(self, user_id: uuid.UUID) -> UserReply:
        rows = await self.pg.pool.fetch(USER_SHOW, user_id)
        if not rows:
            raise UserNotFound()
        return UserReply(
            user_id=str(user_id),
            enabled=rows[0]["enabled"],
            updated_at=rows[0]["updated_at"],
            models=[
                ModelView(model_id=row["model_id"], name=row["name"], balance_aware=row["effective"])
                for row in rows if row["model_id"] is not None
            ],
        )

    async def set_model(self, model_id: int, enabled: bool) -> ModelView:
        if await self.pg.pool.fetchval(MODEL_SET, model_id, enabled) is None:
            raise ModelNotFound()
        return await self.show_model(model_id)

    async def show_model(self, model_id: int) -> ModelView:
        row = await self.pg.pool.fetchrow(MODEL_SHOW, model_id)
        if row is None:
            raise ModelNotFound()
        return ModelView(model_id=row["id"], name=row["name"], enabled=row["enabled"], updated_at=row["updated_at"])
