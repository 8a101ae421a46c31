"""Per-user administration across every store: export, import and erase one user
(``chat-admin export-user``, ``import-user``, ``erase-user``).

The gateway owns this cross-service work for the reason it owns type 4 and retention: it is the
one component that already talks to sessions, files, billing and Redis; each service only
exports, imports or erases its own rows (``/v1/admin/...`` of each), and no service learns
about another. The endpoints are on the public gateway, so each call must carry
``X-Service-Token`` equal to the gateway's ``SERVICE_TOKEN`` (compared in constant time); a
gateway without one refuses them all.

An erase is resumable: its progress lives in the sessions service (``erasures``), keyed by an
HMAC-SHA256 of the user id under the gateway's service token, so the record never names the
user. Every step is idempotent and every run does every step, so a run cut short anywhere
(a service killed, a store down) is finished by the next one, and a repeat removes nothing
more. Charges the user's outbox still owes are booked first, then billing erases (the user is
then unknown to every new turn), Redis last (so whatever a turn in flight cached meanwhile is
found too).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import FromPath
from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat_common import contracts as c
from chat_common.app import SERVICE_TOKEN_HEADER, tokens_match
from chat_common.client import ServiceClient
from chat_common.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ServiceUnavailableError,
    UnauthorizedError,
    parse_uuid,
)
from chat_gateway.clients import BillingClient, FilesClient, SessionsClient
from chat_gateway.context import GatewayContext
from chat_gateway.gateway import Gateway, GatewayDependency

logger = logging.getLogger(__name__)

MAX_IMPORT_BYTES = 1024 * 1024 * 1024
ADMIN_TIMEOUT = 300.0  # seconds a service may take to answer one admin call
REDIS_BATCH = 500
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_export_decoder = msgspec.json.Decoder(c.UserExport)


def authorize(request: Request[Any, Any, Any], gateway: Gateway) -> GatewayContext:
    context = gateway.context
    expected = context.settings.service.service_token
    if not expected:
        raise ForbiddenError("admin endpoints are disabled: the gateway has no SERVICE_TOKEN")
    if not tokens_match(request.headers.get(SERVICE_TOKEN_HEADER), expected):
        raise UnauthorizedError("X-Service-Token missing or wrong")
    return context


def canonical_user(value: str) -> str:
    return str(parse_uuid(value, "user_id"))


def _mac(secret: str, purpose: bytes, user_id: str) -> bytes:
    return hmac.new(secret.encode(), purpose + b":" + user_id.encode(), hashlib.sha256).digest()


def erasure_subject(secret: str, user_id: str) -> str:
    return _mac(secret, b"erase-user", user_id).hex()


def pseudonym_for(secret: str, user_id: str) -> str:
    """The id the user's ledger rows keep: the same on every run (so a resumed erase moves any
    rows to the same id), unlinkable to the user without the secret."""
    return str(uuid.UUID(bytes=_mac(secret, b"ledger-pseudonym", user_id)[:16], version=4))


def _merge(before: c.Removed | None, now: c.Removed) -> c.Removed:
    if before is None:
        return now
    out = c.Removed(
        removed=dict(before.removed), objects=before.objects + now.objects, pseudonymized=dict(before.pseudonymized)
    )
    for key, value in now.removed.items():
        out.removed[key] = out.removed.get(key, 0) + value
    for key, value in now.pseudonymized.items():
        out.pseudonymized[key] = out.pseudonymized.get(key, 0) + value
    return out


async def erase_redis(redis: Redis, user_id: str, session_ids: list[str], turn_ids: list[str]) -> int:
    """Every key that names the user or one of the user's sessions or turns, by name or by
    content (the cached context carries its owner, a turn's stream its user in ``:meta`` and in
    its last frame): ``ctx:{session}``, ``lock:session:{session}``, ``turnstream:{turn}`` and
    its ``:meta``/``:live``/``:cancel``, rate-limit keys of the user, and any other. One SCAN of
    the keyspace, reading each value once: an operator's occasional cost."""
    needle = user_id.encode()
    ids = {i.encode() for i in (*session_ids, *turn_ids, user_id)}
    doomed: set[bytes] = set()
    for sid in session_ids:
        doomed.update({f"ctx:{sid}".encode(), f"lock:session:{sid}".encode()})
    for tid in turn_ids:
        base = f"turnstream:{{{tid}}}"
        doomed.update({base.encode(), f"{base}:meta".encode(), f"{base}:live".encode(), f"{base}:cancel".encode()})
    batch: list[bytes] = []

    async def examine(keys: list[bytes]) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.type(key)
            types = await pipe.execute()
        async with redis.pipeline(transaction=False) as pipe:
            for key, kind in zip(keys, types, strict=True):
                kind = kind.decode() if isinstance(kind, bytes) else str(kind)
                if kind == "string":
                    pipe.get(key)
                elif kind == "hash":
                    pipe.hgetall(key)
                elif kind == "list":
                    pipe.lrange(key, 0, -1)
                elif kind == "set":
                    pipe.smembers(key)
                elif kind == "zset":
                    pipe.zrange(key, 0, -1)
                elif kind == "stream":
                    pipe.xrange(key, "-", "+")
                else:
                    pipe.exists(key)
            values = await pipe.execute()
        for key, value in zip(keys, values, strict=True):
            if needle in key or any(found in ids for found in _UUID.findall(key)) or needle in _flatten(value):
                doomed.add(key)
                if key.startswith(b"turnstream:") and key.endswith(b":meta"):
                    base = key[: -len(b":meta")]
                    doomed.update({base, base + b":live", base + b":cancel"})

    async for key in redis.scan_iter(count=1000):
        batch.append(key)
        if len(batch) >= REDIS_BATCH:
            await examine(batch)
            batch = []
    if batch:
        await examine(batch)
    deleted = 0
    names = sorted(doomed)
    for start in range(0, len(names), REDIS_BATCH):
        deleted += int(await redis.delete(*names[start:start + REDIS_BATCH]))
    return deleted


