"""A scripted engine for tests of the queue, tool loop and adapters (not of the model).

It implements the real `Engine` protocol: sessions keep the message list, `generate`
streams the scripted text in small pieces on the event loop, honours `stop_at`, the
cancel flag and `max_new_tokens` (counted in pieces; `new_tokens` reports the pieces), and
`append` adds observations.
`fit` applies the engines' shared rules (`engine/fit.py`) over `count_tokens`.
`fail_with` makes it fail at once, `fail_after` once the reply was streamed.
Every session's prompts are recorded in `engine.prompts`, so a test can assert what
the model saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from yanray.engine.base import (
    ChatMessage,
    EngineError,
    GenerateOptions,
    Generation,
    TextCallback,
    ToolSpec,
)
from yanray.engine.fit import counting_fitter

Responder = Callable[[list[ChatMessage]], str]


class ScriptedSession:
    def __init__(self, engine: ScriptedEngine, messages: Sequence[ChatMessage]) -> None:
        self.engine = engine
        self.messages = list(messages)

    async def generate(self, options: GenerateOptions, on_text: TextCallback | None = None) -> Generation:
        engine = self.engine
        engine.prompts.append(list(self.messages))
        if engine.fail_with is not None:
            raise EngineError(engine.fail_with)
        reply = engine.next_reply(self.messages)
        if engine.before_reply is not None:
            await engine.before_reply()
        parts: list[str] = []  # joined once: a test may stream megabytes
        length = 0
        finish = "stop"
        for start in range(0, len(reply), engine.piece):
            if options.cancel.is_set():
                finish = "cancelled"
                break
            piece = reply[start : start + engine.piece]
            cut = options.stop_at(piece) if options.stop_at is not None else None
            if cut is not None:
                piece = piece[: max(0, cut - length)]
            parts.append(piece)
            length += len(piece)
            if on_text is not None and piece:
                on_text(piece)
            if engine.delay:
                await asyncio.sleep(engine.delay)
            else:
                await asyncio.sleep(0)
            if cut is not None:
                break
            if start // engine.piece + 1 >= options.max_new_tokens:
                finish = "length"
                break
        text = "".join(parts)
        if engine.fail_after is not None:  # the model breaks down after writing the reply
            raise EngineError(engine.fail_after)
        self.messages.append(ChatMessage("assistant", text))
        return Generation(text=text, finish=finish, new_tokens=len(parts))  # type: ignore[arg-type]

    async def append(self, message: ChatMessage) -> None:
        self.messages.append(message)

    async def close(self) -> None:
        self.engine.closed_sessions += 1


class ScriptedEngine:
    """Answers from `replies` in order (then repeats the last), or from `responder(messages)`."""

    name = "scripted"
    native_tools = False

    def __init__(
        self,
        replies: Sequence[str] = ("Hello!",),
        *,
        responder: Responder | None = None,
        delay: float = 0.0,
        piece: int = 4,
        max_context: int = 4096,
    ) -> None:
        self.replies = list(replies)
        self.responder = responder
        self.delay = delay
        self.piece = piece
        self.max_context = max_context
        self.prompts: list[list[ChatMessage]] = []
        self.fail_with: str | None = None
        self.fail_after: str | None = None
        self.before_reply: Callable[[], asyncio.Future[None]] | None = None
        self.closed_sessions = 0
        self._next = 0
        self.fitter = counting_fitter(self.count_tokens)

    def next_reply(self, messages: list[ChatMessage]) -> str:
        if self.responder is not None:
            return self.responder(messages)
        reply = self.replies[min(self._next, len(self.replies) - 1)]
        self._next += 1
        return reply

    def count_tokens(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> int:
        """One token per word plus four per message: simple and predictable in tests."""
        return 2 + sum(4 + len(m.content.split()) for m in messages)

    async def count(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> int:
        return await asyncio.to_thread(self.count_tokens, list(messages), tools)

    async def fit(
        self, system: ChatMessage, history: Sequence[ChatMessage], tools: Sequence[ToolSpec], budget: int
    ) -> list[ChatMessage]:
        """The shared fitting rules (`engine/fit.py`) over `count_tokens`, on a thread."""
        return await asyncio.to_thread(self.fitter.fit, system, list(history), tools, budget)

    async def start(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> ScriptedSession:
        return ScriptedSession(self, messages)

    async def aclose(self) -> None:
        pass
