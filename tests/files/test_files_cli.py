"""``python -m chat_files migrate`` and settings read from the environment."""
from __future__ import annotations

import os
import subprocess
import sys

import asyncpg
import pytest

from chat_common.db import plain_dsn
from chat_files.settings import MB, FilesSettings


async def test_migrate_command_creates_the_schema_once(fresh_database: str) -> None:
    url = fresh_database
    env = {**os.environ, "DATABASE_URL": url, "FILES_DB_SCHEMA": "files_cli", "SERVICE_TOKEN": "t"}
    for _ in range(2):  # the second run finds nothing to do
        result = subprocess.run([sys.executable, "-m", "chat_files", "migrate"], env=env, capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr.decode()
    connection = await asyncpg.connect(plain_dsn(url))
    try:
        assert await connection.fetchval("SELECT count(*) FROM files_cli.schema_migrations") == 1
        assert await connection.fetchval("SELECT count(*) FROM files_cli.files") == 0
    finally:
        await connection.close()
    bad = subprocess.run([sys.executable, "-m", "chat_files", "nonsense"], env=env, capture_output=True, timeout=60)
    assert bad.returncode != 0 and b"usage" in bad.stderr


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("S3_", "MINIO_", "MAX_FILE", "ALLOWED_", "USER_STORAGE", "STALE_", "FILE_SWEEP",
                           "PRESIGNED", "FILES_", "ORPHAN_")):
            monkeypatch.delenv(key)
    defaults = FilesSettings.from_env()
    assert defaults.service.port == 8002 and defaults.db_schema == "files"
    assert defaults.s3_bucket == "chat-files" and defaults.max_file_size_bytes == 10 * MB
    assert defaults.allowed_file_types == ("jpg", "jpeg", "png", "pdf", "txt")
    assert defaults.user_quota_bytes == 100 * MB and defaults.stale_upload_seconds == 3600
    assert defaults.file_sweep_seconds == 300 and defaults.presigned_url_seconds == 300
    assert defaults.public_endpoint == defaults.s3_endpoint

    monkeypatch.setenv("ALLOWED_FILE_TYPES", ".PNG, txt, docx")
    monkeypatch.setenv("MAX_FILE_SIZE", "3")
    monkeypatch.setenv("S3_ENDPOINT", "https://s3.internal:9000")
    monkeypatch.setenv("S3_PUBLIC_ENDPOINT", "https://files.example.com")
    monkeypatch.setenv("MINIO_ROOT_USER", "old-name")
    configured = FilesSettings.from_env()
    # an unknown type is left out rather than let in unchecked
    assert configured.allowed_file_types == ("png", "txt")
    assert configured.max_file_size_bytes == 3 * MB
    assert configured.s3_address() == ("s3.internal:9000", True)
    assert configured.s3_address(public=True) == ("files.example.com", True)
    assert configured.s3_access_key == "old-name"

    monkeypatch.setenv("PRESIGNED_URL_SECONDS", "0")
    with pytest.raises(ValueError):
        FilesSettings.from_env()
    monkeypatch.setenv("PRESIGNED_URL_SECONDS", "60")
    monkeypatch.setenv("S3_ENDPOINT", "ftp://x")
    with pytest.raises(ValueError):
        FilesSettings.from_env()
