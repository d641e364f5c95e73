"""Chat formats: how messages become prompt ids, and how a round's ids become text or a tool call.

`ChatFormat` and `ReplyDecoder` are what the local engine (`engine/generate.py`,
`engine/local.py`) needs of a model's prompt format. ChatGLM3's own format, with its native
tool calls, is `engine/chatglm3/prompt.py`; this module keeps what any model uses.

`TemplateFormat` serves any transformers chat model through its tokenizer's chat template
(rendered with `sanitize_control_tokens=True`, so user text cannot write the template's
control tokens). An observation is sent as a user message `Tools: <content>` (the seed's
plain format, as the openai backend does), and consecutive messages of one role are joined,
because many templates insist on alternating roles. Continuing a session re-renders the
conversation and keeps the cached tokens up to the first difference.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from yanray.engine.base import ChatMessage, EngineError, ToolCall, ToolSpec

logger = logging.getLogger(__name__)


class ReplyDecoder(Protocol):
    def ends_round(self, token: int) -> bool:
        """Whether `token` ends the round (it is then neither fed nor decoded)."""
        ...

    def feed(self, token: int) -> str:
        """The answer text `token` adds (may be empty; never a broken character)."""
        ...

    def finish(self, complete: bool) -> tuple[str, ToolCall | None]:
        """Remaining answer text, and the tool call if the round ended in a complete one."""
        ...


class ChatFormat(Protocol):
    native_tools: bool

    def prompt_ids(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> list[int]: ...

    def blocks(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> list[ChatMessage] | None:
        """The messages whose `message_ids`, laid end to end by `join`, are exactly
        `prompt_ids(messages, tools)` (tools folded into the system message); None where a
        message's ids depend on its neighbours (a chat template), and then only `prompt_ids`
        builds a prompt. With blocks, the local engine encodes each message once and keeps
        its ids (`engine/local.py`)."""
        ...

    def message_ids(self, message: ChatMessage) -> list[int]:
        """One block's ids (only where `blocks` is not None)."""
        ...

    def join(self, blocks: Sequence[Sequence[int]]) -> list[int]:
        """The prompt around the blocks' ids (only where `blocks` is not None)."""
        ...

    def continuation(
        self,
        tokens: Sequence[int],
        transcript: Sequence[ChatMessage],
        message: ChatMessage,
        tools: Sequence[ToolSpec],
    ) -> tuple[int, list[int]]:
        """(how many of `tokens` stay, the ids to add) for appending `message` after a round."""
        ...

    def reply_decoder(self, prompt: Sequence[int]) -> ReplyDecoder: ...


class AnswerText:
    """Answer text of one reply: strips each block's leading whitespace, separates blocks."""

    def __init__(self) -> None:
        self.any = False
        self.block_start = True

    def new_block(self) -> None:
        self.block_start = True

    def add(self, text: str) -> str:
        if self.block_start:
            text = text.lstrip()
            if not text:
                return ""
            if self.any:
                text = "\n\n" + text
            self.block_start = False
        self.any = self.any or bool(text)
        return text


class TemplateReplyDecoder:
    """Incremental detokenizer: emit the new suffix once it no longer ends in U+FFFD."""

    def __init__(self, fmt: TemplateFormat) -> None:
        self.fmt = fmt
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # end of what has been emitted
        self.answer = AnswerText()

    def ends_round(self, token: int) -> bool:
        return token in self.fmt.stop_ids

    def _pending(self) -> tuple[str, str]:
        return self.fmt.decode(self.ids[self.prefix : self.read]), self.fmt.decode(self.ids[self.prefix :])

    def feed(self, token: int) -> str:
        self.ids.append(token)
        before, now = self._pending()
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return self.answer.add(now[len(before) :])

    def finish(self, complete: bool) -> tuple[str, ToolCall | None]:
        before, now = self._pending()
        return self.answer.add(now[len(before) :]), None


class TemplateFormat:
    native_tools = False

    def __init__(self, tokenizer: Any, stop_ids: frozenset[int]) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        # fast tokenizers refuse concurrent use ("Already borrowed"): fitting and starting run on
        # the engine's tokenizing thread, counting at start-up on the caller's
        self._lock = threading.Lock()

    @staticmethod
    def conversation(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for message in messages:
            role, content = message.role, message.content
            if role == "observation":
                role, content = "user", f"Tools: {content}"
            if out and out[-1]["role"] == role:
                out[-1]["content"] += "\n\n" + content
            else:
                out.append({"role": role, "content": content})
        return out

    def prompt_ids(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> list[int]:
        try:
            with self._lock:
                ids = self.tokenizer.apply_chat_template(
                    self.conversation(messages),
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                    sanitize_control_tokens=True,
                )
        except ValueError as exc:  # this tokenizer turns some control token's text into that token
            logger.warning("chat template refused the messages: %s", exc)
            raise EngineError("This message contains text the model treats as a control token.") from None
        return [int(i) for i in ids]

    def blocks(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> list[ChatMessage] | None:
        return None  # a template joins same-role messages and frames each by its neighbours

    def message_ids(self, message: ChatMessage) -> list[int]:
        raise NotImplementedError("a chat template has no per-message blocks")

    def join(self, blocks: Sequence[Sequence[int]]) -> list[int]:
        raise NotImplementedError("a chat template has no per-message blocks")

    def decode(self, ids: Sequence[int]) -> str:
        with self._lock:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def continuation(
        self,
        tokens: Sequence[int],
        transcript: Sequence[ChatMessage],
        message: ChatMessage,
        tools: Sequence[ToolSpec],
    ) -> tuple[int, list[int]]:
        full = self.prompt_ids([*transcript, message], tools)
        keep = 0
        for old, new in zip(tokens, full, strict=False):
            if old != new:
                break
            keep += 1
        return keep, full[keep:]

    def reply_decoder(self, prompt: Sequence[int]) -> ReplyDecoder:
        return TemplateReplyDecoder(self)
