"""The calculator tool: right answers on good input, one quick line on hostile input, real limits.

Everything runs through the real worker process (one warm `Calculator` shared by the
module, as the bot shares one); the timeout and cancellation tests kill it on purpose
and check that the next call gets a fresh one.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scripted_engine import ScriptedEngine
from tests.waiting import until
from yanray.adapters.console import ConsoleAdapter
from yanray.bot.errors import ToolError
from yanray.bot.toolloop import ToolLoop
from yanray.bot.tools import build_tools
from yanray.bot.tools.calc_rules import CalcError
from yanray.bot.tools.calculator import Calculator, calculate, calculator_tool
from yanray.engine.base import ChatMessage, GenerateOptions, Generation, ToolCall

#: slow enough to pass any limit used here: about 10^8 terms
SLOW = "expand((x+y+z+1)**1000)"


@pytest.fixture(scope="module")
def calc() -> Iterator[Calculator]:
    calculator = Calculator(timeout=5.0)
    asyncio.run(calculator.calculate("1"))  # start the worker once, outside any test's time
    yield calculator
    calculator.close()


def _pid(calculator: Calculator) -> int | None:
    proc = calculator._worker._proc
    return None if proc is None or proc.poll() is not None else proc.pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1+2*3", "7"),
        ("6.5*7.5", "48.75"),
        ("0.1+0.2", "0.3"),
        ("2^10", "1024"),
        ("x^2 + 2*x^2", "3*x**2"),
        ("7 // 2 + 7 % 4", "6"),
        ("1/3", "1/3 ≈ 0.333333333333333"),
        ("sqrt(2)", "sqrt(2) ≈ 1.4142135623731"),
        ("pi", "pi ≈ 3.14159265358979"),
        ("integrate(x**2, x)", "x**3/3"),
        ("integrate(sin(x), (x, 0, pi))", "2"),
        ("solve(x**2-4, x)", "[-2, 2]"),
        ("solve(Eq(x**2, 2), x)", "[-sqrt(2), sqrt(2)] ≈ [-1.4142135623731, 1.4142135623731]"),
        ("solve([x+y-3, x-y-1], [x, y])", "{x: 2, y: 1}"),
        ("diff(sin(x), x)", "cos(x)"),
        ("diff(x**3, x, 2)", "6*x"),
        ("factorial(20)", "2432902008176640000"),
        ("binomial(10, 3) + gcd(12, 18) + lcm(4, 6)", "138"),
        ("limit(sin(x)/x, x, 0)", "1"),
        ("Sum(1/n**2, (n, 1, oo))", "pi**2/6 ≈ 1.64493406684823"),
        ("simplify(sin(x)**2 + cos(x)**2)", "1"),
        ("factor(x**2 - 1)", "(x - 1)*(x + 1)"),
        ("log(8, 2) + ln(E)", "4"),
        ("N(pi, 30)", "3.14159265358979323846264338328"),
        ("2 × 3 − 1", "5"),
        ("2**-3", "1/8 ≈ 0.125"),
    ],
)
async def test_good_input_gives_exact_result_and_decimal(
    calc: Calculator, expression: str, expected: str
) -> None:
    assert await calc.calculate(expression) == expected


#: hostile text and the line it is refused with (also used by the plot tool's tests)
HOSTILE = [
    ("__import__('os')", "unknown function '__import__'"),
    ("().__class__", "attribute access"),
    ("().__class__.__bases__[0].__subclasses__()", "attribute access"),
    ("x.real", "attribute access"),
    ("x[0]", "indexing"),
    ("lambda: 1", "lambda"),
    ("[i for i in (1, 2)]", "comprehensions"),
    ('"a"*10', "strings are not allowed"),
    ("b'1'", "bytes are not allowed"),
    ("f'{1}'", "f-strings"),
    ("open('/etc/passwd')", "unknown function 'open'"),
    ("exec('1')", "unknown function 'exec'"),
    ("eval('1')", "unknown function 'eval'"),
    ("getattr(x, 'real')", "unknown function 'getattr'"),
    ("Symbol('x')", "unknown function 'Symbol'"),
    ("sympify('1')", "unknown function 'sympify'"),
    ("S('1')", "unknown function 'S'"),
    ("__builtins__", "unknown name '__builtins__'"),
    ("sqrt(x=2)", "keyword arguments are not allowed"),
    ("sqrt(*(4,))", "'*' unpacking"),
    ("(y := 2)", "':='"),
    ("x = 2", "'=' is not allowed"),
    ("x < 1", "comparisons"),
    ("x and y", "'and'/'or'"),
    ("1 if x else 2", "'if ... else'"),
    ("~1", "'~' operator"),
    ("1 << 100000", "'<<' operator"),
    ("sqrt", "is a function"),
    ("True", "True is not allowed"),
    ("(1, 2)", "lists and tuples are only allowed"),
    ("ｐｉ", "U+FF50"),
    ("１+１", "U+FF11"),
    ("sqrt(\u0430)", "U+0430"),  # a Cyrillic look-alike of "a"
    ("x\u200b+1", "U+200B"),
    ("1\x002", "U+0000"),
    ("1\nimport os", "single line"),
    ("1;import os", "not a valid expression"),
    ("1 # comment", "comments"),
    ("", "empty expression"),
    ("    ", "empty expression"),
    ("1" * 200, "number literal too long"),
    ("1e999", "number literal too large"),
    ("9**9**9**9", "digits (limit 100,000)"),
    ("10**10**10", "digits (limit 100,000)"),
    ("2**(2**(2**(2**(2**5))))", "digits (limit 100,000)"),
    ("factorial(10**7)", "factorial/binomial argument too large"),
    ("factorial(factorial(100))", "factorial/binomial argument too large"),
    ("binomial(10**6, 3)", "factorial/binomial argument too large"),
    ("diff(sin(x), x, 10**6)", "derivative order too large"),
    ("N(pi, 10**6)", "N() takes 1 to 1000 digits"),
    ("expand((x+1)**100000)", "exponent too large for an expression with symbols"),
    ("(" * 1000 + "1" + ")" * 1000, "expression too long"),
    ("(" * 5000 + ")" * 5000, "expression too long"),
    ("1+" * 5000 + "1", "expression too long"),
    ("(" * 40 + "1" + ")" * 40, "too deeply nested"),
    ("-" * 400 + "1", "too deeply nested"),
    ("*".join(["(1+1+1+1)"] * 45), "too complex"),
    ("1/0", "division by zero"),
    ("x % 0", "division by zero"),
    # these pass the parent's static check and are refused by the worker on real values
    ("factorial(factorial(3000))", "factorial/binomial argument too large"),
    ("sqrt(10**99)**10**5", "digits (limit 100,000)"),
    ("log(0)", "the result is undefined"),
    ("solve(x**2-4, x) + 1", "cannot be used here"),
    ("factorial(10000)", "result too long (35660 digits)"),
    ("2**100000", "result too long (30103 digits)"),
]


@pytest.mark.parametrize(("expression", "message"), HOSTILE)
async def test_hostile_input_gives_one_quick_line(calc: Calculator, expression: str, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(ToolError) as caught:
        await calc.calculate(expression)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text and len(text) <= 200
    assert time.monotonic() - started < 4.0  # refused, not left to run into the 5 s limit


async def test_code_execution_attempts_leave_no_trace(calc: Calculator, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    attempts = [
        f"open('{target}', 'w')",
        f"__import__('os').system('touch {target}')",
        f"().__class__.__base__.__subclasses__()[0]('{target}')",
        "exec(\"open('" + str(target) + "', 'w')\")",
    ]
    for attempt in attempts:
        with pytest.raises(ToolError):
            await calc.calculate(attempt)
    assert not target.exists()


async def test_parent_refuses_without_starting_a_worker() -> None:
    calculator = Calculator()
    with pytest.raises(ToolError, match="attribute access"):
        await calculator.calculate("().__class__")
    assert calculator._worker._proc is None
    calculator.close()


def test_worker_revalidates_what_it_is_sent(calc: Calculator) -> None:
    """The worker does not trust the parent: text sent to it directly is checked again."""
    with pytest.raises(CalcError, match="unknown function '__import__'"):
        calc._worker.run("__import__('os')", 2.0, threading.Event())
    with pytest.raises(CalcError, match="attribute access"):
        calc._worker.run("().__class__.__bases__[0].__subclasses__()", 2.0, threading.Event())
    with pytest.raises(CalcError, match="digits"):
        calc._worker.run("9**9**9**9", 2.0, threading.Event())


def test_worker_runs_under_memory_cpu_and_file_limits(calc: Calculator) -> None:
    pid = _pid(calc)
    assert pid is not None
    limits = Path(f"/proc/{pid}/limits").read_text()
    address_space = next(line for line in limits.splitlines() if line.startswith("Max address space"))
    assert address_space.split()[3:5] == [str(512 * 2**20)] * 2
    file_size = next(line for line in limits.splitlines() if line.startswith("Max file size"))
    assert file_size.split()[3:5] == ["0", "0"]
    cpu = next(line for line in limits.splitlines() if line.startswith("Max cpu time"))
    assert cpu.split()[3] != "unlimited"


@pytest.mark.slow
async def test_timeout_kills_the_worker_and_the_next_call_works(calc: Calculator) -> None:
    old = _pid(calc)
    assert old is not None
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"^calculation took too long \(limit 1 s\)$"):
        await calc.calculate(SLOW, timeout=1.0)
    assert time.monotonic() - started < 3.0
    assert not _alive(old)
    assert await calc.calculate("6.5*7.5") == "48.75"
    assert _pid(calc) not in (None, old)


@pytest.mark.slow
async def test_memory_limit_stops_a_runaway_expansion_cleanly() -> None:
    calculator = Calculator(memory=160 * 2**20)  # sympy needs ~60 MiB; the expansion wants gigabytes
    try:
        with pytest.raises(ToolError, match="too much memory"):
            await calculator.calculate(SLOW, timeout=30.0)
        assert await calculator.calculate("factorial(5)") == "120"
    finally:
        calculator.close()


@pytest.mark.slow
async def test_cancelling_a_call_kills_its_worker(calc: Calculator) -> None:
    await calc.calculate("1")
    old = _pid(calc)
    assert old is not None
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await calc.calculate(SLOW)
    await until(lambda: not _alive(old), within=5, what=f"worker {old} is killed")
    assert await calc.calculate("2^10") == "1024"


async def test_concurrent_calls_each_get_their_own_answer(calc: Calculator) -> None:
    answers = await asyncio.gather(*(calc.calculate(f"{i}*{i}") for i in range(8)))
    assert answers == [str(i * i) for i in range(8)]


async def test_tool_spec_and_handler(calc: Calculator) -> None:
    tool = calculator_tool(calc)
    assert tool.name == "calculate"
    assert tool.spec.usage == "/calculate <expression>"
    assert tool.slash_argument == "expression"
    assert tool.spec.parameters["required"] == ["expression"]
    assert await tool.handler({"expression": "6.5*7.5"}) == "48.75"
    for bad in ({}, {"expression": 42}, {"expr": "1+1"}):
        with pytest.raises(ToolError, match='needs an "expression" string'):
            await tool.handler(bad)


def test_registry_builds_the_calculator_without_starting_it() -> None:
    tools = build_tools(["calculate"])
    assert list(tools) == ["calculate"]


@pytest.mark.slow
async def test_one_shot_calculate_without_a_shared_worker() -> None:
    assert await calculate("sqrt(8)") == "2*sqrt(2) ≈ 2.82842712474619"
    with pytest.raises(ToolError, match="division by zero"):
        await calculate("1/0")


async def test_a_native_chatglm3_calculate_call_gets_the_result(calc: Calculator) -> None:
    from tests.test_toolloop import NativeSession

    call = ToolCall("calculate", {"expression": "6.5*7.5"}, stored='tool_call(expression="6.5*7.5")')
    session = NativeSession([Generation("", "tool_call", call), Generation("It is 48.75.", "stop")])
    loop = ToolLoop(tools={"calculate": calculator_tool(calc)}, max_rounds=2)
    result = await loop.run(session, options=GenerateOptions)  # type: ignore[arg-type]
    assert session.appended == [ChatMessage("observation", "48.75", "calculate")]
    assert result.visible == "It is 48.75."


async def test_calculate_through_the_tool_loop_and_the_console(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["Let me compute.\n/calculate 6.5*7.5\n", "6.5 × 7.5 = 48.75."])
    core = await core_factory(make_settings(tools=["calculate"]), engine)
    out = io.StringIO()
    await ConsoleAdapter(
        dispatcher=core.dispatcher, stdin=io.StringIO("What is 6.5 times 7.5?\n"), stdout=out
    ).converse()
    assert out.getvalue() == "Let me compute.\n6.5 × 7.5 = 48.75.\n\n"
    assert "/calculate <expression> - " in engine.prompts[0][0].content
    assert engine.prompts[-1][-1] == ChatMessage("observation", "48.75", "calculate")
