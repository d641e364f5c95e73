"""Several conversations at once: one round in progress (`Stream`) and the rounds decoding
together (`DecodeBatch`), one forward pass per step.

A round is prefilled alone, on its session's own cache, exactly as when it is answered alone.
It then decodes in the batch: while one round decodes, it does so on its own cache with
`decode_one_token` (today's path, unchanged); from two on, their caches are merged into one
batched cache, left-padded to a common length, and each step feeds every round's last token
with its own position id and an attention mask over its padding. A round that ends (stop,
tool call, cancel, token limit) takes its row back out as a cache of its own, so the
conversation can continue (a tool round) or be kept warm (`engine/kept.py`); the others go on.

Why greedy replies are the same as answering alone but not always bit for bit: a padded row
attends over more (masked) key positions and the matmuls see several rows, so floating-point
sums may be taken in another order. On the tiny float32 fixtures the tests check that every
greedy reply is identical to its solo run; in 16-bit on a real model two near-tied logits can
rarely pick differently.

Merging and taking a row out copy that conversation's cache (time and memory in proportion to
the batch's tokens, once per join or leave, not per step). Only caches of plain
`DynamicLayer`s are merged (a sliding window does not hold its whole past); the engine
decodes a model with other layers one round at a time.

Everything here runs on the engine thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
import torch.nn.functional as F

from yanray.engine.base import EngineError, FinishReason, GenerateOptions, Generation
from yanray.engine.chat_format import ChatFormat
from yanray.engine.generate import SessionState, decode_one_token, prefill, sample, truncate_cache
from yanray.engine.round_text import RoundText


class Stream:
    """One round of one conversation, from its prefill to its end."""

    def __init__(
        self,
        state: SessionState,
        fmt: ChatFormat,
        options: GenerateOptions,
        emit: Callable[[str], None],
    ) -> None:
        self.state = state
        self.fmt = fmt
        self.options = options
        self.emit = emit
        self.start_tokens, self.start_cached = len(state.tokens), state.cached
        self.finish: FinishReason = "length"
        self.produced = 0
        self.budget = 0
        self.prompt_tokens = 0
        self.token = -1  # the last sampled token, decoded at the next step
        self.logits: torch.Tensor | None = None
        self.visible = RoundText(options, strip_end=True)
        self.decoder: Any = None  # set by `begin`
        self.prefill_from = 0
        #: the round's result, resolved on the engine thread
        self.result: Future[Generation] = Future()

    def begin(self, *, max_context: int, new_cache: Callable[[], Any]) -> None:
        """Ready the round to prefill what is new in the conversation (`feed`)."""
        state = self.state
        if len(state.tokens) >= max_context:
            raise EngineError(
                f"The conversation is {len(state.tokens)} tokens long; the model's context is {max_context}."
            )
        if state.cache is None:
            state.cache = new_cache()
        if state.cached >= len(state.tokens):  # nothing new: feed the last token again for fresh logits
            truncate_cache(state, len(state.tokens) - 1)
        if state.cache is None:
            state.cache = new_cache()
        self.decoder = self.fmt.reply_decoder(state.tokens)
        self.prefill_from = state.cached
        self.budget = min(self.options.max_new_tokens, max_context - len(state.tokens))

    def feed(self, model: Any, device: torch.device, most: int | None = None) -> bool:
        """Prefill up to `most` more of the new tokens (all: None). True once all are in the
        cache: the first token's logits are then ready."""
        state = self.state
        end = len(state.tokens) if most is None else min(len(state.tokens), state.cached + most)
        with torch.inference_mode():
            logits = prefill(model, state.cache, state.tokens[state.cached : end], state.cached, device)
        state.cached = end
        self.prompt_tokens = end - self.prefill_from
        if end < len(state.tokens):
            return False
        self.logits = logits
        return True

    def advance(self, generator: torch.Generator | None) -> bool:
        """Take the next token from the logits; True if the round goes on (`token` is to be
        decoded), False once it has ended."""
        if self.produced >= self.budget:
            return False
        cancel: threading.Event = self.options.cancel
        if cancel.is_set():
            self.finish = "cancelled"
            return False
        assert self.logits is not None
        token = sample(self.logits, self.options.temperature, generator)
        self.logits = None
        self.produced += 1
        if self.decoder.ends_round(token):
            self.finish = "stop"
            return False
        self.state.tokens.append(token)
        if self.visible.add(self.decoder.feed(token)):
            self.finish = "stop"
            return False
        piece = self.visible.ready()
        if piece:
            self.emit(piece)
        if self.produced >= self.budget:
            return False
        self.token = token
        return True

    def generation(self) -> Generation:
        """The round's result, once it has ended."""
        finish = self.finish
        tail, call = self.decoder.finish(complete=finish == "stop" and self.visible.cut is None)
        self.visible.add(tail)
        piece = self.visible.ready(final=True)
        if piece:
            self.emit(piece)
        if call is not None:
            finish = "tool_call"
        return Generation(
            text=self.visible.text,
            finish=finish,
            tool_call=call,
            prompt_tokens=self.prompt_tokens,
            new_tokens=self.produced,
        )

    def rollback(self) -> None:
        """Back to where the round started (after a failure); the session can generate again."""
        del self.state.tokens[self.start_tokens :]
        truncate_cache(self.state, self.start_cached)


