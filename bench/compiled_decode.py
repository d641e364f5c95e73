"""Compiled decode against eager: part (d) of bench/engine.py, and the step timing bench/gpu.py uses.

    python bench/compiled_decode.py            # (d) on the CPU, the shape printed

Both sides run the engine's own steps on the same model and prompt: an eager chunked prefill
into a DynamicCache, then greedy decoding either with `decode_one_token` (eager) or through
`engine/compiled.py`'s `CompiledDecode` (the static cache copied in, the compiled step). The
first compiled round pays the compile; it is timed apart and left out of tokens/s.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
#: (d)'s default shape: the 6B's width and vocabulary, 4 of its 28 layers (compiling 28 on 2 cores takes minutes)
D_SHAPE = {"num_layers": 4}


def _gpu_module() -> Any:
    name = "yanray_bench_gpu"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(
    model: Any, context: int, decode: int, device: torch.device, compiled: Any = None
) -> dict[str, float]:
    """Greedy decode tokens/s after a `context`-token prefill; `compiled`: a CompiledDecode, or None (eager).

    With `compiled`, a first round of 2 tokens compiles (its seconds are `compile_s`); the
    timed round opens the step again, as the engine does each round (the cache copied in)."""
    from transformers import DynamicCache

    from yanray.engine.compiled import EagerStep
    from yanray.engine.generate import prefill

    gen = torch.Generator().manual_seed(context)
    prompt = torch.randint(3, 60000, (context,), generator=gen).tolist()
    cache = DynamicCache(config=model.config)
    result: dict[str, float] = {"compile_s": 0.0}
    with torch.inference_mode():
        logits = prefill(model, cache, prompt, 0, device)
        token, position = int(logits.argmax()), context

        def open_step(budget: int) -> Any:
            return (
                compiled.open(cache, position, budget)
                if compiled is not None
                else EagerStep(model, cache, device)
            )

        start = time.perf_counter()
        step = open_step(decode + 2)
        for _ in range(2):  # warm-up: compiles, captures
            token, position = int(step(token, position).argmax()), position + 1
        step.close()
        _sync(device)
        result["compile_s"] = time.perf_counter() - start
        start = time.perf_counter()
        step = open_step(decode + 1)
        for _ in range(decode):
            token, position = int(step(token, position).argmax()), position + 1
        step.close()
        _sync(device)
        result["tok_s"] = decode / (time.perf_counter() - start)
    if compiled is not None and compiled.failed:
        result["failed"] = 1.0
    return result


def run(*, context: int = 1024, decode: int = 32, shape: dict[str, int] | None = None) -> None:
    """(d): prints eager and compiled decode tokens/s on the CPU, the auto dtype, an INT8 model."""
    from yanray.engine.compiled import CompiledDecode
    from yanray.engine.device import resolve_dtype

    gpu = _gpu_module()
    device = torch.device("cpu")
    dtype = resolve_dtype("auto", device)
    shape = D_SHAPE if shape is None else shape
    cfg = {**gpu.CHATGLM3_6B_32K, **shape}
    model = gpu.random_int8_model(cfg, device=device, dtype=dtype)
    what = f"ChatGLM3-6B shape with {shape}, random INT8 weights, {str(dtype).removeprefix('torch.')}"
    eager = decode_rate(model, context, decode, device)
    compiled = CompiledDecode(model, device, max_context=cfg["seq_length"])
    fast = decode_rate(model, context, decode, device, compiled)
    if fast.get("failed"):
        print(
            f"(d) compiled decode failed on this machine (the log says why); eager {eager['tok_s']:.2f} tok/s"
        )
        return
    print(f"(d) {what}, {context} tokens of context, {decode} tokens greedy, CPU inductor "
          f"(static cache {compiled.bucket}): eager {eager['tok_s']:.2f} tok/s, compiled {fast['tok_s']:.2f} tok/s, "
          f"compiled/eager = {fast['tok_s'] / eager['tok_s']:.2f} (compiling took {fast['compile_s']:.0f} s once)",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run()
