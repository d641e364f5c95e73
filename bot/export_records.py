"""From stored messages to dataset records: exchanges, windows, and LLaMA-Factory's turn rules.

An **exchange** is one question and its answer as the tool loop stored them (one turn,
see `storage/models.py`): a `human` turn, any tool rounds (`gpt` turn ending with the call
line, `observation` turn), and the final `gpt` answer. In sharegpt terms every exchange
already keeps the rules: odd positions `human`/`observation`, even positions `gpt`, an even
count. Records are whole exchanges laid end to end, so they keep them too, and
`sharegpt_problems` checks each record once more before it is written.

Tool rounds are written in the slash form Yanray's tool loop recognises (`SlashCalls`): a
slash call stays as the model wrote it (a `gpt` turn whose last line is `/calculate ...`); a
ChatGLM3 native call (`tool_call(...)` under the tool's name) is rewritten as that line,
after the text the model wrote before it, since LLaMA-Factory's `chatglm3` template can
write neither the native call's metadata line nor its form (see docs/decisions/training-export.md).

What breaks the sequence (a **gap**; no window spans one): an exchange whose answer is
missing or ends in a call, a native call that has no slash form, a call of a tool that is
not enabled, an answer rated 👎 (net), one too long for a window, a /reset (the
conversation's `context_start`), and with `--since` everything before the date. A question
that was never answered (no stored answer: still queued, or the model wrote nothing) is
merged into the next exchange's question, as consecutive user messages are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from yanray.bot.toolloop import SlashCalls
from yanray.bot.tools import Tool
from yanray.engine.chatglm3.tools import ToolCallError, parse_tool_call
from yanray.storage import Message

logger = logging.getLogger(__name__)

HUMAN, GPT, OBSERVATION, FUNCTION = "human", "gpt", "observation", "function_call"
Turn = dict[str, str]  # {"from": role, "value": text}


@dataclass
class Exchange:
    turns: list[Turn]
    speakers: set[tuple[str, str]]
    request_id: int | None
    asked_at: datetime
    rating: int = 0  # net rating of the answer (sum of everyone's +1 / -1)

    @property
    def chars(self) -> int:
        return sum(len(t["value"]) for t in self.turns)

    @property
    def tool_rounds(self) -> int:
        return sum(t["from"] == OBSERVATION for t in self.turns)


@dataclass(frozen=True)
class Gap:
    reason: str


@dataclass
class _Pending:
    """User messages of one turn, and earlier questions that were never answered."""

    questions: list[str] = field(default_factory=list)
    speakers: set[tuple[str, str]] = field(default_factory=set)
    asked_at: datetime | None = None


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment  # SQLite keeps it naive


class ExchangeReader:
    """Turns a conversation's stored messages into exchanges and gaps, in order."""

    def __init__(self, tools: Mapping[str, Tool]) -> None:
        self.tools = tools
        bare = [name for name, tool in tools.items() if tool.argument_optional]
        self.calls = SlashCalls(list(tools), bare=bare) if tools else None

    def read(
        self,
        rows: Sequence[tuple[Message, tuple[str, str] | None]],
        *,
        context_start: int,
        since: datetime | None = None,
    ) -> Iterator[Exchange | Gap]:
        pending = _Pending()
        reset_passed = False
        for turn, group in _by_turn(rows):
            if turn > context_start and not reset_passed:
                reset_passed = True
                if context_start:  # turns before the last /reset are a conversation of their own
                    pending = _Pending()
                    yield Gap("/reset")
            questions = [(m, who) for m, who in group if m.role == "user"]
            answer = [m for m, _who in group if m.role != "user"]
            asked = _utc(group[0][0].created_at)
            if since is not None and asked < since:
                pending = _Pending()
                yield Gap("before --since")
                continue
            for message, who in questions:
                pending.questions.append(message.text)
                if who is not None:
                    pending.speakers.add(who)
                pending.asked_at = pending.asked_at or asked
            if not answer:
                continue  # unanswered: merged into the next question
            if not questions:  # its question was taken out of the context: nothing to pair it with
                yield Gap("an answer without its question")
                pending = _Pending()
                continue
            turns, problem = self._rounds(answer)
            if problem is not None:
                yield Gap(problem)
                pending = _Pending()
                continue
            human = {"from": HUMAN, "value": "\n\n".join(pending.questions)}
            yield Exchange(
                turns=[human, *turns],
                speakers=pending.speakers,
                request_id=next((m.request_id for m in answer if m.request_id is not None), None),
                asked_at=pending.asked_at or asked,
            )
            pending = _Pending()
        # a trailing question without an answer is dropped

    def _rounds(self, answer: Sequence[Message]) -> tuple[list[Turn], str | None]:
        """The answer's turns (gpt, observation, ..., gpt), or the reason it cannot be written."""
        turns: list[Turn] = []
        for message in answer:
            if message.role == "tool":
                if not turns or turns[-1]["from"] != GPT or not self._ends_in_call(turns[-1]["value"]):
                    return [], "a tool result without its call"
                turns.append({"from": OBSERVATION, "value": message.text})
            elif message.role == "assistant" and message.tool_name:
                line = self._slash_line(message.tool_name, message.text)
                if line is None:
                    return [], "a native tool call without a slash form"
                if turns and turns[-1]["from"] == GPT:  # the text the model wrote before its call
                    turns[-1]["value"] = turns[-1]["value"].rstrip() + "\n" + line
                else:
                    turns.append({"from": GPT, "value": line})
            elif message.role == "assistant":
                if turns and turns[-1]["from"] == GPT:
                    turns[-1]["value"] = turns[-1]["value"].rstrip() + "\n\n" + message.text
                else:
                    turns.append({"from": GPT, "value": message.text})
            else:
                return [], f"a stored {message.role!r} message"
        if not turns or turns[-1]["from"] != GPT or not turns[-1]["value"].strip():
            return [], "no final answer"
        if self._ends_in_call(turns[-1]["value"]):
            return [], "an answer that ends in a tool call"
        return turns, None

    def _ends_in_call(self, text: str) -> bool:
        return self.calls is not None and self.calls.last_call(text) is not None

    def _slash_line(self, name: str, stored: str) -> str | None:
        """The slash line for a native call, ending in a newline as a cut slash round does."""
        tool = self.tools.get(name)
        if tool is None or self.calls is None:
            return None
        try:
            call = parse_tool_call(name, stored)
        except ToolCallError:
            return None
        arguments = dict(call.arguments)
        argument = arguments.pop(tool.slash_argument, None)
        if arguments or not (argument is None or isinstance(argument, str)):
            return None
        line = f"/{name} {argument.strip()}" if argument else f"/{name}"
        return line + "\n" if self.calls.parse(line) == (name, argument.strip() if argument else "") else None


