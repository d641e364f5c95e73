"""Warm conversations: the local engine keeps a conversation's KV cache between turns.

On tiny ChatGLM3 models (tests/model_fixtures.py): a random one, where attention matters so a
stale or misplaced cache changes the reply, and a steered one whose reply is known, so the
tokens fed to the model can be counted exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.hooks import ForwardCalls
from tests.model_fixtures import (
    fixtures_dir,
    steer_chain,
    steered_chatglm3,
)
from yanray.engine.base import ChatMessage, GenerateOptions, ToolSpec
from yanray.engine.chatglm3.tokenizer import EOS, ChatGLM3Tokenizer
from yanray.engine.device import kv_cache_bytes, model_shape
from yanray.engine.local import LocalEngine

GiB = 1024**3
SYSTEM = ChatMessage("system", "You are Yanray.")
CALC = ToolSpec(
    "calculate",
    "Evaluate an arithmetic expression",
    {"type": "object", "properties": {"expression": {"type": "string"}}},
    "/calculate <expression>",
)
ANSWER = "你好！我是 Yanray。"


@pytest.fixture(scope="module")
def tok() -> ChatGLM3Tokenizer:
    return ChatGLM3Tokenizer(fixtures_dir() / "tokenizer.model")


@pytest.fixture(scope="module")
def answer_folder(tok: ChatGLM3Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ids = tok.encode_text("\n") + tok.encode_text(ANSWER) + [EOS]
    return steered_chatglm3(tmp_path_factory.mktemp("answer"), steer_chain(ids))


def _load(folder: Path, kv_cache_gb: float) -> Iterator[LocalEngine]:
    engine = LocalEngine.load(folder, device="cpu", dtype="float32", seed=1, kv_cache_gb=kv_cache_gb)
    yield engine
    engine._executor.shutdown(wait=True)


async def _conversation(engine: LocalEngine) -> tuple[list[str], list[int]]:
    """Three turns with a tool round, then /reset, an edit and a retry, as the worker sends them:
    each turn is a new session over the stored history. (replies, tokens prefilled per round)"""
    replies: list[str] = []
    prefilled: list[int] = []
    options = dict(max_new_tokens=6)

    async def turn(messages: list[ChatMessage], *, tool_round: bool = False) -> list[ChatMessage]:
        session = await engine.start(messages, [CALC])
        first = await session.generate(GenerateOptions(**options))
        replies.append(first.text)
        prefilled.append(first.prompt_tokens)
        stored = [ChatMessage("assistant", first.text)]
        if tool_round:  # the tool loop appends the observation and generates again
            observation = ChatMessage("observation", '{"result": 42}', name="calculate")
            await session.append(observation)
            second = await session.generate(GenerateOptions(**options))
            replies.append(second.text)
            prefilled.append(second.prompt_tokens)
            stored += [observation, ChatMessage("assistant", second.text)]
        await session.close()
        return stored

    history = [SYSTEM, ChatMessage("user", "What is 6 times 7?")]
    history += await turn(history, tool_round=True)
    history += [ChatMessage("user", "And 7 times 8?")]
    history += await turn(history)
    history += [ChatMessage("user", "Thanks, tell me a story")]
    history += await turn(history)
    # /reset: the next question starts a fresh history
    await turn([SYSTEM, ChatMessage("user", "Hello again")])
    # an edit of the second question: the history up to it, then the new text
    edited = [*history[:6], ChatMessage("user", "And 9 times 8?")]
    await turn(edited)
    # /retry of the edited question: the same prompt again
    await turn(edited)
    return replies, prefilled


async def test_warm_and_cold_give_identical_replies(random_folder: Path) -> None:
    results = {}
    for gb in (0.0, 1.0):
        engine = next(_load(random_folder, gb))
        try:
            results[gb] = await _conversation(engine)
        finally:
            await engine.aclose()
    (cold_replies, cold_prefill), (warm_replies, warm_prefill) = results[0.0], results[1.0]
    assert warm_replies == cold_replies
    assert any(reply for reply in cold_replies)  # the random model says something
    # the first round is cold both ways; the tool round reuses the session's cache both ways
    assert warm_prefill[:2] == cold_prefill[:2]
    # later turns are warm: they prefill less, and the retry prefills a single token
    assert all(w < c for w, c in zip(warm_prefill[2:], cold_prefill[2:], strict=True))
    assert warm_prefill[-1] == 1


async def test_a_warm_turn_prefills_exactly_its_new_tokens(
    answer_folder: Path, tok: ChatGLM3Tokenizer
) -> None:
    engine = next(_load(answer_folder, 1.0))
    fed = ForwardCalls(engine.model)
    try:
        first_prompt = [SYSTEM, ChatMessage("user", "你好")]
        session = await engine.start(first_prompt)
        first = await session.generate(GenerateOptions(max_new_tokens=64))
        assert first.text == ANSWER
        await session.close()

        question = ChatMessage("user", "再见")
        second_prompt = [*first_prompt, ChatMessage("assistant", first.text), question]
        fed.seen.clear()
        session = await engine.start(second_prompt)
        second = await session.generate(GenerateOptions(max_new_tokens=64))
        await session.close()
        new = tok.encode_append(question)  # the user's block and the assistant's role id
        assert second.text == ANSWER
        assert second.prompt_tokens == len(new)
        assert fed.tokens[0] == len(new)  # the prefill: the new tokens and nothing else
        assert fed.tokens[1:] == [1] * (second.new_tokens - 1)  # then one token per decode step
        assert len(tok.encode_prompt(second_prompt)) - len(new) == len(tok.encode_prompt(first_prompt)) + len(
            tok.encode_text("\n") + tok.encode_text(ANSWER)
        )
    finally:
        fed.close()
        await engine.aclose()


async def test_least_recently_used_conversations_leave_at_the_budget(
    random_folder: Path,
) -> None:
    probe = next(_load(random_folder, 0.0))
    prompts = {
        name: [ChatMessage("system", f"You are assistant {name}."), ChatMessage("user", f"Hi, I am {name}")]
        for name in ("ann", "bob", "cyd")
    }
    kept_tokens = {}
    for name, prompt in prompts.items():  # the length each conversation's kept cache will have
        session = await probe.start(prompt)
        await session.generate(GenerateOptions(max_new_tokens=4))
        kept_tokens[name] = session.state.cached
        await session.close()
    shape = model_shape(probe.model, probe.model.config)
    await probe.aclose()
    size = {n: kv_cache_bytes(shape, context=t, dtype_size=4) for n, t in kept_tokens.items()}
    budget = size["ann"] + size["bob"] + size["cyd"] - 1  # room for two of the three, not all
    engine = next(_load(random_folder, budget / GiB))
    try:

        async def answer(name: str) -> int:
            session = await engine.start(prompts[name])
            generation = await session.generate(GenerateOptions(max_new_tokens=4))
            await session.close()
            assert engine.kept.used <= engine.kept.budget
            return generation.prompt_tokens

        full = {name: engine.count_tokens(prompt) for name, prompt in prompts.items()}
        assert await answer("ann") == full["ann"]
        assert await answer("bob") < full["bob"]  # shares "[gMASK]sop<|system|>..." with ann's, copied
        assert engine.kept.lengths() == [kept_tokens["ann"], kept_tokens["bob"]]
        assert engine.kept.used == size["ann"] + size["bob"]
        assert await answer("ann") == 1  # the same prompt again: warm, ann is now the most recent
        assert engine.kept.lengths() == [kept_tokens["bob"], kept_tokens["ann"]]
        await answer("cyd")  # over the budget: bob, the least recently used, leaves
        assert engine.kept.lengths() == [kept_tokens["ann"], kept_tokens["cyd"]]
        assert await answer("ann") == 1
        assert await answer("bob") > 1  # cold again past the shared first tokens
    finally:
        await engine.aclose()


async def test_zero_budget_keeps_nothing_and_out_of_memory_drops_kept_caches(
    random_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = [SYSTEM, ChatMessage("user", "Hello")]
    off = next(_load(random_folder, 0.0))
    try:
        for _ in range(2):
            session = await off.start(prompt)
            generation = await session.generate(GenerateOptions(max_new_tokens=3))
            await session.close()
            assert generation.prompt_tokens == off.count_tokens(prompt) and len(off.kept) == 0
    finally:
        await off.aclose()

    engine = next(_load(random_folder, 1.0))
    try:
        session = await engine.start(prompt)
        await session.generate(GenerateOptions(max_new_tokens=3))
        await session.close()
        assert len(engine.kept) == 1
        layer = engine.model.model.layers[-1]
        real = layer.forward

        def out_of_memory(*args: object, **kwargs: object) -> object:
            raise torch.OutOfMemoryError("CUDA out of memory")

        monkeypatch.setattr(layer, "forward", out_of_memory)
        session = await engine.start([SYSTEM, ChatMessage("user", "Something else")])
        with pytest.raises(Exception, match="out of memory"):
            await session.generate(GenerateOptions(max_new_tokens=3))
        assert len(engine.kept) == 0 and engine.kept.used == 0
        monkeypatch.setattr(layer, "forward", real)
        retried = await session.generate(GenerateOptions(max_new_tokens=3))
        assert retried.new_tokens == 3
        await session.close()
    finally:
        await engine.aclose()


async def test_through_the_worker_warm_replies_equal_cold_ones(
    random_folder: Path, make_settings: Any, core_factory: Any
) -> None:
    """Questions, an edit, /retry and /reset through the real dispatcher and worker."""
    from tests.recording import RecordingStream
    from tests.test_core import ask, msg

    async def chat(gb: float) -> tuple[list[str | None], int]:
        engine = next(_load(random_folder, gb))
        fed = ForwardCalls(engine.model)
        settings = make_settings(tools=["calculate"], max_new_tokens=6, database_url="")
        settings.data_dir = settings.data_dir / f"kv-{gb}"
        core = await core_factory(settings, engine)
        try:
            answers = [await (await ask(core, text, mid=str(i))).wait() for i, text in enumerate(QUESTIONS)]
            edited = RecordingStream()
            assert await core.dispatcher.handle_edit(msg("What about 9 times 8?", mid="2"), lambda _: edited)
            answers.append(await edited.wait())
            retried = await ask(core, "/retry")
            answers.append(await retried.wait() if retried.answer is None else retried.answer)
            await ask(core, "/reset")
            answers.append(await (await ask(core, "Hello again", mid="9")).wait())
            return answers, sum(fed.tokens)
        finally:
            fed.close()
            await core.aclose()
            await engine.aclose()

    cold, cold_fed = await chat(0.0)
    warm, warm_fed = await chat(1.0)
    assert warm == cold and all(answer is not None for answer in cold)
    assert warm_fed < cold_fed


QUESTIONS = ["What is 6 times 7?", "And 7 times 8?", "Thanks, tell me a story"]
