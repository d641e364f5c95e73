"""Every tool as the model meets it: listed only when enabled, and described the same way.

The slash dialect is the one the default model (ChatGLM3-6B-32K) must use well, so each
tool's description is short, says what it does, and ends with one example call that the
tool loop recognises and the tool's own checks accept: a model that copies it gets a
working call (no stray "." or ")" after it; `/time Asia/Tokyo.` is not a zone).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from yanray.bot.context import system_prompt
from yanray.bot.settings import Settings
from yanray.bot.toolloop import SlashCalls
from yanray.bot.tools import TOOL_NAMES, Tool, build_tools
from yanray.bot.tools.addresses import AddressRules, check_url
from yanray.bot.tools.calc_rules import validate
from yanray.bot.tools.plot_rules import split_argument

ALL = sorted(TOOL_NAMES)
BASE = "You are Yanray."
#: the calculator's description lists what its parser allows; the others stay much shorter
LONGEST = {"calculate": 320}
SHORT = 160


def close(tools: dict[str, Tool]) -> None:
    for tool in tools.values():
        if tool.close is not None:
            tool.close()


@pytest.fixture
def every_tool(tmp_path: Path) -> Iterator[dict[str, Tool]]:
    settings = Settings(data_dir=tmp_path, tools=ALL, searxng_url="http://searxng:8080")
    tools = build_tools(settings.tools, settings)
    yield tools
    close(tools)


def usage_lines(prompt: str) -> list[str]:
    return [line for line in prompt.splitlines() if line.startswith("/")]


@pytest.mark.parametrize("name", ALL)
def test_a_tool_is_listed_only_when_enabled(name: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, tools=[name], searxng_url="http://searxng:8080")
    tools = build_tools(settings.tools, settings)
    try:
        assert list(tools) == [name]
        prompt = system_prompt(BASE, list(tools.values()), native=False)
        [line] = usage_lines(prompt)
        assert line.startswith(tools[name].spec.usage + " - ")
        assert not any(f"/{other} " in prompt for other in ALL if other != name)
        # a native-tool model gets the specs from the engine: the prompt is the base alone
        assert system_prompt(BASE, list(tools.values()), native=True) == BASE
    finally:
        close(tools)


def test_no_tools_no_tool_help_and_search_needs_a_searxng(tmp_path: Path) -> None:
    assert system_prompt(BASE, [], native=False) == BASE
    settings = Settings(data_dir=tmp_path, tools=["search", "time"])  # no YANRAY_SEARXNG_URL
    tools = build_tools(settings.tools, settings)
    prompt = system_prompt(BASE, list(tools.values()), native=False)
    assert [line.split(" ")[0] for line in usage_lines(prompt)] == ["/time"]


def test_every_description_is_short_and_ends_with_one_example(every_tool: dict[str, Tool]) -> None:
    assert sorted(every_tool) == ALL
    for name, tool in every_tool.items():
        description = tool.spec.description
        assert len(description) <= LONGEST.get(name, SHORT), name
        assert description[0].isupper() and "\n" not in description, name
        what, _, example = description.rpartition(". Example: ")
        assert what and example.startswith(f"/{name} "), name
        assert "Example:" not in what and "e.g." not in what, name  # one example each
        assert example == example.strip() and example[-1] not in ".,;", name
    # in the prompt, each tool's line ends with its example: nothing after it to copy
    prompt = system_prompt(BASE, list(every_tool.values()), native=False)
    for line, tool in zip(usage_lines(prompt), every_tool.values(), strict=True):
        assert line == f"{tool.spec.usage} - {tool.spec.description}"


def test_every_example_is_a_call_the_tool_accepts(every_tool: dict[str, Tool]) -> None:
    calls = SlashCalls(list(every_tool), bare=[n for n, t in every_tool.items() if t.argument_optional])
    arguments = {}
    for name, tool in every_tool.items():
        example = tool.spec.description.rpartition(". Example: ")[2]
        assert calls.parse(example) == (name, example.split(" ", 1)[1]), name
        arguments[name] = example.split(" ", 1)[1]
        assert len(arguments[name]) <= tool.max_argument_chars
    # each argument passes the checks its tool makes before doing anything
    validate(arguments["calculate"])
    expression, low, high = split_argument(arguments["plot"])
    for text in (expression, low, high):
        validate(text)
    assert check_url(arguments["fetch"], AddressRules()).host == "en.wikipedia.org"


async def test_the_time_example_runs(every_tool: dict[str, Tool]) -> None:
    example = every_tool["time"].spec.description.rpartition(" ")[2]
    assert (await every_tool["time"].handler({"timezone": example})).endswith("in Asia/Tokyo, JST, UTC+09:00")


@pytest.mark.parametrize(
    ("name", "block", "arguments"),
    [
        ("calculate", 'tool_call(expression="6.5*7.5")', {"expression": "6.5*7.5"}),
        (
            "fetch",
            'tool_call(url="https://en.wikipedia.org/wiki/Moon")',
            {"url": "https://en.wikipedia.org/wiki/Moon"},
        ),
        ("search", 'tool_call(query="weather in Paris")', {"query": "weather in Paris"}),
        ("time", "tool_call()", {}),
        ("time", 'tool_call(timezone="Asia/Tokyo")', {"timezone": "Asia/Tokyo"}),
        (
            "plot",
            'tool_call(expression="sin(x)", x_from=-5, x_to=5.5)',
            {"expression": "sin(x)", "x_from": -5, "x_to": 5.5},
        ),
    ],
)
def test_chatglm3_native_blocks_give_the_arguments_each_tool_reads(
    every_tool: dict[str, Tool], name: str, block: str, arguments: dict[str, object]
) -> None:
    """What ChatGLM3 writes in its own format parses to the arguments each tool's schema names."""
    from yanray.engine.chatglm3.tools import parse_tool_call

    call = parse_tool_call(name, f"```python\n{block}\n```")
    assert (call.name, call.arguments) == (name, arguments)
    schema = every_tool[name].spec.parameters
    assert set(call.arguments) <= set(schema["properties"])
    assert set(schema.get("required", [])) <= set(call.arguments)
    if name == "plot":
        from yanray.bot.tools.plot import plot_argument

        assert split_argument(plot_argument(call.arguments)) == ("sin(x)", "-5", "5.5")


