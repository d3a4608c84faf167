"""Issue 12 #7: what the service keeps on disk is private. The data directory is 0700; the SQLite
database (emails, argon2 hashes), its -wal/-shm files and the development JWT secret are 0600,
whatever the umask; files of an earlier installation that other users could read are tightened
at start. Played with the real CLI (``migrate``) and the real server under the common umask 022,
with which the files used to come out 0755/0644."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack, start_api, stop_api

pytestmark = pytest.mark.one_stack


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(directory: Path) -> dict[str, str]:
    return {entry.name: oct(mode(entry)) for entry in sorted(directory.iterdir())}


def private_tree(directory: Path) -> list[str]:
    """What under ``directory`` is not private: directories 0700, files 0600."""
    wrong = []
    for entry in directory.rglob("*"):
        wanted = 0o700 if entry.is_dir() else 0o600
        if mode(entry) != wanted:
            wrong.append(f"{entry.relative_to(directory)}: {oct(mode(entry))}")
    return wrong


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask: files 0644 and directories 0755 unless the service says otherwise."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def migrate(data_dir: Path, cwd: Path) -> None:
    """``referral-service migrate`` in a process of its own with umask 022 and only the data
    directory configured (the default SQLite database under it)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REFERRAL_")}
    environment["REFERRAL_DATA_DIR"] = str(data_dir)
    subprocess.run(
        ["sh", "-c", 'umask 022 && exec "$0" -m referral_service migrate', sys.executable],
        cwd=cwd,  # no .env of the developer's
        env=environment,
        check=True,
        capture_output=True,
        timeout=120,
    )


async def test_a_fresh_data_directory_and_its_files_are_private(
    stack: Stack, tmp_path: Path, umask_022: None
) -> None:
    data = tmp_path / "install" / "data"
    migrate(data, tmp_path)
    assert mode(data) == 0o700
    assert mode(data / "referral.db") == 0o600
    # the server on that directory, with the default database and a generated JWT secret
    api = await start_api(stack, data_dir=data, database_url=None, jwt_secret=None)
    try:
        email = api.unique_email()
        await api.register(email)  # a write: SQLite now has its -wal and -shm files
        from tests.mail import wait_for

        await wait_for(api.mailbox, email, "verify_email")  # and a message in data/mail
        files = modes(data)
        assert {"referral.db", "referral.db-wal", "referral.db-shm", "jwt-secret", "mail"} <= set(files)
        assert mode(data) == 0o700
        assert private_tree(data) == [], files
    finally:
        await stop_api(api)
    assert private_tree(data) == []


async def test_the_server_alone_creates_the_database_privately(
    stack: Stack, tmp_path: Path, umask_022: None
) -> None:
    """No ``migrate`` first: the first engine that opens the file creates it 0600."""
    data = tmp_path / "data"
    api = await start_api(stack, data_dir=data, database_url=None)
    try:
        assert mode(data) == 0o700
        assert mode(data / "referral.db") == 0o600
    finally:
        await stop_api(api)


async def test_an_earlier_installation_open_to_others_is_tightened(
    stack: Stack, tmp_path: Path, sqlite_template: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Files as an earlier version left them (directory 0755, database and secret 0644): the
    files are made 0600 at start; the directory keeps its mode (it may be shared on purpose)
    with a warning that says what to do."""
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    shutil.copy(sqlite_template, data / "referral.db")
    (data / "jwt-secret").write_text("s" * 64 + "\n")
    for name in ("referral.db", "jwt-secret"):
        (data / name).chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="referral_service.files"):
        api = await start_api(stack, data_dir=data, database_url=None, jwt_secret=None)
    try:
        await api.register()
        files = modes(data)
        assert {"referral.db", "referral.db-wal", "referral.db-shm", "jwt-secret"} <= set(files)
        assert files == dict.fromkeys(files, oct(0o600)), files
        assert mode(data) == 0o755
    finally:
        await stop_api(api)
    warnings = [r.getMessage() for r in caplog.records if r.name == "referral_service.files"]
    assert any("chmod 700" in message and str(data) in message for message in warnings), warnings
    assert any("referral.db was readable by other users" in message for message in warnings), warnings
