"""The README's shell examples, run exactly as printed (bar the port) against a live server
started the way `make run` starts it."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REQUIRE
from tests.live import LiveServer

ROOT = Path(__file__).resolve().parent.parent


def readme_script() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- readme-test:begin -->", 1)[1].split("<!-- readme-test:end -->", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert blocks, "no sh block between the readme-test markers"
    return "\n".join(blocks)


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[int]:
    server = LiveServer(tmp_path, "--migrate").start()
    try:
        yield server.port
    finally:
        output = server.stop()
        assert server.returncode == 0, output
        assert "stopped" in output


def test_readme_examples_work_as_printed(live_server: int) -> None:
    missing = [tool for tool in ("jq",) if shutil.which(tool) is None]
    if not (ROOT / "node_modules/.bin/buf").exists():
        missing.append("buf (npm install)")
    if missing:
        if REQUIRE:
            pytest.fail(f"missing tools for the README test: {missing}")
        pytest.skip(f"missing tools for the README test: {missing}")
    script = readme_script().replace("127.0.0.1:50051", f"127.0.0.1:{live_server}")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "referral.v1.ReferralService/ListReferrals" in output
    assert '"email": "bob@example.com"' in output
    assert '"referrerId"' in output
    assert "Alice's code: " in output
    assert "revoked, as expected" in output
    assert "TOKEN_REVOKED" in output or "revoked" in output
    assert '"status": "SERVING"' in output
