"""ChatGLM3's prompt format for the local engine: prompt ids, and reading a reply back.

`ChatGLM3Format` encodes with `engine/chatglm3/tokenizer.py` and reads ChatGLM3 replies: after
`<|assistant|>` the model writes a metadata line itself. An empty line means an answer
(leading whitespace stripped, as the reference `chat()` strips); a tool name followed by a
`tool_call(...)` block means a native tool call, which is never streamed and is parsed
with `engine/chatglm3/tools.py` when the round ends. A new `<|assistant|>` inside a reply
starts a new block (ChatGLM3 writes "thinking" text and then the call). Role ids, the
metadata line and padding ids never reach the text.

Choices where the reference is silent:

- a first line that is neither empty nor tool-name-like, or no newline within 64
  characters, is taken as answer text (the reference would fail on it);
- a tool-call block that does not parse (`ToolCallError`, e.g. `tool_call(x=__import__('os'))`)
  is treated as text: its content is shown as the answer, and no tool runs. The
  `Generation` carries no half-parsed call that the tool loop could misuse;
- an appended message becomes `block + <|assistant|>` after the kept tokens, so a tool round
  prefills only the observation's tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from yanray.engine.base import ChatMessage, ToolCall, ToolSpec
from yanray.engine.chat_format import AnswerText, ReplyDecoder
from yanray.engine.chatglm3.tokenizer import (
    ASSISTANT,
    STOP_IDS,
    SYSTEM,
    ChatGLM3Tokenizer,
    Utf8Stream,
    frame,
    with_tools,
)
from yanray.engine.chatglm3.tools import ToolCallError, is_tool_name, parse_tool_call

logger = logging.getLogger(__name__)

MAX_METADATA_CHARS = 64


class ChatGLM3ReplyDecoder:
    def __init__(self, tokenizer: ChatGLM3Tokenizer, *, in_metadata: bool) -> None:
        self.tokenizer = tokenizer
        self.phase = "metadata" if in_metadata else "answer"
        self.stream = Utf8Stream()
        self.metadata = ""
        self.call_parts: list[str] = []  # a call block's text, joined once when the round ends
        self.answer = AnswerText()
        self.answer.block_start = in_metadata

    def ends_round(self, token: int) -> bool:
        if token in STOP_IDS:
            return True
        # a call block is over when the model opens another block
        return self.phase == "call" and token in (ASSISTANT, SYSTEM)

    def feed(self, token: int) -> str:
        if token == ASSISTANT:
            tail = self._text(self.stream.flush())
            self.stream = Utf8Stream()
            self.phase, self.metadata = "metadata", ""
            self.answer.new_block()
            return tail
        return self._text(self.stream.feed(self.tokenizer.id_bytes(token)))

    def _text(self, text: str) -> str:
        if self.phase == "answer":
            return self.answer.add(text)
        if self.phase == "call":
            self.call_parts.append(text)
            return ""
        self.metadata += text
        line, newline, rest = self.metadata.partition("\n")
        if newline:
            if not line.strip():
                self.phase = "answer"
                return self.answer.add(rest)
            if is_tool_name(line):
                self.phase, self.metadata, self.call_parts = "call", line.strip(), [rest]
                return ""
        if newline or len(self.metadata) > MAX_METADATA_CHARS:
            self.phase = "answer"
            return self.answer.add(self.metadata)
        return ""

    def finish(self, complete: bool) -> tuple[str, ToolCall | None]:
        tail = self._text(self.stream.flush())
        if self.phase == "metadata":  # the reply never finished its first line
            return tail + self.answer.add(self.metadata), None
        if self.phase != "call" or not complete:
            return tail, None
        call_text = "".join(self.call_parts)
        try:
            return tail, parse_tool_call(self.metadata, call_text)
        except ToolCallError as exc:
            logger.warning("the model's %r tool call was refused (%s); shown as text", self.metadata, exc)
            self.answer.new_block()
            return tail + self.answer.add(call_text.strip()), None


class ChatGLM3Format:
    native_tools = True

    def __init__(self, tokenizer: ChatGLM3Tokenizer) -> None:
        self.tokenizer = tokenizer

    def prompt_ids(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> list[int]:
        return self.tokenizer.encode_prompt(messages, tools)

    def blocks(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> list[ChatMessage] | None:
        return with_tools(messages, tools)

    def message_ids(self, message: ChatMessage) -> list[int]:
        return self.tokenizer.message_block(message)

    def join(self, blocks: Sequence[Sequence[int]]) -> list[int]:
        """`encode_prompt`'s frame: the prefix, the blocks, the generation prompt."""
        return frame(blocks)

    def continuation(
        self,
        tokens: Sequence[int],
        transcript: Sequence[ChatMessage],
        message: ChatMessage,
        tools: Sequence[ToolSpec],
    ) -> tuple[int, list[int]]:
        return len(tokens), self.tokenizer.encode_append(message)

    def reply_decoder(self, prompt: Sequence[int]) -> ReplyDecoder:
        return ChatGLM3ReplyDecoder(self.tokenizer, in_metadata=bool(prompt) and prompt[-1] == ASSISTANT)
