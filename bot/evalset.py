"""An eval set for `yanray eval`: its JSONL schema, its loading, and the checks on an answer.

One JSON object per line (blank lines are skipped):

    {"id": "calc-en-1", "lang": "en", "prompt": "What is 1234 * 5678?",
     "check": "tool", "expected": "7006652"}

- `id`: unique in the set, at most 100 characters; `compare` matches items by it.
- `lang`: `en` or `zh`, the language the prompt is asked in. The item gets the built-in
  persona (or `YANRAY_SYSTEM_PROMPT`) in that language, as a conversation in it would.
- `prompt`: the question, a fresh conversation's only message.
- `check`, one of:
  - `exact`: the answer is one of `expected` (see `normalize`; sentence punctuation and
    quotes around it do not count);
  - `contains`: the answer contains one of `expected`;
  - `tool`: the model called `tool` (default `calculate`) and the answer contains one of
    `expected` (the right result; thousands separators do not count);
  - `no_tool`: the model called no tool (and, if `expected` is given, the answer contains
    one of it);
  - `persona`: the answer names one of `expected` (default `Yanray`) and is written in `lang`.
- `expected`: a string or a list of strings, any of which passes.
- `tools` (optional): the tools enabled for this item instead of `YANRAY_TOOLS`; a `tool`
  item always has its tool enabled, whatever the configuration.
- `forbidden` (optional): strings the answer must not contain (any of them fails the item).

Every line is validated before anything runs; the first bad one is one line naming the
file and the line (`core.jsonl line 7: ...`), with how many more are bad. The set is the
operator's file, but it is size-checked before parsing like any input.

The checks compare case-folded NFKC text (full-width digits and letters, subscripts and
the like fold to their plain forms), in time linear in the answer.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from yanray.bot.tools import TOOL_NAMES
from yanray.errors import YanrayError

CHECKS = ("exact", "contains", "tool", "no_tool", "persona")
LANGS = ("en", "zh")
FIELDS = frozenset({"id", "lang", "prompt", "check", "expected", "tool", "tools", "forbidden"})
NEEDS_EXPECTED = frozenset({"exact", "contains", "tool"})
DEFAULT_NAMES = ("Yanray",)

MAX_SET_BYTES = 16 * 1024 * 1024
MAX_LINE_CHARS = 64_000
MAX_ITEMS = 10_000
MAX_ID_CHARS = 100
MAX_PROMPT_CHARS = 16_000
MAX_STRINGS = 50  # in `expected` or `forbidden`
MAX_STRING_CHARS = 2_000

# what may surround an exact answer: sentence punctuation, quotes, brackets, blanks
_EDGES = " \t\n.,;:!?。，；：！？、\"'`“”‘’「」『』《》()（）[]【】*_"
# a thousands separator: a comma between two digits (linear: a fixed-width look-around)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")


class EvalError(YanrayError):
    """An eval set, a result file or a `yanray eval` command line that cannot be used; one
    line naming the file (and the line)."""


@dataclass(frozen=True)
class EvalItem:
    id: str
    lang: str
    prompt: str
    check: str
    expected: tuple[str, ...] = ()
    tool: str = ""  # the tool a `tool` item must call
    tools: tuple[str, ...] | None = None  # None: YANRAY_TOOLS
    forbidden: tuple[str, ...] = ()

    def enabled_tools(self, configured: Sequence[str]) -> list[str]:
        """The tools this item runs with: its own, else the configured ones, plus its `tool`."""
        names = list(self.tools if self.tools is not None else configured)
        if self.tool and self.tool not in names:
            names.append(self.tool)
        return names


def default_set() -> Path:
    """The set `yanray eval` runs when given none: `evals/core.jsonl`, installed with Yanray
    as the package data of `yanray.evals`."""
    return Path(str(resources.files("yanray.evals").joinpath("core.jsonl")))


def load_set(path: Path) -> list[EvalItem]:
    """Every item of the set at `path`, or `EvalError` naming the first bad line."""
    try:
        # read to the limit, not to the end: a FIFO (`<(...)`) has no size to stat
        with path.open("rb") as set_file:
            raw = set_file.read(MAX_SET_BYTES + 1)
        if len(raw) > MAX_SET_BYTES:
            raise EvalError(f"{path}: more than the {MAX_SET_BYTES:,} bytes an eval set may have")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvalError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise EvalError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    return parse_set(text, name=path.name)


def parse_set(text: str, *, name: str) -> list[EvalItem]:
    items: list[EvalItem] = []
    seen: set[str] = set()
    first_error = ""
    bad = 0
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = parse_item(line)
            if item.id in seen:
                raise ValueError(f"the id {item.id!r} is used twice")
            seen.add(item.id)
            items.append(item)
        except ValueError as exc:
            bad += 1
            first_error = first_error or f"{name} line {number}: {exc}"
    if bad:
        more = f" (and {bad - 1} more bad line{'s' if bad > 2 else ''})" if bad > 1 else ""
        raise EvalError(first_error + more)
    if not items:
        raise EvalError(f"{name}: no items")
    if len(items) > MAX_ITEMS:
        raise EvalError(f"{name}: {len(items):,} items, more than an eval set may have ({MAX_ITEMS:,})")
    return items


def parse_item(line: str) -> EvalItem:
    """One line of a set; `ValueError` with a short reason when it is not a valid item."""
    if len(line) > MAX_LINE_CHARS:
        raise ValueError(f"{len(line):,} characters, more than a line may have ({MAX_LINE_CHARS:,})")
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(FIELDS))})")
    item_id = _string(data, "id", MAX_ID_CHARS)
    lang = _string(data, "lang", 10)
    if lang not in LANGS:
        raise ValueError(f"'lang' is {lang!r}; it must be one of {', '.join(LANGS)}")
    prompt = _string(data, "prompt", MAX_PROMPT_CHARS)
    check = _string(data, "check", 20)
    if check not in CHECKS:
        raise ValueError(f"'check' is {check!r}; it must be one of {', '.join(CHECKS)}")
    expected = _strings(data, "expected")
    if check in NEEDS_EXPECTED and not expected:
        raise ValueError(f"'expected' is missing; a {check} check needs it")
    if check == "persona" and not expected:
        expected = DEFAULT_NAMES
    tool = ""
    if "tool" in data:
        if check != "tool":
            raise ValueError(f"'tool' is only for a tool check, not {check}")
        tool = _tool_name(_string(data, "tool", 50), "tool")
    elif check == "tool":
        tool = "calculate"
    tools = None
    if "tools" in data:
        if not isinstance(data["tools"], list):
            raise ValueError("'tools' must be a list of tool names")
        tools = tuple(_tool_name(name, "tools") for name in data["tools"])
    return EvalItem(
        id=item_id,
        lang=lang,
        prompt=prompt,
        check=check,
        expected=expected,
        tool=tool,
        tools=tools,
        forbidden=_strings(data, "forbidden"),
    )


def _string(data: dict[str, Any], key: str, limit: int) -> str:
    value = data.get(key)
    if value is None:
        raise ValueError(f"'{key}' is missing")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' must be a non-empty string")
    if len(value) > limit:
        raise ValueError(f"'{key}' has {len(value):,} characters; at most {limit:,}")
    return value


def _strings(data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or len(values) > MAX_STRINGS:
        raise ValueError(f"'{key}' must be a string or a list of 1 to {MAX_STRINGS} strings")
    for one in values:
        if not isinstance(one, str) or not normalize(one):
            raise ValueError(f"'{key}' holds {one!r}, not a non-empty string")
        if len(one) > MAX_STRING_CHARS:
            raise ValueError(
                f"'{key}' holds a string of {len(one):,} characters; at most {MAX_STRING_CHARS:,}"
            )
    return tuple(values)


def _tool_name(name: Any, key: str) -> str:
    if name not in TOOL_NAMES:
        raise ValueError(f"'{key}' names {name!r}, not a tool (tools: {', '.join(sorted(TOOL_NAMES))})")
    return str(name)


# -- the checks ------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """NFKC, case-folded, runs of white space as one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def language_of(text: str) -> str:
    """`zh`, `en` or `mixed`, by the share of Han characters among the letters (Han and
    Latin): a quarter or more is Chinese (a Han character carries about a word), a twentieth
    or less is English."""
    han = latin = 0
    for char in unicodedata.normalize("NFKC", text):
        if "a" <= char <= "z" or "A" <= char <= "Z":
            latin += 1
        elif "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf" or "\uf900" <= char <= "\ufaff":
            han += 1
    letters = han + latin
    if letters and han * 4 >= letters:
        return "zh"
    if letters and han * 20 <= letters:
        return "en"
    return "mixed"


LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "mixed": "mixed languages"}


def judge(item: EvalItem, answer: str, tools_called: Sequence[str]) -> tuple[bool, str]:
    """(passed, why): whether `answer` (the visible text) and the tools called pass the item."""
    said = normalize(answer)
    if not said:
        return False, "no answer"
    for word in item.forbidden:
        if normalize(word) in said:
            return False, f"says {word!r}, which it must not"
    if item.check == "exact":
        if said.strip(_EDGES) in {normalize(e).strip(_EDGES) for e in item.expected}:
            return True, "exact answer"
        return False, f"answer is not {_one_of(item.expected)}"
    if item.check == "contains":
        return _contains(said, item.expected)
    if item.check == "tool":
        if item.tool not in tools_called:
            return False, f"did not call {item.tool}"
        plain = _THOUSANDS.sub("", said)
        if any(_THOUSANDS.sub("", normalize(e)) in plain for e in item.expected):
            return True, f"called {item.tool}, and the result is in the answer"
        return False, f"called {item.tool}, but {_one_of(item.expected)} is not in the answer"
    if item.check == "no_tool":
        if tools_called:
            return False, f"called {', '.join(dict.fromkeys(tools_called))}"
        return _contains(said, item.expected) if item.expected else (True, "no tool call")
    # persona: the name is said, in the language asked (the names themselves do not count)
    found = [name for name in item.expected if normalize(name) in said]
    if not found:
        return False, f"does not say {_one_of(item.expected)}"
    rest = said
    for name in found:
        rest = rest.replace(normalize(name), " ")
    language = language_of(rest)
    if language != item.lang:
        return False, f"answered in {LANGUAGE_NAMES[language]}, asked in {LANGUAGE_NAMES[item.lang]}"
    return True, f"says {found[0]}, in {LANGUAGE_NAMES[item.lang]}"


def _contains(said: str, expected: Sequence[str]) -> tuple[bool, str]:
    for one in expected:
        if normalize(one) in said:
            return True, f"contains {one!r}"
    return False, f"does not contain {_one_of(expected)}"


def _one_of(values: Sequence[str]) -> str:
    shown = " or ".join(repr(v) for v in values[:3])
    return shown + (f" (or {len(values) - 3} more)" if len(values) > 3 else "")
