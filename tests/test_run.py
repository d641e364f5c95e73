"""`yanray run` as an operator starts it: both bots in one process, answering, then SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from tests.fakes.discord_server import FakeDiscord
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.telegram_server import FakeTelegram
from tests.test_cli import env
from yanray.storage import Database, crud


async def test_run_serves_telegram_and_discord_then_stops_cleanly(tmp_path: Path) -> None:
    async with (
        FakeTelegram() as telegram,
        FakeDiscord() as discord,
        FakeOpenAI(responder=lambda messages: f"You said: {messages[-1]['content']}") as model,
    ):
        environ = env(
            tmp_path,
            YANRAY_ENGINE="openai",
            YANRAY_OPENAI_BASE_URL=model.base_url,
            YANRAY_TOOLS="",
            YANRAY_TELEGRAM_TOKEN=telegram.token,
            YANRAY_TELEGRAM_BASE_URL=telegram.base_url,
            YANRAY_DISCORD_TOKEN=discord.token,
            YANRAY_DISCORD_API_BASE=discord.api_base,
            YANRAY_DISCORD_GATEWAY_URL=discord.gateway_url,
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "yanray.bot.cli", "run",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environ, cwd=tmp_path,
        )  # fmt: skip
        try:
            telegram.private_text(42, "hello from telegram")
            await telegram.wait_for(
                lambda: telegram.messages(42) == ["You said: hello from telegram"], within=30
            )
            mid = await discord.user_message(
                discord.channel_id,
                discord.alice,
                f"<@{discord.bot_id}> hello from discord",
                mentions=[discord.bot],
            )
            # the reply streams in by edits: wait for the finished one
            await discord.wait_for(
                lambda: [m.content for m in discord.replies_to(mid)] == ["You said: hello from discord"],
                timeout=30,
            )
        finally:
            process.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(process.communicate(), 30)
    assert telegram.messages(42) == ["You said: hello from telegram"]
    assert [m.content for m in discord.replies_to(mid)] == ["You said: hello from discord"]
    assert process.returncode == 0, err.decode()
    assert out == b""
    assert "stopping" in err.decode()


async def start_run(environ: dict[str, str], cwd: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "yanray.bot.cli", "run",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environ, cwd=cwd,
    )  # fmt: skip


async def test_killed_when_telegram_gets_the_confirming_call_loses_no_question(tmp_path: Path) -> None:
    """SIGKILL at the moment Telegram is told a burst of 25 updates was received: nothing is
    lost, because the confirming getUpdates comes only after all 25 questions are stored."""
    users = range(6001, 6026)
    model_free = asyncio.Event()

    async def answer(messages: list[dict[str, Any]]) -> str:
        await model_free.wait()  # the first run answers nothing before it is killed
        return f"You said: {messages[-1]['content']}"

    async with FakeTelegram() as telegram, FakeOpenAI(responder=answer) as model:
        environ = env(
            tmp_path,
            YANRAY_ENGINE="openai",
            YANRAY_OPENAI_BASE_URL=model.base_url,
            YANRAY_TOOLS="",
            YANRAY_RATE_LIMIT_PER_MINUTE="0",
            YANRAY_TELEGRAM_TOKEN=telegram.token,
            YANRAY_TELEGRAM_BASE_URL=telegram.base_url,
        )
        burst = {telegram.private_text(user, f"question {user}") for user in users}
        confirmed: set[int] = set()
        killed = asyncio.Event()
        process = await start_run(environ, tmp_path)

        def kill_on_confirm(ids: list[int]) -> None:
            confirmed.update(ids)
            if burst <= confirmed and not killed.is_set():
                process.kill()  # while the confirming getUpdates is being received
                killed.set()

        telegram.confirm_listeners.append(kill_on_confirm)
        try:
            await asyncio.wait_for(killed.wait(), 60)
        finally:
            if not killed.is_set():
                process.kill()
            _out, err = await process.communicate()
        assert process.returncode == -signal.SIGKILL, err.decode()
        assert not telegram.updates, "Telegram will not send the burst again"

        model_free.set()
        process = await start_run(environ, tmp_path)
        try:
            await telegram.wait_for(
                lambda: all(f"You said: question {u}" in telegram.messages(u) for u in users), within=60
            )
        finally:
            process.send_signal(signal.SIGTERM)
            _out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    for user in users:
        answers = [m for m in telegram.messages(user) if m.startswith("You said")]
        assert answers == [f"You said: question {user}"], user
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'yanray.db'}")
    try:
        async with db.transaction() as session:
            assert dict(await crud.request_counts(session=session)) == {"done": 25}, "each stored once"
    finally:
        await db.close()


async def test_a_discord_connection_lost_for_good_stops_yanray_run(tmp_path: Path) -> None:
    async with FakeDiscord() as discord, FakeOpenAI(replies=["unused"]) as model:
        environ = env(
            tmp_path,
            YANRAY_ENGINE="openai",
            YANRAY_OPENAI_BASE_URL=model.base_url,
            YANRAY_DISCORD_TOKEN=discord.token,
            YANRAY_DISCORD_API_BASE=discord.api_base,
            YANRAY_DISCORD_GATEWAY_URL=discord.gateway_url,
        )
        process = await start_run(environ, tmp_path)
        assert process.stderr is not None
        log = b""
        try:
            while b"Yanray is running" not in log:
                line = await asyncio.wait_for(process.stderr.readline(), 30)
                assert line, log.decode()
                log += line
            await discord.drop_gateway(4004)  # Authentication failed: no way back
            _out, err = await asyncio.wait_for(process.communicate(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    lines = err.decode().splitlines()
    assert process.returncode == 1, err.decode()
    assert lines[-1].startswith("yanray: Discord: the connection ended for good"), lines[-3:]
    assert "Traceback" not in err.decode()
