"""Start-up as an operator meets it, with real ``referral-service`` processes: every bad setting
is one line naming the variable (exit 2); a runtime failure at start-up (database unreachable,
port taken) is one line (exit 1), with one worker or several, and never a restart loop; a
second server on ports in use is refused instead of sharing them through SO_REUSEPORT."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.live import LiveServer, free_port


def run(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str]:
    """``referral-service ARGS`` in ``tmp_path``; its exit code and everything it printed."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith(("REFERRAL_", "OTEL_"))}
    variables.update({"REFERRAL_DATA_DIR": str(tmp_path / "data"), **(env or {})})
    result = subprocess.run(
        [sys.executable, "-m", "referral_service", *args],
        cwd=tmp_path,
        env=variables,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


BAD_SETTINGS = {
    "database URL that is no URL": ({"REFERRAL_DATABASE_URL": "garbage"}, (), "REFERRAL_DATABASE_URL"),
    "database URL with a blocking driver": (
        {"REFERRAL_DATABASE_URL": "postgresql://app:hunter2secret@db.example/app"},
        (),
        "REFERRAL_DATABASE_URL",
    ),
    "Redis URL that is no URL": ({"REFERRAL_REDIS_URL": "garbage"}, (), "REFERRAL_REDIS_URL"),
    "Redis port that is no number": (
        {"REFERRAL_REDIS_URL": "redis://cache:sixty/0"},
        (),
        "REFERRAL_REDIS_URL",
    ),
    "log level": ({}, ("--log-level", "LOUD"), "REFERRAL_LOG_LEVEL"),
    "port out of range": ({"REFERRAL_HTTP_PORT": "70000"}, (), "REFERRAL_HTTP_PORT"),
    "port that is no number": ({"REFERRAL_GRPC_PORT": "fifty"}, (), "REFERRAL_GRPC_PORT"),
    "two listeners on one port": (
        {"REFERRAL_GRPC_PORT": "50999", "REFERRAL_HTTP_PORT": "50999"},
        (),
        "REFERRAL_HTTP_PORT",
    ),
    "several workers on port 0": ({"REFERRAL_GRPC_PORT": "0"}, ("--workers", "2"), "REFERRAL_GRPC_PORT"),
    "missing private key file": (
        {"REFERRAL_JWT_ALGORITHM": "EdDSA", "REFERRAL_JWT_PRIVATE_KEY_FILE": "/nonexistent/key.pem"},
        (),
        "REFERRAL_JWT_PRIVATE_KEY_FILE",
    ),
    "missing TLS certificate file": (
        {"REFERRAL_TLS_CERT_FILE": "/nonexistent/cert.pem", "REFERRAL_TLS_KEY_FILE": "/etc/hostname"},
        (),
        "REFERRAL_TLS_CERT_FILE",
    ),
    "unknown trace exporter": (
        {"REFERRAL_TRACING_ENABLED": "true", "OTEL_TRACES_EXPORTER": "zipkin"},
        (),
        "OTEL_TRACES_EXPORTER",
    ),
    "unknown OTLP protocol": (
        {"REFERRAL_TRACING_ENABLED": "true", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"},
        (),
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ),
}


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_the_variable_and_exit_code_2(tmp_path: Path, case: str) -> None:
    env, args, variable = BAD_SETTINGS[case]
    code, output = run(tmp_path, "serve", *args, env=env)
    assert code == 2, output
    (line,) = lines(output)
    assert line.startswith(f"referral-service: configuration error: {variable}"), line
    assert "Traceback" not in output
    assert "hunter2secret" not in output  # a URL's password is never repeated


def test_tls_files_that_hold_no_key_pair_are_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    for workers in ("1", "2"):
        code, output = run(
            tmp_path,
            "serve",
            "--workers",
            workers,
            env={"REFERRAL_TLS_CERT_FILE": "cert.pem", "REFERRAL_TLS_KEY_FILE": "key.pem"},
        )
        assert code == 2, output
        (line,) = lines(output)
        assert line.startswith("referral-service: configuration error: REFERRAL_TLS_CERT_FILE"), line
        assert "holds no PEM certificate" in line


def test_several_bad_settings_are_reported_together(tmp_path: Path) -> None:
    code, output = run(
        tmp_path,
        "migrate",
        env={
            "REFERRAL_DATABASE_URL": "garbage",
            "REFERRAL_REDIS_URL": "garbage",
            "REFERRAL_LOG_LEVEL": "LOUD",
        },
    )
    assert code == 2
    reported = lines(output)
    assert len(reported) == 3, output
    for variable in ("REFERRAL_DATABASE_URL", "REFERRAL_REDIS_URL", "REFERRAL_LOG_LEVEL"):
        assert sum(variable in line for line in reported) == 1, output


def _closed_port() -> int:
    return free_port()  # nothing listens there once the probe socket is closed


@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--workers", "1"),
        ("serve", "--workers", "1", "--migrate"),
        ("serve", "--workers", "2"),
        ("serve", "--workers", "2", "--migrate"),
        ("migrate",),
    ],
    ids=lambda args: " ".join(args),
)
def test_an_unreachable_database_is_one_line_and_exit_code_1_after_a_bounded_wait(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    port = _closed_port()
    env = {
        "REFERRAL_DATABASE_URL": f"postgresql+asyncpg://app:hunter2secret@127.0.0.1:{port}/app",
        "REFERRAL_DATABASE_STARTUP_TIMEOUT_SECONDS": "1",
        "REFERRAL_GRPC_PORT": str(free_port()),
        "REFERRAL_HTTP_PORT": str(free_port()),
    }
    code, output = run(tmp_path, *args, env=env)
    assert code == 1, output
    assert len(lines(output)) == 1, output  # one line, from one worker or the only process; no restart
    (line,) = lines(output)
    assert "ERROR" in line
    assert f"cannot reach the database at postgresql+asyncpg://app:***@127.0.0.1:{port}/app after 1s" in line
    assert "hunter2secret" not in output


def test_a_port_another_process_listens_on_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            code, output = run(
                tmp_path,
                "serve",
                "--migrate",
                "--workers",
                workers,
                env={"REFERRAL_GRPC_PORT": str(port), "REFERRAL_HTTP_PORT": str(free_port())},
            )
            assert code == 1, output
            (line,) = lines(output)
            assert f"cannot listen on 127.0.0.1:{port} (gRPC): another process listens on it" in line
        code, output = run(
            tmp_path,
            "serve",
            "--workers",
            "2",
            env={"REFERRAL_GRPC_PORT": str(free_port()), "REFERRAL_HTTP_PORT": str(port)},
        )
        assert code == 1, output
        assert f"cannot listen on 127.0.0.1:{port} (HTTP)" in output


async def test_a_second_server_on_the_same_ports_is_refused_and_the_first_keeps_serving(
    tmp_path: Path,
) -> None:
    """With SO_REUSEPORT the kernel would let a second multi-worker server share the ports and
    split the traffic between two databases; it is refused, whatever its worker count."""
    first = LiveServer(tmp_path / "first", "--migrate", "--workers", "2").start()
    try:
        ports = {"REFERRAL_GRPC_PORT": str(first.port), "REFERRAL_HTTP_PORT": str(first.http_port)}
        for workers in ("2", "1"):
            code, output = run(tmp_path, "serve", "--migrate", "--workers", workers, env=ports)
            assert code == 1, output
            (line,) = lines(output)
            assert f"cannot listen on 127.0.0.1:{first.port} (gRPC)" in line
            assert "another" in line
        async with grpc.aio.insecure_channel(first.target) as channel:
            for _ in range(10):  # new connections: each would land on either server if shared
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        output = first.stop()
    assert first.returncode == 0, output


def test_cli_version_and_help(tmp_path: Path) -> None:
    code, output = run(tmp_path, "--version")
    assert code == 0
    assert output.startswith("referral-service ")
    from referral_service.cli import parser

    root = parser()
    subcommands = next(
        action for action in root._actions if action.choices and isinstance(action.choices, dict)
    )
    helps = [root.format_help()]
    for name, command in subcommands.choices.items():
        helps.append(command.format_help())
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    for text in helps:
        assert "``" not in text  # no reStructuredText
    code, output = run(tmp_path, "serve", "--help")
    assert code == 0
    assert "REFERRAL_DATABASE_URL" in output
