"""TLS and mTLS on both ports, with real certificates made on the fly (trustme, and cryptography
for SPIFFE client certificates, which trustme cannot issue): handshakes through the wire,
client-certificate modes, the identity a verified certificate gives a call, and certificates
rotated while the server keeps serving."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError
from referral.v1 import auth_pb2, auth_pb2_grpc

from referral_service.app import App, StartupError, build_app
from referral_service.config import Settings, describe
from referral_service.domain.auth import RegisterCommand
from referral_service.pipeline.identity import certificate_identity
from tests.conftest import Stack
from tests.live import LiveServer

pytestmark = pytest.mark.one_stack  # TLS does not depend on the stores

SPIFFE_ID = "spiffe://example.org/ns/billing/sa/billing"


# --- certificates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """A certificate chain and its key, as PEM, and written to files (for httpx and buf)."""

    cert_pem: bytes
    key_pem: bytes
    cert_file: Path
    key_file: Path

    @property
    def serial(self) -> int:
        return x509.load_pem_x509_certificate(self.cert_pem).serial_number


def _write(path: Path, data: bytes) -> None:
    """Write next to ``path`` and rename into place, as a rotation does."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save(directory: Path, name: str, cert_pem: bytes, key_pem: bytes) -> Credential:
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    _write(cert_file, cert_pem)
    _write(key_file, key_pem)
    return Credential(cert_pem, key_pem, cert_file, key_file)


def server_credential(ca: trustme.CA, directory: Path, name: str = "server") -> Credential:
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    return _save(directory, name, chain, leaf.private_key_pem.bytes())


