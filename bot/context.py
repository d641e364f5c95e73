"""What the model sees: the system prompt, and the history cut to the engine's token budget.

Budget = the engine's context minus `YANRAY_MAX_NEW_TOKENS` (room for the reply). The
system prompt and the newest user turn always stay; whole turns are dropped oldest
first until the rest fits. A newest turn that alone does not fit is refused with
`ContextTooLong`, never cut silently.

A history that must be cut is cut in large steps: down to three quarters of the budget,
and the turn it then starts at is remembered (by content, in the `TokenCounter`). Later
requests start at that same turn for as long as the rest fits, so consecutive prompts
share their beginning and the local engine's kept KV cache (`engine/kept.py`) serves
them, instead of each turn moving the window by one message and changing every token.

Token counts come from the engine (its own tokenizer for a local model, an estimate
for a remote one). A message's cost is counted once and remembered by content, so a
long conversation is not re-tokenized from the start for every request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from yanray.bot.errors import ContextTooLong
from yanray.bot.i18n import lazy_gettext
from yanray.bot.tools import Tool
from yanray.engine.base import ChatMessage, Engine, ToolSpec

#: the fewest tokens a question must have room for; a context with less is refused at start
MIN_QUESTION_TOKENS = 32
#: a history that does not fit is cut down to this share of the budget
CUT_TO = 0.75

SLASH_HELP = (
    "You can use tools. To use one, write its command alone on a line, for example:\n"
    "{examples}\n"
    'Then stop; the result comes back to you as "Tools: <result>", and you continue your answer '
    "using it. Use a tool only when it helps, and never show the command line to the user as an answer."
)


def system_prompt(base: str, tools: Sequence[Tool], *, native: bool) -> str:
    """The system message. A native-tool model (ChatGLM3) gets the tools from the engine,
    in its own format, and then the content is exactly `base`."""
    if not tools or native:
        return base
    examples = "\n".join(f"{t.spec.usage}  ({t.spec.description})" for t in tools)
    return f"{base}\n\n{SLASH_HELP.format(examples=examples)}"


class TokenCounter:
    """Counts a message's tokens with the engine's tokenizer, remembering recent answers."""

    def __init__(self, engine: Engine, *, size: int = 4096) -> None:
        self.engine = engine
        self._base = engine.count_tokens([])
        self._cache: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self._size = size
        self._cuts: OrderedDict[tuple[str, str, str], None] = OrderedDict()  # first messages after a cut

    def message(self, message: ChatMessage) -> int:
        key = (message.role, message.name, message.content)
        cost = self._cache.get(key)
        if cost is None:
            cost = max(self.engine.count_tokens([message]) - self._base, 0)
            self._cache[key] = cost
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return cost

    def prompt(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> int:
        return self.engine.count_tokens(messages, tools)

    def remember_cut(self, message: ChatMessage) -> None:
        self._cuts[(message.role, message.name, message.content)] = None
        self._cuts.move_to_end((message.role, message.name, message.content))
        if len(self._cuts) > self._size:
            self._cuts.popitem(last=False)

    def was_cut_at(self, message: ChatMessage) -> bool:
        return (message.role, message.name, message.content) in self._cuts


def split_turns(history: Sequence[ChatMessage]) -> list[list[ChatMessage]]:
    """Group messages into turns, each starting at a user message."""
    turns: list[list[ChatMessage]] = []
    for message in history:
        if message.role == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return turns


def fit_history(
    *,
    system: ChatMessage,
    history: Sequence[ChatMessage],
    tools: Sequence[ToolSpec],
    counter: TokenCounter,
    budget: int,
) -> list[ChatMessage]:
    """The system message plus as many of the newest turns as fit in `budget` tokens."""
    turns = split_turns(history)
    fixed = counter.prompt([system], tools)
    costs = [sum(counter.message(m) for m in turn) for turn in turns]
    newest = costs[-1] if costs else 0
    if fixed >= budget:
        raise ContextTooLong(
            lazy_gettext(
                "My instructions for this conversation take about {fixed} tokens, more than the "
                "{budget} I can read; shorten them with /system, or /system default.",
                fixed=fixed,
                budget=budget,
            )
        )
    if fixed + newest > budget:
        raise ContextTooLong(
            lazy_gettext(
                "Your message is too long for me: about {tokens} tokens, and at most "
                "{room} fit. Please shorten it or send it in parts.",
                tokens=newest,
                room=max(budget - fixed, 0),
            )
        )
    total = fixed + sum(costs)
    first = 0
    if total > budget:
        first = _earlier_cut(turns, costs, total, budget, counter)
        if first < 0:  # a new cut, a large step down
            target = max(int(budget * CUT_TO), fixed + newest)
            first = 0
            while total > target and first < len(turns) - 1:
                total -= costs[first]
                first += 1
            counter.remember_cut(turns[first][0])
    kept = [m for turn in turns[first:] for m in turn]
    return [system, *kept]


def _earlier_cut(
    turns: list[list[ChatMessage]], costs: list[int], total: int, budget: int, counter: TokenCounter
) -> int:
    """The oldest turn an earlier cut started at from which the rest still fits, or -1."""
    for index, turn in enumerate(turns):
        if total <= budget and counter.was_cut_at(turn[0]):
            return index
        total -= costs[index]
    return -1
