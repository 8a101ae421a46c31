"""Two users, every protocol operation (types 0-6), upload and download: whatever B sends, A's
session, chats, files and balance are neither revealed nor changed, in both modes.

AUTH_MODE=none trusts the ``user_id`` in a message, so there the attack is B's own user_id with
A's ids. AUTH_MODE=jwt also refuses B naming A (106) and takes B's identity from the token.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from devstack.servers import ServiceProcess
from devstack.stack import Stack

from .conftest import (
    LogWatch,
    assert_error,
    assert_ok,
    balance_nanos,
    connect,
    entries_of,
    failure,
    files_of,
    hs_token,
    new_user,
    sessions_of,
    upload,
    upload_fields,
    ws_url,
)


@dataclass
class Owner:
    user: str
    session: str
    file_name: str
    file_bytes: bytes
    entries: list[tuple[str, str]]
    files: list[str]
    sessions: list[str]
    balance: int

    def assert_untouched(self, system: Stack) -> None:
        assert entries_of(system, self.user, self.session) == self.entries
        assert files_of(system, self.user, self.session) == self.files
        assert sessions_of(system, self.user) == self.sessions
        assert balance_nanos(system, self.user) == self.balance


@pytest.fixture(scope="module")
async def alice(system: Stack) -> Owner:
    """A with a session of two turns, one of them carrying an uploaded file."""
    user = new_user(system)
    secret = b"alice's private notes"
    async with connect(system.ws_url) as client:
        first = assert_ok(await client.chat("NEW", "alpha secret one", user_id=user), 3)
        session = first["session_id"]
        async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as http:
            response = await upload(http, upload_fields(user, session), "private.txt", secret)
            assert response.status_code == 202, response.text
            file_name = response.json()["data"]["fileName"]
        assert_ok(await client.chat(session, "alpha secret two", user_id=user, file_name=file_name), 3)
    entries = entries_of(system, user, session)
    assert ("file", file_name) in entries
    return Owner(user, session, file_name, secret, entries, files_of(system, user, session),
                 sessions_of(system, user), balance_nanos(system, user))


@pytest.fixture(scope="module")
async def bob(system: Stack) -> tuple[str, str]:
    """B with a session of his own."""
    user = new_user(system, balance=3.0)
    async with connect(system.ws_url) as client:
        session = assert_ok(await client.chat("NEW", "bravo", user_id=user), 3)["session_id"]
    return user, session


@pytest.fixture(scope="module")
async def watch(system: Stack) -> AsyncIterator[LogWatch]:
    yield LogWatch(system).start()


@pytest.fixture(scope="module", autouse=True)
async def no_traceback_or_error_logged(watch: LogWatch) -> AsyncIterator[None]:
    """Checked when the module's last test is done, whatever order the tests ran in."""
    yield
    watch.assert_clean()


# ------------------------------------------------------------------------------------ none


async def test_none_mode_b_with_a_ids(system: Stack, alice: Owner, bob: tuple[str, str], watch: LogWatch) -> None:
    b, b_session = bob
    b_balance = balance_nanos(system, b)
    b_sessions = sessions_of(system, b)
    a = alice
    async with connect(system.ws_url) as client:
        # 0, 5, 6: B asking for B gets B, never A
        assert assert_ok(await client.request(0, user_id=b), 0)["user_id"] == b
        assert assert_ok(await client.request(6, user_id=b), 6)["balance"] == pytest.approx(3.0, abs=0.01)
        assert_ok(await client.request(5, user_id=b), 5)
        # 1: A's session is not among B's
        listed = assert_ok(await client.request(1, user_id=b), 1)["session_info"]
        assert a.session not in {s["session_id"] for s in listed}
        # 2: A's chats
        assert_error(await client.request(2, user_id=b, session_id=a.session), 9, 2)
        # 3: a turn on A's session, A's file on a new session, A's file on B's session
        assert_error(await client.chat(a.session, "let me in", user_id=b), 5, 3)
        assert_error(await client.chat("NEW", "take the file", user_id=b, file_name=a.file_name), 104, 3)
        assert_error(await client.chat(b_session, "take the file", user_id=b, file_name=a.file_name), 104, 3)
        assert_error(await client.chat(a.session, "both", user_id=b, file_name=a.file_name), 5, 3)
        # 4: delete A's session
        assert_error(await client.request(4, user_id=b, session_id=a.session), 10, 4)
        # the socket still serves B
        assert_ok(await client.request(2, user_id=b, session_id=b_session), 2)

    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as http:
        # upload into A's session as B
        message = failure(await upload(http, upload_fields(b, a.session), "x.txt", b"intruder"), 404)
        assert "not found" in message.lower()
        # download A's file as B
        failure(await http.get(f"/uploads/{a.file_name}", params={"user_id": b}), 404)
        # A still gets it
        owned = await http.get(f"/uploads/{a.file_name}", params={"user_id": a.user})
        assert owned.status_code == 200 and owned.content == a.file_bytes

    a.assert_untouched(system)
    # nothing B was refused left anything behind for B either (no debit, no half-made session)
    assert balance_nanos(system, b) == b_balance
    assert sessions_of(system, b) == b_sessions


