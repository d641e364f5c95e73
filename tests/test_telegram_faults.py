"""Telegram faults and limits: flood control, formatting rejected, long replies, blocked users."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import pytest

from tests.fakes.telegram_harness import running_bot, telegram_settings
from tests.fakes.telegram_server import FakeTelegram
from tests.scripted_engine import ScriptedEngine
from yanray.adapters import telegram
from yanray.adapters.split import join_parts
from yanray.bot.settings import Settings
from yanray.bot.types import Incoming, ReplyStream
from yanray.bot.worker import UNDELIVERABLE

ALICE, BOB = 2001, 2002
GROUP = -200600
STREAMED = " ".join(f"Word{i}." for i in range(60))  # ~480 characters, no Markdown


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Errors logged by Yanray or PTB (the storage layer's shutdown noise is not under test here)."""
    return [
        r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith(("yanray", "telegram"))
    ]


async def test_flood_control_while_streaming_still_delivers_the_whole_reply(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = ScriptedEngine([STREAMED], delay=0.01, piece=8)
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine):
        fake.fail("editMessageText", "flood", retry_after=1)
        fake.group_text(GROUP, ALICE, "@yanray_bot count for me")
        await fake.wait_for(lambda: fake.messages(GROUP) == [STREAMED], within=8)
        edits = fake.calls_of("editMessageText", GROUP)
        flooded = [i for i, call in enumerate(edits) if call.error and "Too Many Requests" in call.error]
        assert len(flooded) == 1
        assert edits[flooded[0] + 1].at - edits[flooded[0]].at >= 0.95, "waited retry_after before retrying"

        fake.fail("sendMessage", "flood", retry_after=1)
        fake.private_text(BOB, "and for me")
        await fake.wait_for(lambda: fake.messages(BOB) == [STREAMED], within=8)
        assert len(fake.bot_messages(BOB)) == 1


async def test_formatting_rejected_by_telegram_is_sent_plain(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    reply = "Use **bold** with <care> & `code`."
    engine = ScriptedEngine([reply])
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine):
        fake.fail("sendMessage", "parse")
        fake.private_text(ALICE, "format something")
        await fake.wait_for(lambda: fake.messages(ALICE))
        assert fake.messages(ALICE) == [reply]
        assert fake.bot_messages(ALICE)[0].parse_mode is None
        fake.private_text(ALICE, "again")
        await fake.wait_for(lambda: len(fake.messages(ALICE)) == 2)
        assert fake.messages(ALICE)[1] == "Use bold with <care> & code."


async def test_a_9000_character_reply_arrives_as_3_messages_in_order(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    paragraph = " ".join(f"Sentence {i} says that 1 < 2 & 3 > 2." for i in range(30))
    reply = "\n\n".join(f"{n}. {paragraph}" for n in range(8))
    assert 8800 < len(reply) < 9300
    engine = ScriptedEngine([reply], piece=300)
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine):
        fake.private_text(ALICE, "write a lot")
        await fake.wait_for(lambda: len(fake.messages(ALICE)) == 3)
        parts = fake.messages(ALICE)
        assert "".join(parts) == reply
        assert all(len(part) <= 4096 for part in parts)
        assert all(part.endswith("\n\n") for part in parts[:-1]), "split on paragraphs"
        assert all(len(draft) <= 4096 for draft in fake.drafts_of(ALICE))


async def test_a_long_code_block_is_split_into_valid_messages(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    code = "\n".join(f"print('line {i}' if {i} < 10 else '&')" for i in range(250))
    reply = f"Here you go:\n\n```python\n{code}\n```\n\nDone."
    engine = ScriptedEngine([reply], piece=500)
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine):
        fake.private_text(ALICE, "code please")
        await fake.wait_for(lambda: fake.messages(ALICE) and fake.messages(ALICE)[-1].endswith("Done."))
        sent = fake.bot_messages(ALICE)
        assert len(sent) >= 3
        assert all(m.parse_mode == "HTML" and '<pre><code class="language-python">' in m.text for m in sent)
        assert join_parts([m.visible for m in sent]).count("print(") == 250


