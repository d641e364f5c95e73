"""Device and dtype choice, and the memory guard that runs before any weight is loaded.

`YANRAY_DEVICE` auto picks CUDA when a GPU is visible, else the CPU. `YANRAY_DTYPE` auto
picks bf16 where the GPU has it natively (compute capability 8.0 and up), fp16 on Volta and
Turing (7.x, no bf16 units), and fp32 on Pascal and older (6.x: fp16 runs at 1/64 of the
fp32 rate there). On the CPU it picks bf16 where the CPU computes it natively (AVX512-BF16 or
AMX, as torch reports them, confirmed by a short matmul timing at load) and fp32 elsewhere: on
an AVX2-only CPU bf16 is emulated and prefill runs several times slower than in fp32. An explicit
dtype is obeyed, with a warning where it is slow.

The guard estimates weights + KV cache for the configured context + working memory and
compares it with the free memory of the device (CUDA: `torch.cuda.mem_get_info`; CPU:
`MemAvailable`). If it does not fit, loading is refused with a message that says what
would fit: a shorter `YANRAY_MAX_CONTEXT`, or INT8 weights via `yanray quantize`. Layers
are never offloaded to the CPU: that is the 40 s per token failure this project avoids.

Kept conversations (`engine/kept.py`, `YANRAY_KV_CACHE_GB`) are counted on top: an explicit
budget is part of the estimate (and refused if it does not fit); the default is what is left
after the estimate less a margin (`kept_cache_budget`): on a GPU, all of it less 512 MiB and
5% of the free memory; on the CPU, whose RAM the rest of the machine shares, half of what is
left after a 2 GiB margin, at most 4 GiB.

The estimate is a pure function (`estimate_memory`, `check_fits`) so tests can feed it
made-up free-memory numbers. Working memory is one prefill chunk's activations
(`chunk * (8 * hidden + 3 * intermediate)` elements) plus 384 MiB for the allocator,
kernels' workspaces and the logits; it errs on the safe side by a few hundred MB.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yanray.engine.base import EngineUnavailable
from yanray.engine.skeleton import is_block_linear

logger = logging.getLogger(__name__)

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}
GiB = 1024**3
FIXED_OVERHEAD = 384 * 1024**2
PREFILL_CHUNK = 2048  # the same chunk engine/generate.py prefills with


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a torch device; a missing GPU is refused."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EngineUnavailable(f"YANRAY_DEVICE={name}, but torch sees no CUDA GPU (use auto or cpu)")
        device = torch.device(name)
        return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if name == "cpu":
        return torch.device("cpu")
    raise EngineUnavailable(f"YANRAY_DEVICE={name}: expected auto, cuda, cuda:N or cpu")


def auto_dtype(capability: tuple[int, int] | None, bf16_native: bool) -> torch.dtype:
    """The compute dtype for a GPU of this compute capability (None: the CPU, where
    `bf16_native` says the CPU computes bf16 natively and measured it no slower)."""
    if capability is None:
        return torch.bfloat16 if bf16_native else torch.float32
    major = capability[0]
    if major >= 8 and bf16_native:
        return torch.bfloat16
    if major >= 7:
        return torch.float16  # Volta/Turing: fast fp16, no bf16 units
    return torch.float32  # Pascal and older: fp16 at 1/64 of the fp32 rate


def cpu_bf16_units() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX), as torch detects it."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def cpu_bf16_speedup(*, rows: int = 256, size: int = 1024, repeats: int = 3) -> float:
    """fp32 time / bf16 time of a prefill-shaped matmul on this CPU (median of `repeats`)."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, size).to(dtype)
        w = torch.randn(size, size).to(dtype)
        torch.mm(x, w)  # warm-up
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(x, w)
            runs.append(time.perf_counter() - start)
        timings[dtype] = sorted(runs)[len(runs) // 2]
    return timings[torch.float32] / max(timings[torch.bfloat16], 1e-9)


def cpu_computes_bf16(units: bool, speedup: float | None) -> bool:
    """The CPU's auto choice: bf16 units, and (when measured) bf16 no slower than fp32.

    The timing guards against a machine (a VM, an emulator) that reports the units but runs
    bf16 slowly; 0.9 leaves room for noise on a loaded machine."""
    return units and (speedup is None or speedup >= 0.9)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` or a dtype name, for `device`."""
    name = (name or "auto").strip().lower()
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if name == "auto":
        if device.type == "cuda":
            return auto_dtype(capability, torch.cuda.is_bf16_supported(including_emulation=False))
        units = cpu_bf16_units()
        speedup = cpu_bf16_speedup() if units else None
        dtype = auto_dtype(None, cpu_computes_bf16(units, speedup))
        logger.info(
            "YANRAY_DTYPE=auto on the CPU (%s, bf16 units: %s%s): %s",
            torch.backends.cpu.get_cpu_capability(),
            "yes" if units else "no",
            f", bf16 matmul {speedup:.1f}x the fp32 speed" if speedup is not None else "",
            str(dtype).removeprefix("torch."),
        )
        return dtype
    if name not in _DTYPES:
        raise EngineUnavailable(f"YANRAY_DTYPE={name}: expected auto, bfloat16, float16 or float32")
    dtype = _DTYPES[name]
    if capability is not None and capability[0] < 7 and dtype != torch.float32:
        logger.warning(
            "%s on a compute capability %d.%d GPU is very slow; float32 is faster there", dtype, *capability
        )
    if device.type == "cpu" and dtype == torch.float16:
        logger.warning("float16 on the CPU is slow and not faster than float32")
    return dtype


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a model."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    block_linear_params: int  # weights of the Linears inside the transformer blocks (what INT8 shrinks)
    block_linear_rows: int  # their output channels (one INT8 scale each)
    other_params: int  # embeddings, output layer, norms, biases


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    overhead: int
    kept: int = 0  # the kept conversations' budget, when set explicitly

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead + self.kept


def weight_bytes(shape: ModelShape, *, dtype_size: int, int8: bool) -> int:
    if int8:  # int8 weights, one 16-bit scale per output channel; the rest stays in the compute dtype
        return shape.block_linear_params + 2 * shape.block_linear_rows + shape.other_params * dtype_size
    return (shape.block_linear_params + shape.other_params) * dtype_size


def kv_cache_bytes(shape: ModelShape, *, context: int, dtype_size: int) -> int:
    # keys and values, every layer, every kv head
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * context * dtype_size


def estimate_memory(
    shape: ModelShape, *, context: int, dtype_size: int, int8: bool, weights: int | None = None
) -> MemoryEstimate:
    """`weights`, when known (an INT8 folder's tensors), replaces the estimate from the shape."""
    chunk = min(context, PREFILL_CHUNK)
    activations = chunk * (8 * shape.hidden + 3 * shape.intermediate) * dtype_size
    return MemoryEstimate(
        weights=weights if weights is not None else weight_bytes(shape, dtype_size=dtype_size, int8=int8),
        kv_cache=kv_cache_bytes(shape, context=context, dtype_size=dtype_size),
        overhead=FIXED_OVERHEAD + activations,
    )


def _gb(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def largest_context(
    shape: ModelShape, *, free: int, dtype_size: int, int8: bool, weights: int | None = None
) -> int:
    """The longest context (a multiple of 1024) whose estimate fits in `free`, or 0."""
    per_token = kv_cache_bytes(shape, context=1, dtype_size=dtype_size)
    fixed = estimate_memory(shape, context=PREFILL_CHUNK, dtype_size=dtype_size, int8=int8, weights=weights)
    room = free - fixed.weights - fixed.overhead
    return max(0, room // per_token // 1024 * 1024)


def check_fits(
    shape: ModelShape,
    *,
    free: int,
    context: int,
    dtype: torch.dtype,
    int8: bool,
    where: str = "the GPU",
    weights: int | None = None,
    kept: int = 0,
) -> MemoryEstimate:
    """The estimate, or `EngineUnavailable` saying what would fit in `free` bytes."""
    size = dtype_bytes(dtype)
    estimate = estimate_memory(shape, context=context, dtype_size=size, int8=int8, weights=weights)
    estimate = MemoryEstimate(estimate.weights, estimate.kv_cache, estimate.overhead, kept)
    if estimate.total <= free:
        return estimate
    kind = "INT8" if int8 else str(dtype).removeprefix("torch.")
    options: list[str] = []
    if kept and estimate.total - kept <= free:
        room = (free - estimate.total + kept) / GiB
        raise EngineUnavailable(
            f"YANRAY_KV_CACHE_GB={kept / GiB:g} does not fit: the model in {kind} with a {context}-token "
            f"context needs about {_gb(estimate.total - kept)} of the {_gb(free)} free on {where}; "
            f"set YANRAY_KV_CACHE_GB to at most {room:.1f}, or leave it unset for what is left."
        )
    fits = largest_context(shape, free=free, dtype_size=size, int8=int8, weights=weights)
    if fits >= 1024:
        options.append(f"a shorter context, YANRAY_MAX_CONTEXT={min(fits, context - 1024) or fits}")
    if not int8:
        small = estimate_memory(shape, context=context, dtype_size=size, int8=True)
        int8_fits = largest_context(shape, free=free, dtype_size=size, int8=True)
        if small.total <= free:
            options.append(
                f"INT8 weights (`yanray quantize SRC DST`, then YANRAY_MODEL=DST; about {_gb(small.total)})"
            )
        elif int8_fits >= 1024:
            options.append(f"INT8 weights (`yanray quantize SRC DST`) with YANRAY_MAX_CONTEXT={int8_fits}")
    what = " or ".join(options) if options else "nothing: this model does not fit this device"
    raise EngineUnavailable(
        f"The model in {kind} with a {context}-token context needs about {_gb(estimate.total)} "
        f"(weights {_gb(estimate.weights)}, KV cache {_gb(estimate.kv_cache)}, working memory "
        f"{_gb(estimate.overhead)}), but {where} has {_gb(free)} free. What fits: {what}. "
        "Layers are never offloaded to the CPU."
    )


def kept_cache_budget(requested_gb: float | None, *, left: int, device_type: str) -> int:
    """Bytes for kept conversations: the request, else a default from the `left` bytes."""
    if requested_gb is not None:
        return int(requested_gb * GiB)
    if device_type == "cuda":
        return max(0, int(left * 0.95) - 512 * 1024**2)
    return max(0, min(4 * GiB, (left - 2 * GiB) // 2))


def stored_weight_bytes(files: list[Path], dtype: torch.dtype) -> int:
    """Bytes the tensors in these safetensors files take once loaded: integer tensors as stored,
    floating-point ones in `dtype` (read from the headers only)."""
    from safetensors import safe_open

    size = dtype_bytes(dtype)
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            for key in reader.keys():
                piece = reader.get_slice(key)
                numel = 1
                for dim in piece.get_shape():
                    numel *= dim
                stored = piece.get_dtype()
                total += numel * (size if stored.startswith(("F", "BF")) else _INT_BYTES.get(stored, 4))
    return total


_INT_BYTES = {"I8": 1, "U8": 1, "BOOL": 1, "I16": 2, "I32": 4, "I64": 8}


def free_memory(device: torch.device) -> int | None:
    """Free bytes on `device` (None where it cannot be told)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def model_shape(model: torch.nn.Module, config: Any) -> ModelShape:
    """The shape of a model (built on the meta device is enough) and its config."""
    block_params = block_rows = 0
    for name, module in model.named_modules():
        if is_block_linear(name, module):
            block_params += module.weight.numel()
            block_rows += module.weight.shape[0]
    total = sum(p.numel() for p in model.parameters())  # tied weights are listed once
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    return ModelShape(
        layers=int(config.num_hidden_layers),
        kv_heads=int(getattr(config, "num_key_value_heads", 0) or heads),
        head_dim=int(getattr(config, "head_dim", 0) or hidden // heads),
        hidden=hidden,
        intermediate=int(getattr(config, "intermediate_size", 0) or 4 * hidden),
        block_linear_params=block_params,
        block_linear_rows=block_rows,
        other_params=total - block_params,
    )
