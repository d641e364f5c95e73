"""Several conversations at once: the local engine decodes them together, the worker answers
up to YANRAY_MAX_BATCH jobs at once in the queue's fair order.

On a tiny random ChatGLM3 in float32 (tests/model_fixtures.py), where attention over the whole
conversation decides every token, so a misplaced row, a wrong mask or a wrong position changes
the reply: every greedy reply written in a batch must be the same token ids as its solo run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select

from tests.hooks import ForwardCalls
from tests.model_fixtures import fixtures_dir, steer_chain, steered_chatglm3
from tests.recording import RecordingStream
from tests.scripted_engine import ScriptedEngine
from tests.test_core import msg
from yanray.bot.queue import Job, RequestQueue
from yanray.engine.base import ChatMessage, EngineError, GenerateOptions
from yanray.engine.chatglm3.tokenizer import EOS, ChatGLM3Tokenizer
from yanray.engine.local import LocalEngine
from yanray.storage.models import Message

pytestmark = pytest.mark.asyncio

SYSTEM = ChatMessage("system", "You are Yanray.")
QUESTIONS = [
    "What is 6 times 7?",
    "Tell me a long story about a cat who lived in a lighthouse by the sea",
    "Hi",
    "Why is the sky blue? Explain it to a child, please.",
]
OBSERVATION = ChatMessage("observation", '{"result": 42}', name="calculate")


def _load(folder: Path, max_batch: int) -> Iterator[LocalEngine]:
    engine = LocalEngine.load(
        folder, device="cpu", dtype="float32", seed=1, kv_cache_gb=0, max_batch=max_batch
    )
    yield engine
    engine._executor.shutdown(wait=True)


@pytest.fixture(scope="module")
def solo_engine(random_folder: Path) -> Iterator[LocalEngine]:
    yield from _load(random_folder, 1)


@pytest.fixture(scope="module")
def batch_engine(random_folder: Path) -> Iterator[LocalEngine]:
    yield from _load(random_folder, 4)


async def _conversation(
    engine: LocalEngine,
    index: int,
    *,
    tokens: int = 24,
    started: asyncio.Event | None = None,
    cancel_after: int = 0,
) -> list[list[int]]:
    """One conversation; the ids the model wrote in each round. Conversation 0 makes a tool
    round (the observation appended, a second round); `cancel_after` pieces stop it mid-way."""
    session = await engine.start([SYSTEM, ChatMessage("user", QUESTIONS[index])])
    options = GenerateOptions(max_new_tokens=tokens)
    pieces = 0

    def on_text(_piece: str) -> None:
        nonlocal pieces
        pieces += 1
        if started is not None:
            started.set()
        if cancel_after and pieces >= cancel_after:
            options.cancel.set()

    rounds: list[list[int]] = []
    before = session.tokens
    generation = await session.generate(options, on_text)
    rounds.append(session.state.tokens[before:])
    if cancel_after:
        assert generation.finish == "cancelled"
    if index == 0:
        await session.append(OBSERVATION)
        before = session.tokens
        await session.generate(GenerateOptions(max_new_tokens=tokens))
        rounds.append(session.state.tokens[before:])
    await session.close()
    return rounds


async def test_four_conversations_at_once_write_what_each_writes_alone(
    solo_engine: LocalEngine, batch_engine: LocalEngine
) -> None:
    alone = [await _conversation(solo_engine, i) for i in range(4)]
    rows = ForwardCalls(batch_engine.model)
    try:
        first = asyncio.Event()  # the others join while the first is decoding
        leader = asyncio.ensure_future(_conversation(batch_engine, 0, started=first))
        await first.wait()
        rest = await asyncio.gather(*(_conversation(batch_engine, i) for i in (1, 2, 3)))
        together = [await leader, *rest]
    finally:
        rows.close()
    assert together == alone
    assert max(rows.decode_rows) == 4 and 1 in rows.decode_rows  # really decoded together, and the tail alone
    assert all(len(r) == 24 for c in alone for r in c)  # nobody stopped early: the comparison covers 24 ids


async def test_a_cancelled_conversation_leaves_without_disturbing_the_others(
    solo_engine: LocalEngine, batch_engine: LocalEngine
) -> None:
    alone = [await _conversation(solo_engine, i, tokens=40) for i in range(4)]
    together = await asyncio.gather(
        *(_conversation(batch_engine, i, tokens=40, cancel_after=5 if i == 2 else 0) for i in range(4))
    )
    cut = together[2][0]
    assert 5 <= len(cut) < 40 and cut == alone[2][0][: len(cut)]
    assert [together[i] for i in (0, 1, 3)] == [alone[i] for i in (0, 1, 3)]


async def _reply(
    engine: LocalEngine, question: str, tokens: int, started: asyncio.Event | None = None
) -> str:
    session = await engine.start([SYSTEM, ChatMessage("user", question)])
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if started is not None:
            started.set()

    generation = await session.generate(GenerateOptions(max_new_tokens=tokens), on_text)
    await session.close()
    assert "".join(pieces) == generation.text
    return generation.text


async def test_a_long_prompt_joins_in_pieces_between_the_others_steps(
    solo_engine: LocalEngine, batch_engine: LocalEngine
) -> None:
    long_question = "Please summarise this: " + "the cat sat on the warm mat by the door. " * 12
    alone = [await _reply(solo_engine, QUESTIONS[1], 60), await _reply(solo_engine, long_question, 8)]
    batch_engine.join_chunk = 8
    calls = ForwardCalls(batch_engine.model)
    try:
        running = asyncio.Event()
        first = asyncio.ensure_future(_reply(batch_engine, QUESTIONS[1], 60, running))
        await running.wait()
        second = await _reply(batch_engine, long_question, 8)
        together = [await first, second]
    finally:
        calls.close()
        batch_engine.join_chunk = 64
    assert together == alone
    pieces = [i for i, (rows, width) in enumerate(calls.seen) if width > 1]
    long_pieces = [i for i in pieces if i > pieces[0]]  # the first is the first conversation's prompt
    assert len(long_pieces) >= 10 and all(calls.seen[i][1] <= 8 for i in long_pieces)
    # between two pieces of the long prompt, the first conversation decoded a token
    assert all(calls.seen[i + 1] == (1, 1) for i in long_pieces[:-1])


async def test_a_round_cancelled_while_its_prompt_joins_stops_and_the_next_round_prefills_the_rest(
    solo_engine: LocalEngine, batch_engine: LocalEngine
) -> None:
    long_question = "Please summarise this: " + "the cat sat on the warm mat by the door. " * 12
    alone = await _reply(solo_engine, long_question, 8)
    batch_engine.join_chunk = 8
    try:
        running = asyncio.Event()
        first = asyncio.ensure_future(_reply(batch_engine, QUESTIONS[1], 60, running))
        await running.wait()
        session = await batch_engine.start([SYSTEM, ChatMessage("user", long_question)])
        options = GenerateOptions(max_new_tokens=8)
        options.cancel.set()
        cancelled = await session.generate(options)
        assert cancelled.finish == "cancelled" and cancelled.text == ""
        assert 0 < cancelled.prompt_tokens < session.tokens  # stopped between two pieces
        again = await session.generate(GenerateOptions(max_new_tokens=8))
        await session.close()
        await first
    finally:
        batch_engine.join_chunk = 64
    assert again.text == alone


async def test_out_of_memory_at_join_fails_only_the_joining_request(
    solo_engine: LocalEngine, batch_engine: LocalEngine
) -> None:
    alone = [await _conversation(solo_engine, i, tokens=40) for i in range(3)]
    joins = 0

    def fault() -> None:  # the engine's own failure point, just before a round joins the batch
        nonlocal joins
        joins += 1
        if joins == 3:
            raise torch.OutOfMemoryError("injected: no room for one more conversation")

    batch_engine.join_fault = fault
    counted = batch_engine.stats.out_of_memory  # what /metrics shows as yanray_out_of_memory_total
    try:
        running = asyncio.Event()
        first = asyncio.ensure_future(_conversation(batch_engine, 1, tokens=40, started=running))
        await running.wait()
        running.clear()
        second = asyncio.ensure_future(_conversation(batch_engine, 2, tokens=40, started=running))
        await running.wait()
        with pytest.raises(EngineError, match="ran out of memory"):
            await _conversation(batch_engine, 0, tokens=40)
        assert [await first, await second] == alone[1:]
    finally:
        batch_engine.join_fault = None
    assert batch_engine.stats.out_of_memory == counted + 1
    assert await _conversation(batch_engine, 0, tokens=40) == alone[0]  # and it works again after


async def test_out_of_memory_in_a_batched_step_fails_the_last_joined_and_the_rest_go_on(
    solo_engine: LocalEngine, batch_engine: LocalEngine
) -> None:
    alone = [await _conversation(solo_engine, i, tokens=40) for i in (1, 2, 3)]
    failed = False

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        nonlocal failed
        if kwargs["input_ids"].shape == (3, 1) and not failed:
            failed = True
            raise torch.OutOfMemoryError("injected: a batched step ran out of memory")

    counted = batch_engine.stats.out_of_memory
    handle = batch_engine.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        running = asyncio.Event()
        tasks = []
        for index in (1, 2, 3):
            tasks.append(
                asyncio.ensure_future(_conversation(batch_engine, index, tokens=40, started=running))
            )
            await running.wait()
            running.clear()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        handle.remove()
    assert failed
    assert results[:2] == alone[:2]
    assert isinstance(results[2], EngineError) and "ran out of memory" in str(results[2])
    assert batch_engine.stats.out_of_memory == counted + 1


# -- through the worker ----------------------------------------------------------------


async def _ask_all(core: Any, users: list[str], *, stop: str = "") -> list[RecordingStream]:
    outs: list[RecordingStream] = []

    class Stopping(RecordingStream):
        async def progress(self, text: str) -> None:
            await super().progress(text)
            if len(self.of("progress")) == 1:  # mid-way: the first text shown
                await core.dispatcher.handle(msg("/stop", user=stop), RecordingStream("/stop"))

    for user, question in zip(users, QUESTIONS, strict=True):
        out = Stopping(user) if user == stop else RecordingStream(user)
        await core.dispatcher.handle(msg(question, user=user), out)
        outs.append(out)
    return outs


async def test_four_conversations_through_the_worker(
    make_settings, core_factory, random_folder: Path
) -> None:
    settings = make_settings(tools=[], max_new_tokens=300, max_batch=1)
    solo = next(_load(random_folder, 1))
    core = await core_factory(settings, solo)
    assert core.worker.slots == 1
    rows = ForwardCalls(solo.model)
    alone = []
    for user, question in zip(["a1", "a2", "a3", "a4"], QUESTIONS, strict=True):
        out = RecordingStream(user)
        await core.dispatcher.handle(msg(question, user=user), out)
        alone.append(await out.wait(60))
    rows.close()
    assert set(rows.decode_rows) == {1}  # MAX_BATCH=1: one at a time, as before
    await core.aclose()

    batched = next(_load(random_folder, 4))
    core = await core_factory(make_settings(tools=[], max_new_tokens=300), batched)
    assert core.worker.slots == 4  # unset: what the engine batches (4 on the CPU)
    rows = ForwardCalls(batched.model)
    outs = await _ask_all(core, ["b1", "b2", "b3", "b4"], stop="b2")
    answers = [await out.wait(60) for out in outs]
    await core.wait_idle()
    rows.close()
    assert max(rows.decode_rows) == 4
    assert [answers[i] for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]
    stopped = answers[1]
    assert stopped is not None and stopped.endswith("\n\n[Stopped.]")
    assert alone[1] is not None and alone[1].startswith(stopped.removesuffix("\n\n[Stopped.]"))
    assert len(stopped) < len(alone[1])


@pytest.fixture(scope="module")
def calling_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ChatGLM3 that answers every round with a calculator call (the steered model's
    next token depends on the last token only, so each round writes the same line)."""
    tok = ChatGLM3Tokenizer(fixtures_dir() / "tokenizer.model")
    ids = tok.encode_text("Let me check.\n/calculate (6*7)") + [EOS]
    return steered_chatglm3(tmp_path_factory.mktemp("calling"), steer_chain(ids))


