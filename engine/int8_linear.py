"""INT8 weight-only modules: the runtime half of Yanray's INT8 format (`engine/int8.py` is the rest).

`Int8Linear` and `Int8Embedding` hold a weight as int8 (out, in) plus one scale per output
row (per output channel for a Linear, per token for an embedding):
w ≈ weight.float() * weight_scale[:, None], weight_scale = max|w_row| / 127, symmetric, no
zero point. `quantize_rows` makes that pair on the CPU; `convert_for_runtime` swaps a model's
modules (built on the meta device) for these so `load_state_dict(assign=True)` can fill them.

Forward, where the design is silent:

- few rows (decode, one token at a time): `torch.ops.aten._weight_int8pack_mm`, torch's
  fused int8-weight matmul (a CPU kernel, and a CUDA one), which never materialises a
  dequantized weight. `pick_kernel` checks once per load that the kernel exists and agrees
  with the reference, and on a GPU that it is faster than the fallback for one token;
  otherwise the fallback below is used. On the CPU it is used up to `PACK_MAX_ROWS` rows,
  where it was faster (docs/decisions/int8-fused-kernel-rows.md).
- many rows (prefill), or no kernel: dequantize `DEQUANT_CHUNK` weight elements at a time
  (a slice of output rows, ≤ 64 MB in 16-bit), matmul, then scale the output columns; a
  matrix larger than that (the 6B's gate_up and down, lm_head) is never dequantized whole.
- scales are kept in the compute dtype (the kernel requires it); biases too.
- operands of the fused kernel are on a 64-byte boundary (`ALIGNMENT`): on an AVX512 CPU
  torch's kernel reads them with aligned vector loads, and a weight that is a view into a
  file's bytes or an input that is a view into a larger tensor crashed the process with a
  segmentation fault (docs/decisions/int8-fused-kernel-rows.md). `set_kernel` copies a
  misaligned weight once; a misaligned input (a few rows) is copied per call.
- inside a compiled decode step (`engine/compiled.py`), `compiled_kernel` "fused" is the
  plain `F.linear(x, w.to(x.dtype)) * scale`, which inductor fuses into one kernel that reads
  the int8 weight (gpt-fast's recipe); `pick_compiled_int8` measures it against
  `_weight_int8pack_mm` once per engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

Kernel = Literal["int8pack", "dequant"]

QMAX = 127
#: weight elements dequantized at once on the fallback path (32M: 64 MB in bf16)
DEQUANT_CHUNK = 1 << 25
#: bytes to which the fused kernel's operands are aligned (an AVX512 cache line)
ALIGNMENT = 64
#: rows (tokens) up to which the fused kernel is used, by compute dtype
PACK_MAX_ROWS = {torch.float32: 1, torch.float16: 16, torch.bfloat16: 16}


def quantize_rows(weight: torch.Tensor, *, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 per-row scale) of a 2-D float weight, on its device, in row chunks.

    Chunking bounds the float32 temporaries to `chunk_rows` rows whatever the matrix size.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows = weight.shape[0]
    qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
    for start in range(0, rows, chunk_rows):
        block = weight[start : start + chunk_rows].float()  # (r, in)
        amax = block.abs().amax(dim=1)
        # an all-zero row keeps scale 0 and quantizes to zeros (division by 1 instead of 0)
        block_scale = amax / QMAX
        divisor = torch.where(block_scale > 0, block_scale, torch.ones_like(block_scale))
        qweight[start : start + chunk_rows] = (
            torch.round(block / divisor[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        )
        scale[start : start + chunk_rows] = block_scale
    return qweight, scale


def _reference_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, in) @ dequant(weight).T -> (M, out), at most DEQUANT_CHUNK weight elements at a time."""
    rows = max(1, DEQUANT_CHUNK // max(1, weight.shape[1]))
    if weight.shape[0] <= rows:
        return F.linear(x, weight.to(x.dtype)) * scale
    out = x.new_empty(x.shape[0], weight.shape[0])  # (M, out)
    for start in range(0, weight.shape[0], rows):
        out[:, start : start + rows] = F.linear(x, weight[start : start + rows].to(x.dtype))
    return out.mul_(scale)


def pick_kernel(device: torch.device, dtype: torch.dtype) -> Kernel:
    """ "int8pack" if torch's fused kernel works here and matches the reference, else "dequant"."""
    if dtype not in PACK_MAX_ROWS:
        return "dequant"
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 256, generator=gen).to(device=device, dtype=dtype)
    weight = torch.randint(-QMAX, QMAX + 1, (96, 256), generator=gen, dtype=torch.int8).to(device)
    scale = (torch.rand(96, generator=gen) * 1e-2).to(device=device, dtype=dtype)
    try:
        got = torch.ops.aten._weight_int8pack_mm(x, weight, scale)
    except (RuntimeError, NotImplementedError) as exc:
        logger.info("int8 kernel: no fused kernel on %s/%s (%s); dequantizing per call", device, dtype, exc)
        return "dequant"
    want = _reference_matmul(x.float(), weight, scale.float())
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    error = float((got.float() - want).abs().max() / want.abs().max().clamp(min=1e-6))
    if not error <= tolerance:
        logger.warning(
            "int8 kernel: fused kernel disagrees on %s/%s (rel. error %.3g); not used", device, dtype, error
        )
        return "dequant"
    if device.type == "cuda" and not _pack_is_faster(device, dtype):
        logger.info(
            "int8 kernel: the fused kernel is slower than dequantizing on %s/%s; not used", device, dtype
        )
        return "dequant"
    return "int8pack"


