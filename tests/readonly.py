"""Ways to make a file really read-only for the process under test, found to work here.

Tests run as root, and root ignores permission bits: a `chmod 0444` database is still written.
What holds for root (checked in this sandbox, ext4, kernel 6.x):
- `chattr +i FILE` (the immutable flag): open(O_RDWR) fails with EPERM even for root, and
  SQLite silently falls back to opening the file read-only: the case the store must refuse.
- a read-only bind mount (`mount --bind D M; mount -o remount,bind,ro M`): EROFS for every
  file below, including the -wal and -shm files SQLite needs to create.
And the case users actually meet: a gateway running as an unprivileged user against a file it
does not own or that is `chmod 0444`. `unprivileged()` runs a command as `nobody` via setpriv
(or as the current user when tests do not run as root).
Each helper skips the test where the mechanism is not available, saying which.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest


@contextlib.contextmanager
def immutable(path: Path):
    """The immutable flag on `path` for the duration (root only, ext4/xfs/btrfs)."""
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True) \
        if shutil.which("chattr") else None
    if done is None or done.returncode != 0:
        pytest.skip(f"chattr +i not available here: {done.stderr.strip() if done else 'no chattr'}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@contextlib.contextmanager
def read_only_mount(directory: Path):
    """`directory` seen through a read-only bind mount; yields the mount point."""
    mnt = Path(tempfile.mkdtemp(prefix="hg-ro-"))
    try:
        bind = subprocess.run(["mount", "--bind", str(directory), str(mnt)], capture_output=True,
                              text=True)
        if bind.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {bind.stderr.strip()}")
        try:
            ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True,
                                text=True)
            if ro.returncode != 0:
                pytest.skip(f"cannot remount read-only here: {ro.stderr.strip()}")
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        mnt.rmdir()


def unprivileged() -> list[str]:
    """The argv prefix that runs a command as a user that file permissions apply to."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and no setpriv to drop to an unprivileged user")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root and no 'nobody' user")
    return ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]


@pytest.fixture
def shared_dir():
    """A directory the unprivileged user can reach (pytest's tmp_path is private to root),
    owned by that user."""
    d = Path(tempfile.mkdtemp(prefix="hg-shared-"))
    d.chmod(0o755)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(d, nobody.pw_uid, nobody.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def give_to_unprivileged(path: Path) -> None:
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
