"""The production container and what it relies on: the build context (.dockerignore), the
Dockerfile's pins and health check, the compose file (validated by docker-compose), workers from
the cgroup CPU quota, and migrations serialised across replicas by an advisory lock (real
``referral-service migrate`` processes racing on a fresh PostgreSQL database)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import make_url

from referral_service.cpus import available_cpus, cgroup_cpu_limit
from tests.conftest import PG_URL, REQUIRE, _need, _pg_admin

ROOT = Path(__file__).resolve().parent.parent


def test_the_build_context_holds_what_the_image_needs_and_no_secret() -> None:
    from docker.utils.build import exclude_paths

    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    context = {Path(path).as_posix() for path in exclude_paths(str(ROOT), patterns)}
    for needed in (
        "pyproject.toml",
        "README.md",
        "alembic.ini",
        "referral_service/app.py",
        "migrations/env.py",
    ):
        assert needed in context, needed
    assert "referral_service/data/common-passwords.txt" in context
    assert any(path.startswith("generated/referral/v1/") for path in context)
    for excluded in (".venv", "node_modules", "data", ".env", ".git", "tests", "bench"):
        assert not any(path == excluded or path.startswith(f"{excluded}/") for path in context), excluded
    assert not any("__pycache__" in path or path.endswith("jwt-secret") for path in context)
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, flags=re.M):
        for item in source.split():
            assert any(path == item or path.startswith(f"{item}/") for path in context), item


def test_the_dockerfile_pins_its_base_checks_health_and_runs_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, flags=re.M)
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", base), base
    assert re.findall(r"^FROM (\S+)", dockerfile, flags=re.M) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert re.search(r'^HEALTHCHECK .*CMD \["referral-service", "health"\]$', dockerfile, flags=re.M)
    assert "'.[uvloop,tracing]'" in dockerfile
    assert re.search(r"^USER 10001$", dockerfile, flags=re.M)
    assert 'CMD ["referral-service", "serve", "--migrate"]' in dockerfile


def test_the_compose_file_is_valid_and_checks_the_service_health() -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        message = "docker-compose is missing (apt-get install docker-compose)"
        if REQUIRE:
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "REFERRAL_JWT_SECRET": "x" * 40, "REFERRAL_CLIENT_SECRET_KEY": "y" * 40}
    result = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    referral = result.stdout.split("\n  referral:\n", 1)[1].split("\n  redis:\n", 1)[0]
    assert "healthcheck:" in referral
    assert "- referral-service" in referral
    assert "- health" in referral


def _cgroup(tmp_path: Path, files: dict[str, str], own: str = "0::/\n") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(own)
    return root, proc


def test_workers_follow_the_cgroup_cpu_quota(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    cases = {
        # cgroup v2, the container's own cgroup at the mount's root
        "v2 unlimited": ({"cpu.max": "max 100000\n"}, "0::/\n", None, cores),
        "v2 1.5 CPUs": ({"cpu.max": "150000 100000\n"}, "0::/\n", 1.5, 1),
        "v2 half a CPU": ({"cpu.max": "50000 100000\n"}, "0::/\n", 0.5, 1),
        "v2 many CPUs": ({"cpu.max": "6400000 100000\n"}, "0::/\n", 64.0, cores),
        # a systemd service's cgroup under the host's root: the tighter of it and its parent
        "v2 nested": (
            {
                "cpu.max": "max 100000\n",
                "system.slice/cpu.max": "100000 100000\n",
                "system.slice/app.service/cpu.max": "300000 100000\n",
            },
            "0::/system.slice/app.service\n",
            1.0,
            1,
        ),
        # cgroup v1
        "v1 quota": (
            {"cpu,cpuacct/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            "4:cpu,cpuacct:/\n",
            1.0,
            1,
        ),
        "v1 unlimited": (
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            "4:cpu,cpuacct:/docker/abc\n",
            None,
            cores,
        ),
    }
    for name, (files, own, limit, workers) in cases.items():
        root, proc = _cgroup(tmp_path / name.replace(" ", "-"), files, own)
        assert cgroup_cpu_limit(root, proc) == limit, name
        assert available_cpus(root, proc) == workers, name
    # this machine: what `serve` would start without REFERRAL_WORKERS
    from referral_service.config import Settings

    assert Settings(_env_file=None).effective_workers == available_cpus()  # type: ignore[call-arg]


def test_concurrent_migrations_take_turns_under_an_advisory_lock(
    postgres_available: bool, tmp_path: Path
) -> None:
    """Replicas starting together (``serve --migrate``) all succeed and the schema is at head:
    without the lock they race to create the same tables."""
    _need("PostgreSQL", postgres_available)
    name = f"referral_race_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFERRAL_")}
    env.update({"REFERRAL_DATABASE_URL": url, "REFERRAL_DATA_DIR": str(tmp_path / "data")})
    try:
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "referral_service", "migrate"],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(4)
        ]
        outputs = [process.communicate(timeout=120)[0] for process in processes]
        for process, output in zip(processes, outputs, strict=True):
            assert process.returncode == 0, output
        from alembic.script import ScriptDirectory

        from referral_service.storage.migrate import alembic_config

        head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()

        async def version() -> str:
            import asyncpg

            parsed = make_url(url)
            conn = await asyncpg.connect(
                host=parsed.host, port=parsed.port or 5432, user=parsed.username, database=parsed.database
            )
            try:
                return str(await conn.fetchval("SELECT version_num FROM alembic_version"))
            finally:
                await conn.close()

        assert asyncio.run(version()) == head
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
