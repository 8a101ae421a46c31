from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from chat_common.db import check_schema_name
from chat_common.settings import (
    ServiceSettings,
    database_url,
    env_bool,
    env_int,
    env_list,
    env_str,
)
from chat_files.files.content_types import SUPPORTED_EXTENSIONS

logger = logging.getLogger(__name__)

MB = 1024 * 1024
# The longest a presigned URL may live (the S3 signature v4 maximum).
MAX_PRESIGNED_SECONDS = 7 * 24 * 3600


def _endpoint(url: str, key: str) -> tuple[str, bool]:
    """``host:port`` and whether TLS is used, from ``http(s)://host:port`` (or a bare host)."""
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{key} must look like http://host:port, got {url!r}")
    if parts.path not in ("", "/"):
        raise ValueError(f"{key} must not carry a path, got {url!r}")
    return parts.netloc, parts.scheme == "https"


@dataclass(frozen=True)
class FilesSettings:
    service: ServiceSettings
    database_url: str
    db_schema: str = "files"
    migrate_on_start: bool = True
    s3_endpoint: str = "http://127.0.0.1:9000"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "chat-files"
    s3_region: str = "us-east-1"
    s3_public_endpoint: str = ""
    max_file_size_bytes: int = 10 * MB
    allowed_file_types: tuple[str, ...] = ("jpg", "jpeg", "png", "pdf", "txt")
    user_quota_bytes: int = 100 * MB
    stale_upload_seconds: int = 3600
    file_sweep_seconds: int = 300
    presigned_url_seconds: int = 300
    orphan_grace_seconds: int = 60
    upload_threads: int = 32

    def __post_init__(self) -> None:
        check_schema_name(self.db_schema)
        _endpoint(self.s3_endpoint, "S3_ENDPOINT")
        _endpoint(self.public_endpoint, "S3_PUBLIC_ENDPOINT")
        if self.max_file_size_bytes < 1:
            raise ValueError("MAX_FILE_SIZE must be at least 1 (megabyte)")
        if not 1 <= self.presigned_url_seconds <= MAX_PRESIGNED_SECONDS:
            raise ValueError(f"PRESIGNED_URL_SECONDS must be between 1 and {MAX_PRESIGNED_SECONDS}")
        if not self.allowed_file_types:
            raise ValueError("ALLOWED_FILE_TYPES names no type this service can check")

    @property
    def public_endpoint(self) -> str:
        return self.s3_public_endpoint or self.s3_endpoint

    def s3_address(self, public: bool = False) -> tuple[str, bool]:
        if public:
            return _endpoint(self.public_endpoint, "S3_PUBLIC_ENDPOINT")
        return _endpoint(self.s3_endpoint, "S3_ENDPOINT")

    @classmethod
    def from_env(cls) -> "FilesSettings":
        requested = [t.lower().lstrip(".") for t in env_list("ALLOWED_FILE_TYPES", list(cls.allowed_file_types))]
        unknown = [t for t in requested if t not in SUPPORTED_EXTENSIONS]
        if unknown:
            # Content is checked by magic bytes; a type with no check would let anything in
            # under that extension, so it is left out rather than trusted.
            logger.warning(
                "ALLOWED_FILE_TYPES: no content check for %s; those types are refused "
                "(supported: %s)", ", ".join(unknown), ", ".join(sorted(SUPPORTED_EXTENSIONS)),
            )
        return cls(
            service=ServiceSettings.from_env("files", 8002),
            database_url=database_url(),
            db_schema=env_str("FILES_DB_SCHEMA", "files"),
            migrate_on_start=env_bool("MIGRATE_ON_START", True),
            s3_endpoint=env_str("S3_ENDPOINT", "http://127.0.0.1:9000"),
            s3_access_key=env_str("S3_ACCESS_KEY", "", "MINIO_ACCESS_KEY", "MINIO_ROOT_USER"),
            s3_secret_key=env_str("S3_SECRET_KEY", "", "MINIO_SECRET_KEY", "MINIO_ROOT_PASSWORD"),
            s3_bucket=env_str("S3_BUCKET", "chat-files"),
            s3_region=env_str("S3_REGION", "us-east-1"),
            s3_public_endpoint=env_str("S3_PUBLIC_ENDPOINT", ""),
            max_file_size_bytes=env_int("MAX_FILE_SIZE", 10) * MB,
            allowed_file_types=tuple(dict.fromkeys(t for t in requested if t in SUPPORTED_EXTENSIONS)),
            user_quota_bytes=env_int("USER_STORAGE_QUOTA_MB", 100) * MB,
            stale_upload_seconds=env_int("STALE_UPLOAD_SECONDS", 3600),
            file_sweep_seconds=env_int("FILE_SWEEP_SECONDS", 300),
            presigned_url_seconds=env_int("PRESIGNED_URL_SECONDS", 300),
            orphan_grace_seconds=env_int("ORPHAN_GRACE_SECONDS", 60),
            upload_threads=env_int("FILES_UPLOAD_THREADS", 32),
        )