def _flatten(value: Any) -> bytes:
    if value is None or isinstance(value, (int, float)):
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict):
        return b"\x00".join(_flatten(k) + b"\x00" + _flatten(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return b"\x00".join(_flatten(v) for v in value)
    return str(value).encode()


@dataclass
class _Clients:
    sessions: SessionsClient
    files: FilesClient
    billing: BillingClient
    redis: Redis


class UserAdmin:
    """One admin request's work. Its own clients: the turn's clients give up on a reply after
    10 s, and exporting or erasing a long history may take longer."""

    def __init__(self, context: GatewayContext) -> None:
        settings = context.settings
        token = settings.service.service_token
        self.secret = token
        self.clients = _Clients(
            sessions=SessionsClient(ServiceClient("sessions", settings.sessions_url, token, timeout=ADMIN_TIMEOUT)),
            files=FilesClient(ServiceClient("files", settings.files_url, token, timeout=ADMIN_TIMEOUT)),
            billing=BillingClient(ServiceClient("billing", settings.billing_url, token, timeout=ADMIN_TIMEOUT)),
            redis=context.redis,
        )

    async def aclose(self) -> None:
        for client in (self.clients.sessions, self.clients.files, self.clients.billing):
            await client.aclose()

    async def export(self, user_id: str) -> c.UserExport:
        ctx = self.clients
        billing = await ctx.billing.export_user(user_id)  # 404 for an unknown user
        sessions = await ctx.sessions.export_user(user_id)
        files = await ctx.files.export_user(user_id)
        return c.UserExport(
            exported_at=datetime.now(timezone.utc), user_id=user_id, billing=billing,
            sessions=sessions.sessions, files=files.files,
        )

    async def import_(self, doc: c.UserExport) -> c.ImportReport:
        if doc.format != c.EXPORT_FORMAT:
            raise BadRequestError(f"not a user export (format {doc.format!r})")
        if doc.version != c.EXPORT_VERSION:
            raise BadRequestError(f"export version {doc.version} is not supported (this system reads {c.EXPORT_VERSION})")
        user_id = canonical_user(doc.user_id)
        if canonical_user(doc.billing.user.user_id) != user_id:
            raise BadRequestError("the export's user ids disagree")
        ctx = self.clients
        try:
            await ctx.billing.user(user_id)
        except NotFoundError:
            pass
        else:
            raise ConflictError("user already exists", details={"user_id": user_id})
        # Sessions and files first (each idempotent, so an import cut short can be sent again),
        # the user last: until it exists, nothing of it answers.
        imported: dict[str, int] = {}
        done = await ctx.sessions.import_user(user_id, c.SessionsExport(sessions=doc.sessions))
        imported.update(done.imported)
        files = 0
        for item in doc.files:
            files += (await ctx.files.import_files(user_id, c.FilesExport(files=[item]))).imported.get("files", 0)
        imported["files"] = files
        imported.update((await ctx.billing.import_user(doc.billing)).imported)
        return c.ImportReport(user_id=user_id, imported=imported)

    async def erase(self, user_id: str) -> c.EraseReport:
        ctx = self.clients
        subject = erasure_subject(self.secret, user_id)
        pseudonym = pseudonym_for(self.secret, user_id)
        before = await ctx.sessions.erasure(subject)
        keys = await ctx.sessions.user_keys(user_id)
        if before is None:
            try:
                await ctx.billing.user(user_id)
            except NotFoundError:
                # No user and no record of an erase (a record kept under a token since rotated
                # cannot be found): go on only if something of the user is left to remove.
                if not keys.session_ids and not keys.owed and not (await ctx.files.list_user(user_id)).files:
                    raise NotFoundError("user not found, and no erase of it was started") from None
        record = await ctx.sessions.erasure_start(subject)
        postgres: dict[str, int] = {}
        pseudonymized: dict[str, int] = {}
        objects = 0

        async def step(name: str, removed: c.Removed) -> None:
            nonlocal objects
            postgres.update(removed.removed)
            pseudonymized.update(removed.pseudonymized)
            objects += removed.objects
            await ctx.sessions.erasure_step(subject, name, _merge(record.steps.get(name), removed))

        # What the user's stored turns still owe is booked first (each key once: an answered one
        # is "already"), so the ledger kept for accounting is complete.
        owed: dict[str, int] = {}
        for start in range(0, len(keys.owed), 500):
            for result in (await ctx.billing.charge(keys.owed[start:start + 500])).results:
                owed[result.status] = owed.get(result.status, 0) + 1
        await step("billing", await ctx.billing.erase_user(user_id, pseudonym))
        await step("sessions", await ctx.sessions.erase_user(user_id))
        await step("files", await ctx.files.erase_user(user_id))
        try:
            redis_keys = await erase_redis(ctx.redis, user_id, keys.session_ids, keys.turn_ids)
        except (RedisError, OSError) as exc:
            raise ServiceUnavailableError(f"redis unavailable: {type(exc).__name__}") from exc
        await step("redis", c.Removed(removed={"redis": redis_keys}))
        postgres.pop("redis", None)
        await ctx.sessions.erasure_finish(subject)
        logger.info("user erased", extra={"subject": subject[:12], "redis_keys": redis_keys, "objects": objects})
        return c.EraseReport(
            user_id=user_id, pseudonym=pseudonym,
            resumed=before is not None and before.finished_at is None,
            finished_before=before is not None and before.finished_at is not None,
            steps_before=sorted(before.steps) if before is not None else [],
            postgres=postgres, pseudonymized=pseudonymized, redis_keys=redis_keys, objects=objects,
            owed_charges=owed,
        )


class AdminController(Controller):
    """``/v1/admin/users``: one user across every store (X-Service-Token required)."""

    path = "/v1/admin/users"
    tags = ["admin"]

    @get("/{user_id:str}/export")
    async def export_user(
        self, request: Request[Any, Any, Any], gateway: GatewayDependency, user_id: FromPath[str]
    ) -> c.UserExport:
        admin = UserAdmin(authorize(request, gateway))
        try:
            return await admin.export(canonical_user(user_id))
        finally:
            await admin.aclose()

    @post("/import", status_code=201, request_max_body_size=MAX_IMPORT_BYTES)
    async def import_user(self, request: Request[Any, Any, Any], gateway: GatewayDependency) -> c.ImportReport:
        context = authorize(request, gateway)
        try:
            doc = _export_decoder.decode(await request.body())
        except msgspec.DecodeError as exc:
            raise BadRequestError(f"not a user export: {exc}") from None
        admin = UserAdmin(context)
        try:
            return await admin.import_(doc)
        finally:
            await admin.aclose()

    @post("/{user_id:str}/erase", status_code=200)
    async def erase_user(
        self, request: Request[Any, Any, Any], gateway: GatewayDependency, user_id: FromPath[str]
    ) -> c.EraseReport:
        admin = UserAdmin(authorize(request, gateway))
        try:
            return await admin.erase(canonical_user(user_id))
        finally:
            await admin.aclose()
