"""Writing state and secret files safely, often as root: the one atomic writer, and the
state directory's ownership check.

`write_atomic` replaces a file all at once: a temp file with a random name in the
target's own directory, opened ``O_CREAT|O_EXCL|O_NOFOLLOW`` (a symlink or file planted at
any name is never followed, truncated or reused), written, fsynced, renamed over the
target, and the directory fsynced, so a crash leaves the old or the new content, never
half a file, and the rename survives a power cut. Secret files get mode 0600 from their
creation on (no window where they are readable).

That is only as safe as the directory: whoever can write to it can rename our files
away or swap a file for a symlink between two of our steps. `check_state_dir` therefore
refuses a state directory owned by another user or writable by group or others, and
says which chmod/chown fixes it. Every command that writes state calls it first.

`lock_dir` is how a daemon owns its state directory: an exclusive flock that the kernel
drops however the process ends (SIGKILL included), so a pid file or control socket found
while the lock is free was left by a daemon that is gone, and one found while it is held
belongs to a live daemon, whatever pid the file names now.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import secrets
import stat
from pathlib import Path

__all__ = ["FileError", "FileExists", "check_state_dir", "lock_dir", "open_dir", "read_pid", "remove_stale_temps",
           "write_atomic", "write_atomic_at"]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_TEMP_TRIES = 8  # random names clash only if planted: give up after a few, loudly


class FileError(Exception):
    """A file or directory cannot be written safely; the message says what to do.
    `reason` is the same without the path, for callers whose errors name it already."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class FileExists(FileError):
    """`write_atomic(..., replace=False)` found the target already there."""


def _temp_name(name: str) -> str:
    # Random, so nobody can plant anything at the name in advance (O_EXCL refuses it anyway).
    return f".{name}.{secrets.token_hex(8)}.tmp"


_TEMP_NAME_RE = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")


def remove_stale_temps(directory: Path | str, before: float) -> list[str]:
    """Remove the temp files of writes that a kill cut short (names as `_temp_name` makes
    them, last changed before the wall-clock time `before`: a write still going on is
    younger than that); the names removed."""
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                if (_TEMP_NAME_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_mtime < before):
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except FileNotFoundError:
                continue  # its write finished or another cleaner took it
    return sorted(removed)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def open_dir(path: Path | str, *, follow: bool = True, dir_fd: int | None = None) -> int:
    """An fd of directory `path` (O_DIRECTORY); with follow=False, refuses a symlink as
    the last component (ELOOP). Raises OSError."""
    flags = os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    return os.open(path, flags, dir_fd=dir_fd)


def lock_dir(path: Path | str) -> int | None:
    """An fd of directory `path` holding an exclusive lock on it until the fd is closed or
    the process ends (however), or None if another process holds the lock. Raises
    `FileError` if the directory cannot be opened."""
    try:
        fd = open_dir(path)
    except OSError as exc:
        raise FileError(f"cannot open {path}: {_reason(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        os.close(fd)
        raise FileError(f"cannot lock {path}: {_reason(exc)}") from None
    return fd


def read_pid(path: Path | str) -> int | None:
    """The pid a pid file names, if it names one (a stale one too: see `lock_dir`)."""
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def write_atomic_at(
    dir_fd: int,
    name: str,
    data: bytes,
    mode: int = 0o644,
    *,
    owner: tuple[int, int] | None = None,
    replace: bool = True,
    shown: Path | str | None = None,
) -> None:
    """Put `data` at `name` in the directory `dir_fd`, all at once (module docstring).

    `owner` (uid, gid) is set on the temp file before it gets its name. With
    replace=False an existing target is kept and `FileExists` raised. `shown` is the
    path the error messages name. Raises `FileError`; the previous file survives."""
    shown = shown if shown is not None else name
    if "/" in name or name in ("", ".", ".."):
        raise FileError(f"cannot write {shown}: not a plain file name")
    temp = None
    try:
        for _ in range(_TEMP_TRIES):
            candidate = _temp_name(name)
            try:
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC,
                             mode & 0o777, dir_fd=dir_fd)
            except FileExistsError:
                continue  # something sits at that name (planted or left over): never reuse it
            temp = candidate
            break
        else:
            raise FileError(f"cannot write {shown}: {_TEMP_TRIES} temp names in its directory were taken; "
                            "something is planting files there: check who can write to it")
        try:
            if owner is not None:
                os.fchown(fd, owner[0], owner[1])
            os.fchmod(fd, mode & 0o7777)  # exact, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # a symlink at `name` is replaced, not followed
        else:
            # link() never replaces: the target appears whole, or we learn it was there.
            os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            os.unlink(temp, dir_fd=dir_fd)
        temp = None
        os.fsync(dir_fd)  # the new name itself is durable
    except FileExistsError:
        raise FileExists(f"{shown} already exists; refusing to overwrite it", "already exists") from None
    except OSError as exc:
        raise FileError(f"cannot write {shown}: {_reason(exc)} (the previous version is kept)", _reason(exc)) from None
    finally:
        if temp is not None:
            try:
                os.unlink(temp, dir_fd=dir_fd)
            except OSError:
                pass


