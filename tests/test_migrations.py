"""The schema's migrations on a real database (SQLite, and PostgreSQL in its pass): an empty
database is upgraded to the newest revision, and one holding data written at the previous
revision keeps every row, and its unfinished request is answered after the upgrade."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.recording import RecordingAdapter
from tests.scripted_engine import ScriptedEngine
from yanray.storage import Database
from yanray.storage.db import _alembic_config
from yanray.storage.models import Base

PREVIOUS = "0008"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _head() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def _upgrade(connection: Connection, revision: str) -> None:
    config = _alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def _revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def test_an_empty_database_is_upgraded_to_the_newest_revision(database_url: str) -> None:
    db = await Database.open(database_url)
    try:
        async with db.engine.connect() as connection:
            revision = await connection.run_sync(_revision)
            tables = set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
            columns = {
                c["name"] for c in await connection.run_sync(lambda c: inspect(c).get_columns("requests"))
            }
    finally:
        await db.close()
    assert revision == _head()
    assert set(Base.metadata.tables) <= tables
    assert {"claimed_by", "lease_until", "attempts", "route", "shown"} <= columns


# rows as Yanray wrote them at the previous revision: a conversation with an answered and a
# waiting question, a blocked chat, a rating, a consent, an answer's message and a /deny
ROWS: list[tuple[str, dict[str, Any]]] = [
    (
        "INSERT INTO users (id, platform, external_id, display_name, created_at)"
        " VALUES (1, 'test', 'u1', 'Ada', :now)",
        {},
    ),
    (
        "INSERT INTO conversations (id, platform, chat_id, user_key, system_prompt, language,"
        " context_start, created_at) VALUES (1, 'test', 'c1', 'u1', 'Be brief.', 'en', 0, :now)",
        {},
    ),
    (
        "INSERT INTO messages (id, conversation_id, user_id, turn, request_id, role, text, tool_name,"
        " external_id, superseded, created_at) VALUES"
        " (1, 1, 1, 1, NULL, 'user', 'first question', '', 'm1', false, :now),"
        " (2, 1, NULL, 1, 1, 'assistant', 'first answer', '', NULL, false, :now),"
        " (3, 1, 1, 3, NULL, 'user', 'second question', '', 'm2', false, :now)",
        {},
    ),
    (
        "INSERT INTO requests (id, conversation_id, user_message_id, status, route, shown, reply_text,"
        " error, delivered, attempts, created_at, started_at, finished_at) VALUES"
        " (1, 1, 1, 'done', :route, NULL, 'first answer', NULL, true, 1, :now, :now, :now),"
        " (2, 1, 3, 'queued', :route, NULL, NULL, NULL, false, 0, :now, NULL, NULL)",
        {"route": '{"platform": "test", "asker": "test:u1", "language": "en"}'},
    ),
    ("INSERT INTO blocked_chats (platform, chat_id, created_at) VALUES ('test', 'c9', :now)", {}),
    (
        "INSERT INTO ratings (request_id, platform, user_id, value, updated_at)"
        " VALUES (1, 'test', 'u1', 1, :now)",
        {},
    ),
    ("INSERT INTO share_consents (platform, user_id, created_at) VALUES ('test', 'u1', :now)", {}),
    (
        "INSERT INTO answer_messages (platform, chat_id, message_id, request_id)"
        " VALUES ('test', 'c1', '77', 1)",
        {},
    ),
    (
        "INSERT INTO access_rules (platform, user_id, allowed, set_by, updated_at)"
        " VALUES ('test', 'u2', false, 'test:admin', :now)",
        {},
    ),
]
TABLES = (
    "users",
    "conversations",
    "messages",
    "requests",
    "blocked_chats",
    "ratings",
    "share_consents",
    "answer_messages",
    "access_rules",
)


def _counts(connection: Connection) -> dict[str, int]:
    return {table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() for table in TABLES}


async def test_data_written_at_the_previous_revision_survives_the_upgrade(
    database_url: str, make_settings: Any, core_factory: Any, tmp_path: Path
) -> None:
    (tmp_path / "data").mkdir(exist_ok=True)  # the SQLite file's folder (Database.open makes it)
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade, PREVIOUS)
            for statement, extra in ROWS:
                await connection.execute(text(statement), {"now": NOW, **extra})
            if connection.dialect.name == "postgresql":  # ids were given: move the sequences past them
                for table in ("users", "conversations", "messages", "requests"):
                    await connection.execute(
                        text(
                            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
                        )
                    )
            before = await connection.run_sync(_counts)
    finally:
        await engine.dispose()

    db = await Database.open(database_url)  # what a newer Yanray does at start-up
    try:
        async with db.engine.connect() as connection:
            assert await connection.run_sync(_revision) == _head()
            assert await connection.run_sync(_counts) == before
            kept = (
                await connection.execute(
                    text(
                        "SELECT r.status, r.reply_text, r.attempts, r.claimed_by, r.lease_until, m.text"
                        " FROM requests r JOIN messages m ON m.id = r.user_message_id ORDER BY r.id"
                    )
                )
            ).all()
            conversation = (
                await connection.execute(text("SELECT system_prompt, language FROM conversations"))
            ).one()
    finally:
        await db.close()
    assert [tuple(row) for row in kept] == [
        ("done", "first answer", 1, None, None, "first question"),
        ("queued", None, 0, None, None, "second question"),
    ]
    assert tuple(conversation) == ("Be brief.", "en")

    # the question left waiting is unclaimed: the upgraded Yanray answers it, with the history
    engine_ = ScriptedEngine(["second answer"])
    adapter = RecordingAdapter("test")
    await core_factory(make_settings(tools=[]), engine_, adapters=(adapter,))
    ((route, stream),) = adapter.reopened
    assert route["asker"] == "test:u1"
    assert await stream.wait() == "second answer"
    seen = [(m.role, m.content) for m in engine_.prompts[-1][1:]]
    assert seen == [("user", "first question"), ("assistant", "first answer"), ("user", "second question")]
