"""Rating answers with 👍 and 👎 reactions on Discord: the real discord.py client against the
fake Discord gateway (MESSAGE_REACTION_ADD/REMOVE), the real core and database."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from tests import test_discord
from tests.fakes.discord_server import FakeDiscord
from tests.test_ratings_telegram import ratings
from tests.waiting import until
from yanray.bot.app import Core

pytestmark = pytest.mark.asyncio
# the running bot of the Discord tests (the fake server, the core and the adapter)
fake, make_bot = test_discord.fake, test_discord.make_bot


async def rated(core: Core, expected: list[tuple[int, str, str, int]], within: float = 5.0) -> None:
    """Until the stored ratings are `expected` (a reaction is stored once its event is handled)."""

    async def stored() -> bool:
        return await ratings(core) == expected

    await until(stored, within=within, what=f"ratings {expected}", every=0.01)


async def test_discord_reactions_rate_the_answer_and_two_people_give_two_rows(
    make_bot: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="yanray.bot.people")
    bot = await make_bot(["An answer."])
    server: FakeDiscord = bot.fake
    question = await bot.ask("tell me something")
    await bot.answer(question)
    answer = server.replies_to(question)[0].id
    alice, bob = server.alice["id"], server.bob["id"]

    assert await server.react(server.alice, answer, "👍"), "the client asked for the reactions intent"
    await rated(bot.core, [(1, "discord", alice, 1)])
    await server.react(server.alice, answer, "👎🏽")  # a thumb with a skin tone counts
    await rated(bot.core, [(1, "discord", alice, -1)])
    await server.react(server.alice, answer, "👍", add=False)  # the 👎 is still there
    await until(
        lambda: any("still rated" in r.getMessage() for r in caplog.records), what="the removal was seen"
    )
    assert await ratings(bot.core) == [(1, "discord", alice, -1)]
    await server.react(server.bob, answer, "👍")
    await rated(bot.core, [(1, "discord", alice, -1), (1, "discord", bob, 1)])
    await server.react(server.alice, answer, "👎🏽", add=False)
    await rated(bot.core, [(1, "discord", bob, 1)])

    await server.react(server.alice, question, "👍")  # the question is no answer
    await until(lambda: any("not an answer" in r.getMessage() for r in caplog.records), what="ignored")
    await server.react(server.alice, answer, "🎉")  # nor is a party a rating
    await server.react(server.alice, answer, "👍")
    await rated(bot.core, [(1, "discord", alice, 1), (1, "discord", bob, 1)])


async def test_discord_reactions_in_a_dm_rate_too(make_bot: Callable[..., Any]) -> None:
    bot = await make_bot(["A private answer."])
    server: FakeDiscord = bot.fake
    dm = "555000555"
    question = await server.user_message(dm, server.alice, "hello in private")
    await bot.answer(question)
    assert await server.react(server.alice, server.replies_to(question)[0].id, "👎")
    await rated(bot.core, [(1, "discord", server.alice["id"], -1)])
