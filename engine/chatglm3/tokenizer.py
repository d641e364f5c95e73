"""ChatGLM3's prompt encoder and byte-exact decoder, on plain sentencepiece (no THUDM code).

Encoding follows the fixtures' PROMPT_FORMAT.md: `[gMASK] sop`, then one block per
message `[role_id] + sp(metadata + "\\n") + sp(content)` (each piece encoded on its own,
so each gets sentencepiece's dummy prefix), then `<|assistant|>`. Message text only ever
goes through sentencepiece, whose control pieces (`<s>`, `</s>`) are never produced from
text, and the nine ChatGLM3 specials are not sentencepiece pieces at all, so user text
can never yield a special id.

Choices where the reference is silent or unsuitable:

- tools: the first system message carries them as `content + "\\n" + json.dumps(tools,
  indent=4, ensure_ascii=False)`; with tools but no system message, one is added with
  ChatGLM3's own tool prompt ("Answer the following questions ..."). Without tools the
  system message is exactly its content.
- metadata: an assistant message's `name` (a native tool call) is its metadata line; an
  observation's metadata is empty, as in the reference `chat()`.
- decoding goes through each id's bytes (`▁` is a space, `<0xNN>` pieces are raw bytes)
  into an incremental UTF-8 decoder, so a character split over byte-fallback pieces
  (emoji, rare CJK) comes out whole or not at all. Invalid bytes become U+FFFD.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from yanray.engine.base import ChatMessage, ToolSpec

MASK, GMASK, SMASK, SOP, EOP = 64789, 64790, 64791, 64792, 64793
SYSTEM, USER, ASSISTANT, OBSERVATION = 64794, 64795, 64796, 64797
SPECIAL_IDS: Mapping[str, int] = {
    "[MASK]": MASK,
    "[gMASK]": GMASK,
    "[sMASK]": SMASK,
    "sop": SOP,
    "eop": EOP,
    "<|system|>": SYSTEM,
    "<|user|>": USER,
    "<|assistant|>": ASSISTANT,
    "<|observation|>": OBSERVATION,
}
ROLE_IDS: Mapping[str, int] = {
    "system": SYSTEM,
    "user": USER,
    "assistant": ASSISTANT,
    "observation": OBSERVATION,
}
EOS = 2
#: what ends a ChatGLM3 reply (`chat()` passes these as eos_token_id)
STOP_IDS = frozenset({EOS, USER, OBSERVATION})
SP_VOCAB_SIZE = 64789
TOOL_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


def tool_schema(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """Tools in ChatGLM3's own format (what its system message carries)."""
    return [{"name": t.name, "description": t.description, "parameters": _plain(t.parameters)} for t in tools]


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class Utf8Stream:
    """Bytes in, whole characters out: incomplete UTF-8 sequences are held back."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        """Whatever is held back, as U+FFFD if it never completed."""
        return self._decoder.decode(b"", final=True)


def frame(blocks: Iterable[Sequence[int]]) -> list[int]:
    """A prompt around its message blocks: the prefix, the blocks, the generation prompt."""
    ids = [GMASK, SOP]
    for block in blocks:
        ids += block
    ids.append(ASSISTANT)
    return ids


class ChatGLM3Tokenizer:
    """The ChatGLM3 tokenizer: sentencepiece plus the nine ids the Python tokenizer adds."""

    def __init__(self, model_file: Path) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        if self.sp.vocab_size() != SP_VOCAB_SIZE:
            raise ValueError(
                f"{model_file}: {self.sp.vocab_size()} pieces, but ChatGLM3's tokenizer.model has {SP_VOCAB_SIZE}"
            )
        self._bytes: list[bytes] | None = None

    # -- encoding ----------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Plain sentencepiece ids of `text` (with the dummy prefix); never a special id."""
        return list(self.sp.encode(text)) if text else []

    def encode_block(self, role: str, content: str, metadata: str = "") -> list[int]:
        return [ROLE_IDS[role], *self.encode_text(metadata + "\n"), *self.encode_text(content)]

    def message_block(self, message: ChatMessage) -> list[int]:
        metadata = message.name if message.role == "assistant" else ""
        return self.encode_block(message.role, message.content, metadata)

    def encode_prompt(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> list[int]:
        """The whole prompt: prefix, one block per message, and the generation prompt."""
        return frame(self.message_block(message) for message in with_tools(messages, tools))

    def encode_append(self, message: ChatMessage) -> list[int]:
        """What follows a finished round for `message` (usually an observation), ready to generate."""
        return [*self.message_block(message), ASSISTANT]

    # -- decoding ----------------------------------------------------------------------

    def _table(self) -> list[bytes]:
        if self._bytes is None:
            table = []
            for i in range(SP_VOCAB_SIZE):
                if self.sp.is_byte(i):
                    table.append(bytes([int(self.sp.id_to_piece(i)[3:5], 16)]))
                elif self.sp.is_control(i) or self.sp.is_unknown(i):
                    table.append(b"")
                else:
                    table.append(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
            self._bytes = table
        return self._bytes

    def id_bytes(self, token: int) -> bytes:
        """The bytes one id stands for; special and padding ids (>= 64789) stand for none."""
        table = self._table()
        return table[token] if 0 <= token < len(table) else b""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, special ids written as their names (as the reference `decode` does)."""
        names = {v: k for k, v in SPECIAL_IDS.items()}
        out: list[str] = []
        stream = Utf8Stream()
        for token in ids:
            if token in names:
                out.append(stream.flush())
                stream = Utf8Stream()
                out.append(names[token])
            else:
                out.append(stream.feed(self.id_bytes(token)))
        out.append(stream.flush())
        return "".join(out)


def with_tools(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> list[ChatMessage]:
    """`messages` with the tools put into the first system message (added if there is none)."""
    if not tools:
        return list(messages)
    tools_json = json.dumps(tool_schema(tools), indent=4, ensure_ascii=False)
    out = list(messages)
    for i, message in enumerate(out):
        if message.role == "system":
            out[i] = ChatMessage("system", message.content + "\n" + tools_json)
            return out
    return [ChatMessage("system", TOOL_PROMPT + "\n" + tools_json), *out]