async def test_four_conversations_with_tool_rounds_through_the_worker(
    make_settings, core_factory, calling_folder: Path
) -> None:
    """Each conversation's tool rounds stay its own while four decode together, one /stopped."""
    settings = make_settings(tools=["calculate"], tool_rounds=2, max_new_tokens=40, max_batch=1)
    solo = next(_load(calling_folder, 1))
    core = await core_factory(settings, solo)
    alone = []
    for user, question in zip(["a1", "a2", "a3", "a4"], QUESTIONS, strict=True):
        out = RecordingStream(user)
        await core.dispatcher.handle(msg(question, user=user), out)
        alone.append(await out.wait(60))
    await core.aclose()
    assert all(answer is not None and answer.startswith("Let me check.\nLet me check.") for answer in alone)

    batched = next(_load(calling_folder, 4))
    core = await core_factory(make_settings(tools=["calculate"], tool_rounds=2, max_new_tokens=40), batched)
    rows = ForwardCalls(batched.model)
    outs = await _ask_all(core, ["b1", "b2", "b3", "b4"], stop="b2")
    answers = [await out.wait(60) for out in outs]
    await core.wait_idle()
    rows.close()
    assert max(rows.decode_rows) > 1  # the rounds really decoded together
    assert [answers[i] for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]
    stopped = answers[1]
    assert stopped is not None and stopped.endswith("\n\n[Stopped.]")
    async with core.db.reading() as session:
        results = (await session.scalars(select(Message.text).where(Message.role == "tool"))).all()
    # two calculator rounds for each of the four solo answers and the three batched ones not stopped
    assert results.count("42") >= 2 * 4 + 2 * 3


