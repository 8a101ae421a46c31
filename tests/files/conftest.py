"""The files app in-process on a freshly migrated database and a bucket of its own per module,
plus direct access to that database and bucket to check what really was stored."""
from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, cast

import asyncpg
import httpx
import pytest
from minio import Minio

from chat_common.db import apply_migrations, plain_dsn
from chat_common.settings import ServiceSettings
from chat_files.app import create_app
from chat_files.settings import MB, FilesSettings
from devstack.servers import S3Server

SCHEMA = "files"
LIMIT_MB = 1
QUOTA_MB = 4

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
PDF_MAGIC = b"%PDF-1.7\n"
# The start of a real x86-64 ELF header: NUL bytes in it make it anything but text.
ELF_HEADER = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8 + b"\x02\x00\x3e\x00\x01\x00\x00\x00"
PE_HEADER = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + b"\x00" * 44 + b"\x80\x00\x00\x00"


def png(size: int) -> bytes:
    """``size`` bytes that start like a PNG (random after the signature)."""
    return (PNG_MAGIC + os.urandom(max(size - len(PNG_MAGIC), 0)))[:size]


def text(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog. 0123456789\n"
    return (line * (size // len(line) + 1))[:size]


def new_id() -> str:
    return str(uuid.uuid4())


def make_settings(database_url: str, service_token: str, s3: S3Server, bucket: str, **overrides: Any) -> FilesSettings:
    settings = FilesSettings(
        service=ServiceSettings(name="files", host="127.0.0.1", port=0, service_token=service_token),
        database_url=database_url,
        db_schema=SCHEMA,
        s3_endpoint=s3.endpoint(),
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        s3_bucket=bucket,
        max_file_size_bytes=LIMIT_MB * MB,
        user_quota_bytes=QUOTA_MB * MB,
        file_sweep_seconds=0,  # tests call POST /v1/sweep themselves
        upload_threads=4,
    )
    return replace(settings, **overrides)


@pytest.fixture(scope="module")
async def database_url(fresh_database: str) -> str:
    await apply_migrations(fresh_database, SCHEMA, "chat_files")
    return fresh_database


@pytest.fixture(scope="session")
def bucket() -> str:
    # One bucket for all in-process modules: SeaweedFS (as devstack runs it) grows volumes per
    # bucket from a small fixed pool, so every extra bucket in a test run is a cost.
    return f"files-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def settings(database_url: str, service_token: str, s3_server: S3Server, bucket: str) -> FilesSettings:
    return make_settings(database_url, service_token, s3_server, bucket)


@asynccontextmanager
async def running_app(settings: FilesSettings, service_token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    """The app in this test's loop behind httpx's ASGI transport, which streams a request body
    chunk by chunk into the app (Litestar's test client reads it whole first). What the
    lifespan would do (pool, bucket, clean-up) is done here; the sweep loop is off in tests."""
    app = create_app(settings)
    service = app.state.files
    await service.start()
    await service.storage.ensure_bucket()
    headers = {"X-Service-Token": service_token} if service_token else {}
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=cast(Any, app)), base_url="http://files.test", headers=headers, timeout=60  # litestar types ASGI scopes as TypedDicts, httpx as MutableMappings
        ) as http:
            http.app = app  # type: ignore[attr-defined]
            yield http
    finally:
        service.storage.close()
        await service.close()


@pytest.fixture(scope="module")
async def client(settings: FilesSettings, service_token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings, service_token) as http:
        yield http


@pytest.fixture(scope="module")
def minio_client(s3_server: S3Server) -> Minio:
    return Minio(f"127.0.0.1:{s3_server.port}", s3_server.access_key, s3_server.secret_key, secure=False)


@pytest.fixture(scope="module")
def objects(minio_client: Minio, bucket: str) -> "Objects":
    return Objects(minio_client, bucket)


class Objects:
    """What is really in the test bucket."""

    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def keys(self) -> set[str]:
        return {o.object_name for o in self.client.list_objects(self.bucket, recursive=True)}

    def read(self, key: str) -> bytes:
        response = self.client.get_object(self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def put(self, key: str, data: bytes) -> None:
        import io

        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data))


@pytest.fixture(scope="module")
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(plain_dsn(database_url), server_settings={"search_path": SCHEMA})
    yield connection
    await connection.close()


@pytest.fixture()
def user() -> Iterator[str]:
    yield new_id()