async def test_group_edits_stay_within_the_edit_interval(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = ScriptedEngine([STREAMED], delay=0.02, piece=8)
    settings = telegram_settings(fake, make_settings(), telegram_edit_interval=0.2)
    async with running_bot(fake, settings, engine):
        fake.group_text(GROUP, ALICE, "@yanray_bot go")
        fake.group_text(GROUP, BOB, "@yanray_bot me too")
        await fake.wait_for(lambda: fake.messages(GROUP) == [STREAMED, STREAMED], within=10)
        writes = sorted(
            call.at
            for call in fake.calls
            if call.method in ("sendMessage", "editMessageText") and call.params.get("chat_id") == GROUP
        )
        assert len(writes) >= 6, "the answers were streamed"
        gaps = [b - a for a, b in zip(writes, writes[1:], strict=False)]
        # times are taken where the fake receives the calls, so allow for network jitter per call
        assert min(gaps) >= 0.15
        assert (writes[-1] - writes[0]) / len(gaps) >= 0.19


async def test_message_not_modified_is_ignored(
    fake: FakeTelegram, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    engine = ScriptedEngine([STREAMED], delay=0.01, piece=16)
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine) as bot:
        fake.fail("editMessageText", "not_modified", times=2)
        fake.group_text(GROUP, ALICE, "@yanray_bot go")
        await fake.wait_for(lambda: fake.messages(GROUP) == [STREAMED], within=8)
        # a preview can show the whole text before the final write: wait for that too, or the
        # adapter stops under it
        await asyncio.wait_for(bot.core.wait_idle(), 8)
        assert sum(1 for c in fake.calls_of("editMessageText") if c.error) == 2
    assert not errors(caplog)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("yanray")]


async def test_network_and_server_errors_are_retried(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = ScriptedEngine(["Still here."])
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine):
        fake.fail("sendMessage", "server", times=2)
        fake.fail("sendMessage", "bad_gateway")
        fake.private_text(ALICE, "hello?")
        await fake.wait_for(lambda: fake.messages(ALICE))
        assert fake.messages(ALICE) == ["Still here."]
        assert len(fake.calls_of("sendMessage", ALICE)) == 4


async def test_a_user_who_blocked_the_bot_is_not_retried(
    fake: FakeTelegram, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    engine = ScriptedEngine(["An answer."], delay=0.01)
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine) as bot:
        fake.block(ALICE)
        fake.private_text(ALICE, "hi")
        fake.private_text(BOB, "hi")
        await fake.wait_for(lambda: fake.messages(BOB) == ["An answer."])
        await fake.wait_for(lambda: bot.core.queue.running is None and not len(bot.core.queue))
        refused = [c for c in fake.calls if c.params.get("chat_id") == ALICE]
        assert 1 <= len(refused) <= 2 and all("blocked" in (c.error or "") for c in refused)
        assert ALICE in bot.adapter.ctx.blocked
        assert (await bot.statuses()) == {"done": 2}

        fake.blocked.discard(ALICE)  # unblocked, and writes again
        fake.private_text(ALICE, "sorry, back")
        await fake.wait_for(lambda: fake.messages(ALICE) == ["An answer."])
    assert not errors(caplog)


async def test_an_unexpected_telegram_error_is_logged_once_and_the_user_gets_an_apology(
    fake: FakeTelegram, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    engine = ScriptedEngine(["This will not arrive."])
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine):
        fake.fail("sendMessage", "bad_request")
        fake.private_text(ALICE, "hello")
        await fake.wait_for(lambda: fake.messages(ALICE))
        assert fake.messages(ALICE) == [UNDELIVERABLE]
    logged = errors(caplog)
    assert len(logged) == 1 and logged[0].exc_info is not None


async def test_a_failing_handler_reaches_the_error_handler_once(
    fake: FakeTelegram, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    engine = ScriptedEngine(["unused"])
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine) as bot:

        async def broken(incoming: Incoming, out: ReplyStream) -> None:
            raise RuntimeError("a bug")

        bot.adapter.dispatcher.handle = broken  # type: ignore[method-assign]
        fake.private_text(ALICE, "hello")
        await fake.wait_for(lambda: fake.messages(ALICE))
        assert fake.messages(ALICE) == [telegram.APOLOGY]
    logged = errors(caplog)
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "a bug" in str(logged[0].exc_info[1])
