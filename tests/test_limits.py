"""Limits a user cannot slip past: the rate limit covers edits and costly commands, a shared
conversation's /reset, /system and /stop belong to its moderators, and a context with no
room for a question is refused at start instead of answering everything with "too long"."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tests.recording import RecordingStream
from tests.scripted_engine import ScriptedEngine
from tests.test_core import ask, msg, statuses
from tests.waiting import until
from yanray.bot.dispatcher import MODERATORS_ONLY, RATE_LIMITED
from yanray.bot.errors import ConfigError
from yanray.bot.types import Incoming

pytestmark = pytest.mark.asyncio


def shared(text: str, user: str, *, moderator: bool = False, mid: str | None = None) -> Incoming:
    """A message in group chat "g" whose members share one conversation."""
    return dataclasses.replace(msg(text, user=user, chat="g", mid=mid), shared=True, moderator=moderator)


async def say(core, incoming: Incoming) -> RecordingStream:
    out = RecordingStream(incoming.text)
    await core.dispatcher.handle(incoming, out)
    return out


async def test_edits_count_against_the_rate_limit(make_settings, core_factory) -> None:
    engine = ScriptedEngine(responder=lambda m: f"about {m[-1].content}")
    core = await core_factory(make_settings(tools=[], rate_limit_per_minute=5), engine)
    await (await ask(core, "question 0", mid="1")).wait()
    refused = 0
    for i in range(1, 31):
        out = RecordingStream(f"edit {i}")
        assert await core.dispatcher.handle_edit(msg(f"question {i}", mid="1"), lambda _shown, out=out: out)
        answer = await out.wait()
        refused += answer == RATE_LIMITED
    # 1 question + 4 edits fill the minute; the other 26 edits are refused, not generated
    assert len(engine.prompts) == 5 and refused == 26
    assert (await ask(core, "one more")).answer == RATE_LIMITED


async def test_retry_and_system_count_against_the_rate_limit(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["an answer"])
    core = await core_factory(make_settings(tools=[], rate_limit_per_minute=3), engine)
    await (await ask(core, "question")).wait()
    await (await ask(core, "/retry")).wait()
    assert (await ask(core, "/system be brief")).answer == "Instructions set for this conversation."
    assert (await ask(core, "/retry")).answer == RATE_LIMITED
    assert (await ask(core, "/system be verbose")).answer == RATE_LIMITED
    assert len(engine.prompts) == 2
    # cheap commands still work
    assert "be brief" in ((await ask(core, "/system")).answer or "")


async def test_shared_conversation_system_and_reset_are_for_moderators(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["ok"])
    core = await core_factory(make_settings(tools=[], admins=["test:owner"]), engine)
    member = await say(core, shared("/system talk like a pirate", "bob"))
    assert member.answer == MODERATORS_ONLY["system"]
    assert (await say(core, shared("/reset", "bob"))).answer == MODERATORS_ONLY["reset"]
    # everyone may read the instructions
    assert "helpful" in ((await say(core, shared("/system", "bob"))).answer or "")
    # a chat moderator and a YANRAY_ADMINS entry may change them
    mod = await say(core, shared("/system be formal", "carol", moderator=True))
    assert mod.answer == "Instructions set for this conversation."
    assert (await say(core, shared("/reset", "owner"))).answer == (
        "Fresh start: I've set our earlier messages aside (they stay stored)."
    )
    await (await say(core, shared("hello", "bob"))).wait()
    assert engine.prompts[-1][0].content == "be formal"
    # in a private conversation everyone runs their own
    assert (
        await ask(core, "/system be short", user="bob")
    ).answer == "Instructions set for this conversation."


async def test_shared_conversation_stop_is_for_the_asker_and_moderators(make_settings, core_factory) -> None:
    release = asyncio.get_running_loop().create_future()
    engine = ScriptedEngine(["a long answer " * 20], delay=0.01)

    async def hold() -> None:
        await release

    engine.before_reply = hold
    core = await core_factory(make_settings(tools=[]), engine)
    alice = await say(core, shared("alice's question", "alice"))
    await until(lambda: len(engine.prompts) == 1, what="alice's answer runs")
    bobs = await say(core, shared("bob's question", "bob"))  # waits behind it
    carol = await say(core, shared("/stop", "carol"))
    assert "no answer to stop" in (carol.answer or "")
    bob_stop = await say(core, shared("/stop", "bob"))
    assert bob_stop.answer == "Stopped."
    assert await bobs.wait() == "Stopped."  # bob's own waiting question
    running = core.queue.running  # alice's answer goes on: bob's /stop did not touch it
    assert running is not None and not running.cancel.is_set() and not alice.done.is_set()
    mod = await say(core, shared("/stop", "dave", moderator=True))
    assert mod.answer == "Stopped."
    release.set_result(None)
    assert "Stopped." in (await alice.wait() or "")
    assert await statuses(core) == {"cancelled": 2}


async def test_a_context_without_room_for_a_question_is_refused_at_start(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["never"], max_context=80)
    with pytest.raises(ConfigError, match=r"leaves \d+ tokens for a question") as caught:
        await core_factory(make_settings(tools=[], max_new_tokens=64), engine)
    assert "\n" not in str(caught.value)
    # a roomy context with a huge default prompt is refused the same way
    engine = ScriptedEngine(["never"], max_context=2000)
    with pytest.raises(ConfigError, match="shorten YANRAY_SYSTEM_PROMPT"):
        await core_factory(make_settings(tools=[], system_prompt="word " * 3000), engine)


async def test_instructions_too_long_for_the_context_are_refused(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["fine"], max_context=400)
    core = await core_factory(make_settings(tools=[], max_new_tokens=64), engine)
    out = await ask(core, "/system " + "rule " * 350)
    assert "too long for my context" in (out.answer or "")
    # the instructions stayed as they were, and questions are still answered
    assert "helpful" in ((await ask(core, "/system")).answer or "")
    assert await (await ask(core, "question")).wait() == "fine"
