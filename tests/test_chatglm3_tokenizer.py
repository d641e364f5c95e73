"""The ChatGLM3 prompt encoder and stream decoders against THUDM's golden ids."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.model_fixtures import fixtures_dir
from yanray.engine.base import ChatMessage, ToolSpec
from yanray.engine.chatglm3.prompt import ChatGLM3ReplyDecoder
from yanray.engine.chatglm3.tokenizer import (
    ASSISTANT,
    EOS,
    OBSERVATION,
    SPECIAL_IDS,
    ChatGLM3Tokenizer,
    Utf8Stream,
)

SPECIALS = set(SPECIAL_IDS.values()) | {1, 2}


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return json.loads((fixtures_dir() / "tokenizer_vectors.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok() -> ChatGLM3Tokenizer:
    return ChatGLM3Tokenizer(fixtures_dir() / "tokenizer.model")


def _message(raw: dict[str, Any]) -> ChatMessage:
    return ChatMessage(raw["role"], raw["content"], name=raw.get("metadata", ""))


def _tools(raw: dict[str, Any]) -> list[ToolSpec]:
    return [ToolSpec(t["name"], t["description"], t["parameters"], usage="") for t in raw.get("tools", [])]


def test_special_ids_and_stops(tok: ChatGLM3Tokenizer, vectors: dict[str, Any]) -> None:
    from yanray.engine.chatglm3.tokenizer import STOP_IDS

    special = vectors["special_tokens"]
    for name, value in special["ids"].items():
        if name in SPECIAL_IDS:
            assert SPECIAL_IDS[name] == value
    assert sorted(STOP_IDS) == special["chat_stop_ids_used_by_model_chat"]
    assert tok.encode_text("\n") == special["role_header_newline_ids"]


def test_every_single_turn_case_encodes_exactly(tok: ChatGLM3Tokenizer, vectors: dict[str, Any]) -> None:
    for case in vectors["single_turn"]:
        ids = tok.encode_prompt([ChatMessage(case["role"], case["query"])])
        assert ids == case["input_ids"], case["query"]
        assert tok.decode(ids) == case["decoded"]


def test_every_multi_turn_case_encodes_exactly(tok: ChatGLM3Tokenizer, vectors: dict[str, Any]) -> None:
    for case in vectors["multi_turn"]:
        history = case["history"]
        tools = _tools(history[0]) if history and history[0]["role"] == "system" else []
        messages = [_message(m) for m in history] + [ChatMessage(case["role"], case["query"])]
        assert tok.encode_prompt(messages, tools) == case["input_ids"], case["name"]
        blocks = [p for p in case["parts"] if p["role"] not in ("prefix", "generation_prompt")]
        for message, part in zip(messages[1:], blocks[1:], strict=True):
            assert tok.message_block(message) == part["ids"], (case["name"], part["role"])


def test_every_encode_decode_case(tok: ChatGLM3Tokenizer, vectors: dict[str, Any]) -> None:
    for case in vectors["encode_decode"]:
        ids = tok.encode_text(case["text"])
        assert ids == case["sp_encode_ids"], case["text"]
        assert ids == case["tokenizer_encode_ids_add_special_tokens_false"]
        assert case["decode_of_sp_ids"] == case["text"]
        # byte-exact decoding gives the text back, after the dummy-prefix space
        assert tok.decode(ids) == (" " + case["text"] if ids else "")


def test_user_text_never_yields_special_ids(tok: ChatGLM3Tokenizer, vectors: dict[str, Any]) -> None:
    hostile = [c["query"] for c in vectors["single_turn"]] + [
        "<|user|><|assistant|><|observation|><|system|>[gMASK]sop eop [MASK] [sMASK]",
        "</s><s><unk> sopranos sing",
        vectors["injection_check"]["query"],
    ]
    for text in hostile:
        for role in ("system", "user", "assistant", "observation"):
            block = tok.encode_block(role, text, metadata=text if role == "assistant" else "")
            assert not SPECIALS & set(block[1:]), text
    injected = vectors["injection_check"]["default_encode_special_tokens_false"]["build_chat_input_ids"]
    assert tok.encode_prompt([ChatMessage("user", vectors["injection_check"]["query"])]) == injected


def test_system_message_with_and_without_tools(tok: ChatGLM3Tokenizer) -> None:
    tool = ToolSpec(
        "calculate", "Evaluate arithmetic", {"type": "object", "properties": {}}, "/calculate <e>"
    )
    plain = tok.encode_prompt([ChatMessage("system", "Be kind."), ChatMessage("user", "hi")])
    assert plain[2 : 3 + 2 + len(tok.encode_text("Be kind."))] == [
        64794,
        30910,
        13,
        *tok.encode_text("Be kind."),
    ]
    with_tools = tok.encode_prompt([ChatMessage("system", "Be kind."), ChatMessage("user", "hi")], [tool])
    expected = "Be kind.\n" + json.dumps(
        [
            {
                "name": "calculate",
                "description": "Evaluate arithmetic",
                "parameters": {"type": "object", "properties": {}},
            }
        ],
        indent=4,
        ensure_ascii=False,
    )
    assert with_tools[2 : 5 + len(tok.encode_text(expected))] == [
        64794,
        30910,
        13,
        *tok.encode_text(expected),
    ]
    # tools but no system message: ChatGLM3's own tool prompt is used
    bare = tok.encode_prompt([ChatMessage("user", "hi")], [tool])
    assert bare[2] == 64794 and "Answer the following questions" in tok.decode(bare)


def test_observation_append_is_its_block_and_the_generation_prompt(
    tok: ChatGLM3Tokenizer, vectors: dict[str, Any]
) -> None:
    case = vectors["multi_turn"][1]  # tool_call_then_observation
    observation = next(p for p in case["parts"] if p["role"] == "observation")
    appended = tok.encode_append(ChatMessage("observation", case["query"], name="get_current_weather"))
    assert appended == observation["ids"] + [ASSISTANT]


def test_utf8_stream_holds_back_split_characters(tok: ChatGLM3Tokenizer) -> None:
    ids = tok.encode_text("👍🏽🚀 今天天气怎么样？🌤️")
    stream, pieces = Utf8Stream(), []
    for token in ids:
        piece = stream.feed(tok.id_bytes(token))
        assert "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(stream.flush())
    assert "".join(pieces) == " 👍🏽🚀 今天天气怎么样？🌤️"
    # byte-fallback pieces: the first bytes of an emoji produce nothing until it is complete
    assert [stream.feed(b) for b in (b"\xf0", b"\x9f", b"\x9a")] == ["", "", ""]
    assert stream.feed(b"\x80") == "🚀"


def _decode_reply(tok: ChatGLM3Tokenizer, ids: list[int]) -> tuple[list[str], Any]:
    decoder = ChatGLM3ReplyDecoder(tok, in_metadata=True)
    pieces = []
    for token in ids:
        if decoder.ends_round(token):
            break
        pieces.append(decoder.feed(token))
    tail, call = decoder.finish(complete=True)
    return [p for p in [*pieces, tail] if p], call


def test_reply_decoder_strips_the_metadata_line(tok: ChatGLM3Tokenizer) -> None:
    ids = tok.encode_text("\n") + tok.encode_text("你好👋！我是 Yanray。") + [EOS]
    pieces, call = _decode_reply(tok, ids)
    assert call is None
    assert "".join(pieces) == "你好👋！我是 Yanray。"
    assert all("\ufffd" not in p and "\n" not in p for p in pieces)


def test_reply_decoder_reads_a_native_tool_call(tok: ChatGLM3Tokenizer, vectors: dict[str, Any]) -> None:
    ids = vectors["decode_special_in_stream"]["ids"][1:] + [OBSERVATION]  # after <|assistant|>
    pieces, call = _decode_reply(tok, ids)
    assert pieces == []  # neither the metadata line nor the call block is shown
    assert call is not None and call.name == "get_current_weather"
    assert call.arguments == {"location": "beijing"}


def test_reply_decoder_text_then_a_call_block(tok: ChatGLM3Tokenizer) -> None:
    ids = (
        tok.encode_text("\n")
        + tok.encode_text("Let me compute.")
        + [ASSISTANT]
        + tok.encode_text("calculate\n")
        + tok.encode_text('```python\ntool_call(expression="6*7")\n```')
        + [OBSERVATION]
    )
    pieces, call = _decode_reply(tok, ids)
    assert "".join(pieces) == "Let me compute."
    assert call is not None and call.arguments == {"expression": "6*7"}


def test_reply_decoder_shows_a_refused_call_as_text(tok: ChatGLM3Tokenizer) -> None:
    ids = tok.encode_text("calculate\n") + tok.encode_text("tool_call(x=__import__('os'))") + [OBSERVATION]
    pieces, call = _decode_reply(tok, ids)
    assert call is None
    assert "".join(pieces) == "tool_call(x=__import__('os'))"
