"""The database: one async SQLAlchemy engine, its pragmas, transactions and migrations.

SQLite (the default, through aiosqlite) is opened in WAL mode with a `busy_timeout` and
foreign keys on. Every transaction starts with `BEGIN IMMEDIATE`: SQLite's default
deferred BEGIN takes the write lock only at the first write, and two transactions that
both read then write deadlock into "database is locked"; immediate transactions queue
on `busy_timeout` instead. PostgreSQL (asyncpg) needs none of this.

The schema is Alembic's: `Database.open()` upgrades to the newest revision at start-up
and refuses a database whose revision this Yanray does not know (written by a newer one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 10_000


class StorageError(Exception):
    """The database cannot be used; `str()` is one line for the user or the operator."""


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def _sqlite_pragmas(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so that BEGIN IMMEDIATE is ours to emit.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _upgrade(connection: Connection, url: str) -> None:
    config = _alembic_config()
    script = ScriptDirectory.from_config(config)
    current = MigrationContext.configure(connection).get_current_revision()
    known = {rev.revision for rev in script.walk_revisions()}
    if current is not None and current not in known:
        raise StorageError(
            f"The database at {url} was written by a newer Yanray (schema {current}); "
            "upgrade Yanray or point YANRAY_DATABASE_URL at another database."
        )
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


class Database:
    """The engine and session factory, built once by the entry point and passed in."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # SQLite has one writer at a time. Queueing writers here, in the event loop, is
        # cheaper and fairer than SQLite's busy handler, which sleeps and retries.
        self._writer = asyncio.Lock() if engine.dialect.name == "sqlite" else None

    @classmethod
    async def open(cls, url: str) -> Database:
        """Connect, apply pending migrations, and return the database ready for use."""
        parsed = make_url(url)
        is_sqlite = parsed.get_backend_name() == "sqlite"
        if is_sqlite and parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # Every transaction ends in an explicit commit or rollback, so the pool's extra
        # rollback when a connection is returned is a wasted round trip.
        engine = create_async_engine(url, pool_reset_on_return=None)
        if is_sqlite:
            _sqlite_pragmas(engine)
        shown = parsed.render_as_string(hide_password=True)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_upgrade, shown)
        except StorageError:
            await engine.dispose()
            raise
        except (SQLAlchemyError, OSError) as exc:
            await engine.dispose()
            logger.exception("cannot open the database at %s", shown)
            raise StorageError(f"The database at {shown} cannot be opened ({type(exc).__name__}).") from exc
        return cls(engine)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in one transaction: committed on success, rolled back on error."""
        if self._writer is None:
            async with self._sessions() as session, session.begin():
                yield session
            return
        async with self._writer, self._sessions() as session, session.begin():
            yield session

    async def close(self) -> None:
        await self.engine.dispose()
