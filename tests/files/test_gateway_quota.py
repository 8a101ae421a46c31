"""The per-user storage quota through the gateway, on a gateway and files service of their
own with a small quota (3 MB; files up to 2 MB)."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest

from chat_common.db import plain_dsn
from devstack.servers import ServiceProcess
from devstack.stack import Stack

from .conftest import png
from .gateway_helpers import CONTENT_TYPE, body, form_fields, start_pair, stop_pair

MB = 1024 * 1024
TAG = "quota"


@pytest.fixture(scope="module")
def pair(system: Stack) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    yield start_pair(system, TAG, {"MAX_FILE_SIZE": "2", "USER_STORAGE_QUOTA_MB": "3"})
    stop_pair(system, TAG)


@pytest.fixture(scope="module")
async def gateway(pair: tuple[ServiceProcess, ServiceProcess]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=pair[0].url, timeout=60) as client:
        yield client


async def count(db: asyncpg.Connection, sql: str, *args: object) -> int:
    return await db.fetchval(sql, *args)


async def test_quota_through_the_gateway(system: Stack, gateway: httpx.AsyncClient, service_token: str) -> None:
    user = system.create_user("Quota")
    db = await asyncpg.connect(plain_dsn(system.infra.database_url))
    try:
        first = await gateway.post(
            "/upload", content=body(form_fields(user), "a.png", png(2 * MB)), headers={"content-type": CONTENT_TYPE}
        )
        assert first.status_code == 202, first.text
        mine_or_ownerless = "SELECT count(*) FROM files.files WHERE user_id = $1::uuid OR user_id IS NULL"
        rows = await count(db, mine_or_ownerless, user)
        sessions = await count(db, "SELECT count(*) FROM sessions.sessions WHERE user_id = $1::uuid", user)

        # fields first: the files service knows the owner and stops the stream at the quota
        response = await gateway.post(
            "/upload", content=body(form_fields(user), "b.png", png(int(1.5 * MB))),
            headers={"content-type": CONTENT_TYPE},
        )
        assert response.status_code == 413, response.text
        assert "quota" in response.json()["message"] and response.json()["data"] is None

        # file first: stored without an owner, refused when it is given one; nothing is left,
        # neither the file nor the "NEW" session made for it
        response = await gateway.post(
            "/upload", content=body(form_fields(user), "c.png", png(int(1.5 * MB)), file_first=True),
            headers={"content-type": CONTENT_TYPE},
        )
        assert response.status_code == 413, response.text
        assert "quota" in response.json()["message"]
        assert await count(db, mine_or_ownerless, user) == rows
        assert await count(db, "SELECT count(*) FROM sessions.sessions WHERE user_id = $1::uuid", user) == sessions

        # what still fits goes in
        fits = await gateway.post(
            "/upload", content=body(form_fields(user), "d.png", png(MB // 2)), headers={"content-type": CONTENT_TYPE}
        )
        assert fits.status_code == 202, fits.text
    finally:
        await db.close()