def plain_cache(cache: Any) -> bool:
    """Whether a cache's layers can be merged into a batch (plain `DynamicLayer`s only)."""
    from transformers.cache_utils import DynamicLayer

    layers: list[Any] = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _left_pad(tensor: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(tensor, (0, 0, pad, 0)) if pad else tensor  # (B, kv_heads, T, D): pad T in front


class DecodeBatch:
    """The rounds that decode together. `cache` is their batched cache (None while fewer than
    two decode: the one round decodes on its own cache); row i is streams[i], whose first
    pads[i] positions are padding.

    A round decoding alone goes through `open_decode(cache, length, budget)` when the engine
    compiles decode (`engine/compiled.py`: a static cache, copied back into the session's cache
    by `close()`); the step is closed before another round joins, or when the round leaves.
    Batched steps are eager."""

    def __init__(
        self,
        new_cache: Callable[[], Any],
        open_decode: Callable[[Any, int, int], Any] | None = None,
    ) -> None:
        self.new_cache = new_cache
        self.open_decode = open_decode
        self.streams: list[Stream] = []
        self.cache: Any = None
        self.pads: list[int] = []
        self.mask: torch.Tensor | None = None  # (B, T) 1 where a row has a real token
        self.step: Any = None  # the compiled step of the one round decoding alone, if any

    def __len__(self) -> int:
        return len(self.streams)

    def join(self, stream: Stream) -> None:
        """Add a prefilled round. Merging allocates: an out-of-memory here leaves the batch as it was."""
        if not self.streams:
            self.streams.append(stream)
            return
        self._close_step()  # the round decoding alone: its tokens back into its own cache
        if self.cache is None:
            members = [self.streams[0], stream]
            cache, pads, mask = self._merge([self._own(s) for s in members])
            self.streams.append(stream)
            for member in members:
                member.state.cache = None  # its keys and values live in the batch now
        else:
            assert self.mask is not None
            cache, pads, mask = self._merge([(self.cache, self.pads, self.mask), self._own(stream)])
            self.streams.append(stream)
            stream.state.cache = None
        self.cache, self.pads, self.mask = cache, pads, mask

    def leave(self, stream: Stream) -> None:
        """Take a round out; its session gets its own cache back."""
        index = self.streams.index(stream)
        if self.cache is None:
            self._close_step()
            del self.streams[index]
            return
        stream.state.cache = self._row(index)
        del self.streams[index]
        keep = [i for i in range(len(self.pads)) if i != index]
        pads = [self.pads[i] for i in keep]
        if len(self.streams) == 1:
            self.streams[0].state.cache = self._row(keep[0])
            self.cache, self.pads, self.mask = None, [], None
            return
        trim = min(pads)  # columns that are padding in every row left
        rows = torch.tensor(
            keep, dtype=torch.long, device=self.mask.device if self.mask is not None else None
        )
        cache = self.new_cache()
        for layer_index, layer in enumerate(self.cache.layers):
            keys = layer.keys.index_select(0, rows.to(layer.keys.device))[..., trim:, :]
            values = layer.values.index_select(0, rows.to(layer.values.device))[..., trim:, :]
            cache.update(keys, values, layer_index)
        assert self.mask is not None
        self.cache, self.pads = cache, [p - trim for p in pads]
        self.mask = self.mask.index_select(0, rows)[:, trim:]

    def decode(self, model: Any, device: torch.device) -> None:
        """One step: feed every round's last token; each round's next logits are then ready."""
        with torch.inference_mode():
            if self.cache is None:
                for stream in self.streams:  # one round, decoding alone
                    state = stream.state
                    position = len(state.tokens) - 1
                    if self.step is None and self.open_decode is not None:
                        self.step = self.open_decode(
                            state.cache, state.cached, stream.budget - stream.produced + 1
                        )
                    try:
                        if self.step is not None:
                            stream.logits = self.step(stream.token, position)
                        else:
                            stream.logits = decode_one_token(
                                model, state.cache, stream.token, position, device
                            )
                    except BaseException:
                        self.step = None  # the round fails and rolls its own cache back
                        raise
                    state.cached = len(state.tokens)
                return
            assert self.mask is not None
            ids = torch.tensor([[s.token] for s in self.streams], dtype=torch.long, device=device)
            positions = torch.tensor(
                [[len(s.state.tokens) - 1] for s in self.streams], dtype=torch.long, device=device
            )
            mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            width = self.mask.shape[1]
            try:
                out = model(
                    input_ids=ids,
                    position_ids=positions,
                    attention_mask=mask,
                    cache=self.cache,
                    use_cache=True,
                )
            except BaseException:
                self._crop(width)  # layers a failed step had already grown
                raise
            self.mask = mask
            logits = out.logits[:, -1].float()
            for row, stream in enumerate(self.streams):
                stream.logits = logits[row]
                stream.state.cached = len(stream.state.tokens)

    def _close_step(self) -> None:
        if self.step is not None:
            step, self.step = self.step, None
            step.close()

    # -- copies ----------------------------------------------------------------------------

    def _own(self, stream: Stream) -> tuple[Any, list[int], torch.Tensor]:
        state = stream.state
        first = next(layer for layer in state.cache.layers if layer.is_initialized)
        mask = torch.ones((1, state.cached), dtype=torch.long, device=first.keys.device)
        return state.cache, [0], mask

    def _merge(self, parts: list[tuple[Any, list[int], torch.Tensor]]) -> tuple[Any, list[int], torch.Tensor]:
        width = max(mask.shape[1] for _c, _p, mask in parts)
        cache = self.new_cache()
        layer_count = len(parts[0][0].layers)
        for layer_index in range(layer_count):
            keys, values = [], []
            for part_cache, _pads, mask in parts:
                layer = part_cache.layers[layer_index]
                length = mask.shape[1]
                keys.append(_left_pad(layer.keys[..., :length, :], width - length))
                values.append(_left_pad(layer.values[..., :length, :], width - length))
            cache.update(torch.cat(keys), torch.cat(values), layer_index)
        pads = [pad + width - mask.shape[1] for _c, part_pads, mask in parts for pad in part_pads]
        mask = torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for _c, _p, mask in parts])
        return cache, pads, mask

    def _row(self, index: int) -> Any:
        pad = self.pads[index]
        cache = self.new_cache()
        for layer_index, layer in enumerate(self.cache.layers):
            cache.update(
                layer.keys[index : index + 1, :, pad:, :],  # update's cat copies it
                layer.values[index : index + 1, :, pad:, :],
                layer_index,
            )
        return cache

    def _crop(self, width: int) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                extra = layer.keys.shape[-2] - width
                if extra > 0:
                    layer.crop(-extra)
