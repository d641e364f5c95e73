"""After a restart, what the last run left on the screen becomes the answer: queue notices
and a cut-off partial answer are edited into their answers, and an answer that was already
visibly complete is not sent again (the real PTB client against the fake Bot API)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy import update

from tests.fakes.telegram_harness import RunningBot, running_bot, telegram_settings
from tests.fakes.telegram_server import FakeTelegram
from tests.scripted_engine import ScriptedEngine
from yanray.bot.settings import Settings
from yanray.storage import Request, crud

GROUP = -100500
USERS = (1001, 1002, 1003)


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


async def blocked(bot: RunningBot) -> set[str]:
    async with bot.core.db.transaction() as session:
        return await crud.blocked_chats(session=session, platform="telegram")


def answer_for(messages) -> str:
    return f"Answer to: {messages[-1].content}"


async def test_notices_and_a_partial_answer_become_the_answers_after_a_restart(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    settings = telegram_settings(fake, make_settings(tools=[]))
    slow = ScriptedEngine(responder=lambda m: "a slow answer that is cut off by the stop " * 20, delay=0.05)
    async with running_bot(fake, settings, slow):
        for user in USERS:
            fake.group_text(GROUP, user, f"@yanray_bot question from {user}")
        # two notices are up, and the first answer is partly shown
        await fake.wait_for(lambda: sum(t.startswith("⏳") for t in fake.messages(GROUP)) == 2)
        await fake.wait_for(lambda: any(t.startswith("a slow answer") for t in fake.messages(GROUP)))
    before = len(fake.calls_of("sendMessage", GROUP))
    assert len(fake.messages(GROUP)) == 3

    async with running_bot(fake, settings, ScriptedEngine(responder=answer_for)) as bot:
        await fake.wait_for(lambda: all(t.startswith("Answer to:") for t in fake.messages(GROUP)))
        await fake.wait_for(lambda: bot.core.queue.running is None and not len(bot.core.queue))
        assert await bot.statuses() == {"done": 3}
    assert sorted(fake.messages(GROUP)) == [f"Answer to: question from {u}" for u in USERS]
    assert len(fake.calls_of("sendMessage", GROUP)) == before  # edited in place, none added


async def test_a_visibly_complete_answer_is_not_sent_again(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    settings = telegram_settings(fake, make_settings(tools=[]))
    async with running_bot(fake, settings, ScriptedEngine(["The whole answer."])) as bot:
        fake.group_text(GROUP, USERS[0], "@yanray_bot question")
        await fake.wait_for(lambda: fake.messages(GROUP) == ["The whole answer."])
        await fake.wait_for(lambda: bot.core.queue.running is None and not bot.core.worker.deliveries)
        # as if the process died after Telegram took the final text, before `delivered` was stored
        async with bot.core.db.transaction() as session:
            await session.execute(update(Request).values(delivered=False))
    writes = len(fake.calls_of("sendMessage")) + len(fake.calls_of("editMessageText"))
    engine = ScriptedEngine(["never generated"])
    async with running_bot(fake, settings, engine) as bot:
        await fake.wait_for(lambda: bot.core.queue.running is None and not bot.core.worker.deliveries)
        async with bot.core.db.transaction() as session:
            request = await session.get(Request, 1)
            assert request is not None and request.delivered
    assert engine.prompts == []
    assert fake.messages(GROUP) == ["The whole answer."]
    assert len(fake.calls_of("sendMessage")) + len(fake.calls_of("editMessageText")) == writes


async def test_an_undelivered_answer_replaces_its_notice(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    settings = telegram_settings(fake, make_settings(tools=[]))
    engine = ScriptedEngine(responder=lambda m: answer_for(m) + " and more" * 30, delay=0.02)
    async with running_bot(fake, settings, engine) as bot:
        fake.group_text(GROUP, USERS[0], "@yanray_bot first")
        fake.group_text(GROUP, USERS[1], "@yanray_bot second")
        await fake.wait_for(lambda: any(t.startswith("⏳") for t in fake.messages(GROUP)))
        # the first answer shows (the worker answers in a task of its own, so its first text
        # can come after the second question's notice)
        await fake.wait_for(lambda: any(t.startswith("Answer to: first") for t in fake.messages(GROUP)))
        # Telegram fails every write from now on: the answers stay stored, undelivered
        for method in ("sendMessage", "editMessageText"):
            fake.fail(method, "server", times=10_000, chat_id=GROUP)
        await fake.wait_for(lambda: len(engine.prompts) == 2)
        await fake.wait_for(lambda: bot.core.queue.running is None and not bot.core.worker.deliveries)
        assert await bot.statuses() == {"done": 2}
    fake._faults.clear()
    notices = len(fake.messages(GROUP))
    assert any(t.startswith("⏳") for t in fake.messages(GROUP))
    async with running_bot(fake, settings, ScriptedEngine(["unused"])) as bot:
        await fake.wait_for(lambda: all(t.startswith("Answer to:") for t in fake.messages(GROUP)))
        await fake.wait_for(lambda: not bot.core.worker.deliveries)
    assert len(fake.messages(GROUP)) == notices


async def test_an_update_delivered_again_is_answered_once(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    # Telegram resends an update whose receipt it never got (the process died after storing
    # the question, before the next getUpdates confirmed it)
    settings = telegram_settings(fake, make_settings(tools=[]))
    engine = ScriptedEngine(responder=answer_for)
    async with running_bot(fake, settings, engine) as bot:
        mid = fake.private_text(USERS[0], "only once please")
        await fake.wait_for(lambda: fake.messages(USERS[0]))
        fake.raw_update({"message": dict(fake.user_messages[(USERS[0], mid)])})
        fake.private_text(USERS[0], "and the next one")
        await fake.wait_for(lambda: len(fake.messages(USERS[0])) == 2)
        await fake.wait_for(lambda: bot.core.queue.running is None and not bot.core.worker.deliveries)
        assert await bot.statuses() == {"done": 2}
    assert fake.messages(USERS[0]) == ["Answer to: only once please", "Answer to: and the next one"]
    assert len(engine.prompts) == 2


async def test_an_edit_after_a_restart_edits_the_earlier_answer(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    settings = telegram_settings(fake, make_settings(tools=[]))
    for chat, say in ((USERS[0], fake.private_text), (GROUP, lambda c, t: fake.group_text(c, USERS[1], t))):
        async with running_bot(fake, settings, ScriptedEngine(responder=answer_for)) as bot:
            asked = say(chat, "@yanray_bot about cats" if chat == GROUP else "about cats")
            await fake.wait_for(lambda c=chat: fake.messages(c) == ["Answer to: about cats"])
            await fake.wait_for(lambda b=bot: b.core.queue.running is None and not b.core.worker.deliveries)
        sent = len(fake.calls_of("sendMessage", chat))

        async with running_bot(fake, settings, ScriptedEngine(responder=answer_for)) as bot:
            fake.edit(chat, asked, "@yanray_bot about dogs" if chat == GROUP else "about dogs")
            await fake.wait_for(lambda c=chat: fake.messages(c) == ["Answer to: about dogs"])
            await fake.wait_for(lambda b=bot: b.core.queue.running is None and not b.core.worker.deliveries)
            assert set(await bot.statuses()) == {"done"}
        # the earlier answer was edited into the new one: nothing was sent beside it
        assert len(fake.calls_of("sendMessage", chat)) == sent
        (answer,) = fake.bot_messages(chat)
        assert "Answer to: about cats" in answer.history


async def test_a_chat_that_blocked_the_bot_stays_unwritten_after_a_restart(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    alice = USERS[0]
    settings = telegram_settings(fake, make_settings(tools=[]))
    stuck = ScriptedEngine(["never"])
    stuck.before_reply = lambda: asyncio.get_running_loop().create_future()  # type: ignore[assignment]
    async with running_bot(fake, settings, stuck) as bot:
        fake.block(alice)
        fake.private_text(alice, "hello?")
        await fake.wait_for(lambda: stuck.prompts and alice in bot.adapter.ctx.blocked)
    # the process stops while the question is being answered: it is answered after the restart

    calls = len(fake.calls)
    async with running_bot(fake, settings, ScriptedEngine(responder=answer_for)) as bot:
        assert await blocked(bot) == {str(alice)}
        await fake.wait_for(
            lambda: (
                bot.core.queue.running is None and not len(bot.core.queue) and not bot.core.worker.deliveries
            )
        )
        assert await bot.statuses() == {"done": 1}
        assert not [c for c in fake.calls[calls:] if c.params.get("chat_id") == alice]

        fake.blocked.discard(alice)  # she unblocks the bot and writes again
        fake.private_text(alice, "back again")
        await fake.wait_for(lambda: fake.messages(alice) == ["Answer to: back again"])
        assert await blocked(bot) == set()
