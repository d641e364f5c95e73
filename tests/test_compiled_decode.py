"""Compiled decode (engine/compiled.py): the same greedy ids as the eager step, and a compile
failure that the eager path answers.

On a one-layer tiny ChatGLM3 with a 256-token context (so the static cache is 256 long), in
float32 on the CPU through inductor, which compiles C++ (gcc is on the project's machines and
CI's); a cold compile of the step takes ~30 s on the 2 shared cores (the file ~75 s).
The conversation covers what the static cache must carry over: a tool round in the same session
(the decoded tokens copied back to the session's cache, then prefilled after), and a next turn
that takes the kept cache (warm conversations).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.model_fixtures import chatglm3_config, random_chatglm3_state, write_chatglm3_folder
from yanray.engine.base import ChatMessage, GenerateOptions
from yanray.engine.compiled import CompiledDecode, bucket_for, compile_enabled
from yanray.engine.local import LocalEngine

SYSTEM = ChatMessage("system", "You are Yanray.")


@pytest.fixture(autouse=True)
def _one_compile_thread() -> Iterator[None]:
    """2 shared cores: inductor compiles in this process, without a pool of workers."""
    with torch._inductor.config.patch(compile_threads=1):
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = chatglm3_config(num_layers=1, seq_length=256)
    return write_chatglm3_folder(
        tmp_path_factory.mktemp("one-layer"), random_chatglm3_state(cfg, seed=5), cfg
    )


async def _conversation(engine: LocalEngine) -> list[tuple[str, list[int]]]:
    """A turn with a tool round, then a next turn (warm): (reply, the session's ids) per round."""
    rounds: list[tuple[str, list[int]]] = []
    options = GenerateOptions(max_new_tokens=12, temperature=0)
    history = [SYSTEM, ChatMessage("user", "What is 6 times 7?")]
    session = await engine.start(history)
    first = await session.generate(options)
    rounds.append((first.text, list(session.state.tokens)))
    await session.append(ChatMessage("observation", '{"result": 42}', name="calculate"))
    second = await session.generate(options)
    rounds.append((second.text, list(session.state.tokens)))
    await session.close()
    history += [
        ChatMessage("assistant", first.text),
        ChatMessage("observation", '{"result": 42}', name="calculate"),
    ]
    history += [ChatMessage("assistant", second.text), ChatMessage("user", "And 7 times 8?")]
    session = await engine.start(history)
    third = await session.generate(options)
    rounds.append((third.text, list(session.state.tokens)))
    await session.close()
    return rounds


async def _run(
    folder: Path, compile: str, prepare: Any = None
) -> tuple[list[tuple[str, list[int]]], LocalEngine]:
    engine = LocalEngine.load(folder, device="cpu", dtype="float32", seed=1, kv_cache_gb=0.5, compile=compile)
    if prepare is not None:
        prepare(engine)
    try:
        return await _conversation(engine), engine
    finally:
        await engine.aclose()


@pytest.fixture(scope="module")
def eager(folder: Path) -> list[tuple[str, list[int]]]:
    import asyncio

    rounds, _ = asyncio.run(_run(folder, "off"))
    return rounds


async def test_compiled_decode_gives_the_eager_greedy_ids(
    folder: Path, eager: list[tuple[str, list[int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    buckets: list[int] = []  # the static cache's length at each compiled step
    run = CompiledDecode.run

    def counted(self: CompiledDecode, token: int, position: int) -> torch.Tensor:
        buckets.append(self.bucket)
        return run(self, token, position)

    monkeypatch.setattr(CompiledDecode, "run", counted)
    rounds, engine = await _run(folder, "on")
    assert engine.compiled is not None
    assert not engine.compiled.failed
    assert rounds == eager
    assert len(buckets) >= 3 * 11 and set(buckets) == {
        256
    }  # the compiled step decoded (12 per round, less the last)


async def test_a_compile_failure_is_logged_once_and_the_eager_path_answers(
    folder: Path, eager: list[tuple[str, list[int]]], caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def broken(graph: Any, example_inputs: Any) -> Any:
        calls.append(1)
        raise RuntimeError("injected backend failure")

    def use_broken(engine: LocalEngine) -> None:
        assert engine.compiled is not None
        engine.compiled.backend = broken

    with caplog.at_level(logging.ERROR, logger="yanray.engine.compiled"):
        rounds, engine = await _run(folder, "on", use_broken)
    assert rounds == eager
    assert calls == [1]  # tried once; the later rounds did not try again
    failures = [r for r in caplog.records if "compiled decode failed" in r.getMessage()]
    assert len(failures) == 1
    assert engine.compiled is not None and engine.compiled.failed


async def test_int8_linears_in_the_compiled_step_use_the_fused_form(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dequant-fused `F.linear(x, w.to(x.dtype)) * scale` (chosen where it measures faster,
    i.e. on a GPU; forced here) gives the INT8 model's eager greedy ids."""
    import yanray.engine.int8_linear as int8_linear
    from yanray.engine.int8 import quantize_folder

    quantized = tmp_path / "int8"
    quantize_folder(folder, quantized, progress=False)
    eager, _ = await _run(quantized, "off")
    chosen: list[str] = []

    def fused(*args: Any, **kwargs: Any) -> str:
        chosen.append("fused")
        return "fused"

    monkeypatch.setattr(int8_linear, "pick_compiled_int8", fused)
    linears: list[Any] = []

    def find_linears(engine: LocalEngine) -> None:
        linears.extend(m for m in engine.model.modules() if isinstance(m, int8_linear.Int8Linear))

    rounds, engine = await _run(quantized, "on", find_linears)
    assert engine.compiled is not None and not engine.compiled.failed
    assert chosen == ["fused"] and linears and {m.compiled_kernel for m in linears} == {"fused"}
    assert rounds == eager


def test_compile_setting_and_buckets() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compile_enabled("auto", cpu) and compile_enabled("auto", cuda)
    assert compile_enabled("on", cpu) and not compile_enabled("off", cuda)
    with pytest.raises(ValueError, match="YANRAY_COMPILE"):
        compile_enabled("sometimes", cpu)
    assert [bucket_for(n, 32768) for n in (1, 4096, 4097, 9000, 20000, 32768)] == [
        4096, 4096, 8192, 16384, 32768, 32768,
    ]  # fmt: skip
    assert bucket_for(300, 256) == 256  # never past the context


async def _one_round(engine: LocalEngine, question: str, tokens: int, started: Any = None) -> list[int]:
    session = await engine.start([SYSTEM, ChatMessage("user", question)])
    before = session.tokens

    def on_text(_piece: str) -> None:
        if started is not None:
            started.set()

    await session.generate(GenerateOptions(max_new_tokens=tokens, temperature=0), on_text)
    ids = session.state.tokens[before:]
    await session.close()
    return ids


async def test_a_round_decoding_alone_hands_its_compiled_tokens_over_when_another_joins(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled decode and batching together: the leader decodes alone through the compiled step,
    a second conversation joins (the step's tokens go back to the leader's cache, the batched
    steps run eagerly), and each reply is the one it writes alone, eagerly."""
    import asyncio

    questions, tokens = ["What is 6 times 7?", "Tell me a story about a lighthouse"], (40, 8)
    solo = LocalEngine.load(
        folder, device="cpu", dtype="float32", seed=1, kv_cache_gb=0, compile="off", max_batch=1
    )
    try:
        alone = [await _one_round(solo, q, n) for q, n in zip(questions, tokens, strict=True)]
    finally:
        await solo.aclose()
    compiled_steps = 0
    run = CompiledDecode.run

    def counted(self: CompiledDecode, token: int, position: int) -> torch.Tensor:
        nonlocal compiled_steps
        compiled_steps += 1
        return run(self, token, position)

    monkeypatch.setattr(CompiledDecode, "run", counted)
    engine = LocalEngine.load(
        folder, device="cpu", dtype="float32", seed=1, kv_cache_gb=0, compile="on", max_batch=2
    )
    try:
        started = asyncio.Event()
        leader = asyncio.ensure_future(_one_round(engine, questions[0], tokens[0], started))
        await started.wait()
        joined = await _one_round(engine, questions[1], tokens[1])
        together = [await leader, joined]
    finally:
        await engine.aclose()
    assert together == alone
    assert len(alone[0]) == tokens[0]  # the leader wrote on after the other left: alone again
    assert compiled_steps > 0 and engine.compiled is not None and not engine.compiled.failed
