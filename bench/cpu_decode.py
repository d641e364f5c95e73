"""Benchmark: CPU decode of a ChatGLM3-6B-shaped INT8 model as a fraction of the machine's read bandwidth.

The model is built in memory (no files): the 6B's skeleton on the meta device, its Linears and
embedding swapped for Yanray's INT8 modules, filled with random int8 weights and small scales.
Decoding one token reads every weight once (the embedding only one row), so

    bandwidth used = weight bytes read per token * tokens/s,

compared with the read bandwidth of the same machine, measured in the same run by summing a
large fp32 tensor (all threads). It decodes in fp32, in bf16, and in what `YANRAY_DTYPE=auto`
picks here. Medians, since the machine may be shared.

    python bench/cpu_decode.py                 # the 6B shape (~6.3 GB of int8 weights)
    python bench/cpu_decode.py --shape mid     # the 6B's depth and vocabulary, a quarter of its width

`bench/engine.py` calls `run()` as its part (c).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def read_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of summing a `size_bytes` fp32 tensor (median of `repeats`)."""
    data = torch.ones(size_bytes // 4, dtype=torch.float32)
    data.sum()  # warm-up (pages touched)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return size_bytes / statistics.median(times)


def random_int8_model(cfg: dict[str, Any], dtype: torch.dtype) -> tuple[Any, int]:
    """(model, weight bytes read per decoded token): random INT8 weights in memory."""
    from yanray.engine.int8 import plan_modules
    from yanray.engine.int8_linear import Int8Embedding, convert_for_runtime, pick_kernel, set_kernel
    from yanray.engine.skeleton import meta_model, rebuild_meta_buffers

    skeleton = meta_model(cfg)
    model, config = skeleton.model, skeleton.config
    linear, embedding = plan_modules(model, config, keep_16bit_outer=False)
    convert_for_runtime(model, linear + embedding, dtype=dtype)
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        ):
            if not tensor.is_meta:
                continue
            if tensor.dtype == torch.int8:
                value = torch.randint(-127, 128, tensor.shape, dtype=torch.int8, generator=gen)
            elif name == "weight_scale":
                value = torch.full(tensor.shape, 0.02 / 127 * 3, dtype=dtype)
            elif "norm" in type(module).__name__.lower():
                value = torch.ones(tensor.shape, dtype=dtype)
            else:
                value = (torch.randn(tensor.shape, generator=gen) * 0.02).to(dtype)
            if isinstance(tensor, torch.nn.Parameter):
                setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
            else:
                module.register_buffer(name, value)
    rebuild_meta_buffers(model, cpu)
    set_kernel(model, pick_kernel(cpu, dtype))
    model.config.dtype = dtype
    read = 0
    for module in model.modules():
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if isinstance(module, Int8Embedding) and tensor.dtype == torch.int8:
                continue  # one row per token
            read += tensor.numel() * tensor.element_size()
    return model.eval().requires_grad_(False), read


def decode_rate(model: Any, *, prompt: int, tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, median decode tokens/s) greedy from a random prompt."""
    from transformers import DynamicCache

    from yanray.engine.generate import decode_one_token, prefill

    cpu = torch.device("cpu")
    cache = DynamicCache(config=model.config)
    ids = torch.randint(100, 30000, (prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        start = time.perf_counter()
        logits = prefill(model, cache, ids, 0, cpu)
        prefill_rate = prompt / (time.perf_counter() - start)
        times = []
        for position in range(prompt, prompt + tokens):
            token = int(torch.argmax(logits))
            start = time.perf_counter()
            logits = decode_one_token(model, cache, token, position, cpu)
            times.append(time.perf_counter() - start)
    return prefill_rate, 1 / statistics.median(times)


def measure(shape: str = "6b", *, prompt: int = 16, tokens: int = 4) -> list[str]:
    sys.path.insert(0, str(REPO / "bench"))
    from engine import CHATGLM3_6B_32K, MID_SIZE  # bench/engine.py's shapes
    from yanray.engine.device import resolve_dtype

    cfg = dict(CHATGLM3_6B_32K) if shape == "6b" else {**CHATGLM3_6B_32K, **MID_SIZE}
    auto = resolve_dtype("auto", torch.device("cpu"))
    lines = [
        f"(c) CPU decode, ChatGLM3-6B-32K-shaped INT8 model{'' if shape == '6b' else f' at {MID_SIZE}'}; "
        f"CPU {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
        f"YANRAY_DTYPE=auto picks {str(auto).removeprefix('torch.')} here"
    ]
    bandwidth = read_bandwidth()
    lines.append(f"(c) read bandwidth (sum of a 1 GiB fp32 tensor, median): {bandwidth / GB:.1f} GB/s")
    for dtype in (torch.float32, torch.bfloat16):
        model, read = random_int8_model(cfg, dtype)
        prefill_rate, rate = decode_rate(model, prompt=prompt, tokens=tokens)
        del model
        used = read * rate
        label = str(dtype).removeprefix("torch.") + (" (auto)" if dtype == auto else "")
        lines.append(
            f"(c) {label}: decode {rate:.2f} tok/s (median of {tokens}), {read / GB:.2f} GB read per token "
            f"= {used / GB:.2f} GB/s = {used / bandwidth:.0%} of the read bandwidth (goal >= 50%); "
            f"prefill of {prompt} tokens {prefill_rate:.1f} tok/s"
        )
    return lines


def run(shape: str = "6b") -> None:
    for line in measure(shape):
        print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("6b", "mid"), default="6b")
    parser.add_argument("--tokens", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    for line in measure(args.shape, tokens=args.tokens):
        print(line, flush=True)


if __name__ == "__main__":
    main()
