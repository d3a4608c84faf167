"""The Python client distribution (clients/python): built as a wheel from generated/, installed
into a fresh virtualenv with nothing of the server, a consumer type-checked there with
``mypy --strict`` and run against a live server; and its hand-written layer (channel factory
with the token as call credentials, typed errors) through the wire."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from importlib import metadata
from pathlib import Path

import grpc
import pytest
import trustme
from google.protobuf.duration_pb2 import Duration
from packaging.requirements import Requirement
from referral.v1 import auth_pb2, errors_pb2, referral_pb2
from referral_client import connect, errors
from referral_client._channel import is_loopback

from tests.conftest import PASSWORD, Api, Stack, start_api, stop_api

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "clients/python"
FLOW = ROOT / "examples/python/flow.py"
#: What the client may bring along: the four runtime dependencies (and what they need).
RUNTIME = {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos"}
SERVER_ONLY = {
    "referral-service",
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "alembic",
    "argon2-cffi",
    "redis",
    "uvicorn",
    "pydantic",
    "httpx",
    "pyjwt",
    "grpcio-reflection",
    "grpcio-health-checking",
    "swagger-ui-bundle-v2",
}


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MYPYPATH")},
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, CLIENT)
    (built,) = dist.glob("referral_service_client-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv with the client wheel, its typing extra and mypy (our version)."""
    path = tmp_path_factory.mktemp("client-venv")
    _run(sys.executable, "-m", "venv", path)
    _run(
        path / "bin/python",
        "-m",
        "pip",
        "install",
        "--quiet",
        f"{wheel}[typing]",
        f"mypy=={metadata.version('mypy')}",
    )
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_wheel_holds_the_stubs_their_types_and_the_client(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in ("auth", "referral", "errors", "options"):
        assert f"referral/v1/{stub}_pb2.py" in names
        assert f"referral/v1/{stub}_pb2.pyi" in names
        assert f"referral/v1/{stub}_pb2_grpc.pyi" in names
    assert "referral/py.typed" in names
    assert "referral_client/py.typed" in names
    assert "referral/v1/api_descriptor.binpb" in names  # the comments, for dynamic clients
    assert not any(name.startswith("referral_service/") for name in names)
    # the version follows the API: 1.x is referral.v1
    version = metadata.version("referral-service-client")
    assert wheel.name.startswith(f"referral_service_client-{version}-")
    assert version.split(".")[0] == auth_pb2.DESCRIPTOR.package.removeprefix("referral.v")


def test_a_fresh_venv_gets_the_client_and_no_server_dependency(venv: Path) -> None:
    installed = {p["name"].lower() for p in json.loads(_run(venv / "bin/pip", "list", "--format=json"))}
    assert "referral-service-client" in installed
    assert installed >= RUNTIME
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY
    requires = _run(
        venv / "bin/python",
        "-c",
        "import importlib.metadata as m; print('\\n'.join(m.requires('referral-service-client')))",
    )
    runtime = {Requirement(line).name for line in requires.splitlines() if "extra" not in line}
    assert runtime == RUNTIME


def test_mypy_strict_passes_on_a_consumer_and_catches_misuse(venv: Path, tmp_path: Path) -> None:
    # Outside the repository, so neither generated/ nor our mypy settings are seen.
    shutil.copy(FLOW, tmp_path / "flow.py")
    mypy = (venv / "bin/mypy", "--strict", "--cache-dir", tmp_path / ".mypy_cache")
    _run(*mypy, "flow.py", cwd=tmp_path)
    # The stubs are real types, not Any: misuse is an error.
    (tmp_path / "misuse.py").write_text(
        "from referral.v1 import auth_pb2, referral_pb2\n"
        "from referral_client import connect\n"
        "from referral_client.errors import RateLimited\n"
        "auth_pb2.RegisterRequest(email=1)\n"
        "async def f() -> None:\n"
        "    client = connect('127.0.0.1:50051')\n"
        "    await client.auth.Register(referral_pb2.ListReferralsRequest())\n"
        "    try:\n"
        "        pass\n"
        "    except RateLimited as error:\n"
        "        error.retry_delay.total_seconds()\n"
    )
    result = subprocess.run(
        [str(a) for a in (*mypy, "misuse.py")], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 1, result.stdout
    assert 'Argument "email" to "RegisterRequest" has incompatible type "int"' in result.stdout
    assert '"ListReferralsRequest"; expected "RegisterRequest"' in result.stdout
    assert 'Item "None" of "timedelta | None" has no attribute "total_seconds"' in result.stdout


@pytest.mark.one_stack
async def test_the_example_runs_from_the_fresh_venv_against_a_live_server(
    venv: Path, api: Api, tmp_path: Path
) -> None:
    shutil.copy(FLOW, tmp_path / "flow.py")
    process = await asyncio.create_subprocess_exec(
        str(venv / "bin/python"),
        "flow.py",
        api.target,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    text = output.decode()
    assert process.returncode == 0, text
    for line in (
        "duplicate refused: EMAIL_ALREADY_REGISTERED ALREADY_EXISTS request ",
        "invalid fields: ['email', 'password']",
        "created code: ",
        "referrals: ['bob-",
        "flow complete",
    ):
        assert line in text, text


# -- the hand-written layer, through the wire ------------------------------------------------


def test_every_error_reason_has_its_exception_class() -> None:
    reasons = [v.name.removeprefix("ERROR_REASON_") for v in errors_pb2.ErrorReason.DESCRIPTOR.values]
    for reason in reasons[1:]:
        cls = errors.BY_REASON[reason]
        assert reason == cls.REASON
        assert cls is getattr(errors, cls.__name__)
        assert issubclass(cls, errors.ReferralError)
        assert issubclass(cls, grpc.aio.AioRpcError)
    assert len(errors.BY_REASON) == len(reasons) - 1
    assert errors.EmailAlreadyRegistered.__module__ == "referral_client.errors"


@pytest.mark.one_stack
async def test_errors_arrive_typed_with_their_details(api: Api) -> None:
    email = api.unique_email()
    async with connect(api.target) as client:
        await client.auth.Register(auth_pb2.RegisterRequest(email=email, password=PASSWORD))
        with pytest.raises(errors.EmailAlreadyRegistered) as duplicate:
            await client.auth.Register(auth_pb2.RegisterRequest(email=email.upper(), password=PASSWORD))
        error = duplicate.value
        assert isinstance(error, grpc.aio.AioRpcError)  # existing handlers keep working
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert (error.reason, error.domain) == ("EMAIL_ALREADY_REGISTERED", "referral-service")
        assert len(error.request_id) == 32

        with pytest.raises(errors.ValidationFailed) as invalid:
            await client.auth.Register(auth_pb2.RegisterRequest(email="nope", password="short"))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(invalid.value.fields) == {"email", "password"}
        assert all(v.description for v in invalid.value.field_violations)

        with pytest.raises(errors.TokenMissing) as missing:
            await client.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest())
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_rate_limits_carry_the_retry_delay(stack: Stack) -> None:
    api = await start_api(stack, rate_limit_register_address="2/1h")
    try:
        async with connect(api.target) as client:
            for _ in range(2):
                await client.auth.Register(
                    auth_pb2.RegisterRequest(email=api.unique_email(), password=PASSWORD)
                )
            with pytest.raises(errors.RateLimited) as limited:
                await client.auth.Register(
                    auth_pb2.RegisterRequest(email=api.unique_email(), password=PASSWORD)
                )
        error = limited.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.retry_delay is not None
        assert timedelta(0) < error.retry_delay <= timedelta(hours=1)
        assert [v.quota_value for v in error.quota_violations] == [2]
    finally:
        await stop_api(api)


@pytest.mark.one_stack
async def test_the_token_travels_as_call_credentials(api: Api) -> None:
    user, token = await api.user_with_token()
    async with connect(api.target, token=token) as client:
        me = await client.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest())
        assert me.user.id == user.id
        created = await client.referrals.CreateReferralCode(
            referral_pb2.CreateReferralCodeRequest(ttl=Duration(seconds=3600))
        )
        assert created.referral_code.code
    # a function is asked for the token before every call
    asked: list[int] = []

    def current() -> str:
        asked.append(1)
        return token

    async with connect(api.target, token=current) as client:
        await client.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest())
        await client.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest())
    assert len(asked) == 2
    async with connect(api.target, token="not-a-token") as client:
        with pytest.raises(errors.TokenInvalid):
            await client.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest())


