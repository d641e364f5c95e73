"""The plot tool's rules, pure Python: how its argument reads, and the bounds of a plot.

Run by BOTH processes, like `calc_rules`: the parent splits and checks the argument at
once, and the worker (`plot_draw`) checks the same texts and the real range again.

The argument is `<expression> [x from <a> to <b>]`: `sin(x) x from -5 to 5`, also with a
comma or "for" before the x (`sin(x), x from 0 to 2*pi`, `sin(x) for x from 0 to 2*pi`).
Without a range, x runs from -10 to 10. The expression and both bounds are calculator
expressions (`calc_rules.validate`: the same allow-list, no `eval`); the bounds must come
out as real finite numbers. The argument's length is checked before anything else reads
it, and it is split in linear time (no regex: `str.split`, `rfind`, `partition`).

Bounds: x from a to b with a < b, |a| and |b| at most MAX_BOUND, and the range at least
a millionth of its size wide (narrower ranges fall apart into floating-point steps).
`SAMPLES` points, a `WIDTH` x `HEIGHT` PNG, at most `MAX_PNG_BYTES`.
"""

from __future__ import annotations

import math

from yanray.bot.tools.calc_rules import MAX_TEXT, CalcError

#: the whole argument: an expression of up to calc_rules.MAX_TEXT characters and a range
MAX_ARGUMENT = MAX_TEXT + 100
MAX_BOUND_TEXT = 40
DEFAULT_FROM, DEFAULT_TO = "-10", "10"
MAX_BOUND = 1e6
MIN_RELATIVE_WIDTH = 1e-6
SAMPLES = 600
WIDTH, HEIGHT, DPI = 800, 500, 100
MAX_PNG_BYTES = 400_000
#: how much of the expression a title and a caption show
SHOWN_CHARS = 80


def split_argument(text: str) -> tuple[str, str, str]:
    """(expression, a, b) of `<expression> [x from <a> to <b>]`; raises CalcError."""
    if len(text) > MAX_ARGUMENT:
        raise CalcError(f"expression too long ({len(text)} characters, limit {MAX_ARGUMENT})")
    if "\n" in text or "\r" in text:
        raise CalcError("the plot must be a single line")
    words = " ".join(text.split())
    cut = words.rfind(" from ")
    if cut < 0:
        if words.startswith("from ") or words.endswith(" from"):
            raise CalcError("write the range as: x from -5 to 5")
        return words.rstrip(","), DEFAULT_FROM, DEFAULT_TO
    head, tail = words[:cut], words[cut + len(" from ") :]
    a, to, b = tail.partition(" to ")
    if not to or not a.strip() or not b.strip():
        raise CalcError("write the range as: x from -5 to 5")
    for bound in (a, b):
        if len(bound) > MAX_BOUND_TEXT:
            raise CalcError(f"a bound of the x-range is too long (limit {MAX_BOUND_TEXT} characters)")
    if head.endswith("x") and (len(head) == 1 or head[-2] in " ,"):
        # "... x from", "..., x from", "... for x from": that x names the variable
        named = head[:-1].rstrip()
        if named.endswith(" for") or named == "for":
            named = named[: -len("for")]
        if named.strip(" ,"):  # "/plot x from 0 to 1" plots x itself
            head = named
    expression = head.strip().rstrip(",").strip()
    if not expression:
        raise CalcError("nothing to plot; write e.g. /plot sin(x) x from -5 to 5")
    return expression, a.strip(), b.strip()


def check_range(a: float, b: float, shown: tuple[str, str]) -> None:
    """Refuse an x-range that cannot be drawn, naming it as it was written (`shown`)."""
    if not (math.isfinite(a) and math.isfinite(b)):
        raise CalcError("the x-range must be finite numbers")
    if a > b:
        raise CalcError(
            f"the x-range is reversed (from {shown[0]} to {shown[1]}); write x from {shown[1]} to {shown[0]}"
        )
    if a == b:
        raise CalcError(f"the x-range is empty (from {shown[0]} to {shown[1]})")
    if max(abs(a), abs(b)) > MAX_BOUND:
        raise CalcError(f"the x-range is too large (x may run from {-MAX_BOUND:,.0f} to {MAX_BOUND:,.0f})")
    if b - a < MIN_RELATIVE_WIDTH * max(abs(a), abs(b)):
        raise CalcError(f"the x-range from {shown[0]} to {shown[1]} is too narrow to draw")


def shorten(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"
