"""Typed clients of the internal services, one per service, each owning its paths.

Every method sends and receives the structs of :mod:`chat_common.contracts` (only a download's
bytes are streamed through untyped); no caller builds or reads a reply dict. Retries are
decided here, once per kind of call, and nowhere above: reads and calls made idempotent by a key or a turn id ride out a short outage
(``IDEMPOTENT``); the append is sent once (``SEND_ONCE``) because the turn itself decides,
after asking by turn id, whether a repeat is needed.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar
from urllib.parse import quote

from chat_common import contracts as c
from chat_common.client import IDEMPOTENT, SEND_ONCE, RetryPolicy, ServiceClient
from chat_common.errors import NotFoundError

T = TypeVar("T")



def _path_part(value: str) -> str:
    return quote(value, safe="")


class _Typed:
    def __init__(self, http: ServiceClient) -> None:
        self.http = http

    async def _call(
        self,
        method: str,
        path: str,
        reply: type[T],
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        retry: RetryPolicy = IDEMPOTENT,
    ) -> T:
        return await self.http.request(method, path, json=body, params=params, retry=retry, type=reply)

    async def ping(self) -> None:
        await self.http.ping()

    # A reply streamed through as it comes (a file download): bytes, not JSON, so no contract.
    def stream(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.http.stream(method, path, **kwargs)

    async def aclose(self) -> None:
        await self.http.aclose()


class BillingClient(_Typed):
    async def reserve(self, request: c.ReserveRequest) -> c.Reservation:
        # idempotent on turn_id: a repeat gets the first hold back
        return await self._call("POST", "/v1/reservations", c.Reservation, body=request)

    async def settle(self, reservation_id: str, request: c.SettleRequest) -> c.Reservation:
        return await self._call(
            "POST", f"/v1/reservations/{_path_part(reservation_id)}/settle", c.Reservation, body=request
        )

    async def release(self, reservation_id: str, request: c.ReleaseRequest) -> c.Reservation:
        return await self._call(
            "POST", f"/v1/reservations/{_path_part(reservation_id)}/release", c.Reservation, body=request
        )

    async def lease(self, reservation_id: str, request: c.LeaseRequest) -> c.Reservation:
        return await self._call(
            "POST", f"/v1/reservations/{_path_part(reservation_id)}/lease", c.Reservation, body=request
        )

    async def charge(self, items: list[c.Charge]) -> c.ChargeBatchResult:
        return await self._call("POST", "/v1/charges", c.ChargeBatchResult, body=c.ChargeBatch(items=items))

    async def user(self, user_id: str) -> c.User:
        return await self._call("GET", f"/v1/users/{_path_part(user_id)}", c.User)

    async def balance(self, user_id: str) -> c.Balance:
        return await self._call("GET", f"/v1/users/{_path_part(user_id)}/balance", c.Balance)

    async def models(self, user_id: str) -> c.ModelList:
        return await self._call("GET", f"/v1/users/{_path_part(user_id)}/models", c.ModelList)

    # -- per-user administration (the gateway's /v1/admin/users/...) ---------------------------

    async def export_user(self, user_id: str) -> c.BillingExport:
        return await self._call("GET", f"/v1/admin/users/{_path_part(user_id)}/export", c.BillingExport)

    async def import_user(self, data: c.BillingExport) -> c.ImportedCount:
        # sent once: a lost reply is found out by reading the user (the import is one transaction)
        return await self._call("POST", "/v1/admin/users/import", c.ImportedCount, body=data, retry=SEND_ONCE)

    async def erase_user(self, user_id: str, pseudonym: str) -> c.Removed:
        return await self._call(
            "POST", f"/v1/admin/users/{_path_part(user_id)}/erase", c.Removed, body=c.BillingErase(pseudonym=pseudonym)
        )



class SessionsClient(_Typed):
    async def create(self, request: c.SessionCreate) -> c.Session:
        # idempotent on the session id and key the turn derives
        return await self._call("POST", "/v1/sessions", c.Session, body=request)

    async def context(self, session_id: str, user_id: str, window: int) -> c.SessionContext:
        return await self._call(
            "GET",
            f"/v1/sessions/{_path_part(session_id)}/context",
            c.SessionContext,
            params={"user_id": user_id, "window": window},
        )

    async def page(self, user_id: str, limit: int, offset: int) -> c.SessionPage:
        return await self._call(
            "GET", "/v1/sessions", c.SessionPage, params={"user_id": user_id, "limit": limit, "offset": offset}
        )

    async def entries(self, session_id: str, user_id: str) -> c.EntryList:
        """Every entry of the session, in order."""
        return await self._call(
            "GET", f"/v1/sessions/{_path_part(session_id)}/entries", c.EntryList, params={"user_id": user_id}
        )

    async def last_entries(self, session_id: str, user_id: str, last: int) -> c.EntryList:
        return await self._call(
            "GET",
            f"/v1/sessions/{_path_part(session_id)}/entries",
            c.EntryList,
            params={"user_id": user_id, "last": last},
        )

    async def append(self, session_id: str, request: c.TurnAppend) -> c.TurnResult:
        # Sent once: a repeat is safe (turn id), but whether to repeat is the turn's decision,
        # made after it has asked what happened (``stored_turn``).
        return await self._call(
            "POST", f"/v1/sessions/{_path_part(session_id)}/turns", c.TurnResult, body=request, retry=SEND_ONCE
        )

    async def stored_turn(self, session_id: str, turn_id: str, user_id: str) -> c.TurnResult:
        return await self._call(
            "GET",
            f"/v1/sessions/{_path_part(session_id)}/turns/{_path_part(turn_id)}",
            c.TurnResult,
            params={"user_id": user_id},
        )

    async def store_summary(self, session_id: str, request: c.SummaryUpdate) -> c.Session:
        return await self._call("PUT", f"/v1/sessions/{_path_part(session_id)}/summary", c.Session, body=request)

    async def session(self, session_id: str, user_id: str) -> c.Session:
        return await self._call("GET", f"/v1/sessions/{_path_part(session_id)}", c.Session, params={"user_id": user_id})

    async def remove(self, session_id: str, user_id: str) -> None:
        await self.http.request(
            "DELETE", f"/v1/sessions/{_path_part(session_id)}", params={"user_id": user_id}, retry=IDEMPOTENT
        )

    async def search(self, user_id: str, query: str, limit: int) -> c.SearchResult:
        """The user's entries matching ``query`` (plain text), best first."""
        return await self._call(
            "GET", "/v1/search", c.SearchResult, params={"user_id": user_id, "query": query, "limit": limit}
        )

    async def expire(self, older_than_seconds: float, limit: int) -> c.ExpiredPage:
        # Sent once: each call removes a new batch; what a lost reply removed is found again
        # through ``expired`` (the sessions service records every removal with it).
        return await self._call(
            "POST", "/v1/retention/expire", c.ExpiredPage,
            body=c.ExpireRequest(older_than_seconds=older_than_seconds, limit=limit), retry=SEND_ONCE,
        )

    async def expired(self, older_than_seconds: float, limit: int) -> c.ExpiredPage:
        return await self._call(
            "GET", "/v1/retention/expired", c.ExpiredPage,
            params={"older_than_seconds": older_than_seconds, "limit": limit},
        )

    async def expired_done(self, session_ids: list[str]) -> None:
        await self.http.request("POST", "/v1/retention/ack", json=c.ExpiredAck(session_ids=session_ids), retry=IDEMPOTENT)

    async def owed(self, older_than_seconds: float, limit: int) -> c.OutboxPage:
        return await self._call(
            "GET", "/v1/outbox", c.OutboxPage, params={"older_than_seconds": older_than_seconds, "limit": limit}
        )

    async def acknowledge(self, outbox_ids: list[int]) -> None:
        await self.http.request("POST", "/v1/outbox/ack", json=c.OutboxAck(outbox_ids=outbox_ids), retry=IDEMPOTENT)

    # -- per-user administration ------------------------------------------------------------------

    async def export_user(self, user_id: str) -> c.SessionsExport:
        return await self._call("GET", f"/v1/admin/users/{_path_part(user_id)}/export", c.SessionsExport)

    async def user_keys(self, user_id: str) -> c.SessionKeys:
        return await self._call("GET", f"/v1/admin/users/{_path_part(user_id)}/keys", c.SessionKeys)

    async def import_user(self, user_id: str, data: c.SessionsExport) -> c.ImportedCount:
        # idempotent: what an earlier attempt stored is kept
        return await self._call("POST", f"/v1/admin/users/{_path_part(user_id)}/import", c.ImportedCount, body=data)

    async def erase_user(self, user_id: str) -> c.Removed:
        return await self._call("POST", f"/v1/admin/users/{_path_part(user_id)}/erase", c.Removed)

    async def erasure(self, subject: str) -> c.Erasure | None:
        try:
            return await self._call("GET", f"/v1/admin/erasures/{_path_part(subject)}", c.Erasure)
        except NotFoundError:
            return None

    async def erasure_start(self, subject: str) -> c.Erasure:
        return await self._call("PUT", f"/v1/admin/erasures/{_path_part(subject)}", c.Erasure)

    async def erasure_step(self, subject: str, step: str, removed: c.Removed) -> c.Erasure:
        return await self._call(
            "POST", f"/v1/admin/erasures/{_path_part(subject)}/steps", c.Erasure,
            body=c.ErasureStep(step=step, removed=removed),
        )

    async def erasure_finish(self, subject: str) -> c.Erasure:
        return await self._call("POST", f"/v1/admin/erasures/{_path_part(subject)}/finish", c.Erasure)



