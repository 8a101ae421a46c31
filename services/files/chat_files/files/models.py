"""The ``files`` table (created by ``migrations/0001_init.sql``)."""
from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, MetaData, Table, Text, Uuid

metadata = MetaData()

files = Table(
    "files",
    metadata,
    Column("file_name", Text, primary_key=True),
    Column("user_id", Uuid, nullable=True),
    Column("session_id", Uuid, nullable=True),
    Column("original_name", Text, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", Text, nullable=False),
    Column("object_key", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("turn_id", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("attached_at", DateTime(timezone=True)),
    Column("used_at", DateTime(timezone=True)),
)

STAGED = "staged"
ATTACHED = "attached"
USED = "used"
