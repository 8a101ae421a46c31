"""``PUT /v1/users/{id}/balance-aware`` ``{"enabled": true | false | null}`` (null: no setting of
the user's own, the model's counts) and ``PUT /v1/models/{id}/balance-aware`` ``{"enabled": bool}``."""
from __future__ import annotations

from datetime import datetime

import msgspec


class UserSetting(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool | None


class ModelSetting(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool


class ModelView(msgspec.Struct, kw_only=True):
    """One model: ``enabled`` is the model's own setting; for a user, ``balance_aware`` is what
    that user's turns on it get (the user's setting, else the model's)."""

    model_id: int
    name: str
    enabled: bool | None = None
    balance_aware: bool | None = None
    updated_at: datetime | None = None


class UserReply(msgspec.Struct, kw_only=True):
    user_id: str
    # the user's own setting: true on, false off (whatever the model says), null: as the model
    enabled: bool | None
    updated_at: datetime | None
    # the models the user is entitled to, with the effective setting of each
    models: list[ModelView]
