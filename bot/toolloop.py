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

Every observation is cut to the tool's `max_observation_tokens`, estimated (`tools/budget.py`),
with a `[cut: ...]` note. A session that counts its tokens (the local engine's) is kept
inside the model's context: the observation gets at most the room left less `REPLY_ROOM`,
and with less than `MIN_OBSERVATION_TOKENS` left the observation is not appended and the
answer ends there (finish "length": the user gets the text so far and a one-line note).

What the user sees is the model's text with the tool-call lines taken out; every round
and every tool result is kept in `rounds` for storage.

For the metrics, `on_tool(tool, outcome)` hears of every call the model makes, with one
outcome: ok, error (the tool said why, or failed unexpectedly: the model reads "Error: the
X tool failed." and the log has the traceback), timeout, refused (argument too long), unknown (no
such tool), cancelled, repeated (answered from the first identical call) or over_limit
(past `max_rounds`); `on_round(tokens)` hears of every round's generated tokens.

A tool may hand back images (`ToolResult`, the plot). They are shown to the user as the
round produces them (`on_images`, after the tool finished and outside its time limit;
the text so far stays above them), before the model reads on, and the observation says
whether they were sent ("Sent the plot of sin(x) for x from -5 to 5 to the user.") or not
and why; what could not be sent is listed in `LoopResult.unsent` for a note to the user.
Images are not stored: the observation is what the conversation keeps of them.

The model's text is untrusted and may be long: every line is looked at once, in linear
time, while it streams (`SlashCalls`, `_StreamedRound`), and a call whose argument is longer
than the tool's `max_argument_chars` is refused before the tool parses anything, with an
observation telling the model the limit. A running tool is abandoned when the answer's
cancel flag is set (/stop, or the worker's time limit), so the loop returns promptly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from yanray.bot.errors import ToolError
from yanray.bot.tools import Tool, ToolResult
from yanray.bot.tools.budget import cut_to_tokens
from yanray.bot.types import Image
from yanray.engine.base import ChatMessage, EngineSession, GenerateOptions, Generation

logger = logging.getLogger(__name__)

NO_MORE_TOOLS = "No more tool calls are allowed for this answer; answer with what you have."
CANCEL_POLL_S = 0.05  # how often a running tool's caller looks at the cancel flag
#: the observation budget of a name that is no tool (an error line)
DEFAULT_OBSERVATION_TOKENS = 200
#: tokens kept free after an observation: its block's markers and the model's next round
REPLY_ROOM = 64
#: an observation with less room than this is not appended: the answer ends there
MIN_OBSERVATION_TOKENS = 16

#: `on_visible`'s argument builds the visible text so far (see `ToolLoop.run`)
VisibleCallback = Callable[[Callable[[], str]], None]
#: shows a tool's images to the user now; returns None when they were sent, else one line why not
ImagesCallback = Callable[[Sequence[Image]], Awaitable[str | None]]


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
    #: what the images that could not be sent show ("the plot of sin(x) for x from -5 to 5")
    unsent: list[str] = field(default_factory=list)


class SlashCalls:
    """The slash dialect: which lines of the model's text are tool calls.

    A call line is `/name argument`: optional spaces or tabs, the slash and a tool name,
    spaces or tabs, then an argument that starts with a visible character and runs to the
    end of the line. Every check looks at each line once, in linear time (a lazy argument
    before optional trailing spaces, as once written here, is quadratic in a run of spaces).
    """

    def __init__(self, names: Sequence[str], *, bare: Sequence[str] = ()) -> None:
        alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        #: tools whose command alone (`/time`) is a call, with an empty argument
        self._bare = frozenset(bare)
        # possessive, and on one line at a time: the argument's trailing blanks are stripped after
        self._line = re.compile(rf"^[ \t]*+/({alternatives})(?:[ \t]++(\S[^\n]*+))?+[ \t]*+")

    def parse(self, line: str) -> tuple[str, str] | None:
        """(tool name, argument) if `line` (without its newline) is a call line."""
        match = self._line.match(line)
        if match is None or match.end() != len(line):
            return None
        if match.group(2) is None:
            return (match.group(1), "") if match.group(1) in self._bare else None
        return match.group(1), match.group(2).strip()

    def strip(self, text: str) -> str:
        """`text` without its call lines (each with its newline)."""
        lines = text.split("\n")
        kept = [line + "\n" for line in lines[:-1] if self.parse(line) is None]
        if self.parse(lines[-1]) is None:
            kept.append(lines[-1])
        return "".join(kept)

    def last_call(self, text: str) -> tuple[str, str] | None:
        """The call the text ends with (only blank text after it), if any."""
        body = text.rstrip()
        return self.parse(body[body.rfind("\n") + 1 :])

    def stop_at(self) -> Callable[[str], int | None]:
        """A fresh `stop_at` (the engine contract in `engine/base.py`: fed each piece) that
        cuts at the end of the first complete call line."""
        line: list[str] = []  # the current line's pieces
        offset = 0  # length of the text before this piece

        def stop_at(piece: str) -> int | None:
            nonlocal offset
            start = 0
            while (newline := piece.find("\n", start)) != -1:
                line.append(piece[start:newline])
                complete = "".join(line)
                line.clear()
                if self.parse(complete) is not None:
                    return offset + newline + 1
                start = newline + 1
            if start < len(piece):
                line.append(piece[start:])
            offset += len(piece)
            return None

        return stop_at


class _StreamedRound:
    """One round's text as it streams, each line looked at once: the visible part grows by
    whole lines (tool calls left out), and a last line that may become a call is held back.
    `add` costs time in proportion to the piece; `visible` builds the text (pull it sparingly)."""

    def __init__(self, calls: SlashCalls | None) -> None:
        self.calls = calls
        self.done: list[str] = []  # visible complete lines
        self.line: list[str] = []  # the current line's pieces
        self.lead = ""  # the current line's first visible character, once there is one

    def add(self, piece: str) -> None:
        start = 0
        while (newline := piece.find("\n", start)) != -1:
            self.line.append(piece[start:newline])
            line = "".join(self.line)
            self.line.clear()
            self.lead = ""
            if self.calls is None or self.calls.parse(line) is None:
                self.done.append(line + "\n")
            start = newline + 1
        rest = piece[start:]
        if rest:
            self.line.append(rest)
            if not self.lead and (visible := rest.lstrip()):
                self.lead = visible[0]

    def visible(self) -> str:
        for parts in (self.done, self.line):  # joined once, then kept joined
            if len(parts) > 1:
                parts[:] = ["".join(parts)]
        done = self.done[0] if self.done else ""
        return done if self.lead == "/" or not self.line else done + self.line[0]


class ToolLoop:
    """Runs one answer through the engine session and the enabled tools."""

    def __init__(
        self,
        *,
        tools: Mapping[str, Tool],
        max_rounds: int,
        on_tool: Callable[[str, str], None] | None = None,
        on_round: Callable[[int], None] | None = None,
        max_context: int = 0,
    ) -> None:
        self.tools = tools
        #: the engine's context, for sessions that count their tokens (0: not checked)
        self.max_context = max_context
        self.max_rounds = max_rounds
        self.on_tool = on_tool
        self.on_round = on_round
        bare = [name for name, tool in tools.items() if tool.argument_optional]
        self._calls = SlashCalls(list(tools), bare=bare) if tools else None

    async def run(
        self,
        session: EngineSession,
        *,
        options: Callable[[], GenerateOptions],
        on_visible: VisibleCallback | None = None,
        on_images: ImagesCallback | None = None,
    ) -> LoopResult:
        """Generate until the model answers without a tool call (or a limit stops it).

        `on_visible` is called whenever the visible text grows, with a function that builds
        that text: building it costs time in proportion to its length, so the caller pulls it
        when it needs it (e.g. at most every 0.1 s), never per piece. `on_images` shows a
        tool's images (without it, they are not sent, and the model is told so)."""
        result = LoopResult()
        cache: dict[tuple[str, str], str] = {}
        shown: list[str] = []  # visible text of finished rounds
        calls = 0
        told = False  # the model was told that no more tools run
        while True:
            opts = options()
            if not told and self._calls is not None:
                opts.stop_at = self._calls.stop_at()
            streamed = _StreamedRound(self._calls)
            before = "".join(shown)

            def visible(streamed: _StreamedRound = streamed, before: str = before) -> str:
                return before + streamed.visible()

            def on_text(
                piece: str, streamed: _StreamedRound = streamed, visible: Callable[[], str] = visible
            ) -> None:
                streamed.add(piece)
                if on_visible is not None:
                    on_visible(visible)

            generation = await session.generate(opts, on_text)
            if self.on_round is not None:
                self.on_round(generation.new_tokens)
            result.finish = generation.finish
            call = None if told else self._find_call(generation)
            if call is None:
                # the answer; a native call after the model was told is left out of sight
                result.rounds.append(Round(text=generation.text))
                shown.append(self._strip_calls(generation.text))
                break
            name, arguments, stored = call
            if calls >= self.max_rounds:
                # past the limit: the model is told once, then answers without tools
                observation, told = NO_MORE_TOOLS, True
                self._outcome(name, "over_limit")
            else:
                key = (name, json.dumps(arguments, sort_keys=True, default=str))
                if key in cache:
                    observation = cache[key]
                    logger.info("tool %s repeated with the same arguments; reusing the first result", name)
                    self._outcome(name, "repeated")
                else:
                    found, outcome = await self._run_tool(name, arguments, opts.cancel)
                    observation = await self._observe(found, on_images, opts.cancel, result)
                    cache[key] = observation
                    self._outcome(name, outcome)
                calls += 1
            budget = self._budget(name, session)
            if budget < MIN_OBSERVATION_TOKENS:
                # appending would overflow the model's context: the answer ends with what it has
                logger.warning("no room left in the context for the %s tool's result; the answer ends", name)
                observation = f"Error: no room was left in the conversation for the {name} tool's result."
                self._record(result, shown, generation, name, observation, stored)
                result.finish = "length"
                break
            observation = cut_to_tokens(observation, budget)
            self._record(result, shown, generation, name, observation, stored)
            await session.append(ChatMessage("observation", observation, name))
            if generation.finish == "cancelled" or opts.cancel.is_set():
                break
        result.visible = "".join(shown).strip()
        return result

    def _budget(self, name: str, session: EngineSession) -> int:
        """Estimated tokens the observation may take: the tool's budget, or less when the
        session (a local one counts its tokens) is near the model's context."""
        tool = self.tools.get(name)
        budget = tool.max_observation_tokens if tool is not None else DEFAULT_OBSERVATION_TOKENS
        used = getattr(session, "tokens", None)
        if self.max_context > 0 and isinstance(used, int):
            budget = min(budget, self.max_context - used - REPLY_ROOM)
        return budget

    def _outcome(self, name: str, outcome: str) -> None:
        if self.on_tool is not None:
            # a name the model made up is not a label: one "unknown" series, not one per name
            self.on_tool(name if name in self.tools else "unknown", outcome)

    async def _observe(
        self,
        outcome: str | ToolResult,
        on_images: ImagesCallback | None,
        cancel: threading.Event,
        result: LoopResult,
    ) -> str:
        """The observation of a tool's result; its images are shown to the user first."""
        if isinstance(outcome, str):
            return outcome
        said = []
        if outcome.images:
            shows = " and ".join(outcome.shows) or "the picture"
            if cancel.is_set():
                why: str | None = "the answer was stopped"
            elif on_images is None:
                why = "this conversation cannot show pictures"
            else:
                why = await on_images(outcome.images)
            if why is None:
                said.append(f"Sent {shows} to the user.")
            else:
                said.append(f"Could not send {shows} to the user: {why}.")
                result.unsent.append(shows)
        if outcome.text:
            said.append(outcome.text)
        return " ".join(said) or "Done."

    def _strip_calls(self, text: str) -> str:
        return self._calls.strip(text) if self._calls is not None else text

    def _record(
        self,
        result: LoopResult,
        shown: list[str],
        generation: Generation,
        name: str,
        observation: str,
        stored: str | None,
    ) -> None:
        """Keep the round; `stored` is a native call's stored form (None for a slash call)."""
        if stored is None:
            result.rounds.append(Round(text=generation.text, tool_name=name, observation=observation))
            shown.append(self._strip_calls(generation.text))
            return
        # text the model wrote before its call block is an ordinary, visible round; the call is
        # stored in the form the engine handed back, so the history re-encodes it as the model
        # wrote it
        if generation.text:
            result.rounds.append(Round(text=generation.text))
            shown.append(generation.text.rstrip() + "\n\n")
        result.rounds.append(Round(text=stored, tool_name=name, observation=observation, native=True))

    def _find_call(self, generation: Generation) -> tuple[str, Mapping[str, Any], str | None] | None:
        """(tool name, arguments, a native call's stored form or None) of the round's call."""
        if generation.tool_call is not None:
            call = generation.tool_call
            return call.name, call.arguments, call.stored
        if self._calls is None or generation.finish not in ("stop", "length"):
            return None
        # the call line the round ends with is the one the model stopped at
        found = self._calls.last_call(generation.text)
        if found is None:
            return None
        tool = self.tools[found[0]]
        return tool.name, ({tool.slash_argument: found[1]} if found[1] else {}), None

    async def _run_tool(
        self, name: str, arguments: Mapping[str, Any], cancel: threading.Event
    ) -> tuple[str | ToolResult, str]:
        """(the tool's result or why there is none, the outcome for the metrics)."""
        tool = self.tools.get(name)
        if tool is None:
            available = ", ".join(self.tools) or "none"
            return f"Error: there is no tool named {name!r}; available: {available}.", "unknown"
        # refused before the tool parses anything: the model learns the limit and can retry
        size = _argument_chars(arguments)
        if size > tool.max_argument_chars:
            logger.info("tool %s refused: its argument is %d characters", name, size)
            return (
                f"Error: the {name} argument is {size:,} characters long; "
                f"the limit is {tool.max_argument_chars:,}. Write a shorter call."
            ), "refused"
        if cancel.is_set():
            return f"Error: the answer was stopped before the {name} tool ran.", "cancelled"
        task = asyncio.ensure_future(tool.handler(arguments))
        try:
            async with asyncio.timeout(tool.timeout):
                # the answer's time limit or /stop also stops a tool that is still working
                while not task.done():
                    await asyncio.wait({task}, timeout=CANCEL_POLL_S)
                    if not task.done() and cancel.is_set():
                        return f"Error: the answer was stopped before the {name} tool finished.", "cancelled"
                return task.result(), "ok"
        except ToolError as exc:
            return f"Error: {exc}", "error"
        except TimeoutError:
            logger.warning("tool %s timed out after %.1f s", name, tool.timeout)
            return f"Error: the {name} tool took longer than {tool.timeout:g} s.", "timeout"
        except Exception:  # a bug in a tool costs that call, not the answer
            logger.exception("tool %s failed unexpectedly", name)
            return f"Error: the {name} tool failed.", "error"
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


def _argument_chars(arguments: Mapping[str, Any]) -> int:
    """The size of the longest argument: a string's length, anything else's JSON length."""
    return max(
        (len(v) if isinstance(v, str) else len(json.dumps(v, default=str)) for v in arguments.values()),
        default=0,
    )
