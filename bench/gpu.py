"""GPU benchmark: a ChatGLM3-6B-32K-shaped INT8 model at 2K, 8K and 32K tokens of context.

    python bench/gpu.py           # needs CUDA; prints a skip line without it
    python bench/gpu.py --tiny    # a small shape on the CPU: a smoke test of this script

The weights are random and generated directly in INT8 on the GPU (no download, no 12 GB
file): the model is built on the meta device, its block Linears, embedding and output layer
swapped for Yanray's INT8 modules (`engine/int8_linear.py`, the default plan of
`yanray quantize`), and the random tensors assigned, as `load_int8_model` does. Prefill and
decode are the engine's own steps (`engine/generate.py`: 2048-token prefill chunks, one
token per decode step, transformers' DynamicCache).

Printed per context: peak GPU memory (max allocated, the figure the 7.0 GB target is about),
prefill time, decode tokens/s, bytes read per decoded token (every weight byte except the
embedding table, of which one row is read, plus the KV cache at that length), achieved
bandwidth = bytes/token x tokens/s, and its fraction of the card's memory bandwidth (from
the table below; "unknown" for other cards).

Then, for issue 9 (`bench/gpu_parts.py`, which says how each is measured): eager versus
compiled decode (`engine/compiled.py`); the INT8 matmul forms (`_weight_int8pack_mm`, the
compiled dequant-fused form, a 16-bit weight) at 1, 4 and 8 rows; aggregate decode at batch
1, 4 and 8 by a plain batched forward of the model; the first token of a warm turn; each at
the three contexts, and the goals: at least 50% of the card's bandwidth at batch 1 (compiled),
at least 4 times the batch-1 throughput at batch 8. Sized for about 9 minutes on a recent
GPU; a part is skipped when the budget is used up.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

#: memory bandwidth in TB/s by card name (most specific first; matched as a substring)
CARD_BANDWIDTH_TBPS: list[tuple[str, float]] = [
    # Pascal mining cards (no display output): P102-100 320-bit GDDR5X at 11 Gbps (sold with 5 GB,
    # 10 GB boards are common), P104-100 256-bit GDDR5X at 10 Gbps, P106-100 6 GB 192-bit GDDR5 at 8 Gbps
    ("P102-100", 0.44), ("P104-100", 0.32), ("P106-100", 0.192),
    ("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100-SXM4-80GB", 2.039), ("A100 80GB", 1.935),
    ("A100", 1.555), ("L40S", 0.864), ("L40", 0.864), ("L4", 0.3), ("A10G", 0.6), ("A10", 0.6),
    ("RTX 6000 Ada", 0.96), ("RTX A6000", 0.768), ("RTX 5090", 1.792), ("RTX 5080", 0.96),
    ("RTX 4090", 1.008), ("RTX 4080", 0.717), ("RTX 4070 Ti", 0.504), ("RTX 4070", 0.504),
    ("RTX 4060 Ti", 0.288), ("RTX 3090 Ti", 1.008), ("RTX 3090", 0.936), ("RTX 3080 Ti", 0.912),
    ("RTX 3080", 0.76), ("RTX 3070", 0.448), ("RTX 3060", 0.36), ("RTX 2080 Ti", 0.616),
    ("RTX 2080", 0.448), ("RTX 2070", 0.448), ("TITAN RTX", 0.672), ("GTX 1080 Ti", 0.484),
    ("GTX 1080", 0.32), ("GTX 1070", 0.256), ("Tesla T4", 0.32), ("V100", 0.9), ("P100", 0.732),
    ("P40", 0.347),
]  # fmt: skip

CHATGLM3_6B_32K = {
    "model_type": "chatglm", "add_bias_linear": False, "add_qkv_bias": True, "ffn_hidden_size": 13696,
    "hidden_size": 4096, "kv_channels": 128, "layernorm_epsilon": 1e-05, "rope_ratio": 50,
    "multi_query_attention": True, "multi_query_group_num": 2, "num_attention_heads": 32, "num_layers": 28,
    "original_rope": True, "padded_vocab_size": 65024, "post_layer_norm": True, "rmsnorm": True,
    "seq_length": 32768, "eos_token_id": 2, "pad_token_id": 0,
}  # fmt: skip
TINY = {"hidden_size": 256, "ffn_hidden_size": 688, "num_attention_heads": 2, "num_layers": 2}
BUDGET_S = 150.0  # the first table's
TOTAL_S = 540.0  # everything


def card_bandwidth(name: str) -> float | None:
    """TB/s of a card by its CUDA name, or None when it is not in the table."""
    for key, tbps in CARD_BANDWIDTH_TBPS:
        if key.lower() in name.lower():
            return tbps
    return None


def random_int8_model(cfg: dict[str, Any], *, device: torch.device, dtype: torch.dtype,
                      keep_16bit_outer: bool = False) -> Any:  # fmt: skip
    """A ChatGLM3-shaped GlmForCausalLM with random INT8 weights made on `device`."""
    from yanray.engine.int8 import plan_modules
    from yanray.engine.int8_linear import QMAX, convert_for_runtime, pick_kernel, set_kernel
    from yanray.engine.skeleton import meta_model, rebuild_meta_buffers

    skeleton = meta_model(cfg)
    model, config = skeleton.model, skeleton.config
    linear, embedding = plan_modules(model, config, keep_16bit_outer=keep_16bit_outer)
    convert_for_runtime(model, linear + embedding, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    for name, meta in model.state_dict().items():
        if meta.dtype == torch.int8:  # uniform in [-127, 127]: std ~73, so the scale below gives std 0.02
            state[name] = torch.randint(-QMAX, QMAX + 1, meta.shape, dtype=torch.int8, device=device)
        elif name.endswith("weight_scale"):
            state[name] = torch.full(meta.shape, 0.02 / 73.3, dtype=dtype, device=device)
        elif name.endswith("norm.weight"):
            state[name] = torch.ones(meta.shape, dtype=dtype, device=device)
        elif name.endswith("bias"):
            state[name] = torch.zeros(meta.shape, dtype=dtype, device=device)
        else:
            state[name] = torch.randn(meta.shape, dtype=dtype, device=device) * 0.02
    model.load_state_dict(state, assign=True, strict=True)
    del state
    rebuild_meta_buffers(model, device)
    set_kernel(model, pick_kernel(device, dtype))
    model.config.dtype = dtype
    return model.eval().requires_grad_(False)


def read_bytes_per_token(model: Any, cache: Any) -> int:
    """Weight bytes a decode step reads (one embedding row) plus the KV cache's bytes."""
    embed = model.get_input_embeddings()
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("model.embed_tokens.") or "rotary" in name:
            continue
        total += tensor.numel() * tensor.element_size()
    total += embed.weight.shape[1] * embed.weight.element_size()
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _gib(value: float) -> str:
    return "n/a (CPU)" if value != value else f"{value:.2f} GiB ({value * 2**30 / 1e9:.2f} GB)"


