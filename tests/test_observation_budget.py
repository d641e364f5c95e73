"""Observations: cut to a token budget (estimated, never short for prose, English or Chinese),
kept inside the model's context, and a tool that fails unexpectedly costs only its call."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.model_fixtures import fixtures_dir, steer_chain, steered_chatglm3
from tests.scripted_engine import ScriptedEngine, ScriptedSession
from yanray.bot.toolloop import REPLY_ROOM, ToolLoop
from yanray.bot.tools import Tool
from yanray.bot.tools.budget import cut_to_tokens, estimate_tokens
from yanray.engine.base import ChatMessage, EngineError, GenerateOptions, ToolSpec
from yanray.engine.chatglm3.tokenizer import EOS, ChatGLM3Tokenizer
from yanray.engine.local import LocalEngine

ENGLISH = (
    "The Moon is Earth's only natural satellite. It orbits at an average distance of 384,400 km, "
    "about 30 times the diameter of Earth. Tidal forces have synchronized its orbital period with "
    "its rotation period, so the same side always faces Earth. "
) * 6
CHINESE = (
    "月球是地球唯一的天然卫星，也是太阳系中第五大的卫星。月球与地球的平均距离约为三十八万四千公里，"
    "大约是地球直径的三十倍。由于潮汐锁定，月球总是以同一面朝向地球。"
) * 6
OTHER = {
    "url": "https://en.wikipedia.org/wiki/Moon?oldid=1234567&action=history#section-3 ",
    "digits": "3.14159265358979 2026-12-01 07:32:05 +49 30 1234567 ",
    "json": '{"results": [{"title": "Moon", "url": "https://x.org/moon", "score": 0.98, "id": 12345}]}',
}


@pytest.fixture(scope="module")
def tokenizer() -> ChatGLM3Tokenizer:
    return ChatGLM3Tokenizer(fixtures_dir() / "tokenizer.model")


@pytest.mark.parametrize(
    ("text", "most", "least"),
    [(ENGLISH, 0.6, 0.4), (CHINESE, 0.75, 0.55), *((t, 1.0, 0.6) for t in OTHER.values())],
)
def test_the_estimate_is_never_short_of_chatglm3s_count(
    tokenizer: ChatGLM3Tokenizer, text: str, most: float, least: float
) -> None:
    """The ratios the comment in bot/tools/budget.py gives (real tokens / estimate)."""
    real, estimate = len(tokenizer.encode_text(text)), estimate_tokens(text)
    assert least * estimate <= real <= most * estimate, (real, estimate)


def test_a_long_text_is_cut_to_its_budget_and_says_so(tokenizer: ChatGLM3Tokenizer) -> None:
    for text in (ENGLISH * 50, CHINESE * 50):
        cut = cut_to_tokens(text, 300)
        kept, _, note = cut.rpartition("\n")
        assert text.startswith(kept) and note == f"[cut: {len(text) - len(kept):,} more characters not shown]"
        assert estimate_tokens(cut) <= 300 and len(tokenizer.encode_text(cut)) <= 300
        assert estimate_tokens(kept) > 250  # not cut far short of the budget
    assert cut_to_tokens(CHINESE, 1000) == CHINESE  # within the budget: as it is


def tool(name: str, handler: Any, **kwargs: Any) -> Tool:
    spec = ToolSpec(name, f"the {name} tool", {"type": "object"}, f"/{name} <x>")
    return Tool(spec=spec, handler=handler, slash_argument="x", **kwargs)


async def long_page(arguments: Mapping[str, Any]) -> str:
    return CHINESE * 100


async def test_the_loop_cuts_every_observation_to_the_tools_budget() -> None:
    engine = ScriptedEngine(["/read a\n", "Read it."])
    loop = ToolLoop(tools={"read": tool("read", long_page, max_observation_tokens=500)}, max_rounds=2)
    result = await loop.run(await engine.start([ChatMessage("user", "go")]), options=GenerateOptions)
    seen = engine.prompts[-1][-1]  # what the model read
    assert seen.role == "observation" and seen.content == result.rounds[0].observation
    assert estimate_tokens(seen.content) <= 500 and seen.content.endswith("more characters not shown]")
    assert result.visible == "Read it."


class CountingSession(ScriptedSession):
    """A scripted session that counts its tokens, as a local engine's does (here: the estimate)."""

    @property
    def tokens(self) -> int:
        return sum(estimate_tokens(m.content) for m in self.messages)


