"""The seams of the training loop: what people say in the chat is what `yanray export` reads.

A rating given with `/good` in the terminal or a 👍 reaction on Telegram, and a `/share on`
said through the dispatcher, go through the real adapters, dispatcher and database; the
export then runs on that database, and its records are read back the way LLaMA-Factory
reads them (`tests/llamafactory.py`). tests/test_export.py inserts ratings and consents as
rows; these tests check that the chat commands store what the export looks for.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests import llamafactory
from tests.fakes.telegram_harness import running_bot, telegram_settings
from tests.fakes.telegram_server import FakeTelegram
from tests.recording import RecordingStream
from tests.scripted_engine import ScriptedEngine
from yanray.adapters.console import ConsoleAdapter
from yanray.bot.app import Core
from yanray.bot.export import ExportOptions, export
from yanray.bot.settings import Settings
from yanray.bot.types import Incoming

pytestmark = pytest.mark.asyncio


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [t for q, a in pairs for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


async def exported(settings: Settings, out: Path, **options: Any) -> list[list[dict[str, str]]]:
    """The `conversations` of each training record (each one LLaMA-Factory would load)."""
    await export(settings, ExportOptions(out=out, **options))
    llamafactory.load(out)  # every record passes LLaMA-Factory's checks
    lines = (out / "yanray.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["conversations"] for line in lines]


async def say(core: Core, user: str, text: str) -> str:
    out = RecordingStream(text)
    incoming = Incoming(platform="test", chat_id=user, user_id=user, display_name=user, text=text)
    await core.dispatcher.handle(incoming, out)
    return (await out.wait()) or ""


async def test_good_in_the_terminal_is_what_rated_good_exports(
    make_settings: Callable[..., Settings], core_factory: Any, tmp_path: Path
) -> None:
    settings = make_settings(tools=[])
    answers = ["Answer one.", "A draft of two.", "Answer two.", "Answer three."]
    core = await core_factory(settings, ScriptedEngine(answers))
    # /retry writes the second answer again: /good rates the new one, the draft is never exported
    lines = "Question one\nQuestion two\n/retry\n/good\nQuestion three\n"
    await ConsoleAdapter(
        dispatcher=core.dispatcher, stdin=io.StringIO(lines), stdout=io.StringIO()
    ).converse()

    # the terminal's person has not said /share on and is no admin: nothing leaves
    assert await exported(settings, tmp_path / "none", rated_good=True) == []

    out = io.StringIO()
    await ConsoleAdapter(dispatcher=core.dispatcher, stdin=io.StringIO("/share on\n"), stdout=out).converse()
    assert out.getvalue().startswith("Sharing is on")
    one, two = ("Question one", "Answer one."), ("Question two", "Answer two.")
    three = ("Question three", "Answer three.")
    # --rated good: the answer rated 👍 with what came before it, not the unrated one after it
    assert await exported(settings, tmp_path / "good", rated_good=True) == [turns(one, two)]
    assert await exported(settings, tmp_path / "all") == [turns(one, two, three)]

    bad = io.StringIO()
    await ConsoleAdapter(dispatcher=core.dispatcher, stdin=io.StringIO("/bad\n"), stdout=bad).converse()
    assert "👎" in bad.getvalue()
    # the last answer is now rated 👎: it is left out of every export
    assert await exported(settings, tmp_path / "after-bad") == [turns(one, two)]


async def test_share_on_and_off_said_in_the_chat_decide_what_is_exported(
    make_settings: Callable[..., Settings], core_factory: Any, tmp_path: Path
) -> None:
    settings = make_settings(tools=[], admins=["test:root"])
    core = await core_factory(settings, ScriptedEngine(["For Alice.", "For Bob.", "For root."]))
    assert (await say(core, "alice", "/share on")).startswith("Sharing is on")
    for user in ("alice", "bob", "root"):
        await say(core, user, f"Hello from {user}")

    # Alice opted in, root is an admin, Bob said nothing
    assert await exported(settings, tmp_path / "a") == [
        turns(("Hello from alice", "For Alice.")),
        turns(("Hello from root", "For root.")),
    ]
    assert (await say(core, "alice", "/share off")).startswith("Sharing is off")
    assert (await say(core, "bob", "/share on")).startswith("Sharing is on")
    assert await exported(settings, tmp_path / "b") == [
        turns(("Hello from bob", "For Bob.")),
        turns(("Hello from root", "For root.")),
    ]


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


async def test_a_telegram_thumbs_up_is_what_rated_good_exports(
    fake: FakeTelegram, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    alice = 1001
    settings = telegram_settings(fake, make_settings(tools=[]))
    async with running_bot(fake, settings, ScriptedEngine(["First answer.", "Second answer."])) as bot:
        fake.private_text(alice, "/share on")
        await fake.wait_for(lambda: len(fake.messages(alice)) == 1)
        fake.private_text(alice, "First question")
        await fake.wait_for(lambda: len(fake.messages(alice)) == 2)
        await bot.settled()
        fake.private_text(alice, "Second question")
        await fake.wait_for(lambda: len(fake.messages(alice)) == 3)
        await bot.settled()
        first = fake.bot_messages(alice)[1].message_id
        update = fake.reaction(alice, alice, first, ["👍"])
        await fake.wait_for(lambda: fake.polls and fake.polls[-1] > update)  # handled

        assert await exported(settings, tmp_path / "good", rated_good=True) == [
            turns(("First question", "First answer."))
        ]
        assert await exported(settings, tmp_path / "all") == [
            turns(("First question", "First answer."), ("Second question", "Second answer."))
        ]
