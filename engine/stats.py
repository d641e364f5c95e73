"""What the local engine counts about its own work, for whoever observes it.

The engine package knows nothing of Prometheus or the bot (the bot imports the engine, never
the reverse): the engine thread bumps plain integers here, and the bot's `/metrics` and
`/stats` read them when asked (`bot/metrics.py`). Each field is one int written by the
engine thread only; a reader on the event loop may see a step's counters half updated,
which a monotonic counter scraped every few seconds does not mind.

`gpu_memory(device)` reads torch's allocator: the bytes held by tensors now, the peak since
start, and the card's total. It is None on the CPU, where torch keeps no such account.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EngineStats:
    #: prompt tokens prefilled (only the new ones, when a kept cache covered the rest)
    prefilled_tokens: int = 0
    #: first rounds of a session that started from a kept (warm) cache / from nothing
    warm_hits: int = 0
    warm_misses: int = 0
    #: prompt tokens a kept cache spared prefilling
    warm_tokens: int = 0
    #: bytes held by kept conversation caches now
    warm_bytes: int = 0
    #: decode steps (one forward pass each) and the rounds they decoded, summed: their ratio
    #: is the mean batch occupancy
    decode_steps: int = 0
    decoded_rounds: int = 0
    #: rounds decoding now
    batch_rounds: int = 0
    #: out-of-memory errors the engine caught (each failed one round)
    out_of_memory: int = 0


@dataclass(frozen=True)
class GpuMemory:
    used: int  # bytes held by tensors now
    peak: int  # the most held at once since the engine started
    total: int  # the card's memory


def gpu_memory(device: torch.device) -> GpuMemory | None:
    """torch's account of `device`'s memory; None on the CPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return GpuMemory(
        used=int(torch.cuda.memory_allocated(device)),
        peak=int(torch.cuda.max_memory_allocated(device)),
        total=int(torch.cuda.get_device_properties(device).total_memory),
    )
