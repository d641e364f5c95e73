"""No regular expression in Yanray may backtrack catastrophically on hostile text.

Every compiled pattern in the yanray packages (module attributes, lists and class
attributes, plus the tool loop's pattern built at run time) is taken apart with Python's
own regex parser and checked for the two shapes behind the freezes of issue 8:

- nested repeats: an unbounded repeat inside another (`(a+)+`), both able to give
  characters back, split a run in exponentially many ways;
- adjacent repeats: an unbounded repeat followed, with nothing in between that must
  match, by another unbounded repeat that can take some of the same characters
  (`\\s+(.*?)\\s*#*\\s*$` is cubic on a run of spaces; `(\\S[^\\n]*?)[ \\t]*\\n` is
  quadratic).

A possessive repeat (`*+`, `++`) or an atomic group never gives characters back, so it
is allowed in either place. The check over-approximates (character sets are compared on a
sample alphabet, and a repeat's whole body counts): a pattern it flags that is linear anyway
is rewritten to be plainly so (possessive where the runs meet), not excused. What this
check cannot see (a pattern retried from every start position of a long run) is timed
below on runs of each pattern's own opener, and in `test_hostile_text.py`.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import time
from collections.abc import Iterator
from re import _constants as sre
from re import _parser as sre_parse
from typing import Any

from yanray.bot.toolloop import SlashCalls

PACKAGES = ("yanray.bot", "yanray.adapters", "yanray.engine", "yanray.storage")
SKIPPED = ("yanray.storage.migrations",)  # alembic's env.py runs migrations when imported
# characters to compare character sets on: ASCII, and the Unicode kinds hostile text uses
ALPHABET = [chr(i) for i in range(128)] + ["\u00a0", "\u2028", "\u3000", "é", "中", "😀", "。"]
UNBOUNDED = (sre.MAX_REPEAT, sre.MIN_REPEAT)  # repeats that backtrack; POSSESSIVE_REPEAT does not
CATEGORIES = {
    sre.CATEGORY_DIGIT: r"\d",
    sre.CATEGORY_NOT_DIGIT: r"\D",
    sre.CATEGORY_SPACE: r"\s",
    sre.CATEGORY_NOT_SPACE: r"\S",
    sre.CATEGORY_WORD: r"\w",
    sre.CATEGORY_NOT_WORD: r"\W",
}


def scanned_modules() -> Iterator[str]:
    """Every module of the yanray packages the scan imports."""
    for package in PACKAGES:
        root = importlib.import_module(package)
        names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
        yield from (name for name in names if not name.startswith(SKIPPED))


def compiled_patterns() -> Iterator[tuple[str, str, re.Pattern[str]]]:
    """(module, name, pattern) for every compiled pattern the yanray packages hold."""
    for name in scanned_modules():
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if isinstance(value, type) and value.__module__ != name:
                continue  # a class imported from elsewhere: checked where it is defined
            for found in _patterns_in(value):
                yield name, attribute, found
    yield "yanray.bot.toolloop", "SlashCalls._line", SlashCalls(["calculate", "c"])._line


def _patterns_in(value: Any, depth: int = 0) -> Iterator[re.Pattern[str]]:
    if isinstance(value, re.Pattern):
        yield value
    elif depth < 3 and isinstance(value, list | tuple | dict):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _patterns_in(item, depth + 1)
    elif depth == 0 and isinstance(value, type):
        for item in vars(value).values():
            yield from _patterns_in(item, depth + 1)


def chars(items: Any, flags: int) -> set[str]:
    """Every character of ALPHABET that some single-character item in `items` can match."""
    out: set[str] = set()
    for op, av in items:
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            out |= {c for c in ALPHABET if _single(op, av, c, flags)}
        elif op in (*UNBOUNDED, sre.POSSESSIVE_REPEAT):
            out |= chars(av[2], flags)
        elif op in (sre.SUBPATTERN, sre.ATOMIC_GROUP):
            out |= chars(av[-1], flags)
        elif op == sre.BRANCH:
            for branch in av[1]:
                out |= chars(branch, flags)
    return out


def _single(op: Any, av: Any, c: str, flags: int) -> bool:
    if op == sre.LITERAL:
        return ord(c) == av
    if op == sre.NOT_LITERAL:
        return ord(c) != av
    if op == sre.ANY:
        return c != "\n" or bool(flags & re.DOTALL)
    negate = bool(av) and av[0][0] == sre.NEGATE
    hit = False
    for kind, value in av:
        if kind == sre.LITERAL:
            hit |= ord(c) == value
        elif kind == sre.RANGE:
            hit |= value[0] <= ord(c) <= value[1]
        elif kind == sre.CATEGORY:
            hit |= re.fullmatch(CATEGORIES[value], c, flags & re.ASCII) is not None
    return hit != negate


def next_repeats(items: list[Any]) -> Iterator[Any]:
    """The unbounded backtracking repeats that can take the next characters at the start of
    `items`: zero-width items are skipped, groups entered, and an optional item looked past."""
    for op, av in items:
        if op in (sre.AT, sre.ASSERT, sre.ASSERT_NOT):
            continue
        if op in UNBOUNDED and av[1] == sre.MAXREPEAT:
            yield op, av
        elif op == sre.SUBPATTERN:
            yield from next_repeats(list(av[-1]))
        elif op == sre.BRANCH:
            for branch in av[1]:
                yield from next_repeats(list(branch))
        if not (op in (*UNBOUNDED, sre.POSSESSIVE_REPEAT) and av[0] == 0):
            return  # this item must match something: what follows is not adjacent


def problems(
    items: Any, flags: int, inside_repeat: bool = False, after: list[Any] | None = None
) -> Iterator[str]:
    """What is wrong with a parsed pattern; `after` is what follows `items` outside their group."""
    items = list(items)
    for index, (op, av) in enumerate(items):
        rest = items[index + 1 :] + (after or [])
        if op in UNBOUNDED and av[1] == sre.MAXREPEAT:
            if inside_repeat:
                yield "an unbounded repeat nested in another, both backtracking"
            shared = chars(av[2], flags)
            if any(shared & chars(following[2], flags) for _op, following in next_repeats(rest)):
                yield "two adjacent unbounded repeats over the same characters"
            yield from problems(av[2], flags, inside_repeat=True)
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # bounded: its body still counts
            yield from problems(av[2], flags, inside_repeat, rest)
        elif op == sre.SUBPATTERN:
            yield from problems(av[-1], flags, inside_repeat, rest)
        elif op == sre.BRANCH:
            for branch in av[1]:
                yield from problems(branch, flags, inside_repeat, rest)
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            yield from problems(av[1], flags, inside_repeat)
        # POSSESSIVE_REPEAT and ATOMIC_GROUP never give back: nothing inside them can blow up


def test_the_check_catches_the_patterns_that_froze_yanray() -> None:
    for source in (
        r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$",  # telegram headings: cubic
        r"^[ \t]*/(calculate)[ \t]+(\S[^\n]*?)[ \t]*(?:\n|\Z)",  # tool lines: quadratic
        r"(`+)(?!`)(.+?)(?<!`)\1(?!`)",  # code spans: quadratic
        r"(a+)+$",  # the textbook case
    ):
        pattern = re.compile(source, re.MULTILINE)
        assert list(problems(sre_parse.parse(source, pattern.flags), pattern.flags)), source
    for source in (
        r"\s++(.*)\s*+$",  # possessive where the runs meet
        r"(?>\s+)\w+\s*$",  # atomic, and \w and \s never overlap
        r"\*\*(?=\S)((?:[^*]++|\*(?!\*))++)(?<=\S)\*\*",  # telegram bold now
    ):
        assert not list(problems(sre_parse.parse(source), 0)), source


def test_the_scan_covers_the_tools_and_the_reply_streamer() -> None:
    """The modules that read what the model writes or a web server sends are scanned too."""
    scanned = set(scanned_modules())
    for module in (
        "yanray.bot.toolloop",
        "yanray.bot.tools.addresses",
        "yanray.bot.tools.fetch",
        "yanray.bot.tools.search",
        "yanray.bot.tools.clock",
        "yanray.bot.tools.plot",
        "yanray.bot.tools.plot_rules",
        "yanray.bot.tools.plot_draw",
        "yanray.bot.tools.calc_rules",
        "yanray.adapters.streamer",
        "yanray.adapters.console",
        "yanray.adapters.telegram_sink",
        "yanray.adapters.discord_sinks",
    ):
        assert module in scanned, module


def test_no_pattern_in_yanray_can_backtrack_catastrophically() -> None:
    found = list(compiled_patterns())
    assert len(found) >= 20  # the walk reaches the modules (telegram_format alone has 15)
    flagged = []
    for module, name, pattern in found:
        for problem in problems(sre_parse.parse(pattern.pattern, pattern.flags), pattern.flags):
            flagged.append(f"{module}.{name} {pattern.pattern!r}: {problem}")
    assert flagged == []


def opener(pattern: re.Pattern[str]) -> str:
    """The literal text a pattern starts with (after any lookarounds), e.g. "**" or "["."""
    out = []
    for op, av in sre_parse.parse(pattern.pattern, pattern.flags):
        if op in (sre.AT, sre.ASSERT, sre.ASSERT_NOT) and not out:
            continue
        if op != sre.LITERAL:
            break
        out.append(chr(av))
    return "".join(out)


def test_no_pattern_is_slow_on_runs_of_its_own_opener() -> None:
    """The other way a pattern goes quadratic: each start (every `[` of `[[[[...`, every `**`
    of `**a **a ...`) scans past the next start before failing. The old link and bold
    patterns took 2 to 14 s here on these 40 KB texts; a linear pattern takes milliseconds."""
    slow = []
    for module, name, pattern in compiled_patterns():
        prefix = opener(pattern)
        texts = [(prefix + fill) * (40_000 // len(prefix + fill)) for fill in FILLS if prefix + fill]
        texts += [prefix + "a" + space * 40_000 + "b" for space in (" ", "\u00a0")]
        started = time.perf_counter()
        for text in texts:
            for _ in pattern.finditer(text):
                pass
        if time.perf_counter() - started > 1.0:
            slow.append(f"{module}.{name} {pattern.pattern!r}")
    assert slow == []


FILLS = ("", "a", "a ", " ", "\u00a0", "\t", "\n")