# -- the queue with several slots --------------------------------------------------------


async def test_positions_with_several_slots_count_the_waiting_requests_ahead() -> None:
    queue = RequestQueue(max_total=10, max_per_conversation=5)
    queue.slots = 2
    jobs = [Job(i, i, RecordingStream()) for i in range(4)]
    assert queue.put(jobs[0], reserved=False) == 0  # a free slot takes it now
    assert queue.put(jobs[1], reserved=False) == 0  # and the other free slot
    queue.begin(jobs[0])
    queue.begin(jobs[1])
    queue._jobs = [e for e in queue._jobs if e[2] not in jobs[:2]]
    assert queue.put(jobs[2], reserved=False) == 1  # next, at the next free slot
    assert queue.put(jobs[3], reserved=False) == 2  # one request waits ahead of it
    queue.end(jobs[0])
    assert queue.position(jobs[2]) == 0 and queue.position(jobs[3]) == 1
    again = Job(9, 1, RecordingStream())  # conversation 1 asks again while its answer is written
    assert queue.put(again, reserved=False) == 2  # jobs[2] takes the free slot, jobs[3] goes before it
    queue._jobs = [e for e in queue._jobs if e[2] is not jobs[2]]
    queue.begin(jobs[2])
    queue.end(jobs[1])
    assert queue.position(jobs[3]) == 0 and queue.position(again) == 1
    queue._jobs = [e for e in queue._jobs if e[2] is not jobs[3]]
    queue.begin(jobs[3])
    queue.end(jobs[2])
    queue.begin(Job(10, 1, RecordingStream()))  # its conversation busy: a free slot cannot take it
    queue.end(jobs[3])
    assert queue.position(again) == 1


