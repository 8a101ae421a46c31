"""A user's data as a whole, over real processes: ``chat-admin export-user`` then ``import-user``
into a second, empty system (its own database, Redis, bucket and services) answers types 0, 1,
2, 5, 6 and file downloads exactly as before; ``erase-user`` leaves no trace of the user id or
of the user's messages in any PostgreSQL table, Redis key or stored object, keeps the ledger
under a pseudonym, spares everyone else, survives being cut short by a killed service, and may
be repeated."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
from minio import Minio

from chat_common.db import plain_dsn
from chat_gateway.admin import erasure_subject
from devstack.servers import RedisServer, free_port
from devstack.stack import Infrastructure, Ports, Stack, wait_ready

from .conftest import assert_ok, connect, internal, new_user, start_gateway, ws_url

BUCKET = "system-files"  # the shared system's (tests/conftest.py)


# --------------------------------------------------------------------------------------------
# helpers


def chat_admin(gateway_url: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_URL": gateway_url, "SERVICE_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "chat_billing.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def admin_ok(gateway_url: str, token: str, *args: str) -> Any:
    done = chat_admin(gateway_url, token, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def upload(stack: Stack, user: str, session: str, content: bytes, name: str = "notes.txt") -> str:
    return internal(
        stack, "files", "POST", f"/v1/sessions/{session}/files?user_id={user}&original_name={name}", raw=content
    )["file_name"]


def download(base_url: str, file_name: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(f"{base_url}/uploads/{file_name}", timeout=10) as response:
            return response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("content-type", "")


def gateway_call(base_url: str, method: str, path: str, token: str | None) -> tuple[int, Any]:
    headers = {"x-service-token": token} if token is not None else {}
    request = urllib.request.Request(f"{base_url}{path}", method=method, headers=headers, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def streamed_chat(client: Any, user: str, session: str, message: str) -> dict[str, Any]:
    await client.send(3, user_id=user, session_id=session, model_name="llama3.1:8b", message=message,
                      session_prompt="be brief", file_name="", stream=True)
    while True:
        reply = await client.recv()
        if reply.get("type") == 3 or "error" in reply:
            return reply


async def answers(url: str, user: str, session_ids: list[str]) -> dict[str, Any]:
    """What the protocol answers about a user: types 0, 1, 5, 6 and 2 of each session."""
    out: dict[str, Any] = {}
    async with connect(url) as client:
        for type_ in (0, 1, 5, 6):
            out[str(type_)] = await client.request(type_, user_id=user)
        for session_id in session_ids:
            out[f"2:{session_id}"] = await client.request(2, user_id=user, session_id=session_id)
    return out


def masked(value: Any, *ids: str) -> str:
    """A reply as text with the given ids replaced, to compare a user with a stranger."""
    text = json.dumps(value, sort_keys=True)
    for number, id_ in enumerate(ids):
        text = text.replace(id_, f"<id{number}>")
    return text


async def postgres_hits(stack: Stack, needles: list[str]) -> list[str]:
    """Every table of every schema (rows cast to text) that holds one of ``needles``, and the
    planner's statistics (pg_stats: values sampled from the rows)."""
    connection = await asyncpg.connect(plain_dsn(stack.infra.database_url))
    hits: list[str] = []
    try:
        for needle in needles:
            for row in await connection.fetch(
                "SELECT schemaname, tablename, attname FROM pg_stats WHERE strpos("
                " coalesce(most_common_vals::text, '') || coalesce(histogram_bounds::text, ''), $1) > 0",
                needle,
            ):
                hits.append(f"pg_stats {row['schemaname']}.{row['tablename']}.{row['attname']} holds {needle[:40]!r}")
        tables = await connection.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        assert {t["table_schema"] for t in tables} >= {"sessions", "files", "billing"}
        for table in tables:
            name = f'"{table["table_schema"]}"."{table["table_name"]}"'
            for needle in needles:
                found = await connection.fetchval(f"SELECT count(*) FROM {name} AS x WHERE strpos(x::text, $1) > 0", needle)
                if found:
                    hits.append(f"{name} holds {needle[:40]!r} ({found} rows)")
    finally:
        await connection.close()
    return hits


