"""The node's private directories and the files it writes in them.

The default runtime dir, /tmp/oddsgate-$UID, has a name anyone can guess, in
a directory anyone can write. Another local user may create it first, or plant
a symbolic link inside it, and a node that wrote through that link (as root,
say) would overwrite whatever file the link names. So:

* a runtime dir (and each subdirectory the node keeps in it) is created 0700
  by us, and one that already exists is used only if it is a real directory,
  owned by our effective uid and not writable by group or others; anything
  else is refused with one line naming OG_RUNTIME_DIR (a ConfigError, exit 2);
* a file is never written through its final name: the text goes to a fresh
  random name (O_CREAT|O_EXCL, which never follows a link) in the same
  directory and is renamed over the final name, which replaces a planted
  link instead of following it;
* a log, which must be appended to, is opened with O_NOFOLLOW.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from gateway.config import ConfigError

SETTING = "OG_RUNTIME_DIR"


def _refuse(path: Path, problem: str, *, fix: str = "remove it or ") -> ConfigError:
    return ConfigError(f"{SETTING}: {path} {problem}; {fix}set {SETTING} to a directory "
                       "only this user can write")


def _unusable(path: Path, problem: str) -> ConfigError:
    return _refuse(path, problem, fix="")


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` 0700, or accept it only if it is already ours alone; raise ConfigError.

    Parents that are missing are created too (the operator chose where the
    runtime dir lives); only the last component is checked, because that is
    the one the node owns.
    """
    path = Path(os.path.abspath(path))
    try:
        os.makedirs(path.parent, exist_ok=True)
    except FileExistsError:
        raise _unusable(path, f"cannot be created ({path.parent} is not a directory)") from None
    except OSError as exc:
        raise _unusable(path, f"cannot be created ({exc.strerror or exc})") from None
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # ours from an earlier run, or someone else's: the checks decide
    except OSError as exc:
        raise _unusable(path, f"cannot be created ({exc.strerror or exc})") from None
    _check_private(path)
    _check_writable(path)
    return path


def _check_private(path: Path) -> None:
    """A real directory (lstat: a link is refused), owned by us, writable by us only."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise _unusable(path, f"cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISLNK(info.st_mode):
        raise _refuse(path, "is a symbolic link")
    if not stat.S_ISDIR(info.st_mode):
        raise _refuse(path, "is not a directory")
    if info.st_uid != os.geteuid():
        raise _refuse(path, f"is owned by uid {info.st_uid}, not by this user "
                            f"(uid {os.geteuid()})")
    if info.st_mode & 0o022:
        raise _refuse(path, f"is writable by others (mode {stat.S_IMODE(info.st_mode):04o})")


def _check_writable(path: Path) -> None:
    """Try it: permission bits do not tell root about read-only mounts, nor anyone about ACLs."""
    try:
        fd, name = tempfile.mkstemp(dir=path, prefix=".probe-")
    except OSError as exc:
        raise _unusable(path, f"is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def write_private(path: str | os.PathLike[str], data: str | bytes, mode: int = 0o600) -> None:
    """Write-then-rename through a random name, so a planted link at `path` is replaced,
    never followed, and a reader never sees a half-written file."""
    path = Path(path)
    staged = stage_file(path.parent, data, prefix=f".{path.name}.", mode=mode)
    try:
        os.replace(staged, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staged)
        raise


def stage_file(directory: str | os.PathLike[str], data: str | bytes, *, prefix: str,
               mode: int = 0o600) -> Path:
    """`data` in a new file with a random name in `directory` (mkstemp: O_EXCL, 0600);
    the caller renames or removes it."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
            if mode != 0o600:
                os.fchmod(out.fileno(), mode)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return Path(name)


def open_log(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a log for appending (created 0600); a symbolic link there is refused, not followed."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    path = Path(path)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise _refuse(path, "is a symbolic link") from None
        raise
    return os.fdopen(fd, "ab")
