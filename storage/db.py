"""The database: one async SQLAlchemy engine, its pragmas, transactions and migrations.

SQLite (the default, through aiosqlite) is opened in WAL mode with a `busy_timeout` and
foreign keys on. Every transaction starts with `BEGIN IMMEDIATE`: SQLite's default
deferred BEGIN takes the write lock only at the first write, and two transactions that
both read then write deadlock into "database is locked"; immediate transactions queue
on `busy_timeout` instead. PostgreSQL (asyncpg) needs none of this. A read that writes
nothing (`Database.reading()`) takes no write lock: on SQLite it begins a deferred
transaction, which in WAL mode reads a snapshot while writers go on.

The schema is Alembic's: `Database.open()` upgrades to the newest revision at start-up
(several processes starting on one PostgreSQL database at once take turns, under an advisory
lock) and refuses a database whose revision this Yanray does not know (written by a newer one),
one with Yanray's tables but no `alembic_version` (upgrading it would try to create them
again), and one that lacks a table after the upgrade (dropped by hand): each in one line
at start, rather than as a failed query at the first message. A URL that no installed
async driver takes is a `ConfigError`; anything else that stops the database from opening
(unreachable, not a database, read-only, disk full) is a `StorageError` quoting the driver.
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
from sqlalchemy import Connection, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InvalidRequestError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from yanray.errors import ConfigError, StorageError
from yanray.storage.models import Base

__all__ = ["Database", "StorageError"]

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 10_000
#: the PostgreSQL advisory lock held while migrations run ("yanr" in ASCII)
MIGRATION_LOCK = 0x79616E72
#: the execution option `Database.reading()` marks its connection with
READ_ONLY = "yanray_read_only"


def _shown(url: str) -> str:
    """`url` with any password hidden, for a message (also when it does not parse)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1] if "@" in url else url


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
        read = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")


def _upgrade(connection: Connection, url: str) -> None:
    if connection.dialect.name == "postgresql":
        # several processes starting on one database at once: one upgrades, the others wait for
        # its transaction and then find the schema current (the lock ends with the transaction)
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
    config = _alembic_config()
    script = ScriptDirectory.from_config(config)
    current = MigrationContext.configure(connection).get_current_revision()
    known = {rev.revision for rev in script.walk_revisions()}
    if current is not None and current not in known:
        raise StorageError(
            f"The database at {url} was written by a newer Yanray (schema {current}); "
            "upgrade Yanray or point YANRAY_DATABASE_URL at another database."
        )
    tables = set(inspect(connection).get_table_names())
    ours = set(Base.metadata.tables)
    if current is None and tables & ours:
        raise StorageError(
            f"The database at {url} has Yanray's tables but no schema version (alembic_version); "
            "restore it from a backup or point YANRAY_DATABASE_URL at another database."
        )
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    missing = ours - set(inspect(connection).get_table_names())
    if missing:
        raise StorageError(
            f"The database at {url} lacks the table(s) {', '.join(sorted(missing))}; "
            "restore it from a backup or point YANRAY_DATABASE_URL at another database."
        )


def _reason(exc: BaseException) -> str:
    """The driver's own words for a failure (`file is not a database`), on one line."""
    cause = getattr(exc, "orig", None) or exc
    text = " ".join(str(cause).split())
    return text or type(cause).__name__


class Database:
    """The engine and session factory, built once by the entry point and passed in."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # SQLite has one writer at a time. Queueing writers here, in the event loop, is
        # cheaper and fairer than SQLite's busy handler, which sleeps and retries.
        self._writer = asyncio.Lock() if engine.dialect.name == "sqlite" else None
        # an in-memory SQLite database is one connection: a read must queue like a write
        self._shared = self._writer is not None and engine.url.database in (None, "", ":memory:")

    @classmethod
    async def open(cls, url: str) -> Database:
        """Connect, apply pending migrations, and return the database ready for use.

        Raises `ConfigError` for a URL no driver here can use, `StorageError` for a
        database that cannot be reached, read, written or upgraded; one line each.
        """
        try:
            parsed = make_url(url)
            # Every transaction ends in an explicit commit or rollback, so the pool's extra
            # rollback when a connection is returned is a wasted round trip.
            engine = create_async_engine(url, pool_reset_on_return=None)
        except (ArgumentError, InvalidRequestError, ImportError) as exc:
            raise ConfigError(
                f"YANRAY_DATABASE_URL={_shown(url)}: not a database Yanray can use ({_reason(exc)}); "
                "use sqlite+aiosqlite:///path.db or postgresql+asyncpg://user:pw@host/db"
            ) from exc
        is_sqlite = parsed.get_backend_name() == "sqlite"
        shown = parsed.render_as_string(hide_password=True)
        try:
            if is_sqlite and parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            if is_sqlite:
                _sqlite_pragmas(engine)
            async with engine.begin() as conn:
                await conn.run_sync(_upgrade, shown)
        except StorageError:
            await engine.dispose()
            raise
        except (SQLAlchemyError, OSError) as exc:
            await engine.dispose()
            logger.debug("cannot open the database at %s", shown, exc_info=True)
            raise StorageError(f"The database at {shown} cannot be opened: {_reason(exc)}.") from exc
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

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only, in one transaction that takes no write lock (SQLite: a
        deferred BEGIN, a WAL snapshot). Writing in it is a bug."""
        if self._shared:
            async with self.transaction() as session:
                yield session
            return
        async with self._sessions() as session, session.begin():
            # ended by a commit (it wrote nothing), which unlike a rollback leaves what was read loaded
            await session.connection(execution_options={READ_ONLY: True})
            yield session

    async def ping(self) -> None:
        """One trivial query on a connection of the pool (the health check); raises
        `StorageError` with the driver's words when the database does not answer it."""
        try:
            async with self.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError) as exc:
            raise StorageError(_reason(exc)) from exc

    async def close(self) -> None:
        await self.engine.dispose()