def client_credential(
    ca: trustme.CA, directory: Path, name: str, *, uris: tuple[str, ...] = (), common_name: str | None = None
) -> Credential:
    """A client certificate with these URI SANs (SPIFFE IDs) and subject CN, signed by ``ca``."""
    ca_key: Any = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri) for uri in uris]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return _save(
        directory,
        name,
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


@dataclass
class Pki:
    """A server CA and the server certificate in the files the server reads; a client CA and
    client certificates: one with a SPIFFE ID, one with a CN only, one from a CA the server
    does not trust."""

    directory: Path
    server_ca: trustme.CA
    server: Credential
    client_ca: trustme.CA
    client_ca_file: Path
    spiffe_client: Credential
    cn_client: Credential
    stranger: Credential
    #: Two SPIFFE IDs: verified, but names no one.
    ambiguous: Credential

    def settings(self, client_auth: str = "none", **more: Any) -> dict[str, Any]:
        return {
            "tls_cert_file": self.server.cert_file,
            "tls_key_file": self.server.key_file,
            "tls_client_ca_file": self.client_ca_file,
            "tls_client_auth": client_auth,
            **more,
        }


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "tls"
    server_ca, client_ca = trustme.CA(), trustme.CA()
    client_ca_file = directory / "client-ca.pem"
    server = server_credential(server_ca, directory)
    _write(client_ca_file, client_ca.cert_pem.bytes())
    return Pki(
        directory,
        server_ca,
        server,
        client_ca,
        client_ca_file,
        client_credential(client_ca, directory, "billing", uris=(SPIFFE_ID,), common_name="billing-cn"),
        client_credential(client_ca, directory, "rewards", common_name="rewards-job"),
        client_credential(trustme.CA(), directory, "stranger", uris=(SPIFFE_ID,)),
        client_credential(
            client_ca,
            directory,
            "ambiguous",
            uris=(SPIFFE_ID, "spiffe://example.org/ns/x/sa/y"),
            common_name="x",
        ),
    )


# --- clients -------------------------------------------------------------------------------------


def grpc_channel(port: int, *trusted: trustme.CA, client: Credential | None = None) -> grpc.aio.Channel:
    """A channel of its own (its own connection, never one shared with another channel)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=b"".join(ca.cert_pem.bytes() for ca in trusted),
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.use_local_subchannel_pool", 1)]
    )


async def grpc_health(port: int, *trusted: trustme.CA, client: Credential | None = None) -> grpc.StatusCode:
    """Check health over a new connection: OK, or the status the call failed with."""
    async with grpc_channel(port, *trusted, client=client) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def client_context(*trusted: trustme.CA, client: Credential | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata="".join(ca.cert_pem.bytes().decode() for ca in trusted))
    if client is not None:
        context.load_cert_chain(client.cert_file, client.key_file)
    return context


@dataclass
class HttpAnswer:
    status: int
    #: Serial number of the certificate the server presented.
    serial: int


async def https_get(
    port: int, path: str, *trusted: trustme.CA, client: Credential | None = None
) -> HttpAnswer:
    """GET over a new connection."""
    async with httpx.AsyncClient(verify=client_context(*trusted, client=client), timeout=5) as http:
        response = await http.get(f"https://127.0.0.1:{port}{path}")
        stream = response.extensions["network_stream"]
        der = stream.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return HttpAnswer(response.status_code, x509.load_der_x509_certificate(der).serial_number)


async def served_serial(port: int, *trusted: trustme.CA, client: Credential | None = None) -> int:
    """The serial number of the certificate the gRPC port presents to a new connection."""
    context = client_context(*trusted, client=client)
    context.set_alpn_protocols(["h2"])
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Captures the access log (health probes are logged at DEBUG)."""
    with caplog.at_level(logging.DEBUG, logger="referral_service.access"):
        yield caplog


def identities(access: pytest.LogCaptureFixture, method: str) -> list[str | None]:
    """The peer identity of each access line of ``method``."""
    return [
        getattr(r, "peer_identity", "absent") for r in access.records if getattr(r, "method", "") == method
    ]


async def started(stack: Stack, **settings: Any) -> App:
    app = await build_app(stack.settings(**settings))
    await app.start()
    return app


@pytest.fixture
async def serving(stack: Stack) -> AsyncIterator[list[App]]:
    """Apps started by the test, stopped at its end."""
    apps: list[App] = []
    yield apps
    for app in apps:
        await app.stop(0, drain=0)


# --- gRPC --------------------------------------------------------------------------------------


LOGIN = "/referral.v1.AuthService/Login"
HEALTHZ = "GET /healthz"


async def login_identity_over_grpc(app: App, pki: Pki, client: Credential | None) -> grpc.StatusCode:
    """A Login (wrong password) over a new connection: the status, and its access line."""
    async with grpc_channel(app.port, pki.server_ca, client=client) as channel:
        try:
            await auth_pb2_grpc.AuthServiceStub(channel).Login(
                auth_pb2.LoginRequest(email="nobody@example.com", password="not the password"), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def test_grpc_over_tls_without_client_certificates(
    stack: Stack, pki: Pki, serving: list[App], access: pytest.LogCaptureFixture
) -> None:
    app = await started(stack, **pki.settings())
    serving.append(app)
    assert await grpc_health(app.port, pki.server_ca) == grpc.StatusCode.OK
    assert await served_serial(app.port, pki.server_ca) == pki.server.serial
    # Plaintext to the TLS port, or a client that does not trust the server's CA: no connection.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await grpc_health(app.port, trustme.CA()) == grpc.StatusCode.UNAVAILABLE
    # Without client authentication a client certificate is not even asked for: no identity.
    assert await login_identity_over_grpc(app, pki, pki.spiffe_client) == grpc.StatusCode.UNAUTHENTICATED
    assert identities(access, LOGIN) == [None]


async def test_grpc_mtls_require(
    stack: Stack, pki: Pki, serving: list[App], access: pytest.LogCaptureFixture
) -> None:
    app = await started(stack, **pki.settings("require"))
    serving.append(app)
    # No client certificate, or one from a CA the server does not trust: refused at the handshake.
    assert await grpc_health(app.port, pki.server_ca) == grpc.StatusCode.UNAVAILABLE
    assert await grpc_health(app.port, pki.server_ca, client=pki.stranger) == grpc.StatusCode.UNAVAILABLE
    assert await login_identity_over_grpc(app, pki, None) == grpc.StatusCode.UNAVAILABLE
    assert identities(access, LOGIN) == []  # never reached the service
    # A verified certificate: the call carries its SPIFFE ID, or its CN when it has none.
    assert await grpc_health(app.port, pki.server_ca, client=pki.spiffe_client) == grpc.StatusCode.OK
    assert await login_identity_over_grpc(app, pki, pki.spiffe_client) == grpc.StatusCode.UNAUTHENTICATED
    assert await login_identity_over_grpc(app, pki, pki.cn_client) == grpc.StatusCode.UNAUTHENTICATED
    assert await login_identity_over_grpc(app, pki, pki.ambiguous) == grpc.StatusCode.UNAUTHENTICATED
    assert identities(access, LOGIN) == [SPIFFE_ID, "rewards-job", None]


async def test_the_grpc_certificate_rotates_while_serving(
    stack: Stack, tmp_path: Path, serving: list[App]
) -> None:
    """The certificate files are replaced by one from another CA: a new connection gets the new
    certificate at once, no restart, and connections already open keep working."""
    first_ca, second_ca = trustme.CA(), trustme.CA()
    files = tmp_path / "server-tls"
    first = server_credential(first_ca, files)
    app = await started(stack, tls_cert_file=first.cert_file, tls_key_file=first.key_file)
    serving.append(app)
    async with grpc_channel(app.port, first_ca) as open_before:
        health = health_pb2_grpc.HealthStub(open_before)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert await grpc_health(app.port, second_ca) == grpc.StatusCode.UNAVAILABLE

        second = server_credential(second_ca, files)  # the same file names, replaced
        assert second.serial != first.serial
        assert await served_serial(app.port, first_ca, second_ca) == second.serial
        assert await grpc_health(app.port, second_ca) == grpc.StatusCode.OK
        assert await grpc_health(app.port, first_ca) == grpc.StatusCode.UNAVAILABLE
        # The connection made before the rotation still serves calls.
        response = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_half_written_rotation_keeps_the_previous_certificate(
    stack: Stack, tmp_path: Path, serving: list[App], caplog: pytest.LogCaptureFixture
) -> None:
    """The new certificate lands before its key: handshakes go on with the old pair until the
    key arrives; never a broken handshake."""
    ca = trustme.CA()
    files = tmp_path / "server-tls"
    first = server_credential(ca, files)
    app = await started(stack, tls_cert_file=first.cert_file, tls_key_file=first.key_file)
    serving.append(app)
    second = server_credential(ca, tmp_path / "staging")
    _write(first.cert_file, second.cert_pem)  # the key is still the first one
    assert await grpc_health(app.port, ca) == grpc.StatusCode.OK
    assert await served_serial(app.port, ca) == first.serial
    assert "cannot be used" in caplog.text
    _write(first.key_file, second.key_pem)
    assert await served_serial(app.port, ca) == second.serial
    assert await grpc_health(app.port, ca) == grpc.StatusCode.OK


async def test_the_client_ca_rotates_while_serving(stack: Stack, pki: Pki, serving: list[App]) -> None:
    app = await started(stack, **pki.settings("require"))
    serving.append(app)
    next_ca = trustme.CA()
    next_client = client_credential(next_ca, pki.directory, "next", uris=(SPIFFE_ID,))
    assert await grpc_health(app.port, pki.server_ca, client=next_client) == grpc.StatusCode.UNAVAILABLE
    _write(pki.client_ca_file, next_ca.cert_pem.bytes())
    assert await grpc_health(app.port, pki.server_ca, client=next_client) == grpc.StatusCode.OK
    assert await grpc_health(app.port, pki.server_ca, client=pki.spiffe_client) == grpc.StatusCode.UNAVAILABLE


# --- HTTP --------------------------------------------------------------------------------------


async def test_https_without_client_certificates(
    stack: Stack, pki: Pki, serving: list[App], access: pytest.LogCaptureFixture
) -> None:
    app = await started(stack, **pki.settings())
    serving.append(app)
    assert app.http_port is not None
    answer = await https_get(app.http_port, "/healthz", pki.server_ca, client=pki.spiffe_client)
    assert (answer.status, answer.serial) == (200, pki.server.serial)
    assert http_identities(access) == [None]  # the certificate was not asked for
    async with httpx.AsyncClient(timeout=5) as plaintext:
        with pytest.raises(httpx.TransportError):
            await plaintext.get(f"http://127.0.0.1:{app.http_port}/healthz")


def http_identities(access: pytest.LogCaptureFixture) -> list[str | None]:
    """The peer identity of each access line of ``GET /healthz``."""
    return [
        getattr(r, "peer_identity", "absent") for r in access.records if getattr(r, "route", "") == HEALTHZ
    ]


async def test_https_mtls_require(
    stack: Stack, pki: Pki, serving: list[App], access: pytest.LogCaptureFixture
) -> None:
    app = await started(stack, **pki.settings("require"))
    serving.append(app)
    assert app.http_port is not None
    for client in (None, pki.stranger):
        with pytest.raises(httpx.TransportError):
            await https_get(app.http_port, "/healthz", pki.server_ca, client=client)
    assert http_identities(access) == []
    for client in (pki.spiffe_client, pki.cn_client, pki.ambiguous):
        assert (await https_get(app.http_port, "/healthz", pki.server_ca, client=client)).status == 200
    assert http_identities(access) == [SPIFFE_ID, "rewards-job", None]


async def test_https_mtls_optional_next_to_grpc_require(
    stack: Stack, pki: Pki, serving: list[App], access: pytest.LogCaptureFixture
) -> None:
    """The usual split: services on gRPC must present a certificate; browsers on HTTP need not,
    but a certificate given there is verified and names the caller."""
    app = await started(stack, **pki.settings("require", http_tls_client_auth="optional"))
    serving.append(app)
    assert app.http_port is not None
    assert (await https_get(app.http_port, "/healthz", pki.server_ca)).status == 200
    assert (await https_get(app.http_port, "/healthz", pki.server_ca, client=pki.spiffe_client)).status == 200
    with pytest.raises(httpx.TransportError):  # a certificate given must be one the CA signed
        await https_get(app.http_port, "/healthz", pki.server_ca, client=pki.stranger)
    assert http_identities(access) == [None, SPIFFE_ID]
    assert await grpc_health(app.port, pki.server_ca) == grpc.StatusCode.UNAVAILABLE
    assert await grpc_health(app.port, pki.server_ca, client=pki.spiffe_client) == grpc.StatusCode.OK


async def test_the_https_certificate_rotates_while_serving(
    stack: Stack, tmp_path: Path, serving: list[App]
) -> None:
    first_ca, second_ca = trustme.CA(), trustme.CA()
    files = tmp_path / "server-tls"
    first = server_credential(first_ca, files)
    app = await started(stack, tls_cert_file=first.cert_file, tls_key_file=first.key_file)
    serving.append(app)
    assert app.http_port is not None
    async with httpx.AsyncClient(verify=client_context(first_ca), timeout=5) as open_before:
        url = f"https://127.0.0.1:{app.http_port}/healthz"
        assert (await open_before.get(url)).status_code == 200
        second = server_credential(second_ca, files)
        answer = await https_get(app.http_port, "/healthz", second_ca)
        assert (answer.status, answer.serial) == (200, second.serial)
        with pytest.raises(httpx.ConnectError):
            await https_get(app.http_port, "/healthz", first_ca)
        assert (await open_before.get(url)).status_code == 200  # the kept-alive connection


# --- multi-process serving -------------------------------------------------------------------------


async def test_workers_serve_mtls_on_both_ports(tmp_path: Path, pki: Pki) -> None:
    env = {f"REFERRAL_{name.upper()}": str(value) for name, value in pki.settings("require").items()}
    server = LiveServer(tmp_path / "run", "--migrate", "--workers", "2", env=env).start()
    try:
        for _ in range(10):  # new connections, spread over the workers by the kernel
            assert (
                await grpc_health(server.port, pki.server_ca, client=pki.spiffe_client) == grpc.StatusCode.OK
            )
            assert await grpc_health(server.port, pki.server_ca) == grpc.StatusCode.UNAVAILABLE
            # /openapi.json: its access lines are INFO lines (health probes' are DEBUG)
            answer = await https_get(
                server.http_port, "/openapi.json", pki.server_ca, client=pki.spiffe_client
            )
            assert answer.status == 200
    finally:
        output = server.stop()
    assert server.returncode == 0, output
    # Each worker logs how it serves (a worker still starting when the test ends has not yet).
    assert output.count("with TLS (client certificates: require)") >= 1
    assert output.count(f"peer_identity={SPIFFE_ID}") >= 10  # the HTTP access lines


def test_workers_are_not_started_on_unusable_tls_files(tmp_path: Path, pki: Pki) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFERRAL_")}
    env |= {
        "REFERRAL_DATA_DIR": str(tmp_path / "data"),
        "REFERRAL_TLS_CERT_FILE": str(pki.server.cert_file),
        "REFERRAL_TLS_KEY_FILE": str(pki.cn_client.key_file),  # not the certificate's key
    }
    result = subprocess.run(
        [sys.executable, "-m", "referral_service", "serve", "--workers", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output  # a configuration error (issue 14: exit code 2)
    assert output.count("is not the private key of the certificate") == 1, output
    assert "worker=" not in output  # no worker was started


# --- configuration -----------------------------------------------------------------------------


def problems(**settings: Any) -> list[str]:
    with pytest.raises(ValidationError) as error:
        Settings(_env_file=None, **settings)  # type: ignore[call-arg]
    return describe(error.value)


def test_tls_settings_are_checked(pki: Pki, tmp_path: Path) -> None:
    cert, key, ca = pki.server.cert_file, pki.server.key_file, pki.client_ca_file
    assert any("REFERRAL_TLS_KEY_FILE" in line for line in problems(tls_cert_file=cert))
    assert any(
        "REFERRAL_TLS_CLIENT_CA_FILE" in line
        for line in problems(tls_cert_file=cert, tls_key_file=key, tls_client_auth="require")
    )
    assert any(
        "REFERRAL_HTTP_TLS_CLIENT_AUTH=optional needs REFERRAL_TLS_CLIENT_CA_FILE" in line
        for line in problems(tls_cert_file=cert, tls_key_file=key, http_tls_client_auth="optional")
    )
    assert any("needs TLS" in line for line in problems(tls_client_ca_file=ca, tls_client_auth="require"))
    optional = problems(
        tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=ca, tls_client_auth="optional"
    )
    assert any(
        "REFERRAL_TLS_CLIENT_AUTH=optional is not possible on the gRPC port" in line for line in optional
    )
    assert problems(tls_cert_file=tmp_path / "missing.pem", tls_key_file=key)[0].startswith(
        "REFERRAL_TLS_CERT_FILE: "
    )
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=ca, tls_client_auth="require"
    )
    assert settings.tls.effective_http_client_auth.value == "require"


async def test_unusable_tls_files_stop_the_start(stack: Stack, pki: Pki) -> None:
    with pytest.raises(StartupError, match="is not the private key of the certificate"):
        await build_app(
            stack.settings(tls_cert_file=pki.server.cert_file, tls_key_file=pki.cn_client.key_file)
        )
    with pytest.raises(StartupError, match="holds no PEM certificate"):
        await build_app(stack.settings(tls_cert_file=pki.server.key_file, tls_key_file=pki.server.key_file))


def test_plaintext_on_a_public_address_is_reported() -> None:
    def exposed(**settings: Any) -> list[str]:
        return Settings(_env_file=None, **settings).plaintext_exposed()  # type: ignore[call-arg]

    assert exposed() == []  # loopback by default
    assert exposed(grpc_host="0.0.0.0", http_host="::1") == ["gRPC 0.0.0.0:50051"]
    assert exposed(grpc_host="10.1.2.3", http_host="0.0.0.0", http_port=8443) == [
        "gRPC 10.1.2.3:50051",
        "HTTP 0.0.0.0:8443",
    ]


def test_which_name_a_certificate_gives() -> None:
    assert certificate_identity([SPIFFE_ID], ["billing-cn"]) == SPIFFE_ID
    assert certificate_identity(["https://example.org/x", SPIFFE_ID], []) == SPIFFE_ID
    assert certificate_identity([], ["rewards-job"]) == "rewards-job"
    # Ambiguous or out of place: no identity rather than a guess.
    assert certificate_identity([SPIFFE_ID, "spiffe://example.org/other"], ["billing-cn"]) is None
    assert certificate_identity([], ["a", "b"]) is None
    assert certificate_identity([], ["spiffe://example.org/ns/admin"]) is None
    assert certificate_identity([], ["line\nbreak"]) is None
    assert certificate_identity([], []) is None


# --- client certificates as service accounts ----------------------------------------------------


async def test_a_client_certificate_mapped_to_a_service_account_calls_as_it(
    stack: Stack, pki: Pki, serving: list[App]
) -> None:
    """mTLS instead of a token: the SPIFFE ID maps to the account ``billing`` (its scopes, no
    more); an unmapped certificate is nobody; a token still wins; revoking the account ends the
    certificate's access at once."""
    app = await started(
        stack,
        **pki.settings(
            "require", http_tls_client_auth="optional", tls_service_accounts={SPIFFE_ID: "billing"}
        ),
    )
    serving.append(app)
    await app.services.service_accounts.create("billing", ["users:read"])
    user = await app.auth.register(RegisterCommand(email="carol@example.com", password="a long passphrase"))
    lookup = auth_pb2.GetUserRequest(user_id=user.id)
    async with grpc_channel(app.port, pki.server_ca, client=pki.spiffe_client) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        found = await stub.GetUser(lookup, timeout=5)
        assert found.user.email == "carol@example.com"
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.IntrospectToken(auth_pb2.IntrospectTokenRequest(token="x"), timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # A user's token on the same connection is that user, not the service.
        tokens = await stub.Login(
            auth_pb2.LoginRequest(email="carol@example.com", password="a long passphrase")
        )
        me = await stub.GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(), metadata=(("authorization", f"Bearer {tokens.access_token}"),)
        )
        assert me.user.id == user.id
    # The same call over HTTPS with the certificate (the HTTP port asks for one, optionally).
    async with httpx.AsyncClient(
        verify=client_context(pki.server_ca, client=pki.spiffe_client), timeout=5
    ) as http:
        response = await http.get(
            f"https://127.0.0.1:{app.http_port}/v1/users:lookup", params={"userId": user.id}
        )
        assert response.status_code == 200, response.text
    # A verified certificate that maps to no account is nobody.
    async with grpc_channel(app.port, pki.server_ca, client=pki.cn_client) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as nobody:
            await auth_pb2_grpc.AuthServiceStub(channel).GetUser(lookup, timeout=5)
        assert nobody.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Revoked: refused at once.
    await app.services.service_accounts.revoke("billing")
    async with grpc_channel(app.port, pki.server_ca, client=pki.spiffe_client) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as revoked:
            await auth_pb2_grpc.AuthServiceStub(channel).GetUser(lookup, timeout=5)
        assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (revoked.value.details() or "")


def test_mapping_certificates_needs_client_certificates(pki: Pki) -> None:
    with pytest.raises(ValidationError, match="REFERRAL_TLS_SERVICE_ACCOUNTS"):
        Settings(  # type: ignore[call-arg]
            _env_file=None,
            tls_cert_file=pki.server.cert_file,
            tls_key_file=pki.server.key_file,
            tls_service_accounts={SPIFFE_ID: "billing"},
        )
