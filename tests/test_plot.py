"""The plot tool: a real PNG of the right size from the calculator's sandboxed worker, hostile
text refused the way the calculator refuses it, one line for what cannot be drawn, and the
picture shown to the user through the tool loop (the model is told it was sent).

Everything runs through the real worker process (one warm `Calculator` made with
`plot=True`, shared by the module, as the bot shares one between calculate and plot).
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.recording import RecordingStream
from tests.scripted_engine import ScriptedEngine
from tests.test_calculator import HOSTILE
from tests.test_toolloop import NativeSession
from yanray.adapters.console import ConsoleAdapter
from yanray.bot.errors import ToolError
from yanray.bot.toolloop import ToolLoop
from yanray.bot.tools import ToolResult, build_tools
from yanray.bot.tools.calc_rules import CalcError
from yanray.bot.tools.calculator import Calculator
from yanray.bot.tools.plot import plot, plot_tool
from yanray.bot.tools.plot_rules import HEIGHT, SAMPLES, WIDTH, split_argument
from yanray.bot.types import Image, Incoming
from yanray.engine.base import ChatMessage, GenerateOptions, Generation, ToolCall

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SENT_SIN = "Sent the plot of sin(x) for x from -5 to 5 to the user."


@pytest.fixture(scope="module")
def calc() -> Iterator[Calculator]:
    calculator = Calculator(timeout=5.0, plot=True)
    asyncio.run(calculator.calculate("1"))  # start the worker (and load matplotlib) once
    yield calculator
    calculator.close()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def incoming(text: str) -> Incoming:
    return Incoming(platform="test", chat_id="c", user_id="u", display_name="U", text=text)


# -- the argument ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("sin(x)", ("sin(x)", "-10", "10")),
        ("sin(x) x from -5 to 5", ("sin(x)", "-5", "5")),
        ("sin(x), x from 0 to 2*pi", ("sin(x)", "0", "2*pi")),
        ("sin(x) for x from -pi to pi", ("sin(x)", "-pi", "pi")),
        ("  x**2 - 1   x  from  -3\tto 3 ", ("x**2 - 1", "-3", "3")),
        ("2*x from 0 to 1", ("2*x", "0", "1")),
        ("x x from 0 to 1", ("x", "0", "1")),
        ("x from 0 to 1", ("x", "0", "1")),
    ],
)
def test_the_argument_names_an_expression_and_a_range(argument: str, expected: tuple[str, str, str]) -> None:
    assert split_argument(argument) == expected


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("sin(x) x from -5", "write the range as: x from -5 to 5"),
        ("sin(x) x from to 5", "write the range as"),
        ("x from " + "1" * 50 + " to 2", "bound of the x-range is too long"),
        ("sin(x)" + " " * 700, "expression too long (706 characters, limit 600)"),
        ("sin(x)\nx from 0 to 1", "single line"),
    ],
)
def test_a_malformed_argument_is_one_line(argument: str, message: str) -> None:
    with pytest.raises(CalcError, match=message.replace("(", r"\(").replace(")", r"\)")):
        split_argument(argument)


def test_a_long_argument_is_refused_in_linear_time() -> None:
    """100 KB of " from " or spaces: refused by length before it is split."""
    for text in (" from " * 20_000, " " * 100_000 + "x", "x from 1 to " * 10_000):
        started = time.perf_counter()
        with pytest.raises(CalcError, match="expression too long"):
            split_argument(text)
        assert time.perf_counter() - started < 1.0


# -- drawing -------------------------------------------------------------------------------------


async def test_sin_is_a_png_of_the_right_size(calc: Calculator) -> None:
    result = await plot(calc, "sin(x) x from -5 to 5")
    assert isinstance(result, ToolResult)
    (image,) = result.images
    assert png_size(image.data) == (WIDTH, HEIGHT)
    assert image.name == "plot.png" and image.caption == "y = sin(x), x from -5 to 5"
    assert result.shows == ("the plot of sin(x) for x from -5 to 5",)
    assert result.text == ""  # every point drawn: nothing left out


async def test_the_plot_shows_the_curve(calc: Calculator) -> None:
    """The PNG is a real drawing: x**2 from 0 to 1 and 1 - x**2 differ, both decode."""
    matplotlib_image = pytest.importorskip("matplotlib.image")
    first = (await plot(calc, "x**2 x from 0 to 1")).images[0].data
    second = (await plot(calc, "1 - x**2 x from 0 to 1")).images[0].data
    assert first != second
    pixels = matplotlib_image.imread(io.BytesIO(first))
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    assert pixels[..., :3].min() < 0.5  # not a blank canvas


@pytest.mark.parametrize(
    ("argument", "note"),
    [
        ("log(x) x from -1 to 1", f"Left out 300 of {SAMPLES} points where the value is not real."),
        ("1/x x from 0 to 1", f"Left out 1 of {SAMPLES} points where it is undefined or infinite."),
    ],
)
async def test_points_that_cannot_be_drawn_are_left_out_and_said(
    calc: Calculator, argument: str, note: str
) -> None:
    result = await plot(calc, argument)
    assert result.text == note
    assert png_size(result.images[0].data) == (WIDTH, HEIGHT)


async def test_functions_outside_numpys_table_are_drawn_point_by_point(calc: Calculator) -> None:
    result = await plot(calc, "integrate(exp(-x**2), x) x from -2 to 2")  # sqrt(pi)*erf(x)/2
    assert png_size(result.images[0].data) == (WIDTH, HEIGHT) and result.text == ""


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("5", "5 does not depend on x (it is 5); nothing to plot"),
        ("x - x", "x - x does not depend on x (it is 0); nothing to plot"),
        ("x*y", "use x as the only variable (found y)"),
        ("sin(x) x from 5 to -5", "the x-range is reversed (from 5 to -5); write x from -5 to 5"),
        ("sin(x) x from 2 to 2", "the x-range is empty (from 2 to 2)"),
        ("sin(x) x from 0 to 10**9", "the x-range is too large (x may run from -1,000,000 to 1,000,000)"),
        ("sin(x) x from -oo to oo", "the x-range must be finite numbers"),
        ("sin(x) x from 1000 to 1000.0000001", "is too narrow to draw"),
        ("sin(x) x from 0 to x", "the x-range bounds must be numbers"),
        ("sin(x) x from 0 to I", "the x-range bounds must be real numbers"),
        ("sqrt(x) x from -5 to -1", "has no real values (complex results only); nothing to plot"),
        ("0**x x from -2 to -1", "is undefined or infinite everywhere; nothing to plot"),
        ("solve(x**2-4, x)", "cannot be plotted"),
        ("integrate(x**x, x)", "sympy left integrate(x**x, x) unevaluated (no closed form); nothing to plot"),
    ],
)
async def test_what_cannot_be_drawn_is_one_line(calc: Calculator, argument: str, message: str) -> None:
    with pytest.raises(ToolError) as caught:
        await plot(calc, argument)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("expression", "message"), HOSTILE)
async def test_hostile_plot_expressions_fail_as_the_calculators_do(
    calc: Calculator, expression: str, message: str
) -> None:
    started = time.monotonic()
    with pytest.raises(ToolError) as caught:
        await plot(calc, expression)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text and len(text) <= 200
    assert time.monotonic() - started < 4.0


async def test_hostile_range_bounds_are_refused_too(calc: Calculator, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    for bound, message in [
        (f"__import__('os').system('touch {target}')", "too long"),
        ("().__class__", "attribute access"),
        ("9**9**9**9", "digits (limit 100,000)"),
        ("open('/etc/x')", "unknown function 'open'"),
    ]:
        with pytest.raises(ToolError, match=message.replace("(", r"\(").replace(")", r"\)")):
            await plot(calc, f"sin(x) x from 0 to {bound}")
    assert not target.exists()


def test_the_plot_worker_runs_under_the_calculators_limits(calc: Calculator) -> None:
    """matplotlib is loaded before the limits are set; every plot is drawn under them."""
    proc = calc._worker._proc
    assert proc is not None and proc.poll() is None
    limits = Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
    address_space = next(line for line in limits if line.startswith("Max address space"))
    assert address_space.split()[3:5] == [str(512 * 2**20)] * 2
    file_size = next(line for line in limits if line.startswith("Max file size"))
    assert file_size.split()[3:5] == ["0", "0"]
    cpu = next(line for line in limits if line.startswith("Max cpu time"))
    assert cpu.split()[3] != "unlimited"


def test_the_worker_checks_a_plot_it_is_sent_again(calc: Calculator) -> None:
    import threading

    with pytest.raises(CalcError, match="unknown function '__import__'"):
        calc._worker.call({"plot": "__import__('os') x from 0 to 1"}, 2.0, threading.Event())
    with pytest.raises(CalcError, match="attribute access"):
        calc._worker.call({"plot": "sin(x) x from 0 to ().__class__"}, 2.0, threading.Event())


def test_the_plot_tool_is_listed_only_when_enabled() -> None:
    tools = build_tools(["calculate", "plot"])
    try:
        assert list(tools) == ["calculate", "plot"]
        spec = tools["plot"].spec
        assert spec.usage == "/plot <expression> [x from a to b]"
        assert "/plot sin(x)/x x from -20 to 20" in spec.description
        assert spec.parameters["required"] == ["expression"]
        assert "plot" not in build_tools(["calculate"])
    finally:
        for tool in tools.values():
            if tool.close is not None:
                tool.close()


# -- through the tool loop and the core --------------------------------------------------------


async def test_a_slash_plot_reaches_the_user_and_the_model_hears_it_was_sent(
    make_settings, core_factory
) -> None:
    engine = ScriptedEngine(["Here is the graph.\n/plot sin(x) x from -5 to 5\n", "It is a wave."])
    core = await core_factory(make_settings(tools=["calculate", "plot"]), engine)
    out = RecordingStream()
    await core.dispatcher.handle(incoming("draw sin"), out)
    assert await out.wait(20) == "Here is the graph.\nIt is a wave."
    (image,) = out.of("image")
    assert png_size(image.data) == (WIDTH, HEIGHT)
    kinds = [kind for kind, _ in out.events]
    assert kinds.index("image") < kinds.index("finish")
    # the text before the call was shown before the picture
    before = [value for kind, value in out.events[: kinds.index("image")] if kind == "progress"]
    assert before and before[-1].startswith("Here is the graph.")
    observation = engine.prompts[-1][-1]
    assert observation == ChatMessage("observation", SENT_SIN, "plot")
    system = engine.prompts[0][0].content
    assert "/plot <expression> [x from a to b]" in system


async def test_a_refused_picture_is_one_line_and_the_answer_is_kept(
    make_settings, core_factory, caplog
) -> None:
    engine = ScriptedEngine(["/plot sin(x) x from -5 to 5\n", "See the picture above."])
    core = await core_factory(make_settings(tools=["plot"]), engine)
    out = RecordingStream()
    out.refuse_images = True
    await core.dispatcher.handle(incoming("draw sin"), out)
    answer = await out.wait(20)
    assert answer == (
        "See the picture above.\n\n[A picture could not be sent: the chat service did not take it.]"
    )
    observation = engine.prompts[-1][-1].content
    assert observation == (
        "Could not send the plot of sin(x) for x from -5 to 5 to the user: "
        "the chat service did not take the picture."
    )
    assert any("an image could not be sent" in r.getMessage() for r in caplog.records)


async def test_a_native_plot_call_with_a_range() -> None:
    """ChatGLM3's own dialect: tool_call(expression=..., x_from=..., x_to=...)."""

    call = ToolCall("plot", {"expression": "sin(x)", "x_from": -5, "x_to": 5}, "plot\n tool_call(...)")
    session = NativeSession(
        [Generation(text="", finish="tool_call", tool_call=call), Generation(text="Done.", finish="stop")]
    )
    shown: list[bytes] = []

    async def on_images(images: Sequence[Image]) -> None:
        shown.extend(image.data for image in images)

    tool = plot_tool()
    try:
        loop = ToolLoop(tools={"plot": tool}, max_rounds=2)
        result = await loop.run(session, options=GenerateOptions, on_images=on_images)
    finally:
        assert tool.close is not None
        tool.close()
    assert session.appended == [ChatMessage("observation", SENT_SIN, "plot")]
    assert result.visible == "Done."
    assert len(shown) == 1 and png_size(shown[0]) == (WIDTH, HEIGHT)


