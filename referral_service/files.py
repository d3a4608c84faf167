"""Private files on disk: the data directory is 0700 and every file the service keeps there is
0600 (the SQLite database holds emails and password hashes; the development JWT secret and keys
sign every token). One place decides the modes, for the database (``storage.db``) and the
generated secrets (``config``).

The modes are set when the files are created, never left to the process umask. A directory we
did not create keeps its mode (it may be a mount point the operator shares on purpose), with a
warning when group or others may enter it; a file of ours that is open to others is tightened to
0600, with a warning, so an installation made before these rules is fixed at its next start.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("referral_service.files")

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
_OTHERS = 0o077  # group and world bits

_warned: set[Path] = set()


def private_directory(path: Path) -> None:
    """Create ``path`` with mode 0700 (missing parents get the default mode, as ``mkdir -p``);
    when it exists already, leave it as it is and warn (once) if group or others have access."""
    try:
        path.mkdir(mode=DIRECTORY_MODE, parents=True)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & _OTHERS and path.resolve() not in _warned:
            _warned.add(path.resolve())
            log.warning(
                "data directory %s is accessible to other users (mode %o); "
                "it holds the database and secrets: chmod 700 it",
                path,
                mode,
            )
        return
    os.chmod(path, DIRECTORY_MODE)  # mkdir's mode passes through the umask


def private_file(path: Path, *, create: bool = True) -> None:
    """Make sure ``path`` is readable by its owner only: created empty with mode 0600 when
    missing (``create``), tightened to 0600 when it exists with group or world bits."""
    if create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            return
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & _OTHERS:
        try:
            os.chmod(path, FILE_MODE)
        except OSError as error:
            log.warning(
                "%s is readable by other users (mode %o) and could not be tightened: %s", path, mode, error
            )
            return
        log.warning("%s was readable by other users (mode %o); now 0600", path, mode)