def redis_hits(stack: Stack, needles: list[str]) -> list[str]:
    # bytes replies (no decode_responses), which redis-py's types cannot tell from str ones
    client: Any = redis.Redis.from_url(stack.infra.redis_url)
    wanted = [n.encode() for n in needles]
    hits: list[str] = []
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                value = client.get(key) or b""
            elif kind == "hash":
                value = b"\x00".join(k + b"\x00" + v for k, v in client.hgetall(key).items())
            elif kind == "list":
                value = b"\x00".join(client.lrange(key, 0, -1))
            elif kind == "set":
                value = b"\x00".join(client.smembers(key))
            elif kind == "zset":
                value = b"\x00".join(client.zrange(key, 0, -1))
            elif kind == "stream":
                value = b"\x00".join(k + b"\x00" + v for _, fields in client.xrange(key) for k, v in fields.items())
            else:
                value = b""
            for needle in wanted:
                if needle in key or needle in value:
                    hits.append(f"redis {key!r} holds {needle[:40]!r}")
    finally:
        client.close()
    return hits


def object_hits(stack: Stack, needles: list[bytes]) -> tuple[int, list[str]]:
    endpoint = stack.infra.s3_endpoint.split("://", 1)[1]
    client = Minio(endpoint, stack.infra.s3_access_key, stack.infra.s3_secret_key, secure=False, region="us-east-1")
    hits: list[str] = []
    seen = 0
    for item in client.list_objects(BUCKET, recursive=True):
        seen += 1
        response = client.get_object(BUCKET, item.object_name)
        try:
            data = response.read()
        finally:
            response.close()
            response.release_conn()
        for needle in needles:
            if needle in item.object_name.encode() or needle in data:
                hits.append(f"object {item.object_name} holds {needle[:40]!r}")
    return seen, hits


async def no_trace(stack: Stack, user: str, texts: list[str], file_bytes: list[bytes], control: dict[str, Any]) -> None:
    """None of the user's id, messages or file bytes anywhere; ``control`` (another user's
    history) is found by the same scans, so they do look where the data is."""
    needles = [user, *texts]
    assert await postgres_hits(stack, needles) == []
    assert redis_hits(stack, needles) == []
    _, hits = object_hits(stack, [n.encode() for n in needles] + file_bytes)
    assert hits == []
    assert len(await postgres_hits(stack, [control["user"], control["texts"][0]])) >= 2
    assert redis_hits(stack, [control["user"]]) != []
    assert object_hits(stack, [control["file_bytes"]])[1] != []


async def make_history(stack: Stack, tag: str) -> dict[str, Any]:
    """A user with two sessions (one past the context window, so folded into a summary, one
    with a streamed turn), a file used in a turn, a spending limit; returns what it made."""
    user = new_user(stack, balance=3.0)
    stack.admin("PUT", f"/v1/users/{user}/limits", {"daily": 2})
    texts: list[str] = []
    async with connect(stack.ws_url) as client:
        first = f"{tag} walrus opening message"
        texts.append(first)
        reply = assert_ok(await client.chat(user, "NEW", first), 3)
        one = reply["session_id"]
        for n in range(6):
            text = f"{tag} walrus follow up number {n}"
            texts.append(text)
            assert_ok(await client.chat(user, one, text), 3)
        content = f"{tag} private notes\n".encode()
        file_name = upload(stack, user, one, content)
        text = f"{tag} walrus look at my notes"
        texts.append(text)
        assert_ok(await client.chat(user, one, text, file_name=file_name), 3)
        text = f"{tag} narwhal second conversation"
        texts.append(text)
        two = assert_ok(await client.chat(user, "NEW", text), 3)["session_id"]
        text = f"{tag} narwhal streamed question"
        texts.append(text)
        assert_ok(await streamed_chat(client, user, two, text), 3)
    return {"user": user, "sessions": [one, two], "file": file_name, "file_bytes": content, "texts": texts}


