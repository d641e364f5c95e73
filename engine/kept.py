"""Warm conversations: the KV caches the local engine keeps after an answer, within a byte budget.

A bot's work is long multi-turn histories with short turns. When a session closes, its cache
(the ids it holds and their keys/values) is kept here. A new session whose prompt ids start
with a kept sequence takes that cache and prefills only the rest. Matching is by token ids
alone (the longest common prefix over all kept caches), so generated tokens and tool
observations count, and anything that changes the prompt (/reset, /system, an edit, /retry,
a history cut) simply matches a shorter prefix or none: a cache is never reused for ids it
does not hold.

Where the design is silent:

- A kept cache that the new prompt extends whole is moved to the session (no copy). One it
  shares only a part with (an edit, a retry, another conversation with the same system
  prompt) is copied up to the common prefix and stays kept, so one conversation's first
  tokens do not destroy another's warm cache.
- A new kept cache replaces the kept caches that are prefixes of it (the same conversation
  one turn earlier).
- Least recently used caches leave first (used: continued, not merely copied from); one
  larger than the whole budget is not kept.
- Only caches of plain `DynamicLayer`s are kept: a sliding-window layer past its window no
  longer holds the prefix it was fed.
- Sizes are the bytes of the tensors' storage; a cache cut back after a failed round (a view
  into a longer tensor) is compacted before it is counted.

Everything here runs on the engine thread.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class _Kept:
    ids: torch.Tensor  # (T,) int64 on the CPU: the tokens the cache holds
    cache: Any
    size: int  # bytes


def _plain_layers(cache: Any) -> list[Any] | None:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return list(layers)


def cache_bytes(cache: Any) -> int:
    """Bytes of the storage behind a DynamicCache's tensors (each storage counted once)."""
    seen: dict[int, int] = {}
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "is_initialized", False):
            for tensor in (layer.keys, layer.values):
                storage = tensor.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 0
    differ = torch.nonzero(a[:n] != b[:n])
    return int(differ[0, 0]) if differ.shape[0] else n


class KeptCaches:
    """LRU store of conversations' KV caches, at most `budget` bytes (0: keep nothing)."""

    def __init__(self, budget: int) -> None:
        self.budget = max(0, int(budget))
        self.used = 0
        self._entries: OrderedDict[int, _Kept] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, ids: Sequence[int], new_cache: Callable[[], Any]) -> tuple[Any, int] | None:
        """(cache holding ids[:n], n) for the longest kept prefix of `ids`, or None."""
        if not self._entries or not ids:
            return None
        query = torch.tensor(list(ids), dtype=torch.long)
        best_key, best = -1, 0
        for key, entry in self._entries.items():
            length = common_prefix(entry.ids, query)
            if length > best:
                best_key, best = key, length
        if best == 0:
            return None
        entry = self._entries[best_key]
        if best == entry.ids.shape[0]:  # the prompt extends it whole: the session takes it
            del self._entries[best_key]
            self.used -= entry.size
            return entry.cache, best
        copy = new_cache()  # a donor of a shared part is not marked used: it was not continued
        for index, layer in enumerate(entry.cache.layers):  # cat into an empty layer copies
            copy.update(layer.keys[..., :best, :], layer.values[..., :best, :], index)
        return copy, best

    def keep(self, ids: Sequence[int], cache: Any) -> None:
        """Keep `cache`, which holds exactly `ids`, evicting the least recently used as needed."""
        if self.budget <= 0 or cache is None or not ids:
            return
        layers = _plain_layers(cache)
        if layers is None or any(
            not layer.is_initialized or layer.keys.shape[-2] != len(ids) for layer in layers
        ):
            return
        if cache_bytes(cache) > sum(layer.keys.nbytes + layer.values.nbytes for layer in layers):
            for layer in layers:  # a cropped view: keep only what is used
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
        size = cache_bytes(cache)
        if size > self.budget:
            logger.debug("a %d-token conversation (%d bytes) is larger than the warm budget", len(ids), size)
            return
        query = torch.tensor(list(ids), dtype=torch.long)
        for key in [k for k, e in self._entries.items() if common_prefix(e.ids, query) == e.ids.shape[0]]:
            self.used -= self._entries.pop(key).size  # the same conversation, earlier
        while self._entries and self.used + size > self.budget:
            _, old = self._entries.popitem(last=False)
            self.used -= old.size
            logger.debug("warm cache evicted: %d tokens, %d bytes", old.ids.shape[0], old.size)
        self._entries[self._next] = _Kept(query, cache, size)
        self._next += 1
        self.used += size

    def clear(self) -> int:
        """Drop every kept cache; how many there were."""
        count = len(self._entries)
        self._entries.clear()
        self.used = 0
        return count

    def lengths(self) -> list[int]:
        """Token counts of the kept caches, least recently used first (for tests and logs)."""
        return [int(entry.ids.shape[0]) for entry in self._entries.values()]