def test_every_tool_has_a_time_limit(every_tool: dict[str, Tool]) -> None:
    for name, tool in every_tool.items():
        assert 0 < tool.timeout <= 60, name


async def test_a_tool_past_its_time_limit_is_a_one_line_observation() -> None:
    """The tool loop's own limit, for a tool whose inner limits did not stop it."""
    from dataclasses import replace

    from tests.test_toolloop import NativeSession
    from yanray.bot.toolloop import ToolLoop
    from yanray.bot.tools.clock import time_tool
    from yanray.engine.base import ChatMessage, GenerateOptions, Generation, ToolCall

    started = asyncio.Event()

    async def never(args: object) -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    tool = replace(time_tool(), handler=never, timeout=0.2)
    outcomes: list[tuple[str, str]] = []
    session = NativeSession(
        [
            Generation("", "tool_call", ToolCall("time", {}, stored="tool_call()")),
            Generation("Sorry.", "stop"),
        ]
    )
    loop = ToolLoop(tools={"time": tool}, max_rounds=2, on_tool=lambda *o: outcomes.append(o))
    result = await loop.run(session, options=GenerateOptions)  # type: ignore[arg-type]
    assert started.is_set()
    assert session.appended == [
        ChatMessage("observation", "Error: the time tool took longer than 0.2 s.", "time")
    ]
    assert outcomes == [("time", "timeout")] and result.visible == "Sorry."