def write_atomic(path: Path | str, data: bytes, mode: int = 0o644, *, owner: tuple[int, int] | None = None,
                 replace: bool = True) -> None:
    """`write_atomic_at` for a path: the temp file goes in the target's own directory.
    Use mode 0o600 for anything secret. Raises `FileError` (`FileExists` with
    replace=False)."""
    path = Path(path)
    try:
        dir_fd = open_dir(path.parent)
    except OSError as exc:
        reason = f"{path.parent}: {_reason(exc)}"
        raise FileError(f"cannot write {path}: {reason} (the previous version is kept)", reason) from None
    try:
        write_atomic_at(dir_fd, path.name, data, mode, owner=owner, replace=replace, shown=path)
    finally:
        os.close(dir_fd)


def write_secret(path: Path | str, data: bytes, *, owner: tuple[int, int] | None = None,
                 replace: bool = True) -> None:
    """The one way a secret (a private key, the network secret) goes to disk: `write_atomic`
    with mode 0600, so no reader ever sees it half written or with a wider mode."""
    write_atomic(path, data, 0o600, owner=owner, replace=replace)


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_state_dir(path: Path | str, *, create: bool = True) -> None:
    """Refuse a state directory that someone else could change under us: it must belong to
    the user running tunnelmesh and not be writable by group or others (0700, or 0710
    when `ssh-bridge --setup` gave the bridge group search access). Made 0700 if missing
    and `create`; without `create` a missing directory is left to the caller. Raises
    `FileError` saying which chmod/chown to run."""
    path = Path(path)
    if create:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError:
            pass  # not a directory: said below
        except OSError as exc:
            raise FileError(f"cannot create the state directory {path}: {_reason(exc)}") from None
    try:
        st = os.stat(path)  # where the files land, so a symlinked state directory is judged by its target
    except FileNotFoundError:
        if create:
            raise FileError(f"the state directory {path} vanished while it was being made") from None
        return
    except OSError as exc:
        raise FileError(f"cannot use the state directory {path}: {_reason(exc)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise FileError(f"the state directory {path} is not a directory; give another one with --state-dir")
    me = os.geteuid()
    if st.st_uid != me and st.st_uid == 0:
        raise FileError(f"the state directory {path} belongs to root: run this command as root (sudo), "
                        "or give a directory of your own with --state-dir")
    if st.st_uid != me:
        raise FileError(
            f"the state directory {path} belongs to {_user(st.st_uid)}, not to {_user(me)} who runs tunnelmesh, so "
            f"that user could replace its files; run `chown {_user(me)} {path}` if that is right, "
            "or give a directory of your own with --state-dir"
        )
    if st.st_mode & 0o022:
        raise FileError(
            f"the state directory {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}), so "
            f"they could replace its files; run `chmod go-w {path}`"
        )
