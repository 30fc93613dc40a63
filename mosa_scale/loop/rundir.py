"""One run per run directory: a lock file held by rank 0 for the whole run.

The lock is an ``flock`` on ``RUN_DIR/run.lock``; the operating system drops it when the process
ends, however it ends, so a lock left by a killed run is free and is taken over (with a warning
naming that run). The file's text says who holds it, for the message a second run gets. The file
is never deleted (deleting a locked file would let two runs lock two different files).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used by this run (another run holds it)."""


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}, "
        f"command: {holder.get('command')}"
    )


class RunLock:
    """The lock of one run directory, held until :meth:`release` or the end of the process."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """Takes the run directory's lock.

        Raises:
            RunDirError: when another live run holds it, naming that run.
        """
        path = Path(run_dir) / LOCK_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirError(
                    f"cannot lock {path} ({e}); put train.run_dir on a file system with file locks"
                ) from e
            raise RunDirError(
                f"run directory {path.parent} is in use by another run ({_describe(holder)}); wait for "
                f"it to end or stop it, or set another train.run_dir"
            ) from None
        previous = _read(fd)
        if previous and not previous.get("released"):
            log.warning(
                "took over the lock of an earlier run in %s that ended without releasing it (%s)",
                path.parent,
                _describe(previous),
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500],
        }
        _write(fd, me)
        return cls(path, fd)

    def release(self) -> None:
        """Marks the lock released and drops it (idempotent)."""
        if self._fd < 0:
            return
        holder = _read(self._fd)
        _write(self._fd, {**holder, "released": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = -1


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        out = json.loads(raw) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"text": raw[:200].decode(errors="replace")}
    return out if isinstance(out, dict) else {}


def _write(fd: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