async def test_the_terminal_prints_where_the_picture_was_saved(
    make_settings, core_factory, tmp_path: Path
) -> None:
    engine = ScriptedEngine(["Drawing it.\n/plot x**2 x from -2 to 2\n", "A parabola."])
    settings = make_settings(tools=["plot"])
    core = await core_factory(settings, engine, start=False)
    stdin, stdout = io.StringIO("plot x squared\n"), io.StringIO()
    console = ConsoleAdapter(
        dispatcher=core.dispatcher, stdin=stdin, stdout=stdout, images=tmp_path / "images"
    )
    core.add_adapter(console)
    await core.start()
    await asyncio.wait_for(console.converse(), 30)
    printed = stdout.getvalue()
    lines = printed.splitlines()
    assert lines[0] == "Drawing it."
    assert lines[1].startswith("[y = x**2, x from -2 to 2: ") and lines[1].endswith(".png]")
    path = Path(lines[1].rsplit(": ", 1)[1][:-1])
    assert path.parent == (tmp_path / "images").resolve()
    assert png_size(await asyncio.to_thread(path.read_bytes)) == (WIDTH, HEIGHT)
    assert printed.endswith("A parabola.\n\n")
    assert engine.prompts[-1][-1].content == "Sent the plot of x**2 for x from -2 to 2 to the user."
