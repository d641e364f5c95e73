"""`yanray` as a person runs it: settings errors, `yanray chat` through a pipe, storage rules."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.fakes.openai_server import FakeOpenAI
from yanray.bot.dispatcher import help_text
from yanray.bot.errors import ConfigError
from yanray.bot.settings import load_settings
from yanray.storage import Database, StorageError


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # an English terminal, whatever this machine's locale (Yanray's own texts follow it)
    dropped = ("YANRAY_", "LANGUAGE", "LC_ALL", "LC_MESSAGES")
    base = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    base.update({"YANRAY_DATA_DIR": str(tmp_path / "data"), "YANRAY_TEMPERATURE": "0", "LANG": "C.UTF-8"})
    # `yanray run`'s /healthz and /metrics on a free port: two tests at once (or anything on
    # the default 8089) would otherwise refuse the second one's start
    base["YANRAY_HTTP_LISTEN"] = "127.0.0.1:0"
    base.update(extra)
    return base


async def spawn(
    args: list[str], environ: dict[str, str], cwd: Path | None = None, *, pipe_in_out: bool = True
) -> asyncio.subprocess.Process:
    """`yanray ARGS` as a process with pipes for its standard streams (without `pipe_in_out`,
    stderr alone: a long-running process whose stdout nobody reads must not fill a pipe)."""
    in_out = asyncio.subprocess.PIPE if pipe_in_out else asyncio.subprocess.DEVNULL
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "yanray.bot.cli",
        *args,
        stdin=in_out,
        stdout=in_out,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
        cwd=cwd,
    )


async def yanray(args: list[str], environ: dict[str, str], stdin: str | bytes = "", cwd: Path | None = None):
    process = await spawn(args, environ, cwd)
    data = stdin.encode() if isinstance(stdin, str) else stdin
    out, err = await asyncio.wait_for(process.communicate(data), 60)
    return process.returncode, out.decode(), err.decode()


async def test_chat_through_a_pipe_answers_each_line_and_remembers(tmp_path: Path) -> None:
    replies = [
        "Hello! How can I help?",
        "/calculate 6.5*7.5\n",
        "It is 48.75.",
        "You asked about 6.5 times 7.5.",
    ]
    async with FakeOpenAI(replies=replies) as fake:
        environ = env(tmp_path, YANRAY_ENGINE="openai", YANRAY_OPENAI_BASE_URL=fake.base_url)
        code, out, err = await yanray(["chat"], environ, "hi\nwhat is 6.5*7.5?\n\n", cwd=tmp_path)
        assert code == 0, err
        assert out == "Hello! How can I help?\n\nIt is 48.75.\n\n"
        # a second run remembers the first (the history lives in the data folder)
        code, out, err = await yanray(["chat"], environ, "what did I ask?\n", cwd=tmp_path)
    assert code == 0, err
    assert out == "You asked about 6.5 times 7.5.\n\n"
    seen = [m["content"] for m in fake.requests[-1]["messages"] if m["role"] == "user"]
    assert seen[0] == "hi" and seen[-1] == "what did I ask?"


async def test_chat_answers_in_the_operators_or_the_terminals_language(tmp_path: Path) -> None:
    # YANRAY_TOOLS is the default, the calculator: /help says so
    zh_help, en_help = help_text("zh", ["calculate"]), help_text("en", ["calculate"])
    assert "While answering I can use: a calculator." in en_help and "回答时我可以使用：计算器。" in zh_help
    async with FakeOpenAI(replies=[]) as fake:
        environ = env(tmp_path, YANRAY_ENGINE="openai", YANRAY_OPENAI_BASE_URL=fake.base_url)
        code, out, err = await yanray(["chat"], {**environ, "YANRAY_LANGUAGE": "zh"}, "/help\n", cwd=tmp_path)
        assert code == 0, err
        assert out == f"{zh_help}\n\n" and out.startswith("我是 Yanray")
        code, out, err = await yanray(["chat"], environ, "/help\n", cwd=tmp_path)
        assert (code, out) == (0, f"{en_help}\n\n"), err
        code, out, err = await yanray(["chat"], {**environ, "LANG": "zh_CN.UTF-8"}, "/help\n", cwd=tmp_path)
        assert (code, out) == (0, f"{zh_help}\n\n"), err
        # /lang en outlasts the process, and beats the terminal's language
        code, out, err = await yanray(
            ["chat"], {**environ, "LANG": "zh_CN.UTF-8"}, "/lang en\n", cwd=tmp_path
        )
        assert (code, out) == (0, "From now on I write in English here.\n\n"), err
        code, out, err = await yanray(["chat"], {**environ, "LANG": "zh_CN.UTF-8"}, "/help\n", cwd=tmp_path)
        assert (code, out) == (0, f"{en_help}\n\n"), err


async def test_chat_with_an_unreachable_engine_says_so_in_one_line(tmp_path: Path) -> None:
    environ = env(tmp_path, YANRAY_ENGINE="openai", YANRAY_OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    code, out, err = await yanray(["chat"], environ, "hello\n", cwd=tmp_path)
    assert code == 0
    assert out.count("\n") == 2 and "cannot be reached" in out


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("YANRAY_TEMPERATURE", "hot", "YANRAY_TEMPERATURE='hot'"),
        ("YANRAY_ENGINE", "gpt", "YANRAY_ENGINE='gpt'"),
        ("YANRAY_MAX_NEW_TOKENS", "0", "greater than or equal to 1"),
        ("YANRAY_TOOLS", "calculate,shell", "unknown tool 'shell'"),
        ("YANRAY_TIMEZONE", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("YANRAY_SEARXNG_URL", "searxng:8080", "YANRAY_SEARXNG_URL='searxng:8080'"),
    ],
)
async def test_a_bad_setting_stops_start_up_with_one_line(tmp_path, name, value, expected) -> None:
    code, out, err = await yanray(["chat"], env(tmp_path, **{name: value}), cwd=tmp_path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err


def test_unknown_yanray_variable_is_a_warning(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("YANRAY_TEMPERATUR", "0.1")
    settings = load_settings()
    assert settings.temperature == 0.7
    assert "YANRAY_TEMPERATUR is not a Yanray setting" in caplog.text


def test_toml_file_and_environment(monkeypatch, tmp_path) -> None:
    config = tmp_path / "yanray.toml"
    config.write_text('max_new_tokens = 99\ntools = []\nsystem_prompt = "From the file."\n')
    monkeypatch.setenv("YANRAY_MAX_NEW_TOKENS", "77")
    settings = load_settings(config)
    assert (settings.max_new_tokens, settings.tools, settings.system_prompt) == (77, [], "From the file.")
    monkeypatch.setenv("YANRAY_CONFIG", str(config))
    monkeypatch.setenv("YANRAY_ALLOWED_USERS", "telegram:1, discord:2")
    assert load_settings().allowed_users == ["telegram:1", "discord:2"]


def test_a_webhook_without_a_secret_is_refused(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("YANRAY_TELEGRAM_WEBHOOK_URL", "https://bot.example.com/hook")
    with pytest.raises(ConfigError, match="needs YANRAY_TELEGRAM_WEBHOOK_SECRET"):
        load_settings()
    monkeypatch.setenv("YANRAY_TELEGRAM_WEBHOOK_SECRET", "s3cret")
    assert load_settings().telegram_webhook_url == "https://bot.example.com/hook"


def test_the_migration_creates_exactly_the_models_schema() -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    from yanray.storage.db import _alembic_config
    from yanray.storage.models import Base

    with create_engine("sqlite://").begin() as connection:
        config = _alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_secrets_are_refused_in_the_toml_file(tmp_path) -> None:
    config = tmp_path / "yanray.toml"
    config.write_text('telegram_token = "123:abc"\n')
    with pytest.raises(ConfigError, match="YANRAY_TELEGRAM_TOKEN in the environment"):
        load_settings(config)


def test_help_lists_the_commands(capsys) -> None:
    from yanray.bot.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(word in text for word in ("chat", "run", "quantize", "--config"))


async def test_database_pragmas_and_a_newer_schema_is_refused(tmp_path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db' / 'yanray.db'}"
    db = await Database.open(url)
    async with db.engine.connect() as conn:
        journal = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
        keys = (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar()
        timeout = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
    assert (journal, keys, timeout) == ("wal", 1, 10_000)
    async with db.engine.begin() as conn:
        await conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00d'")
    await db.close()
    with pytest.raises(StorageError, match="newer Yanray"):
        await Database.open(url)


async def test_concurrent_write_transactions_queue_instead_of_failing(tmp_path) -> None:
    from yanray.storage import crud

    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'yanray.db'}")

    async def write(i: int) -> None:
        async with db.transaction() as session:
            conversation, _ = await crud.get_or_create_conversation(
                session=session,
                platform="t",
                chat_id=str(i % 3),
                user_key="u",
                user_external_id="u",
                display_name="U",
            )
            await asyncio.sleep(0.001)
            await crud.add_message(session=session, conversation_id=conversation.id, role="user", text=str(i))

    await asyncio.gather(*(write(i) for i in range(30)))
    async with db.engine.connect() as conn:
        count = (await conn.exec_driver_sql("SELECT count(*) FROM messages")).scalar()
    await db.close()
    assert count == 30
