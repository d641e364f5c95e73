"""Benchmark: time to first token of a conversation's next turn, warm (kept KV cache) vs cold.

A conversation with a ~4K-token history has just been answered; the next question arrives
as a new session over the whole history plus the question (what the worker sends). Warm:
the engine kept the previous turn's cache (`engine/kept.py`) and prefills only what is new.
Cold: the kept caches are dropped first, so the whole prompt is prefilled (today's
behaviour with `YANRAY_KV_CACHE_GB=0`). Both generate greedily from the same ids, so their
first tokens must agree; the benchmark checks that.

    python bench/warm_turns.py                 # a random ChatGLM3-shaped model (4 layers, 512 wide)
    python bench/warm_turns.py --model PATH    # any folder YANRAY_MODEL accepts

`bench/engine.py` calls `run()` as its part (a).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from kv_reuse import _history, _random_model  # noqa: E402  (bench/kv_reuse.py's conversation)

QUESTIONS = ["那第二点具体怎么做？", "Can you give an example of that?", "谢谢！最后再总结一句。"]


async def _measure(engine: object, history_tokens: int, repeats: int) -> list[str]:
    from yanray.engine.base import ChatMessage, GenerateOptions
    from yanray.engine.local import LocalEngine

    assert isinstance(engine, LocalEngine)
    base = _history(engine, history_tokens)
    warm_times, cold_times, warm_fed, cold_fed = [], [], [], []
    same = True
    for i in range(repeats):
        question = ChatMessage("user", QUESTIONS[i % len(QUESTIONS)] + f" ({i})")
        session = await engine.start(base)  # the turn just answered: its cache is kept at close
        reply = await session.generate(GenerateOptions(max_new_tokens=16))
        await session.close()
        prompt = [*base, ChatMessage("assistant", reply.text), question]
        firsts = []
        for warm in (True, False):
            if not warm:
                await engine._run(engine.kept.clear)
            start = time.perf_counter()
            session = await engine.start(prompt)
            first = await session.generate(GenerateOptions(max_new_tokens=1))
            took = time.perf_counter() - start
            firsts.append(list(session.state.tokens))
            await engine._run(engine._close, session.state)  # not kept: the next repeat starts alike
            (warm_times if warm else cold_times).append(took)
            (warm_fed if warm else cold_fed).append(first.prompt_tokens)
        same = same and firsts[0] == firsts[1]
        await engine._run(engine.kept.clear)
    warm_s, cold_s = statistics.median(warm_times), statistics.median(cold_times)
    total = engine.count_tokens(prompt)
    return [
        f"(a) next turn after a {total}-token history, time to first token (median of {repeats}): "
        f"warm {warm_s * 1000:.0f} ms (prefilled {statistics.median(warm_fed):.0f} tokens), "
        f"cold {cold_s * 1000:.0f} ms (prefilled {statistics.median(cold_fed):.0f}), "
        f"warm/cold = {warm_s / cold_s:.3f} (goal <= 0.15); same first token: {'yes' if same else 'NO'}"
    ]


def measure(
    model: Path | None = None, *, history_tokens: int = 4096, repeats: int = 3, dtype: str = "auto"
) -> list[str]:
    from yanray.engine.local import LocalEngine

    with tempfile.TemporaryDirectory(prefix="yanray-warm-") as tmp:
        folder = model if model is not None else _random_model(Path(tmp) / "model")
        engine = LocalEngine.load(folder, device="auto", dtype=dtype, seed=0, kv_cache_gb=2.0)
        what = "random ChatGLM3-shaped model, 4 layers, 512 wide" if model is None else str(model)
        header = f"(a) {what}, on {engine.device}, {engine.model.dtype}"

        async def run() -> list[str]:
            try:
                await _measure(engine, 256, 1)  # warm-up
                return [header, *await _measure(engine, history_tokens, repeats)]
            finally:
                await engine.aclose()

        return asyncio.run(run())


def run() -> None:
    for line in measure():
        print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--history", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    for line in measure(args.model, history_tokens=args.history, repeats=args.repeats, dtype=args.dtype):
        print(line, flush=True)


if __name__ == "__main__":
    main()
