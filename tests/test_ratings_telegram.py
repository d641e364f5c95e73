"""Rating answers with 👍 and 👎 reactions on Telegram: the real PTB client against the fake
Bot API, the real core and database."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from sqlalchemy import select

from tests.fakes.telegram_harness import running_bot, telegram_settings
from tests.fakes.telegram_server import FakeTelegram
from tests.scripted_engine import ScriptedEngine
from yanray.bot.app import Core
from yanray.bot.settings import Settings
from yanray.storage.models import Rating

pytestmark = pytest.mark.asyncio

ALICE, BOB = 1001, 1002
GROUP = -100500


async def ratings(core: Core) -> list[tuple[int, str, str, int]]:
    """Every stored rating: (request id, platform, rater's id, value)."""
    async with core.db.reading() as session:
        found = (await session.scalars(select(Rating))).all()
    return sorted((r.request_id, r.platform, r.user_id, r.value) for r in found)


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


async def handled(fake: FakeTelegram, update_id: int) -> None:
    """Until the bot confirmed the update, which it does only once it was handled."""
    await fake.wait_for(lambda: fake.polls and fake.polls[-1] > update_id)


async def test_telegram_reactions_rate_change_and_unrate_the_answer(
    fake: FakeTelegram, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="yanray.bot.people")
    settings = telegram_settings(fake, make_settings())
    async with running_bot(fake, settings, ScriptedEngine(["An answer."])) as bot:
        question = fake.private_text(ALICE, "Tell me something")
        await fake.wait_for(lambda: fake.messages(ALICE))
        await bot.settled()
        assert fake.allowed_updates is not None and "message_reaction" in fake.allowed_updates
        answer = fake.bot_messages(ALICE)[0].message_id
        me = str(ALICE)

        await handled(fake, fake.reaction(ALICE, ALICE, answer, ["👍"]))
        assert await ratings(bot.core) == [(1, "telegram", me, 1)]
        await handled(fake, fake.reaction(ALICE, ALICE, answer, ["👎"], old=["👍"]))
        assert await ratings(bot.core) == [(1, "telegram", me, -1)]
        await handled(fake, fake.reaction(ALICE, ALICE, answer, ["👎", "❤"], old=["👎"]))
        assert await ratings(bot.core) == [(1, "telegram", me, -1)], "another emoji changes nothing"
        await handled(fake, fake.reaction(ALICE, ALICE, answer, ["❤"], old=["👎", "❤"]))
        assert await ratings(bot.core) == [], "taking the thumb away deletes the rating"
        await handled(fake, fake.reaction(ALICE, ALICE, question, ["👍"]))
        assert await ratings(bot.core) == []
        assert any("not an answer" in r.getMessage() for r in caplog.records)
        await handled(fake, fake.reaction(ALICE, ALICE, answer, ["👍"], old=["❤"]))

    # a new process on the same database still knows which message showed which answer
    async with running_bot(fake, settings, ScriptedEngine([])) as bot:
        assert await ratings(bot.core) == [(1, "telegram", me, 1)]
        await handled(fake, fake.reaction(ALICE, ALICE, answer, ["👎"], old=["👍"]))
        assert await ratings(bot.core) == [(1, "telegram", me, -1)]


async def test_telegram_two_people_rate_one_long_answer_in_a_group(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    reply = "\n\n".join(f"Paragraph {i}: " + "words " * 100 for i in range(12))  # two messages
    settings = telegram_settings(fake, make_settings(max_new_tokens=4000))
    async with running_bot(fake, settings, ScriptedEngine([reply], piece=200)) as bot:
        fake.group_text(GROUP, BOB, "@yanray_bot write a lot")
        await fake.wait_for(lambda: fake.messages(GROUP))
        await bot.settled()
        assert len(fake.messages(GROUP)) == 2
        first, second = (m.message_id for m in fake.bot_messages(GROUP))
        await handled(fake, fake.reaction(GROUP, BOB, first, ["👎"]))
        await handled(fake, fake.reaction(GROUP, ALICE, second, ["👍"]))
        assert await ratings(bot.core) == [(1, "telegram", str(ALICE), 1), (1, "telegram", str(BOB), -1)]


async def test_telegram_webhook_asks_for_reactions_and_they_rate(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    settings = telegram_settings(
        fake,
        make_settings(),
        telegram_webhook_url=f"http://127.0.0.1:{port}/hook",
        telegram_webhook_port=port,
        telegram_webhook_secret="s3cret",
    )
    async with running_bot(fake, settings, ScriptedEngine(["Webhook answer."])) as bot:
        assert fake.allowed_updates is not None and "message_reaction" in fake.allowed_updates
        chat = {"id": ALICE, "type": "private", "first_name": "Alice"}
        person = {"id": ALICE, "is_bot": False, "first_name": "Alice"}
        message = {"message_id": 5, "date": 0, "chat": chat, "from": person, "text": "hi"}
        headers = {"X-Telegram-Bot-Api-Secret-Token": "s3cret"}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                settings.telegram_webhook_url, json={"update_id": 1, "message": message}, headers=headers
            ) as rsp:
                assert rsp.status == 200
            await fake.wait_for(lambda: fake.messages(ALICE))
            await bot.settled()
            reaction = {
                "chat": chat,
                "message_id": fake.bot_messages(ALICE)[0].message_id,
                "user": person,
                "date": 0,
                "old_reaction": [],
                "new_reaction": [{"type": "emoji", "emoji": "👍"}],
            }
            update = {"update_id": 2, "message_reaction": reaction}
            async with http.post(settings.telegram_webhook_url, json=update, headers=headers) as rsp:
                assert rsp.status == 200  # answered once handled
        assert await ratings(bot.core) == [(1, "telegram", str(ALICE), 1)]
