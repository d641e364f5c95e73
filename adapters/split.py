"""Split a long reply into platform-sized messages without losing a character.

`split_message(text, limit)` cuts at the best boundary inside each window of `limit`
characters: after a paragraph (blank line), then after a line, then after a sentence,
then after a word, and only then anywhere. A fenced code block (```` ```lang ````) is
never cut while the whole block could still fit in one message; a block longer than
that is cut (at a line boundary when possible), the chunk closes the fence (adds
"\\n```") and the next chunk reopens it with the same info string, so every message
renders as valid Markdown.

`join_parts(parts)` removes exactly the fences the splitter added, so
`join_parts(split_message(text, limit)) == text` for every text: the parts carry
every character of the original, in order. Platforms strip leading and trailing
whitespace of a message, so that is the only thing a reader may not see.

Choices where the brief was silent:
- Separators (the blank line, the newline, the space after a sentence) stay at the end
  of the earlier chunk, so each new message starts with the next word.
- A boundary is only taken if the chunk is at least a quarter of the window long (so a
  reply does not turn into many tiny messages); otherwise the next finer boundary.
  The cut just before a code block that fits is taken however short the chunk is.
- Fences are CommonMark-ish: up to three spaces, three or more backticks, an info
  string without backticks; a fence line is at most `MAX_FENCE_LINE` characters (longer
  lines starting with backticks are ordinary text). Cuts never fall inside a fence line.
- Lengths are counted in code points; a caller with another measure (Telegram counts
  UTF-16 units) passes a smaller `limit`.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

MAX_FENCE_LINE = 40
MIN_LIMIT = 2 * MAX_FENCE_LINE + 20
_SENTENCE_END = ".!?…"
_CJK_SENTENCE_END = "。！？"
_BREAK_AFTER = re.compile(rf"[\s{_CJK_SENTENCE_END}]")


@dataclass(frozen=True)
class Fence:
    """An open code fence: its backtick count and info string."""

    ticks: int
    info: str

    @property
    def opener(self) -> str:
        """What a continuation chunk starts with to reopen the block."""
        return "`" * self.ticks + self.info + "\n"

    @property
    def closer(self) -> str:
        """What a chunk cut inside the block ends with."""
        return "\n" + "`" * self.ticks


def _fence_line(line: str) -> tuple[int, str] | None:
    """(backtick count, info) if `line` (without its newline) looks like a fence line."""
    if len(line) > MAX_FENCE_LINE:
        return None
    stripped = line.lstrip(" ")
    if len(line) - len(stripped) > 3 or not stripped.startswith("```"):
        return None
    ticks = len(stripped) - len(stripped.lstrip("`"))
    info = stripped[ticks:].strip()
    if "`" in info:
        return None
    return ticks, info


def _step(state: Fence | None, line: str) -> Fence | None:
    """The fence state after one complete line."""
    found = _fence_line(line)
    if found is None:
        return state
    ticks, info = found
    if state is None:
        return Fence(ticks, info)
    if not info and ticks >= state.ticks:
        return None
    return state


def open_fence(text: str) -> Fence | None:
    """The code block `text` ends inside of, counting only complete lines."""
    state: Fence | None = None
    for line in text.split("\n")[:-1]:
        state = _step(state, line)
    return state


class _Lines:
    """Line starts and the fence state before each line, for one text."""

    def __init__(self, text: str) -> None:
        self.starts: list[int] = [0]
        self.states: list[Fence | None] = [None]  # state before line i
        # lines starting like a fence: a cut in their first MAX_FENCE_LINE characters could
        # leave a piece that reads as a fence line, so cuts avoid that stretch
        self.fence_like: set[int] = set()
        state: Fence | None = None
        start = 0
        for index, line in enumerate(text.split("\n")):
            if line.lstrip(" ").startswith("```") and len(line) - len(line.lstrip(" ")) <= 3:
                self.fence_like.add(index)
            start += len(line) + 1
            state = _step(state, line)
            self.starts.append(start)
            self.states.append(state)
        # per line, the first and last line of the code block it is in (computed once: walking
        # the block for every candidate cut made an unclosed block quadratic)
        count = len(self.states)
        self.block_first = list(range(count))
        self.block_last = list(range(count))
        for at in range(1, count):
            if self.states[at] is not None:
                self.block_first[at] = self.block_first[at - 1]
        for at in range(count - 2, -1, -1):
            if self.states[at + 1] is not None:
                self.block_last[at] = self.block_last[at + 1]

    def line_of(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos) - 1

    def state_at(self, pos: int) -> Fence | None:
        """Fence state of text[:pos]: only lines complete before `pos` count."""
        return self.states[self.line_of(pos)]

    def inside_fence_line(self, pos: int) -> bool:
        line = self.line_of(pos)
        return line in self.fence_like and 0 < pos - self.starts[line] <= MAX_FENCE_LINE


def _level(text: str, p: int) -> int:
    """How good a cut before text[p] is: 4 paragraph, 3 line, 2 sentence, 1 word, 0 none."""
    prev = text[p - 1]
    if prev == "\n":
        nxt = text[p] if p < len(text) else ""
        if p >= 2 and text[p - 2] == "\n" and nxt != "\n":
            return 4
        return 3 if nxt != "\n" else 0
    if prev in _CJK_SENTENCE_END:
        return 2
    if prev.isspace() and p < len(text) and not text[p].isspace():
        if p >= 2 and text[p - 2] in _SENTENCE_END:
            return 2
        return 1
    return 0


def _choose_cut(text: str, lines: _Lines, pos: int, end: int, limit: int) -> int:
    """The best cut in (pos, end]; the chunk text[pos:cut] plus fences must fit `limit`."""
    candidates: list[tuple[int, int]] = []  # (level, position), latest first
    # only a position after whitespace or a CJK sentence end can be a boundary
    for p in reversed([m.end() for m in _BREAK_AFTER.finditer(text, pos, end)]):
        level = _level(text, p)
        if level and not lines.inside_fence_line(p):
            candidates.append((level, p))
    min_fill = (end - pos) // 4

    def allowed(p: int) -> bool:
        state = lines.state_at(p)
        if state is None:
            return True
        # inside a block: only if the block cannot fit a message of its own
        line = lines.line_of(p)
        first, last = lines.block_first[line], lines.block_last[line]
        block = lines.starts[min(last + 1, len(lines.starts) - 1)] - lines.starts[first]
        return block > limit or lines.starts[first] < pos

    for level in (4, 3, 2, 1):
        for lv, p in candidates:  # latest first
            if lv == level and p - pos >= min_fill and allowed(p):
                return p
    usable = [(level, p) for level, p in candidates if allowed(p)]
    if usable:
        # every boundary is early: the cut just before a code block that fits, or the best one
        return max(usable, key=lambda item: (item[0], item[1]))[1]
    # one long word or line: cut anywhere, but not inside a fence line
    p = end
    while p > pos + 1 and lines.inside_fence_line(p):
        p -= 1
    return p


def split_message(text: str, limit: int) -> list[str]:
    """`text` as chunks of at most `limit` characters; see the module docstring."""
    if limit < MIN_LIMIT:
        raise ValueError(f"limit must be at least {MIN_LIMIT}, got {limit}")
    if len(text) <= limit:
        return [text]
    lines = _Lines(text)
    parts: list[str] = []
    pos = 0
    while pos < len(text):
        state = lines.state_at(pos) if pos else None
        prefix = state.opener if state is not None else ""
        budget = limit - len(prefix)
        if len(text) - pos <= budget:
            parts.append(prefix + text[pos:])
            break
        end = pos + budget
        while True:
            cut = _choose_cut(text, lines, pos, end, limit)
            cut_state = lines.state_at(cut)
            suffix = cut_state.closer if cut_state is not None else ""
            if cut - pos + len(suffix) <= budget:
                break
            end = min(end - len(suffix), cut - 1)
        parts.append(prefix + text[pos:cut] + suffix)
        pos = cut
    return parts


def join_parts(parts: list[str]) -> str:
    """Undo `split_message`: the original text, without the fences the splitter added."""
    out: list[str] = []
    state: Fence | None = None  # the fence state of the complete lines joined so far
    tail = ""  # the start of the joined text's last, unfinished line (enough to tell a fence)
    for index, part in enumerate(parts):
        if index and state is not None:
            if not part.startswith(state.opener):
                raise ValueError(f"part {index} does not reopen the code block")
            part = part[len(state.opener) :]
        if index < len(parts) - 1:
            after, _ = _advance(state, tail, part)
            if after is not None:
                if not part.endswith(after.closer):
                    raise ValueError(f"part {index} does not close the code block")
                part = part[: -len(after.closer)]
        state, tail = _advance(state, tail, part)
        out.append(part)
    return "".join(out)


def _advance(state: Fence | None, tail: str, text: str) -> tuple[Fence | None, str]:
    """The fence state and unfinished-line start after `text` follows `tail`: each part's
    lines are read once (re-reading the whole joined text per part was quadratic)."""
    *lines, rest = (tail + text).split("\n")
    for line in lines:
        state = _step(state, line)
    # a line longer than MAX_FENCE_LINE is never a fence line, so its start is all that matters
    return state, rest[: MAX_FENCE_LINE + 1]
