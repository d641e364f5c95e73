"""Tools the model may call between generation rounds, and their registry.

A tool is a name, a one-line usage for the system prompt, a JSON-schema description for
models with a native tool format (ChatGLM3), and an async handler that takes the
call's arguments and returns text, or a `ToolResult`: text plus images for the user (the
plot), which the tool loop has shown to the user before the model reads on. A handler raises `ToolError` for bad input; its
message goes back to the model as the observation. A call whose argument is longer than
`max_argument_chars` never reaches the handler (the tool loop refuses it). A handler returns
its whole text: the tool loop cuts every observation to the tool's `max_observation_tokens`
(`budget`), saying so. Tools only ever run on model
output, never on text a user typed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from yanray.bot.types import Image
from yanray.engine.base import ToolSpec

if TYPE_CHECKING:
    from yanray.bot.settings import Settings

logger = logging.getLogger(__name__)

#: every tool Yanray has, by the name `YANRAY_TOOLS` uses
TOOL_NAMES = frozenset({"calculate", "fetch", "plot", "search", "time"})


@dataclass(frozen=True)
class ToolResult:
    """What a tool hands back besides plain text: images for the user, each with what it
    shows (`shows`, e.g. "the plot of sin(x) for x from -5 to 5"), and a note for the model
    (`text`, may be empty). The model's observation says whether each image was sent."""

    text: str
    images: tuple[Image, ...] = ()
    shows: tuple[str, ...] = ()


Handler = Callable[[Mapping[str, Any]], Awaitable["str | ToolResult"]]


@dataclass(frozen=True)
class Tool:
    spec: ToolSpec
    handler: Handler
    #: the argument the slash dialect's text after the command goes into
    slash_argument: str
    timeout: float = 10.0
    #: longest argument accepted; a longer call is refused before the tool parses anything
    max_argument_chars: int = 2000
    #: most estimated tokens the model reads of the tool's text (`budget`; the loop cuts it)
    max_observation_tokens: int = 1000
    #: the slash dialect also accepts the command alone (`/time`): the handler gets no argument
    argument_optional: bool = False
    #: releases what the tool holds (the calculator's worker process); called at shut-down
    close: Callable[[], None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name


def one_string(argument: str, description: str, *, required: bool = True) -> dict[str, Any]:
    """The JSON schema of a tool's parameters when it takes one string argument."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {argument: {"type": "string", "description": description}},
    }
    if required:
        schema["required"] = [argument]
    return schema


def build_tools(names: list[str], settings: Settings | None = None) -> dict[str, Tool]:
    """The enabled tools, by name, in the order given; `settings` configures those that need it
    (without it: their defaults). A tool that cannot work as configured is left out, with a log line."""
    if not names:
        return {}
    from yanray.bot.tools.calculator import Calculator, calculator_tool
    from yanray.bot.tools.clock import time_tool
    from yanray.bot.tools.fetch import fetch_config, fetch_tool
    from yanray.bot.tools.plot import plot_tool
    from yanray.bot.tools.search import search_tool

    # calculate and plot share one warm worker process (sympy and matplotlib load once)
    shared = Calculator(plot=True) if "calculate" in names and "plot" in names else None

    searxng_url = settings.searxng_url if settings is not None else ""
    timezone = settings.timezone if settings is not None else "UTC"
    factories: dict[str, Callable[[], Tool]] = {
        "calculate": lambda: calculator_tool(shared),
        "plot": lambda: plot_tool(shared),
        "fetch": lambda: fetch_tool(fetch_config(settings)),
        "search": lambda: search_tool(searxng_url),
        "time": lambda: time_tool(timezone),
    }
    tools: dict[str, Tool] = {}
    for name in names:
        if name == "search" and not searxng_url:
            logger.info("the search tool is enabled but YANRAY_SEARXNG_URL is not set: it is left out")
            continue
        tools[name] = factories[name]()
    if shared is not None:  # closed once, with the first of the two
        tools["calculate"] = replace(tools["calculate"], close=shared.close)
    return tools