async def test_a_burst_does_not_hold_the_slots_another_conversation_can_use(
    make_settings, core_factory
) -> None:
    engine = ScriptedEngine(responder=lambda m: f"answer to {m[-1].content}")
    released = asyncio.Event()

    async def hold_alice() -> None:  # alice's answers are written only once bob and carol have theirs
        if engine.prompts[-1][-1].content.startswith("a"):
            await released.wait()

    engine.before_reply = hold_alice
    core = await core_factory(
        make_settings(tools=[], queue_per_conversation=20, queue_max=40, max_batch=3), engine
    )
    assert core.worker.slots == 3
    burst = [RecordingStream(f"a{i}") for i in range(10)]
    for i, out in enumerate(burst):
        await core.dispatcher.handle(msg(f"a{i}", user="alice"), out)
    bob, carol = RecordingStream("bob"), RecordingStream("carol")
    await core.dispatcher.handle(msg("b0", user="bob"), bob)
    await core.dispatcher.handle(msg("c0", user="carol"), carol)
    # alice's burst is answered one at a time (each question needs the answer before it), so it
    # holds one slot; bob and carol take the free ones at once, told nothing about a queue
    assert bob.of("notice") == [] and carol.of("notice") == []
    assert (await bob.wait(30), await carol.wait(30)) == ("answer to b0", "answer to c0")
    assert [prompt[-1].content for prompt in engine.prompts] == ["a0", "b0", "c0"]
    dave = RecordingStream("dave")
    await core.dispatcher.handle(msg("d0", user="dave"), dave)
    assert await dave.wait(30) == "answer to d0"
    released.set()
    await core.wait_idle()
    assert [out.answer for out in burst] == [f"answer to a{i}" for i in range(10)]
    order = [prompt[-1].content for prompt in engine.prompts]
    assert order == ["a0", "b0", "c0", "d0", *(f"a{i}" for i in range(1, 10))]
