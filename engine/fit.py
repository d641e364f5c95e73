"""Fitting a conversation into the model's context: the one implementation every engine calls.

The worker hands an engine the system message, the history it read back and the token
budget (the context minus the room for the reply); the engine answers with the messages
that fit (`Engine.fit`), counted with its own tokenizer (an estimate for a remote model).
Counting is work in proportion to the text, and people's text is untrusted and can be
long, so an engine runs `Fitter.fit` on a thread of its own, never on the event loop.

The rules: the system prompt and the newest user turn always stay; whole turns are dropped
oldest first until the rest fits. A newest turn that alone does not fit, or instructions
that leave no room, raise `PromptTooLong` (the worker tells the user why, in their
language); nothing is cut silently.

A history that must be cut is cut in large steps: down to three quarters of the budget,
and the turn it then starts at is remembered (by content). Later requests start at that
same turn for as long as the rest fits, so consecutive prompts share their beginning and
the local engine's kept KV cache (`engine/kept.py`) serves them, instead of each turn
moving the window by one message and changing every token.

A message's cost is counted once and remembered by content (bounded, least recently used
first out), so a long conversation is not re-tokenized from the start for every request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from yanray.engine.base import ChatMessage, PromptTooLong, ToolSpec

#: a history that does not fit is cut down to this share of the budget
CUT_TO = 0.75
#: messages whose costs (and cut marks) are remembered
REMEMBERED = 4096

Key = tuple[str, str, str]


def key_of(message: ChatMessage) -> Key:
    return (message.role, message.name, message.content)


def split_turns(history: Sequence[ChatMessage]) -> list[list[ChatMessage]]:
    """Group messages into turns, each starting at a user message."""
    turns: list[list[ChatMessage]] = []
    for message in history:
        if message.role == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return turns


class Fitter:
    """One engine's fitting: message costs and remembered cuts. Thread-safe (one lock), but
    meant to run on the engine's own tokenizing thread.

    `cost(message)` is the tokens one message adds to a prompt; `fixed(system, tools)` the
    tokens of a prompt holding only the system message (with the tools described), which
    includes the prompt's own head and tail."""

    def __init__(
        self,
        *,
        cost: Callable[[ChatMessage], int],
        fixed: Callable[[ChatMessage, Sequence[ToolSpec]], int],
        size: int = REMEMBERED,
    ) -> None:
        self._cost = cost
        self._fixed = fixed
        self._size = size
        self._costs: OrderedDict[Key, int] = OrderedDict()
        self._cuts: OrderedDict[Key, None] = OrderedDict()  # first messages after a cut
        self._fixed_costs: OrderedDict[tuple[Key, tuple[str, ...]], int] = OrderedDict()
        self._lock = threading.Lock()
        #: messages counted (not found remembered), for tests and logs
        self.counted = 0

    def message(self, message: ChatMessage) -> int:
        key = key_of(message)
        cost = self._costs.get(key)
        if cost is None:
            cost = max(self._cost(message), 0)
            self.counted += 1
            self._costs[key] = cost
            if len(self._costs) > self._size:
                self._costs.popitem(last=False)
        else:
            self._costs.move_to_end(key)
        return cost

    def fit(
        self, system: ChatMessage, history: Sequence[ChatMessage], tools: Sequence[ToolSpec], budget: int
    ) -> list[ChatMessage]:
        """The system message plus as many of the newest turns as fit in `budget` tokens."""
        with self._lock:
            return self._fit(system, history, tools, budget)

    def _fit(
        self, system: ChatMessage, history: Sequence[ChatMessage], tools: Sequence[ToolSpec], budget: int
    ) -> list[ChatMessage]:
        turns = split_turns(history)
        fixed = self._fixed_cost(system, tools)
        costs = [sum(self.message(m) for m in turn) for turn in turns]
        newest = costs[-1] if costs else 0
        if fixed >= budget:
            raise PromptTooLong("instructions", tokens=fixed, budget=budget, room=0)
        if fixed + newest > budget:
            raise PromptTooLong("message", tokens=newest, budget=budget, room=max(budget - fixed, 0))
        total = fixed + sum(costs)
        first = 0
        if total > budget:
            first = self._earlier_cut(turns, costs, total, budget)
            if first < 0:  # a new cut, a large step down
                target = max(int(budget * CUT_TO), fixed + newest)
                first = 0
                while total > target and first < len(turns) - 1:
                    total -= costs[first]
                    first += 1
                self._remember_cut(turns[first][0])
        kept = [m for turn in turns[first:] for m in turn]
        return [system, *kept]

    def _fixed_cost(self, system: ChatMessage, tools: Sequence[ToolSpec]) -> int:
        """The system message's prompt, remembered by its content and the tools' names (an
        engine's tools are the same for its whole life)."""
        key = (key_of(system), tuple(tool.name for tool in tools))
        cost = self._fixed_costs.get(key)
        if cost is None:
            cost = self._fixed(system, tools)
            self._fixed_costs[key] = cost
            if len(self._fixed_costs) > self._size:
                self._fixed_costs.popitem(last=False)
        else:
            self._fixed_costs.move_to_end(key)
        return cost

    def _remember_cut(self, message: ChatMessage) -> None:
        key = key_of(message)
        self._cuts[key] = None
        self._cuts.move_to_end(key)
        if len(self._cuts) > self._size:
            self._cuts.popitem(last=False)

    def _earlier_cut(self, turns: list[list[ChatMessage]], costs: list[int], total: int, budget: int) -> int:
        """The oldest turn an earlier cut started at from which the rest still fits, or -1."""
        for index, turn in enumerate(turns):
            if total <= budget and key_of(turn[0]) in self._cuts:
                return index
            total -= costs[index]
        return -1


def counting_fitter(count: Callable[[Sequence[ChatMessage], Sequence[ToolSpec]], int]) -> Fitter:
    """A `Fitter` over a whole-prompt counter (`Engine.count_tokens`): a message costs what it
    adds to an empty prompt."""
    base: list[int] = []

    def cost(message: ChatMessage) -> int:
        if not base:
            base.append(count([], ()))
        return count([message], ()) - base[0]

    return Fitter(cost=cost, fixed=lambda system, tools: count([system], tools))
