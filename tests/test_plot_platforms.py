"""A plot reaches the user on every platform: a photo on Telegram (the real PTB client against
the fake Bot API, sendPhoto as a multipart upload), an attachment on Discord (the real
discord.py client against the fake Discord), in the order the answer wrote it: the text
before the call, the picture, the text after. A picture the platform refuses leaves the
answer whole, with one line saying so. (The terminal: tests/test_plot.py.)
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.fakes.discord_server import FakeDiscord
from tests.fakes.telegram_harness import running_bot, telegram_settings
from tests.fakes.telegram_server import FakeTelegram
from tests.scripted_engine import ScriptedEngine
from yanray.adapters.discord import DiscordAdapter
from yanray.bot.tools.plot_rules import HEIGHT, WIDTH

ALICE = 1001
GROUP = -100500
SCRIPT = ["Here is the graph.\n/plot sin(x) x from -5 to 5\n", "It is a wave."]
SENT = "Sent the plot of sin(x) for x from -5 to 5 to the user."
REFUSED_NOTE = "[A picture could not be sent: the chat service did not take it.]"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# -- Telegram ------------------------------------------------------------------------------------


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


@pytest.mark.parametrize("chat", [ALICE, GROUP])
async def test_telegram_gets_a_photo_between_the_texts(
    telegram: FakeTelegram, make_settings, chat: int
) -> None:
    engine = ScriptedEngine(list(SCRIPT), piece=8)
    settings = telegram_settings(telegram, make_settings(), tools=["plot"])
    async with running_bot(telegram, settings, engine) as bot:
        if chat == ALICE:
            telegram.private_text(ALICE, "draw sin(x)")
        else:
            telegram.group_text(GROUP, ALICE, "@yanray_bot draw sin(x)")
        await telegram.wait_for(lambda: "It is a wave." in telegram.messages(chat), within=30)
        await bot.settled()
    (photo,) = telegram.photos
    assert photo.chat_id == chat and photo.filename == "plot.png"
    assert png_size(photo.data) == (WIDTH, HEIGHT)
    assert photo.caption == "y = sin(x), x from -5 to 5"
    texts = telegram.bot_messages(chat)
    assert [m.visible for m in texts] == ["Here is the graph.", "It is a wave."]
    assert texts[0].message_id < photo.message_id < texts[1].message_id  # text, picture, text
    assert engine.prompts[-1][-1].content == SENT


async def test_telegram_refusing_the_photo_keeps_the_answer_with_one_line(
    telegram: FakeTelegram, make_settings, caplog
) -> None:
    telegram.fail("sendPhoto", "bad_request")
    engine = ScriptedEngine(list(SCRIPT), piece=8)
    settings = telegram_settings(telegram, make_settings(), tools=["plot"])
    async with running_bot(telegram, settings, engine) as bot:
        telegram.private_text(ALICE, "draw sin(x)")
        await telegram.wait_for(lambda: any(REFUSED_NOTE in t for t in telegram.messages(ALICE)), within=30)
        await bot.settled()
    assert telegram.photos == []
    assert telegram.messages(ALICE) == ["Here is the graph.", f"It is a wave.\n\n{REFUSED_NOTE}"]
    assert engine.prompts[-1][-1].content.startswith("Could not send the plot of sin(x)")
    assert any("an image could not be sent" in r.getMessage() for r in caplog.records)


# -- Discord -------------------------------------------------------------------------------------


@pytest.fixture
async def discord_bot(make_settings, core_factory) -> AsyncIterator[tuple[FakeDiscord, ScriptedEngine, Any]]:
    async with FakeDiscord() as fake:
        settings = make_settings(
            discord_token=fake.token,
            discord_api_base=fake.api_base,
            discord_gateway_url=fake.gateway_url,
            discord_edit_interval=0.05,
            tools=["plot"],
        )
        engine = ScriptedEngine(list(SCRIPT), piece=20)
        core = await core_factory(settings, engine, start=False)
        adapter = DiscordAdapter(
            settings=settings, dispatcher=core.dispatcher, guild_ready_timeout=0.01, retry_delays=(0.01, 0.02)
        )
        core.add_adapter(adapter)
        await adapter.start()
        await core.start()
        try:
            yield fake, engine, (core, adapter)
        finally:
            await adapter.stop()


async def _settle(fake: FakeDiscord, parts: Any) -> None:
    core, adapter = parts
    await asyncio.wait_for(core.wait_idle(), 30)
    await fake.wait_for(adapter.ctx.settled)


async def test_discord_gets_an_attachment_between_the_texts(discord_bot) -> None:
    fake, engine, parts = discord_bot
    mid = await fake.user_message(
        fake.channel_id, fake.alice, f"<@{fake.bot_id}> draw sin(x)", mentions=[fake.bot]
    )
    await fake.wait_for(lambda: any(m.content == "It is a wave." for m in fake.bot_messages()), 30)
    await _settle(fake, parts)
    sent = fake.bot_messages(fake.channel_id)
    assert [m.content for m in sent] == ["Here is the graph.", "y = sin(x), x from -5 to 5", "It is a wave."]
    assert sent[0].reply_to == mid
    ((name, data),) = sent[1].files
    assert name == "plot.png" and png_size(data) == (WIDTH, HEIGHT)
    assert engine.prompts[-1][-1].content == SENT
    upload = next(c for c in fake.calls if isinstance(c.body, dict) and c.body.get("files"))
    assert upload.body["allowed_mentions"]["parse"] == []  # no pings in a caption either


async def test_discord_slash_ask_gets_the_attachment_as_a_follow_up(discord_bot) -> None:
    fake, engine, parts = discord_bot
    iid = await fake.slash("ask", fake.alice, [{"name": "question", "type": 3, "value": "draw sin(x)"}])
    await fake.wait_for(lambda: any(m.files for m in fake.bot_messages()), 30)
    await _settle(fake, parts)
    response = fake.interaction_response(iid)
    assert response is not None and response.content == "Here is the graph."
    (picture,) = [m for m in fake.bot_messages() if m.files]
    assert png_size(picture.files[0][1]) == (WIDTH, HEIGHT)
    assert [m.content for m in fake.bot_messages()][-1] == "It is a wave."


async def test_discord_refusing_the_upload_keeps_the_answer_with_one_line(discord_bot) -> None:
    fake, engine, parts = discord_bot
    fake.fail("POST", r"/channels/\d+/messages$", 413, code=40005, uploads=True)  # too large
    await fake.user_message(fake.channel_id, fake.alice, f"<@{fake.bot_id}> draw sin(x)", mentions=[fake.bot])
    await fake.wait_for(lambda: any(REFUSED_NOTE in m.content for m in fake.bot_messages()), 30)
    await _settle(fake, parts)
    contents = [m.content for m in fake.bot_messages(fake.channel_id)]
    assert all(not m.files for m in fake.bot_messages())
    assert "It is a wave." in "\n".join(contents) and "Here is the graph." in "\n".join(contents)