async def test_tls_with_a_private_ca_and_the_token(stack: Stack, tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    key.write_bytes(server.private_key_pem.bytes())
    api = await start_api(stack, tls_cert_file=cert, tls_key_file=key)
    try:
        # a loopback target would default to plaintext: tls=True asks for TLS
        async with connect(api.target, tls=True, root_certificates=ca.cert_pem.bytes()) as anonymous:
            email = api.unique_email()
            await anonymous.auth.Register(auth_pb2.RegisterRequest(email=email, password=PASSWORD))
            tokens = await anonymous.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
        async with connect(
            api.target, tls=True, root_certificates=ca.cert_pem.bytes(), token=tokens.access_token
        ) as client:
            me = await client.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest())
            assert me.user.email == email
        # a server the CA did not sign is refused
        async with connect(api.target, tls=True, root_certificates=trustme.CA().cert_pem.bytes()) as other:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await other.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_api(api)


def test_a_token_is_never_sent_in_plaintext_to_another_host() -> None:
    with pytest.raises(ValueError, match="plaintext"):
        connect("referral.internal:50051", token="t", tls=False)
    assert is_loopback("127.0.0.1:50051")
    assert is_loopback("localhost:50051")
    assert is_loopback("[::1]:50051")
    assert is_loopback("dns:///localhost:50051")
    assert is_loopback("unix:/run/referral.sock")
    assert not is_loopback("referral.internal:50051")
    assert not is_loopback("10.0.0.1:50051")
