"""The parts of bench/gpu.py added for issue 9: eager vs compiled decode, the INT8 matmul forms,
batch 1/4/8, and the first token of a warm turn. Each prints its own table (see bench/gpu.py).

- compiled: `bench/compiled_decode.py`'s `decode_rate` (the engine's steps), one
  `CompiledDecode` shared by the contexts so a bucket is compiled once.
- kernels: one transformer block's four Linears of the model's shape (qkv, dense, gate_up,
  down), at 1, 4 and 8 rows: `_weight_int8pack_mm` (eager), the compiled dequant-fused
  `F.linear(x, w.to(x.dtype)) * scale` (inductor, `coordinate_descent_tuning` on CUDA) and a
  16-bit weight's plain `F.linear`; the bytes of the weights read / time as GB/s. These do
  not depend on the context.
- batch: a plain batched forward of the model (the first prompt's cache repeated B times,
  one eager decode step of B rows at a time); the engine's own batching (issue 9 item 2) is
  not used here. Aggregate tokens/s at B over B=1, and the per-stream slowdown.
- warm: time to the first token of a turn adding `new` tokens to a `context`-token history,
  with the history's cache kept (prefill the new tokens only) and without (prefill it all).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, repeats: int = 20) -> float:
    """Seconds per call, after two warm-up calls."""
    fn()
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def compiled_table(model: Any, contexts: list[int], decode: int, device: torch.device,
                   bandwidth: float | None, deadline: float) -> list[dict[str, float]]:  # fmt: skip
    from compiled_decode import decode_rate  # bench/ is on sys.path when bench/gpu.py runs

    from yanray.engine.compiled import CompiledDecode

    compiled = CompiledDecode(model, device, max_context=max(contexts) + decode + 64)
    rows = []
    print(
        "\n| context | eager decode | compiled decode | compiled/eager | first compile | compiled bandwidth |"
    )
    print("|---|---|---|---|---|---|")
    for context in contexts:
        if time.perf_counter() > deadline:
            print(f"| {context:,} | skipped: the time budget is used up |")
            continue
        eager = decode_rate(model, context, decode, device)
        fast = decode_rate(model, context, decode, device, compiled)
        if fast.get("failed"):
            print(f"| {context:,} | {eager['tok_s']:.1f} tok/s | compile failed (see the log) |")
            return rows
        bytes_per_token = _bytes_per_token(model, context)
        achieved = bytes_per_token * fast["tok_s"] / 1e12
        share = f"{achieved / bandwidth:.0%} of {bandwidth} TB/s" if bandwidth else "unknown card"
        print(f"| {context:,} | {eager['tok_s']:.1f} tok/s | {fast['tok_s']:.1f} tok/s | "
              f"{fast['tok_s'] / eager['tok_s']:.2f} | {fast['compile_s']:.0f} s | "
              f"{achieved * 1000:.0f} GB/s, {share} |")  # fmt: skip
        rows.append({"context": context, "share": achieved / bandwidth if bandwidth else float("nan")})
    compiled.drop()
    return rows


def _bytes_per_token(model: Any, context: int) -> int:
    """Weight bytes read per decoded token (one embedding row) plus the KV cache at `context`."""
    from yanray.engine.compiled import static_cache_bytes

    embed = model.get_input_embeddings()
    total = embed.weight.shape[1] * embed.weight.element_size()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith("model.embed_tokens.") and "rotary" not in name:
            total += tensor.numel() * tensor.element_size()
    return total + static_cache_bytes(model, context)


def kernel_table(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, bandwidth: float | None,
                 *, shapes: str = "block") -> None:  # fmt: skip
    from yanray.engine.int8_linear import QMAX

    hidden, ffn = cfg["hidden_size"], cfg["ffn_hidden_size"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["multi_query_group_num"]) * cfg["kv_channels"]
    block = [(qkv, hidden), (hidden, hidden), (2 * ffn, hidden), (hidden, ffn)]
    matrices = block if shapes == "block" else [(2 * ffn, hidden)]
    half = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    options = {"coordinate_descent_tuning": True} if device.type == "cuda" else None
    gen = torch.Generator().manual_seed(0)
    weights = []
    for out, inp in matrices:
        q = torch.randint(-QMAX, QMAX + 1, (out, inp), generator=gen, dtype=torch.int8).to(device)
        weights.append((q, torch.full((out,), 1e-3, dtype=dtype, device=device), q.to(half)))
    int8_bytes = sum(q.numel() for q, _, _ in weights)
    names = "one block's qkv, dense, gate_up and down" if shapes == "block" else "gate_up"
    print(f"\nINT8 matmul forms, {names} ({int8_bytes / 1e6:.1f} MB of int8 weights), compute "
          f"{str(dtype).removeprefix('torch.')}, 16-bit baseline {str(half).removeprefix('torch.')} (not context-dependent):")  # fmt: skip
    print("| rows | _weight_int8pack_mm | compiled fused | 16-bit F.linear | int8pack time / fused time |")
    print("|---|---|---|---|---|")

    def rate(seconds: float, nbytes: int) -> str:
        gbs = nbytes / seconds / 1e9
        share = f", {gbs / (bandwidth * 1000):.0%}" if bandwidth else ""
        return f"{seconds * 1e6:.0f} µs ({gbs:.0f} GB/s{share})"

    # one compiled graph per (shape, rows): 12, more than dynamo's default limit of 8 per function
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    fused = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s, options=options, dynamic=False)
    for rows in (1, 4, 8):
        x = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
        xs = [
            x if inp == hidden else torch.randn(rows, inp, generator=gen).to(device, dtype)
            for _, inp in matrices
        ]
        xh = [a.to(half) for a in xs]
        cells, seconds = [], {}
        pairs = list(zip(xs, weights, strict=True))
        halves = list(zip(xh, weights, strict=True))

        def pack(pairs: list[Any] = pairs) -> list[torch.Tensor]:
            return [torch.ops.aten._weight_int8pack_mm(a, q, s) for a, (q, s, _) in pairs]

        def fuse(pairs: list[Any] = pairs) -> list[torch.Tensor]:
            return [fused(a, q, s) for a, (q, s, _) in pairs]

        def dense(halves: list[Any] = halves) -> list[torch.Tensor]:
            return [F.linear(a, h) for a, (_, _, h) in halves]

        with torch.inference_mode():
            try:
                seconds["pack"] = _time(pack, device)
                cells.append(rate(seconds["pack"], int8_bytes))
            except (RuntimeError, NotImplementedError) as exc:
                cells.append(f"n/a ({str(exc).splitlines()[0][:60]})")
            seconds["fused"] = _time(fuse, device)
            cells.append(rate(seconds["fused"], int8_bytes))
            seconds["half"] = _time(dense, device)
            cells.append(rate(seconds["half"], 2 * int8_bytes))
        ratio = f"{seconds['pack'] / seconds['fused']:.2f}" if "pack" in seconds else "n/a"
        print(f"| {rows} | {' | '.join(cells)} | {ratio} |")


def batch_table(model: Any, contexts: list[int], device: torch.device, deadline: float,
                steps: int = 16) -> list[tuple[int, float]]:  # fmt: skip
    from transformers import DynamicCache

    from yanray.engine.generate import prefill

    print(f"\nbatch 1, 4 and 8: a plain batched eager forward of the model, {steps} steps "
          "(not the engine's batching); aggregate tokens/s, and over batch 1:")  # fmt: skip
    print("| context | batch 1 | batch 4 | batch 8 | batch 8 / batch 1 | per-stream slowdown at 8 |")
    print("|---|---|---|---|---|---|")
    gains = []
    for context in contexts:
        if time.perf_counter() > deadline:
            print(f"| {context:,} | skipped: the time budget is used up |")
            continue
        gen = torch.Generator().manual_seed(context)
        prompt = torch.randint(3, 60000, (context,), generator=gen).tolist()
        base = DynamicCache(config=model.config)
        rates: dict[int, float] = {}
        cells = []
        with torch.inference_mode():
            prefill(model, base, prompt, 0, device)
            for batch in (1, 4, 8):
                try:
                    cache = DynamicCache(config=model.config)
                    for index, layer in enumerate(base.layers):
                        cache.update(
                            layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1), index
                        )
                    ids = torch.full((batch, 1), 5, dtype=torch.long, device=device)
                    _sync(device)
                    start = time.perf_counter()
                    for i in range(steps):
                        positions = torch.full((batch, 1), context + i, dtype=torch.long, device=device)
                        logits = model(
                            input_ids=ids, position_ids=positions, cache=cache, use_cache=True
                        ).logits
                        ids = logits[:, -1].argmax(-1, keepdim=True)
                    _sync(device)
                    rates[batch] = batch * steps / (time.perf_counter() - start)
                    cells.append(f"{rates[batch]:.1f} tok/s")
                except torch.OutOfMemoryError:
                    cells.append("out of memory")
                del cache
        if 1 in rates and 8 in rates:
            gains.append((context, rates[8] / rates[1]))
            tail = f"{rates[8] / rates[1]:.2f}x | {8 * rates[1] / rates[8]:.2f}x"
        else:
            tail = "n/a | n/a"
        print(f"| {context:,} | {' | '.join(cells)} | {tail} |")
        del base
    return gains


def warm_table(model: Any, contexts: list[int], device: torch.device, deadline: float, new: int = 64) -> None:
    from transformers import DynamicCache

    from yanray.engine.generate import prefill

    print(f"\ntime to the first token of a turn adding {new} tokens (the engine's chunked prefill):")
    print("| history | warm (cache kept) | cold (prefill all) | warm / cold |")
    print("|---|---|---|---|")
    for context in contexts:
        if time.perf_counter() > deadline:
            print(f"| {context:,} | skipped: the time budget is used up |")
            continue
        gen = torch.Generator().manual_seed(context)
        ids = torch.randint(3, 60000, (context + new,), generator=gen).tolist()
        with torch.inference_mode():
            kept = DynamicCache(config=model.config)
            prefill(model, kept, ids[:context], 0, device)
            _sync(device)
            start = time.perf_counter()
            int(prefill(model, kept, ids[context:], context, device).argmax())
            warm = time.perf_counter() - start
            del kept
            cold_cache = DynamicCache(config=model.config)
            _sync(device)
            start = time.perf_counter()
            int(prefill(model, cold_cache, ids, 0, device).argmax())
            cold = time.perf_counter() - start
            del cold_cache
        print(f"| {context:,} | {warm * 1000:.0f} ms | {cold * 1000:.0f} ms | {warm / cold:.3f} |")
