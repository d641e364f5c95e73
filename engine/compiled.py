"""Compiled decode: one token at a time through a static-shape step, captured as a CUDA graph.

`YANRAY_COMPILE` (`auto`: on with CUDA, off on the CPU; `on`; `off`) decides whether the
local engine decodes through `CompiledDecode`. Prefill stays eager and chunked
(`engine/generate.py`); only the one-token decode step is compiled.

How a round decodes (`CompiledDecode.open`, called by `engine/batch.py` for a round decoding
alone, after its prefill; batched steps stay eager):

- The KV cache is a transformers `StaticCache` sized in buckets (`bucket_for`: 4K, 8K, 16K,
  32K, ... up to the context), the smallest that holds the prompt plus the round's token
  budget. Each bucket has its own compiled step (a static shape); one bucket's cache is
  held at a time.
- The session's cache stays what it is (a `DynamicCache`, the format `engine/kept.py`
  keeps): at the start of a round its tokens are copied into the static cache; at the end
  the tokens decoded in the round are appended back to it (one copy per round, instead of
  the eager path's one `torch.cat` per token). Warm conversations are therefore unchanged:
  a kept cache is taken, prefilled into eagerly, copied in, decoded, copied back, kept.
- On CUDA the step is compiled with `torch.compile(fullgraph=True)` and inductor's
  `triton.cudagraphs` (what `mode="reduce-overhead"` sets) plus
  `coordinate_descent_tuning`, gpt-fast's recipe. The token and position are handed over
  through one pinned buffer (no sync); the one host sync per token is reading the sampled
  id, which streaming needs.
- INT8 Linears (`engine/int8_linear.py`) inside the compiled step use the dequant-fused
  form `F.linear(x, w.to(x.dtype)) * scale`, which inductor turns into a multiply-sum that
  reads the int8 weight directly, where it measures faster than `_weight_int8pack_mm`
  (`pick_compiled_int8`, once per engine); otherwise the eager kernel.

Failures: a compile or capture failure (anything but out of memory) is logged once with its
traceback, the tokens already decoded into the static cache are copied back, and the eager
path answers from there on for the life of the engine. Out of memory allocating a static
cache decodes that round eagerly; out of memory inside the step drops the static caches and
is raised to the engine's usual handler.

Memory: the static cache duplicates the session's cache while a round decodes. The
loader's default budget for kept conversations is lowered by one context-sized static
cache (`static_cache_bytes`) so the two fit together.

Everything here runs on the engine thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

from yanray.engine.generate import decode_one_token

logger = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
BUCKET_MIN = 4096


def compile_enabled(mode: str, device: torch.device) -> bool:
    """Whether `YANRAY_COMPILE=mode` compiles decode on `device` (auto: CUDA only)."""
    mode = (mode or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"YANRAY_COMPILE={mode}: expected auto, on or off")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def bucket_for(needed: int, max_context: int) -> int:
    """The static cache length for `needed` tokens: 4K, 8K, 16K, ... at most `max_context`."""
    size = BUCKET_MIN
    while size < needed:
        size *= 2
    return min(size, max_context) if max_context > 0 else size


def static_cache_bytes(model: Any, tokens: int) -> int:
    """Bytes of a static KV cache of `tokens` positions for `model` (all layers, keys and values)."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.empty(0, dtype=model.dtype).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * tokens * element


class DecodeStep(Protocol):
    """One round's decoding: logits after feeding `token` at `position`; `close` at the end."""

    def __call__(self, token: int, position: int) -> torch.Tensor: ...

    def close(self) -> None: ...


class EagerStep:
    """The eager decode step on the session's own cache."""

    def __init__(self, model: Any, cache: Any, device: torch.device) -> None:
        self.model, self.cache, self.device = model, cache, device

    def __call__(self, token: int, position: int) -> torch.Tensor:
        return decode_one_token(self.model, self.cache, token, position, self.device)

    def close(self) -> None:
        pass


def _plain(cache: Any) -> bool:
    from transformers.cache_utils import DynamicLayer, StaticLayer

    layers: list[Any] = list(getattr(cache, "layers", None) or ())
    return bool(layers) and all(type(layer) in (DynamicLayer, StaticLayer) for layer in layers)


