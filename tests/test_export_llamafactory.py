"""An exported record, rendered by LLaMA-Factory's `chatglm3` template, is what Yanray's own
ChatGLM3 prompt builder makes of the same conversation: the same role ids and the same text,
down to the token ids (`tests/llamafactory.py` re-implements the template).

The differences are the ones docs/decisions/training-export.md documents, each shown here:
a native tool call becomes the slash line, consecutive questions are one turn, and
LLaMA-Factory ends the record with `</s>` where Yanray's prompt ends with the generation
prompt `<|assistant|>`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests import llamafactory
from tests.recording import RecordingStream
from tests.scripted_engine import ScriptedEngine
from tests.test_export import ALICE, SYSTEM, build_database, settings_for
from yanray.bot.context import system_prompt
from yanray.bot.export import ExportOptions, export
from yanray.bot.settings import Settings
from yanray.bot.toolloop import SlashCalls
from yanray.bot.tools import build_tools
from yanray.bot.types import Incoming
from yanray.bot.worker import to_chat
from yanray.engine.base import ChatMessage
from yanray.engine.chatglm3.tokenizer import ASSISTANT, EOS, STOP_IDS, ChatGLM3Tokenizer
from yanray.storage import Database, crud

TOKENIZER = ChatGLM3Tokenizer(Path(__file__).parent / "fixtures" / "chatglm3" / "tokenizer.model")


def yanray_ids(settings: Settings, messages: list[ChatMessage]) -> list[int]:
    """The prompt Yanray's worker and ChatGLM3 format build for `messages` (after the system)."""
    tools = build_tools(settings.tools, settings)
    system = ChatMessage("system", system_prompt(SYSTEM, list(tools.values()), native=True))
    return TOKENIZER.encode_prompt([system, *messages], [t.spec for t in tools.values()])


def trained_ids(folder: Path) -> list[list[int]]:
    """The ids LLaMA-Factory trains on, record by record."""
    return [llamafactory.chatglm3_ids(example, TOKENIZER) for example in llamafactory.load(folder)["yanray"]]


async def stored_messages(url: str, conversation_id: int) -> list[ChatMessage]:
    db = await Database.open(url)
    try:
        async with db.reading() as session:
            conversation = await crud.get_conversation(session=session, conversation_id=conversation_id)
            assert conversation is not None
            stored = await crud.context_messages(session=session, conversation=conversation, up_to_turn=10**9)
    finally:
        await db.close()
    return [to_chat(m) for m in stored]


async def test_a_tool_round_renders_as_yanray_prompts_it(make_settings, core_factory, tmp_path) -> None:
    """Stored by the real dispatcher, worker and tool loop (real calculator), then exported."""
    settings = settings_for(make_settings, admins=["test:u"])
    engine = ScriptedEngine(
        ["Hello! How can I help?", "Let me compute.\n/calculate 6.5*7.5\n", "It is 48.75."]
    )
    core = await core_factory(settings, engine)
    for question in ("Hi", "What is 6.5*7.5?"):
        out = RecordingStream()
        incoming = Incoming(platform="test", chat_id="c", user_id="u", display_name="U", text=question)
        await core.dispatcher.handle(incoming, out)
        await out.wait()
    await export(settings, ExportOptions(out=tmp_path / "out"))
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "yanray.jsonl").read_text().splitlines()]
    assert record["conversations"] == [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello! How can I help?"},
        {"from": "human", "value": "What is 6.5*7.5?"},
        {"from": "gpt", "value": "Let me compute.\n/calculate 6.5*7.5\n"},
        {"from": "observation", "value": "48.75"},
        {"from": "gpt", "value": "It is 48.75."},
    ]
    (trained,) = trained_ids(tmp_path / "out")
    prompt = yanray_ids(settings, await stored_messages(settings.database_url, 1))
    assert prompt[-1] == ASSISTANT and trained[-1] == EOS and EOS in STOP_IDS
    assert trained[:-1] == prompt[:-1]  # the same ids, role tokens and text alike
    assert SlashCalls(["calculate"]).last_call(record["conversations"][3]["value"]) == (
        "calculate",
        "6.5*7.5",
    )


async def test_the_documented_differences(make_settings, database_url, tmp_path) -> None:
    built = await build_database(database_url)
    settings = settings_for(make_settings)
    await export(settings, ExportOptions(out=tmp_path / "out", redact=False))
    records = trained_ids(tmp_path / "out")
    alice = await stored_messages(database_url, built.conversations[f"telegram:{ALICE}:{ALICE}"])

    # the first record is the first two exchanges exactly as Yanray stores and prompts them
    assert records[0] == yanray_ids(settings, alice[:6])[:-1] + [EOS]

    # a native call: Yanray prompts `<|assistant|>calculate` and the tool_call block ...
    native = alice[-6:-1]  # the question, the text before the call, the call, its result, the answer
    assert [m.role for m in native] == ["user", "assistant", "assistant", "observation", "assistant"]
    assert native[2].name == "calculate" and "tool_call(expression=" in native[2].content
    assert records[1] != yanray_ids(settings, native)[:-1] + [EOS]
    # ... the record has the slash line after the text, which Yanray's tool loop runs the same
    line = "I will use the calculator.\n/calculate 2+2\n"
    rewritten = [native[0], ChatMessage("assistant", line), *native[3:]]
    assert records[1] == yanray_ids(settings, rewritten)[:-1] + [EOS]
    assert SlashCalls(["calculate"]).last_call(line) == ("calculate", "2+2")

    # consecutive questions (one never answered) are one turn, joined by a blank line
    group = await stored_messages(database_url, built.conversations["telegram:-1001:"])
    assert [m.role for m in group] == ["user", "assistant", "user", "user", "assistant"]
    merged = [*group[:2], ChatMessage("user", f"{group[2].content}\n\n{group[3].content}"), group[4]]
    assert records[2] == yanray_ids(settings, merged)[:-1] + [EOS]
    assert records[2] != yanray_ids(settings, group)[:-1] + [EOS]


def test_the_template_renders_role_tokens_and_text() -> None:
    """The re-implemented template, on a record written out by hand (as LLaMA-Factory's own
    template tests do): prefix, system, and each turn's role token, newline and text."""
    example: dict[str, Any] = {
        "_prompt": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "/calculate 2+2\n"},
            {"role": "observation", "content": "4"},
        ],
        "_response": [{"role": "assistant", "content": "4."}],
        "_system": "S",
        "_tools": "",
    }
    assert llamafactory.chatglm3_elements(example) == [
        {"token": "[gMASK]"},
        {"token": "sop"},
        {"token": "<|system|>"},
        "\n",
        "S",
        {"token": "<|user|>"},
        "\n",
        "What is 2+2?",
        {"token": "<|assistant|>"},
        "\n",
        "/calculate 2+2\n",
        {"token": "<|observation|>"},
        "\n",
        "4",
        {"token": "<|assistant|>"},
        "\n",
        "4.",
    ]
