"""ChatGLM3's native tool-call dialect: parse the model's `tool_call(...)` block, never run it.

ChatGLM3 calls a tool by opening an `<|assistant|>` block whose metadata line is the tool
name and whose content is a Python snippet, usually fenced:

    <|assistant|>get_current_weather
    ```python
    tool_call(location="beijing", unit="celsius")
    ```

THUDM's `chat()` runs that snippet with `eval`. Here it is parsed with `ast` and accepted
only as a single call of the name `tool_call` with keyword arguments whose values are
literals (`ast.literal_eval` on each value node: strings, numbers, booleans, None, and
lists/tuples/dicts of those). Anything else (`__import__('os')`, attribute access,
names, `**kwargs`, positional arguments, a second statement) is refused with
`ToolCallError`. Sizes are bounded before parsing so a hostile snippet cannot exhaust the
parser. Tuples become lists and sets, bytes and complex numbers are refused, so the
arguments are always plain JSON values.

What the engine does with a refused call is its choice (see `engine/chatglm3/prompt.py`):
it treats the block as ordinary text.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from typing import Any

from yanray.engine.base import ToolCall

MAX_SNIPPET_CHARS = 8192
MAX_NESTING = 32
_NAME = re.compile(r"^[A-Za-z_][\w.\-]{0,63}$")
# the opening fence line; the closing one is found by a scan from the end (a lazy body before
# `[ \t]*```\s*$` would be quadratic in a run of spaces)
_FENCE_OPEN = re.compile(r"^\s*+```[\w+-]*+[ \t]*+\n")


class ToolCallError(ValueError):
    """The model's tool-call block is not a literal-only `tool_call(...)`."""


def is_tool_name(metadata: str) -> bool:
    """Whether a metadata line looks like a tool name (and not like the start of an answer)."""
    return bool(_NAME.match(metadata.strip()))


def _unfence(content: str) -> str:
    """The body of a fenced block (```` ```python\n...\n``` ````), or `content` as it is."""
    opened = _FENCE_OPEN.match(content)
    close = len(content.rstrip()) - 3
    if opened is None or close < opened.end() or not content.startswith("```", close):
        return content
    end = close
    while end > opened.end() and content[end - 1] in " \t":
        end -= 1
    if end > opened.end() and content[end - 1] == "\n":
        end -= 1
    return content[opened.end() : end]


def _depth_ok(text: str) -> bool:
    depth = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            if depth > MAX_NESTING:
                return False
        elif ch in ")]}":
            depth -= 1
    return True


def _json_value(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v, where) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ToolCallError(f"{where}: dictionary keys must be strings")
        return {k: _json_value(v, where) for k, v in value.items()}
    raise ToolCallError(f"{where}: {type(value).__name__} values are not allowed")


def parse_tool_call(metadata: str, content: str) -> ToolCall:
    """The `ToolCall` in a native block (metadata line = tool name), or `ToolCallError`."""
    name = metadata.strip()
    if not is_tool_name(name):
        raise ToolCallError(f"{name[:40]!r} is not a tool name")
    code = _unfence(content).strip()
    if not code:
        raise ToolCallError("the tool call is empty")
    if len(code) > MAX_SNIPPET_CHARS or not _depth_ok(code):
        raise ToolCallError("the tool call is too large or too deeply nested")
    try:
        tree = ast.parse(code, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ToolCallError(f"the tool call is not valid Python ({type(exc).__name__})") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ToolCallError("expected a single tool_call(name=value, ...)")
    if call.args:
        raise ToolCallError("tool_call takes keyword arguments only")
    arguments: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise ToolCallError("tool_call(**...) is not allowed")
        try:
            value = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise ToolCallError(f"argument {keyword.arg!r} is not a literal value") from None
        arguments[keyword.arg] = _json_value(value, f"argument {keyword.arg!r}")
    return ToolCall(name=name, arguments=arguments, stored=tool_call_content(arguments))


def tool_call_content(arguments: Mapping[str, Any]) -> str:
    """The block content ChatGLM3 writes for a call with `arguments` (`ToolCall.stored`).

    Values are written as JSON literals, which Python (and this parser) read back the same,
    except true/false/null, which are written as Python's True/False/None.
    """
    parts = [f"{key}={_py_literal(value)}" for key, value in arguments.items()]
    return "```python\ntool_call(" + ", ".join(parts) + ")\n```"


def _py_literal(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, Mapping):
        return (
            "{"
            + ", ".join(
                f"{json.dumps(str(k), ensure_ascii=False)}: {_py_literal(v)}" for k, v in value.items()
            )
            + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)
