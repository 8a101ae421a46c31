"""What must never reach a log: tokens (wherever they travelled, refused or not), chat content
(unless LOG_MESSAGE_CONTENT=true), file content; and what must hold in the code: SQL only with
bound parameters, stored file names never taken from the client."""
from __future__ import annotations

import ast
import re
import uuid
from pathlib import Path

import httpx

from devstack.servers import ServiceProcess
from devstack.stack import Stack

from .conftest import (
    LogWatch,
    assert_ok,
    connect,
    hs_token,
    new_user,
    now,
    refused,
    upload,
    upload_fields,
    ws_url,
)

ROOT = Path(__file__).resolve().parents[2]


async def test_tokens_never_reach_a_log(system: Stack, jwt_gateway: ServiceProcess) -> None:
    watch = LogWatch(system).start()
    user = new_user(system)
    good = hs_token(user)
    expired = hs_token(user, exp=now() - 3600)
    forged = hs_token(user, secret="x" * 40)
    tokens = [good, expired, forged]
    # every transport, accepted and refused
    async with connect(ws_url(jwt_gateway, f"token={good}")) as client:
        assert_ok(await client.request(6), 6)
    async with connect(ws_url(jwt_gateway), subprotocols=["bearer", good]) as client:
        assert_ok(await client.request(6), 6)
    for bad in (expired, forged):
        await refused(ws_url(jwt_gateway, f"token={bad}"))
        await refused(ws_url(jwt_gateway), token=bad)
        await refused(ws_url(jwt_gateway), subprotocols=["bearer", bad])
    # a refused origin with a token in the URL: uvicorn logs that handshake line too
    await refused(ws_url(jwt_gateway, f"token={good}"), origin="http://evil.example")
    async with httpx.AsyncClient(base_url=jwt_gateway.url, timeout=30) as http:
        stored = await upload(http, upload_fields(None), "t.txt", b"token test", token=good)
        name = stored.json()["data"]["fileName"]
        await http.get(f"/uploads/{name}", params={"token": good})
        for bad in (expired, forged):
            await http.get(f"/uploads/{name}", params={"token": bad})
            await http.get(f"/uploads/{name}", headers={"Authorization": f"Bearer {bad}"})
            await upload(http, upload_fields(None), "t.txt", b"x", token=bad)
    written = watch.written()
    assert "[redacted]" in written[jwt_gateway.name], "the handshake lines with a query token were logged, redacted"
    for name, text in written.items():
        for token in tokens:
            for piece in token.split("."):
                if len(piece) > 16:
                    assert piece not in text, f"{name} logged a piece of a token"
        assert not re.search(r"token=(?!\[redacted\])[A-Za-z0-9_\-.]{8,}", text), f"{name} logged token=..."


async def test_chat_and_file_content_never_reach_a_log(system: Stack) -> None:
    watch = LogWatch(system).start()
    user = new_user(system)
    marker = f"content-marker-{uuid.uuid4().hex}"
    file_marker = f"file-marker-{uuid.uuid4().hex}".encode()
    async with connect(system.ws_url) as client:
        reply = assert_ok(await client.chat("NEW", f"hello {marker}", user_id=user, session_prompt=f"p {marker}"), 3)
        session = reply["session_id"]
        async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as http:
            response = await upload(http, upload_fields(user, session), f"{marker}.txt", file_marker)
            name = response.json()["data"]["fileName"]
            assert (await http.get(f"/uploads/{name}", params={"user_id": user})).content == file_marker
        assert_ok(await client.chat(session, f"again {marker}", user_id=user, file_name=name), 3)
        # failures too: a refused turn, a refused model
        reply = await client.chat(session, f"bad model {marker}", user_id=user, model_name=f"m-{marker}")
        assert "error" in reply
    for service, text in watch.written().items():
        assert marker not in text, f"{service} logged chat content"
        assert file_marker.decode() not in text, f"{service} logged file content"


SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|SET|GRANT)\b")


def _constant_parts_only(node: ast.JoinedStr) -> bool:
    """An f-string that only splices in other module constants (``f"SELECT {COLUMNS} ..."``):
    still a constant statement, fixed when the module is imported."""
    parts = [v for v in node.values if isinstance(v, ast.FormattedValue)]
    return all(isinstance(v.value, ast.Name) and v.value.id.isupper() for v in parts)


def test_sql_is_never_built_from_strings() -> None:
    """Every statement of the services is a constant string (or built only from constants);
    the one formatted statement is the migration's schema name, which must pass
    check_schema_name."""
    offenders = []
    for path in (ROOT / "services").rglob("*.py"):
        if "aiproto" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr) and not _constant_parts_only(node):
                literal = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
                if SQL_WORDS.search(literal) and re.search(r"\b(FROM|INTO|TABLE|SCHEMA|WHERE|search_path)\b", literal):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {literal[:80]}")
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
                for side in (node.left, node.right):
                    if isinstance(side, ast.Constant) and isinstance(side.value, str) and SQL_WORDS.search(side.value) \
                            and re.search(r"\b(FROM|INTO|WHERE)\b", side.value):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {side.value[:80]}")
    allowed = {"services/common/chat_common/db.py"}
    unexpected = [o for o in offenders if o.split(":")[0] not in allowed]
    assert not unexpected, unexpected
    db = (ROOT / "services/common/chat_common/db.py").read_text()
    migrate = db[db.index("async def apply_migrations"):]
    migrate = migrate[: migrate.index("\nasync def ", 1)]
    # the formatted schema statements are only reached after the name is validated
    assert migrate.index("check_schema_name(schema)") < migrate.index("CREATE SCHEMA IF NOT EXISTS")


def test_schema_names_are_identifiers() -> None:
    import pytest

    from chat_common.db import check_schema_name

    assert check_schema_name("sessions") == "sessions"
    for hostile in ('x"; DROP SCHEMA public CASCADE; --', "Sessions", "a-b", "", "1abc", "a" * 64, "a b"):
        with pytest.raises(ValueError):
            check_schema_name(hostile)


async def test_stored_names_never_come_from_the_client(system: Stack) -> None:
    user = new_user(system)
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as http:
        for name in ("../../evil.txt", "report.txt", "x/y/z.png.txt", "UPPER.TXT"):
            response = await upload(http, upload_fields(user), name, b"content")
            assert response.status_code == 202, response.text
            stored = response.json()["data"]["fileName"]
            assert re.fullmatch(r"[0-9a-f]{32}\.[a-z0-9]{1,10}", stored), stored
            assert name.rsplit(".", 1)[0].split("/")[-1].lower() not in stored


async def test_log_message_content_true_is_the_switch(system: Stack) -> None:
    """The same turn as above, on a gateway told LOG_MESSAGE_CONTENT=true: now it is logged,
    so the absence above is the setting's doing."""
    from .conftest import start_gateway, stop_gateway

    process = start_gateway(system, "gw-log-content", {"LOG_MESSAGE_CONTENT": "true"})
    try:
        watch = LogWatch(system).start()
        user = new_user(system)
        marker = f"content-marker-{uuid.uuid4().hex}"
        async with connect(ws_url(process)) as client:
            assert_ok(await client.chat("NEW", f"hello {marker}", user_id=user), 3)
        assert marker in watch.written()[process.name]
    finally:
        stop_gateway(system, process)
