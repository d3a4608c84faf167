"""The proto as a module other languages embed: `buf build` at the repository root, the
committed generation templates (buf.gen.ts.yaml, buf.gen.go.yaml, buf.gen.java.yaml) produce code
offline with managed mode and without emitting Google's protos as ours, and the generated
TypeScript client runs a small example (examples/typescript) against a live server.

Missing tools (node packages, Debian's protoc-gen-go / protoc-gen-go-grpc / protoc /
grpc_java_plugin / golang-go) skip a test on a laptop and fail it in CI
(REFERRAL_TEST_REQUIRE_BACKENDS=1, where .ci/run installs them)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REQUIRE, Api

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "node_modules/.bin/buf"
TS_EXAMPLE = ROOT / "examples/typescript"


def need(*tools: str | Path) -> None:
    missing = [
        str(t) for t in tools if (shutil.which(t) is None if isinstance(t, str) else not Path(t).exists())
    ]
    if missing:
        message = f"missing: {missing} (npm install; apt-get install as in .ci/run)"
        if REQUIRE:
            pytest.fail(message)
        pytest.skip(message)


def run(*args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=False, env=env
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def generated(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_buf_builds_the_module_from_the_repository_root(tmp_path: Path) -> None:
    need(BUF)
    run(BUF, "build", "-o", tmp_path / "image.binpb")
    files = run(BUF, "ls-files").split()
    assert "protos/referral/v1/auth.proto" in files
    # the copies of Google's protos in .venv and node_modules are not part of it
    assert all(f.startswith(("protos/referral/", "protos/third_party/")) for f in files), files


def test_go_templates_generate_our_code_with_googles_published_packages(tmp_path: Path) -> None:
    need(BUF, "protoc-gen-go", "protoc-gen-go-grpc")
    run(BUF, "generate", "--template", "buf.gen.go.yaml", "-o", tmp_path)
    out = tmp_path / "gen/go"
    assert generated(out) == [
        f"referral/v1/{name}"
        for name in (
            "auth.pb.go",
            "auth_grpc.pb.go",
            "errors.pb.go",
            "events.pb.go",
            "events_grpc.pb.go",
            "options.pb.go",
            "referral.pb.go",
            "referral_grpc.pb.go",
        )
    ]
    auth = (out / "referral/v1/auth.pb.go").read_text()
    assert "package referralv1" in auth  # managed mode: go_package from the template
    assert '"google.golang.org/genproto/googleapis/api/annotations"' in auth
    assert "func NewAuthServiceClient" in (out / "referral/v1/auth_grpc.pb.go").read_text()


def test_the_go_code_and_example_compile(tmp_path: Path) -> None:
    """The generated package and examples/go/flow build against Debian's Go packages (GOPATH
    mode: no module proxy here). Not run: Debian's grpc-go links its old golang/protobuf 1.3,
    which cannot unmarshal protoc-gen-go 1.28 messages; a Go module build has no such mix."""
    need(
        BUF, "protoc-gen-go", "protoc-gen-go-grpc", "go", Path("/usr/share/gocode/src/google.golang.org/grpc")
    )
    project = tmp_path / "gopath/src/example.com/referral-service"
    project.mkdir(parents=True)
    run(BUF, "generate", "--template", "buf.gen.go.yaml", "-o", project)
    shutil.copytree(ROOT / "examples/go", project / "examples/go")
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{tmp_path / 'gopath'}:/usr/share/gocode",
        "GOCACHE": str(tmp_path / "gocache"),
        "GOFLAGS": "",
    }
    run("go", "vet", "./gen/go/referral/v1", "./examples/go/flow", cwd=project, env=env)
    run("go", "build", "-o", tmp_path / "flow", "./examples/go/flow", cwd=project, env=env)
    assert (tmp_path / "flow").exists()


def test_java_template_generates_messages_and_stubs(tmp_path: Path) -> None:
    need(BUF, "protoc", "grpc_java_plugin")
    run(BUF, "generate", "--template", "buf.gen.java.yaml", "-o", tmp_path)
    files = generated(tmp_path / "gen/java")
    assert "com/example/referral/v1/RegisterRequest.java" in files
    assert "com/example/referral/v1/AuthServiceGrpc.java" in files
    assert not [f for f in files if not f.startswith("com/example/referral/v1/")]


@pytest.mark.one_stack
async def test_the_typescript_client_is_generated_and_runs_the_flow(api: Api) -> None:
    need(
        BUF,
        "node",
        "npm",
        ROOT / "node_modules/.bin/protoc-gen-es",
        ROOT / "node_modules/@connectrpc/connect-node/package.json",
        TS_EXAMPLE / "node_modules/.bin/tsc",
    )
    for stale in (TS_EXAMPLE / "gen", TS_EXAMPLE / "dist"):
        shutil.rmtree(stale, ignore_errors=True)
    # the commands of examples/typescript's `generate` and `build` scripts
    run(BUF, "generate", "--template", "buf.gen.ts-googleapis.yaml")
    run(BUF, "generate", "--template", "buf.gen.ts.yaml", "-o", "examples/typescript")
    assert generated(TS_EXAMPLE / "gen/ts") == [
        "referral/v1/auth_pb.ts",
        "referral/v1/errors_pb.ts",
        "referral/v1/events_pb.ts",
        "referral/v1/options_pb.ts",
        "referral/v1/referral_pb.ts",
    ]  # Google's protos are the @referral-service/googleapis package, not a copy in ours
    assert (
        "@referral-service/googleapis/google/api/annotations_pb.js"
        in (TS_EXAMPLE / "gen/ts/referral/v1/auth_pb.ts").read_text()
    )
    run("npm", "run", "--silent", "build", "--workspace", "examples/typescript")
    process = await asyncio.create_subprocess_exec(
        "node",
        str(TS_EXAMPLE / "dist/flow.js"),
        api.target,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    text = output.decode()
    assert process.returncode == 0, text
    for step in (
        "registered:",
        '"reason":"EMAIL_ALREADY_REGISTERED"',
        '"code":"AlreadyExists"',
        "logged in:",
        "created code:",
        "registered referral:",
        '"totalSize":1',
        "flow complete",
    ):
        assert step in text, text
