"""``POST /upload`` and ``GET /uploads/{fileName}`` through the real gateway, files, sessions
and billing processes (the shared ``system`` stack; MAX_FILE_SIZE there is 2 MB)."""
from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
from minio import Minio

from chat_common.db import plain_dsn
from devstack.servers import S3Server
from devstack.stack import Stack

from .conftest import ELF_HEADER, PE_HEADER, png, text
from .gateway_helpers import (
    CONTENT_TYPE,
    END,
    body,
    field_part,
    file_head,
    form_fields,
    raw_request,
    streamed_body,
)

MB = 1024 * 1024
LIMIT = 2 * MB  # tests/conftest.py SYSTEM_MAX_FILE_SIZE_MB
BUCKET = "system-files"
NAME = re.compile(r"^[0-9a-f]{32}\.[a-z0-9]+$")


@pytest.fixture(scope="module")
async def gateway(system: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
async def internal(system: Stack, service_token: str) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    clients = {
        name: httpx.AsyncClient(base_url=system.url(name), headers={"X-Service-Token": service_token}, timeout=30)
        for name in ("files", "sessions")
    }
    yield clients
    for client in clients.values():
        await client.aclose()


@pytest.fixture(scope="module")
async def files_db(system: Stack) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(plain_dsn(system.infra.database_url), server_settings={"search_path": "files"})
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
def bucket_keys(s3_server: S3Server):
    client = Minio(f"127.0.0.1:{s3_server.port}", s3_server.access_key, s3_server.secret_key, secure=False)

    def keys() -> set[str]:
        return {o.object_name for o in client.list_objects(BUCKET, recursive=True)}

    return keys


@pytest.fixture(scope="module")
def user(system: Stack) -> str:
    return system.create_user("Uploader")


async def post_upload(gateway: httpx.AsyncClient, content, **headers: str) -> httpx.Response:
    return await gateway.post("/upload", content=content, headers={"content-type": CONTENT_TYPE, **headers})


def failure(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    payload = response.json()
    assert payload["data"] is None and payload["message"]
    return payload["message"]


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    "filename, data, content_type",
    [
        ("empty.txt", b"", "text/plain; charset=utf-8"),
        ("one.txt", b"x", "text/plain; charset=utf-8"),
        ("exactly-the-limit.png", png(LIMIT), "image/png"),
        ("report.pdf", b"%PDF-1.4\n" + os.urandom(MB + 12345), "application/pdf"),
    ],
)
async def test_upload_then_download_is_byte_exact(
    gateway: httpx.AsyncClient, internal: dict[str, httpx.AsyncClient], user: str, filename: str, data: bytes,
    content_type: str,
) -> None:
    chunks = [data[i:i + 100_000] for i in range(0, len(data), 100_000)]
    response = await post_upload(gateway, streamed_body(form_fields(user), filename, chunks))
    assert response.status_code == 202, response.text
    payload = response.json()
    assert payload["message"] == "File uploaded successfully"
    info = payload["data"]
    assert NAME.match(info["fileName"]) and info["fileName"].endswith("." + filename.rsplit(".", 1)[1])
    assert info["size"] == len(data)
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["contentType"] == content_type
    assert info["originalName"] == filename
    assert info["imageUrl"].endswith(f"/uploads/{info['fileName']}")
    uuid.UUID(info["sessionId"])

    download = await gateway.get(f"/uploads/{info['fileName']}")
    assert download.status_code == 200
    assert download.content == data
    assert download.headers["content-type"] == content_type
    assert download.headers["x-content-type-options"] == "nosniff"
    assert f'filename="{filename}"' in download.headers["content-disposition"]
    owned = await gateway.get(f"/uploads/{info['fileName']}", params={"user_id": user})
    assert owned.status_code == 200 and owned.content == data

    # "NEW" made a session for this user, named after the file, holding the file
    session = await internal["sessions"].get(f"/v1/sessions/{info['sessionId']}", params={"user_id": user})
    assert session.status_code == 200
    assert session.json()["session_name"] == filename[:20].strip()
    assert session.json()["model_name"] == "llama3.1:8b"
    listed = await internal["files"].get(f"/v1/sessions/{info['sessionId']}/files", params={"user_id": user})
    assert [f["file_name"] for f in listed.json()["items"]] == [info["fileName"]]
    assert listed.json()["items"][0]["status"] == "attached"


async def test_a_standard_multipart_encoder_works(gateway: httpx.AsyncClient, user: str) -> None:
    response = await gateway.post(
        "/upload", data=form_fields(user), files={"file": ("photo.jpg", b"\xff\xd8\xff\xe0" + b"\x01" * 999, "image/jpeg")}
    )
    assert response.status_code == 202, response.text
    assert response.json()["data"]["contentType"] == "image/jpeg"


async def test_fields_after_the_file(
    gateway: httpx.AsyncClient, internal: dict[str, httpx.AsyncClient], files_db: asyncpg.Connection, user: str
) -> None:
    data = text(300_000)
    response = await post_upload(gateway, body(form_fields(user), "late-fields.txt", data, file_first=True))
    assert response.status_code == 202, response.text
    info = response.json()["data"]
    row = await files_db.fetchrow("SELECT user_id, session_id, status FROM files WHERE file_name = $1", info["fileName"])
    assert str(row["user_id"]) == user and str(row["session_id"]) == info["sessionId"] and row["status"] == "attached"
    assert (await gateway.get(f"/uploads/{info['fileName']}")).content == data


async def test_upload_into_an_existing_session(
    gateway: httpx.AsyncClient, internal: dict[str, httpx.AsyncClient], system: Stack, user: str
) -> None:
    created = await internal["sessions"].post(
        "/v1/sessions", json={"user_id": user, "name": "mine", "model_name": "llama3.1:8b", "prompt": ""}
    )
    session_id = created.json()["session_id"]
    for file_first in (False, True):
        response = await post_upload(
            gateway, body(form_fields(user, session_id), "in-session.txt", b"hello", file_first=file_first)
        )
        assert response.status_code == 202, response.text
        assert response.json()["data"]["sessionId"] == session_id
    listed = await internal["files"].get(f"/v1/sessions/{session_id}/files", params={"user_id": user})
    assert len(listed.json()["items"]) == 2

    # someone else's session is reported like a missing one
    stranger = system.create_user("Stranger")
    response = await post_upload(gateway, body(form_fields(stranger, session_id), "x.txt", b"hello"))
    assert failure(response, 404) == "Session not found"
    response = await post_upload(gateway, body(form_fields(user, str(uuid.uuid4())), "x.txt", b"hello"))
    assert failure(response, 404) == "Session not found"


async def test_unknown_user(gateway: httpx.AsyncClient, bucket_keys) -> None:
    before = bucket_keys()
    for file_first in (False, True):
        response = await post_upload(gateway, body(form_fields(str(uuid.uuid4())), "x.txt", b"hi", file_first=file_first))
        assert failure(response, 404) == "User Does Not Exists"
    assert bucket_keys() == before


# ------------------------------------------------------------------------------------ limits


async def test_one_byte_over_the_limit_is_413_and_nothing_is_stored(
    gateway: httpx.AsyncClient, files_db: asyncpg.Connection, bucket_keys, user: str
) -> None:
    before_keys = bucket_keys()
    before_rows = await files_db.fetchval("SELECT count(*) FROM files")
    data = png(LIMIT + 1)
    for file_first in (False, True):
        response = await post_upload(gateway, body(form_fields(user), "big.png", data, file_first=file_first))
        assert "2 MB" in failure(response, 413)
        chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
        response = await post_upload(gateway, streamed_body(form_fields(user), "big.png", chunks, file_first=file_first))
        failure(response, 413)
    assert bucket_keys() == before_keys
    assert await files_db.fetchval("SELECT count(*) FROM files") == before_rows


async def test_a_content_length_above_the_limit_is_refused_before_the_body(system: Stack) -> None:
    port = system.services["gateway"].port
    head = (
        f"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Type: {CONTENT_TYPE}\r\n"
        f"Content-Length: {50 * MB}\r\n\r\n"
    ).encode()
    # Not one byte of the body is sent: the answer must come anyway.
    status, reply = raw_request(port, head, [], timeout=10)
    assert status == 413 and b"limit" in reply


async def test_a_lying_content_length_is_caught(
    system: Stack, gateway: httpx.AsyncClient, files_db: asyncpg.Connection, bucket_keys, user: str
) -> None:
    port = system.services["gateway"].port
    before_keys = bucket_keys()
    before_rows = await files_db.fetchval("SELECT count(*) FROM files")
    payload = body(form_fields(user), "sneaky.png", png(3 * MB))
    # Claims 1000 bytes and sends 3 MB: the server reads what was declared, finds no complete
    # form in it, and stores nothing; the rest is never taken as part of this upload.
    head = (
        f"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Type: {CONTENT_TYPE}\r\n"
        f"Content-Length: 1000\r\nConnection: close\r\n\r\n"
    ).encode()
    status, reply = raw_request(port, head, [payload])
    assert 400 <= status < 500, (status, reply)
    # No Content-Length at all (chunked): counting alone must stop it.
    chunked_head = (
        f"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Type: {CONTENT_TYPE}\r\n"
        f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()

    def chunked(data: bytes):
        for i in range(0, len(data), 65536):
            piece = data[i:i + 65536]
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        yield b"0\r\n\r\n"

    status, reply = raw_request(port, chunked_head, chunked(payload))
    assert status == 413, reply
    assert bucket_keys() == before_keys
    assert await files_db.fetchval("SELECT count(*) FROM files") == before_rows


async def test_an_interrupted_upload_stores_nothing(
    system: Stack, files_db: asyncpg.Connection, bucket_keys, user: str
) -> None:
    import asyncio
    import socket

    before_keys = bucket_keys()
    before_rows = await files_db.fetchval("SELECT count(*) FROM files")
    for file_first in (False, True):
        payload = body(form_fields(user), "cut.txt", text(LIMIT - 1000), file_first=file_first)
        head = (
            f"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", system.services["gateway"].port)) as sock:
            sock.sendall(head + payload[: len(payload) // 2])
            await asyncio.sleep(0.5)  # the first half is on its way to the bucket
        # gone mid-body: give both services a moment to notice and drop what they started
        for _ in range(50):
            await asyncio.sleep(0.1)
            if bucket_keys() == before_keys and await files_db.fetchval("SELECT count(*) FROM files") == before_rows:
                break
        assert bucket_keys() == before_keys
        assert await files_db.fetchval("SELECT count(*) FROM files") == before_rows


async def test_user_before_the_file_and_session_after(gateway: httpx.AsyncClient, user: str) -> None:
    fields = form_fields(user)
    payload = (
        field_part("user_id", user)
        + file_head("mixed.txt") + b"mixed order\r\n"
        + b"".join(field_part(k, v) for k, v in fields.items() if k != "user_id")
        + END
    )
    response = await post_upload(gateway, payload)
    assert response.status_code == 202, response.text
    assert (await gateway.get(f"/uploads/{response.json()['data']['fileName']}")).content == b"mixed order"


# ------------------------------------------------------------------------------------ types and names


@pytest.mark.parametrize("header", [ELF_HEADER, PE_HEADER], ids=["elf", "pe"])
async def test_a_png_that_is_an_executable_is_415(
    gateway: httpx.AsyncClient, bucket_keys, user: str, header: bytes
) -> None:
    before = bucket_keys()
    response = await post_upload(gateway, body(form_fields(user), "kitten.png", header + b"\x00" * 100_000))
    assert "executable" in failure(response, 415)
    assert bucket_keys() == before


async def test_disallowed_extension_is_415(gateway: httpx.AsyncClient, user: str) -> None:
    response = await post_upload(gateway, body(form_fields(user), "run.sh", b"#!/bin/sh\necho hi\n"))
    assert ".sh" in failure(response, 415)


async def test_path_traversal_name_is_stored_safely(
    gateway: httpx.AsyncClient, files_db: asyncpg.Connection, bucket_keys, user: str
) -> None:
    response = await post_upload(gateway, body(form_fields(user), "../../etc/passwd.txt", b"root:x:0:0"))
    assert response.status_code == 202, response.text
    info = response.json()["data"]
    assert NAME.match(info["fileName"]) and info["originalName"] == "passwd.txt"
    row = await files_db.fetchrow("SELECT original_name, object_key FROM files WHERE file_name = $1", info["fileName"])
    assert row["original_name"] == "passwd.txt" and row["object_key"] == f"uploads/{info['fileName']}"
    assert not any("passwd" in k or ".." in k for k in bucket_keys())
    download = await gateway.get(f"/uploads/{info['fileName']}")
    assert 'filename="passwd.txt"' in download.headers["content-disposition"]


async def test_unicode_name_round_trips_in_content_disposition(gateway: httpx.AsyncClient, user: str) -> None:
    response = await post_upload(gateway, body(form_fields(user), "résumé 日本.txt", b"hi"))
    info = response.json()["data"]
    assert info["originalName"] == "résumé 日本.txt"
    disposition = (await gateway.get(f"/uploads/{info['fileName']}")).headers["content-disposition"]
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9%20%E6%97%A5%E6%9C%AC.txt" in disposition


# ------------------------------------------------------------------------------------ ownership


async def test_another_user_can_neither_download_nor_delete(
    gateway: httpx.AsyncClient, internal: dict[str, httpx.AsyncClient], system: Stack, bucket_keys, user: str
) -> None:
    response = await post_upload(gateway, body(form_fields(user), "private.txt", b"secret"))
    info = response.json()["data"]
    name = info["fileName"]
    stranger = system.create_user("Stranger")
    assert failure(await gateway.get(f"/uploads/{name}", params={"user_id": stranger}), 404)
    assert failure(await gateway.get(f"/uploads/{name}", params={"user_id": "not-a-uuid"}), 404)
    deleted = await internal["files"].delete(f"/v1/files/{name}", params={"user_id": stranger})
    assert deleted.status_code == 404
    gone = await internal["files"].delete(f"/v1/sessions/{info['sessionId']}/files", params={"user_id": stranger})
    assert gone.json() == {"deleted": 0}
    assert f"uploads/{name}" in bucket_keys()
    assert (await gateway.get(f"/uploads/{name}", params={"user_id": user})).content == b"secret"


async def test_deleting_the_session_files_leaves_nothing(
    gateway: httpx.AsyncClient, internal: dict[str, httpx.AsyncClient], files_db: asyncpg.Connection, bucket_keys,
    user: str,
) -> None:
    first = (await post_upload(gateway, body(form_fields(user), "a.txt", b"one"))).json()["data"]
    session_id = first["sessionId"]
    second = (await post_upload(gateway, body(form_fields(user, session_id), "b.txt", b"two"))).json()["data"]
    response = await internal["files"].delete(f"/v1/sessions/{session_id}/files", params={"user_id": user})
    assert response.json() == {"deleted": 2}
    keys = bucket_keys()
    for info in (first, second):
        assert f"uploads/{info['fileName']}" not in keys
        assert await files_db.fetchval("SELECT count(*) FROM files WHERE file_name = $1", info["fileName"]) == 0
        assert failure(await gateway.get(f"/uploads/{info['fileName']}"), 404)


@pytest.mark.parametrize(
    "path", ["/uploads/nothing.txt", f"/uploads/{'0' * 32}.txt", "/uploads/..%2F..%2Fetc%2Fpasswd", "/uploads/%00"]
)
async def test_unknown_and_malformed_names_are_404(gateway: httpx.AsyncClient, path: str) -> None:
    failure(await gateway.get(path), 404)


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "case, make, status",
    [
        ("no file", lambda u: body(form_fields(u), None, b""), 400),
        ("no user_id", lambda u: body({"session_id": "NEW", "model_name": "m"}, "a.txt", b"x"), 400),
        ("no session_id", lambda u: body({"user_id": u, "model_name": "m"}, "a.txt", b"x"), 400),
        ("bad session_id", lambda u: body(form_fields(u, "abc"), "a.txt", b"x"), 400),
        ("bad user_id", lambda u: body(form_fields("12345"), "a.txt", b"x"), 400),
        ("NEW without model", lambda u: body(form_fields(u, model_name=""), "a.txt", b"x"), 400),
        ("two files", lambda u: body(form_fields(u), "a.txt", b"x")[: -len(END)] + file_head("b.txt") + b"y\r\n" + END, 400),
        ("file as a text field", lambda u: field_part("file", "abc") + END, 400),
        ("cut off", lambda u: body(form_fields(u), "a.txt", b"x")[:-20], 400),
        ("garbage", lambda u: b"\x00\xff" * 100, 400),
        ("field too long", lambda u: body({**form_fields(u), "session_prompt": "p" * 1_000_000}, "a.txt", b"x"), 413),
        ("no name", lambda u: body(form_fields(u), "", b"x"), 400),
        ("NUL in a field", lambda u: body(form_fields(u, session_prompt="a\x00b"), "a.txt", b"x"), 400),
        ("field not UTF-8", lambda u: field_part("user_id", u)[:-2] + b"\xff\r\n" + END, 400),
    ],
)
async def test_bad_forms_get_a_clear_4xx(gateway: httpx.AsyncClient, user: str, case: str, make, status: int) -> None:
    failure(await post_upload(gateway, make(user)), status)


async def test_mangled_forms_never_get_a_5xx(gateway: httpx.AsyncClient, user: str) -> None:
    """Deterministic mutations of a valid form (flipped bytes, cuts, repeats): each gets a
    2xx or a 4xx with the failure body, never a 5xx."""
    import random

    rng = random.Random(20240605)
    good = body(form_fields(user), "fuzz.txt", b"some text\n" * 300)
    for _ in range(40):
        mutated = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(["flip", "cut", "repeat", "insert"])
            position = rng.randrange(len(mutated))
            if kind == "flip":
                mutated[position] = rng.randrange(256)
            elif kind == "cut":
                del mutated[position:position + rng.randint(1, 200)]
            elif kind == "repeat":
                mutated[position:position] = mutated[position:position + rng.randint(1, 200)]
            else:
                mutated[position:position] = rng.choice([b"\r\n", b"--", b'"', b"\x00", b"\r\n\r\n", END])
        response = await post_upload(gateway, bytes(mutated))
        assert response.status_code < 500, (response.status_code, response.text)
        if response.status_code >= 400:
            failure(response, response.status_code)


async def test_not_multipart_is_400(gateway: httpx.AsyncClient) -> None:
    failure(await gateway.post("/upload", json={"file": "x"}), 400)
    failure(await gateway.post("/upload", content=b"x", headers={"content-type": "multipart/form-data"}), 400)


async def test_cors_preflight_for_the_upload(gateway: httpx.AsyncClient) -> None:
    response = await gateway.options(
        "/upload", headers={"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"}
    )
    assert response.status_code in (200, 204)
    assert response.headers.get("access-control-allow-origin") in ("*", "http://localhost:5173")


@pytest.fixture(scope="module", autouse=True)
def no_input_of_this_module_caused_a_500_or_a_traceback(system: Stack) -> Iterator[None]:
    """The gateway's and files service's logs from this module's start to its end (checked
    after its last test, whatever order the tests ran in): no traceback, no error."""
    offsets = {name: system.services[name].log_path.stat().st_size for name in ("gateway", "files")}
    yield
    for name, offset in offsets.items():
        with open(system.services[name].log_path, "rb") as log:
            log.seek(offset)
            written = log.read().decode(errors="replace")
        assert "Traceback" not in written, f"{name} logged a traceback:\n{written[-3000:]}"
        assert '"level": "error"' not in written, f"{name} logged an error:\n{written[-3000:]}"