def _pack_is_faster(device: torch.device, dtype: torch.dtype, *, repeats: int = 20) -> bool:
    """Time one decode-sized call (1 row, a 4096x4096 weight) both ways on a GPU."""
    x = torch.randn(1, 4096, device=device, dtype=dtype)
    weight = torch.randint(-QMAX, QMAX + 1, (4096, 4096), device=device, dtype=torch.int8)
    scale = torch.full((4096,), 1e-3, device=device, dtype=dtype)
    timings = []
    for fn in (
        lambda: torch.ops.aten._weight_int8pack_mm(x, weight, scale),
        lambda: _reference_matmul(x, weight, scale),
    ):
        fn()  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        timings.append(start.elapsed_time(end))
    return timings[0] < timings[1]


def pick_compiled_int8(
    device: torch.device,
    dtype: torch.dtype,
    *,
    eager: Kernel,
    backend: str | Callable[..., object] = "inductor",
) -> Literal["fused", "eager"]:
    """ "fused" if the compiled dequant-fused matmul is faster than the eager kernel for one
    decode row (a 4096x4096 weight), else "eager". Without the fused eager kernel the fused
    form is taken unmeasured: the eager fallback dequantizes the whole weight per call."""
    if eager != "int8pack":
        return "fused"
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, 4096, generator=gen).to(device=device, dtype=dtype)
    weight = torch.randint(-QMAX, QMAX + 1, (4096, 4096), generator=gen, dtype=torch.int8).to(device)
    scale = torch.full((4096,), 1e-3, device=device, dtype=dtype)
    options: dict[str, str | int | bool | Callable[..., object]] | None = None
    if backend == "inductor" and device.type == "cuda":
        options = {"coordinate_descent_tuning": True}
    fused = torch.compile(
        lambda a, w, s: F.linear(a, w.to(a.dtype)) * s, backend=backend, fullgraph=True, options=options
    )
    packed = torch.compile(
        lambda a, w, s: torch.ops.aten._weight_int8pack_mm(a, w, s), backend=backend, fullgraph=True
    )
    timings = []
    try:
        for fn in (fused, packed):
            timings.append(_time_call(fn, (x, weight, scale), device))
    except Exception as exc:  # a backend that cannot compile one of them
        logger.warning("int8 kernel: cannot measure the compiled forms (%s); keeping the eager kernel", exc)
        return "eager"
    logger.info(
        "int8 kernel, compiled, 1 row of 4096x4096: fused %.3f ms, _weight_int8pack_mm %.3f ms",
        timings[0] * 1e3,
        timings[1] * 1e3,
    )
    return "fused" if timings[0] < timings[1] else "eager"


def _time_call(fn: Callable[..., object], args: tuple[torch.Tensor, ...], device: torch.device) -> float:
    """Seconds per call, best of 3 batches of 10, after a warm-up."""
    with torch.inference_mode():
        fn(*args)
        best = float("inf")
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(10):
                fn(*args)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, (time.perf_counter() - start) / 10)
    return best


class Int8Linear(nn.Module):
    """A Linear with an int8 weight and a per-output-channel scale (weight-only INT8)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel: Kernel = "dequant"
        self.compiled_kernel: Literal["fused", "eager"] = "eager"  # the form inside a compiled step
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        scale = self.weight_scale if self.weight_scale.dtype == x.dtype else self.weight_scale.to(x.dtype)
        if self.compiled_kernel == "fused" and torch.compiler.is_compiling():
            y = F.linear(x2, self.weight.to(x.dtype)) * scale
        elif self.kernel == "int8pack" and x2.shape[0] <= PACK_MAX_ROWS.get(x.dtype, 0):
            x2 = x2.contiguous()
            if not torch.compiler.is_compiling() and not is_aligned(x2):
                x2 = x2.clone()
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, scale)
        else:
            y = _reference_matmul(x2, self.weight, scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, kernel={self.kernel}"


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one scale per row (token)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer(
            "weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(num_embeddings, dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)  # (..., dim) int8
        return rows.to(self.weight_scale.dtype) * self.weight_scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def convert_for_runtime(model: nn.Module, names: Iterable[str], *, dtype: torch.dtype) -> None:
    """Replace each named `nn.Linear`/`nn.Embedding` of `model` by its INT8 twin (same device).

    Call it on a model built on the meta device, then `load_state_dict(assign=True)`.
    """
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        device = old.weight.device
        new: nn.Module
        if isinstance(old, nn.Linear):
            new = Int8Linear(
                old.in_features, old.out_features, old.bias is not None, device=device, dtype=dtype
            )
        elif isinstance(old, nn.Embedding):
            new = Int8Embedding(old.num_embeddings, old.embedding_dim, device=device, dtype=dtype)
        else:
            raise TypeError(f"{name} is a {type(old).__name__}, not a Linear or an Embedding")
        setattr(parent, child, new)


def is_aligned(tensor: torch.Tensor) -> bool:
    """Whether `tensor` starts on an `ALIGNMENT`-byte boundary."""
    return tensor.data_ptr() % ALIGNMENT == 0


def set_kernel(model: nn.Module, kernel: Kernel) -> int:
    """Use `kernel` in every `Int8Linear` of `model`; returns how many there are.

    For the fused kernel, a weight or scale that is not contiguous on an `ALIGNMENT`-byte
    boundary (loaded as a view into a file's bytes) is copied once into memory that is."""
    count = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.kernel = kernel
            if kernel == "int8pack":
                for name in ("weight", "weight_scale"):
                    tensor = getattr(module, name)
                    if not (tensor.is_contiguous() and is_aligned(tensor)):
                        module.register_buffer(name, tensor.clone(memory_format=torch.contiguous_format))
            count += 1
    return count
