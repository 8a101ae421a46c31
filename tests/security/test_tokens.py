"""AUTH_MODE=jwt: which tokens open a socket, an upload or a download, on every transport.

Only a valid token is accepted; expired, not yet valid, wrongly signed, of another issuer or
audience, unsigned (``alg: none``), of an algorithm not configured, or of a key family the
algorithm does not belong to are all refused, for HS256, RS256 (PEM public key) and ES256 (a JWKS
URL served by a small HTTP server here).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import jwt
import pytest

from devstack.servers import ServiceProcess
from devstack.stack import Stack

from .conftest import (
    AUDIENCE,
    BROWSER_ORIGIN,
    HS_SECRET,
    ISSUER,
    JWKSServer,
    KeyPair,
    assert_error,
    assert_ok,
    connect,
    ec_pair,
    failure,
    hs_token,
    jwt_env,
    new_user,
    now,
    refused,
    rsa_pair,
    start_gateway,
    stop_gateway,
    unsigned_token,
    upload,
    upload_fields,
    ws_url,
)

POLICY = 1008


async def assert_accepted(process: ServiceProcess, token: str, user: str) -> None:
    async with connect(ws_url(process), token=token) as client:
        # the user comes from the token: no user_id needed in the message
        assert assert_ok(await client.request(0), 0)["user_id"] == user
        assert assert_ok(await client.request(6, user_id=user), 6)["balance"] == pytest.approx(5.0)


async def assert_refused(process: ServiceProcess, token: str | None, reason: str) -> None:
    code, text = await refused(ws_url(process), token=token)
    assert code == POLICY, (code, text)
    assert reason in text, (code, text)
    if token:
        assert token not in text


def bad_hs_tokens(user: str) -> list[tuple[str, str, str]]:
    """(case, token, the close reason it must get)"""
    return [
        ("expired", hs_token(user, exp=now() - 3600, iat=now() - 7200), "expired"),
        ("not yet valid", hs_token(user, nbf=now() + 3600), "not yet valid"),
        ("wrong signature", hs_token(user, secret=HS_SECRET[::-1]), "signature"),
        ("tampered payload", _tampered(hs_token(user), str(uuid.uuid4())), "signature"),
        ("wrong issuer", hs_token(user, iss="https://evil.example"), "issuer"),
        ("no issuer", hs_token(user, iss=None), "iss"),
        ("wrong audience", hs_token(user, aud="another-service"), "audience"),
        ("no audience", hs_token(user, aud=None), "aud"),
        ("no expiry", hs_token(user, exp=None), "exp"),
        ("no subject", hs_token(user, sub=None), "sub"),
        ("alg none", unsigned_token(user), "algorithm"),
        ("HS512 not configured", hs_token(user, alg="HS512", secret=HS_SECRET + HS_SECRET), "algorithm"),
        ("garbage", "not.a.jwt", "invalid token"),
        # below the server's header line limit, so it is the gateway that judges it
        ("huge", "a" * 8000, "invalid token"),
    ]


def _tampered(token: str, other_user: str) -> str:
    """The payload swapped for one naming another user, the signature kept."""
    header, _, signature = token.split(".")
    other = hs_token(other_user).split(".")[1]
    return f"{header}.{other}.{signature}"


# ------------------------------------------------------------------------------------ HS256


async def test_hs256_only_the_valid_token_opens_a_socket(system: Stack, jwt_gateway: ServiceProcess) -> None:
    user = new_user(system)
    await assert_accepted(jwt_gateway, hs_token(user), user)
    for case, token, reason in bad_hs_tokens(user):
        try:
            await assert_refused(jwt_gateway, token, reason)
        except AssertionError as exc:
            raise AssertionError(f"{case}: {exc}") from None
    await assert_refused(jwt_gateway, None, "missing token")


async def test_leeway_accepts_a_token_just_expired_and_not_one_long_expired(
    system: Stack, jwt_gateway: ServiceProcess
) -> None:
    user = new_user(system)
    await assert_accepted(jwt_gateway, hs_token(user, exp=now() - 2), user)  # leeway is 5 s here
    await assert_refused(jwt_gateway, hs_token(user, exp=now() - 20), "expired")
    await assert_accepted(jwt_gateway, hs_token(user, nbf=now() + 2), user)


async def test_every_socket_transport(system: Stack, jwt_gateway: ServiceProcess) -> None:
    user = new_user(system)
    token = hs_token(user)
    # query parameter
    async with connect(ws_url(jwt_gateway, f"token={token}")) as client:
        assert assert_ok(await client.request(0), 0)["user_id"] == user
    # Authorization header
    async with connect(ws_url(jwt_gateway), headers={"Authorization": f"Bearer {token}"}) as client:
        assert assert_ok(await client.request(0), 0)["user_id"] == user
    # browsers: the subprotocol list, answered with "bearer"
    async with connect(ws_url(jwt_gateway), subprotocols=["bearer", token], origin=BROWSER_ORIGIN) as client:
        assert client.subprotocol == "bearer"
        assert assert_ok(await client.request(0), 0)["user_id"] == user
    async with connect(ws_url(jwt_gateway), subprotocols=["chat.v1", "bearer", token]) as client:
        assert client.subprotocol == "bearer"
        assert assert_ok(await client.request(0), 0)["user_id"] == user
    # a bad token that way is refused after the handshake selected "bearer" (else a browser
    # would see a failed handshake instead of the close code)
    bad = hs_token(user, exp=now() - 3600)
    async with connect(ws_url(jwt_gateway), subprotocols=["bearer", bad]) as client:
        assert client.subprotocol == "bearer"
        code, reason = await client.closed_with()
        assert (code, reason) == (POLICY, "token expired")
    # a bad query token is not rescued by anything
    await assert_refused_url(ws_url(jwt_gateway, f"token={bad}"), "expired")


async def assert_refused_url(url: str, reason: str) -> None:
    code, text = await refused(url)
    assert code == POLICY and reason in text, (code, text)


async def test_the_subject_is_the_user(system: Stack, jwt_gateway: ServiceProcess) -> None:
    alice, bob = new_user(system), new_user(system)
    async with connect(ws_url(jwt_gateway), token=hs_token(bob)) as client:
        for type_ in (0, 1, 5, 6):
            assert_error(await client.request(type_, user_id=alice), 106, type_)
        assert_error(await client.request(2, user_id=alice, session_id=str(uuid.uuid4())), 106, 2)
        assert_error(await client.request(4, user_id=alice, session_id=str(uuid.uuid4())), 106, 4)
        assert_error(await client.chat("NEW", "hi", user_id=alice), 106, 3)
        # the same id in another spelling is the same user
        assert assert_ok(await client.request(0, user_id=bob.upper()), 0)["user_id"] == bob
        assert assert_ok(await client.request(0, user_id=bob), 0)["user_id"] == bob
        # the socket survives the refusals
        assert assert_ok(await client.request(6), 6)["balance"] == pytest.approx(5.0)


async def test_a_socket_does_not_outlive_its_token(system: Stack, jwt_gateway: ServiceProcess) -> None:
    user = new_user(system)
    leeway = 5  # the jwt_gateway's JWT_LEEWAY_SECONDS
    # already past exp, still inside the leeway (for 3 to 4 s more): accepted
    exp = now() - 1
    async with connect(ws_url(jwt_gateway), token=hs_token(user, exp=exp)) as client:
        assert_ok(await client.request(6), 6)
        # idle past exp + leeway: the socket is still open, the next frame closes it
        await _sleep(exp + leeway + 1 - time.time())
        await client.send(6)
        assert await client.closed_with() == (POLICY, "token expired")


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


# ------------------------------------------------------------------------------------ HTTP


async def test_upload_and_download_need_a_valid_token(system: Stack, jwt_gateway: ServiceProcess) -> None:
    user = new_user(system)
    token = hs_token(user)
    async with httpx.AsyncClient(base_url=jwt_gateway.url, timeout=30) as http:
        # no user_id field: the token says who uploads
        ok = await upload(http, upload_fields(None), "note.txt", b"hello", token=token)
        assert ok.status_code == 202, ok.text
        name = ok.json()["data"]["fileName"]
        assert (await http.get(f"/uploads/{name}", headers={"Authorization": f"Bearer {token}"})).content == b"hello"
        assert (await http.get(f"/uploads/{name}", params={"token": token})).content == b"hello"

        failure(await upload(http, upload_fields(user), "note.txt", b"hello"), 401)
        failure(await http.get(f"/uploads/{name}"), 401)
        for case, bad, reason in bad_hs_tokens(user):
            message = failure(await upload(http, upload_fields(user), "note.txt", b"x", token=bad), 401)
            assert reason in message, (case, message)
            assert bad not in message
            failure(await http.get(f"/uploads/{name}", headers={"Authorization": f"Bearer {bad}"}), 401)
            failure(await http.get(f"/uploads/{name}", params={"token": bad}), 401)


# ------------------------------------------------------------------------------------ RS256 + HS256


@pytest.fixture(scope="module")
def rsa_key() -> KeyPair:
    return rsa_pair()


@pytest.fixture(scope="module")
def rs_gateway(system: Stack, rsa_key: KeyPair) -> Iterator[ServiceProcess]:
    """RS256 with a PEM public key next to HS256 with a secret."""
    process = start_gateway(system, "gw-rs", jwt_env(JWT_PUBLIC_KEY=rsa_key.public_pem, JWT_ALGORITHMS="RS256,HS256"))
    yield process
    stop_gateway(system, process)


async def test_rs256_public_key(system: Stack, rs_gateway: ServiceProcess, rsa_key: KeyPair) -> None:
    user = new_user(system)
    await assert_accepted(rs_gateway, rsa_key.token(user, kid=None), user)
    await assert_accepted(rs_gateway, hs_token(user), user)  # the secret still works for HS256
    other = rsa_pair("other")
    cases = [
        ("another key", other.token(user, kid=None), "signature"),
        ("expired", rsa_key.token(user, kid=None, exp=now() - 3600), "expired"),
        ("not yet valid", rsa_key.token(user, kid=None, nbf=now() + 3600), "not yet valid"),
        ("wrong issuer", rsa_key.token(user, kid=None, iss="https://evil.example"), "issuer"),
        ("wrong audience", rsa_key.token(user, kid=None, aud="nope"), "audience"),
        ("alg none", unsigned_token(user), "algorithm"),
        # The confusion attack: the public key (public!) used as an HMAC secret. HS256 is
        # verified with JWT_SECRET only, so the forged signature does not match.
        ("public key as HMAC secret", _hmac_with(rsa_key.public_pem, user), "signature"),
        ("ES256 not configured", ec_pair().token(user), "algorithm"),
    ]
    for case, token, reason in cases:
        try:
            await assert_refused(rs_gateway, token, reason)
        except AssertionError as exc:
            raise AssertionError(f"{case}: {exc}") from None


def _hmac_with(secret: str, user: str) -> str:
    import base64
    import hashlib
    import hmac
    import json

    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    head = part({"alg": "HS256", "typ": "JWT"})
    body = part({"sub": user, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600})
    signature = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


async def test_rs256_only_gateway_refuses_hs256(system: Stack, rsa_key: KeyPair) -> None:
    process = start_gateway(system, "gw-rs-only", jwt_env(JWT_SECRET="", JWT_PUBLIC_KEY=rsa_key.public_pem,
                                                           JWT_ALGORITHMS="RS256"))
    try:
        user = new_user(system)
        await assert_accepted(process, rsa_key.token(user, kid=None), user)
        await assert_refused(process, _hmac_with(rsa_key.public_pem, user), "algorithm")
        await assert_refused(process, hs_token(user), "algorithm")
    finally:
        stop_gateway(system, process)


# ------------------------------------------------------------------------------------ ES256 via JWKS


async def test_es256_through_a_jwks_url(system: Stack) -> None:
    current, retired, unknown = ec_pair("ec-current"), rsa_pair("rsa-retired"), ec_pair("ec-unknown")
    jwks = JWKSServer([current, retired]).start()
    process = start_gateway(system, "gw-jwks", jwt_env(JWT_SECRET="", JWT_JWKS_URL=jwks.url,
                                                       JWT_ALGORITHMS="ES256,RS256"))
    try:
        user = new_user(system)
        await assert_accepted(process, current.token(user), user)
        await assert_accepted(process, retired.token(user), user)
        fetched = jwks.fetches
        await assert_accepted(process, current.token(user), user)
        assert jwks.fetches == fetched, "the key set is cached, not fetched per token"
        cases = [
            ("key not in the set", unknown.token(user), "key id not known"),
            ("right kid, wrong key", KeyPair(unknown.private, "ec-current", "ES256").token(user), "signature"),
            ("no kid", current.token(user, kid=None), "kid"),
            ("expired", current.token(user, exp=now() - 3600), "expired"),
            ("wrong audience", current.token(user, aud="nope"), "audience"),
            ("alg none", unsigned_token(user), "algorithm"),
            # the RSA key's JWK says RS256: an ES256 token naming it is not its owner's
            ("kid of another algorithm", KeyPair(current.private, "rsa-retired", "ES256").token(user), "algorithm"),
            ("HS256 not configured", hs_token(user), "algorithm"),
        ]
        for case, token, reason in cases:
            try:
                await assert_refused(process, token, reason)
            except AssertionError as exc:
                raise AssertionError(f"{case}: {exc}") from None
        # a flood of made-up kids does not become a flood of fetches (30 s refresh cooldown)
        before = jwks.fetches
        for i in range(5):
            await assert_refused(process, ec_pair(f"made-up-{i}").token(user), "key id not known")
        assert jwks.fetches - before <= 1
        async with httpx.AsyncClient(base_url=process.url, timeout=30) as http:
            ok = await upload(http, upload_fields(None), "a.txt", b"via jwks", token=current.token(user))
            assert ok.status_code == 202, ok.text
    finally:
        stop_gateway(system, process)
        jwks.stop()


async def test_an_unreachable_jwks_is_try_again_later_not_a_bad_token(system: Stack) -> None:
    key = ec_pair("k")
    jwks = JWKSServer([key]).start()
    url = jwks.url
    jwks.stop()
    process = start_gateway(system, "gw-jwks-down", jwt_env(JWT_SECRET="", JWT_JWKS_URL=url, JWT_ALGORITHMS="ES256"))
    try:
        code, reason = await refused(ws_url(process), token=key.token(new_user(system)))
        assert code == 1013, (code, reason)
        async with httpx.AsyncClient(base_url=process.url, timeout=30) as http:
            failure(await http.get(f"/uploads/{'0' * 32}.txt", params={"token": key.token("x")}), 503)
    finally:
        stop_gateway(system, process)


# ------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JWT_SECRET": ""}, "JWT_SECRET is not set"),
        ({"JWT_ALGORITHMS": "none"}, "unsupported algorithm"),
        ({"JWT_ALGORITHMS": "HS256,none"}, "unsupported algorithm"),
        ({"JWT_ALGORITHMS": "RS256"}, "neither JWT_PUBLIC_KEY nor JWT_JWKS_URL"),
        ({"JWT_PUBLIC_KEY": "not a pem", "JWT_ALGORITHMS": "RS256"}, "not a PEM public key"),
        ({"AUTH_MODE": "basic"}, "AUTH_MODE must be"),
    ],
)
def test_a_configuration_that_cannot_verify_refuses_to_start(system: Stack, env: dict[str, str], message: str) -> None:
    full = {**os.environ, **system.base_env(), **jwt_env(), "GATEWAY_PORT": "1", **env}
    result = subprocess.run([sys.executable, "-m", "chat_gateway"], env=full, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_short_secret_is_named_at_start_and_its_tokens_refused(system: Stack) -> None:
    from chat_gateway.auth import TokenVerifier
    from chat_gateway.settings import GatewaySettings

    os.environ.update(jwt_env(JWT_SECRET="change-me"))
    try:
        settings = GatewaySettings.from_env()
    finally:
        for key in jwt_env():
            os.environ.pop(key, None)
    verifier = TokenVerifier(settings)
    assert any("shorter than 32 bytes" in note for note in verifier.warnings())
    import asyncio

    from chat_gateway.auth import AuthenticationError

    token = jwt.encode({"sub": "u", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 60}, "change-me", algorithm="HS256")
    with pytest.raises(AuthenticationError, match="configured key"):
        asyncio.run(verifier.verify(token))


def test_start_warnings(system: Stack, jwt_gateway: ServiceProcess) -> None:
    """AUTH_MODE=none says so at start, as a JSON warning line; a jwt gateway with issuer and
    audience set has nothing to warn about."""
    none_log = system.services["gateway"].log_path.read_text()
    warned = [json.loads(line) for line in none_log.splitlines() if "AUTH_MODE=none" in line]
    assert warned and warned[0]["level"] == "warning"
    jwt_log = jwt_gateway.log_path.read_text()
    assert "AUTH_MODE=none" not in jwt_log
    assert "JWT_" not in jwt_log


def test_missing_issuer_and_audience_are_named_at_start(system: Stack) -> None:
    process = start_gateway(system, "gw-loose", jwt_env(JWT_ISSUER="", JWT_AUDIENCE=""))
    try:
        log = process.log_path.read_text()
        assert "JWT_ISSUER is not set" in log and "JWT_AUDIENCE is not set" in log
    finally:
        stop_gateway(system, process)
