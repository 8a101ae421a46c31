"""PostgreSQL for the services that own tables: one schema per service in a shared database
(or a database of its own; both work), an asyncpg pool whose search_path is that schema, and
ordered SQL migrations applied under an advisory lock so replicas may start together."""
from __future__ import annotations

import logging
import re
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from chat_common.errors import (
    AppError,
    BadRequestError,
    ConflictError,
    ServiceUnavailableError,
    register_classifier,
)

logger = logging.getLogger(__name__)

# serialization_failure, deadlock_detected, lock_not_available, query_canceled: rolled back,
# nothing applied, safe to retry
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014"})
# connection exception, insufficient resources, admin/crash shutdown and "cannot connect now"
_OUTAGE_SQLSTATE_CLASSES = ("08", "53", "57P")
# asyncpg's: the server is not reachable or not accepting, or the connection closed mid-call
_UNAVAILABLE = (asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError, asyncpg.InterfaceError)


def classify_database_error(cause: BaseException) -> AppError | None:
    """What a PostgreSQL error stands for to the client (chat_common.errors asks, for every
    exception of the cause chain): busy or down is 503, a constraint 409, a bad value 400."""
    sqlstate = str(getattr(cause, "sqlstate", None) or "")
    if sqlstate in TRANSIENT_SQLSTATES:
        return ServiceUnavailableError("database busy; retry the request")
    if isinstance(cause, asyncpg.PostgresError) and sqlstate.startswith(_OUTAGE_SQLSTATE_CLASSES):
        return ServiceUnavailableError("a dependency is unavailable; retry the request")
    if isinstance(cause, asyncpg.IntegrityConstraintViolationError):
        return ConflictError("the request conflicts with stored data")
    if isinstance(cause, asyncpg.DataError):
        return BadRequestError("a value in the request is out of range or malformed")
    if isinstance(cause, _UNAVAILABLE):
        return ServiceUnavailableError("a dependency is unavailable; retry the request")
    return None


register_classifier(classify_database_error)

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def check_schema_name(schema: str) -> str:
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    return schema


async def _no_reset(_: asyncpg.Connection) -> None:
    """Pool release without asyncpg's reset query (advisory unlock, CLOSE ALL, UNLISTEN, RESET
    ALL): a round trip per call for state the services never leave behind. asyncpg still rolls
    back a transaction left open before calling this."""


async def create_pool(url: str, schema: str, *, min_size: int = 0, max_size: int = 10) -> asyncpg.Pool:
    """The asyncpg pool of a service that owns tables: its schema on the search_path, named in
    pg_stat_activity. ``min_size`` 0: the service starts, and reports itself not ready, while
    the database is down."""
    check_schema_name(schema)
    return await asyncpg.create_pool(
        plain_dsn(url),
        min_size=min_size,
        max_size=max_size,
        reset=_no_reset,
        max_inactive_connection_lifetime=300,
        server_settings={"search_path": schema, "application_name": f"chat-{schema}"},
    )


def plain_dsn(url: str) -> str:
    """The asyncpg DSN of a database URL (``postgresql+asyncpg://``, the form settings
    normalise to, or any ``postgres*://``, -> ``postgresql://``)."""
    parts = urlsplit(url)
    return urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, parts.fragment))


def _migration_files(package: str) -> list[tuple[str, str]]:
    folder = resources.files(package) / "migrations"
    names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), (folder / name).read_text()) for name in names]


async def apply_migrations(url: str, schema: str, package: str) -> list[str]:
    """Apply ``<package>/migrations/*.sql`` in name order, each once; return those applied now."""
    check_schema_name(schema)
    applied_now: list[str] = []
    connection = await asyncpg.connect(plain_dsn(url))
    try:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"migrate:{schema}")
            await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await connection.execute(f'SET LOCAL search_path TO "{schema}"')
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row["version"] for row in await connection.fetch("SELECT version FROM schema_migrations")}
            for version, sql in _migration_files(package):
                if version in done:
                    continue
                await connection.execute(sql)
                await connection.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied_now.append(version)
    finally:
        await connection.close()
    if applied_now:
        logger.info("applied migrations", extra={"schema": schema, "versions": applied_now})
    return applied_now


COLUMNS_OF_SCHEMA = """
SELECT c.table_name, array_agg(c.column_name::text ORDER BY c.ordinal_position)
  FROM information_schema.columns c
  JOIN information_schema.tables t ON t.table_schema = c.table_schema AND t.table_name = c.table_name
 WHERE c.table_schema = $1 AND t.table_type = 'BASE TABLE'
 GROUP BY c.table_name
 ORDER BY c.table_name
"""


async def tables_with_columns(connection: Any, schema: str) -> dict[str, set[str]]:
    """Every base table of ``schema`` (asyncpg connection) with its column names: how a
    service's erase finds each table that names a user or a session, including tables added
    after the erase was written."""
    rows = await connection.fetch(COLUMNS_OF_SCHEMA, check_schema_name(schema))
    return {row[0]: set(row[1]) for row in rows}


async def delete_naming(
    connection: Any, table: str, *, user_id: str | None = None, session_ids: list[str] | None = None
) -> int:
    """``DELETE FROM <table>`` (of the connection's search_path) every row whose ``user_id`` is
    ``user_id`` or whose ``session_id`` is one of ``session_ids`` (text comparison, whatever
    the column types); returns how many. The table name, found by :func:`tables_with_columns`,
    must be a plain identifier; the values are parameters. The one place a service's erase
    builds a statement."""
    check_schema_name(table)
    conditions: list[str] = []
    args: list[Any] = []
    if user_id is not None:
        args.append(user_id)
        conditions.append(f"user_id::text = ${len(args)}")
    if session_ids is not None:
        args.append(session_ids)
        conditions.append(f"session_id::text = ANY(${len(args)}::text[])")
    if not conditions:
        raise ValueError("delete_naming needs a user_id or session_ids")
    # the table checked above, the conditions constant, the values parameters
    status = await connection.execute(f'DELETE FROM "{table}" WHERE {" OR ".join(conditions)}', *args)  # noqa: S608
    return int(status.rsplit(" ", 1)[1])


async def refresh_statistics(connection: Any, tables: list[str]) -> None:
    """``ANALYZE`` these tables (of the connection's search_path): after an erase, so that the
    planner's statistics (pg_statistic's most common values and histogram bounds, sampled from
    the rows) no longer carry values of rows that are gone."""
    for table in sorted(set(tables)):
        check_schema_name(table)
        await connection.execute(f'ANALYZE "{table}"')
