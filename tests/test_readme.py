"""The README's shell examples (the buf curl walkthrough and the curl HTTP/JSON one), run exactly
as printed (bar the ports) against a live server started the way `make run` starts it."""

from __future__ import annotations

import os
import re
import shutil
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


def readme_script(marker: str = "readme-test") -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"<!-- {marker}:begin -->", 1)[1].split(f"<!-- {marker}:end -->", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert blocks, "no sh block between the readme-test markers"
    return "\n".join(blocks)


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


def _run_script(script: str, missing: list[str], env: dict[str, str] | None = None) -> str:
    """Run a README block with bash (strict mode) from the repository root; its output."""
    if missing:
        if REQUIRE:
            pytest.fail(f"missing tools for the README test: {missing}")
        pytest.skip(f"missing tools for the README test: {missing}")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


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
    output = _run_script(script, missing, env)
    assert '"email": "carol@example.com"' in output  # GetUser
    assert '"active": true' in output  # IntrospectToken
    assert '"tokenType": "TOKEN_TYPE_ACCESS_TOKEN"' in output
    assert "billing\tsvc_" in output  # list-service-accounts
    assert "revoked service account billing" in output
    assert "refused, as expected" in output
    assert not (ROOT / "billing.json").exists()
