"""Model Markdown to Telegram HTML (the `parse_mode="HTML"` subset), escaping everything else.

Telegram's HTML is strict (unknown tags and unbalanced ones are "can't parse entities"),
so the converter only ever emits balanced tags it opened itself, and every character
of the model's own text goes through `html.escape`. What it understands:

- fenced code blocks (```` ```lang ````) -> `<pre><code class="language-lang">`; a block
  still open at the end (a reply being streamed, or a split part) runs to the end;
- inline code (`` `x` ``), bold (`**x**`, `__x__`), italic (`*x*`, `_x_` at word
  boundaries, so snake_case stays as it is), strikethrough (`~~x~~`), links
  (`[label](https://...)`, http(s) only), headings (`# Title` -> bold line), quotes
  (`> ` lines -> `<blockquote>`), bullets (`- `, `* `, `+ ` -> `•`).

Where the design is silent: inline markup is matched within one line; an unmatched
marker stays as literal text; italic and strikethrough never wrap other tags, so crossed
markers (`**a _b** c_`) cannot produce crossed tags. As in CommonMark, an emphasis closes at
the first closing delimiter (`**a **b**` is `**a <b>b</b>`), a code span is closed only by a
backtick run of its own length, and a link label has no `[`.

Why not markdown-it-py: it renders CommonMark to HTML that Telegram would reject (`<p>`,
`<ul>`, `<h1>`), so its token stream would need a second renderer of the same size as this
one, and its output differs from this converter's in many small ways users would notice
(snake_case, `2*3*4`, unclosed fences while streaming). This converter is small and every
pattern in it is linear (see the comment on the patterns); the fuzz tests hold it to that. Should Telegram still reject the
result, the caller re-sends the same text plain. The visible text is never longer than
the Markdown it came from, so a part that fits the limit as Markdown fits as HTML.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable

# Every pattern here runs on user and model text, on the event loop, for every preview: each
# is linear. Runs are possessive (`*+`, `++`) and each content class stops at its closing
# delimiter, so no part of a line is scanned twice from one start, and a failed start costs
# no more than the text up to the next delimiter (`test_hostile_text.py` keeps it so).
_FENCE = re.compile(r"^ {0,3}+(`{3,}+)([^`]*+)$")
_HEADING = re.compile(r"^ {0,3}+#{1,6}+\s")  # the rest of the line is taken apart in _heading
_BULLET = re.compile(r"^(\s*+)[-*+]\s++(?=\S)")
_QUOTE = re.compile(r"^ {0,3}+>\s?")
_BACKTICKS = re.compile(r"`++")
_LINK = re.compile(r"\[([^\[\]\n]++)\]\((https?://[^\s()<>]++)\)")
_LANG = re.compile(r"[\w+#.-]{1,32}")
_INLINE: list[tuple[str, re.Pattern[str], str]] = [  # (marker, pattern, replacement)
    ("***", re.compile(r"\*\*\*(?=[^\s*])([^<>*]++)(?<=[^\s*])\*\*\*"), r"<b><i>\1</i></b>"),
    ("**", re.compile(r"\*\*(?=\S)((?:[^*]++|\*(?!\*))++)(?<=\S)\*\*"), r"<b>\1</b>"),
    ("__", re.compile(r"(?<!\w)__(?=[^\s_])((?:[^<>_]++|_(?!_))++)(?<=[^\s_])__(?!\w)"), r"<b>\1</b>"),
    ("~~", re.compile(r"~~(?=\S)((?:[^<>~]++|~(?!~))++)(?<=\S)~~"), r"<s>\1</s>"),
    ("*", re.compile(r"(?<![\w*])\*(?=[^\s*])([^<>*]++)(?<=[^\s*])\*(?![\w*])"), r"<i>\1</i>"),
    ("_", re.compile(r"(?<![\w_])_(?=[^\s_])([^<>_]++)(?<=[^\s_])_(?![\w_])"), r"<i>\1</i>"),
]
_SLOT = re.compile("\x00(\\d++)\x00")


def escape(text: str) -> str:
    return html.escape(text, quote=False)


def _inline(line: str) -> str:
    """One line of Markdown to HTML."""
    slots: list[str] = []

    def keep(fragment: str) -> str:
        slots.append(fragment)
        return f"\x00{len(slots) - 1}\x00"

    if "`" in line:
        line = _code_spans(line, keep)
    if "[" in line:
        line = _LINK.sub(
            lambda m: keep(f'<a href="{html.escape(m.group(2), quote=True)}">{escape(m.group(1))}</a>'), line
        )
    line = escape(line)
    for marker, pattern, replacement in _INLINE:
        if marker in line:
            line = pattern.sub(replacement, line)
    return _SLOT.sub(lambda m: slots[int(m.group(1))], line) if slots else line


def _code_spans(line: str, keep: Callable[[str], str]) -> str:
    """Code spans as CommonMark reads them: a run of backticks up to the next run of the
    same length. Each run's partner is found in one pass from the right, so a line of many
    runs that never close costs linear time."""
    runs = [(m.start(), m.end()) for m in _BACKTICKS.finditer(line)]
    partner: list[int | None] = [None] * len(runs)
    later: dict[int, int] = {}  # run length -> index of the nearest such run to the right
    for index in range(len(runs) - 1, -1, -1):
        size = runs[index][1] - runs[index][0]
        partner[index] = later.get(size)
        later[size] = index
    out: list[str] = []
    done = 0  # line[:done] is in `out`
    index = 0
    while index < len(runs):
        close = partner[index]
        if close is None:
            index += 1
            continue
        (start, opened), (closing, end) = runs[index], runs[close]
        out += [line[done:start], keep(f"<code>{escape(line[opened:closing])}</code>")]
        done, index = end, close + 1
    out.append(line[done:])
    return "".join(out)


def _heading(line: str) -> str | None:
    """The text of an ATX heading line (`## Title ##`), or None. The closing #s are taken off
    only after a space, as in CommonMark (`# C#` keeps its #)."""
    if _HEADING.match(line) is None:
        return None
    text = line.lstrip(" ").lstrip("#").strip()
    bare = text.rstrip("#")
    if not bare or bare[-1].isspace():
        text = bare.rstrip()
    return text or None


def _code_block(info: str, lines: list[str]) -> str:
    body = escape("\n".join(lines).rstrip("\n"))
    if not body:
        body = " "
    language = info.split()[0] if info.split() else ""
    if _LANG.fullmatch(language):
        return f'<pre><code class="language-{language}">{body}</code></pre>'
    return f"<pre>{body}</pre>"


def markdown_to_html(text: str) -> str:
    """Telegram HTML for a piece of model Markdown (see the module docstring)."""
    lines = text.replace("\x00", "").split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        if fence:
            ticks, info = len(fence.group(1)), fence.group(2).strip()
            body: list[str] = []
            index += 1
            while index < len(lines):
                closing = lines[index].strip()
                if closing and set(closing) == {"`"} and len(closing) >= ticks:
                    break
                body.append(lines[index])
                index += 1
            out.append(_code_block(info, body))
            index += 1
            continue
        if _QUOTE.match(line):
            quoted: list[str] = []
            while index < len(lines) and _QUOTE.match(lines[index]):
                quoted.append(_inline(_QUOTE.sub("", lines[index], count=1)))
                index += 1
            out.append("<blockquote>" + "\n".join(quoted) + "</blockquote>")
            continue
        heading = _heading(line)
        if heading is not None:
            out.append(f"<b>{_inline(heading)}</b>")
        else:
            out.append(_inline(_BULLET.sub(r"\1• ", line)))
        index += 1
    return "\n".join(out)