class FilesClient(_Typed):
    async def record(self, file_name: str, user_id: str) -> c.FileRecord:
        return await self._call("GET", f"/v1/files/{_path_part(file_name)}", c.FileRecord, params={"user_id": user_id})

    async def signed_url(self, file_name: str, user_id: str) -> c.SignedUrl:
        return await self._call(
            "GET", f"/v1/files/{_path_part(file_name)}/url", c.SignedUrl, params={"user_id": user_id}
        )

    async def mark_used(self, file_name: str, use: c.FileUse) -> None:
        await self.http.request("POST", f"/v1/files/{_path_part(file_name)}/used", json=use, retry=IDEMPOTENT)

    async def remove(self, file_name: str, user_id: str | None) -> None:
        """``user_id`` None: only an upload staged without an owner can go (the files API)."""
        params = {} if user_id is None else {"user_id": user_id}
        await self.http.request("DELETE", f"/v1/files/{_path_part(file_name)}", params=params, retry=IDEMPOTENT)

    # -- an upload through the gateway (uploads/controllers.py) ---------------------------------

    async def check_upload(self, params: dict[str, str], head: bytes) -> None:
        """Refuses (415, 413) a file whose name, first bytes or owner's quota will not do."""
        await self.http.request("POST", "/v1/uploads/check", params=params, content=head, retry=IDEMPOTENT)

    async def upload(self, params: dict[str, str], body: AsyncIterator[bytes]) -> c.StoredFile:
        # a stream is sent once: its bytes cannot be read again
        return await self.http.request(
            "POST", "/v1/uploads", params=params, content=body, retry=SEND_ONCE, type=c.StoredFile
        )

    async def attach(self, file_name: str, user_id: str, session_id: str) -> c.StoredFile:
        return await self._call(
            "POST", f"/v1/files/{_path_part(file_name)}/attach", c.StoredFile,
            body={"user_id": user_id, "session_id": session_id},
        )

    async def remove_session_files(self, session_id: str, user_id: str) -> None:
        await self.http.request(
            "DELETE", f"/v1/sessions/{_path_part(session_id)}/files", params={"user_id": user_id}, retry=IDEMPOTENT
        )

    # -- per-user administration ------------------------------------------------------------------

    async def list_user(self, user_id: str) -> c.FilesExport:
        """The user's files without their bytes."""
        return await self._call("GET", f"/v1/admin/users/{_path_part(user_id)}/files", c.FilesExport)

    async def export_user(self, user_id: str) -> c.FilesExport:
        return await self._call("GET", f"/v1/admin/users/{_path_part(user_id)}/files/export", c.FilesExport)

    async def import_files(self, user_id: str, data: c.FilesExport) -> c.ImportedCount:
        # idempotent: a file an earlier attempt stored is kept
        return await self._call("POST", f"/v1/admin/users/{_path_part(user_id)}/files/import", c.ImportedCount, body=data)

    async def erase_user(self, user_id: str) -> c.Removed:
        return await self._call("POST", f"/v1/admin/users/{_path_part(user_id)}/files/erase", c.Removed)
