"""Expected failures at start-up, as an operator meets them: one line, the right exit status.

Every case runs the real `yanray` command as a process and checks what the operator sees:
exit status 2 for a configuration problem and 1 for any other, exactly one line on
standard error, no traceback, nothing on standard output. With YANRAY_LOG_LEVEL=DEBUG the
traceback is in the log.
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.discord_server import FakeDiscord
from tests.fakes.telegram_server import FakeTelegram
from tests.test_cli import env, yanray
from yanray.storage import DatabaseLock

#: an engine that is never asked anything: start-up fails before the first question
OPENAI = {"YANRAY_ENGINE": "openai", "YANRAY_OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}


def one_line(code: int, out: str, err: str, expected_code: int, expected: str) -> None:
    assert (code, out) == (expected_code, ""), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and expected in err, err


async def test_a_telegram_token_the_server_refuses_is_one_line(tmp_path: Path) -> None:
    async with FakeTelegram() as telegram:
        environ = env(
            tmp_path, **OPENAI, YANRAY_TELEGRAM_TOKEN="999:WRONG", YANRAY_TELEGRAM_BASE_URL=telegram.base_url
        )
        code, out, err = await yanray(["run"], environ, cwd=tmp_path)
    one_line(code, out, err, 2, "YANRAY_TELEGRAM_TOKEN was refused by Telegram")


async def test_a_discord_login_refused_with_401_is_one_line(tmp_path: Path) -> None:
    async with FakeDiscord() as discord:
        environ = env(
            tmp_path,
            **OPENAI,
            YANRAY_DISCORD_TOKEN="wrong-token",
            YANRAY_DISCORD_API_BASE=discord.api_base,
            YANRAY_DISCORD_GATEWAY_URL=discord.gateway_url,
        )
        code, out, err = await yanray(["run"], environ, cwd=tmp_path)
    one_line(code, out, err, 2, "YANRAY_DISCORD_TOKEN was rejected by Discord")


async def test_the_traceback_is_logged_at_debug(tmp_path: Path) -> None:
    environ = env(tmp_path, **OPENAI, YANRAY_DATABASE_URL="postgresql+asyncpg://u@127.0.0.1:9/db")
    code, _, err = await yanray(["chat"], dict(environ, YANRAY_LOG_LEVEL="DEBUG"), cwd=tmp_path)
    assert code == 1 and "Traceback" in err
    assert err.rstrip("\n").splitlines()[-1].startswith("yanray: The database at postgresql+asyncpg://u@")


async def test_a_webhook_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with FakeTelegram() as telegram:
            environ = env(
                tmp_path,
                **OPENAI,
                YANRAY_TELEGRAM_TOKEN=telegram.token,
                YANRAY_TELEGRAM_BASE_URL=telegram.base_url,
                YANRAY_TELEGRAM_WEBHOOK_URL=f"http://127.0.0.1:{port}/hook",
                YANRAY_TELEGRAM_WEBHOOK_PORT=str(port),
                YANRAY_TELEGRAM_WEBHOOK_SECRET="s3cret",
            )
            code, out, err = await yanray(["run"], environ, cwd=tmp_path)
    one_line(code, out, err, 2, f"cannot listen on 127.0.0.1:{port}")


async def _not_a_database(tmp: Path) -> None:
    (tmp / "data").mkdir()
    (tmp / "data" / "yanray.db").write_bytes(b"this is not SQLite, " * 100)


def _drop(sql: str) -> Callable[[Path], Awaitable[None]]:
    async def prepare(tmp: Path) -> None:
        # a real Yanray database first: `yanray chat` with no input creates it and exits
        code, _, err = await yanray(["chat"], env(tmp, **OPENAI), cwd=tmp)
        assert code == 0, err
        db = sqlite3.connect(tmp / "data" / "yanray.db")
        db.execute(sql)
        db.commit()
        db.close()

    return prepare


async def _utf16_toml(tmp: Path) -> None:
    (tmp / "yanray.toml").write_text("max_new_tokens = 99\n", encoding="utf-16")


async def _a_file(tmp: Path) -> None:
    (tmp / "file").write_text("x")


# (setting overrides, command, what to prepare ("lock": hold the database lock), exit status, words)
CASES: dict[str, tuple[dict[str, str], str, Any, int, str]] = {
    "telegram unreachable": (
        {"YANRAY_TELEGRAM_TOKEN": "1:x", "YANRAY_TELEGRAM_BASE_URL": "http://127.0.0.1:9/bot"},
        "run",
        None,
        1,
        "Telegram cannot be reached at http://127.0.0.1:9/bot",
    ),
    "discord unreachable": (
        {"YANRAY_DISCORD_TOKEN": "x", "YANRAY_DISCORD_API_BASE": "http://127.0.0.1:9/api/v10"},
        "run",
        None,
        1,
        "Discord: could not connect via http://127.0.0.1:9/api/v10",
    ),
    "telegram base url not a url": (
        {"YANRAY_TELEGRAM_TOKEN": "1:x", "YANRAY_TELEGRAM_BASE_URL": "notaurl"},
        "run",
        None,
        2,
        "YANRAY_TELEGRAM_BASE_URL='notaurl': not a URL",
    ),
    "openai port out of range": (
        {"YANRAY_OPENAI_BASE_URL": "http://127.0.0.1:99999/v1"},
        "chat",
        None,
        2,
        "YANRAY_OPENAI_BASE_URL='http://127.0.0.1:99999/v1': not a usable URL",
    ),
    "sqlite without an async driver": (
        {"YANRAY_DATABASE_URL": "sqlite:///x.db"},
        "chat",
        None,
        2,
        "YANRAY_DATABASE_URL=sqlite:///x.db: not a database Yanray can use",
    ),
    "an unknown database scheme": (
        {"YANRAY_DATABASE_URL": "garbage://x/y"},
        "chat",
        None,
        2,
        "YANRAY_DATABASE_URL=garbage://x/y: not a database Yanray can use",
    ),
    "mysql without a driver": (
        {"YANRAY_DATABASE_URL": "mysql://u:secret@127.0.0.1/db"},
        "chat",
        None,
        2,
        "not a database Yanray can use",
    ),
    "unreachable postgresql": (
        {"YANRAY_DATABASE_URL": "postgresql+asyncpg://u@127.0.0.1:9/db"},
        "chat",
        None,
        1,
        "The database at postgresql+asyncpg://u@127.0.0.1:9/db cannot be opened",
    ),
    "data dir is a file": (
        {"YANRAY_DATA_DIR": "{tmp}/file"},
        "chat",
        _a_file,
        2,
        "/file: is a file, not a folder",
    ),
    "data dir cannot be created": (
        {"YANRAY_DATA_DIR": "/proc/yanray/data"},
        "chat",
        None,
        2,
        "YANRAY_DATA_DIR=/proc/yanray/data: cannot be written",
    ),
    "data dir read-only": (
        # a folder that exists and takes no file, even for root (this test may run as root)
        {"YANRAY_DATA_DIR": "/sys"},
        "chat",
        None,
        2,
        "YANRAY_DATA_DIR=/sys: cannot be written",
    ),
    "utf-16 toml": ({}, "chat", _utf16_toml, 2, "yanray.toml: not UTF-8 text"),
    "not a database": (
        {},
        "chat",
        _not_a_database,
        1,
        "cannot be opened: file is not a database",
    ),
    "a dropped table": ({}, "chat", _drop("DROP TABLE requests"), 1, "lacks the table(s) requests"),
    "no alembic_version": (
        {},
        "chat",
        _drop("DROP TABLE alembic_version"),
        1,
        "has Yanray's tables but no schema version",
    ),
    "a locked database": ({}, "chat", "lock", 1, "is already using"),
    "a model that is not there": (
        {"YANRAY_ENGINE": "local", "YANRAY_MODEL": "{tmp}/no/such/model"},
        "chat",
        None,
        1,
        "/no/such/model: no such folder, and not a hub id",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_an_expected_failure_at_start_is_one_line(tmp_path: Path, case: str) -> None:
    overrides, command, prepare, expected_code, words = CASES[case]
    environ = env(tmp_path, **OPENAI)
    environ.update({k: v.replace("{tmp}", str(tmp_path)) for k, v in overrides.items()})
    lock = None
    if prepare == "lock":
        lock = DatabaseLock.acquire((tmp_path / "data" / "yanray.db").resolve())
    elif prepare is not None:
        await prepare(tmp_path)
    try:
        code, out, err = await yanray([command], environ, cwd=tmp_path)
    finally:
        if lock is not None:
            lock.release()
    one_line(code, out, err, expected_code, words)
    assert "secret" not in err  # a password in a URL is never shown


async def test_offline_the_default_model_is_refused_at_once(tmp_path: Path) -> None:
    """No network and no model yet: one clear line at once, no retries (they took 30 s)."""
    environ = env(tmp_path, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0")
    environ.pop("YANRAY_MODEL", None)
    started = time.monotonic()
    code, out, err = await yanray(["chat"], environ, cwd=tmp_path)
    elapsed = time.monotonic() - started
    one_line(code, out, err, 1, "yanray: Cannot download THUDM/chatglm3-6b-32k: no network")
    # the retries took 30 s on top of the start; the start alone (imports) took up to 18 s
    # on the loaded 2-core development machine
    assert elapsed < 25


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 64 KiB tmpfs, all but 4 KiB of it taken: a full disk. Mounting needs root (and a
    container that allows it); without that the test is skipped, as there is no other
    honest way to fill a disk."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        (mount / "filler").write_bytes(b"\0" * 60_000)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


async def test_a_full_disk_at_start_is_one_line(tmp_path: Path, full_disk: Path) -> None:
    environ = env(tmp_path, **OPENAI, YANRAY_DATA_DIR=str(full_disk / "data"))
    code, out, err = await yanray(["chat"], environ, cwd=tmp_path)
    one_line(code, out, err, 1, "cannot be opened: database or disk is full")
