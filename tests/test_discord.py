"""Discord end to end: the real discord.py client against the local fake Discord, the real core
(temporary SQLite, queue, worker) and a scripted engine.

What a user sees is read from the fake: the bot's messages in a channel, with each
create/edit time, and every REST body (allowed_mentions) the bot sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fakes.discord_server import FakeDiscord
from tests.scripted_engine import ScriptedEngine
from yanray.adapters.discord import APOLOGY, REFUSAL, DiscordAdapter
from yanray.adapters.split import join_parts
from yanray.bot.app import Core
from yanray.bot.dispatcher import COMMANDS
from yanray.bot.i18n import translator
from yanray.bot.types import Adapter, Incoming, ReplyStream
from yanray.storage import crud

pytestmark = pytest.mark.asyncio

INTERVAL = 0.05


@dataclass
class Bot:
    fake: FakeDiscord
    core: Core
    adapter: DiscordAdapter
    engine: ScriptedEngine

    def mention(self, text: str) -> str:
        return f"<@{self.fake.bot_id}> {text}"

    async def ask(
        self, text: str, *, user: dict[str, Any] | None = None, channel: str | None = None, **kw: Any
    ) -> str:
        fake = self.fake
        kw.setdefault("mentions", [fake.bot])
        return await fake.user_message(
            channel or fake.channel_id, user or fake.alice, self.mention(text), **kw
        )

    async def answer(self, mid: str, timeout: float = 5.0) -> str:
        """The visible answer to message `mid` once the core has delivered it."""
        await asyncio.wait_for(self.core.wait_idle(), timeout)
        await self.fake.wait_for(lambda: self.fake.replies_to(mid), timeout)
        await self.settle()
        return join_parts([m.content for m in self.fake.replies_to(mid)])

    async def settle(self) -> None:
        """Until nothing is queued or answered and every stream has shown its last word."""
        await asyncio.wait_for(self.core.wait_idle(), 5)
        await self.fake.wait_for(self.adapter.ctx.settled)


async def undelivered(core: Core) -> int:
    """Requests still waiting, being answered, or answered but not yet delivered."""
    async with core.db.transaction() as session:
        return len(list(await crud.pending_requests(session=session)))


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@pytest.fixture
async def make_bot(fake: FakeDiscord, make_settings, core_factory) -> AsyncIterator[Callable[..., Any]]:
    adapters: list[DiscordAdapter] = []

    async def make(
        replies: Any = ("Hello!",), *, engine: ScriptedEngine | None = None, **overrides: Any
    ) -> Bot:
        values: dict[str, Any] = {
            "discord_token": fake.token,
            "discord_api_base": fake.api_base,
            "discord_gateway_url": fake.gateway_url,
            "discord_edit_interval": INTERVAL,
            "tools": [],
            "max_new_tokens": 4000,
        }
        values.update(overrides)
        settings = make_settings(**values)
        engine = engine or ScriptedEngine(list(replies), piece=20)
        core = await core_factory(settings, engine, start=False)
        adapter = DiscordAdapter(
            settings=settings, dispatcher=core.dispatcher, guild_ready_timeout=0.01, retry_delays=(0.01, 0.02)
        )
        adapters.append(adapter)
        core.add_adapter(adapter)
        await adapter.start()
        await core.start()
        return Bot(fake, core, adapter, engine)

    yield make
    for adapter in adapters:
        await adapter.stop()


async def test_mention_is_answered_as_a_reply_without_the_mention(make_bot) -> None:
    bot = await make_bot(["Hi Alice!"])
    mid = await bot.ask("hello there")
    assert await bot.answer(mid) == "Hi Alice!"
    assert bot.engine.prompts[0][-1].content == "hello there"
    assert bot.fake.replies_to(mid)[0].reply_to == mid
    assert isinstance(bot.adapter, Adapter)
    assert isinstance(bot.adapter.reopen({"channel_id": bot.fake.channel_id, "message_id": mid}), ReplyStream)


async def test_everyone_and_role_mentions_alone_are_ignored(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["nope"])
    await fake.user_message(fake.channel_id, fake.alice, "@everyone lunch?", mention_everyone=True)
    await fake.user_message(
        fake.channel_id, fake.alice, f"<@&{fake.role_id}> ping", mention_roles=[fake.role_id]
    )
    await fake.user_message(fake.channel_id, fake.alice, "just chatting")
    # a DM after them is answered: the gateway delivered the three before it
    dm = await fake.user_message("9" + fake.channel_id[1:], fake.bob, "and me?")
    assert await bot.answer(dm) == "nope"
    assert fake.bot_messages(fake.channel_id) == []
    assert [m[-1].content for m in bot.engine.prompts] == ["and me?"]


async def test_reply_to_the_bot_and_dm_are_answered(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["First.", "Second.", "Third."])
    first = await bot.ask("one")
    assert await bot.answer(first) == "First."
    reply = fake.replies_to(first)[0]
    # a reply to Yanray without pinging it (the content is readable: the fake plays a bot
    # with message content)
    second = await fake.user_message(fake.channel_id, fake.alice, "and two?", reply_to=reply.id)
    assert await bot.answer(second) == "Second."
    dm = "9" + fake.channel_id[1:]
    third = await fake.user_message(dm, fake.bob, "a private question")
    assert await bot.answer(third) == "Third."
    assert bot.engine.prompts[2][-1].content == "a private question"


async def test_two_users_in_one_channel_keep_separate_histories(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["Noted.", "I don't know yet."])
    await bot.answer(await bot.ask("my name is Alice"))
    await bot.answer(await bot.ask("what is my name?", user=fake.bob))
    seen_by_bob = [m.content for m in bot.engine.prompts[1]]
    assert "what is my name?" in seen_by_bob
    assert not any("Alice" in text for text in seen_by_bob)


async def test_shared_channel_mode_shares_one_conversation(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["Noted.", "You said Alice."], discord_channel_mode="shared")
    await bot.answer(await bot.ask("my name is Alice"))
    await bot.answer(await bot.ask("what did she say?", user=fake.bob))
    assert "my name is Alice" in [m.content for m in bot.engine.prompts[1]]


def long_reply_with_code() -> str:
    prose = " ".join(f"Sentence number {i} explains one more detail of the answer." for i in range(24))
    code = "\n".join(f"    total += compute_value({i}, scale=2)  # step {i}" for i in range(32))
    tail = " ".join(f"Afterwards, point {i} sums up what the code does." for i in range(40))
    reply = f"{prose}\n\n```python\ndef run():\n    total = 0\n{code}\n    return total\n```\n\n{tail}"
    assert 4800 <= len(reply) <= 5200
    return reply


async def test_long_reply_arrives_as_three_messages_with_the_code_block_intact(make_bot, fake) -> None:
    reply = long_reply_with_code()
    bot = await make_bot([reply])
    mid = await bot.ask("show me the code")
    assert await bot.answer(mid) == reply
    parts = [m.content for m in fake.replies_to(mid)]
    assert len(parts) == 3
    assert all(len(p) <= 2000 for p in parts)
    block = reply[reply.index("```python") : reply.index("```\n\n") + 3]
    assert sum(block in p for p in parts) == 1
    assert all(p.count("```") % 2 == 0 for p in parts)


async def test_no_reply_can_ping_anyone(make_bot, fake: FakeDiscord) -> None:
    reply = f"@everyone @here <@&{fake.role_id}> <@{fake.bob['id']}> look! " + "more " * 500 + "end"
    bot = await make_bot([reply])
    mid = await bot.ask("ping everyone please")
    assert await bot.answer(mid) == reply
    writes = [c for c in fake.writes() if "content" in c.body]
    assert len(writes) >= 2
    assert all(c.body["allowed_mentions"] == {"parse": []} for c in writes)


async def test_streaming_edits_respect_the_interval(make_bot, fake: FakeDiscord) -> None:
    interval = 0.2
    engine = ScriptedEngine(["word " * 120 + "end"], piece=5, delay=0.01)
    bot = await make_bot(engine=engine, discord_edit_interval=interval)
    mid = await bot.ask("tell me a long story")
    assert await bot.answer(mid) == "word " * 120 + "end"
    (message,) = fake.replies_to(mid)
    times = [t for t, _ in message.history]
    assert len(times) >= 3  # it streamed: created, edited, finished
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= interval - 0.01
    assert any(c.path.endswith("/typing") for c in fake.calls)


async def test_rate_limit_is_waited_out(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["After the wait."])
    fake.fail("POST", r"^/channels/\d+/messages$", 429, retry_after=0.1)
    mid = await bot.ask("hello")
    assert await bot.answer(mid) == "After the wait."
    posts = [c for c in fake.calls if c.method == "POST" and c.path.endswith("/messages")]
    assert len(posts) == 2 and posts[1].at - posts[0].at >= 0.1


async def test_server_errors_and_cloudflare_429_are_retried(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["Made it."])
    fake.fail("POST", r"^/channels/\d+/messages$", 503)
    fake.fail("POST", r"^/channels/\d+/messages$", 429, via=False)  # no Via: discord.py gives up
    mid = await bot.ask("hello")
    assert await bot.answer(mid) == "Made it."
    assert sum(1 for m in fake.bot_messages()) == 1


async def test_forbidden_channel_is_logged_once_and_skipped(make_bot, fake: FakeDiscord, caplog) -> None:
    bot = await make_bot(["Answer one.", "Answer two.", "Answer three."])
    fake.forbid_channel(fake.other_channel_id)
    await bot.ask("first", channel=fake.other_channel_id)
    await bot.ask("second", channel=fake.other_channel_id)
    await fake.wait_for(lambda: len(bot.engine.prompts) == 2)
    await bot.settle()
    assert fake.bot_messages() == []
    assert await undelivered(bot.core) == 0, "a forbidden channel's answers count as delivered"
    warnings = [r for r in caplog.records if "no permission" in r.getMessage()]
    assert len(warnings) == 1
    mid = await bot.ask("still there?")
    assert await bot.answer(mid) == "Answer three."


async def test_slash_ask_is_deferred_then_answered(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["Slash answer."])
    iid = await fake.slash("ask", fake.alice, [{"name": "question", "type": 3, "value": "what is up?"}])
    await fake.wait_for(lambda: bot.engine.prompts)
    await bot.settle()
    calls = [c for c in fake.calls if f"/{iid}/" in c.path or f"tok-{iid}" in c.path]
    assert calls[0].path.endswith("/callback") and calls[0].body["type"] == 5  # deferred
    assert calls[0].query.get("with_response") in ("1", "true", "True")
    assert fake.interaction_response(iid).content == "Slash answer."
    assert bot.engine.prompts[0][-1].content == "what is up?"


async def test_slash_reset_forgets_the_conversation(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["Noted.", "Who are you?"])
    await bot.answer(await bot.ask("my name is Alice"))
    iid = await fake.slash("reset", fake.alice)
    await fake.wait_for(lambda: "Fresh start" in getattr(fake.interaction_response(iid), "content", ""))
    await bot.answer(await bot.ask("what is my name?"))
    assert not any("Alice" in m.content for m in bot.engine.prompts[1])


async def test_a_slash_command_is_answered_in_the_interactions_locale(make_bot, fake: FakeDiscord) -> None:
    await make_bot(["Noted."])
    iid = await fake.slash("reset", fake.alice, locale="zh-CN")
    # the deferred response exists (empty) before the answer edits it in
    await fake.wait_for(lambda: getattr(fake.interaction_response(iid), "content", ""))
    assert fake.interaction_response(iid).content == "重新开始：之前的消息已经放到一边了（仍然保存着）。"
    iid = await fake.slash("reset", fake.bob)  # an English Discord app
    await fake.wait_for(lambda: getattr(fake.interaction_response(iid), "content", ""))
    assert fake.interaction_response(iid).content.startswith("Fresh start")


async def test_slash_command_descriptions_are_localized(make_bot, fake: FakeDiscord) -> None:
    await make_bot(["unused"])
    synced = {c["name"]: c for c in fake.commands}
    assert set(synced) == {"ask", "reset", "stop", "retry", "history", "system", "lang", "share"}
    for name, about in COMMANDS:
        if name == "help":
            continue  # Discord lists the commands itself
        assert synced[name]["description"] == about
        chinese = translator("zh").gettext(about)
        assert synced[name]["description_localizations"] == {"zh-CN": chinese, "zh-TW": chinese}
    assert synced["ask"]["description_localizations"]["zh-CN"] == "向 Yanray 提问"
    (question,) = synced["ask"]["options"]
    assert question["name"] == "question", "names are not translated"
    assert question["description_localizations"]["zh-CN"] == "你想问的问题"


async def test_a_servers_preferred_locale_is_the_language_of_mentions(make_bot, fake: FakeDiscord) -> None:
    fake.guild_locale = "zh-CN"
    bot = await make_bot(["unused"])
    mid = await bot.ask("/history")
    assert await bot.answer(mid) == "我们的对话还是空的。"


async def test_edited_question_regenerates_the_same_reply(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["Paris is in Germany.", "Paris is in France."])
    mid = await bot.ask("where is Paris?")
    assert await bot.answer(mid) == "Paris is in Germany."
    await fake.edit_user_message(
        mid, f"<@{fake.bot_id}> where is Paris, the French city?", mentions=[fake.bot]
    )
    await fake.wait_for(lambda: fake.replies_to(mid)[0].content == "Paris is in France.")
    await bot.settle()
    assert [m.content for m in fake.replies_to(mid)] == ["Paris is in France."]
    assert bot.engine.prompts[1][-1].content == "where is Paris, the French city?"


async def test_queue_position_is_shown_and_becomes_the_answer(make_bot, fake: FakeDiscord) -> None:
    slow = "slow " * 40 + "end"
    engine = ScriptedEngine(
        responder=lambda m: slow if m[-1].content == "long one" else "Your turn now.", piece=5, delay=0.01
    )
    bot = await make_bot(engine=engine)
    first = await bot.ask("long one")
    await fake.wait_for(lambda: bot.core.queue.running is not None)
    second = await bot.ask("quick one", user=fake.bob)
    assert await bot.answer(second) == "Your turn now."
    (reply,) = fake.replies_to(second)
    assert reply.history[0][1].startswith("⏳")
    assert await bot.answer(first) == slow


async def test_outside_the_allowed_channels_one_polite_refusal(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["In the right place."], discord_allowed_channels=[fake.other_channel_id])
    await bot.ask("hello?")
    await bot.ask("hello??")
    await fake.wait_for(lambda: fake.bot_messages(fake.channel_id))
    await bot.settle()
    assert [m.content for m in fake.bot_messages()] == [REFUSAL]
    mid = await bot.ask("here then", channel=fake.other_channel_id)
    assert await bot.answer(mid) == "In the right place."


async def test_role_allowlist(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["For helpers."], discord_allowed_roles=[fake.role_id])
    alice = await bot.ask("I have the role")
    assert await bot.answer(alice) == "For helpers."
    bob = await bot.ask("I don't", user=fake.bob)
    assert await bot.answer(bob) == REFUSAL


async def test_attachment_without_text_gets_a_note(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["unused"])
    attachment = {
        "id": "1",
        "filename": "cat.png",
        "size": 10,
        "url": "https://x/cat.png",
        "proxy_url": "https://x/cat.png",
        "content_type": "image/png",
    }
    mid = await fake.user_message(
        fake.channel_id, fake.alice, f"<@{fake.bot_id}>", mentions=[fake.bot], attachments=[attachment]
    )
    assert "only read text" in await bot.answer(mid)
    assert bot.engine.prompts == []


async def test_gateway_drop_resumes_and_loses_nothing(make_bot, fake: FakeDiscord) -> None:
    fake.resume_url = "ws://127.0.0.1:9/elsewhere"  # nothing listens there
    bot = await make_bot(["Still here."])
    await fake.drop_gateway()
    mid = await bot.ask("are you there?")  # sent while the client is reconnecting
    assert await bot.answer(mid) == "Still here."
    assert fake.resumes == 1 and len(fake.identifies) == 1
    assert not fake.identifies[0]["intents"] & (1 << 15)  # no privileged message content intent


async def test_restart_mid_reply_answers_once(fake: FakeDiscord, make_settings, core_factory) -> None:
    reply = "part " * 200 + "end"
    settings = make_settings(
        discord_token=fake.token,
        discord_api_base=fake.api_base,
        discord_gateway_url=fake.gateway_url,
        discord_edit_interval=INTERVAL,
        tools=[],
        max_new_tokens=4000,
    )

    async def run(engine: ScriptedEngine) -> tuple[Core, DiscordAdapter]:
        core = await core_factory(settings, engine, start=False)
        adapter = DiscordAdapter(settings=settings, dispatcher=core.dispatcher, guild_ready_timeout=0.01)
        core.add_adapter(adapter)
        await adapter.start()
        await core.start()
        return core, adapter

    core, adapter = await run(ScriptedEngine([reply], piece=5, delay=0.01))
    mid = await fake.user_message(
        fake.channel_id, fake.alice, f"<@{fake.bot_id}> write a lot", mentions=[fake.bot]
    )
    await fake.wait_for(lambda: fake.replies_to(mid) and len(fake.replies_to(mid)[0].content) > 50)
    await adapter.stop()
    await core.aclose()
    partial = fake.replies_to(mid)[0].content
    assert partial != reply

    core, adapter = await run(ScriptedEngine([reply], piece=50))
    try:
        await asyncio.wait_for(core.wait_idle(), 5)
        await fake.wait_for(lambda: fake.replies_to(mid) and fake.replies_to(mid)[0].content == reply)
        await fake.wait_for(adapter.ctx.settled)
        assert [m.content for m in fake.replies_to(mid)] == [reply]
        assert len(fake.bot_messages()) == 1
    finally:
        await adapter.stop()


async def test_bad_token_stops_start_up_with_one_clear_line(
    fake: FakeDiscord, make_settings, core_factory
) -> None:
    settings = make_settings(
        discord_token="wrong", discord_api_base=fake.api_base, discord_gateway_url=fake.gateway_url
    )
    core = await core_factory(settings, ScriptedEngine(), start=False)
    adapter = DiscordAdapter(settings=settings, dispatcher=core.dispatcher)
    with pytest.raises(Exception, match="YANRAY_DISCORD_TOKEN was rejected"):
        await adapter.start()


async def test_message_content_intent_only_when_enabled(make_bot, fake: FakeDiscord) -> None:
    await make_bot(discord_message_content=True)
    assert fake.identifies[0]["intents"] & (1 << 15)


async def test_thread_counts_as_its_parent_channel(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["In the thread."], discord_allowed_channels=[fake.channel_id])
    mid = await bot.ask("a question in a thread", channel=fake.thread_id)
    assert await bot.answer(mid) == "In the thread."


async def test_slash_ask_in_a_dm_and_after_the_token_expired(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["Private answer."])
    dm = "8" + fake.channel_id[1:]
    fake.fail("PATCH", r"^/webhooks/\d+/[^/]+/messages/@original$", 401, code=50027)
    await fake.slash("ask", fake.bob, [{"name": "question", "type": 3, "value": "psst"}], channel_id=dm)
    await fake.wait_for(lambda: [m for m in fake.bot_messages(dm) if m.content == "Private answer."])
    assert bot.engine.prompts[0][-1].content == "psst"


async def test_edit_while_answering_replaces_the_answer(make_bot, fake: FakeDiscord) -> None:
    first = "old " * 60 + "end"
    engine = ScriptedEngine(
        responder=lambda m: first if "old" in m[-1].content else "The new answer.", piece=5, delay=0.01
    )
    bot = await make_bot(engine=engine)
    mid = await bot.ask("the old question")
    await fake.wait_for(lambda: fake.replies_to(mid))
    await fake.edit_user_message(mid, f"<@{fake.bot_id}> the better question", mentions=[fake.bot])
    await fake.wait_for(lambda: fake.replies_to(mid)[0].content == "The new answer.")
    await bot.settle()
    assert [m.content for m in fake.replies_to(mid)] == ["The new answer."]


async def test_a_message_without_author_is_skipped_and_the_connection_stays(
    make_bot, fake: FakeDiscord, caplog
) -> None:
    bot = await make_bot(["Still connected."])
    bad = fake.message_payload(fake.channel_id, fake.alice, f"<@{fake.bot_id}> hi", mentions=[fake.bot])
    del bad["author"]
    await fake.dispatch("MESSAGE_CREATE", bad)
    mid = await bot.ask("are you there?")
    assert await bot.answer(mid) == "Still connected."
    assert len(fake.identifies) == 1 and fake.resumes == 0, "the same connection answered"
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "MESSAGE_CREATE" in skipped[0].getMessage()


async def test_a_lone_surrogate_gets_a_reply(make_bot, fake: FakeDiscord) -> None:
    bot = await make_bot(["Got it."])
    mid = await bot.ask("broken \ud800 text")
    assert await bot.answer(mid) == "Got it."
    assert bot.engine.prompts[0][-1].content == "broken \ufffd text"


async def test_a_connection_that_ends_for_good_is_reported_once(
    fake: FakeDiscord, make_settings, core_factory
) -> None:
    settings = make_settings(
        discord_token=fake.token, discord_api_base=fake.api_base, discord_gateway_url=fake.gateway_url
    )
    core = await core_factory(settings, ScriptedEngine(), start=False)
    reasons: list[str] = []
    adapter = DiscordAdapter(
        settings=settings, dispatcher=core.dispatcher, guild_ready_timeout=0.01, on_fatal=reasons.append
    )
    await adapter.start()
    try:
        await fake.drop_gateway(4004)  # Authentication failed: discord.py does not reconnect
        await fake.wait_for(lambda: reasons)
    finally:
        await adapter.stop()
    assert len(reasons) == 1 and reasons[0].startswith("Discord: the connection ended for good")


async def test_a_failing_message_gets_an_apology(make_bot, fake: FakeDiscord, caplog) -> None:
    bot = await make_bot()

    async def broken(incoming: Incoming, out: ReplyStream) -> None:
        raise RuntimeError("a bug")

    bot.adapter.dispatcher.handle = broken  # type: ignore[method-assign]
    mid = await bot.ask("hello")
    await fake.wait_for(lambda: fake.replies_to(mid))
    assert [m.content for m in fake.replies_to(mid)] == [APOLOGY]
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("yanray")]
    assert len(logged) == 1 and "a bug" in str(logged[0].exc_info[1] if logged[0].exc_info else "")


async def test_an_edit_after_a_restart_edits_the_earlier_answer(make_bot, fake: FakeDiscord) -> None:
    engine = ScriptedEngine(responder=lambda m: f"About {m[-1].content.split()[-1]}.")
    bot = await make_bot(engine=engine)
    mid = await bot.ask("tell me about cats")
    assert await bot.answer(mid) == "About cats."
    (earlier,) = fake.replies_to(mid)
    await bot.adapter.stop()
    await bot.core.aclose()

    bot = await make_bot(engine=engine)
    await fake.edit_user_message(mid, bot.mention("tell me about dogs"), mentions=[fake.bot])
    await fake.wait_for(lambda: fake.replies_to(mid)[0].content == "About dogs.")
    await bot.settle()
    assert [(m.id, m.content) for m in fake.replies_to(mid)] == [(earlier.id, "About dogs.")]


async def test_a_stopped_or_failed_answer_keeps_what_was_written(make_bot, fake: FakeDiscord) -> None:
    engine = ScriptedEngine(responder=lambda m: "A long answer, " * 60, piece=5, delay=0.01)
    bot = await make_bot(engine=engine)
    mid = await bot.ask("talk to me")
    await fake.wait_for(lambda: fake.replies_to(mid))  # a partial answer is showing
    partial = fake.replies_to(mid)[0].content
    stop = await bot.ask("/stop")
    assert await bot.answer(stop) == "Stopped."
    answer = await bot.answer(mid)
    kept = answer.removesuffix("\n\n[Stopped.]")
    assert answer != kept and kept.startswith(partial) and ("A long answer, " * 60).startswith(kept)

    engine.responder = lambda m: "Half an answer."
    engine.fail_after = "The model server went away."
    again = await bot.ask("try again")
    # the partial answer stays, with the reason below it (it used to be replaced by the reason)
    assert await bot.answer(again) == "Half an answer.\n\n⚠️ The model server went away."
