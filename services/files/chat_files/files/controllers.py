"""HTTP endpoints of the files service (docs/internal-api.md, Files). Every per-file call is
scoped by ``user_id``: another user's file answers exactly like a missing one (404)."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated
from urllib.parse import quote

from litestar import Controller, Request, delete, get, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from litestar.response import Stream

from chat_common.errors import BadRequestError, NotFoundError, parse_uuid
from chat_common.names import ISSUED_FILE_NAME
from chat_files.files import schemas
from chat_files.files.content_types import HEAD_BYTES
from chat_files.files.services import FilesService

Files = NamedDependency[FilesService]
OriginalName = Annotated[str, Parameter(min_length=1, max_length=schemas.MAX_ORIGINAL_NAME_INPUT)]
FileName = FromPath[str]
SessionIdPath = FromPath[str]  # parsed by parse_uuid: one answer for a malformed id
OptionalUserId = FromQuery[uuid.UUID | None]
UserId = FromQuery[uuid.UUID]
AnyOwner = FromQuery[bool]


def _checked_name(file_name: str) -> str:
    # Names are made by this service; anything else cannot exist, whatever it looks like.
    # fullmatch: ``$`` alone would let "<name>\n" through.
    if not ISSUED_FILE_NAME.fullmatch(file_name):
        raise NotFoundError("file not found")
    return file_name


def canonical_path_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """The file name must be the path segment as sent: the router folds "//x", "x/" and an
    encoded "%2Fx" into the same route as "x", so without this a caller holding a name of its
    own making ("/" + a real name) would be served the real file and believe its name valid."""
    file_name = connection.path_params.get("file_name")
    if file_name is None:
        return
    raw = connection.scope.get("raw_path", b"").decode("latin-1").split("?", 1)[0]
    segments = raw.split("/")
    try:
        at = segments.index("files")
    except ValueError:
        raise NotFoundError("file not found") from None
    if (
        at + 1 >= len(segments)
        or segments[at + 1] != file_name
        or raw.endswith("/")
        or "" in segments[1:]
    ):
        raise NotFoundError("file not found")


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise BadRequestError("Content-Length must be a non-negative integer")
    return int(raw)


def _owner(user_id: uuid.UUID | None, any_owner: bool) -> uuid.UUID | None:
    if user_id is None and not any_owner:
        raise BadRequestError("user_id is required (or any_owner=true for a capability read by name)")
    return user_id


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        yield chunk


class FilesController(Controller):
    path = "/v1"
    guards = [canonical_path_guard]

    @post("/uploads", status_code=201, request_max_body_size=None)
    async def upload(
        self,
        request: Request,
        files: Files,
        original_name: OriginalName,
        user_id: OptionalUserId = None,
        session_id: FromQuery[uuid.UUID | None] = None,
    ) -> schemas.File:
        """Stream the raw body into the bucket. Without ``user_id`` the file is staged with no
        owner (the gateway had not read the form's user_id yet) until ``attach``."""
        return await files.upload(
            _body(request),
            original_name=original_name,
            user_id=user_id,
            session_id=session_id,
            content_length=_content_length(request),
        )

    @post("/uploads/check", status_code=200, request_max_body_size=4 * HEAD_BYTES)
    async def check_upload(
        self,
        request: Request,
        files: Files,
        original_name: OriginalName,
        user_id: OptionalUserId = None,
        complete: FromQuery[bool] = False,
    ) -> schemas.TypeCheck:
        """Type (and quota) check of a file's first bytes, before its body is sent: lets the
        gateway refuse a wrong file without streaming all of it first."""
        head = await request.body()
        result = files.check_type(original_name, head, complete)
        if user_id is not None:
            await files.check_quota(user_id, len(head) if complete else 0)
        return result

    @post("/sessions/{session_id:str}/files", status_code=201, request_max_body_size=None)
    async def upload_to_session(
        self,
        request: Request,
        files: Files,
        session_id: SessionIdPath,
        user_id: UserId,
        original_name: OriginalName,
    ) -> schemas.File:
        return await files.upload(
            _body(request),
            original_name=original_name,
            user_id=user_id,
            session_id=parse_uuid(session_id, "session_id"),
            content_length=_content_length(request),
        )

    @get("/files/{file_name:str}")
    async def get_file(
        self, files: Files, file_name: FileName, user_id: OptionalUserId = None, any_owner: AnyOwner = False
    ) -> schemas.File:
        return await files.get(_checked_name(file_name), _owner(user_id, any_owner))

    @get("/files/{file_name:str}/content")
    async def get_content(
        self, files: Files, file_name: FileName, user_id: OptionalUserId = None, any_owner: AnyOwner = False
    ) -> Stream:
        meta, chunks = await files.open_content(_checked_name(file_name), _owner(user_id, any_owner))
        return Stream(
            chunks,
            # Litestar adds "; charset=utf-8" to text/* itself (and text here is UTF-8).
            media_type=meta.content_type.split(";")[0] if meta.content_type.startswith("text/") else meta.content_type,
            headers={
                "content-length": str(meta.size),
                "x-file-size": str(meta.size),
                "x-file-sha256": meta.sha256,
                # Percent-encoded: a header value must stay ASCII.
                "x-file-original-name": quote(meta.original_name, safe=""),
                "x-content-type-options": "nosniff",
            },
        )

    @get("/files/{file_name:str}/url")
    async def get_url(
        self,
        files: Files,
        file_name: FileName,
        user_id: UserId,
        expires_seconds: FromQuery[int | None] = None,
    ) -> schemas.PresignedUrl:
        return await files.presigned_url(_checked_name(file_name), user_id, expires_seconds)

    @post("/files/{file_name:str}/attach", status_code=200)
    async def attach(self, files: Files, file_name: FileName, data: JSONBody[schemas.Attach]) -> schemas.File:
        return await files.attach(_checked_name(file_name), data)

    @post("/files/{file_name:str}/used", status_code=200)
    async def mark_used(self, files: Files, file_name: FileName, data: JSONBody[schemas.MarkUsed]) -> schemas.File:
        return await files.mark_used(_checked_name(file_name), data)

    @delete("/files/{file_name:str}", status_code=204)
    async def delete_file(self, files: Files, file_name: FileName, user_id: OptionalUserId = None) -> None:
        """Without ``user_id`` only a staged upload that has no owner yet can be deleted (the
        gateway dropping an upload whose form never named a valid user)."""
        await files.delete(_checked_name(file_name), user_id)

    @get("/sessions/{session_id:str}/files")
    async def list_session_files(self, files: Files, session_id: SessionIdPath, user_id: UserId) -> schemas.FileList:
        return await files.session_files(parse_uuid(session_id, "session_id"), user_id)

    @delete("/sessions/{session_id:str}/files", status_code=200)
    async def delete_session_files(
        self, files: Files, session_id: SessionIdPath, user_id: UserId
    ) -> schemas.Deleted:
        return await files.delete_session_files(parse_uuid(session_id, "session_id"), user_id)

    @get("/users/{user_id:str}/usage")
    async def usage(self, files: Files, user_id: FromPath[str]) -> schemas.Usage:
        return await files.usage(parse_uuid(user_id, "user_id"))

    @post("/sweep", status_code=200)
    async def sweep(self, files: Files) -> schemas.SweepResult:
        return await files.sweep()