def _by_turn(
    rows: Sequence[tuple[Message, tuple[str, str] | None]],
) -> Iterator[tuple[int, list[tuple[Message, tuple[str, str] | None]]]]:
    group: list[tuple[Message, tuple[str, str] | None]] = []
    for row in rows:
        if group and row[0].turn != group[0][0].turn:
            yield group[0][0].turn, group
            group = []
        group.append(row)
    if group:
        yield group[0][0].turn, group


def runs(items: Iterable[Exchange | Gap]) -> Iterator[list[Exchange]]:
    """The exchanges between gaps."""
    run: list[Exchange] = []
    for item in items:
        if isinstance(item, Gap):
            if run:
                yield run
            run = []
        else:
            run.append(item)
    if run:
        yield run


def windows(run: Sequence[Exchange], *, max_chars: int, rated_good: bool) -> Iterator[list[Exchange]]:
    """Windows of whole exchanges of at most `max_chars` characters, each ending on an answer.

    Without `rated_good` they follow each other without overlap. With it, each answer rated
    👍 (net) ends a window of its own, with as much of what came before as fits."""
    if rated_good:
        for end, exchange in enumerate(run):
            if exchange.rating <= 0:
                continue
            size, start = exchange.chars, end
            while start > 0 and size + run[start - 1].chars <= max_chars:
                start -= 1
                size += run[start].chars
            yield list(run[start : end + 1])
        return
    window: list[Exchange] = []
    size = 0
    for exchange in run:
        if window and size + exchange.chars > max_chars:
            yield window
            window, size = [], 0
        window.append(exchange)
        size += exchange.chars
    if window:
        yield window


def sharegpt_record(window: Sequence[Exchange], system: str) -> dict[str, Any]:
    record: dict[str, Any] = {"conversations": [dict(t) for e in window for t in e.turns]}
    if system:
        record["system"] = system
    return record


def alpaca_record(window: Sequence[Exchange], system: str) -> dict[str, Any]:
    """One record: the last question and answer, the earlier ones as history. Only exchanges
    without tool rounds fit (alpaca has no observation)."""
    *earlier, last = window
    record: dict[str, Any] = {
        "instruction": last.turns[0]["value"],
        "input": "",
        "output": last.turns[-1]["value"],
        "history": [[e.turns[0]["value"], e.turns[-1]["value"]] for e in earlier],
    }
    if system:
        record["system"] = system
    return record


def sharegpt_problems(record: Mapping[str, Any]) -> list[str]:
    """What in a record breaks LLaMA-Factory's sharegpt rules (empty: nothing)."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return ["no turns"]
    problems = []
    for index, turn in enumerate(turns):
        allowed = (HUMAN, OBSERVATION) if index % 2 == 0 else (GPT, FUNCTION)
        if not isinstance(turn, dict) or turn.get("from") not in allowed:
            problems.append(f"turn {index + 1} is not {' or '.join(allowed)}")
        elif not isinstance(turn.get("value"), str):
            problems.append(f"turn {index + 1} has no text")
    if len(turns) % 2:
        problems.append(f"{len(turns)} turns: an odd count")
    if turns[0].get("from") != HUMAN:
        problems.append("the first turn is not a question")
    return problems


def judged(
    items: Iterable[Exchange | Gap], *, ratings: Mapping[int, int], max_chars: int, tool_rounds: bool
) -> Iterator[Exchange | Gap]:
    """`items` with each exchange's net rating set, and as gaps: answers rated 👎 (net), exchanges
    longer than a window, and (without `tool_rounds`, for alpaca) exchanges with tool rounds."""
    for item in items:
        if isinstance(item, Exchange):
            item.rating = ratings.get(item.request_id, 0) if item.request_id is not None else 0
            if item.rating < 0:
                item = Gap("rated 👎")
            elif item.chars > max_chars:
                item = Gap("longer than --max-chars")
            elif item.tool_rounds and not tool_rounds:
                item = Gap("tool rounds (alpaca has none)")
        yield item
