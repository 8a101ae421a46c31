"""Per-user administration of the files service: export (metadata and bytes), import and erase
of every file one user owns. The gateway runs these for ``chat-admin export-user``,
``import-user`` and ``erase-user``."""
from __future__ import annotations

import base64
import hashlib
import io
import uuid

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from minio.deleteobjects import DeleteObject

from chat_common import contracts as c
from chat_common.errors import (
    BadRequestError,
    ConflictError,
    ServiceUnavailableError,
    parse_uuid,
)
from chat_common.names import ISSUED_FILE_NAME
from chat_files.files import sql
from chat_files.files.services import FilesService
from chat_files.files.storage import ObjectStorage

# One file per import call, base64 in JSON: a third more than the largest file allowed, and room.
MAX_IMPORT_BYTES = 256 * 1024 * 1024


def _user(value: str) -> uuid.UUID:
    return parse_uuid(value, "user_id")


class FilesAdmin:
    def __init__(self, service: FilesService) -> None:
        self.service = service
        self.storage: ObjectStorage = service.storage

    async def export(self, user_id: uuid.UUID, *, content: bool = True) -> c.FilesExport:
        rows = await self.service._pool().fetch(sql.USER_FILES, user_id)
        out: list[c.ExportedFile] = []
        for row in rows:
            data = b""
            if content:
                chunks = await self.storage.open(row["object_key"])
                data = b"".join([chunk async for chunk in chunks])
            out.append(
                c.ExportedFile(
                    file_name=row["file_name"], session_id=None if row["session_id"] is None else str(row["session_id"]),
                    original_name=row["original_name"], content_type=row["content_type"], size=row["size"],
                    sha256=row["sha256"], status=row["status"], turn_id=row["turn_id"], created_at=row["created_at"],
                    attached_at=row["attached_at"], used_at=row["used_at"], content_base64=base64.b64encode(data).decode(),
                )
            )
        return c.FilesExport(files=out)

    async def import_(self, user_id: uuid.UUID, data: c.FilesExport) -> c.ImportedCount:
        """Each file: its object under the key this service makes from the name, then its row
        (as an upload does). A file already stored for this user is kept (an import cut short
        may be sent again); a name of another user's file is refused (409)."""
        imported = 0
        for item in data.files:
            if not ISSUED_FILE_NAME.fullmatch(item.file_name):
                raise BadRequestError("not a file name this service makes", details={"file_name": item.file_name})
            try:
                content = base64.b64decode(item.content_base64, validate=True)
            except ValueError:
                raise BadRequestError("content_base64 is not base64", details={"file_name": item.file_name}) from None
            if len(content) != item.size or hashlib.sha256(content).hexdigest() != item.sha256:
                raise BadRequestError("content does not match its size and sha256", details={"file_name": item.file_name})
            existing = await self.service._pool().fetchrow(sql.OWNER, item.file_name)
            if existing is not None:
                if existing["user_id"] != user_id:
                    raise ConflictError("a file name of the import belongs to another user", details={"file_name": item.file_name})
                continue
            key = ObjectStorage.key_for(item.file_name)
            await self.storage._call(
                self.storage.client.put_object, self.storage.bucket, key, io.BytesIO(content), len(content),
                content_type=item.content_type,
            )
            await self.service._pool().execute(
                sql.IMPORT, item.file_name, user_id, None if item.session_id is None else uuid.UUID(item.session_id),
                item.original_name, item.content_type, item.size, item.sha256, key, item.status, item.turn_id,
                item.created_at, item.attached_at, item.used_at,
            )
            imported += 1
        return c.ImportedCount(imported={"files": imported})

    async def erase(self, user_id: uuid.UUID) -> c.Removed:
        """Objects first, then rows: a run cut short in between leaves rows whose objects are
        already gone, which the next run removes (never bytes nobody can find again)."""
        keys: list[str] = [row[0] for row in await self.service._pool().fetch(sql.USER_KEYS, user_id)]
        if keys:
            def run() -> list[str]:
                errors = self.storage.client.remove_objects(self.storage.bucket, [DeleteObject(k) for k in keys])
                return [f"{e.name}: {e.code}" for e in errors if e.code not in ("NoSuchKey", "NoSuchObject")]

            failed = await self.storage._call(run)
            if failed:
                raise ServiceUnavailableError(f"could not remove {len(failed)} objects: {failed[0]}")
        status = await self.service._pool().execute(sql.ERASE_USER, user_id)
        removed = int(status.split()[-1])
        if removed:
            # the planner's statistics must not keep sampled values of the rows gone
            await self.service._pool().execute(sql.ANALYZE)
        schema = self.service.settings.db_schema
        return c.Removed(removed={f"{schema}.files": removed}, objects=len(keys))


Admin = NamedDependency[FilesAdmin]


class FilesImport(c.FilesExport, kw_only=True, forbid_unknown_fields=True):
    """The import body: an export, refusing fields an export does not have (like every request
    body of this service); the files inside are the export format's."""


class FilesAdminController(Controller):
    """``/v1/admin/users/{id}/files``: every file of one user (service token required)."""

    path = "/v1/admin/users"
    tags = ["admin"]

    @get("/{user_id:str}/files")
    async def list_files(self, files_admin: Admin, user_id: FromPath[str]) -> c.FilesExport:
        """Every file of the user, metadata only (``content_base64`` empty), oldest first."""
        return await files_admin.export(_user(user_id), content=False)

    @get("/{user_id:str}/files/export")
    async def export_files(self, files_admin: Admin, user_id: FromPath[str]) -> c.FilesExport:
        return await files_admin.export(_user(user_id))

    @post("/{user_id:str}/files/import", status_code=200, request_max_body_size=MAX_IMPORT_BYTES)
    async def import_files(
        self, files_admin: Admin, user_id: FromPath[str], data: JSONBody[FilesImport]
    ) -> c.ImportedCount:
        return await files_admin.import_(_user(user_id), data)

    @post("/{user_id:str}/files/erase", status_code=200)
    async def erase_files(self, files_admin: Admin, user_id: FromPath[str]) -> c.Removed:
        return await files_admin.erase(_user(user_id))
