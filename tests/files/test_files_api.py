"""The files service's HTTP API, in-process, against real PostgreSQL and a real S3 (SeaweedFS)."""
from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from .conftest import (
    ELF_HEADER,
    JPEG_MAGIC,
    LIMIT_MB,
    PDF_MAGIC,
    PE_HEADER,
    Objects,
    new_id,
    png,
    running_app,
)

MB = 1024 * 1024


async def upload(client: httpx.AsyncClient, data: bytes | AsyncIterator[bytes], name: str, user: str | None,
                 session: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    params = {"original_name": name}
    if user is not None:
        params["user_id"] = user
    if session is not None:
        params["session_id"] = session
    return await client.post("/v1/uploads", params=params, content=data, headers=headers or {})


async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


# ------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize(
    "name, data, content_type",
    [
        ("empty.txt", b"", "text/plain; charset=utf-8"),
        ("one.txt", b"x", "text/plain; charset=utf-8"),
        ("Photo.PNG", png(300_000), "image/png"),
        ("scan.jpeg", JPEG_MAGIC + b"\x01" * 5000, "image/jpeg"),
        ("doc.pdf", PDF_MAGIC + b"1 0 obj\n" * 100, "application/pdf"),
        ("limit.png", png(LIMIT_MB * MB), "image/png"),
    ],
)
async def test_upload_round_trip_is_byte_exact(
    client: httpx.AsyncClient, objects: Objects, db: asyncpg.Connection, user: str, name: str, data: bytes,
    content_type: str,
) -> None:
    response = await upload(client, chunks(data), name, user)
    assert response.status_code == 201, response.text
    stored = response.json()
    ext = name.rsplit(".", 1)[1].lower()
    assert stored["file_name"].endswith("." + ext) and len(stored["file_name"]) == 32 + 1 + len(ext)
    assert stored["original_name"] == name
    assert stored["size"] == len(data)
    assert stored["sha256"] == hashlib.sha256(data).hexdigest()
    assert stored["content_type"] == content_type
    assert stored["status"] == "staged" and stored["user_id"] == user

    content = await client.get(f"/v1/files/{stored['file_name']}/content", params={"user_id": user})
    assert content.status_code == 200
    assert content.content == data
    assert content.headers["content-type"] == content_type
    assert objects.read(f"uploads/{stored['file_name']}") == data
    row = await db.fetchrow("SELECT size, sha256, object_key FROM files WHERE file_name = $1", stored["file_name"])
    assert row is not None and row["size"] == len(data) and row["object_key"] == f"uploads/{stored['file_name']}"


async def test_names_are_new_and_unique(client: httpx.AsyncClient, user: str) -> None:
    names = set()
    for _ in range(3):
        response = await upload(client, b"same", "same.txt", user)
        names.add(response.json()["file_name"])
    assert len(names) == 3


async def test_multi_part_object_above_part_size(client: httpx.AsyncClient, settings, objects: Objects,
                                                 service_token: str) -> None:
    """A file bigger than minio's 5 MiB part goes up as a multipart upload; still byte-exact."""
    from dataclasses import replace

    big = replace(settings, max_file_size_bytes=12 * MB, user_quota_bytes=100 * MB)
    data = png(11 * MB + 12345)
    async with running_app(big, service_token) as big_client:
        user = new_id()
        response = await upload(big_client, chunks(data, 256 * 1024), "big.png", user)
        assert response.status_code == 201, response.text
        name = response.json()["file_name"]
        content = await big_client.get(f"/v1/files/{name}/content", params={"user_id": user})
    assert hashlib.sha256(content.content).hexdigest() == hashlib.sha256(data).hexdigest()
    assert objects.read(f"uploads/{name}") == data


# ------------------------------------------------------------------------------------ limits