@pytest.mark.parametrize("free", [REPLY_ROOM + 200, REPLY_ROOM + 5])
async def test_an_observation_never_overflows_the_context(
    free: int, caplog: pytest.LogCaptureFixture
) -> None:
    engine = ScriptedEngine(["Let me read.\n/read a\n", "Read it."])
    question = ChatMessage("user", "x" * 1000)
    session = CountingSession(engine, [question])
    call_tokens = estimate_tokens("x" * 1000 + "Let me read.\n/read a\n")
    loop = ToolLoop(tools={"read": tool("read", long_page)}, max_rounds=2, max_context=call_tokens + free)
    with caplog.at_level(logging.WARNING, logger="yanray.bot.toolloop"):
        result = await loop.run(session, options=GenerateOptions)
    if free > REPLY_ROOM + 100:  # room for part of it: cut to the room, the answer goes on
        seen = engine.prompts[-1][-1].content
        assert estimate_tokens(seen) <= free - REPLY_ROOM and seen.endswith("more characters not shown]")
        assert result.visible == "Let me read.\nRead it." and result.finish == "stop"
    else:  # no room: not appended, the answer ends with what it has and the user is told it was cut
        assert len(engine.prompts) == 1 and session.messages[-1].role == "assistant"
        assert result.visible == "Let me read." and result.finish == "length"
        assert "no room left in the context for the read tool's result" in caplog.text


async def test_a_tool_that_raises_is_a_one_line_observation_and_the_answer_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(arguments: Mapping[str, Any]) -> str:
        raise KeyError("a bug")

    outcomes: list[tuple[str, str]] = []
    engine = ScriptedEngine(["/broken a\n", "It did not work, sorry."])
    loop = ToolLoop(
        tools={"broken": tool("broken", broken)}, max_rounds=2, on_tool=lambda *o: outcomes.append(o)
    )
    with caplog.at_level(logging.ERROR, logger="yanray.bot.toolloop"):
        result = await loop.run(await engine.start([ChatMessage("user", "go")]), options=GenerateOptions)
    assert engine.prompts[-1][-1] == ChatMessage("observation", "Error: the broken tool failed.", "broken")
    assert result.visible == "It did not work, sorry."
    assert outcomes == [("broken", "error")]
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == "tool broken failed unexpectedly"
    assert record.exc_info is not None and "a bug" in str(record.exc_info[1])


@pytest.fixture(scope="module")
def calling_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ChatGLM3 (tests/model_fixtures.py) that answers every round with a `/read` call."""
    tok = ChatGLM3Tokenizer(fixtures_dir() / "tokenizer.model")
    ids = tok.encode_text("Let me read.\n/read a") + [EOS]
    return steered_chatglm3(tmp_path_factory.mktemp("reading"), steer_chain(ids))


@pytest.mark.parametrize("checked", [False, True])
async def test_a_local_session_near_its_context_ends_cleanly(calling_folder: Path, checked: bool) -> None:
    """Without the loop's check (as before), the observation went past the context and the next
    round failed the whole answer; with it, the answer ends with what it has."""
    probe = LocalEngine.load(calling_folder, device="cpu", dtype="float32", seed=1, kv_cache_gb=0)
    session = await probe.start([ChatMessage("user", "read it")])
    await session.generate(GenerateOptions(max_new_tokens=40))
    after_round = session.tokens  # the prompt and the first round's call
    await session.close()
    await probe.aclose()

    engine = LocalEngine.load(
        calling_folder, device="cpu", dtype="float32", seed=1, kv_cache_gb=0, max_context=after_round + 80
    )
    try:
        loop = ToolLoop(
            tools={"read": tool("read", long_page)},
            max_rounds=4,
            max_context=engine.max_context if checked else 0,
        )
        session = await engine.start([ChatMessage("user", "read it")])
        options = lambda: GenerateOptions(max_new_tokens=40)  # noqa: E731
        if not checked:
            with pytest.raises(EngineError, match="the model's context is"):
                await loop.run(session, options=options)
            return
        result = await loop.run(session, options=options)
        assert session.tokens <= engine.max_context
        assert result.finish == "length" and result.visible.startswith("Let me read.")
        observations = [r.observation for r in result.rounds if r.observation is not None]
        assert observations[0].endswith("more characters not shown]")  # cut to the room there was
        assert observations[-1] == "Error: no room was left in the conversation for the read tool's result."
    finally:
        await engine.aclose()
