"""Parsing ChatGLM3's native tool-call block: literals only, never evaluated."""

from __future__ import annotations

import pytest

from yanray.engine.chatglm3.tools import ToolCallError, parse_tool_call


@pytest.mark.parametrize(
    ("content", "arguments"),
    [
        (
            '```python\ntool_call(location="beijing", unit="celsius")\n```',
            {"location": "beijing", "unit": "celsius"},
        ),
        ('tool_call(expression="6.5*7.5")', {"expression": "6.5*7.5"}),
        ("  ```\ntool_call()\n```  ", {}),
        (
            "tool_call(n=-3, x=1.5e3, ok=True, none=None, xs=(1, 2), d={'a': [1, {'b': 'c'}]})",
            {"n": -3, "x": 1500.0, "ok": True, "none": None, "xs": [1, 2], "d": {"a": [1, {"b": "c"}]}},
        ),
        ("tool_call(query='天气 ☀️')", {"query": "天气 ☀️"}),
    ],
)
def test_literal_calls_parse(content: str, arguments: dict[str, object]) -> None:
    call = parse_tool_call(" get_current_weather ", content)
    assert (call.name, call.arguments) == ("get_current_weather", arguments)


@pytest.mark.parametrize(
    "content",
    [
        "tool_call(x=__import__('os'))",
        "tool_call(x=__import__('os').system('id'))",
        "tool_call(x=open('/etc/passwd').read())",
        "tool_call(x=(lambda: 1)())",
        "tool_call(x=[c for c in ().__class__.__base__.__subclasses__()])",
        "tool_call(x=y)",
        "tool_call(x=1+1)",
        "tool_call(x=2**10**10)",
        "tool_call(x=f'{1}')",
        "tool_call(**{'x': 1})",
        "tool_call('positional')",
        "tool_call(x=1); import os",
        "import os",
        "os.system('id')",
        "eval('1')",
        "tool_call.x(a=1)",
        "tool_call(x={1, 2})",
        "tool_call(x=b'bytes')",
        "tool_call(x=1j)",
        "tool_call(x=" + "[" * 200 + "]" * 200 + ")",
        "tool_call(x='" + "a" * 10_000 + "')",
        "tool_call(x=" + "9" * 5000 + ")",
        "tool_call(x=1",
        "",
        "```python\n```",
    ],
)
def test_hostile_or_malformed_calls_are_refused(content: str) -> None:
    with pytest.raises(ToolCallError):
        parse_tool_call("calculate", content)


@pytest.mark.parametrize("metadata", ["", "   ", "Sure, here is the answer", "a" * 100, "x y"])
def test_metadata_must_be_a_tool_name(metadata: str) -> None:
    with pytest.raises(ToolCallError):
        parse_tool_call(metadata, "tool_call(x=1)")


def test_the_stored_form_parses_back_to_the_same_call() -> None:
    written = "tool_call(expression='6*7', flags=[True, None, 1.5], opts={'k': '引号\"\\''})"
    call = parse_tool_call("calculate", written)
    assert call.arguments == {"expression": "6*7", "flags": [True, None, 1.5], "opts": {"k": "引号\"'"}}
    assert call.stored.startswith("```python\ntool_call(") and call.stored.endswith(")\n```")
    assert parse_tool_call("calculate", call.stored) == call
