"""The tool loop (the "filter"): generate, run a tool the model called, continue, repeat.

Two dialects are recognised, only ever in the model's own output:

- slash: a line `/calculate 6.5*7.5` that the model writes. The engine stops at the end
  of that line (`stop_at`), the tool runs, and the result goes back as an observation;
  a call on the very last line without a newline (the model ended its turn there) counts
  too.
- native: the engine reports `finish="tool_call"` with a parsed `ToolCall` (ChatGLM3's
  function-call block).

The observation is appended to the same engine session, so a local engine only prefills
the new tokens. At most `max_rounds` tool calls run per answer; a call past that is
answered with an observation telling the model to answer without tools, and the model
gets one more round to do so (a call in that round is not run, and not shown). An identical repeated call
(same tool, same arguments) is answered from the first result without running again.

What the user sees is the model's text with the tool-call lines taken out; every round
and every tool result is kept in `rounds` for storage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from yanray.bot.errors import ToolError
from yanray.bot.tools import Tool
from yanray.engine.base import ChatMessage, EngineSession, GenerateOptions, Generation, ToolCall
from yanray.engine.native_tools import tool_call_content

logger = logging.getLogger(__name__)

NO_MORE_TOOLS = "No more tool calls are allowed for this answer; answer with what you have."


@dataclass(frozen=True)
class Round:
    """One generation round and the tool call that ended it, if any."""

    text: str  # what the model wrote (a native call's content included)
    tool_name: str = ""
    observation: str | None = None
    native: bool = False


@dataclass
class LoopResult:
    rounds: list[Round] = field(default_factory=list)
    finish: str = "stop"
    visible: str = ""  # what the user sees: the rounds' text without the tool-call lines


def slash_pattern(names: Sequence[str]) -> re.Pattern[str] | None:
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"^[ \t]*/({alternatives})[ \t]+(\S[^\n]*?)[ \t]*(?:\n|\Z)", re.MULTILINE)


def _strip_calls(text: str, pattern: re.Pattern[str] | None) -> str:
    return pattern.sub("", text) if pattern is not None else text


class _StreamedRound:
    """One round's text as it streams, each line looked at once: the visible part grows
    by whole lines (tool calls left out), and a last line that may become a call is held back."""

    def __init__(self, pattern: re.Pattern[str] | None) -> None:
        self.pattern = pattern
        self.done = ""  # visible complete lines
        self.partial = ""

    def add(self, piece: str) -> None:
        self.partial += piece
        if "\n" not in piece:
            return
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            if self.pattern is None or not self.pattern.match(line + "\n"):
                self.done += line + "\n"

    def visible(self) -> str:
        return self.done if self.partial.lstrip().startswith("/") else self.done + self.partial


def _stop_at_calls(pattern: re.Pattern[str]) -> Callable[[str], int | None]:
    """A `stop_at` that finds the end of the first complete call line, scanning each line once.

    The engine calls it with the round's text so far, growing, from one thread."""
    scanned = 0

    def stop_at(text: str) -> int | None:
        nonlocal scanned
        end = text.rfind("\n") + 1
        if end <= scanned:
            return None
        for match in pattern.finditer(text, scanned, end):
            if match.group(0).endswith("\n"):
                return match.end()
        scanned = end
        return None

    return stop_at


class ToolLoop:
    """Runs one answer through the engine session and the enabled tools."""

    def __init__(self, *, tools: Mapping[str, Tool], max_rounds: int) -> None:
        self.tools = tools
        self.max_rounds = max_rounds
        self._pattern = slash_pattern(list(tools))

    async def run(
        self,
        session: EngineSession,
        *,
        options: Callable[[], GenerateOptions],
        on_visible: Callable[[str], None] | None = None,
    ) -> LoopResult:
        """Generate until the model answers without a tool call (or a limit stops it)."""
        result = LoopResult()
        cache: dict[tuple[str, str], str] = {}
        shown: list[str] = []  # visible text of finished rounds
        calls = 0
        told = False  # the model was told that no more tools run
        while True:
            opts = options()
            if not told and self._pattern is not None:
                opts.stop_at = _stop_at_calls(self._pattern)
            streamed = _StreamedRound(self._pattern)
            before = "".join(shown)

            def on_text(piece: str, streamed: _StreamedRound = streamed, before: str = before) -> None:
                streamed.add(piece)
                if on_visible is not None:
                    on_visible(before + streamed.visible())

            generation = await session.generate(opts, on_text)
            result.finish = generation.finish
            call = None if told else self._find_call(generation)
            if call is None:
                # the answer; a native call after the model was told is left out of sight
                result.rounds.append(Round(text=generation.text))
                shown.append(_strip_calls(generation.text, self._pattern))
                break
            name, arguments, native = call
            if calls >= self.max_rounds:
                # past the limit: the model is told once, then answers without tools
                observation, told = NO_MORE_TOOLS, True
            else:
                key = (name, json.dumps(arguments, sort_keys=True, default=str))
                if key in cache:
                    observation = cache[key]
                    logger.info("tool %s repeated with the same arguments; reusing the first result", name)
                else:
                    observation = cache[key] = await self._run_tool(name, arguments)
                calls += 1
            self._record(result, shown, generation, name, arguments, observation, native)
            await session.append(ChatMessage("observation", observation, name))
            if generation.finish == "cancelled":
                break
        result.visible = "".join(shown).strip()
        return result

    def _record(
        self,
        result: LoopResult,
        shown: list[str],
        generation: Generation,
        name: str,
        arguments: Mapping[str, Any],
        observation: str,
        native: bool,
    ) -> None:
        if not native:
            result.rounds.append(Round(text=generation.text, tool_name=name, observation=observation))
            shown.append(_strip_calls(generation.text, self._pattern))
            return
        # text the model wrote before its call block is an ordinary, visible round; the call is
        # stored in ChatGLM3's own form, so the history re-encodes it as the model wrote it
        if generation.text:
            result.rounds.append(Round(text=generation.text))
            shown.append(generation.text.rstrip() + "\n\n")
        call_text = tool_call_content(ToolCall(name, arguments))
        result.rounds.append(Round(text=call_text, tool_name=name, observation=observation, native=True))

    def _find_call(self, generation: Generation) -> tuple[str, Mapping[str, Any], bool] | None:
        if generation.tool_call is not None:
            call = generation.tool_call
            return call.name, call.arguments, True
        if self._pattern is None or generation.finish not in ("stop", "length"):
            return None
        # the last call line of the round is the one the model stopped at
        match = next(reversed(list(self._pattern.finditer(generation.text))), None)
        if match is None or match.end() < len(generation.text.rstrip()):
            return None
        tool = self.tools[match.group(1)]
        return tool.name, {tool.slash_argument: match.group(2).strip()}, False

    async def _run_tool(self, name: str, arguments: Mapping[str, Any]) -> str:
        tool = self.tools.get(name)
        if tool is None:
            return f"Error: there is no tool named {name!r}; available: {', '.join(self.tools) or 'none'}."
        try:
            async with asyncio.timeout(tool.timeout):
                return await tool.handler(arguments)
        except ToolError as exc:
            return f"Error: {exc}"
        except TimeoutError:
            logger.warning("tool %s timed out after %.1f s", name, tool.timeout)
            return f"Error: the {name} tool took longer than {tool.timeout:g} s."
