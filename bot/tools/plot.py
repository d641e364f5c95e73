"""The `plot` tool: draw y = f(x) to a PNG that goes to the user.

`/plot sin(x) x from -5 to 5` (natively: `expression`, and optionally `x_from` and `x_to`).
The argument's form and the plot's bounds are in `plot_rules`; the drawing in `plot_draw`.
Security is the calculator's, layer for layer: the parent checks the argument's length,
splits it and validates the expression and both bounds with `calc_rules.validate` (one
line at once for bad input, without touching the worker); the calculator's sandboxed
worker (`calc_worker`: RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE 0, its own session, `python
-I`, a wall-clock limit from the parent) validates the same text again, builds the sympy
expression from the fixed tables, samples it with numpy and draws it with matplotlib's Agg
canvas. The PNG comes back base64 in the worker's JSON line, at most
`plot_rules.MAX_PNG_BYTES`.

The result is a `ToolResult`: the image, what it shows ("the plot of sin(x) for x from -5
to 5") and notes for the model (points left out). The tool loop shows the image to the
user before the model reads on, and the model's observation says whether it was sent.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from typing import Any

from yanray.bot.errors import ToolError
from yanray.bot.tools import Tool, ToolResult
from yanray.bot.tools.calc_rules import CalcError, one_line, validate
from yanray.bot.tools.calculator import Calculator
from yanray.bot.tools.plot_rules import MAX_ARGUMENT, MAX_PNG_BYTES, split_argument
from yanray.bot.types import Image
from yanray.engine.base import ToolSpec

logger = logging.getLogger(__name__)

#: the worker's wall-clock (and CPU) limit for one plot
PLOT_TIMEOUT = 8.0
#: the tool loop's limit: a plot's time, and a worker that has to start first (sympy, matplotlib)
TOOL_TIMEOUT = 30.0
USAGE_HINT = "e.g. /plot sin(x) x from -5 to 5"


def plot_argument(arguments: Mapping[str, Any]) -> str:
    """The slash form of a call: the native dialect's `x_from`/`x_to` become `x from a to b`."""
    expression = arguments.get("expression")
    if not isinstance(expression, str):
        raise ToolError(f'plot needs an "expression" string, {USAGE_HINT}')
    low, high = arguments.get("x_from"), arguments.get("x_to")
    if low is None and high is None:
        return expression
    bounds = []
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, int | float | str):
            raise ToolError(f"x_from and x_to must both be numbers, {USAGE_HINT}")
        bounds.append(str(bound))
    return f"{expression} x from {bounds[0]} to {bounds[1]}"


async def plot(calculator: Calculator, argument: str) -> ToolResult:
    """Draw the plot `argument` asks for; raises ToolError (one line) when it cannot."""
    try:
        expression, low, high = split_argument(argument)
        for text in (expression, low, high):
            validate(text)
    except CalcError as exc:
        raise ToolError(one_line(str(exc))) from None
    reply = await calculator.request({"plot": argument}, timeout=PLOT_TIMEOUT)
    try:
        png = base64.b64decode(str(reply["image"]), validate=True)
    except (KeyError, binascii.Error):
        raise ToolError("the plot could not be drawn") from None
    if len(png) > MAX_PNG_BYTES or not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ToolError("the plot could not be drawn")
    image = Image(data=png, name="plot.png", caption=str(reply.get("caption", "")))
    return ToolResult(text=str(reply.get("text", "")), images=(image,), shows=(str(reply["shows"]),))


def plot_tool(calculator: Calculator | None = None) -> Tool:
    """The `plot` tool; pass a `Calculator` to share its worker (made with `plot=True`, so the
    worker loads matplotlib when it starts) or to close it yourself."""
    calc = calculator if calculator is not None else Calculator(plot=True)

    async def handler(args: Mapping[str, Any]) -> ToolResult:
        return await plot(calc, plot_argument(args))

    spec = ToolSpec(
        name="plot",
        description=(
            "Draws y = f(x) as a picture sent to the user; f is written as for calculate, "
            "x runs from -10 to 10 unless given. Example: /plot sin(x)/x x from -20 to 20"
        ),
        parameters={
            "type": "object",
            "properties": {
                "expression": {"type": "string", "description": "f(x), e.g. sin(x)/x"},
                "x_from": {"type": "number", "description": "where x starts (default -10)"},
                "x_to": {"type": "number", "description": "where x ends (default 10)"},
            },
            "required": ["expression"],
        },
        usage="/plot <expression> [x from a to b]",
    )
    owned = calc.close if calculator is None else None
    return Tool(
        spec=spec,
        handler=handler,
        slash_argument="expression",
        timeout=TOOL_TIMEOUT,
        max_argument_chars=MAX_ARGUMENT,
        close=owned,
    )
