"""The engine protocol: what the engine worker needs from any language-model backend.

A backend (`local` transformers in-process, `openai` over HTTP) offers an `Engine` that
starts `EngineSession`s. A session is one conversation being answered: it is started from
the prompt's messages, generates text in rounds (streaming pieces to a callback), and
between rounds takes an appended message (a tool's observation). A local session keeps
its KV cache across rounds, so only the appended tokens are prefilled.

Stops: a round ends at the model's own end of turn, at `max_new_tokens`, when the cancel
flag is set, or when `stop_at` returns a cut position (the tool loop uses this to stop at
the end of a `/calculate` line).

`stop_at(piece)` is fed each new piece of the round's text, in order (the pieces so far join
to the round's text so far), and returns None or an absolute cut offset into the round's
text (at most its length so far). It is called from the engine's thread and touches nothing
but its own state; it must do work in proportion to the piece, not to the text so far, so
that a long reply costs linear time (keep the state it needs, e.g. the current line). A
fresh `stop_at` is needed for every round. `engine/round_text.py` applies it for both
backends.

Message roles follow ChatGLM3: system, user, assistant, observation. `name` is the
metadata line: the tool name of an assistant's native tool call, or of an observation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from yanray.errors import EngineError, EngineUnavailable

__all__ = [
    "ChatMessage",
    "Engine",
    "EngineError",
    "EngineSession",
    "EngineUnavailable",
    "FinishReason",
    "GenerateOptions",
    "Generation",
    "PromptTooLong",
    "Role",
    "TextCallback",
    "ToolCall",
    "ToolSpec",
]

Role = Literal["system", "user", "assistant", "observation"]
FinishReason = Literal["stop", "length", "cancelled", "tool_call"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str
    name: str = ""


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the model is told about it."""

    name: str
    description: str
    parameters: Mapping[str, Any]  # JSON schema of the arguments (ChatGLM3 native format)
    usage: str  # the one slash line shown in the system prompt, e.g. "/calculate <expression>"


@dataclass(frozen=True)
class ToolCall:
    """A tool call the engine recognised in the model's own dialect (ChatGLM3 native).

    `stored` is the call as the conversation keeps it: the content of an assistant message
    whose `name` is the tool's, which the engine encodes back as the model's own call. Only
    the engine knows its model's dialect, so the tool loop stores this text as it is."""

    name: str
    arguments: Mapping[str, Any]
    stored: str


@dataclass
class GenerateOptions:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 means greedy and deterministic
    stop_at: Callable[[str], int | None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Generation:
    """One round's result. `text` is what the model said this round, cut at a stop."""

    text: str
    finish: FinishReason
    tool_call: ToolCall | None = None
    prompt_tokens: int = 0  # tokens prefilled for this round (new tokens only, with a kept cache)
    new_tokens: int = 0


class PromptTooLong(EngineError):
    """The prompt cannot fit the context (`Engine.fit`): `part` is "instructions" (the system
    message with the tools takes `tokens`, the whole `budget` or more) or "message" (the newest
    turn alone takes `tokens`, and only `room` are left for it). The worker tells the user in
    their language; `str()` is the English line."""

    def __init__(
        self, part: Literal["instructions", "message"], *, tokens: int, budget: int, room: int
    ) -> None:
        what = "the instructions" if part == "instructions" else "the newest message"
        super().__init__(f"The prompt does not fit: {what} take about {tokens} tokens, and {room} fit.")
        self.part = part
        self.tokens = tokens
        self.budget = budget
        self.room = room


TextCallback = Callable[[str], None]


@runtime_checkable
class EngineSession(Protocol):
    async def generate(self, options: GenerateOptions, on_text: TextCallback | None = None) -> Generation:
        """Generate one round; `on_text` receives each new piece of text on the event loop."""
        ...

    async def append(self, message: ChatMessage) -> None:
        """Append a message (usually an observation) after the last round."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    name: str
    #: total tokens the model may see, prompt and reply together
    max_context: int
    #: whether the model has its own tool-call format (then tools are described natively)
    native_tools: bool

    def count_tokens(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> int:
        """Tokens the prompt for these messages takes, counted as the model counts them
        (blocking: at start-up and in tests; the request path uses `fit`)."""
        ...

    async def count(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> int:
        """`count_tokens`, off the event loop: what the request path (`/system`) uses."""
        ...

    async def fit(
        self, system: ChatMessage, history: Sequence[ChatMessage], tools: Sequence[ToolSpec], budget: int
    ) -> list[ChatMessage]:
        """The prompt's messages: `system` and the newest turns of `history` that fit in
        `budget` tokens (`engine/fit.py`), counted off the event loop. Raises `PromptTooLong`."""
        ...

    async def start(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> EngineSession:
        """Start a session; `tools` are described to the model (native dialect) when supported."""
        ...

    async def aclose(self) -> None: ...
