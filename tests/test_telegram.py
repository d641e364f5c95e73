"""Talking to Yanray on Telegram: the real PTB client against the fake Bot API, the real core."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.fakes.telegram_harness import running_bot, telegram_settings
from tests.fakes.telegram_server import FakeTelegram
from tests.scripted_engine import ScriptedEngine
from yanray.adapters.telegram import NON_TEXT_NOTE
from yanray.bot.dispatcher import COMMANDS, HELP
from yanray.bot.i18n import translator
from yanray.bot.settings import Settings
from yanray.engine.base import ChatMessage

ALICE, BOB = 1001, 1002
GROUP = -100500


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


def last_user(messages: list[ChatMessage]) -> str:
    return [m.content for m in messages if m.role == "user"][-1]


def last_user_text(engine: ScriptedEngine) -> str:
    return last_user(engine.prompts[-1])


async def test_private_chat_streams_drafts_then_sends_the_final_message(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    reply = "Here is a **careful** answer. " * 12
    engine = ScriptedEngine([reply.strip()], delay=0.01, piece=8)
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine):
        fake.private_text(ALICE, "Tell me something")
        await fake.wait_for(lambda: fake.messages(ALICE))
        final = reply.strip().replace("**", "")
        assert fake.messages(ALICE) == [final]
        drafts = fake.drafts_of(ALICE)
        assert len(drafts) >= 2, "the answer was streamed as drafts"
        assert all(final.startswith(draft.replace("*", "").rstrip()) for draft in drafts)
        draft_times = [d.at for d in fake.drafts if d.chat_id == ALICE]
        assert all(b - a >= 0.04 for a, b in zip(draft_times, draft_times[1:], strict=False)), "throttled"
        final_call = fake.calls_of("sendMessage", ALICE)[-1]
        assert final_call.at >= draft_times[-1]
        assert fake.calls_of("sendChatAction", ALICE), "typing is shown"
        assert not fake.calls_of("editMessageText", ALICE)
        assert fake.bot_messages(ALICE)[0].parse_mode == "HTML"
        assert "<b>careful</b>" in fake.bot_messages(ALICE)[0].text
        assert last_user_text(engine) == "Tell me something"


async def test_group_answers_mentions_and_replies_and_ignores_chatter(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = ScriptedEngine(responder=lambda m: f"You said: {last_user(m)}")
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine) as bot:
        fake.group_text(GROUP, ALICE, "just chatting about @someone_else and yanray_bot")
        fake.group_text(GROUP, ALICE, "/weather London")  # another bot's command
        fake.group_text(GROUP, ALICE, "/reset@other_bot")
        asked = fake.group_text(GROUP, ALICE, "hey @yanray_bot what is the time?")
        await fake.wait_for(lambda: fake.messages(GROUP) == ["You said: hey what is the time?"])
        assert len(engine.prompts) == 1, "chatter reached no model"
        answer = fake.bot_messages(GROUP)[0]
        assert answer.reply_to == asked, "group answers quote the question"

        fake.group_text(GROUP, BOB, "and tomorrow?", reply_to=answer.message_id)
        await fake.wait_for(lambda: fake.messages(GROUP)[1:] == ["You said: and tomorrow?"])

        # a reply to another person's message is chatter too
        fake.group_text(GROUP, BOB, "nice", reply_to=asked)
        fake.group_text(GROUP, BOB, "@YanRay_Bot   case does not matter")
        await fake.wait_for(lambda: fake.messages(GROUP)[2:] == ["You said: case does not matter"])
        assert await bot.statuses() == {"done": 3}


async def test_text_mention_of_the_bot_counts(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = ScriptedEngine(responder=lambda m: f"Got: {last_user(m)}")
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine):
        text_mention = {"type": "text_mention", "offset": 0, "length": 6, "user": fake.bot_user}
        fake.group_text(GROUP, ALICE, "Yanray, summarise please", entities=[text_mention])
        await fake.wait_for(lambda: fake.messages(GROUP) == ["Got: , summarise please"])


async def test_two_members_of_a_group_keep_separate_histories(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = ScriptedEngine(responder=lambda m: f"{sum(x.role == 'user' for x in m)} user turns")
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine):
        fake.group_text(GROUP, ALICE, "@yanray_bot my secret is 42")
        await fake.wait_for(lambda: len(fake.messages(GROUP)) == 1)
        fake.group_text(GROUP, BOB, "@yanray_bot what is the secret?")
        await fake.wait_for(lambda: len(fake.messages(GROUP)) == 2)
        bob_prompt = " ".join(m.content for m in engine.prompts[-1])
        assert "42" not in bob_prompt
        assert fake.messages(GROUP) == ["1 user turns", "1 user turns"]


async def test_shared_group_mode_shares_one_history(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = ScriptedEngine(responder=lambda m: f"{sum(x.role == 'user' for x in m)} user turns")
    settings = telegram_settings(fake, make_settings(), telegram_group_mode="shared")
    async with running_bot(fake, settings, engine):
        fake.group_text(GROUP, ALICE, "@yanray_bot my secret is 42")
        await fake.wait_for(lambda: len(fake.messages(GROUP)) == 1)
        fake.group_text(GROUP, BOB, "@yanray_bot what is the secret?")
        await fake.wait_for(lambda: len(fake.messages(GROUP)) == 2)
        assert "my secret is 42" in [m.content for m in engine.prompts[-1]]
        assert fake.messages(GROUP)[1] == "2 user turns"


async def test_help_and_the_menu_follow_each_users_telegram_language(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    zh = translator("zh")
    async with running_bot(fake, telegram_settings(fake, make_settings()), ScriptedEngine(["ok"])):
        # the menu in English for everyone, and in Chinese for Chinese Telegram apps
        assert set(fake.menus) == {"", "zh"}
        assert [(c["command"], c["description"]) for c in fake.menus[""]] == COMMANDS
        assert [(c["command"], c["description"]) for c in fake.menus["zh"]] == [
            (name, zh.gettext(about)) for name, about in COMMANDS
        ]
        assert fake.menus["zh"][0]["description"] == "我能做什么，以及怎么用我"
        fake.private_text(ALICE, "/help", language_code="zh-hans")
        fake.private_text(BOB, "/help", language_code="en")
        await fake.wait_for(lambda: fake.messages(ALICE) and fake.messages(BOB))
        assert fake.messages(ALICE) == [zh.gettext(HELP)]
        assert fake.messages(ALICE)[0].startswith("我是 Yanray")
        assert fake.messages(BOB) == [HELP]


async def test_commands_are_in_the_menu_and_work_with_the_bot_name(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = ScriptedEngine(["First answer."])
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine):
        assert [c["command"] for c in fake.commands] == [name for name, _ in COMMANDS]
        fake.private_text(ALICE, "/help")
        await fake.wait_for(lambda: fake.messages(ALICE))
        assert fake.messages(ALICE) == [HELP]

        fake.group_text(GROUP, ALICE, "@yanray_bot hello")
        await fake.wait_for(lambda: len(fake.messages(GROUP)) == 1)
        fake.group_text(GROUP, ALICE, "/help@other_bot")
        fake.group_text(GROUP, ALICE, "/reset@yanray_bot")
        await fake.wait_for(lambda: len(fake.messages(GROUP)) == 2)
        assert fake.messages(GROUP)[1].startswith("Fresh start")
        fake.group_text(GROUP, ALICE, "/history")
        await fake.wait_for(lambda: len(fake.messages(GROUP)) == 3)
        assert fake.messages(GROUP)[2] == "Our conversation is empty."
        assert len(engine.prompts) == 1


async def test_non_text_messages_get_a_short_note_and_captions_count(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = ScriptedEngine(responder=lambda m: f"About: {last_user(m)}")
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine):
        fake.sticker(ALICE, ALICE)
        await fake.wait_for(lambda: fake.messages(ALICE))
        fake.photo(ALICE, ALICE)
        await fake.wait_for(lambda: len(fake.messages(ALICE)) == 2)
        assert fake.messages(ALICE) == [NON_TEXT_NOTE, NON_TEXT_NOTE]
        fake.photo(ALICE, ALICE, caption="what is this bird?")
        await fake.wait_for(lambda: len(fake.messages(ALICE)) == 3)
        assert fake.messages(ALICE)[2] == "About: what is this bird?"

        fake.sticker(GROUP, BOB)  # not addressed to the bot: ignored
        fake.photo(GROUP, BOB, caption="@yanray_bot look")
        await fake.wait_for(lambda: fake.messages(GROUP) == ["About: look"])
        assert len(engine.prompts) == 2


async def test_queue_position_notice_becomes_the_answer(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    release = asyncio.Event()

    async def hold() -> None:
        await release.wait()

    engine = ScriptedEngine(responder=lambda m: f"Answer to {last_user(m)}")
    engine.before_reply = hold  # type: ignore[assignment]
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine):
        fake.private_text(ALICE, "first")
        await fake.wait_for(lambda: engine.prompts)
        fake.private_text(BOB, "second")
        await fake.wait_for(lambda: fake.messages(BOB))
        assert fake.messages(BOB)[0].startswith("⏳ You're next")
        release.set()
        await fake.wait_for(lambda: fake.messages(BOB) == ["Answer to second"])
        assert fake.messages(ALICE) == ["Answer to first"]
        assert len(fake.bot_messages(BOB)) == 1, "the notice itself was edited into the answer"
        assert fake.calls_of("sendChatAction", BOB)


async def test_editing_the_last_message_regenerates_and_edits_the_reply(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = ScriptedEngine(responder=lambda m: f"Answer to {last_user(m)}")
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine) as bot:
        first = fake.private_text(ALICE, "what is 2+2?")
        await fake.wait_for(lambda: fake.messages(ALICE) == ["Answer to what is 2+2?"])
        second = fake.private_text(ALICE, "and 3+3?")
        await fake.wait_for(lambda: len(fake.messages(ALICE)) == 2)

        fake.edit(ALICE, first, "what is 5+5?")  # not the latest question: ignored
        fake.edit(ALICE, second, "and 4+4?")
        await fake.wait_for(lambda: fake.messages(ALICE)[-1] == "Answer to and 4+4?")
        await bot.settled()
        assert fake.messages(ALICE) == ["Answer to what is 2+2?", "Answer to and 4+4?"]
        history = fake.bot_messages(ALICE)[1].history
        assert history[0] == "Answer to and 3+3?" and history[-1] == "Answer to and 4+4?"
        users = [m.content for m in engine.prompts[-1] if m.role == "user"]
        assert users == ["what is 2+2?", "and 4+4?"]
        assert len(engine.prompts) == 3


async def test_editing_while_the_answer_streams_replaces_it(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = ScriptedEngine(responder=lambda m: f"Long answer to {last_user(m)}. " * 5, delay=0.02)
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine) as bot:
        asked = fake.group_text(GROUP, ALICE, "@yanray_bot tell me about cats")
        await fake.wait_for(lambda: fake.messages(GROUP))
        fake.edit(GROUP, asked, "@yanray_bot tell me about dogs")
        expected = ("Long answer to tell me about dogs. " * 5).strip()
        await fake.wait_for(lambda: fake.messages(GROUP) == [expected], within=3)
        await bot.settled()
        assert fake.messages(GROUP) == [expected]
        assert len(fake.bot_messages(GROUP)) == 1, "the new answer took over the old one's message"


async def test_a_crash_between_accept_and_answer_is_answered_once_after_restart(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    settings = telegram_settings(fake, make_settings())
    stuck = ScriptedEngine(["never"])
    stuck.before_reply = lambda: asyncio.get_running_loop().create_future()  # type: ignore[assignment]
    async with running_bot(fake, settings, stuck) as bot:
        fake.group_text(GROUP, ALICE, "@yanray_bot are you there?")
        await fake.wait_for(lambda: stuck.prompts)
        assert await bot.statuses() == {"running": 1}
    assert fake.messages(GROUP) == []

    engine = ScriptedEngine(["Yes, back again."])
    async with running_bot(fake, settings, engine) as bot:
        await fake.wait_for(lambda: fake.messages(GROUP))
        await bot.settled()
        assert fake.messages(GROUP) == ["Yes, back again."]
        assert fake.bot_messages(GROUP)[0].reply_to is not None
        assert await bot.statuses() == {"done": 1}
    async with running_bot(fake, settings, engine) as bot:
        await bot.settled()
        assert fake.messages(GROUP) == ["Yes, back again."], "answered once"


async def test_an_answer_finished_after_shutdown_is_sent_at_the_next_start(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    settings = telegram_settings(fake, make_settings())
    release = asyncio.Event()

    async def hold() -> None:
        await release.wait()

    engine = ScriptedEngine(["Written during shutdown."])
    engine.before_reply = hold  # type: ignore[assignment]
    async with running_bot(fake, settings, engine) as bot:
        fake.private_text(ALICE, "slow question")
        await fake.wait_for(lambda: engine.prompts)
        await bot.adapter.stop()  # SIGTERM: no more updates, the engine still finishes
        release.set()
        await bot.core.wait_idle()
        assert fake.messages(ALICE) == []
        assert await bot.statuses() == {"done": 1}
    async with running_bot(fake, settings, ScriptedEngine(["not used"])) as bot:
        await fake.wait_for(lambda: fake.messages(ALICE))
        await bot.settled()
        assert fake.messages(ALICE) == ["Written during shutdown."]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_webhook_mode_takes_updates_with_the_secret(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    port = _free_port()
    settings = telegram_settings(
        fake,
        make_settings(),
        telegram_webhook_url=f"http://127.0.0.1:{port}/yanray/hook",
        telegram_webhook_listen="127.0.0.1",
        telegram_webhook_port=port,
        telegram_webhook_secret="s3cret",
    )
    engine = ScriptedEngine(["Hello from the webhook."])
    async with running_bot(fake, settings, engine):
        assert fake.webhook_url == settings.telegram_webhook_url
        update: dict[str, Any] = {
            "update_id": 1,
            "message": {
                "message_id": 5,
                "date": 0,
                "chat": {"id": ALICE, "type": "private"},
                "from": {"id": ALICE, "is_bot": False, "first_name": "Alice"},
                "text": "hi",
            },
        }
        async with aiohttp.ClientSession() as http:
            url = settings.telegram_webhook_url
            async with http.post(
                url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "wrong"}
            ) as rsp:
                assert rsp.status == 403
            async with http.post(
                url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "s3cret"}
            ) as rsp:
                assert rsp.status == 200
        await fake.wait_for(lambda: fake.messages(ALICE))
        assert fake.messages(ALICE) == ["Hello from the webhook."]
        assert not fake.calls_of("getUpdates")


async def test_a_stopped_or_failed_answer_keeps_what_was_written(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = ScriptedEngine(responder=lambda m: "A long answer, " * 60, delay=0.02, piece=8)
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine) as bot:
        fake.group_text(GROUP, ALICE, "@yanray_bot talk to me")
        await fake.wait_for(lambda: fake.messages(GROUP))  # a partial answer is showing
        partial = fake.messages(GROUP)[0]
        fake.group_text(GROUP, ALICE, "/stop")
        await fake.wait_for(lambda: fake.messages(GROUP)[0].endswith("[Stopped.]"))
        await bot.settled()
        answer, told = fake.messages(GROUP)
        kept = answer.removesuffix("\n\n[Stopped.]")
        assert kept.startswith(partial) and ("A long answer, " * 60).startswith(kept)
        assert told == "Stopped."

        engine.responder = lambda m: "Half an answer."
        engine.fail_after = "The model server went away."
        fake.private_text(BOB, "try again")
        await fake.wait_for(lambda: fake.messages(BOB))
        assert fake.messages(BOB) == ["Half an answer.\n\n⚠️ The model server went away."]
