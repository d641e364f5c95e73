"""Fitting the history off the event loop: the engine counts and fits (`engine/fit.py`).

Through the real worker and the real `LocalEngine` on a tiny steered ChatGLM3 (its reply is
known): every message is tokenized on the engine's threads, never on the event loop, and
once (a later request does not encode the old messages again); the prompt assembled from
kept ids is exactly the prompt encoded whole. The history is read back outside the write
transaction, so others can write while it is read (SQLite, WAL).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from tests.model_fixtures import fixtures_dir, steer_chain, steered_chatglm3
from tests.recording import RecordingStream
from tests.scripted_engine import ScriptedEngine
from tests.test_core import ask, msg
from yanray.engine.base import ChatMessage, PromptTooLong, ToolSpec
from yanray.engine.chatglm3.tokenizer import EOS, ChatGLM3Tokenizer
from yanray.engine.local import LocalEngine
from yanray.engine.openai import OpenAIEngine
from yanray.storage.db import READ_ONLY

ANSWER = "你好！我是 Yanray。"
CALC = ToolSpec(
    "calculate",
    "Evaluate an arithmetic expression",
    {"type": "object", "properties": {"expression": {"type": "string"}}},
    "/calculate <expression>",
)


class RecordingTokenizer(ChatGLM3Tokenizer):
    """The real tokenizer, noting each text it encodes and the thread it ran on."""

    def __init__(self, model_file: Path) -> None:
        super().__init__(model_file)
        self.calls: list[tuple[str, threading.Thread]] = []

    def encode_text(self, text: str) -> list[int]:
        self.calls.append((text, threading.current_thread()))
        return super().encode_text(text)


@pytest.fixture(scope="module")
def answer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = ChatGLM3Tokenizer(fixtures_dir() / "tokenizer.model")
    ids = tok.encode_text("\n") + tok.encode_text(ANSWER) + [EOS]
    return steered_chatglm3(tmp_path_factory.mktemp("answer"), steer_chain(ids))


@pytest.fixture
async def engine(answer_folder: Path) -> AsyncIterator[tuple[LocalEngine, RecordingTokenizer]]:
    local = LocalEngine.load(answer_folder, device="cpu", dtype="float32", seed=1, kv_cache_gb=0)
    recording = RecordingTokenizer(fixtures_dir() / "tokenizer.model")
    local.fmt.tokenizer = recording  # type: ignore[attr-defined]
    try:
        yield local, recording
    finally:
        await local.aclose()


@pytest.fixture
async def core(engine: tuple[LocalEngine, RecordingTokenizer], make_settings: Any, core_factory: Any) -> Any:
    """A core answering with the steered model, the calculator on."""
    return await core_factory(make_settings(tools=["calculate"], max_new_tokens=16), engine[0])


async def test_the_request_path_tokenizes_off_the_loop_and_each_message_once(
    core: Any, engine: tuple[LocalEngine, RecordingTokenizer]
) -> None:
    tokenizer = engine[1]
    loop_thread = threading.current_thread()
    questions = ["What is 6 times 7?", "And 7 times 8?", "Thanks, tell me a story"]
    encoded: list[set[str]] = []
    for question in questions:
        tokenizer.calls.clear()
        assert await (await ask(core, question)).wait() == ANSWER
        threads = {thread for _text, thread in tokenizer.calls}
        assert tokenizer.calls and loop_thread not in threads
        assert {thread.name.split("_")[0] for thread in threads} <= {"yanray-tokenize", "yanray-engine"}
        encoded.append({text for text, _thread in tokenizer.calls})
    # the first request encodes the system prompt (with the tools) and the question; later ones
    # only what is new: the question, and the first answer (the model's ids were never a message)
    assert questions[0] in encoded[0] and any("calculate" in text for text in encoded[0])
    assert encoded[1] == {"\n", ANSWER, questions[1]}
    assert encoded[2] == {"\n", questions[2]}


async def test_new_instructions_are_counted_off_the_loop(
    core: Any, engine: tuple[LocalEngine, RecordingTokenizer]
) -> None:
    tokenizer = engine[1]
    loop_thread = threading.current_thread()
    instructions = "You are a terse pirate. " * 150  # 3,600 characters: within the /system limit
    tokenizer.calls.clear()
    out = RecordingStream("/system")
    await core.dispatcher.handle(msg(f"/system {instructions.strip()}"), out)
    said = await out.wait()
    counted = [thread for text, thread in tokenizer.calls if "terse pirate" in text]
    assert counted and loop_thread not in counted  # the new instructions were measured, on a thread
    assert said is not None and ("Instructions set" in said or "too long for my context" in said)


async def test_a_prompt_assembled_from_kept_ids_is_the_prompt_encoded_whole(
    engine: tuple[LocalEngine, RecordingTokenizer],
) -> None:
    local, tokenizer = engine
    system = ChatMessage("system", "You are Yanray.")
    history = [
        ChatMessage("user", "What is 6 times 7?"),
        ChatMessage("assistant", 'tool_call(expression="6*7")', name="calculate"),
        ChatMessage("observation", '{"result": 42}', name="calculate"),
        ChatMessage("assistant", "It is 42."),
        ChatMessage("user", "And 7 times 8?"),
    ]
    budget = local.max_context - 16
    messages = await local.fit(system, history, [CALC], budget)
    assert messages == [system, *history]
    session = await local.start(messages, [CALC])
    try:
        assert session.state.tokens == tokenizer.encode_prompt(messages, [CALC])
        assert local.count_tokens(messages, [CALC]) == len(session.state.tokens)
    finally:
        await session.close()
    # a budget the newest turn alone overflows is refused, with the counts
    with pytest.raises(PromptTooLong) as refused:
        await local.fit(system, history, [CALC], local.count_tokens([system], [CALC]) + 3)
    assert refused.value.part == "message" and refused.value.room == 3


async def test_the_openai_engine_fits_by_its_estimate() -> None:
    engine = OpenAIEngine(base_url="http://127.0.0.1:9/v1", model="m", api_key=None, timeout=1)
    try:
        system = ChatMessage("system", "rules")
        turns = [ChatMessage("user" if i % 2 == 0 else "assistant", "x" * 300) for i in range(10)]
        whole = engine.count_tokens([system, *turns])
        assert await engine.fit(system, turns, [], whole) == [system, *turns]
        cut = await engine.fit(system, turns, [], whole - 1)
        assert cut[0] == system and cut[-1] == turns[-1] and cut[1].role == "user"
        assert engine.count_tokens(cut) <= (whole - 1) * 3 // 4
        with pytest.raises(PromptTooLong) as refused:
            await engine.fit(system, turns, [], engine.count_tokens([system]))
        assert refused.value.part == "instructions"
    finally:
        await engine.aclose()


async def test_others_can_write_while_the_history_is_read(
    make_settings: Any, core_factory: Any, database_url: str
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("the write lock is SQLite's")
    path = database_url.split(":///", 1)[1]
    engine = ScriptedEngine(["first answer", "second answer"])
    core = await core_factory(make_settings(tools=[]), engine)
    await (await ask(core, "first question")).wait()
    writes: list[str] = []

    # while the worker reads the history back, another connection takes SQLite's write lock
    @event.listens_for(core.db.engine.sync_engine, "after_cursor_execute")
    def _while_reading(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM messages" not in statement or not conn.get_execution_options().get(READ_ONLY):
            return
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("CREATE TABLE IF NOT EXISTS probe (x INTEGER)")
            other.execute("COMMIT")
            writes.append("written")
        except sqlite3.OperationalError as exc:
            writes.append(str(exc))
        finally:
            other.close()

    try:
        assert await (await ask(core, "second question")).wait() == "second answer"
    finally:
        event.remove(core.db.engine.sync_engine, "after_cursor_execute", _while_reading)
    assert writes == ["written"]
    assert [m.content for m in engine.prompts[-1][1:]] == [
        "first question",
        "first answer",
        "second question",
    ]
