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

Several conversations at once (`max_batch`, `YANRAY_MAX_BATCH`): the engine thread runs a
pump. Between decode steps it runs the queued work (a session's append or close, a new
round), prefills the rounds waiting to join while the batch has room (while others decode,
`join_chunk` tokens of a joining prompt per step, so a long prompt does not stall their
text; a cancel is seen between pieces), and then decodes one token for every round in the
batch in one forward pass (`engine/batch.py`). A round that
ends leaves at once with its result; the others go on. Running out of memory while a round
joins fails that round only; in a batched step it fails the round that joined last (the
batch shrinks) and the others go on. `join_fault`, called just before a round joins, lets a
test inject such a failure.

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

The engine counts its work (prefilled tokens, warm hits, batch occupancy, out-of-memory
errors) in `stats` (`engine/stats.py`); the bot reads them for /metrics and /stats.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import threading
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
from yanray.engine.batch import DecodeBatch, Stream, plain_cache
from yanray.engine.chat_format import ChatFormat
from yanray.engine.compiled import CompiledDecode, DecodeStep, compile_enabled, static_cache_bytes
from yanray.engine.fit import Fitter, Key, key_of
from yanray.engine.generate import SessionState, truncate_cache
from yanray.engine.kept import KeptCaches
from yanray.engine.stats import EngineStats, GpuMemory, gpu_memory

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: message ids kept for assembling prompts (4 bytes each: 8 MiB)
IDS_KEPT = 1 << 21
#: conversations decoded together when YANRAY_MAX_BATCH is unset
DEFAULT_MAX_BATCH = {"cuda": 8, "cpu": 4}
#: Tokens a joining round prefills between two decode steps of the others. Prefill is
#: compute-bound and a decode step bandwidth-bound: on a GPU 512 tokens of a 6B cost about
#: what a few steps do; on a CPU (a few tokens/s of prefill) a smaller piece keeps the others'
#: text moving every few seconds. A larger piece prefills faster in all; alone, no pieces.
JOIN_CHUNK = {"cuda": 512, "cpu": 64}


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
        max_batch: int | None = None,
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
        #: counters for /metrics and /stats (`engine/stats.py`), written on the engine thread
        self.stats = EngineStats()
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
        batch = max_batch if max_batch is not None else DEFAULT_MAX_BATCH.get(device.type, 4)
        if batch > 1 and model is not None and not plain_cache(self._new_cache()):
            logger.info("this model's cache cannot be batched; one conversation decodes at a time")
            batch = 1
        #: conversations generating together, at most
        self.max_batch = max(1, batch)
        #: tokens a joining round prefills per decode step of the others (`_admit`)
        self.join_chunk = JOIN_CHUNK.get(device.type, JOIN_CHUNK["cpu"])
        #: called on the engine thread just before a prefilled round joins the batch (tests
        #: inject an out-of-memory there)
        self.join_fault: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._tasks: deque[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = deque()
        self._pumping = False
        self._joining: deque[Stream] = deque()
        self._batch = DecodeBatch(self._new_cache, self._open_decode)

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
        max_batch: int | None = None,
        lora: str | Path | None = None,
    ) -> LocalEngine:
        """Load `model` (blocking; call it in a thread). Raises `EngineUnavailable` with one line.

        `kv_cache_gb` bounds the kept conversations' caches (None: what the memory guard finds
        left over, `engine/device.py`, less one context-sized static cache when decoding is
        compiled; 0: none kept). `compile`: `YANRAY_COMPILE` (auto, on, off). `max_batch` bounds
        the conversations generating together (None: 8 on a GPU, 4 on the CPU). `lora`: a PEFT
        LoRA adapter folder merged into a 16-bit ChatGLM3 model as it loads (`YANRAY_LORA`)."""
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
                lora=lora,
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
            max_batch=max_batch,
        )

    # -- observing ---------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """Whether the model is loaded and answering (false once shut down)."""
        return self.model is not None and not self._closed

    def memory(self) -> GpuMemory | None:
        """The GPU memory torch holds for this engine; None on the CPU."""
        return gpu_memory(self.device)

    # -- the protocol ------------------------------------------------------------------

    def count_tokens(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> int:
        return len(self.fmt.prompt_ids(messages, tools if self.native_tools else ()))

    async def count(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> int:
        self._check_open()
        return await self._tokenize(self.count_tokens, list(messages), tuple(tools))

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
        """Run `fn(*args)` on the engine thread, between two decode steps."""
        future: Future[T] = Future()
        with self._lock:
            self._tasks.append((fn, args, future))
            start, self._pumping = not self._pumping, True
        if start:
            self._executor.submit(self._pump)
        return await asyncio.wrap_future(future)

    def _pump(self) -> None:
        """The engine thread's loop: queued work, then joins, then one decode step; until idle."""
        while True:
            with self._lock:
                tasks = list(self._tasks)
                self._tasks.clear()
                if not tasks and not self._batch and not self._joining:
                    self._pumping = False
                    return
            for fn, args, future in tasks:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:  # handed to the awaiting caller
                        future.set_exception(exc)
            try:
                self._admit()
                self._step()
                self.stats.batch_rounds = len(self._batch)
            except BaseException as exc:  # a bug here must not leave the rounds waiting forever
                logger.error("the engine's step loop failed; the rounds in it fail", exc_info=exc)
                for stream in [*self._batch.streams, *self._joining]:
                    del stream.state.tokens[stream.start_tokens :]  # the next round prefills it all
                    stream.state.cache, stream.state.cached = None, 0
                    self._resolve(
                        stream, failure=EngineError("The model failed on this request; please try again.")
                    )
                self._batch = DecodeBatch(self._new_cache, self._open_decode)
                self._joining.clear()
                self.stats.batch_rounds = 0

    def _submit(
        self, state: SessionState, options: GenerateOptions, emit: Callable[[str], None]
    ) -> Future[Generation]:
        stream = Stream(state, self.fmt, options, emit)
        self._joining.append(stream)
        return stream.result

    def _admit(self) -> None:
        """Prefill the rounds waiting to join, while the batch has room. While others decode,
        a joining round prefills `join_chunk` tokens per step, so a long prompt does not pause
        them for the whole of its prefill; alone, it prefills at once."""
        while self._joining and len(self._batch) < self.max_batch:
            stream = self._joining[0]
            try:
                if self.model is None:
                    raise EngineUnavailable("The local model has been shut down.")
                if stream.decoder is None:
                    state = stream.state
                    if state.cache is None and state.cached == 0:
                        self._warm(state)
                    stream.begin(max_context=self.max_context, new_cache=self._new_cache)
                fed_from = stream.state.cached
                done = stream.feed(self.model, self.device, self.join_chunk if self._batch else None)
                self.stats.prefilled_tokens += stream.state.cached - fed_from
                if not done:
                    if not stream.options.cancel.is_set():
                        return  # the rest after the others' next step
                    stream.finish = "cancelled"  # the rest of its prompt is prefilled next round
                    self._joining.popleft()
                    self._complete(stream)
                    continue
                self._joining.popleft()
                if not stream.advance(self._generator):
                    self._complete(stream)
                    continue
                if self.join_fault is not None:
                    self.join_fault()
                self._batch.join(stream)
            except BaseException as exc:
                if self._joining and self._joining[0] is stream:
                    self._joining.popleft()
                self._fail(stream, exc)

    def _step(self) -> None:
        """One token for every round in the batch; rounds that end leave it."""
        if not self._batch:
            return
        self.stats.decode_steps += 1
        self.stats.decoded_rounds += len(self._batch)
        try:
            self._batch.decode(self.model, self.device)
        except BaseException as exc:
            # out of memory: the round that joined last fails and the batch shrinks; anything
            # else cannot be pinned on one round, so every round in the step fails
            victims = list(self._batch.streams)
            if isinstance(exc, torch.OutOfMemoryError):
                victims = victims[-1:]
            for stream in victims:
                self._batch.leave(stream)
                self._fail(stream, exc)
            for stream in self._batch.streams:
                stream.logits = None  # not fed this step: fed again at the next one
            return
        for stream in list(self._batch.streams):
            try:
                if stream.advance(self._generator):
                    continue
            except BaseException as exc:  # e.g. its stop_at failed: this round only
                self._batch.leave(stream)
                self._fail(stream, exc)
                continue
            self._batch.leave(stream)
            self._complete(stream)

    def _release(self) -> None:
        gone = EngineUnavailable("The local model has been shut down.")
        for stream in [*self._batch.streams, *self._joining]:
            if stream in self._batch.streams:
                self._batch.leave(stream)
            self._fail(stream, gone)
        self._joining.clear()
        self.kept.clear()
        self.stats.warm_bytes = self.stats.batch_rounds = 0
        if self.compiled is not None:
            self.compiled.drop()
        self.model = None
        self._free_memory()

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _complete(self, stream: Stream) -> None:
        try:
            generation = stream.generation()
        except BaseException as exc:
            self._fail(stream, exc)
            return
        call = generation.tool_call
        stream.state.transcript.append(
            ChatMessage("assistant", generation.text, name=call.name if call else "")
        )
        self._resolve(stream, generation)

    @staticmethod
    def _resolve(
        stream: Stream, generation: Generation | None = None, failure: BaseException | None = None
    ) -> None:
        if stream.result.done():  # its caller stopped waiting (the awaiting task was cancelled)
            return
        if generation is not None:
            stream.result.set_result(generation)
        else:
            stream.result.set_exception(failure or EngineError("The model failed on this request."))

    def _fail(self, stream: Stream, exc: BaseException) -> None:
        """End a round that failed: roll its session back, tell its caller one line."""
        try:
            stream.rollback()
        except Exception:
            logger.exception("rolling back a failed round failed; the session starts over")
            stream.state.cache, stream.state.cached = None, 0
        failure: BaseException
        if isinstance(exc, EngineError):
            failure = exc
        elif isinstance(exc, torch.OutOfMemoryError):
            self.stats.out_of_memory += 1
            logger.error(
                "out of memory while generating (%d tokens in the session)",
                len(stream.state.tokens),
                exc_info=exc,
            )
            failure = EngineError(
                "The model ran out of memory on this request; try a shorter message or /reset."
            )
            dropped = self.kept.clear()
            self.stats.warm_bytes = 0
            if self.compiled is not None:
                self.compiled.drop()
            if dropped:
                logger.warning("out of memory: dropped the %d kept conversation caches", dropped)
        elif isinstance(
            exc, Exception
        ):  # the engine's one central handler: any failure ends this request only
            logger.error("generation failed", exc_info=exc)
            failure = EngineError("The model failed on this request (the log has details); please try again.")
        else:
            failure = exc
        del exc
        self._free_memory()
        self._resolve(stream, failure=failure)

    def _warm(self, state: SessionState) -> None:
        """Start from the kept cache sharing the longest prefix with this prompt, if any."""
        found = self.kept.take(state.tokens, self._new_cache)
        self.stats.warm_bytes = self.kept.used
        if found is None:
            self.stats.warm_misses += 1
        else:
            state.cache, state.cached = found
            self.stats.warm_hits += 1
            self.stats.warm_tokens += state.cached
            logger.debug("warm start: %d of %d prompt tokens cached", state.cached, len(state.tokens))

    def _open_decode(self, cache: Any, length: int, budget: int) -> DecodeStep | None:
        """The compiled decode step for a round decoding alone (None: the eager step)."""
        return self.compiled.open(cache, length, budget) if self.compiled is not None else None

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
                self.stats.out_of_memory += 1
            self.stats.warm_bytes = self.kept.used
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
            result = await self.engine._run(self.engine._submit, self.state, options, emit)
            return await asyncio.wrap_future(result)
        except asyncio.CancelledError:
            options.cancel.set()  # the thread stops at the next token
            raise

    async def append(self, message: ChatMessage) -> None:
        self.engine._check_open()
        await self.engine._run(self.engine._append, self.state, message)

    async def close(self) -> None:
        if not self.engine._closed:
            await self.engine._run(self.engine._close, self.state)
