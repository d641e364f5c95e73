"""The `time` tool with fixed instants and zones, its default zone setting, and a call
through the tool loop and the console adapter."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest

from tests.scripted_engine import ScriptedEngine
from tests.test_toolloop import NativeSession
from yanray.adapters.console import ConsoleAdapter
from yanray.bot.errors import ConfigError
from yanray.bot.settings import load_settings
from yanray.bot.toolloop import SlashCalls, ToolLoop
from yanray.bot.tools.clock import time_tool
from yanray.engine.base import ChatMessage, GenerateOptions, Generation, ToolCall

INSTANT = datetime(2026, 7, 1, 22, 30, 5, tzinfo=UTC)  # summer time in Europe


async def answer(arguments: dict[str, object], default: str = "UTC") -> str:
    tool = time_tool(default, now=lambda: INSTANT)
    try:
        return await tool.handler(arguments)
    except Exception as exc:
        return f"Error: {exc}"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({}, "2026-07-01 22:30:05 (Wednesday) in UTC, UTC, UTC+00:00"),
        ({"timezone": "Europe/Berlin"}, "2026-07-02 00:30:05 (Thursday) in Europe/Berlin, CEST, UTC+02:00"),
        (
            {"timezone": "Asia/Kathmandu"},
            "2026-07-02 04:15:05 (Thursday) in Asia/Kathmandu, +0545, UTC+05:45",
        ),
        (
            {"timezone": "America/Los_Angeles"},
            "2026-07-01 15:30:05 (Wednesday) in America/Los_Angeles, PDT, UTC-07:00",
        ),
        ({"timezone": " Asia/Tokyo "}, "2026-07-02 07:30:05 (Thursday) in Asia/Tokyo, JST, UTC+09:00"),
    ],
)
async def test_the_time_in_fixed_zones(arguments: dict[str, object], expected: str) -> None:
    assert await answer(arguments) == expected


async def test_the_default_zone_is_the_operators() -> None:
    assert await answer({}, "Australia/Adelaide") == (
        "2026-07-02 08:00:05 (Thursday) in Australia/Adelaide, ACST, UTC+09:30"
    )


@pytest.mark.parametrize(
    ("zone", "expected"),
    [
        (
            "Mars/Olympus",
            "Error: unknown time zone 'Mars/Olympus'; use an IANA name like Europe/Berlin or UTC",
        ),
        ("../../etc/passwd", "Error: '../../etc/passwd' is not a time zone name like Europe/Berlin or UTC"),
        ("/etc/localtime", "Error: '/etc/localtime' is not a time zone name like Europe/Berlin or UTC"),
        ("Europe", "Error: unknown time zone 'Europe'; use an IANA name like Europe/Berlin or UTC"),
        ("x" * 100, "Error: '" + "x" * 64 + "…' is not a time zone name like Europe/Berlin or UTC"),
    ],
)
async def test_a_bad_zone_is_one_line(zone: str, expected: str) -> None:
    assert await answer({"timezone": zone}) == expected


def test_a_bad_default_zone_stops_start_up_with_one_line(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("YANRAY_TIMEZONE", "Mars/Olympus")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "YANRAY_TIMEZONE='Mars/Olympus'" in message and "unknown time zone" in message
    assert "\n" not in message
    monkeypatch.setenv("YANRAY_TIMEZONE", "Asia/Tokyo")
    assert load_settings().timezone == "Asia/Tokyo"


async def test_the_native_dialect_runs_time() -> None:
    session = NativeSession(
        [
            Generation("", "tool_call", ToolCall("time", {"timezone": "Asia/Tokyo"}, stored="call")),
            Generation("It is half past seven in Tokyo.", "stop"),
        ]
    )
    loop = ToolLoop(tools={"time": time_tool(now=lambda: INSTANT)}, max_rounds=2)
    result = await loop.run(session, options=GenerateOptions)  # type: ignore[arg-type]
    assert session.appended == [
        ChatMessage("observation", "2026-07-02 07:30:05 (Thursday) in Asia/Tokyo, JST, UTC+09:00", "time")
    ]
    assert result.visible == "It is half past seven in Tokyo."


async def test_a_bare_slash_call_uses_the_default_zone() -> None:
    engine = ScriptedEngine(["/time\n", "It is 22:30 UTC."])
    loop = ToolLoop(tools={"time": time_tool(now=lambda: INSTANT)}, max_rounds=2)
    result = await loop.run(await engine.start([ChatMessage("user", "time?")]), options=GenerateOptions)
    assert engine.prompts[-1][-1].content == "2026-07-01 22:30:05 (Wednesday) in UTC, UTC, UTC+00:00"
    assert result.visible == "It is 22:30 UTC."


async def test_time_through_the_tool_loop_and_the_console(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["/time Asia/Kathmandu\n", "Here is the time."])
    core = await core_factory(make_settings(tools=["time"], timezone="Europe/Berlin"), engine)
    out = io.StringIO()
    before = datetime.now(UTC)
    await ConsoleAdapter(
        dispatcher=core.dispatcher, stdin=io.StringIO("what time is it?\n"), stdout=out
    ).converse()
    after = datetime.now(UTC)
    assert out.getvalue() == "Here is the time.\n\n"
    system = engine.prompts[0][0].content
    assert "/time [timezone]" in system and "in Europe/Berlin, or in the IANA time zone given" in system
    observation = engine.prompts[-1][-1]
    assert observation.role == "observation" and observation.name == "time"
    # the real clock: the observation is a moment between before and after, in Kathmandu
    stamp = datetime.strptime(observation.content[:19], "%Y-%m-%d %H:%M:%S")
    shift = timedelta(hours=5, minutes=45)
    assert (
        (before + shift).replace(tzinfo=None, microsecond=0) <= stamp <= (after + shift).replace(tzinfo=None)
    )
    assert observation.content.endswith("in Asia/Kathmandu, +0545, UTC+05:45")


@pytest.mark.parametrize(
    ("line", "call"),
    [
        ("/time", ("time", "")),
        ("  /time \t ", ("time", "")),
        ("/time Asia/Tokyo  ", ("time", "Asia/Tokyo")),
        ("/calculate", None),  # only a tool whose argument is optional may be called bare
        ("/calculate   ", None),
        ("/calculate 1+1", ("calculate", "1+1")),
        ("/timezone", None),
        ("/time/x", None),
    ],
)
def test_a_bare_call_only_for_a_tool_that_takes_one(line: str, call: tuple[str, str] | None) -> None:
    assert SlashCalls(["calculate", "time"], bare=["time"]).parse(line) == call
