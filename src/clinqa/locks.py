"""Locks on folders and files, so two processes never write the same output.

``lock_path(path)`` holds an exclusive ``fcntl.flock`` on ``FOLDER/.clinqa.lock`` (or ``FILE.lock``
beside a file) while a block runs; the lock file holds the owner's pid, host and start time. A second
writer gets a one-line ClinqaError naming the owner; a lock file left by a process that died (SIGKILL,
power loss) is taken over with a message. Re-entrant within one process. Run folders
(``clinqa.runs.RunFolder``) take this lock; ``clinqa.runs`` re-exports these names.

Depends only on the standard library and ``clinqa.errors``.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

from clinqa.errors import ClinqaError

LOCK_FILE = ".clinqa.lock"


def now() -> str:
    """UTC, to the second, ISO 8601."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


_held: dict[str, int] = {}  # lock files this process holds -> nesting depth (a lock is re-entrant per process)
_held_guard = threading.Lock()


def lock_file_for(path: str | Path, folder: bool | None = None) -> Path:
    """Where the lock of a folder (``FOLDER/.clinqa.lock``) or a file (``FILE.lock`` beside it) lives;
    `folder` None: a folder if `path` is one now."""
    path = Path(path)
    folder = path.is_dir() if folder is None else folder
    return path / LOCK_FILE if folder else path.with_name(path.name + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        owner = json.loads(raw) if raw.strip() else {}
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe_owner(owner: Mapping) -> str:
    if not owner:
        return "another process"
    return f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}"


def _notify(message: str) -> None:
    sys.stderr.write(f"note: {message}\n")
    sys.stderr.flush()


@contextmanager
def lock_path(
    path: str | Path, *, folder: bool | None = None, what: str = "--out", notify: Callable[[str], None] | None = None
) -> Iterator[Path]:
    """Hold an exclusive lock on a folder or file while the block runs; yields the lock file.

    The lock file holds the owner's pid, host and start time; it is removed on exit (also on an
    exception or Ctrl-C). A second process gets a one-line ClinqaError naming the owner. A lock file
    left behind by a dead process (a kill -9 does not run cleanups) is taken over with a message via
    `notify` (default: a line on stderr). The kernel holds the actual lock (``fcntl.flock``), so a
    crashed owner never blocks anyone. Re-entrant within one process. `folder`: lock `path` as a
    folder (created if missing) or as a file (lock file beside it); None: a folder if it is one now.
    """
    import fcntl

    target = Path(path)
    if target.exists() and folder and not target.is_dir():
        raise ClinqaError(f"{what} {target} is a file, not a folder: choose a folder")
    lock = lock_file_for(target, folder)
    created = []  # folders made for the lock: removed again on exit if nothing was written into them
    d = lock.parent
    while not d.exists() and d != d.parent:
        created.append(d)
        d = d.parent
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClinqaError(f"{what} {target}: cannot create {lock.parent} ({exc.strerror or exc})") from None
    key = str(lock.resolve())
    with _held_guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield lock
        finally:
            with _held_guard:
                _held[key] -= 1
        return

    notify = notify or _notify
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            reason = (
                "not writable" if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM) else (exc.strerror or str(exc))
            )
            raise ClinqaError(f"{what} {target}: cannot write there ({reason}): choose a writable place") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            # the owner writes who it is just after taking the lock: give it a moment to, so the error
            # names it (the two commands were started together)
            deadline = time.monotonic() + 2.0
            while not owner and time.monotonic() < deadline:
                time.sleep(0.05)
                owner = _read_owner(fd)
            os.close(fd)
            raise ClinqaError(
                f"{what} {target} is in use by {_describe_owner(owner)}: wait for it to finish, "
                "or write to another place"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise ClinqaError(f"{what} {target}: cannot lock {lock} ({exc.strerror or exc})") from None
        # the file we locked must still be the one at `lock` (its owner may have removed it meanwhile)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = _read_owner(fd)
        if previous:  # a lock file nobody holds: its owner died without removing it
            alive = (
                previous.get("host") == socket.gethostname()
                and isinstance(previous.get("pid"), int)
                and _pid_alive(previous["pid"])
                and previous["pid"] != os.getpid()
            )
            state = "still running but not holding it" if alive else "no longer running"
            notify(f"took over the stale lock on {target} left by {_describe_owner(previous)} ({state})")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": now(), "argv": sys.argv[:8]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    with _held_guard:
        _held[key] = 1
    try:
        yield lock
    finally:
        with _held_guard:
            _held.pop(key, None)
        try:
            lock.unlink(missing_ok=True)  # removed while still locked: the next owner creates a fresh file
        finally:
            os.close(fd)
        for d in created:  # a command that failed before writing anything leaves no empty folder behind
            try:
                d.rmdir()
            except OSError:
                break


__all__ = ["LOCK_FILE", "lock_file_for", "lock_path", "now"]
