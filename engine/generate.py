"""Generation steps for the local engine: prefill, one decode step, sampling.

Everything here runs on the engine thread (see `engine/local.py`). A session's state is a
`SessionState`: the token ids of the conversation so far and how many of them are in the
KV cache (`cached`); the rest are prefilled at the start of the next round, with explicit
position ids (ChatGLM3 positions are plain 0..n-1 over the whole conversation, and Glm's
cache would otherwise restart them).

Choices where the design is silent:

- Prompts are prefilled in chunks of `PREFILL_CHUNK` tokens and only the last position's
  logits are computed, so a 32K prompt's activations stay bounded.
- The token that ends a round by a stop id is not kept (ChatGLM3 history has no end
  marker; the next block starts with its role id). A token cut by `stop_at`, the token
  limit or cancellation stays in the conversation, unprefilled, so the
  cache always matches what the model generated.
- A failed round (any exception, out of memory included) rolls the session back to where
  the round started (the cache is cropped), so the same session can generate again.
- The text handed out never runs past a cut: trailing whitespace is held back until decided
  (`engine/round_text.py`, shared with the openai backend), so the pieces always join to
  `Generation.text`.

A whole round, and several rounds decoding together, are `engine/batch.py`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from yanray.engine.base import ChatMessage, ToolSpec

PREFILL_CHUNK = 2048


@dataclass
class SessionState:
    """One conversation on the engine thread."""

    tokens: list[int]
    tools: Sequence[ToolSpec]
    transcript: list[ChatMessage] = field(default_factory=list)
    cache: Any = None  # transformers DynamicCache, created at the first round
    cached: int = 0  # tokens[:cached] are in the cache


def truncate_cache(state: SessionState, length: int) -> None:
    """Keep the first `length` cached tokens (all layers, even ones a failed step left longer).

    A cache whose layers cannot be cut (e.g. a sliding window past its size) is dropped, and
    the next round prefills the whole conversation again.
    """
    if state.cache is None:
        state.cached = 0
        return
    try:
        for layer in state.cache.layers:
            if getattr(layer, "is_initialized", False):
                extra = layer.keys.shape[-2] - length  # keys: (B, kv_heads, T, D)
                if extra > 0:
                    layer.crop(-extra)
    except (RuntimeError, ValueError, AttributeError):
        state.cache, state.cached = None, 0
        return
    state.cached = min(state.cached, length)


def prefill(model: Any, cache: Any, ids: Sequence[int], start: int, device: torch.device) -> torch.Tensor:
    """Feed `ids` at positions start.. into the cache; the next-token logits (float32, (vocab,))."""
    logits = None
    for offset in range(0, len(ids), PREFILL_CHUNK):
        chunk = torch.tensor([list(ids[offset : offset + PREFILL_CHUNK])], dtype=torch.long, device=device)
        first = start + offset
        positions = torch.arange(first, first + chunk.shape[1], device=device).unsqueeze(0)  # (1, T)
        out = model(input_ids=chunk, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits
    if logits is None:
        raise ValueError("nothing to prefill")
    return logits[0, -1].float()


def decode_one_token(model: Any, cache: Any, token: int, position: int, device: torch.device) -> torch.Tensor:
    ids = torch.tensor([[token]], dtype=torch.long, device=device)  # (1, 1)
    positions = torch.tensor([[position]], dtype=torch.long, device=device)
    out = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True)
    return out.logits[0, -1].float()


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else temperature sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs.to("cpu"), 1, generator=generator))