class CompiledDecode:
    """The engine's compiled decode steps: a static cache per bucket (one held), its step, failures."""

    def __init__(
        self,
        model: Any,
        device: torch.device,
        *,
        max_context: int,
        backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        self.model, self.device, self.max_context = model, device, max_context
        self.backend = backend
        self.failed = False
        self.bucket = 0
        self._cache: Any = None
        self._step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._int8_picked = False
        cuda = device.type == "cuda"
        self._host = torch.zeros(2, dtype=torch.long, pin_memory=cuda)  # token, position
        self._inputs = torch.zeros(2, dtype=torch.long, device=device)

    def drop(self) -> None:
        """Free the static cache and its step (out of memory, shutdown)."""
        self._cache, self._step, self.bucket = None, None, 0

    def open(self, cache: Any, length: int, budget: int) -> DecodeStep:
        """A step for a round whose session cache holds `length` tokens and may grow by `budget`."""
        if self.failed or not _plain(cache):
            return EagerStep(self.model, cache, self.device)
        try:
            static = self._static(bucket_for(length + budget, self.max_context))
            for source, layer in zip(cache.layers, static.layers, strict=True):
                if not layer.is_initialized:
                    layer.lazy_initialization(source.keys, source.values)
                layer.keys[:, :, :length].copy_(source.keys[:, :, :length])
                layer.values[:, :, :length].copy_(source.values[:, :, :length])
                layer.cumulative_length.fill_(length)
        except torch.OutOfMemoryError:
            self.drop()
            logger.warning("out of memory allocating a static KV cache; this round decodes eagerly")
            return EagerStep(self.model, cache, self.device)
        except Exception as exc:  # a cache this model's layers do not fit: eager from now on
            self.fail(exc)
            return EagerStep(self.model, cache, self.device)
        return _CompiledRound(self, cache, static, length)

    def _static(self, bucket: int) -> Any:
        from transformers import StaticCache

        if bucket != self.bucket or self._cache is None:
            self.drop()  # the old bucket's memory first
            self._pick_int8()
            cache = StaticCache(config=self.model.config, max_cache_len=bucket)
            if any(type(layer).__name__ != "StaticLayer" for layer in cache.layers):
                raise ValueError(
                    "the model has sliding-window layers; compiled decode copies plain layers only"
                )
            self._step = self._compile(cache)
            self._cache, self.bucket = cache, bucket
            logger.info("compiled decode: a %d-token static cache", bucket)
        return self._cache

    def _compile(self, cache: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        model = self.model

        def step(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            out = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True)
            return out.logits[0, -1].float()

        options: dict[str, str | int | bool | Callable[..., Any]] | None = None
        if self.backend == "inductor" and self.device.type == "cuda":
            options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
        compiled: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.compile(
            step, backend=self.backend, fullgraph=True, dynamic=False, options=options
        )
        return compiled

    def run(self, token: int, position: int) -> torch.Tensor:
        """The compiled step: logits (float32, (vocab,)) after `token` at `position`."""
        assert self._step is not None
        self._host[0], self._host[1] = token, position
        self._inputs.copy_(self._host, non_blocking=True)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._step(self._inputs[0:1].view(1, 1), self._inputs[1:2].view(1, 1))
        return logits.clone()  # a CUDA graph's output is overwritten by its next replay

    def fail(self, exc: BaseException) -> None:
        """Log a compile or capture failure once; the eager path answers from now on."""
        if not self.failed:
            logger.error("compiled decode failed; decoding eagerly from now on", exc_info=exc)
        self.failed = True
        self.drop()

    def _pick_int8(self) -> None:
        """Choose the INT8 Linears' form inside the compiled step, once."""
        from yanray.engine.int8_linear import Int8Linear, pick_compiled_int8

        if self._int8_picked:
            return
        self._int8_picked = True
        linears = [m for m in self.model.modules() if isinstance(m, Int8Linear)]
        if not linears:
            return
        form = pick_compiled_int8(
            self.device, self.model.dtype, eager=linears[0].kernel, backend=self.backend
        )
        for module in linears:
            module.compiled_kernel = form
        logger.info("compiled decode: INT8 Linears use the %s form", form)


class _CompiledRound:
    """One round on the static cache; the decoded tokens go back to the session's cache at close."""

    def __init__(self, owner: CompiledDecode, cache: Any, static: Any, length: int) -> None:
        self.owner, self.cache, self.static = owner, cache, static
        self.start = self.end = length  # static positions [start, end) are not yet in `cache`
        self.eager = False

    def __call__(self, token: int, position: int) -> torch.Tensor:
        owner = self.owner
        if not self.eager:
            try:
                logits = owner.run(token, position)
            except torch.OutOfMemoryError:
                owner.drop()
                raise
            except Exception as exc:  # a compile or capture failure: eager from here on
                owner.fail(exc)
                self.close()
                self.eager = True
            else:
                self.end = position + 1
                return logits
        return decode_one_token(owner.model, self.cache, token, position, owner.device)

    def close(self) -> None:
        """Append the tokens decoded on the static cache to the session's cache."""
        if self.eager or self.end <= self.start:
            return
        for index, layer in enumerate(self.static.layers):
            keys = layer.keys[:, :, self.start : self.end].clone()
            values = layer.values[:, :, self.start : self.end].clone()
            self.cache.update(keys, values, index)
        self.start = self.end
