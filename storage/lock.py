"""One Yanray process per SQLite database: a lock file beside it, holding the owner's PID.

Two processes on one journal both take over the requests the other is answering (each
thinks the other's `running` request was left by a crash), so an answer is generated
twice, shown twice and stored twice. `DatabaseLock.acquire(db_path)` takes an exclusive
`flock` on `<db_path>.lock` and writes this process's PID into it; a second process is
refused with one line naming the first one's PID. The kernel drops the lock when the
process ends, however it ends (`kill -9` included), so a file left behind never blocks a
start: only a live holder does. `release()` empties the file and unlocks it at a clean exit;
the file itself stays (removing it would let a process that opened the old file before the
removal and one that creates a new file both hold "the" lock).

PostgreSQL is not locked here: several processes on one PostgreSQL database is how the
deployment scales out, and its requests are claimed in the database itself (`bot/claims.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from yanray.storage.db import StorageError

logger = logging.getLogger(__name__)


class DatabaseLock:
    """An exclusive lock on `<database>.lock`, held for the life of this process."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def for_url(cls, url: str) -> DatabaseLock | None:
        """Lock the SQLite file behind `url`; None for other databases (and in-memory SQLite)."""
        try:
            parsed = make_url(url)
        except ArgumentError:
            return None  # Database.open() names the bad URL
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            return None
        if parsed.get_driver_name() != "aiosqlite":
            return None  # not a URL Yanray can open: Database.open() says so, and no lock file is left
        return cls.acquire(Path(parsed.database).resolve())

    @classmethod
    def acquire(cls, database: Path) -> DatabaseLock:
        """Lock `database` for this process, or raise `StorageError` naming the holder."""
        path = database.with_name(database.name + ".lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"Cannot create the lock file {path} ({exc.strerror}).") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"PID {holder}" if holder else "another process"
            raise StorageError(
                f"Another Yanray ({who}) is already using {database}; stop it first, "
                "or give this one its own YANRAY_DATA_DIR (a SQLite database takes one Yanray; "
                "several share a PostgreSQL YANRAY_DATABASE_URL)."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        logger.debug("locked %s for PID %d", database, os.getpid())
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor drops the lock

    def __enter__(self) -> DatabaseLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
