"""``POST /upload`` and ``GET /uploads/{fileName}`` (docs/protocol.md, "Uploads" and "Downloads").

The upload never holds the body: the multipart stream is parsed as it arrives and the file
part is passed on, chunk by chunk, as the streamed body of the files service's upload. Both
this gateway and the files service count the bytes against ``MAX_FILE_SIZE`` as they pass.
"""
from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, unquote

import msgspec
from litestar import Request, Response, get, post
from litestar.exceptions import InternalServerException
from litestar.params import FromPath
from litestar.response import Stream

from chat_common import contracts as c
from chat_common.errors import AppError, NotFoundError
from chat_common.names import ISSUED_FILE_NAME, NEW_SESSION, TYPE_HEAD_BYTES
from chat_gateway.auth import authenticate_http, same_user
from chat_gateway.chat.naming import session_name
from chat_gateway.context import GatewayContext
from chat_gateway.gateway import Gateway, GatewayDependency
from chat_gateway.settings import GatewaySettings
from chat_gateway.uploads.multipart import (
    Field,
    FileData,
    FileEnd,
    FileStart,
    StreamingForm,
    boundary_of,
)
from chat_gateway.uploads.pipe import FilePipe
from chat_gateway.uploads.refusals import (
    BadUpload,
    UploadForbidden,
    UploadNotFound,
    UploadTooLarge,
    client_failure,
)
from chat_gateway.ws.limits import Verdict, subject_of

logger = logging.getLogger(__name__)

UPLOAD_OK = "File uploaded successfully"
USER_NOT_FOUND = "User Does Not Exists"
SESSION_NOT_FOUND = "Session not found"
MODEL_ACCESS = "User Does Not Have Model Access"
MAX_MODEL_NAME_CHARS = 200  # what the sessions service stores (and the socket protocol accepts)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_RAW_FILE_NAME_BYTES = 1024


class UploadedFile(msgspec.Struct, rename="camel", kw_only=True):
    """``data`` of a stored upload (docs/protocol.md, "Uploads": the original's camelCase names)."""

    file_name: str
    session_id: str
    image_url: str
    size: int
    sha256: str
    content_type: str
    original_name: str


class UploadReply(msgspec.Struct, kw_only=True):
    """Every answer of ``POST /upload``: ``data`` is null on a refusal."""

    message: str
    data: UploadedFile | None = None


def _failure(status: int, message: str) -> Response[UploadReply]:
    return Response(UploadReply(message=message, data=None), status_code=status)


async def _rate_limited(request: Request, gateway: Gateway, authenticated: str | None) -> Response[Any] | None:
    """The 429 to answer when this user (or, unauthenticated, this address) is over the
    per-window request budget it shares with its sockets; None to go on."""
    if await gateway.limits.requests.hit(subject_of(authenticated, request.client)) is Verdict.OK:
        return None
    settings = gateway.settings
    return Response(
        {
            "message": f"Rate limit exceeded: at most {settings.rate_limit_requests} requests per "
            f"{settings.rate_limit_window_seconds} seconds; slow down",
            "data": None,
        },
        status_code=429,
        headers={"retry-after": str(settings.rate_limit_window_seconds)},
    )


def _parse_user_id(raw: str, authenticated: str | None) -> str:
    raw = raw.strip()
    if authenticated is not None and raw and not same_user(raw, authenticated):
        raise UploadForbidden("user_id does not match the authenticated user")
    value = raw or (authenticated or "")
    if not value:
        raise BadUpload("missing field: user_id")
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise BadUpload("user_id must be a UUID") from exc


def _parse_session_id(raw: str) -> str:
    raw = raw.strip()
    if raw == NEW_SESSION:
        return raw
    if not raw:
        raise BadUpload("missing field: session_id")
    try:
        return str(uuid.UUID(raw))
    except ValueError as exc:
        raise BadUpload('session_id must be a UUID or "NEW"') from exc


def session_name_for(original_name: str) -> str:
    """A session made for an upload is named by the same rule as one made by a first message
    (chat/naming.py), from the file's name."""
    try:
        return session_name(original_name)
    except ValueError:  # a name of only whitespace
        return "file"


