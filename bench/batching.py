"""Benchmark: several conversations at once vs one at a time, through the local engine.

N conversations (different short questions) each generate the same number of tokens, first
one after another on an engine with `max_batch=1`, then all at once on one with
`max_batch=N`. Printed: aggregate decode tokens/s at once divided by one at a time, and the
per-stream slowdown (how much longer each conversation's tokens take when it shares the
steps). Greedy, so the two runs must write the same ids (float32; in 16-bit they may differ
rarely, see `engine/batch.py`); the benchmark says whether they did.

    python bench/batching.py                  # a random ChatGLM3-shaped model, 4 at once
    python bench/batching.py --streams 8 --model PATH
    python bench/batching.py --transformers-cb  # also transformers' ContinuousBatchingManager

`bench/engine.py` calls `run()` as its part (b).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

QUESTIONS = [
    "What is 6 times 7?",
    "请简单介绍一下长城。",
    "Tell me a story about a cat in a lighthouse.",
    "Why is the sky blue?",
    "写一首关于秋天的短诗。",
    "How do I boil an egg?",
    "What is the capital of France?",
    "给我讲个笑话吧。",
]
#: the default shape: ChatGLM3's layout (multi-query, 2 kv groups, full vocabulary) at the mid
#: shape's width (bench/engine.py's MID_SIZE: a quarter of the 6B's) and 8 of its 28 layers
SHAPE = {
    "hidden_size": 1024,
    "kv_channels": 128,
    "num_attention_heads": 8,
    "ffn_hidden_size": 3424,
    "num_layers": 8,
}


def _random_model(folder: Path) -> Path:
    """The default model: a random release at SHAPE, quantized to a Yanray INT8 folder (what a
    CPU user runs: `_weight_int8pack_mm` reads 8-bit weights, so a step is bound by reading them)."""
    sys.path.insert(0, str(REPO))
    from tests.model_fixtures import chatglm3_config, random_chatglm3_state, write_chatglm3_folder
    from yanray.engine.int8 import quantize_folder

    cfg = chatglm3_config(**SHAPE, seq_length=8192)
    release = write_chatglm3_folder(folder / "release", random_chatglm3_state(cfg, seed=0, std=0.05), cfg)
    quantize_folder(release, folder / "int8", progress=False)
    return folder / "int8"


async def _conversations(
    engine: Any, count: int, tokens: int, *, together: bool
) -> tuple[float, list[list[int]]]:
    from yanray.engine.base import ChatMessage, GenerateOptions

    async def one(index: int) -> list[int]:
        prompt = [
            ChatMessage("system", "You are Yanray."),
            ChatMessage("user", QUESTIONS[index % len(QUESTIONS)]),
        ]
        session = await engine.start(prompt)
        before = session.tokens
        await session.generate(GenerateOptions(max_new_tokens=tokens))
        ids = list(session.state.tokens[before:])
        await engine._run(engine._close, session.state)  # not kept: every run starts alike
        return ids

    start = time.perf_counter()
    if together:
        written = list(await asyncio.gather(*(one(i) for i in range(count))))
    else:
        written = [await one(i) for i in range(count)]
    return time.perf_counter() - start, written


def measure(
    model: Path | None = None, *, streams: int = 4, tokens: int = 48, dtype: str = "bfloat16"
) -> list[str]:
    from yanray.engine.local import LocalEngine

    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="yanray-batch-") as tmp:
        folder = model if model is not None else _random_model(Path(tmp) / "model")
        what = f"random ChatGLM3-shaped INT8 model {SHAPE}" if model is None else str(model)
        results = {}
        for batch in (1, streams):
            engine = LocalEngine.load(
                folder, device="auto", dtype=dtype, seed=0, kv_cache_gb=0, max_batch=batch
            )
            if batch == 1:
                lines.append(f"(b) {what}, on {engine.device}, {engine.model.dtype}; {streams} conversations, "
                             f"{tokens} new tokens each, short prompts (prefill included)")  # fmt: skip

            async def go(engine: Any = engine, batch: int = batch) -> tuple[float, list[list[int]]]:
                try:
                    await _conversations(engine, 2, 4, together=batch > 1)  # warm-up
                    return await _conversations(engine, streams, tokens, together=batch > 1)
                finally:
                    await engine.aclose()

            results[batch] = asyncio.run(go())
        (alone_s, alone_ids), (together_s, together_ids) = results[1], results[streams]
        total = sum(len(ids) for ids in together_ids)
        alone_rate, together_rate = sum(len(ids) for ids in alone_ids) / alone_s, total / together_s
        per_stream_alone = alone_s / streams  # one conversation's time when it has the steps alone
        lines.append(
            f"(b) one at a time: {alone_rate:.1f} tok/s; {streams} at once: {together_rate:.1f} tok/s aggregate; "
            f"ratio {together_rate / alone_rate:.2f} (goal >= 2 on the CPU, >= 4 on a GPU at 8); "
            f"per-stream slowdown {together_s / per_stream_alone:.2f}x; "
            f"{_agreement(alone_ids, together_ids)}"
        )
    return lines


def measure_transformers_cb(
    model: Path | None = None, *, streams: int = 4, tokens: int = 48, dtype: str = "bfloat16"
) -> list[str]:
    """The same conversations through transformers' `model.init_continuous_batching()` (the
    alternative issue 9 names), on the same loaded model: its wall time and whether it writes
    the same greedy ids as our engine one at a time."""
    from transformers import GenerationConfig

    from yanray.engine.base import ChatMessage
    from yanray.engine.local import LocalEngine

    with tempfile.TemporaryDirectory(prefix="yanray-batch-") as tmp:
        folder = model if model is not None else _random_model(Path(tmp) / "model")
        engine = LocalEngine.load(folder, device="auto", dtype=dtype, seed=0, kv_cache_gb=0, max_batch=1)
        _s, alone = asyncio.run(_conversations(engine, streams, tokens, together=False))
        prompts = [
            engine.fmt.prompt_ids(
                [ChatMessage("system", "You are Yanray."), ChatMessage("user", QUESTIONS[i])], ()
            )
            for i in range(streams)
        ]
        config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1)
        manager = engine.model.init_continuous_batching(generation_config=config)
        manager.start()
        try:
            for warm in (True, False):
                start = time.perf_counter()
                ids = [manager.add_request(p, max_new_tokens=4 if warm else tokens) for p in prompts]
                got: dict[str, list[int]] = {}
                while len(got) < len(ids):
                    out = manager.get_result(timeout=600)
                    if out is None:
                        return [
                            f"(b) transformers continuous batching: no result ({manager.background_thread_status.fatal_error})"
                        ]
                    got[out.request_id] = list(out.generated_tokens)
                took = time.perf_counter() - start
        finally:
            manager.stop(block=True)
        written = [got[i][: len(a)] for i, a in zip(ids, alone, strict=True)]
        rate = sum(len(g) for g in got.values()) / took
        attention = engine.model.config._attn_implementation
        asyncio.run(engine.aclose())
        return [
            f"(b) transformers ContinuousBatchingManager ({attention}), {streams} at once: "
            f"{rate:.1f} tok/s aggregate in {took:.2f} s; {_agreement(alone, written)}"
        ]


def _agreement(alone: list[list[int]], together: list[list[int]]) -> str:
    """Whether two runs wrote the same greedy ids; if not, for how many tokens each agreed."""
    if alone == together:
        return "same greedy ids as one at a time: yes"
    agreed = []
    for a, b in zip(alone, together, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        agreed.append(n)
    return f"same greedy ids as one at a time: NO, the first {agreed} tokens of each agree"


def run(**kwargs: Any) -> None:
    for line in measure(**kwargs):
        print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        help="bfloat16 (default: what INT8 decodes fastest in on the CPU), auto, ...",
    )
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument(
        "--transformers-cb", action="store_true", help="also transformers' continuous batching"
    )
    args = parser.parse_args(argv)
    run(model=args.model, streams=args.streams, tokens=args.tokens, dtype=args.dtype)
    if args.transformers_cb:
        for line in measure_transformers_cb(
            args.model, streams=args.streams, tokens=args.tokens, dtype=args.dtype
        ):
            print(line, flush=True)


if __name__ == "__main__":
    main()
