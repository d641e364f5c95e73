"""The `local` backend: a transformers model in this process, behind the engine protocol.

`LocalEngine.load(model, ...)` finds the model (a folder, or a hub id fetched and quantized
once by `engine/hub.py`), picks device and dtype (`engine/device.py`), refuses before
loading if it would not fit, and loads one of:

- a Yanray INT8 folder (`engine/int8.py`),
- a ChatGLM3 release folder, into transformers' native `GlmForCausalLM`
  (`engine/chatglm3/weights.py`), with the ChatGLM3 prompt format
  (`engine/chatglm3/prompt.py`),
- any other transformers causal LM folder whose tokenizer has a chat template
  (`trust_remote_code=False`, local files only).

One engine thread (a single-worker executor) does all torch work, loading included; the
event loop only awaits it. Text pieces cross back with `loop.call_soon_threadsafe`, so they
reach `on_text` in order and before the round's result. `options.cancel` is checked every
token, and is also set when the awaiting task is cancelled. A failing round (out of memory
included) rolls its session back, frees cached GPU memory, and raises `EngineError` with one
line for the user; the engine and the session keep working.

A session keeps its KV cache: `append` only encodes the message, and the next round
prefills just those tokens; `Generation.prompt_tokens` is the number prefilled. When a
session closes its cache is kept (`engine/kept.py`, within `kv_budget` bytes), and a later
session whose prompt starts with the same ids takes it at its first round: a conversation's
next turn prefills only its new tokens. Running out of memory drops every kept cache.

Tokenizing has a thread of its own (a second single-worker executor): fitting a history
(`fit`, `engine/fit.py`) and building a session's prompt ids (`start`) run there, never on
the event loop, and never behind a generation on the engine thread. Where the chat format
lays messages end to end (ChatGLM3, `ChatFormat.blocks`), each message is encoded once and
its ids kept (by content, up to IDS_KEPT ids, least recently used first out): the history a
request fits is then counted and assembled from those ids, and only new messages are
encoded. A chat template frames each message by its neighbours, so there a message's cost
is remembered and the prompt is rendered whole.

With `compile` on (`YANRAY_COMPILE`; auto: with CUDA), decoding goes through
`engine/compiled.py`'s static-shape step; a compile failure falls back to the eager step.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from yanray.engine.base import (
    ChatMessage,
    EngineError,
    EngineUnavailable,
    GenerateOptions,
    Generation,
    TextCallback,
    ToolSpec,
)
from yanray.engine.chat_format import ChatFormat
from yanray.engine.compiled import CompiledDecode, compile_enabled, static_cache_bytes
from yanray.engine.fit import Fitter, Key, key_of
from yanray.engine.generate import SessionState, run_round, truncate_cache
from yanray.engine.kept import KeptCaches

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: message ids kept for assembling prompts (4 bytes each: 8 MiB)
IDS_KEPT = 1 << 21


class LocalEngine:
    """A loaded model and its chat format, served from one engine thread."""

    name = "local"

    def __init__(
        self,
        *,
        model: Any,
        fmt: ChatFormat,
        device: torch.device,
        max_context: int,
        executor: ThreadPoolExecutor,
        seed: int | None = None,
        label: str = "",
        kv_budget: int = 0,
        compile: str = "off",
    ) -> None:
        self.model = model
        self.fmt = fmt
        self.device = device
        self.max_context = max_context
        self.native_tools = fmt.native_tools
        self.label = label
        self._executor = executor
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed if seed is not None else random.randrange(2**63))
        self._closed = False
        self.kept = KeptCaches(kv_budget)
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yanray-tokenize")
        self._blocks = fmt.blocks([], ()) is not None
        self._ids: OrderedDict[Key, array[int]] = OrderedDict()  # touched on the tokenizing thread only
        self._ids_total = 0
        self._base: int | None = None
        self.fitter = Fitter(cost=self._cost, fixed=self._fixed)
        self.compiled = (
            CompiledDecode(model, device, max_context=max_context)
            if compile_enabled(compile, device)
            else None
        )

    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_context: int = 0,
        data_dir: Path | None = None,
        seed: int | None = None,
        kv_cache_gb: float | None = None,
        compile: str = "auto",
    ) -> LocalEngine:
        """Load `model` (blocking; call it in a thread). Raises `EngineUnavailable` with one line.

        `kv_cache_gb` bounds the kept conversations' caches (None: what the memory guard finds
        left over, `engine/device.py`, less one context-sized static cache when decoding is
        compiled; 0: none kept). `compile`: `YANRAY_COMPILE` (auto, on, off)."""
        from yanray.engine.loader import load_parts

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yanray-engine")
        try:
            parts = executor.submit(
                load_parts,
                model,
                device=device,
                dtype=dtype,
                max_context=max_context,
                data_dir=data_dir,
                kv_cache_gb=kv_cache_gb,
            ).result()
        except BaseException:
            executor.shutdown(wait=False)
            raise
        kv_budget = parts.kv_budget
        if kv_cache_gb is None and compile_enabled(compile, parts.device):
            kv_budget = max(0, kv_budget - static_cache_bytes(parts.model, parts.max_context))
        return cls(
            model=parts.model,
            fmt=parts.fmt,
            device=parts.device,
            max_context=parts.max_context,
            executor=executor,
            seed=seed,
            label=parts.label,
            kv_budget=kv_budget,
            compile=compile,
        )

    # -- the protocol ------------------------------------------------------------------

    def count_tokens(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> int:
        return len(self.fmt.prompt_ids(messages, tools if self.native_tools else ()))

    async def fit(
        self, system: ChatMessage, history: Sequence[ChatMessage], tools: Sequence[ToolSpec], budget: int
    ) -> list[ChatMessage]:
        self._check_open()
        tools = tuple(tools) if self.native_tools else ()
        return await self._tokenize(self.fitter.fit, system, list(history), tools, budget)

    async def start(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> LocalSession:
        self._check_open()
        tools = tuple(tools) if self.native_tools else ()
        ids = await self._tokenize(self._prompt_ids, list(messages), tools)
        return LocalSession(self, SessionState(tokens=ids, tools=tools, transcript=list(messages)))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._run(self._release)
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        await asyncio.to_thread(self._tokenizing.shutdown, wait=True)

    # -- the tokenizing thread ---------------------------------------------------------

    async def _tokenize(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizing, fn, *args)

    def _prompt_ids(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> list[int]:
        blocks = self.fmt.blocks(messages, tools)
        if blocks is None:
            return self.fmt.prompt_ids(messages, tools)
        return self.fmt.join([self._message_ids(m) for m in blocks])

    def _message_ids(self, message: ChatMessage) -> array[int]:
        key = key_of(message)
        ids = self._ids.get(key)
        if ids is not None:
            self._ids.move_to_end(key)
            return ids
        ids = array("i", self.fmt.message_ids(message))
        self._ids[key] = ids
        self._ids_total += len(ids)
        while self._ids_total > IDS_KEPT and len(self._ids) > 1:
            _, dropped = self._ids.popitem(last=False)
            self._ids_total -= len(dropped)
        return ids

    def _cost(self, message: ChatMessage) -> int:
        if self._blocks:
            return len(self._message_ids(message))
        if self._base is None:
            self._base = len(self.fmt.prompt_ids([], ()))
        return len(self.fmt.prompt_ids([message], ())) - self._base

    def _fixed(self, system: ChatMessage, tools: Sequence[ToolSpec]) -> int:
        return len(self._prompt_ids([system], tools))

    # -- the engine thread -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineUnavailable("The local model has been shut down.")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _release(self) -> None:
        self.kept.clear()
        if self.compiled is not None:
            self.compiled.drop()
        self.model = None
        self._free_memory()

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _generate(
        self, state: SessionState, options: GenerateOptions, emit: Callable[[str], None]
    ) -> Generation:
        if self.model is None:
            raise EngineUnavailable("The local model has been shut down.")
        failure: EngineError
        try:
            if state.cache is None and state.cached == 0:
                self._warm(state)
            generation = run_round(
                self.model,
                state,
                self.fmt,
                options,
                emit=emit,
                max_context=self.max_context,
                device=self.device,
                generator=self._generator,
                new_cache=self._new_cache,
                open_decode=self.compiled.open if self.compiled is not None else None,
            )
        except EngineError:
            raise
        except torch.OutOfMemoryError:
            logger.exception("out of memory while generating (%d tokens in the session)", len(state.tokens))
            failure = EngineError(
                "The model ran out of memory on this request; try a shorter message or /reset."
            )
            dropped = self.kept.clear()
            if self.compiled is not None:
                self.compiled.drop()
            if dropped:
                logger.warning("out of memory: dropped the %d kept conversation caches", dropped)
        except Exception:  # the engine's one central handler: any failure ends this request only
            logger.exception("generation failed")
            failure = EngineError("The model failed on this request (the log has details); please try again.")
        else:
            call = generation.tool_call
            state.transcript.append(ChatMessage("assistant", generation.text, name=call.name if call else ""))
            return generation
        # outside the except blocks, so the traceback (and the tensors its frames hold) is gone
        self._free_memory()
        raise failure

    def _warm(self, state: SessionState) -> None:
        """Start from the kept cache sharing the longest prefix with this prompt, if any."""
        found = self.kept.take(state.tokens, self._new_cache)
        if found is not None:
            state.cache, state.cached = found
            logger.debug("warm start: %d of %d prompt tokens cached", state.cached, len(state.tokens))

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _append(self, state: SessionState, message: ChatMessage) -> None:
        keep, new = self.fmt.continuation(state.tokens, state.transcript, message, state.tools)
        if keep < state.cached:
            truncate_cache(state, keep)
        del state.tokens[keep:]
        state.tokens.extend(new)
        state.transcript.append(message)

    def _close(self, state: SessionState) -> None:
        if state.cache is not None and self.model is not None:
            try:
                self.kept.keep(state.tokens[: state.cached], state.cache)
            except torch.OutOfMemoryError:  # compacting a cut-back cache needs a copy
                logger.warning("out of memory keeping a conversation; dropped the kept caches")
                self.kept.clear()
        state.cache, state.cached = None, 0
        state.tokens.clear()


class LocalSession:
    """One conversation being answered; owns its KV cache."""

    def __init__(self, engine: LocalEngine, state: SessionState) -> None:
        self.engine = engine
        self.state = state

    @property
    def tokens(self) -> int:
        """Tokens in the conversation so far (prompt, replies and appended messages)."""
        return len(self.state.tokens)

    async def generate(self, options: GenerateOptions, on_text: TextCallback | None = None) -> Generation:
        self.engine._check_open()
        loop = asyncio.get_running_loop()

        def emit(piece: str) -> None:
            if on_text is not None:
                loop.call_soon_threadsafe(on_text, piece)

        try:
            return await self.engine._run(self.engine._generate, self.state, options, emit)
        except asyncio.CancelledError:
            options.cancel.set()  # the thread stops at the next token
            raise

    async def append(self, message: ChatMessage) -> None:
        self.engine._check_open()
        await self.engine._run(self.engine._append, self.state, message)

    async def close(self) -> None:
        if not self.engine._closed:
            await self.engine._run(self.engine._close, self.state)