# --------------------------------------------------------------------------------------------
# a second, empty system


@pytest.fixture(scope="module")
def fresh_system(work_dir: Path, postgres: Any, s3_server: Any) -> Iterator[Stack]:
    """Another whole system: a new database, its own Redis server, a new bucket and its own five
    services with a service token of their own. Nothing in it until a test imports."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    postgres.create_database(database)
    redis_server = RedisServer("redis-fresh", free_port(), work_dir / f"redis-{uuid.uuid4().hex[:6]}").start()
    stack = Stack(
        work_dir / f"fresh-{uuid.uuid4().hex[:6]}",
        ports=Ports.free(),
        infra=Infrastructure(
            database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{postgres.port}/{database}",
            redis_url=redis_server.url(),
            s3_endpoint=s3_server.endpoint(),
            s3_access_key=s3_server.access_key,
            s3_secret_key=s3_server.secret_key,
        ),
        service_token=uuid.uuid4().hex,
        durable=False,
        env={"MAX_CHAT_HISTORY_CONTEXT": "10", "AI_PROVIDER": "offline", "RATE_LIMIT_REQUESTS": "100000",
             "S3_BUCKET": f"fresh-{uuid.uuid4().hex[:8]}"},
    )
    try:
        stack.start()
        wait_ready(stack.gateway_url, timeout=90)
        yield stack
    finally:
        stack.stop()
        redis_server.stop()


# --------------------------------------------------------------------------------------------
# tests


async def test_export_then_import_into_a_fresh_system_answers_as_before(
    stack: Stack, fresh_system: Stack, tmp_path: Path
) -> None:
    made = await make_history(stack, f"exp{uuid.uuid4().hex[:6]}")
    user, sessions, file_name = made["user"], made["sessions"], made["file"]
    before = await answers(stack.ws_url, user, sessions)
    # what the answers must show, so the comparison below is not of two empty lists
    assert [s["session_id"] for s in before["1"]["data"]["session_info"]] == sessions[::-1]
    assert "walrus look at my notes" in before[f"2:{sessions[0]}"]["data"]["chat"]
    assert file_name in before[f"2:{sessions[0]}"]["data"]["chat"]
    assert before["6"]["data"]["balance"] < 3.0
    summary = internal(stack, "sessions", "GET", f"/v1/sessions/{sessions[0]}?user_id={user}")["summary"]
    assert summary
    downloaded = download(stack.gateway_url, file_name)
    assert downloaded[0] == 200 and downloaded[1] == made["file_bytes"]
    listed = internal(stack, "files", "GET", f"/v1/admin/users/{user}/files")["files"]
    assert [(f["file_name"], f["size"], f["content_base64"]) for f in listed] == [(file_name, len(made["file_bytes"]), "")]

    stack.admin("PUT", f"/v1/users/{user}/balance-aware", {"enabled": False})
    out = tmp_path / "user.json"
    summary_out = admin_ok(stack.gateway_url, stack.service_token, "export-user", "--user-id", user, "--out", str(out))
    assert summary_out["sessions"] == 2 and summary_out["files"] == 1 and summary_out["ledger"] > 0
    assert (out.stat().st_mode & 0o777) == 0o600
    document = json.loads(out.read_text())
    assert document["format"] == "chat-backend-user-export" and document["version"] == 1
    assert document["billing"]["user"]["models"] == [4, 5, 8]
    assert [e["content"] for e in document["sessions"][0]["entries"]][:1] == [made["texts"][0]]

    # the fresh system knows nothing of the user
    empty = await answers(fresh_system.ws_url, user, sessions)
    assert "error" in empty["0"]
    assert download(fresh_system.gateway_url, file_name)[0] == 404

    imported = admin_ok(fresh_system.gateway_url, fresh_system.service_token, "import-user", str(out))
    assert imported["user_id"] == user
    assert imported["imported"]["sessions"] == 2 and imported["imported"]["files"] == 1

    after = await answers(fresh_system.ws_url, user, sessions)
    assert after == before
    assert download(fresh_system.gateway_url, file_name) == downloaded
    # the ledger and the receipts came along: the same rows, the same usage totals
    for path in (f"/v1/users/{user}/ledger?limit=500", f"/v1/users/{user}/receipts", f"/v1/users/{user}/usage",
                 f"/v1/users/{user}/limits"):
        old, new = stack.admin("GET", path), fresh_system.admin("GET", path)
        strip = lambda page: json.dumps(page, sort_keys=True).replace('"id"', "")  # noqa: E731
        if "ledger" in path:
            keep = ("kind", "amount_nanos", "balance_after_nanos", "turn_id", "created_at")
            old_rows = [{k: row.get(k) for k in keep} for row in old["items"]]
            new_rows = [{k: row.get(k) for k in keep} for row in new["items"]]
            assert old_rows and old_rows == new_rows
        elif "limits" in path:
            assert old["daily"]["limit_nanos"] == new["daily"]["limit_nanos"] == 2_000_000_000
        else:
            assert strip(old) == strip(new)
    assert fresh_system.admin("GET", f"/v1/users/{user}/balance-aware")["enabled"] is False
    # and the imported user goes on as any other
    async with connect(fresh_system.ws_url) as client:
        assert_ok(await client.chat(user, sessions[1], "after the move"), 3)

    # a user who exists is refused, with one line on stderr and nothing changed
    again = chat_admin(fresh_system.gateway_url, fresh_system.service_token, "import-user", str(out))
    assert again.returncode != 0
    assert again.stdout == ""
    assert len(again.stderr.strip().splitlines()) == 1 and "already exists" in again.stderr
    assert (await answers(fresh_system.ws_url, user, []))["0"] == before["0"]


async def test_erase_leaves_no_trace_spares_others_and_may_be_repeated(stack: Stack) -> None:
    victim = await make_history(stack, f"era{uuid.uuid4().hex[:6]}")
    other = await make_history(stack, f"oth{uuid.uuid4().hex[:6]}")
    user = victim["user"]
    other_before = await answers(stack.ws_url, other["user"], other["sessions"])
    stranger, stranger_session = str(uuid.uuid4()), str(uuid.uuid4())
    unknown = await answers(stack.ws_url, stranger, [stranger_session])
    # before: the victim is everywhere, the planner's statistics included
    connection = await asyncpg.connect(plain_dsn(stack.infra.database_url))
    try:
        await connection.execute("ANALYZE")
    finally:
        await connection.close()
    assert any(hit.startswith("pg_stats") for hit in await postgres_hits(stack, [user]))
    assert redis_hits(stack, [user]) != []

    # a charge still owed in the outbox (as a summary whose inline charge failed leaves it)
    owed_key = f"summary:{victim['sessions'][0]}:9999"
    connection = await asyncpg.connect(plain_dsn(stack.infra.database_url))
    try:
        await connection.execute(
            "INSERT INTO sessions.outbox (key, kind, user_id, session_id, turn_id, cost_nanos, model_name)"
            " VALUES ($1, 'summary', $2::uuid, $3::uuid, $4::uuid, 12345, 'llama3.1:8b')",
            owed_key, user, victim["sessions"][0], str(uuid.uuid4()),
        )
    finally:
        await connection.close()

    report = admin_ok(stack.gateway_url, stack.service_token, "erase-user", "--user-id", user)
    assert report["user_id"] == user and not report["resumed"] and not report["finished_before"]
    assert report["owed_charges"].get("charged", 0) >= 1
    removed = report["postgres"]
    assert removed["billing.users"] == 1
    assert removed["sessions.sessions"] == 2
    assert removed["sessions.entries"] == 2 * 8 + 1 + 2 * 2  # 8 turns and a file entry; 2 turns
    assert removed["billing.receipts"] > 0 and removed["billing.limits"] == 1 and removed["files.files"] == 1
    assert report["objects"] == 1 and report["redis_keys"] >= 2
    pseudonym = report["pseudonym"]
    assert report["pseudonymized"]["billing.ledger"] > 0

    await no_trace(stack, user, victim["texts"], [victim["file_bytes"]], other)

    # the ledger is kept for accounting, under the pseudonym, and is still append-only
    connection = await asyncpg.connect(plain_dsn(stack.infra.database_url))
    try:
        kept = await connection.fetchval("SELECT count(*) FROM billing.ledger WHERE user_id = $1::uuid", pseudonym)
        assert kept == report["pseudonymized"]["billing.ledger"]
        # the owed charge was booked before the user went: its ledger line is among those kept
        booked = await connection.fetchrow(
            "SELECT user_id::text, amount_nanos FROM billing.ledger WHERE charge_key = $1", owed_key
        )
        assert booked is not None and booked["user_id"] == pseudonym and booked["amount_nanos"] == -12345
        for statement in (
            "UPDATE billing.ledger SET amount_nanos = 0 WHERE user_id = $1::uuid",
            "UPDATE billing.ledger SET user_id = gen_random_uuid() WHERE user_id = $1::uuid",
            "DELETE FROM billing.ledger WHERE user_id = $1::uuid",
        ):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await connection.execute(statement, pseudonym)
    finally:
        await connection.close()

    # every request naming the erased user answers as for a user nobody ever had
    erased = await answers(stack.ws_url, user, [victim["sessions"][0]])
    assert masked(erased, user, victim["sessions"][0]) == masked(unknown, stranger, stranger_session)
    assert download(stack.gateway_url, victim["file"]) == download(stack.gateway_url, f"{uuid.uuid4().hex}.txt")
    async with connect(stack.ws_url) as client:
        refused = await client.chat(user, "NEW", "back again?")
        stranger_refused = await client.chat(stranger, "NEW", "back again?")
        assert masked(refused, user) == masked(stranger_refused, stranger)
        found = await client.request(10, user_id=user, query="walrus")
        assert masked(found, user) == masked(await client.request(10, user_id=stranger, query="walrus"), stranger)

    # the other user is untouched and goes on
    assert await answers(stack.ws_url, other["user"], other["sessions"]) == other_before
    assert download(stack.gateway_url, other["file"])[1] == other["file_bytes"]
    async with connect(stack.ws_url) as client:
        assert_ok(await client.chat(other["user"], other["sessions"][0], "still here"), 3)

    # repeating it is safe: nothing more to remove, and it says it had finished before
    again = admin_ok(stack.gateway_url, stack.service_token, "erase-user", "--user-id", user)
    assert again["finished_before"] and not again["resumed"]
    assert sorted(again["steps_before"]) == ["billing", "files", "redis", "sessions"]
    assert sum(again["postgres"].values()) == 0 and again["objects"] == 0 and again["redis_keys"] == 0
    assert again["owed_charges"] == {}
    assert again["pseudonym"] == pseudonym
    # and a user nobody ever had is an error, not a silent success
    never = chat_admin(stack.gateway_url, stack.service_token, "erase-user", "--user-id", str(uuid.uuid4()))
    assert never.returncode != 0 and "not_found" in never.stderr and len(never.stderr.strip().splitlines()) == 1


async def test_erase_cut_short_by_a_killed_service_is_finished_by_the_next_run(stack: Stack) -> None:
    # a files service and a gateway of this test's own (same database, bucket and Redis), so
    # killing it leaves the shared one alone
    port = free_port()
    files = stack.start_service("files", port=port, env={"FILES_PORT": str(port)}, key=f"files-{uuid.uuid4().hex[:6]}")
    gateway = start_gateway(stack, FILES_URL=f"http://127.0.0.1:{files.port}")
    base = f"http://127.0.0.1:{gateway.port}"
    try:
        victim = await make_history(stack, f"cut{uuid.uuid4().hex[:6]}")
        # a second one whose progress record will be lost (as under a rotated SERVICE_TOKEN)
        orphan = await make_history(stack, f"orp{uuid.uuid4().hex[:6]}")
        other = await make_history(stack, f"cnt{uuid.uuid4().hex[:6]}")
        user = victim["user"]
        files.kill_tree()
        # both at once: each spends its time retrying the dead service
        for failed in await asyncio.gather(*(
            asyncio.to_thread(chat_admin, base, stack.service_token, "erase-user", "--user-id", someone)
            for someone in (user, orphan["user"])
        )):
            assert failed.returncode != 0 and failed.stdout == ""
            assert len(failed.stderr.strip().splitlines()) == 1
        # cut short after billing and sessions: the user is unknown already, the file still there
        async with connect(ws_url(gateway)) as client:
            assert "error" in await client.request(0, user_id=user)
        assert download(stack.gateway_url, victim["file"])[1] == victim["file_bytes"]
        connection = await asyncpg.connect(plain_dsn(stack.infra.database_url))
        try:
            lost = await connection.execute(
                "DELETE FROM sessions.erasures WHERE subject = $1", erasure_subject(stack.service_token, orphan["user"])
            )
            assert lost == "DELETE 1"
        finally:
            await connection.close()

        files.start()
        report = admin_ok(base, stack.service_token, "erase-user", "--user-id", user)
        assert report["resumed"] and not report["finished_before"]
        assert {"billing", "sessions"} <= set(report["steps_before"]) and "files" not in report["steps_before"]
        assert report["objects"] == 1 and report["postgres"]["files.files"] == 1
        assert report["postgres"]["billing.users"] == 0  # done by the first run
        await no_trace(stack, user, victim["texts"], [victim["file_bytes"]], other)
        # without its record, an erase is still finished while anything of the user is left
        report = admin_ok(base, stack.service_token, "erase-user", "--user-id", orphan["user"])
        assert not report["resumed"] and report["objects"] == 1
        await no_trace(stack, orphan["user"], orphan["texts"], [orphan["file_bytes"]], other)
    finally:
        gateway.stop()
        files.stop()


def test_admin_endpoints_need_the_service_token(stack: Stack) -> None:
    user = new_user(stack)
    for token in (None, "", "wrong-token"):
        for method, path in (("GET", f"/v1/admin/users/{user}/export"), ("POST", f"/v1/admin/users/{user}/erase"),
                             ("POST", "/v1/admin/users/import")):
            status, body = gateway_call(stack.gateway_url, method, path, token)
            assert status == 401, (method, path, token, body)
    assert internal(stack, "billing", "GET", f"/v1/users/{user}")["user_id"] == user  # nothing erased
    # a gateway with no token configured refuses them all, whatever is sent
    bare = start_gateway(stack, SERVICE_TOKEN="")
    try:
        status, _ = gateway_call(f"http://127.0.0.1:{bare.port}", "GET", f"/v1/admin/users/{user}/export", "")
        assert status == 403
        status, _ = gateway_call(f"http://127.0.0.1:{bare.port}", "POST", f"/v1/admin/users/{user}/erase", stack.service_token)
        assert status == 403
    finally:
        bare.stop()
    # the commands explain themselves, and fail in one line without a token
    for command in ("export-user", "import-user", "erase-user"):
        helped = chat_admin(stack.gateway_url, stack.service_token, command, "--help")
        assert helped.returncode == 0 and "GATEWAY_URL" in helped.stdout
    missing = chat_admin(stack.gateway_url, "", "erase-user", "--user-id", user)
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