# ------------------------------------------------------------------------------------ jwt


async def test_jwt_mode_b_naming_a_is_refused(
    system: Stack, jwt_gateway: ServiceProcess, alice: Owner, bob: tuple[str, str]
) -> None:
    b, _ = bob
    a = alice
    async with connect(ws_url(jwt_gateway), token=hs_token(b)) as client:
        for type_ in (0, 1, 5, 6):
            assert_error(await client.request(type_, user_id=a.user), 106, type_)
        assert_error(await client.request(2, user_id=a.user, session_id=a.session), 106, 2)
        assert_error(await client.chat(a.session, "as alice", user_id=a.user), 106, 3)
        assert_error(await client.chat("NEW", "as alice", user_id=a.user, file_name=a.file_name), 106, 3)
        assert_error(await client.request(4, user_id=a.user, session_id=a.session), 106, 4)
    a.assert_untouched(system)


async def test_jwt_mode_b_with_a_ids(
    system: Stack, jwt_gateway: ServiceProcess, alice: Owner, bob: tuple[str, str]
) -> None:
    b, b_session = bob
    b_balance = balance_nanos(system, b)
    b_sessions = sessions_of(system, b)
    a = alice
    token = hs_token(b)
    async with connect(ws_url(jwt_gateway), token=token) as client:
        assert assert_ok(await client.request(0), 0)["user_id"] == b
        assert assert_ok(await client.request(6), 6)["balance"] == pytest.approx(3.0, abs=0.01)
        listed = assert_ok(await client.request(1), 1)["session_info"]
        assert a.session not in {s["session_id"] for s in listed}
        assert_error(await client.request(2, session_id=a.session), 9, 2)
        assert_error(await client.chat(a.session, "let me in"), 5, 3)
        assert_error(await client.chat("NEW", "take the file", file_name=a.file_name), 104, 3)
        assert_error(await client.chat(b_session, "take the file", file_name=a.file_name), 104, 3)
        assert_error(await client.request(4, session_id=a.session), 10, 4)
        chats = json.loads(assert_ok(await client.request(2, session_id=b_session), 2)["chat"])
        assert all("alpha" not in entry["content"] for entry in chats)

    async with httpx.AsyncClient(base_url=jwt_gateway.url, timeout=30) as http:
        auth = {"Authorization": f"Bearer {token}"}
        # the form naming A while the token is B's
        message = failure(await upload(http, upload_fields(a.user, "NEW"), "x.txt", b"intruder", token=token), 403)
        assert "user_id" in message
        # B's own upload, aimed at A's session
        failure(await upload(http, upload_fields(None, a.session), "x.txt", b"intruder", token=token), 404)
        failure(await upload(http, upload_fields(b, a.session), "x.txt", b"intruder", token=token), 404)
        # A's file: 401 without a token, 404 for B whatever B claims
        failure(await http.get(f"/uploads/{a.file_name}"), 401)
        failure(await http.get(f"/uploads/{a.file_name}", params={"user_id": a.user}), 401)
        failure(await http.get(f"/uploads/{a.file_name}", headers=auth), 404)
        failure(await http.get(f"/uploads/{a.file_name}", headers=auth, params={"user_id": a.user}), 404)
        failure(await http.get(f"/uploads/{a.file_name}", params={"token": token}), 404)
        # A's token gets it
        owned = await http.get(f"/uploads/{a.file_name}", headers={"Authorization": f"Bearer {hs_token(a.user)}"})
        assert owned.status_code == 200 and owned.content == a.file_bytes

    a.assert_untouched(system)
    assert balance_nanos(system, b) == b_balance
    assert sessions_of(system, b) == b_sessions


async def test_jwt_mode_a_still_works_after_all_that(system: Stack, jwt_gateway: ServiceProcess, alice: Owner) -> None:
    """The refusals above are not a blanket refusal: A reads and continues A's session."""
    async with connect(ws_url(jwt_gateway), token=hs_token(alice.user)) as client:
        chats = json.loads(assert_ok(await client.request(2, session_id=alice.session), 2)["chat"])
        assert [(e["role"], e["content"]) for e in chats] == alice.entries
        assert_ok(await client.request(6), 6)


async def test_a_user_id_in_capitals_is_the_same_user(system: Stack, jwt_gateway: ServiceProcess) -> None:
    """One user, one identity: however the UUID is spelled, ownership checks see the same
    owner (and so do not lock a user out of their own session)."""
    user = new_user(system)
    async with connect(system.ws_url) as client:
        session = assert_ok(await client.chat("NEW", "lower case", user_id=user), 3)["session_id"]
        reply = assert_ok(await client.chat(session, "upper case", user_id=user.upper()), 3)
        assert reply["user_id"] == user
        assert assert_ok(await client.request(2, user_id=user.upper(), session_id=session), 2)["user_id"] == user
    async with connect(ws_url(jwt_gateway), token=hs_token(user.upper())) as client:
        assert assert_ok(await client.chat(session, "token in capitals"), 3)["user_id"] == user
    assert len(entries_of(system, user, session)) == 6
