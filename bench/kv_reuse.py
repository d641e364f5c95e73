"""Benchmark: a tool round with the KV cache kept vs prefilling the whole conversation again.

A tool round is: the model has answered with a tool call, the observation is appended, and
the model generates again. With the cache kept (what `LocalEngine` does) only the
observation's tokens are prefilled; without it, the whole conversation is. Both paths
generate from the same token list, greedy, so their outputs must be identical; the
benchmark checks that.

Run from the repository root:

    python bench/kv_reuse.py                 # a random ChatGLM3-shaped model, built in a temp folder
    python bench/kv_reuse.py --model PATH    # any folder YANRAY_MODEL accepts (e.g. an INT8 folder)

`bench/engine.py` calls `run()` as its part (kv); `measure_kv_reuse` returns the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from yanray.engine.base import ChatMessage
    from yanray.engine.local import LocalEngine

REPO = Path(__file__).resolve().parents[1]

TURNS = [
    (
        "帮我总结一下这篇关于城市交通规划的文章的要点，重点说说公共交通和自行车道。",
        "好的。文章主要讲了三点：第一，公共交通要优先发展；第二，自行车道要连成网络；第三，停车政策要配合调整。",
    ),
    (
        "What is the difference between a process and a thread in an operating system?",
        "A process has its own address space; threads share the address space of their process and are "
        "cheaper to create and switch between, but need synchronisation when they touch shared data.",
    ),
    ("明天北京的天气怎么样？需要带伞吗？", "根据预报，明天北京多云转小雨，气温 12 到 19 度，建议带伞。"),
]


@dataclass(frozen=True)
class KvReuseResult:
    history_tokens: int
    kept_seconds: float
    kept_prefilled: int
    replay_seconds: float
    replay_prefilled: int
    same_output: bool

    @property
    def ratio(self) -> float:
        return self.replay_seconds / self.kept_seconds if self.kept_seconds > 0 else float("inf")


def _history(engine: LocalEngine, target: int) -> list[ChatMessage]:
    from yanray.engine.base import ChatMessage

    messages: list[ChatMessage] = [ChatMessage("system", "You are Yanray, a helpful assistant.")]
    i = 0
    while engine.count_tokens(messages) < target:
        user, assistant = TURNS[i % len(TURNS)]
        messages += [ChatMessage("user", user), ChatMessage("assistant", assistant)]
        i += 1
    return [*messages, ChatMessage("user", "请计算 6.5 乘以 7.5。")]


async def _one(engine: LocalEngine, history: int, new_tokens: int, repeats: int) -> KvReuseResult:
    from yanray.engine.base import ChatMessage, GenerateOptions
    from yanray.engine.generate import SessionState
    from yanray.engine.local import LocalSession

    messages = _history(engine, history)
    observation = ChatMessage("observation", '{"result": 48.75}', name="calculate")
    kept_times, replay_times = [], []
    same = True
    kept_prefilled = replay_prefilled = 0
    for _ in range(repeats):
        session = await engine.start(messages)
        await session.generate(GenerateOptions(max_new_tokens=new_tokens))  # the round that "called the tool"
        t0 = time.perf_counter()
        await session.append(observation)
        conversation = list(session.state.tokens)  # the engine thread is idle between calls
        kept = await session.generate(GenerateOptions(max_new_tokens=new_tokens))
        kept_times.append(time.perf_counter() - t0)

        # the same conversation, token for token, with nothing cached
        replay = LocalSession(engine, SessionState(tokens=conversation, tools=()))
        t0 = time.perf_counter()
        again = await replay.generate(GenerateOptions(max_new_tokens=new_tokens))
        replay_times.append(time.perf_counter() - t0)
        same = same and (again.text, again.new_tokens) == (kept.text, kept.new_tokens)
        kept_prefilled, replay_prefilled = kept.prompt_tokens, again.prompt_tokens
        await session.close()
        await replay.close()
    return KvReuseResult(
        history_tokens=engine.count_tokens(messages),
        kept_seconds=statistics.median(kept_times),
        kept_prefilled=kept_prefilled,
        replay_seconds=statistics.median(replay_times),
        replay_prefilled=replay_prefilled,
        same_output=same,
    )


def _random_model(folder: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.model_fixtures import chatglm3_config, random_chatglm3_state, write_chatglm3_folder

    # ChatGLM3's layout (multi-query, 2 kv groups, full vocab), small enough for a CPU run
    cfg = chatglm3_config(
        hidden_size=512,
        kv_channels=64,
        num_attention_heads=8,
        ffn_hidden_size=1368,
        num_layers=4,
        seq_length=8192,
    )
    return write_chatglm3_folder(folder, random_chatglm3_state(cfg, seed=0, std=0.05), cfg)


def measure_kv_reuse(
    model: Path | None = None,
    *,
    history_tokens: Sequence[int] = (1024, 4096),
    new_tokens: int = 8,
    repeats: int = 3,
    device: str = "auto",
    dtype: str = "auto",
) -> list[KvReuseResult]:
    """Time tool rounds at each history length; `model` None builds a random ChatGLM3-shaped one."""
    from yanray.engine.local import LocalEngine

    with tempfile.TemporaryDirectory(prefix="yanray-kv-") as tmp:
        folder = model if model is not None else _random_model(Path(tmp) / "model")
        # no kept conversations: the replay must prefill from scratch (bench/warm_turns.py has them)
        engine = LocalEngine.load(folder, device=device, dtype=dtype, seed=0, kv_cache_gb=0)

        async def run() -> list[KvReuseResult]:
            try:
                await _one(engine, 256, new_tokens, 1)  # warm-up
                return [await _one(engine, n, new_tokens, repeats) for n in history_tokens]
            finally:
                await engine.aclose()

        return asyncio.run(run())


def format_results(results: Sequence[KvReuseResult]) -> str:
    lines = ["(kv) tool round: KV cache kept vs re-prefilling the conversation (median)"]
    for r in results:
        lines.append(
            f"  history {r.history_tokens:5d} tokens: kept {r.kept_seconds * 1000:8.1f} ms "
            f"(prefilled {r.kept_prefilled} tokens), re-prefill {r.replay_seconds * 1000:8.1f} ms "
            f"(prefilled {r.replay_prefilled} tokens), ratio {r.ratio:.1f}x, "
            f"same output: {'yes' if r.same_output else 'NO'}"
        )
    return "\n".join(lines)


def run() -> None:
    """Measure with the defaults and print (what `bench/engine.py` calls for part (kv))."""
    print(format_results(measure_kv_reuse()))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="a model folder (default: random ChatGLM3-shaped)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    results = measure_kv_reuse(
        args.model, new_tokens=args.new_tokens, repeats=args.repeats, device=args.device, dtype=args.dtype
    )
    print(format_results(results))


if __name__ == "__main__":
    main()
