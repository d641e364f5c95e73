"""Benchmark: a long prompt joining while another conversation decodes, prefilled whole vs in pieces.

One conversation decodes; once its text is flowing, a second one with a long prompt (a
history of about `--history` tokens) joins. Measured on the first conversation: the
longest wait between two of its text pieces (how long its reader sees nothing), and on the
second: its time to first token. Two ways in one run, on one engine: the joining prompt
prefilled whole (`join_chunk` as large as the prompt, what the engine did before) and in
pieces between the other's steps (the engine's `join_chunk` for the device). Printed: the
longest stall and the joiner's time to first token each way (medians), and their ratios.

    python bench/joining.py                  # bench/batching.py's random INT8 model, bf16
    python bench/joining.py --history 2000 --model PATH

`bench/engine.py` calls `run()` as its part (join).
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # beside bench/batching.py, also when imported
from batching import SHAPE, _random_model

FILLER = "The lighthouse keeper wrote down the weather, the ships and the birds every day. "


async def _round(engine: Any, history_words: int) -> tuple[float, float]:
    """(the decoding conversation's longest wait between pieces while the other joined, the
    joiner's time to first token), in seconds."""
    from yanray.engine.base import ChatMessage, GenerateOptions

    system = ChatMessage("system", "You are Yanray.")
    first = await engine.start([system, ChatMessage("user", "Tell me a long story about a cat.")])
    stamps: list[float] = []
    flowing = asyncio.Event()

    def on_text(_piece: str) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) >= 3:
            flowing.set()

    options = GenerateOptions(max_new_tokens=10_000)
    decoding = asyncio.ensure_future(first.generate(options, on_text))
    await flowing.wait()
    long_prompt = " ".join([FILLER] * max(1, history_words // len(FILLER.split())))
    second = await engine.start([system, ChatMessage("user", long_prompt + " Summarise this.")])
    joined = time.perf_counter()
    seen = asyncio.Event()
    ttft = 0.0

    def on_second(_piece: str) -> None:
        nonlocal ttft
        if not seen.is_set():
            ttft = time.perf_counter() - joined
            seen.set()

    await second.generate(GenerateOptions(max_new_tokens=2), on_second)
    after = len([s for s in stamps if s > joined])
    while len([s for s in stamps if s > joined]) < after + 2:  # it decodes on after the join
        await asyncio.sleep(0.01)
    options.cancel.set()
    await decoding
    around = [s for s in stamps if s >= joined - 1e-9] or stamps[-1:]
    before = [s for s in stamps if s < joined]
    points = before[-1:] + around
    stall = max(b - a for a, b in zip(points, points[1:], strict=False))
    for session in (first, second):
        await engine._run(engine._close, session.state)
    engine.kept.clear()
    return stall, ttft


def measure(model: Path | None, *, history: int, rounds: int, dtype: str) -> list[str]:
    from yanray.engine.local import LocalEngine

    with tempfile.TemporaryDirectory(prefix="yanray-join-") as tmp:
        folder = model if model is not None else _random_model(Path(tmp) / "model")
        engine = LocalEngine.load(folder, device="auto", dtype=dtype, seed=0, kv_cache_gb=0, max_batch=2)
        pieces = engine.join_chunk
        what = f"random ChatGLM3-shaped INT8 model {SHAPE}" if model is None else str(model)

        async def go() -> dict[str, list[tuple[float, float]]]:
            results: dict[str, list[tuple[float, float]]] = {"whole": [], "pieces": []}
            try:
                await _round(engine, 50)  # warm-up
                for _ in range(rounds):
                    for way, chunk in (("whole", 1 << 30), ("pieces", pieces)):
                        engine.join_chunk = chunk
                        results[way].append(await _round(engine, history))
            finally:
                await engine.aclose()
            return results

        results = asyncio.run(go())
        device = engine.device
    stall = {way: statistics.median(s for s, _ in runs) for way, runs in results.items()}
    ttft = {way: statistics.median(t for _, t in runs) for way, runs in results.items()}
    return [
        f"joining: {what}, {device}, {dtype}; a prompt of about {history} words joins one decoding "
        f"conversation; medians of {rounds}",
        f"joining: the decoding conversation's longest wait between pieces: whole {stall['whole'] * 1000:.0f} ms, "
        f"in pieces of {pieces} tokens {stall['pieces'] * 1000:.0f} ms, ratio {stall['pieces'] / stall['whole']:.2f}",
        f"joining: the joiner's time to first token: whole {ttft['whole'] * 1000:.0f} ms, "
        f"in pieces {ttft['pieces'] * 1000:.0f} ms, ratio {ttft['pieces'] / ttft['whole']:.2f}",
    ]


def run(**kwargs: Any) -> None:
    kwargs.setdefault("model", None)
    kwargs.setdefault("history", 1000)
    kwargs.setdefault("rounds", 3)
    kwargs.setdefault("dtype", "bfloat16")
    model = kwargs.pop("model")
    for line in measure(model, **kwargs):
        print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--history", type=int, default=1000, help="words in the joining prompt")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    run(model=args.model, history=args.history, rounds=args.rounds, dtype=args.dtype)


if __name__ == "__main__":
    main()
