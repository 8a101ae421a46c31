"""One ``POST /upload`` in process (chat_gateway.uploads.controllers._Upload), fed the form's
events as the streaming parser produces them, against small fakes of the typed ports: what
reaches the files service and when, the session a "NEW" upload makes, and what a failure
undoes. The same route runs end to end in tests/files/test_gateway_uploads.py."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from chat_common import contracts as c
from chat_common.errors import NotFoundError, ServiceUnavailableError
from chat_gateway.uploads.controllers import _Upload
from chat_gateway.uploads.multipart import Field as FormField
from chat_gateway.uploads.multipart import FileData, FileStart
from chat_gateway.uploads.refusals import UploadForbidden, UploadNotFound

USER = str(uuid.uuid4())
MB = 1024 * 1024


@dataclass
class FakeBilling:
    users: dict[str, list[str]] = field(default_factory=lambda: {USER: ["llama3.1:8b"]})  # id -> granted models

    async def user(self, user_id: str) -> c.User:
        if user_id not in self.users:
            raise NotFoundError("user not found")
        return c.User(user_id=user_id, username="ada")

    async def models(self, user_id: str) -> c.ModelList:
        if user_id not in self.users:
            raise NotFoundError("user not found")
        return c.ModelList(models=[c.ModelInfo(model_id=n, name=name) for n, name in enumerate(self.users[user_id])])


@dataclass
class FakeSessions:
    owned: dict[str, str] = field(default_factory=dict)  # session id -> user id
    created: list[c.SessionCreate] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    async def session(self, session_id: str, user_id: str) -> c.Session:
        if self.owned.get(session_id) != user_id:
            raise NotFoundError("session not found")
        return c.Session(session_id=session_id, user_id=user_id, session_name="mine")

    async def create(self, request: c.SessionCreate) -> c.Session:
        self.created.append(request)
        session_id = str(uuid.uuid4())
        self.owned[session_id] = request.user_id
        return c.Session(session_id=session_id, user_id=request.user_id, session_name=request.name)

    async def remove(self, session_id: str, user_id: str) -> None:
        self.removed.append(session_id)
        self.owned.pop(session_id, None)


@dataclass
class FakeFiles:
    checked: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    uploads: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    attached: list[tuple[str, str, str]] = field(default_factory=list)
    removed: list[tuple[str, str | None]] = field(default_factory=list)
    attach_fails: bool = False

    async def check_upload(self, params: dict[str, str], head: bytes) -> None:
        self.checked.append((params, head))

    async def upload(self, params: dict[str, str], body: AsyncIterator[bytes]) -> c.StoredFile:
        data = b"".join([chunk async for chunk in body])
        self.uploads.append((params, data))
        return c.StoredFile(
            file_name=f"{uuid.uuid4().hex}.txt", session_id=params.get("session_id"), status="staged",
            original_name=params["original_name"], content_type="text/plain", size=len(data), sha256="x" * 64,
        )

    async def attach(self, file_name: str, user_id: str, session_id: str) -> c.StoredFile:
        if self.attach_fails:
            raise ServiceUnavailableError("files down")
        self.attached.append((file_name, user_id, session_id))
        params, data = self.uploads[-1]
        return c.StoredFile(
            file_name=file_name, session_id=session_id, status="attached", original_name=params["original_name"],
            content_type="text/plain", size=len(data), sha256="x" * 64,
        )

    async def remove(self, file_name: str, user_id: str | None) -> None:
        self.removed.append((file_name, user_id))


def upload(billing: FakeBilling, sessions: FakeSessions, files: FakeFiles, authenticated: str | None = None) -> _Upload:
    settings = SimpleNamespace(max_file_size_bytes=2 * MB, max_prompt_chars=16000, public_url="http://gw.test")
    gateway = SimpleNamespace(billing=billing, sessions=sessions, files=files, settings=settings)
    return _Upload(gateway, authenticated)  # type: ignore[arg-type]


async def send_form(up: _Upload, fields: dict[str, str], content: bytes, *, fields_first: bool = True,
                    name: str = "notes about walruses.txt", chunk: int = 3000) -> Any:
    async def put_fields() -> None:
        for key, value in fields.items():
            await up.on_field(FormField(key, value))

    if fields_first:
        await put_fields()
    await up.on_file_start(FileStart(name, "text/plain"))
    for start in range(0, len(content), chunk):
        await up.on_file_data(FileData(content[start:start + chunk]))
    await up.on_file_end()
    if not fields_first:
        await put_fields()
    return await up.complete()


async def test_new_session_upload_streams_the_file_then_makes_and_attaches_its_session() -> None:
    billing, sessions, files = FakeBilling(), FakeSessions(), FakeFiles()
    content = b"walrus facts\n" * 2000  # 26 kB: past the type-sniffing head, so it streams
    up = upload(billing, sessions, files)
    reply = await send_form(up, {"user_id": USER, "session_id": "NEW", "model_name": "llama3.1:8b",
                                 "session_prompt": "be brief"}, content)
    # the type check saw the head only, then the upload got every byte, in order
    (check_params, head), = files.checked
    assert head == content[:len(head)] and 0 < len(head) < len(content)
    assert check_params["user_id"] == USER and check_params["complete"] == "false"
    (params, stored), = files.uploads
    assert stored == content and params["user_id"] == USER and "session_id" not in params
    # the session is made after the file is stored, named by the first-message rule
    (made,) = sessions.created
    assert made.user_id == USER and made.name == "notes about" and made.prompt == "be brief"
    assert made.model_name == "llama3.1:8b" and made.idempotency_key == f"upload:{reply.file_name}"
    assert files.attached == [(reply.file_name, USER, reply.session_id)]
    assert reply.size == len(content) and reply.image_url == f"http://gw.test/uploads/{reply.file_name}"


async def test_an_own_session_named_before_the_file_goes_with_the_upload() -> None:
    sessions = FakeSessions(owned={(mine := str(uuid.uuid4())): USER})
    files = FakeFiles()
    reply = await send_form(upload(FakeBilling(), sessions, files), {"user_id": USER, "session_id": mine}, b"short")
    (params, _), = files.uploads
    assert params["session_id"] == mine and sessions.created == [] and files.attached == []
    assert reply.session_id == mine
    assert files.checked[0][0]["complete"] == "true"  # the whole file fit in the head


@pytest.mark.parametrize("fields_first", [True, False])
async def test_another_users_session_or_an_unknown_user_is_refused(fields_first: bool) -> None:
    theirs = str(uuid.uuid4())
    sessions, files = FakeSessions(owned={theirs: str(uuid.uuid4())}), FakeFiles()
    with pytest.raises(UploadNotFound):
        await send_form(upload(FakeBilling(), sessions, files), {"user_id": USER, "session_id": theirs}, b"x" * 10,
                        fields_first=fields_first)
    if fields_first:  # refused before a byte of the file went on
        assert files.checked == [] and files.uploads == []
    with pytest.raises(UploadNotFound):
        await send_form(upload(FakeBilling(), FakeSessions(), FakeFiles()),
                        {"user_id": str(uuid.uuid4()), "session_id": "NEW", "model_name": "llama3.1:8b"}, b"x")


async def test_a_model_not_granted_is_refused_before_the_file_is_sent() -> None:
    files = FakeFiles()
    with pytest.raises(UploadForbidden):
        await send_form(upload(FakeBilling(), FakeSessions(), files),
                        {"user_id": USER, "session_id": "NEW", "model_name": "gpt-4"}, b"x" * 100)
    assert files.checked == [] and files.uploads == []


async def test_a_failed_attach_undoes_the_file_and_the_session_made_for_it() -> None:
    sessions, files = FakeSessions(), FakeFiles(attach_fails=True)
    up = upload(FakeBilling(), sessions, files)
    with pytest.raises(ServiceUnavailableError):
        await send_form(up, {"user_id": USER, "session_id": "NEW", "model_name": "llama3.1:8b"}, b"walrus")
    await up.discard()
    assert len(sessions.created) == 1 and sessions.removed and sessions.owned == {}
    assert up.stored is not None and files.removed == [(up.stored.file_name, USER)]
