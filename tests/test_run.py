"""`yanray run` as an operator starts it: both bots in one process, answering, then SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from tests.fakes.discord_server import FakeDiscord
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.telegram_server import FakeTelegram
from tests.test_cli import env


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