def run_context(model: Any, context: int, decode: int, device: torch.device) -> dict[str, float]:
    from transformers import DynamicCache

    from yanray.engine.generate import decode_one_token, prefill

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(context)
    prompt = torch.randint(3, 60000, (context,), generator=gen).tolist()
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        start = time.perf_counter()
        logits = prefill(model, cache, prompt, 0, device)
        _sync(device)
        prefill_s = time.perf_counter() - start
        token = int(logits.argmax())
        logits = decode_one_token(model, cache, token, context, device)  # warm-up step
        _sync(device)
        start = time.perf_counter()
        for i in range(decode):
            token = int(logits.argmax())
            logits = decode_one_token(model, cache, token, context + 1 + i, device)
        _sync(device)
        decode_s = time.perf_counter() - start
    result = {
        "context": context, "peak_gib": _peak(device), "prefill_s": prefill_s, "tok_s": decode / decode_s,
        "bytes": read_bytes_per_token(model, cache),
    }  # fmt: skip
    del cache, logits
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a small shape on the CPU (smoke test)")
    parser.add_argument("--decode", type=int, default=64, help="tokens decoded per context (default 64)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    if args.tiny:
        device, dtype, cfg = torch.device("cpu"), torch.float32, {**CHATGLM3_6B_32K, **TINY}
        contexts, decode, card, bandwidth = [256, 1024, 4096], min(args.decode, 16), "CPU (--tiny)", None
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py: no CUDA GPU here; skipped (use --tiny for a CPU smoke test of the script)")
            return
        from yanray.engine.device import resolve_dtype

        device = torch.device("cuda", torch.cuda.current_device())
        dtype, cfg = resolve_dtype("auto", device), CHATGLM3_6B_32K
        contexts, decode = [2048, 8192, 32768], args.decode
        card = torch.cuda.get_device_name(device)
        bandwidth = card_bandwidth(card)
    print(f"device: {card}, compute {str(dtype).removeprefix('torch.')}, torch {torch.__version__}")
    model = random_int8_model(cfg, device=device, dtype=dtype)
    kernel = next(m.kernel for m in model.modules() if hasattr(m, "kernel"))
    print(f"model: ChatGLM3-6B-32K shape{' (tiny)' if args.tiny else ''}, INT8 blocks + embedding + output "
          f"layer, decode kernel {kernel}; peak memory after load {_gib(_peak(device))}")  # fmt: skip
    rows = []
    for context in contexts:
        if time.perf_counter() - began > BUDGET_S:
            print(f"{context}: skipped, the {BUDGET_S:.0f} s budget is used up")
            continue
        rows.append(run_context(model, context, decode, device))
    print()
    print(
        "| context | peak GPU memory | prefill | decode | bytes read / token | achieved bandwidth | of the card's |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        achieved = r["bytes"] * r["tok_s"] / 1e12
        share = f"{achieved / bandwidth:.0%} of {bandwidth} TB/s" if bandwidth else "unknown"
        print(f"| {r['context']:,} | {_gib(r['peak_gib'])} | "
              f"{r['prefill_s']:.2f} s | {r['tok_s']:.1f} tok/s | {r['bytes'] / 1e9:.2f} GB | "
              f"{achieved * 1000:.0f} GB/s | {share} |")  # fmt: skip
    if kernel == "int8pack" and time.perf_counter() - began < BUDGET_S:
        from yanray.engine.int8_linear import set_kernel

        set_kernel(model, "dequant")
        r = run_context(model, contexts[0], decode, device)
        print(
            f"\ndecode with the dequantize-per-call fallback instead, {contexts[0]:,} context: {r['tok_s']:.1f} tok/s"
        )
    if not args.tiny and time.perf_counter() - began < BUDGET_S:
        del model  # one model on the card at a time: a 10 GB card holds one
        outer = random_int8_model(cfg, device=device, dtype=dtype, keep_16bit_outer=True)
        r = run_context(outer, 8192, min(decode, 16), device)
        print(
            f"embedding + output layer kept 16-bit (`keep_16bit_outer`): 8,192 context peak {_gib(r['peak_gib'])}"
        )
        del outer
        model = random_int8_model(cfg, device=device, dtype=dtype)
    # --tiny: two contexts that share one static-cache bucket, so the CPU compiles once
    issue9(model, cfg, contexts[:2] if args.tiny else contexts, decode, device, dtype, bandwidth,
           deadline=began + TOTAL_S, tiny=args.tiny)  # fmt: skip
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


def issue9(model: Any, cfg: dict[str, Any], contexts: list[int], decode: int, device: torch.device,
           dtype: torch.dtype, bandwidth: float | None, *, deadline: float, tiny: bool) -> None:  # fmt: skip
    """The parts added for issue 9, with its goals."""
    import gpu_parts  # bench/ is on sys.path when this file runs

    from yanray.engine.int8_linear import pick_kernel, set_kernel

    set_kernel(model, pick_kernel(device, dtype))  # the first table may have left the fallback
    compiled = gpu_parts.compiled_table(model, contexts, decode, device, bandwidth, deadline)
    if time.perf_counter() < deadline:
        gpu_parts.kernel_table(cfg, device, dtype, bandwidth, shapes="gate_up" if tiny else "block")
    gains = gpu_parts.batch_table(model, contexts, device, deadline)
    gpu_parts.warm_table(model, contexts, device, deadline)
    print()
    if compiled and bandwidth:
        shares = ", ".join(f"{r['share']:.0%} at {int(r['context']):,}" for r in compiled)
        met = "met" if compiled[0]["share"] >= 0.5 else "not met"
        print(f"goal: at least 50% of the card's bandwidth at batch 1 (compiled decode): {shares}; {met}")
    else:
        print(
            "goal: at least 50% of the card's bandwidth at batch 1: not measured (no compiled figure or unknown card)"
        )
    if gains:
        listed = ", ".join(f"{gain:.2f}x at {context:,}" for context, gain in gains)
        met = "met" if gains[0][1] >= 4 else "not met"
        print(f"goal: at least 4x the batch-1 throughput at batch 8: {listed}; {met}")
    else:
        print("goal: at least 4x the batch-1 throughput at batch 8: not measured")


if __name__ == "__main__":
    main()