async def test_one_byte_over_the_limit_is_refused_and_nothing_stored(
    client: httpx.AsyncClient, objects: Objects, db: asyncpg.Connection, user: str
) -> None:
    before_keys = objects.keys()
    response = await upload(client, chunks(png(LIMIT_MB * MB + 1)), "over.png", user)
    assert response.status_code == 413
    assert error_code(response) == "payload_too_large"
    assert "limit" in response.json()["error"]["message"]
    assert objects.keys() == before_keys
    assert await db.fetchval("SELECT count(*) FROM files WHERE user_id = $1", user) == 0


async def test_content_length_above_the_limit_is_refused_before_reading(client: httpx.AsyncClient, user: str) -> None:
    async def never_sent() -> AsyncIterator[bytes]:
        raise AssertionError("the body must not be read")
        yield b""  # pragma: no cover

    response = await client.post(
        "/v1/uploads",
        params={"original_name": "a.png", "user_id": user},
        content=never_sent(),
        headers={"content-length": str(LIMIT_MB * MB + 1)},
    )
    assert response.status_code == 413


# ------------------------------------------------------------------------------------ types


@pytest.mark.parametrize(
    "name, data, fragment",
    [
        ("cat.png", ELF_HEADER + b"\x00" * 5000, "executable"),
        ("cat.png", PE_HEADER + b"\x00" * 5000, "executable"),
        ("notes.txt", ELF_HEADER + b"\x00" * 100, "executable"),
        ("cat.png", JPEG_MAGIC + b"\x00" * 100, "JPEG"),
        ("doc.pdf", png(2000), "PNG"),
        ("notes.txt", b"caf\xe9 latin-1 is not utf-8", "UTF-8"),
        ("notes.txt", b"nul\x00inside", "UTF-8"),
        ("tool.exe", ELF_HEADER, ".exe"),
        ("archive.zip", b"PK\x03\x04", ".zip"),
        ("noextension", b"hello", "no extension"),
        ("image.gif", b"GIF89a" + b"\x00" * 10, ".gif"),  # a known type, but not in the default list
    ],
)
async def test_type_is_judged_by_content(
    client: httpx.AsyncClient, objects: Objects, user: str, name: str, data: bytes, fragment: str
) -> None:
    before_keys = objects.keys()
    response = await upload(client, chunks(data), name, user)
    assert response.status_code == 415, response.text
    assert error_code(response) == "unsupported_media_type"
    assert fragment in response.json()["error"]["message"]
    assert objects.keys() == before_keys


async def test_text_cut_inside_a_multibyte_character_at_the_head_boundary_is_text(
    client: httpx.AsyncClient, user: str
) -> None:
    data = ("é" * 10_000).encode()  # 2-byte characters: byte 8192 is a boundary, 8191 is not
    response = await upload(client, chunks(b"a" + data, 1000), "accents.txt", user)
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "raw, kept",
    [
        ("../../etc/passwd.txt", "passwd.txt"),
        ("..\\..\\windows\\win.ini.txt", "win.ini.txt"),
        ("/abs/path/x.txt", "x.txt"),
        ("a\x00b\x1fc\x7f.txt", "abc.txt"),
        ("evil\u202etxt.exe.txt", "eviltxt.exe.txt"),
        ("..", None),
        ("a" * 600 + ".txt", "a" * 251 + ".txt"),
        ('quo"te<>.txt', "quo_te__.txt"),
    ],
)
async def test_original_names_are_sanitized(
    client: httpx.AsyncClient, objects: Objects, db: asyncpg.Connection, user: str, raw: str, kept: str | None
) -> None:
    response = await upload(client, b"hello", raw, user)
    if kept is None:
        assert response.status_code == 415  # nothing left of the name, so no extension
        return
    assert response.status_code == 201, response.text
    stored = response.json()
    assert stored["original_name"] == kept
    # The key is the service's own name; nothing of the client's name reaches the bucket.
    assert f"uploads/{stored['file_name']}" in objects.keys()
    assert all(".." not in k and "passwd" not in k and "windows" not in k for k in objects.keys())
    row = await db.fetchrow("SELECT original_name, object_key FROM files WHERE file_name = $1", stored["file_name"])
    assert row["original_name"] == kept and row["object_key"] == f"uploads/{stored['file_name']}"
