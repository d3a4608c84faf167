"""The shell and Python examples of the README and of the docs/ pages (the grpcurl and buf curl
walkthroughs, the curl HTTP/JSON one, service accounts, TLS), run exactly as printed (bar the
ports) against a live server started the way `make run` starts it. A block is found by its
markers in whichever page holds it; every relative link of those pages must resolve."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REQUIRE

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_blocks(marker: str, language: str = "sh") -> list[str]:
    """The ``language`` blocks between ``<!-- marker:begin -->`` and ``<!-- marker:end -->`` in
    the one page (README.md or docs/*.md) that holds them."""
    holders = [page for page in PAGES if f"<!-- {marker}:begin -->" in page.read_text()]
    assert len(holders) == 1, f"{marker}: expected in exactly one page, found in {holders}"
    text = holders[0].read_text()
    section = text.split(f"<!-- {marker}:begin -->", 1)[1].split(f"<!-- {marker}:end -->", 1)[0]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)
    assert blocks, f"no {language} block between the {marker} markers"
    return blocks


def readme_script(marker: str = "readme-test") -> str:
    return "\n".join(readme_blocks(marker))


@dataclass
class Live:
    grpc_port: int
    http_port: int
    #: The server's working directory (its database is ``data/referral.db`` under it).
    root: Path


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[Live]:
    port = _free_port()
    http_port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFERRAL_")}
    env.update(
        {
            "REFERRAL_DATA_DIR": str(tmp_path / "data"),
            "REFERRAL_GRPC_PORT": str(port),
            "REFERRAL_HTTP_PORT": str(http_port),
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "referral_service", "serve", "--migrate"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            for wanted in (port, http_port):
                socket.create_connection(("127.0.0.1", wanted), timeout=0.2).close()
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"server exited: {process.stdout.read() if process.stdout else ''}")
            time.sleep(0.1)
    else:
        process.kill()
        pytest.fail("server did not start")
    try:
        yield Live(port, http_port, tmp_path)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
        assert process.returncode == 0, output
        assert "stopped" in output


def _run_script(script: str, missing: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    """Run a README block with bash (strict mode), from the repository root unless told, in
    ``env`` (default: this process's environment); its output."""
    if missing:
        if REQUIRE:
            pytest.fail(f"missing tools for the README test: {missing}")
        pytest.skip(f"missing tools for the README test: {missing}")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_the_readme_fits_on_a_screen_and_every_link_resolves() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 80, "README.md is a screen: move details to docs/"
    for page in [*PAGES, ROOT / "CHANGELOG.md", ROOT / "clients/python/README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: broken link {target}"


def test_readme_quick_examples_work_as_printed(live_server: Live, tmp_path: Path) -> None:
    """The README's grpcurl and curl lines, then its Python client example."""
    missing = [tool for tool in ("curl",) if shutil.which(tool) is None]
    if not (ROOT / ".venv/bin/grpcurl").exists():
        missing.append("grpcurl (make install)")
    script = readme_script("readme-test-quick")
    script = script.replace("127.0.0.1:50051", f"127.0.0.1:{live_server.grpc_port}")
    output = _run_script(script.replace("127.0.0.1:8080", f"127.0.0.1:{live_server.http_port}"), missing)
    assert '"email": "alice@example.com"' in output  # registered over gRPC
    assert '"accessToken":"' in output  # logged in over HTTP
    (python,) = readme_blocks("readme-test-python", "python")
    program = tmp_path / "example.py"
    program.write_text(python.replace("127.0.0.1:50051", f"127.0.0.1:{live_server.grpc_port}"))
    result = subprocess.run(
        [sys.executable, str(program)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("no live code; request id "), result.stdout


def test_grpcurl_examples_work_as_printed(live_server: Live) -> None:
    missing = [tool for tool in ("jq",) if shutil.which(tool) is None]
    if not (ROOT / ".venv/bin/grpcurl").exists():
        missing.append("grpcurl (make install)")
    script = readme_script("readme-test-grpcurl").replace(
        "127.0.0.1:50051", f"127.0.0.1:{live_server.grpc_port}"
    )
    output = _run_script(script, missing)
    assert "grpc.reflection.v1.ServerReflection" in output
    assert "// ReferralService manages referral codes" in output  # describe shows the comments
    assert '"email": "dave@example.com"' in output
    assert '"state": "STATE_ACTIVE"' in output  # created with the token, then looked up
    assert '"reason":"VALIDATION_FAILED"' in output  # details decoded
    assert '"field":"password"' in output
    assert "refused, as expected" in output
    assert '"status": "SERVING"' in output


def test_readme_examples_work_as_printed(live_server: Live) -> None:
    missing = [tool for tool in ("jq",) if shutil.which(tool) is None]
    if not (ROOT / "node_modules/.bin/buf").exists():
        missing.append("buf (npm install)")
    script = readme_script().replace("127.0.0.1:50051", f"127.0.0.1:{live_server.grpc_port}")
    output = _run_script(script, missing)
    assert "referral.v1.ReferralService/ListReferrals" in output
    assert '"email": "bob@example.com"' in output
    assert '"referrerId"' in output
    assert "Alice's code: " in output
    assert "revoked, as expected" in output
    assert "TOKEN_REVOKED" in output or "revoked" in output
    assert '"status": "SERVING"' in output


def test_readme_http_examples_work_as_printed(live_server: Live) -> None:
    missing = [tool for tool in ("jq", "curl") if shutil.which(tool) is None]
    script = readme_script("readme-test-http")
    assert "127.0.0.1:8080" in script
    output = _run_script(script.replace("127.0.0.1:8080", f"127.0.0.1:{live_server.http_port}"), missing)
    assert "Alice's code: " in output
    assert '"referrerId":"1"' in output  # Bob is Alice's referral
    assert '"totalSize":1' in output
    assert "HTTP/1.1 409" in output
    assert '"reason":"EMAIL_ALREADY_REGISTERED"' in output
    assert re.search(r"\b401\n", output)  # the revoked token
    assert '{"status":"SERVING"}' in output
    assert "/v1/users/{referrer_id}/referrals" in output


def test_accounts_examples_work_as_printed(live_server: Live) -> None:
    """Run from the server's directory, as from the repository root with ``make run`` (whose
    data directory, and so its mail directory, is ./data)."""
    missing = [tool for tool in ("jq", "curl") if shutil.which(tool) is None]
    script = readme_script("readme-test-accounts").replace(
        "127.0.0.1:8080", f"127.0.0.1:{live_server.http_port}"
    )
    output = _run_script(script, missing, cwd=live_server.root)
    assert '{"email":"carol@example.com","isVerified":false}' in output
    assert '{"email":"carol@example.com","isVerified":true}' in output
    assert "EMAIL_TOKEN_USED" in output
    assert output.count("{}") == 2


def test_readme_service_account_examples_work_as_printed(live_server: Live) -> None:
    """The operator's commands run from the repository as printed, on the live server's database
    (``make run`` serves ./data; here the server's own directory)."""
    missing = [tool for tool in ("jq",) if shutil.which(tool) is None]
    if not (ROOT / "node_modules/.bin/buf").exists():
        missing.append("buf (npm install)")
    if not (ROOT / ".venv/bin/referral-service").exists():
        missing.append("referral-service (make install)")
    script = readme_script("readme-test-service").replace(
        "127.0.0.1:50051", f"127.0.0.1:{live_server.grpc_port}"
    )
    data = live_server.root / "data"
    env = {
        "REFERRAL_DATA_DIR": str(data),
        "REFERRAL_DATABASE_URL": f"sqlite+aiosqlite:///{data / 'referral.db'}",
    }
    output = _run_script(script, missing, env={**os.environ, **env})
    assert '"email": "carol@example.com"' in output  # GetUser
    assert '"active": true' in output  # IntrospectToken
    assert '"tokenType": "TOKEN_TYPE_ACCESS_TOKEN"' in output
    assert "billing\tsvc_" in output  # list-service-accounts
    assert "revoked service account billing" in output
    assert "refused, as expected" in output
    assert not (ROOT / "billing.json").exists()


def test_readme_tls_examples_work_as_printed(tmp_path: Path) -> None:
    """The TLS walkthrough: the certificates made with openssl, the server started by the
    printed command (in a scratch directory, on free ports), then the buf curl and curl calls."""
    missing = [tool for tool in ("openssl", "curl") if shutil.which(tool) is None]
    if not (ROOT / "node_modules/.bin/buf").exists():
        missing.append("buf (npm install)")
    make_certificates, serve, calls = readme_blocks("readme-test-tls")
    grpc_port, http_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFERRAL_")}
    env["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), str(ROOT / "node_modules/.bin"), env.get("PATH", "")]
    )
    _run_script(make_certificates, missing, cwd=tmp_path, env=env)
    server_env = {
        **env,
        "REFERRAL_DATA_DIR": str(tmp_path / "data"),
        "REFERRAL_GRPC_PORT": str(grpc_port),
        "REFERRAL_HTTP_PORT": str(http_port),
    }
    server = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", serve],
        cwd=tmp_path,
        env=server_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the shell, the supervisor and its workers: one group to stop
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and server.poll() is None:
            try:
                for wanted in (grpc_port, http_port):
                    socket.create_connection(("127.0.0.1", wanted), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the server did not start")
        script = calls.replace("127.0.0.1:50051", f"127.0.0.1:{grpc_port}").replace(
            "127.0.0.1:8080", f"127.0.0.1:{http_port}"
        )
        output = _run_script(script, missing, cwd=tmp_path, env=env)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        log, _ = server.communicate(timeout=30)  # until every process holding the pipe has exited
    assert output.count('"status": "SERVING"') == 1  # only the call with the client certificate
    assert "refused, as expected" in output
    assert output.count('{"status":"SERVING"}') == 2
    assert "with TLS (client certificates: require)" in log
    # The /healthz calls' access lines (with the peer identity) are DEBUG lines since issue 14;
    # tests/test_tls.py checks the identity on HTTP access lines.
    assert "stopped" in log


def test_readme_operations_examples_work_as_printed(live_server: Live) -> None:
    """Metrics, probes, the health command and a one-line configuration error, against a server
    started as `make run` starts it (several workers on a multi-core machine)."""
    missing = [tool for tool in ("jq", "curl") if shutil.which(tool) is None]
    if not (ROOT / ".venv/bin/referral-service").exists():
        missing.append("referral-service (make install)")
    script = readme_script("readme-test-ops")
    assert "127.0.0.1:8080" in script
    assert "REFERRAL_HTTP_PORT=8080" in script
    port = str(live_server.http_port)
    output = _run_script(
        script.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace(
            "REFERRAL_HTTP_PORT=8080", f"REFERRAL_HTTP_PORT={port}"
        ),
        missing,
        env={k: v for k, v in os.environ.items() if not k.startswith("REFERRAL_")},
    )
    assert re.search(r'^grpc_server_handled_total\{.*transport="http".*\} 1\.0$', output, flags=re.M), output
    assert '{"status":"SERVING","components":{"database":"SERVING","redis":"SERVING"}}' in output
    assert "\n200\n" in output
    assert "\nSERVING\n" in output
    assert "referral-service: configuration error: REFERRAL_DATABASE_URL: not a database URL" in output
    assert "exit code 2" in output
