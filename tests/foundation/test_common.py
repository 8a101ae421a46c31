"""The shared library: settings from the environment, exact money, and the error round trip
between a service and the internal client over a real socket."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from litestar import Litestar, get, post
from litestar.params import FromPath

from chat_common.app import ServicePlugin
from chat_common.client import ServiceClient
from chat_common.errors import (
    InsufficientBalanceError,
    ModelNotEntitledError,
    NotFoundError,
    ServiceUnavailableError,
)
from chat_common.logging import JsonFormatter, request_id_var
from chat_common.money import (
    NANOS_PER_DOLLAR,
    dollars_to_nanos,
    nanos_to_dollars,
    token_cost_nanos,
)
from chat_common.settings import ServiceSettings, database_url, env_int
from devstack.servers import free_port


def test_original_db_keys_build_the_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("DB_HOST", "db.internal")
    monkeypatch.setenv("DB_PORT", "6543")
    monkeypatch.setenv("DB_USER", "chat")
    monkeypatch.setenv("DB_PASSWORD", "p@ss/word")
    monkeypatch.setenv("DB_NAME", "chatdb")
    assert database_url() == "postgresql+asyncpg://chat:p%40ss%2Fword@db.internal:6543/chatdb"
    monkeypatch.setenv("DATABASE_URL", "postgres://u@h:1/d")
    assert database_url() == "postgresql+asyncpg://u@h:1/d"


def test_aliases_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_PORT", raising=False)
    monkeypatch.setenv("SERVER_PORT", "9100")
    assert env_int("GATEWAY_PORT", 8000, "SERVER_PORT") == 9100
    monkeypatch.setenv("GATEWAY_PORT", "9200")
    assert env_int("GATEWAY_PORT", 8000, "SERVER_PORT") == 9200
    monkeypatch.setenv("GATEWAY_PORT", "eighty")
    with pytest.raises(ValueError, match="GATEWAY_PORT"):
        env_int("GATEWAY_PORT", 8000)


def test_money_is_exact() -> None:
    assert dollars_to_nanos(1) == NANOS_PER_DOLLAR
    assert dollars_to_nanos(0.1) + dollars_to_nanos(0.2) == dollars_to_nanos("0.3")
    assert dollars_to_nanos("0.0005") == 500_000
    assert nanos_to_dollars(1_500_000_000) == 1.5
    # 0.0005 $/1K in and 0.0015 $/1K out: 1000 in + 333 out = 500000 + 499500 nanos
    assert token_cost_nanos(1000, 333, 500_000, 1_500_000) == 999_500
    assert token_cost_nanos(1, 0, 1, 0) == 1  # a fraction of a nano-dollar rounds up, never to free
    with pytest.raises(ValueError):
        dollars_to_nanos("NaN")


def test_json_log_lines_carry_request_id() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    token = request_id_var.set("req-123")
    try:
        line = json.loads(JsonFormatter("svc").format(record))
    finally:
        request_id_var.reset(token)
    assert line["msg"] == "hello there" and line["service"] == "svc" and line["request_id"] == "req-123"


@get("/things/{thing_id:str}", sync_to_thread=False)
def get_thing(thing_id: FromPath[str]) -> dict[str, str]:
    if thing_id == "missing":
        raise NotFoundError("no such thing")
    if thing_id == "poor":
        raise InsufficientBalanceError()
    if thing_id == "model":
        raise ModelNotEntitledError()
    return {"id": thing_id}


@post("/echo-request-id", sync_to_thread=False)
def echo_request_id() -> dict[str, str]:
    return {"request_id": request_id_var.get()}


@pytest.fixture
async def service() -> AsyncIterator[str]:
    app = Litestar([get_thing, echo_request_id], plugins=[ServicePlugin(name="probe", service_token="s3cret")])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


async def test_client_maps_errors_back_and_sends_token_and_request_id(service: str) -> None:
    client = ServiceClient("probe", service, "s3cret")
    try:
        assert await client.get("/things/a") == {"id": "a"}
        with pytest.raises(NotFoundError, match="no such thing"):
            await client.get("/things/missing")
        with pytest.raises(InsufficientBalanceError):
            await client.get("/things/poor")
        with pytest.raises(ModelNotEntitledError):
            await client.get("/things/model")
        token = request_id_var.set("trace-me")
        try:
            assert await client.post("/echo-request-id") == {"request_id": "trace-me"}
        finally:
            request_id_var.reset(token)
    finally:
        await client.aclose()


async def test_internal_service_refuses_missing_or_wrong_token(service: str) -> None:
    async with httpx.AsyncClient(base_url=service) as http:
        assert (await http.get("/things/a")).status_code == 401
        assert (await http.get("/things/a", headers={"x-service-token": "wrong"})).status_code == 401
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/ready")).status_code == 200
        assert (await http.get("/schema/openapi.json", headers={"x-service-token": "s3cret"})).status_code == 200


async def test_unreachable_service_is_unavailable() -> None:
    client = ServiceClient("ghost", f"http://127.0.0.1:{free_port()}", "t", retries=1)
    try:
        with pytest.raises(ServiceUnavailableError):
            await client.get("/anything")
    finally:
        await client.aclose()


def test_service_settings_read_prefixed_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_PORT", "9303")
    monkeypatch.setenv("SERVICE_TOKEN", "tok")
    settings = ServiceSettings.from_env("billing", 8003)
    assert (settings.port, settings.service_token) == (9303, "tok")


def test_unexpected_errors_are_classified_for_the_client() -> None:
    import asyncpg

    import chat_common.db  # noqa: F401 - registers the PostgreSQL classifier, as the services owning tables do
    from chat_common.errors import (
        BadRequestError,
        ConflictError,
        ServiceUnavailableError,
        classify_unexpected,
        register_unavailable,
    )

    assert isinstance(classify_unexpected(asyncpg.UniqueViolationError("dup")), ConflictError)
    assert isinstance(classify_unexpected(asyncpg.NumericValueOutOfRangeError("range")), BadRequestError)
    assert isinstance(classify_unexpected(asyncpg.SerializationError("retry")), ServiceUnavailableError)
    try:
        try:
            raise asyncpg.CannotConnectNowError("the database system is starting up")
        except asyncpg.CannotConnectNowError as exc:
            raise RuntimeError("while loading") from exc
    except RuntimeError as wrapped:
        assert isinstance(classify_unexpected(wrapped), ServiceUnavailableError)
    assert isinstance(classify_unexpected(asyncpg.InterfaceError("connection lost")), ServiceUnavailableError)

    class BucketDown(Exception):
        pass

    assert classify_unexpected(BucketDown()) is None
    register_unavailable(BucketDown)
    assert isinstance(classify_unexpected(BucketDown()), ServiceUnavailableError)
    assert classify_unexpected(KeyError("a real bug")) is None