class _Upload:
    """One ``POST /upload``: the form's fields as they arrive, and the file's way out."""

    def __init__(self, ctx: GatewayContext, authenticated: str | None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.authenticated = authenticated
        self.fields: dict[str, str] = {}
        self.user_id = ""
        self.session_id = ""
        self.user_checked = False
        self.session_checked = False
        self.original_name = ""
        self.file_bytes = 0
        self.head: list[bytes] = []
        self.head_size = 0
        self.pipe: FilePipe | None = None
        self.stored: c.StoredFile | None = None
        self.created_session: str | None = None
        self.model_name: str | None = None

    # -- checks ----------------------------------------------------------------------------------

    async def check_user(self) -> None:
        self.user_id = _parse_user_id(self.fields.get("user_id", ""), self.authenticated)
        try:
            await self.ctx.billing.user(self.user_id)
        except NotFoundError as exc:
            raise UploadNotFound(USER_NOT_FOUND) from exc
        self.user_checked = True

    async def check_session(self) -> None:
        """The session is "NEW" or one of the user's own (another's is reported as missing).
        For "NEW", the model it is to use must be one the user is granted: checked here,
        before the file or the session is created."""
        self.session_id = _parse_session_id(self.fields.get("session_id", ""))
        if self.session_id != NEW_SESSION:
            try:
                await self.ctx.sessions.session(self.session_id, self.user_id)
            except NotFoundError as exc:
                raise UploadNotFound(SESSION_NOT_FOUND) from exc
        elif "model_name" in self.fields or self.stored is not None:
            await self.check_model()
        self.session_checked = True

    async def check_model(self) -> None:
        model_name = self.fields.get("model_name", "").strip()
        if not model_name:
            raise BadUpload("missing field: model_name (needed to create a NEW session)")
        if len(model_name) > MAX_MODEL_NAME_CHARS:
            raise BadUpload(f"model_name is too long (at most {MAX_MODEL_NAME_CHARS} characters)")
        if _CONTROL.search(model_name):
            raise BadUpload("model_name must not contain control characters")
        try:
            granted = await self.ctx.billing.models(self.user_id)
        except NotFoundError as exc:
            raise UploadNotFound(USER_NOT_FOUND) from exc
        names = {m.name for m in granted.models}
        if model_name not in names:
            # unknown and not granted read the same: the catalogue is not the client's to probe
            raise UploadForbidden(MODEL_ACCESS)
        self.model_name = model_name

    # -- events ----------------------------------------------------------------------------------

    async def on_field(self, event: Field) -> None:
        self.fields[event.name] = event.value

    async def on_file_start(self, event: FileStart) -> None:
        if len(event.filename.encode()) > MAX_RAW_FILE_NAME_BYTES:
            raise BadUpload(f"file name is too long (at most {MAX_RAW_FILE_NAME_BYTES} bytes)")
        if not event.filename.strip():
            raise BadUpload("the file has no name")
        self.original_name = event.filename
        # Fields sent before the file are checked before any byte of it is sent on: a wrong
        # user or session is refused at once, and with the owner known the files service
        # enforces the quota while the file streams. Fields sent after are checked at the end.
        if "user_id" in self.fields or self.authenticated is not None:
            await self.check_user()
            if "session_id" in self.fields:
                await self.check_session()

    async def on_file_data(self, event: FileData) -> None:
        self.file_bytes += len(event.data)
        if self.file_bytes > self.settings.max_file_size_bytes:
            raise UploadTooLarge(f"File is larger than the {self._limit_text()} limit")
        if self.pipe is not None:
            await self.pipe.write(event.data)
            return
        self.head.append(event.data)
        self.head_size += len(event.data)
        if self.head_size >= TYPE_HEAD_BYTES:
            await self._start_pipe(complete=False)

    async def on_file_end(self) -> None:
        if self.pipe is None:
            await self._start_pipe(complete=True)
        assert self.pipe is not None
        self.stored = await self.pipe.finish()

    def _limit_text(self) -> str:
        return f"{self.settings.max_file_size_bytes / (1024 * 1024):g} MB"

    async def _start_pipe(self, *, complete: bool) -> None:
        head = b"".join(self.head)
        self.head = []
        params: dict[str, str] = {"original_name": self.original_name}
        if self.user_checked:
            params["user_id"] = self.user_id
        # A wrong type is refused on the file's first bytes, before the rest is sent on.
        await self.ctx.files.check_upload({**params, "complete": str(complete).lower()}, head[:TYPE_HEAD_BYTES])
        if self.session_checked and self.session_id != NEW_SESSION:
            params["session_id"] = self.session_id
        self.pipe = FilePipe(self.ctx.files, params)
        await self.pipe.write(head)

    # -- the end ---------------------------------------------------------------------------------

    async def complete(self) -> UploadedFile:
        if self.stored is None:
            raise BadUpload("missing field: file")
        if not self.user_checked:
            await self.check_user()
        if not self.session_checked:
            await self.check_session()
        file_name = self.stored.file_name
        session_id = self.session_id
        if session_id == NEW_SESSION:
            if self.model_name is None:
                await self.check_model()
            model_name = self.model_name
            prompt = self.fields.get("session_prompt", "")
            if len(prompt) > self.settings.max_prompt_chars:
                raise BadUpload(f"session_prompt is too long (at most {self.settings.max_prompt_chars} characters)")
            assert model_name is not None  # check_model set it or refused
            session = await self.ctx.sessions.create(c.SessionCreate(
                user_id=self.user_id, name=session_name_for(self.stored.original_name), model_name=model_name,
                prompt=prompt, idempotency_key=f"upload:{file_name}",
            ))
            session_id = session.session_id
            self.created_session = session_id
        if self.stored.session_id != session_id:
            self.stored = await self.ctx.files.attach(file_name, self.user_id, session_id)
        stored = self.stored
        return UploadedFile(
            file_name=file_name,
            session_id=session_id,
            image_url=f"{self.settings.public_url}/uploads/{file_name}",
            size=stored.size,
            sha256=stored.sha256,
            content_type=stored.content_type,
            original_name=stored.original_name,
        )

    async def discard(self) -> None:
        """Undo what was stored for an upload that failed."""
        if self.pipe is not None and self.stored is None:
            await self.pipe.abort()
        if self.stored is not None:
            # Without a checked user only an upload staged with no owner can go (files API).
            try:
                await self.ctx.files.remove(self.stored.file_name, self.user_id if self.user_checked else None)
            except NotFoundError:
                pass  # already gone (the files service drops an upload it refused to attach)
            except AppError as exc:
                # The sweep removes a staged file nobody attached.
                logger.warning("could not remove the file of a failed upload: %s", exc.message)
        if self.created_session is not None:
            # A "NEW" session made for a file that then could not be attached would be empty.
            try:
                await self.ctx.sessions.remove(self.created_session, self.user_id)
            except AppError as exc:
                logger.warning("could not remove the session of a failed upload: %s", exc.message)


def _field_limits(settings: GatewaySettings) -> dict[str, int]:
    return {
        "user_id": 200,
        "session_id": 200,
        "model_name": MAX_MODEL_NAME_CHARS * 4,  # bytes; the character limit is checked after
        "session_prompt": settings.max_prompt_chars * 4,  # characters of up to 4 UTF-8 bytes
    }


def form_allowance(settings: GatewaySettings) -> int:
    """Bytes a form may carry besides the file: fields, part headers and boundaries."""
    return sum(_field_limits(settings).values()) + 64 * 1024


@post("/upload", status_code=202, request_max_body_size=None)
async def upload_file(request: Request, gateway: GatewayDependency) -> Response[UploadReply]:
    ctx = gateway.context
    settings = ctx.settings
    upload: _Upload | None = None
    try:
        # 401 for a missing or refused token, 503 when tokens cannot be checked right now.
        authenticated = await authenticate_http(request, settings)
    except AppError as exc:  # auth.py's reasons are written for the client
        return _failure(exc.status_code, exc.message)
    try:
        boundary = boundary_of(request.headers.get("content-type"))
        body_limit = settings.max_file_size_bytes + form_allowance(settings)
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadUpload("Content-Length must be a non-negative integer")
            if int(declared) > body_limit:
                # Refused before reading a byte of it.
                raise UploadTooLarge(
                    f"File is larger than the {settings.max_file_size_bytes / (1024 * 1024):g} MB limit"
                )
        # After the checks that need no I/O: a client that declared too much and went quiet
        # (half-closed) still gets its 413 before the server notices the hang-up.
        if (limited := await _rate_limited(request, gateway, authenticated)) is not None:
            return limited
        upload = _Upload(ctx, authenticated)
        form = StreamingForm(boundary, field_limits=_field_limits(settings))
        received = 0
        async for chunk in request.stream():
            # Counted whatever Content-Length claimed (or when it is absent: chunked bodies).
            received += len(chunk)
            if received > body_limit:
                raise UploadTooLarge(
                    f"File is larger than the {settings.max_file_size_bytes / (1024 * 1024):g} MB limit"
                )
            for event in form.feed(chunk):
                if isinstance(event, FileData):
                    await upload.on_file_data(event)
                elif isinstance(event, Field):
                    await upload.on_field(event)
                elif isinstance(event, FileStart):
                    await upload.on_file_start(event)
                elif isinstance(event, FileEnd):
                    await upload.on_file_end()
        form.finish()
        data = await upload.complete()
    except InternalServerException:
        # request.stream() raises this when the client goes away mid-body.
        if upload is not None:
            await upload.discard()
        return _failure(400, "the upload was interrupted before the body was complete")
    except AppError as exc:
        if upload is not None:
            await upload.discard()
        return _failure(*client_failure(exc))
    except BaseException:
        if upload is not None:
            await upload.discard()
        raise
    return Response(UploadReply(message=UPLOAD_OK, data=data), status_code=202)


def _content_disposition(original_name: str) -> str:
    fallback = original_name.encode("ascii", errors="replace").decode("ascii").replace("?", "_")
    fallback = fallback.replace('"', "_").replace("\\", "_")
    return f"inline; filename=\"{fallback}\"; filename*=UTF-8''{quote(original_name, safe='')}"


# ``path``: a name holding (encoded) slashes still reaches this handler and gets its 404 here.
@get("/uploads/{file_name:path}")
async def download_file(request: Request, file_name: FromPath[str], gateway: GatewayDependency) -> Response[Any]:
    ctx = gateway.context
    # the path parameter keeps its leading separator; one more "/" is not a name ever issued
    file_name = file_name[1:] if file_name.startswith("/") else file_name
    if not ISSUED_FILE_NAME.fullmatch(file_name):
        return _failure(404, "File not found")
    try:
        authenticated = await authenticate_http(request, ctx.settings)
    except AppError as exc:  # auth.py's reasons are written for the client
        return _failure(exc.status_code, exc.message)
    if (limited := await _rate_limited(request, gateway, authenticated)) is not None:
        return limited
    claimed = request.query_params.get("user_id")
    owner = authenticated or claimed
    params: dict[str, str]
    if owner is None:
        # The original UI links without a user: the unguessable name is the capability.
        params = {"any_owner": "true"}
    else:
        if authenticated is not None and claimed and not same_user(claimed, authenticated):
            return _failure(404, "File not found")
        try:
            params = {"user_id": str(uuid.UUID(owner))}
        except ValueError:
            return _failure(404, "File not found")
    stream = ctx.files.stream("GET", f"/v1/files/{file_name}/content", params=params)
    try:
        response = await stream.__aenter__()
    except Exception as exc:  # connection refused, timeout: the files service is not there
        logger.warning("download failed: %s", type(exc).__name__)
        return _failure(503, "file storage is unavailable, try again later")
    if response.status_code != 200:
        status = response.status_code
        await stream.__aexit__(None, None, None)
        if status == 404 or status == 400:
            return _failure(404, "File not found")
        logger.warning("files service answered %s to a download", status)
        return _failure(503, "file storage is unavailable, try again later")

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await stream.__aexit__(None, None, None)

    headers = {
        "x-content-type-options": "nosniff",
        "cache-control": "private, max-age=3600",
        # a link may carry ?token=: a PDF's own links must not hand it on in a Referer
        "referrer-policy": "no-referrer",
    }
    if length := response.headers.get("content-length"):
        headers["content-length"] = length
    original = response.headers.get("x-file-original-name")
    if original:
        headers["content-disposition"] = _content_disposition(unquote(original))
    media_type = response.headers.get("content-type", "application/octet-stream")
    if media_type.startswith("text/"):
        # Litestar appends "; charset=utf-8" to text/* itself; stored text is UTF-8.
        media_type = media_type.split(";")[0]
    return Stream(body(), media_type=media_type, headers=headers)


upload_routes = [upload_file, download_file]
