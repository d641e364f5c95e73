"""What people say about Yanray itself, through the real core and a temporary database:
/good and /bad in the terminal, /share, and the admins' /allow and /deny."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from sqlalchemy import select

from tests.recording import RecordingStream
from tests.scripted_engine import ScriptedEngine
from tests.waiting import until
from yanray.adapters.console import ConsoleAdapter
from yanray.bot import people
from yanray.bot.app import Core
from yanray.bot.dispatcher import ADMIN_HELP, help_text
from yanray.bot.i18n import translator
from yanray.bot.people import SHARE_MEANS, thumb
from yanray.bot.types import Incoming
from yanray.storage.models import AccessRule, Rating, ShareConsent

pytestmark = pytest.mark.asyncio


def msg(text: str, *, user: str = "alice", platform: str = "test", language: str | None = None) -> Incoming:
    return Incoming(
        platform=platform,
        chat_id=user,
        user_id=user,
        display_name=user.title(),
        text=text,
        route={"chat": user, "user": user},
        language=language,
    )


async def say(core: Core, text: str, **kw: Any) -> str:
    out = RecordingStream(text)
    await core.dispatcher.handle(msg(text, **kw), out)
    return (await out.wait()) or ""


async def rows(core: Core, model: Any) -> list[Any]:
    async with core.db.reading() as session:
        return list((await session.scalars(select(model))).all())


async def ratings(core: Core) -> list[tuple[int, str, str, int]]:
    return sorted((r.request_id, r.platform, r.user_id, r.value) for r in await rows(core, Rating))


def console(core: Core, lines: str, language: str = "en") -> tuple[ConsoleAdapter, io.StringIO]:
    out = io.StringIO()
    return ConsoleAdapter(
        dispatcher=core.dispatcher, stdin=io.StringIO(lines), stdout=out, language=language
    ), out


async def test_good_and_bad_rate_the_last_answer_in_the_terminal(make_settings, core_factory) -> None:
    core = await core_factory(make_settings(tools=[]), ScriptedEngine(["First answer.", "Second answer."]))
    adapter, out = console(core, "/good\nWhat is 2+2?\n/good\nAnd 3+3?\n/bad\n/good\n")
    await adapter.converse()
    printed = out.getvalue()
    assert printed.startswith("There is no answer to rate yet.")
    assert printed.count("Thanks: you rated my last answer 👍.") == 2
    assert "Thanks: you rated my last answer 👎." in printed
    # the first answer keeps its 👍; the second was 👎 and then 👍: the latest counts
    assert await ratings(core) == [(1, "console", "local", 1), (2, "console", "local", 1)]


async def test_two_people_rating_one_answer_give_two_rows(make_settings, core_factory) -> None:
    core = await core_factory(
        make_settings(tools=[], telegram_group_mode="shared"), ScriptedEngine(["An answer."])
    )
    group = dict(chat_id="g", shared=True, is_private=False, route={"chat": "g"})
    out = RecordingStream()
    await core.dispatcher.handle(
        Incoming(platform="test", user_id="alice", display_name="A", text="hi", **group), out
    )
    await out.wait()
    for user, word in (("alice", "/good"), ("bob", "/bad")):
        answer = RecordingStream()
        await core.dispatcher.handle(
            Incoming(platform="test", user_id=user, display_name=user, text=word, **group), answer
        )
        assert (await answer.wait() or "").startswith("Thanks")
    assert await ratings(core) == [(1, "test", "alice", 1), (1, "test", "bob", -1)]


async def test_share_on_off_and_the_state_in_both_languages(make_settings, core_factory) -> None:
    core = await core_factory(make_settings(tools=[]), ScriptedEngine())
    shown = await say(core, "/share")
    assert shown.startswith("Sharing is off") and translator("en").gettext(SHARE_MEANS) in shown
    assert "cannot forget" in shown and "other people's words" in shown
    assert (await say(core, "/share on")).startswith("Sharing is on")
    assert [(c.platform, c.user_id) for c in await rows(core, ShareConsent)] == [("test", "alice")]
    assert (await say(core, "/share")).startswith("Sharing is on")
    chinese = await say(core, "/share off", user="alice", language="zh-hans")
    assert chinese.startswith(
        translator("zh").gettext("Sharing is off: your conversations are not exported for training.")
    )
    assert (
        translator("zh").gettext(SHARE_MEANS) in chinese
        and translator("zh").gettext(SHARE_MEANS) != SHARE_MEANS
    )
    assert await rows(core, ShareConsent) == []
    assert (await say(core, "/share maybe")).startswith("Usage: /share on")


async def test_share_is_per_person_and_admins_are_told_they_share_anyway(make_settings, core_factory) -> None:
    core = await core_factory(make_settings(tools=[], admins=["test:root"]), ScriptedEngine())
    await say(core, "/share on", user="alice")
    assert (await say(core, "/share", user="bob")).startswith("Sharing is off")
    assert "admins" in await say(core, "/share", user="root")


async def test_deny_refuses_allow_answers_and_both_survive_a_restart(make_settings, core_factory) -> None:
    settings = make_settings(tools=[], admins=["test:root"], allowed_users=["test:alice"])
    engine = ScriptedEngine(["Hello Alice.", "Hello Bob.", "Hello again, Bob."])
    core = await core_factory(settings, engine)
    assert await say(core, "hi", user="alice") == "Hello Alice."
    refused = await say(core, "hi", user="bob")
    assert refused == "Sorry, I only answer people my owner allowed. Your id is test:bob."
    assert await say(core, "/allow test:bob", user="root") == "test:bob may use me now."
    assert await say(core, "hi", user="bob") == "Hello Bob."
    assert await say(core, "/deny test:alice", user="root") == "test:alice may no longer use me."
    assert (await say(core, "are you there?", user="alice")).startswith("Sorry, I only answer people")
    assert len(engine.prompts) == 2, "the denied question never reached the model"
    await core.aclose()

    again = await core_factory(settings, engine)  # a new process on the same database
    assert (await say(again, "still there?", user="alice")).startswith("Sorry, I only answer people")
    assert await say(again, "hi again", user="bob") == "Hello again, Bob."
    assert {(r.platform, r.user_id, r.allowed, r.set_by) for r in await rows(again, AccessRule)} == {
        ("test", "bob", True, "test:root"),
        ("test", "alice", False, "test:root"),
    }


async def follows(core: Core, who: str, allowed: bool, within: float = 5.0) -> None:
    """Until `core` lets `who` in (or not), failing after `within` seconds."""

    async def followed() -> bool:
        return await core.dispatcher.people.allowed(who) == allowed

    await until(followed, within=within, what=f"{who} {'allowed' if allowed else 'denied'}", every=0.02)


async def test_another_process_on_the_database_follows_allow_and_deny(
    make_settings, core_factory, monkeypatch
) -> None:
    """Two cores on one database stand for two processes: an admin's /allow and /deny given to
    one reach the other once its cached rules are older than RULES_FRESH_FOR."""
    monkeypatch.setattr(people, "RULES_FRESH_FOR", 0.3)
    settings = make_settings(tools=[], admins=["test:root"], allowed_users=["test:alice"])
    first = await core_factory(settings, ScriptedEngine([]))
    second = await core_factory(settings, ScriptedEngine(["Hello Bob."]))
    # the second has read the rules (none) and holds them
    assert (await say(second, "hi", user="bob")).startswith("Sorry, I only answer people")
    assert await say(first, "/allow test:bob", user="root") == "test:bob may use me now."
    assert await say(first, "/deny test:alice", user="root") == "test:alice may no longer use me."
    await follows(second, "test:bob", True)
    await follows(second, "test:alice", False)
    assert await say(second, "hi", user="bob") == "Hello Bob."
    assert (await say(second, "hi", user="alice")).startswith("Sorry, I only answer people")


async def test_allow_lifts_a_deny_and_an_empty_allowlist_lets_everyone_in_but_the_denied(
    make_settings, core_factory
) -> None:
    core = await core_factory(
        make_settings(tools=[], admins=["test:root"]), ScriptedEngine(["Hi.", "Hi again."])
    )
    await say(core, "/deny test:mallory", user="root")
    assert (await say(core, "hello", user="mallory")).startswith("Sorry, I only answer people")
    assert await say(core, "hello", user="carol") == "Hi."
    await say(core, "/allow test:mallory", user="root")
    assert await say(core, "hello?", user="mallory") == "Hi again."


async def test_only_admins_allow_or_deny_and_a_bad_id_gets_the_usage(make_settings, core_factory) -> None:
    core = await core_factory(make_settings(tools=[], admins=["test:root"]), ScriptedEngine())
    assert await say(core, "/deny test:bob", user="alice") == "Only my admins (YANRAY_ADMINS) can use /deny."
    zh = await say(core, "/allow test:alice", user="bob", language="zh")
    assert zh == translator("zh").gettext("Only my admins (YANRAY_ADMINS) can use /{command}.").format(
        command="allow"
    )
    assert zh != "Only my admins (YANRAY_ADMINS) can use /allow."
    for bad in ("/allow", "/allow bob", "/deny telegram:", "/deny telegram:1 2", "/allow " + "x" * 5000):
        answer = await say(core, bad, user="root")
        assert answer.startswith("Usage: /"), bad
        assert "\n" not in answer
    assert await say(core, "/deny test:root", user="root") == (
        "test:root is one of my admins (YANRAY_ADMINS) and cannot be denied."
    )
    assert await rows(core, AccessRule) == []
    assert await say(core, "/history", user="alice") == "Our conversation is empty.", "alice is still allowed"


async def test_thumbs_of_any_skin_tone_count_and_other_emoji_do_not() -> None:
    assert thumb("👍") == 1 and thumb("👎") == -1
    assert thumb("👍🏽") == 1 and thumb("👎🏿") == -1 and thumb("👍\ufe0f") == 1
    assert thumb("❤") is None and thumb("👍👍") is None and thumb("") is None and thumb("👍" * 100) is None


async def test_a_reaction_counts_only_on_an_answer_and_only_from_someone_allowed(
    make_settings, core_factory
) -> None:
    core = await core_factory(make_settings(tools=[], admins=["test:root"]), ScriptedEngine(["An answer."]))
    out = RecordingStream()
    await core.dispatcher.handle(msg("hi"), out)
    await out.wait()
    await out.record([[77, "digest"], [78, "digest"]])  # what an adapter reports showing the answer
    await say(core, "/deny test:mallory", user="root")
    people = core.dispatcher.people

    async def react(user: str, message: str, value: int | None) -> bool:
        return await people.rate(
            platform="test", chat_id="alice", message_id=message, user_id=user, value=value
        )

    assert not await react("mallory", "77", 1), "a denied person's reaction is ignored"
    assert not await react("bob", "76", 1), "76 shows no answer"
    async with core.db.transaction():  # the worker storing an answer holds SQLite's one writer
        # a thumb on any other message (Discord sends them all) does not wait for it
        assert not await asyncio.wait_for(react("bob", "75", 1), 5)
    assert await react("bob", "78", -1) and await react("alice", "77", 1)
    assert await ratings(core) == [(1, "test", "alice", 1), (1, "test", "bob", -1)]
    assert await react("bob", "78", None)
    assert await ratings(core) == [(1, "test", "alice", 1)]


async def test_help_names_ratings_and_share_and_the_admin_commands_for_admins(
    make_settings, core_factory
) -> None:
    core = await core_factory(make_settings(admins=["test:root"]), ScriptedEngine([]))
    for language in ("en", "zh"):
        hint = "zh-hans" if language == "zh" else None
        tr = translator(language)
        everyone = await say(core, "/help", user="alice", language=hint)
        assert everyone == help_text(language, ["calculate"])  # YANRAY_TOOLS: the calculator
        assert ("a calculator" if language == "en" else "计算器") in everyone
        assert all(f"/{word}" in everyone for word in ("good", "bad", "share"))
        assert "/allow" not in everyone and "/stats" not in everyone
        admin = await say(core, "/help", user="root", language=hint)
        assert admin == f"{everyone}\n\n{tr.gettext(ADMIN_HELP)}"
        assert all(f"/{word}" in admin for word in ("allow", "deny", "stats"))
    assert translator("zh").gettext(ADMIN_HELP) != ADMIN_HELP
