"""The local engine end to end on tiny full-vocab ChatGLM3 models whose output is steered.

`steered_chatglm3` writes a release folder whose greedy output follows a fixed chain of ids,
so these tests know exactly what the model says: Chinese and emoji (byte-fallback pieces),
a native tool call, or an endless loop for cancellation and stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.model_fixtures import fixtures_dir, random_chatglm3_state, steer_chain, steered_chatglm3
from yanray.engine.base import (
    ChatMessage,
    Engine,
    EngineError,
    EngineSession,
    EngineUnavailable,
    GenerateOptions,
    ToolCall,
    ToolSpec,
)
from yanray.engine.chatglm3.tokenizer import EOS, OBSERVATION, ChatGLM3Tokenizer
from yanray.engine.generate import SessionState
from yanray.engine.local import LocalEngine, LocalSession

ANSWER = "你好👋！我是 Yanray，很高兴见到你。"
PROMPT = [ChatMessage("system", "You are Yanray."), ChatMessage("user", "你好")]
CALC = ToolSpec(
    "calculate",
    "Evaluate an arithmetic expression",
    {"type": "object", "properties": {"expression": {"type": "string"}}},
    "/calculate <expression>",
)


@pytest.fixture(scope="module")
def tok() -> ChatGLM3Tokenizer:
    return ChatGLM3Tokenizer(fixtures_dir() / "tokenizer.model")


def _engine(folder: Path) -> Iterator[LocalEngine]:
    # no kept conversations: each test here counts what one session prefills from cold
    # (tests/test_warm_conversations.py covers the kept caches)
    engine = LocalEngine.load(folder, device="cpu", dtype="float32", seed=1, kv_cache_gb=0)
    yield engine
    engine._executor.shutdown(wait=True)


@pytest.fixture(scope="module")
def answer_engine(tok: ChatGLM3Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEngine]:
    ids = tok.encode_text("\n") + tok.encode_text(ANSWER) + [EOS]
    yield from _engine(steered_chatglm3(tmp_path_factory.mktemp("answer"), steer_chain(ids)))


@pytest.fixture(scope="module")
def tool_engine(tok: ChatGLM3Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEngine]:
    ids = tok.encode_text("calculate\n") + tok.encode_text('tool_call(expression="6*7")') + [OBSERVATION]
    yield from _engine(steered_chatglm3(tmp_path_factory.mktemp("tool"), steer_chain(ids), fmt="bin"))


@pytest.fixture(scope="module")
def loop_engine(tok: ChatGLM3Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEngine]:
    words = [tok.encode_text(w)[0] for w in ("alpha", "beta", "gamma")]
    chain = steer_chain(tok.encode_text("\n") + words)
    chain[words[-1]] = words[0]  # alpha beta gamma alpha beta gamma ... forever
    yield from _engine(steered_chatglm3(tmp_path_factory.mktemp("loop"), chain))


def test_the_engine_follows_the_protocol(answer_engine: LocalEngine) -> None:
    assert isinstance(answer_engine, Engine)
    assert answer_engine.name == "local" and answer_engine.native_tools is True
    assert answer_engine.max_context == 4096  # the config's seq_length


async def test_streaming_chinese_and_emoji_arrive_whole(
    answer_engine: LocalEngine, tok: ChatGLM3Tokenizer
) -> None:
    session = await answer_engine.start(PROMPT)
    assert isinstance(session, EngineSession)
    pieces: list[str] = []
    generation = await session.generate(GenerateOptions(max_new_tokens=64), pieces.append)
    assert generation.text == ANSWER and generation.finish == "stop"
    assert "".join(pieces) == ANSWER
    assert "👋" in pieces  # four byte-fallback ids, one piece
    assert all("\ufffd" not in p and "\n" not in p for p in pieces)
    assert generation.prompt_tokens == len(tok.encode_prompt(PROMPT)) == answer_engine.count_tokens(PROMPT)
    assert (
        generation.new_tokens == len(tok.encode_text("\n") + tok.encode_text(ANSWER)) + 1
    )  # and the stop id
    await session.close()


async def test_native_tool_call_and_kv_reuse(tool_engine: LocalEngine, tok: ChatGLM3Tokenizer) -> None:
    session = await tool_engine.start(PROMPT, [CALC])
    assert isinstance(session, LocalSession)
    pieces: list[str] = []
    first = await session.generate(GenerateOptions(max_new_tokens=64), pieces.append)
    assert first.finish == "tool_call" and first.text == "" and pieces == []
    assert first.tool_call == ToolCall(
        "calculate", {"expression": "6*7"}, stored='```python\ntool_call(expression="6*7")\n```'
    )
    assert (
        first.prompt_tokens
        == tool_engine.count_tokens(PROMPT, [CALC])
        == len(tok.encode_prompt(PROMPT, [CALC]))
    )

    observation = ChatMessage("observation", "42", name="calculate")
    before = session.tokens
    await session.append(observation)
    second = await session.generate(GenerateOptions(max_new_tokens=64))
    appended = tok.encode_append(observation)
    assert second.prompt_tokens == len(appended) == session.tokens - before - second.new_tokens + 1

    # the kept cache gives exactly what prefilling the same conversation from scratch gives
    replay = LocalSession(
        tool_engine, SessionState(tokens=session.state.tokens[: before + len(appended)], tools=())
    )
    again = await replay.generate(GenerateOptions(max_new_tokens=64))
    assert again.prompt_tokens == before + len(appended)
    assert (again.tool_call, again.text, again.new_tokens) == (
        second.tool_call,
        second.text,
        second.new_tokens,
    )
    await session.close()
    await replay.close()


async def test_cancel_flag_stops_within_tokens(loop_engine: LocalEngine) -> None:
    session = await loop_engine.start(PROMPT)
    options = GenerateOptions(max_new_tokens=3000)

    def on_text(piece: str) -> None:
        options.cancel.set()

    generation = await session.generate(options, on_text)
    assert generation.finish == "cancelled"
    assert generation.new_tokens < 3000
    already = GenerateOptions(max_new_tokens=50)
    already.cancel.set()
    stopped = await session.generate(already)
    assert (stopped.finish, stopped.new_tokens) == ("cancelled", 0)


async def test_cancelling_the_awaiting_task_stops_the_thread(loop_engine: LocalEngine) -> None:
    session = await loop_engine.start(PROMPT)
    options = GenerateOptions(max_new_tokens=4000)
    first_piece = asyncio.Event()
    task = asyncio.create_task(session.generate(options, lambda piece: first_piece.set()))
    await asyncio.wait_for(first_piece.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert options.cancel.is_set()
    # the engine keeps serving, and the same session still works
    after = await session.generate(GenerateOptions(max_new_tokens=3))
    assert after.finish == "length" and after.new_tokens == 3


async def test_length_and_stop_at(loop_engine: LocalEngine) -> None:
    session = await loop_engine.start(PROMPT)
    limited = await session.generate(GenerateOptions(max_new_tokens=4))
    assert (limited.finish, limited.new_tokens, limited.text) == ("length", 4, "alpha beta")

    seen: list[str] = []

    def stop_at(piece: str) -> int | None:  # fed each piece; returns an offset in the round's text
        seen.append(piece)
        at = "".join(seen).find("gamma alpha")
        return at + len("gamma") if at >= 0 else None

    session = await loop_engine.start(PROMPT)
    pieces: list[str] = []
    cut = await session.generate(GenerateOptions(max_new_tokens=50, stop_at=stop_at), pieces.append)
    assert (cut.finish, cut.text, "".join(pieces)) == ("stop", "alpha beta gamma", "alpha beta gamma")


async def test_out_of_memory_fails_one_request_only(
    answer_engine: LocalEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fail inside the last layer, after the first layer has already grown its KV cache
    layer = answer_engine.model.model.layers[-1]
    real_forward = layer.forward
    calls = {"n": 0}

    def flaky_forward(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:  # in the middle of decoding
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", flaky_forward)
    session = await answer_engine.start(PROMPT)
    with pytest.raises(EngineError, match="out of memory") as failed:
        await session.generate(GenerateOptions(max_new_tokens=64))
    assert "\n" not in str(failed.value)
    # the same session, rolled back, and a new one both answer normally
    retried = await session.generate(GenerateOptions(max_new_tokens=64))
    assert retried.text == ANSWER and retried.prompt_tokens == answer_engine.count_tokens(PROMPT)
    fresh = await (await answer_engine.start(PROMPT)).generate(GenerateOptions(max_new_tokens=64))
    assert fresh.text == ANSWER


async def test_a_failed_round_rolls_the_kv_cache_back(tmp_path: Path) -> None:
    """On a random model (attention matters), a round that fails mid-step is retried exactly."""
    from tests.model_fixtures import chatglm3_config, write_chatglm3_folder

    cfg = chatglm3_config()
    engine = LocalEngine.load(
        write_chatglm3_folder(tmp_path / "random", random_chatglm3_state(cfg, seed=5), cfg),
        device="cpu",
        dtype="float32",
    )
    observation = ChatMessage("observation", '{"temperature": 22}', name="weather")

    async def two_rounds(fail_at: int | None) -> tuple[list[int], str]:
        session = await engine.start(PROMPT, [CALC])
        await session.generate(GenerateOptions(max_new_tokens=6))
        await session.append(observation)
        if fail_at is not None:
            layer = engine.model.model.layers[-1]
            real, calls = layer.forward, {"n": 0}

            def flaky(*args: object, **kwargs: object) -> object:
                calls["n"] += 1
                if calls["n"] == fail_at:
                    raise torch.OutOfMemoryError("CUDA out of memory")
                return real(*args, **kwargs)

            layer.forward = flaky  # an instance attribute shadows the method until deleted
            try:
                with pytest.raises(EngineError):
                    await session.generate(GenerateOptions(max_new_tokens=6))
            finally:
                del layer.forward
            state = session.state
            assert all(layer.keys.shape[-2] == state.cached for layer in state.cache.layers)
        second = await session.generate(GenerateOptions(max_new_tokens=6))
        return list(session.state.tokens), second.text

    assert await two_rounds(fail_at=3) == await two_rounds(fail_at=None)
    assert await two_rounds(fail_at=1) == await two_rounds(fail_at=None)  # during the observation's prefill
    await engine.aclose()


async def test_sampling_is_seeded(tmp_path: Path) -> None:
    from tests.model_fixtures import chatglm3_config, write_chatglm3_folder

    cfg = chatglm3_config()
    folder = write_chatglm3_folder(tmp_path / "random", random_chatglm3_state(cfg, seed=3), cfg)
    texts = []
    for _ in range(2):
        engine = LocalEngine.load(folder, device="cpu", dtype="float32", seed=7)
        session = await engine.start(PROMPT)
        texts.append((await session.generate(GenerateOptions(max_new_tokens=8, temperature=1.0))).new_tokens)
        texts.append(session.state.tokens[-8:])
        await engine.aclose()
    assert texts[1] == texts[3]
    from yanray.engine.generate import sample

    logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    assert sample(logits, 0.0, None) == 1
    gen = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, gen) for _ in range(200)} >= {1, 2}


def test_memory_guard_refuses_before_loading(
    answer_engine: LocalEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yanray.engine.chatglm3.weights as chatglm3
    import yanray.engine.loader as loader

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were read although the model does not fit")

    monkeypatch.setattr(loader, "free_memory", lambda device: 2**20)
    monkeypatch.setattr(chatglm3, "iter_checkpoint", must_not_load)
    monkeypatch.setattr(loader, "load_glm_model", must_not_load)
    with pytest.raises(EngineUnavailable, match="has 0.0 GiB free") as refused:
        LocalEngine.load(Path(answer_engine.label), device="cpu", dtype="float32")
    assert "never offloaded" in str(refused.value)
