"""The `search` tool against a fake SearxNG on 127.0.0.1: what the model is told, and what
SearxNG is asked. No test reaches the internet."""

from __future__ import annotations

import io
import logging

import pytest

from tests.fakes.searxng_server import FakeSearxng
from tests.scripted_engine import ScriptedEngine
from yanray.adapters.console import ConsoleAdapter
from yanray.bot.errors import ToolError
from yanray.bot.settings import Settings
from yanray.bot.toolloop import ToolLoop
from yanray.bot.tools import build_tools
from yanray.bot.tools.budget import cut_to_tokens, estimate_tokens
from yanray.bot.tools.search import MAX_RESPONSE_BYTES, OBSERVATION_TOKENS, Searcher, search_tool
from yanray.engine.base import ChatMessage, GenerateOptions

RESULTS = {
    "query": "paris weather",
    "results": [
        {"title": "Paris weather", "url": "https://weather.example/paris", "content": "Sunny,\n  18 °C."},
        {"title": "Forecast   for\tParis", "url": "https://forecast.example/p", "content": ""},
        {"title": "no url", "content": "dropped"},
        "not a result",
        {"title": "x" * 500, "url": "https://long.example/", "content": "y" * 5000},
    ],
}


async def run(tool_url: str, query: str) -> str:
    tool = search_tool(tool_url)
    try:
        return await tool.handler({"query": query})
    except Exception as exc:  # the tool loop's view: a ToolError is an "Error: ..." observation
        return f"Error: {exc}"


async def test_results_are_formatted_title_url_snippet_each_cut() -> None:
    async with FakeSearxng(RESULTS) as fake:
        text = await run(fake.base_url, "paris weather")
    lines = text.split("\n")
    assert lines[:5] == [
        "1. Paris weather",
        "   https://weather.example/paris",
        "   Sunny, 18 °C.",
        "2. Forecast for Paris",
        "   https://forecast.example/p",
    ]
    assert lines[5] == "3. " + "x" * 119 + "…"
    assert lines[7] == "   " + "y" * 299 + "…"
    assert len(lines) == 8


async def test_the_query_is_encoded_and_cannot_add_parameters() -> None:
    query = "a&format=html&q=b #frag/../?x=1 中文 100%"
    async with FakeSearxng(RESULTS) as fake:
        await run(fake.base_url + "/", query)
    assert fake.queries == [{"q": query, "format": "json"}]
    assert "Cookie" not in fake.headers[0]


async def test_no_results_is_said_plainly() -> None:
    async with FakeSearxng({"results": []}) as fake:
        assert await run(fake.base_url, "zzqx") == "No results for 'zzqx'."


async def test_many_results_are_the_top_five_within_the_budget() -> None:
    many = {
        "results": [
            {"title": f"t{i}" * 40, "url": f"https://e.example/{i}", "content": "s" * 300} for i in range(50)
        ]
    }
    async with FakeSearxng(many) as fake:
        text = await run(fake.base_url, "q")
    assert text.startswith("1. t0") and "6. " not in text and "5. t4" in text
    # five results of about 450 characters each pass the budget: the tool loop cuts them, saying so
    seen = cut_to_tokens(text, OBSERVATION_TOKENS)
    body, _, note = seen.rpartition("\n")
    assert text.startswith(body) and note == f"[cut: {len(text) - len(body):,} more characters not shown]"
    assert estimate_tokens(seen) <= OBSERVATION_TOKENS < estimate_tokens(text)


@pytest.mark.parametrize(
    ("fake", "expected"),
    [
        (
            FakeSearxng(body=b"<html>not json</html>"),
            "Error: the search service gave an answer that is not JSON",
        ),
        (FakeSearxng(body=b"\xff\xfe{"), "Error: the search service gave an answer that is not JSON"),
        (FakeSearxng({"answers": []}), "Error: SearxNG's answer has no result list"),
        (
            FakeSearxng(body=b'{"results": ' + b"[" * 100_000),
            "Error: the search service's answer is nested too deeply to read",
        ),
        (FakeSearxng(status=403), "Error: the search service answered HTTP 403"),
        (
            FakeSearxng(body=b'{"results": [' + b" " * (MAX_RESPONSE_BYTES + 10) + b"]}"),
            f"Error: the search service's answer was larger than {MAX_RESPONSE_BYTES:,} bytes",
        ),
    ],
)
async def test_a_failing_searxng_is_one_line(fake: FakeSearxng, expected: str) -> None:
    async with fake:
        assert await run(fake.base_url, "q") == expected


async def test_an_unreachable_searxng_is_one_line(caplog) -> None:
    caplog.set_level(logging.WARNING)
    assert await run("http://127.0.0.1:9", "q") == "Error: the search service could not be reached"
    assert "SearxNG at http://127.0.0.1:9/search failed" in caplog.text


async def test_a_searxng_that_never_answers_is_one_line() -> None:
    async with FakeSearxng(hang=True) as fake:
        searcher = Searcher(fake.base_url, timeout=0.5)
        with pytest.raises(ToolError) as caught:
            await searcher.search("q")
    assert str(caught.value) == "the search service did not answer in time"
    assert fake.queries == [{"q": "q", "format": "json"}]


def test_not_built_without_a_searxng_url(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    settings = Settings(data_dir=tmp_path, tools=["calculate", "search", "time"])
    tools = build_tools(settings.tools, settings)
    try:
        assert list(tools) == ["calculate", "time"]
        assert "YANRAY_SEARXNG_URL is not set" in caplog.text
    finally:
        for tool in tools.values():
            if tool.close is not None:
                tool.close()
    configured = Settings(data_dir=tmp_path, tools=["search"], searxng_url="http://searxng:8080")
    assert list(build_tools(configured.tools, configured)) == ["search"]


async def test_the_native_dialect_runs_search() -> None:
    from tests.test_toolloop import NativeSession
    from yanray.engine.base import Generation, ToolCall

    async with FakeSearxng(RESULTS) as fake:
        session = NativeSession(
            [
                Generation("", "tool_call", ToolCall("search", {"query": "paris weather"}, stored="call")),
                Generation("Sunny in Paris.", "stop"),
            ]
        )
        loop = ToolLoop(tools={"search": search_tool(fake.base_url)}, max_rounds=2)
        result = await loop.run(session, options=GenerateOptions)  # type: ignore[arg-type]
    assert session.appended[0].content.startswith("1. Paris weather\n")
    assert result.visible == "Sunny in Paris."


async def test_search_through_the_tool_loop_and_the_console(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["Let me look.\n/search paris weather\n", "It is sunny, 18 °C."])
    async with FakeSearxng(RESULTS) as fake:
        settings = make_settings(tools=["search"], searxng_url=fake.base_url)
        core = await core_factory(settings, engine)
        out = io.StringIO()
        await ConsoleAdapter(
            dispatcher=core.dispatcher, stdin=io.StringIO("weather in Paris?\n"), stdout=out
        ).converse()
    assert out.getvalue() == "Let me look.\nIt is sunny, 18 °C.\n\n"
    assert fake.queries == [{"q": "paris weather", "format": "json"}]
    system = engine.prompts[0][0]
    assert "/search <query>" in system.content and "/calculate" not in system.content
    observation = engine.prompts[-1][-1]
    assert observation.role == "observation" and observation.content.startswith("1. Paris weather\n")
    assert engine.prompts[-1][-2] == ChatMessage("assistant", "Let me look.\n/search paris weather\n")
