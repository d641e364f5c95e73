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
markers (`**a _b** c_`) cannot produce crossed tags. Should Telegram still reject the
result, the caller re-sends the same text plain. The visible text is never longer than
the Markdown it came from, so a part that fits the limit as Markdown fits as HTML.
"""

from __future__ import annotations

import html
import re

_FENCE = re.compile(r"^ {0,3}(`{3,})([^`]*)$")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)[-*+]\s+(?=\S)")
_QUOTE = re.compile(r"^ {0,3}>\s?")
_CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^\s()<>]+)\)")
_LANG = re.compile(r"[\w+#.-]{1,32}")
_INLINE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\*\*\*(?=[^\s*])([^<>*]+?)(?<=[^\s*])\*\*\*"), r"<b><i>\1</i></b>"),
    (re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*"), r"<b>\1</b>"),
    (re.compile(r"(?<!\w)__(?=[^\s_])([^<>]+?)(?<=[^\s_])__(?!\w)"), r"<b>\1</b>"),
    (re.compile(r"~~(?=\S)([^<>]+?)(?<=\S)~~"), r"<s>\1</s>"),
    (re.compile(r"(?<![\w*])\*(?=[^\s*])([^<>*]+?)(?<=[^\s*])\*(?![\w*])"), r"<i>\1</i>"),
    (re.compile(r"(?<![\w_])_(?=[^\s_])([^<>_]+?)(?<=[^\s_])_(?![\w_])"), r"<i>\1</i>"),
]
_SLOT = re.compile("\x00(\\d+)\x00")


def escape(text: str) -> str:
    return html.escape(text, quote=False)


def _inline(line: str) -> str:
    """One line of Markdown to HTML."""
    slots: list[str] = []

    def keep(fragment: str) -> str:
        slots.append(fragment)
        return f"\x00{len(slots) - 1}\x00"

    line = _CODE_SPAN.sub(lambda m: keep(f"<code>{escape(m.group(2))}</code>"), line)
    line = _LINK.sub(
        lambda m: keep(f'<a href="{html.escape(m.group(2), quote=True)}">{escape(m.group(1))}</a>'), line
    )
    line = escape(line)
    for pattern, replacement in _INLINE:
        line = pattern.sub(replacement, line)
    return _SLOT.sub(lambda m: slots[int(m.group(1))], line)


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
        heading = _HEADING.match(line)
        if heading and heading.group(1):
            out.append(f"<b>{_inline(heading.group(1))}</b>")
        else:
            out.append(_inline(_BULLET.sub(r"\1• ", line)))
        index += 1
    return "\n".join(out)
