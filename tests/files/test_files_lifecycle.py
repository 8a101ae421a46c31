"""Ownership, attach/used, deletes, the sweep, the quota, presigned URLs, the service token and
bad input, on the files service in-process (real PostgreSQL, real S3)."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import Any, cast
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from chat_files.settings import FilesSettings

from .conftest import Objects, new_id, png, running_app, text

MB = 1024 * 1024


async def put_file(client: httpx.AsyncClient, user: str | None, data: bytes = b"hello world", name: str = "a.txt",
                   session: str | None = None) -> dict:
    params = {"original_name": name}
    if user is not None:
        params["user_id"] = user
    if session is not None:
        params["session_id"] = session
    response = await client.post("/v1/uploads", params=params, content=data)
    assert response.status_code == 201, response.text
    return response.json()


# ------------------------------------------------------------------------------------ ownership


async def test_another_user_sees_nothing_and_deletes_nothing(
    client: httpx.AsyncClient, objects: Objects, db: asyncpg.Connection
) -> None:
    owner, other = new_id(), new_id()
    session = new_id()
    stored = await put_file(client, owner, session=session)
    name = stored["file_name"]
    for path in (f"/v1/files/{name}", f"/v1/files/{name}/content", f"/v1/files/{name}/url"):
        response = await client.get(path, params={"user_id": other})
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert (await client.delete(f"/v1/files/{name}", params={"user_id": other})).status_code == 404
    assert (await client.delete(f"/v1/sessions/{session}/files", params={"user_id": other})).json() == {"deleted": 0}
    listed = await client.get(f"/v1/sessions/{session}/files", params={"user_id": other})
    assert listed.json() == {"items": []}
    attach = await client.post(f"/v1/files/{name}/attach", json={"user_id": other, "session_id": new_id()})
    assert attach.status_code == 404
    used = await client.post(f"/v1/files/{name}/used", json={"user_id": other, "session_id": session, "turn_id": "t"})
    assert used.status_code == 404
    # untouched
    assert f"uploads/{name}" in objects.keys()
    row = await db.fetchrow("SELECT user_id, session_id, status FROM files WHERE file_name = $1", name)
    assert str(row["user_id"]) == owner and str(row["session_id"]) == session and row["status"] == "attached"
    assert (await client.get(f"/v1/files/{name}/content", params={"user_id": owner})).content == b"hello world"


async def test_reads_by_name_alone_need_an_explicit_capability_flag(client: httpx.AsyncClient) -> None:
    stored = await put_file(client, new_id())
    name = stored["file_name"]
    assert (await client.get(f"/v1/files/{name}/content")).status_code == 400
    response = await client.get(f"/v1/files/{name}/content", params={"any_owner": "true"})
    assert response.status_code == 200 and response.content == b"hello world"
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_an_ownerless_staged_upload_is_served_to_nobody_until_attached(client: httpx.AsyncClient) -> None:
    stored = await put_file(client, None)
    name = stored["file_name"]
    assert stored["user_id"] is None and stored["status"] == "staged"
    assert (await client.get(f"/v1/files/{name}/content", params={"any_owner": "true"})).status_code == 404
    owner, session = new_id(), new_id()
    attached = await client.post(f"/v1/files/{name}/attach", json={"user_id": owner, "session_id": session})
    assert attached.status_code == 200, attached.text
    assert attached.json()["user_id"] == owner and attached.json()["status"] == "attached"
    # now it is the owner's, and nobody else can claim it
    again = await client.post(f"/v1/files/{name}/attach", json={"user_id": new_id(), "session_id": session})
    assert again.status_code == 404
    assert (await client.get(f"/v1/files/{name}", params={"user_id": owner})).status_code == 200


# ------------------------------------------------------------------------------------ lifecycle


async def test_attach_then_used(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    owner, session = new_id(), new_id()
    name = (await put_file(client, owner))["file_name"]
    attached = await client.post(f"/v1/files/{name}/attach", json={"user_id": owner, "session_id": session})
    assert attached.json()["status"] == "attached" and attached.json()["session_id"] == session
    # idempotent
    again = await client.post(f"/v1/files/{name}/attach", json={"user_id": owner, "session_id": session})
    assert again.status_code == 200 and again.json()["status"] == "attached"
    elsewhere = await client.post(f"/v1/files/{name}/attach", json={"user_id": owner, "session_id": new_id()})
    assert elsewhere.status_code == 409
    wrong = await client.post(f"/v1/files/{name}/used", json={"user_id": owner, "session_id": new_id(), "turn_id": "t1"})
    assert wrong.status_code == 409
    used = await client.post(f"/v1/files/{name}/used", json={"user_id": owner, "session_id": session, "turn_id": "t1"})
    assert used.status_code == 200
    assert used.json()["status"] == "used" and used.json()["turn_id"] == "t1" and used.json()["used_at"]
    replay = await client.post(f"/v1/files/{name}/used", json={"user_id": owner, "session_id": session, "turn_id": "t2"})
    assert replay.json()["turn_id"] == "t1"
    listed = await client.get(f"/v1/sessions/{session}/files", params={"user_id": owner})
    assert [f["file_name"] for f in listed.json()["items"]] == [name]
    assert await db.fetchval("SELECT status FROM files WHERE file_name = $1", name) == "used"


async def test_delete_one_file_removes_row_and_object(
    client: httpx.AsyncClient, objects: Objects, db: asyncpg.Connection
) -> None:
    owner = new_id()
    name = (await put_file(client, owner))["file_name"]
    assert (await client.delete(f"/v1/files/{name}", params={"user_id": owner})).status_code == 204
    assert f"uploads/{name}" not in objects.keys()
    assert await db.fetchval("SELECT count(*) FROM files WHERE file_name = $1", name) == 0
    assert (await client.delete(f"/v1/files/{name}", params={"user_id": owner})).status_code == 404


async def test_delete_session_files_leaves_no_object_and_no_row(
    client: httpx.AsyncClient, objects: Objects, db: asyncpg.Connection
) -> None:
    owner, session, other_session = new_id(), new_id(), new_id()
    names = [(await put_file(client, owner, session=session, name=f"f{i}.txt"))["file_name"] for i in range(3)]
    keep = (await put_file(client, owner, session=other_session))["file_name"]
    response = await client.delete(f"/v1/sessions/{session}/files", params={"user_id": owner})
    assert response.status_code == 200 and response.json() == {"deleted": 3}
    keys = objects.keys()
    assert not any(f"uploads/{n}" in keys for n in names)
    assert f"uploads/{keep}" in keys
    assert await db.fetchval("SELECT count(*) FROM files WHERE session_id = $1", uuid.UUID(session)) == 0
    assert await db.fetchval("SELECT count(*) FROM files WHERE file_name = $1", keep) == 1
    # repeating it is harmless
    assert (await client.delete(f"/v1/sessions/{session}/files", params={"user_id": owner})).json() == {"deleted": 0}


async def test_the_gateway_can_drop_an_ownerless_staged_upload_without_a_user(
    client: httpx.AsyncClient, objects: Objects
) -> None:
    name = (await put_file(client, None))["file_name"]
    assert (await client.delete(f"/v1/files/{name}")).status_code == 204
    assert f"uploads/{name}" not in objects.keys()
    # but never an owned one
    owned = (await put_file(client, new_id()))["file_name"]
    assert (await client.delete(f"/v1/files/{owned}")).status_code == 404


# ------------------------------------------------------------------------------------ sweep


async def test_sweep_removes_stale_uploads_and_orphans_only(
    settings: FilesSettings, service_token: str, objects: Objects, db: asyncpg.Connection, bucket: str
) -> None:
    # S3 listings carry whole seconds: the orphan grace is kept well above that granularity.
    async with running_app(replace(settings, stale_upload_seconds=1, orphan_grace_seconds=3), service_token) as client:
        owner, session = new_id(), new_id()
        staged = (await put_file(client, owner))["file_name"]
        ownerless = (await put_file(client, None))["file_name"]
        attached = (await put_file(client, owner, session=session))["file_name"]
        used = (await put_file(client, owner, session=session))["file_name"]
        await client.post(f"/v1/files/{used}/used", json={"user_id": owner, "session_id": session, "turn_id": "t"})
        orphan_key = f"uploads/{uuid.uuid4().hex}.txt"
        objects.put(orphan_key, b"left behind by a crash")
        foreign_key = "not-ours/keep.txt"  # outside the service's prefix: never its to remove
        objects.put(foreign_key, b"x")
        await asyncio.sleep(3.5)
        fresh = (await put_file(client, owner))["file_name"]
        fresh_orphan = f"uploads/{uuid.uuid4().hex}.txt"
        objects.put(fresh_orphan, b"an upload between its two writes")

        result = await client.post("/v1/sweep")
        assert result.status_code == 200, result.text
        counts = result.json()
        assert counts["stale_removed"] >= 3 and counts["orphans_removed"] >= 1
        keys = objects.keys()
        for gone in (staged, ownerless, attached):
            assert f"uploads/{gone}" not in keys
            assert await db.fetchval("SELECT count(*) FROM files WHERE file_name = $1", gone) == 0
        assert orphan_key not in keys
        for kept in (used, fresh):
            assert f"uploads/{kept}" in keys, kept
            assert await db.fetchval("SELECT count(*) FROM files WHERE file_name = $1", kept) == 1
        assert fresh_orphan in keys, "an orphan younger than the grace period must stay"
        assert foreign_key in keys


async def test_orphans_younger_than_a_minute_are_left_alone(
    client: httpx.AsyncClient, settings: FilesSettings, objects: Objects
) -> None:
    assert settings.orphan_grace_seconds == 60
    key = f"uploads/{uuid.uuid4().hex}.txt"
    objects.put(key, b"maybe an upload in progress")
    assert (await client.post("/v1/sweep")).status_code == 200
    assert key in objects.keys()


# ------------------------------------------------------------------------------------ quota


async def test_quota_is_checked_before_and_enforced_while_streaming(
    settings: FilesSettings, service_token: str, objects: Objects, db: asyncpg.Connection
) -> None:
    quota = replace(settings, user_quota_bytes=3 * MB, max_file_size_bytes=2 * MB)
    async with running_app(quota, service_token) as client:
        owner = new_id()
        await put_file(client, owner, png(2 * MB), "one.png")
        before = objects.keys()

        async def body():
            data = png(int(1.5 * MB))
            for start in range(0, len(data), 64 * 1024):
                yield data[start:start + 64 * 1024]

        # no Content-Length: the stream itself crosses the quota
        response = await client.post("/v1/uploads", params={"original_name": "two.png", "user_id": owner}, content=body())
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "quota_exceeded"
        assert objects.keys() == before
        # a Content-Length that cannot fit is refused up front
        response = await client.post(
            "/v1/uploads", params={"original_name": "two.png", "user_id": owner}, content=png(int(1.5 * MB))
        )
        assert response.status_code == 413 and response.json()["error"]["code"] == "quota_exceeded"
        # what fits still goes in; another user is not affected
        await put_file(client, owner, png(MB // 2), "small.png")
        await put_file(client, new_id(), png(2 * MB), "other.png")
        usage = (await client.get(f"/v1/users/{owner}/usage")).json()
        assert usage["used_bytes"] == 2 * MB + MB // 2 and usage["quota_bytes"] == 3 * MB
        assert await db.fetchval("SELECT sum(size) FROM files WHERE user_id = $1", uuid.UUID(owner)) == 2 * MB + MB // 2
        # full: even the check of a first chunk says so
        await put_file(client, owner, png(MB // 2), "last.png")
        full = await client.post("/v1/uploads/check", params={"original_name": "x.png", "user_id": owner},
                                 content=png(100))
        assert full.status_code == 413


async def test_quota_on_claiming_an_ownerless_upload(
    settings: FilesSettings, service_token: str, objects: Objects
) -> None:
    async with running_app(replace(settings, user_quota_bytes=1 * MB), service_token) as client:
        owner = new_id()
        await put_file(client, owner, png(MB - 1000), "big.png")
        name = (await put_file(client, None, png(5000), "staged.png"))["file_name"]
        response = await client.post(f"/v1/files/{name}/attach", json={"user_id": owner, "session_id": new_id()})
        assert response.status_code == 413 and response.json()["error"]["code"] == "quota_exceeded"
        assert f"uploads/{name}" not in objects.keys()


async def test_concurrent_uploads_cannot_both_squeeze_into_the_last_room(
    settings: FilesSettings, service_token: str
) -> None:
    async with running_app(replace(settings, user_quota_bytes=2 * MB, max_file_size_bytes=2 * MB),
                           service_token) as client:
        owner = new_id()

        async def one(i: int) -> int:
            response = await client.post(
                "/v1/uploads", params={"original_name": f"{i}.png", "user_id": owner}, content=png(MB + 10)
            )
            return response.status_code

        statuses = await asyncio.gather(*(one(i) for i in range(3)))
        assert sorted(statuses) == [201, 413, 413]


# ------------------------------------------------------------------------------------ URLs


async def test_presigned_url_fetches_the_bytes_and_names_the_public_host(
    client: httpx.AsyncClient, settings: FilesSettings, service_token: str
) -> None:
    owner = new_id()
    data = png(4096)
    name = (await put_file(client, owner, data, "p.png"))["file_name"]
    response = await client.get(f"/v1/files/{name}/url", params={"user_id": owner, "expires_seconds": 120})
    assert response.status_code == 200
    assert response.json()["expires_seconds"] == 120
    url = response.json()["url"]
    assert "X-Amz-Expires=120" in url
    async with httpx.AsyncClient() as plain:
        fetched = await plain.get(url)
    assert fetched.status_code == 200 and fetched.content == data
    default = (await client.get(f"/v1/files/{name}/url", params={"user_id": owner})).json()
    assert default["expires_seconds"] == settings.presigned_url_seconds
    assert (await client.get(f"/v1/files/{name}/url", params={"user_id": owner, "expires_seconds": 0})).status_code == 400

    public = replace(settings, s3_public_endpoint="https://files.example.com")
    async with running_app(public, service_token) as public_client:
        signed = (await public_client.get(f"/v1/files/{name}/url", params={"user_id": owner})).json()["url"]
    assert urlsplit(signed).scheme == "https" and urlsplit(signed).netloc == "files.example.com"


# ------------------------------------------------------------------------------------ service edges


async def test_service_token_is_required(settings: FilesSettings) -> None:
    async with running_app(settings, None) as anonymous:
        for method, path in (("GET", f"/v1/files/{'a' * 32}.txt"), ("POST", "/v1/uploads"), ("POST", "/v1/sweep")):
            response = await anonymous.request(method, path)
            assert response.status_code == 401, path
        wrong = await anonymous.post("/v1/sweep", headers={"X-Service-Token": "wrong"})
        assert wrong.status_code == 401
        assert (await anonymous.get("/health")).status_code == 200


async def test_ready_checks_database_and_bucket(client: httpx.AsyncClient, settings: FilesSettings,
                                               service_token: str) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "bucket": "ok"}
    # a bucket that is not there makes the service not ready (and the lifespan would create it)
    missing = replace(settings, s3_bucket=f"missing-{uuid.uuid4().hex[:8]}")
    from chat_files.app import create_app

    app = create_app(missing)
    await app.state.files.start()  # what the lifespan does first (ASGITransport runs no lifespan)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cast(Any, app)), base_url="http://f") as bare:  # litestar types ASGI scopes as TypedDicts, httpx as MutableMappings
        response = await bare.get("/ready")
    app.state.files.storage.close()
    await app.state.files.close()
    assert response.status_code == 503 and response.json()["checks"]["bucket"].startswith("failed")


@pytest.mark.parametrize(
    "method, path, kwargs",
    [
        ("GET", "/v1/files/not-a-name.txt", {"params": {"user_id": "00000000-0000-0000-0000-000000000001"}}),
        ("GET", "/v1/files/..%2F..%2Fetc%2Fpasswd", {"params": {"user_id": "00000000-0000-0000-0000-000000000001"}}),
        ("GET", f"/v1/files/{'a' * 32}.txt", {"params": {"user_id": "00000000-0000-0000-0000-000000000001"}}),
        ("GET", f"/v1/files/{'A' * 32}.TXT/content", {"params": {"user_id": "00000000-0000-0000-0000-000000000001"}}),
        ("DELETE", "/v1/files/x", {"params": {"user_id": "00000000-0000-0000-0000-000000000001"}}),
    ],
)
async def test_malformed_or_unknown_names_are_404(client: httpx.AsyncClient, method: str, path: str, kwargs: dict) -> None:
    response = await client.request(method, path, **kwargs)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "method, path, kwargs",
    [
        ("GET", f"/v1/files/{'a' * 32}.txt", {"params": {"user_id": "not-a-uuid"}}),
        ("POST", "/v1/uploads", {"params": {"user_id": new_id()}, "content": b"x"}),  # no original_name
        ("POST", "/v1/uploads", {"params": {"original_name": "a.txt", "user_id": "x"}, "content": b"x"}),
        ("POST", "/v1/uploads", {"params": {"original_name": "a" * 2000 + ".txt"}, "content": b"x"}),
        ("POST", "/v1/uploads", {"params": {"original_name": "a.txt", "session_id": new_id()}, "content": b"x"}),
        ("POST", "/v1/uploads", {"params": {"original_name": "a.txt"}, "content": b"x",
                                 "headers": {"content-length": "abc"}}),
        ("POST", f"/v1/files/{'a' * 32}.txt/attach", {"content": b"{not json"}),
        ("POST", f"/v1/files/{'a' * 32}.txt/attach", {"json": {"user_id": "x", "session_id": new_id()}}),
        ("POST", f"/v1/files/{'a' * 32}.txt/used", {"json": {"user_id": new_id(), "session_id": new_id()}}),
        ("POST", f"/v1/files/{'a' * 32}.txt/used", {"json": [1, 2]}),
        ("POST", f"/v1/files/{'a' * 32}.txt/used", {"json": {"user_id": new_id(), "session_id": new_id(),
                                                             "turn_id": "t\x00"}}),
        ("GET", f"/v1/files/{'a' * 32}.txt/url", {"params": {"user_id": new_id(), "expires_seconds": "soon"}}),
        ("GET", f"/v1/files/{'a' * 32}.txt/url", {"params": {"user_id": new_id(), "expires_seconds": 10**9}}),
        ("GET", "/v1/sessions/not-a-uuid/files", {"params": {"user_id": new_id()}}),
        ("GET", f"/v1/sessions/{uuid.uuid5(uuid.NAMESPACE_URL, 'test_files_lifecycle/s')}/files", {}),  # fixed: part of the test id
        ("POST", "/v1/uploads/check", {"params": {"original_name": "a.txt"}, "content": b"x" * 100_000}),
    ],
)
async def test_bad_input_is_a_clear_4xx(client: httpx.AsyncClient, method: str, path: str, kwargs: dict) -> None:
    response = await client.request(method, path, **kwargs)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.json()["error"]["message"]


async def test_agent_upload_into_a_session(client: httpx.AsyncClient) -> None:
    owner, session = new_id(), new_id()
    response = await client.post(
        f"/v1/sessions/{session}/files", params={"user_id": owner, "original_name": "notes.txt"}, content=text(1000)
    )
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "attached" and response.json()["session_id"] == session


async def test_type_check_endpoint(client: httpx.AsyncClient) -> None:
    ok = await client.post("/v1/uploads/check", params={"original_name": "../x/y.PNG"}, content=png(100))
    assert ok.status_code == 200
    assert ok.json() == {"original_name": "y.PNG", "extension": "png", "content_type": "image/png"}
    bad = await client.post("/v1/uploads/check", params={"original_name": "y.png"}, content=b"\x7fELF\x02\x01\x01\x00")
    assert bad.status_code == 415


async def test_an_unreachable_object_store_is_a_503_not_a_500(settings: FilesSettings, service_token: str) -> None:
    from chat_files.app import create_app
    from devstack.servers import free_port

    down = replace(settings, s3_endpoint=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    app = create_app(down)
    await app.state.files.start()  # what the lifespan does first (ASGITransport runs no lifespan)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cast(Any, app)), base_url="http://f",  # litestar types ASGI scopes as TypedDicts, httpx as MutableMappings
                                 headers={"X-Service-Token": service_token}, timeout=60) as client:
        owner = new_id()
        response = await client.post("/v1/uploads", params={"original_name": "a.txt", "user_id": owner},
                                     content=b"hello")
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "unavailable"
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] == "ok"
        assert (await client.get(f"/v1/users/{owner}/usage")).json()["used_bytes"] == 0
    app.state.files.storage.close()
    await app.state.files.close()
