"""The Node.js example client (examples/node/flow.js: @grpc/grpc-js + @grpc/proto-loader on our
.proto files) runs its whole flow against a live server. Missing node or its packages skip the
test on a laptop and fail it in CI (REFERRAL_TEST_REQUIRE_BACKENDS=1)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from tests.conftest import REQUIRE, Api

ROOT = Path(__file__).resolve().parent.parent
FLOW = ROOT / "examples/node/flow.js"


def _missing() -> list[str]:
    missing = []
    if shutil.which("node") is None:
        missing.append("node")
    for package in ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs"):
        if not (ROOT / "node_modules" / package / "package.json").exists():
            missing.append(f"{package} (npm install)")
    return missing


@pytest.mark.one_stack
async def test_node_client_runs_the_whole_flow(api: Api) -> None:
    missing = _missing()
    if missing:
        if REQUIRE:
            pytest.fail(f"missing for the Node.js client test: {missing}")
        pytest.skip(f"missing for the Node.js client test: {missing}")
    # The server runs in this event loop: wait for node without blocking it.
    process = await asyncio.create_subprocess_exec(
        "node",
        str(FLOW),
        api.target,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    text = output.decode()
    assert process.returncode == 0, text
    assert "_referrerId" not in text  # no virtual oneof members for proto3 optional fields
    for step in (
        "registered:",
        '"reason":"EMAIL_ALREADY_REGISTERED"',
        "logged in:",
        "created code:",
        "looked up by email:",
        "registered referral:",
        '"totalSize":1',
        "flow complete",
    ):
        assert step in text, text
