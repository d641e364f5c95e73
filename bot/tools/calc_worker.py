"""The calculator's worker process: builds sympy objects from a validated tree and formats results.

Started as ``python -I -m yanray.bot.tools.calc_worker``; speaks one JSON object per line
on stdin/stdout (no pickle). sympy is imported only here. The rules and limits it
enforces (again, on the real values) are in `calc_rules`.
"""

from __future__ import annotations

import ast
import json
import math
import re
import sys
from fractions import Fraction
from typing import Any

from yanray.bot.tools.calc_rules import (  # the worker repeats every rule on the real values
    _FLOAT,
    FUNCTIONS,
    MAX_BITS,
    MAX_DIFF_ORDER,
    MAX_N_DIGITS,
    MAX_OUTPUT,
    MAX_RESULT_DIGITS,
    MAX_SYMBOLIC_EXPONENT,
    SYMBOLS,
    CalcError,
    _bits,
    _digits_text,
    check_factorial,
    check_power,
    one_line,
    validate,
)

# --- evaluation (worker process only) ----------------------------------------------------------

_ALIASES = {"ln": "log", "abs": "Abs", "min": "Min", "max": "Max"}


class _Builder:
    """Builds sympy objects from a validated tree, repeating each bound on the real values."""

    def __init__(self) -> None:
        import sympy

        self.sp = sympy
        self.names: dict[str, Any] = {
            "pi": sympy.pi,
            "E": sympy.E,
            "e": sympy.E,
            "I": sympy.I,
            "oo": sympy.oo,
            "inf": sympy.oo,
            **{name: sympy.Symbol(name) for name in SYMBOLS},
        }
        # every name comes from the fixed FUNCTIONS table, never from the text
        self.functions: dict[str, Any] = {
            name: getattr(sympy, _ALIASES.get(name, name)) for name in FUNCTIONS
        }

    def evaluate(self, text: str) -> str:
        return self.format(self.build(validate(text).body))

    def build(self, node: ast.AST) -> Any:
        sp = self.sp
        if isinstance(node, ast.Constant):
            if isinstance(node.value, int):
                return sp.Integer(node.value)
            if isinstance(node.value, float):
                return sp.Float(node.value)
            if isinstance(node.value, complex):
                return self._number(node.value.real) + self._number(node.value.imag) * sp.I
        if isinstance(node, ast.Name):
            return self.names[node.id]
        if isinstance(node, ast.UnaryOp):
            operand = self._expr(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp):
            return self._binop(node.op, self._expr(node.left), self._expr(node.right))
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.Tuple):
            return tuple(self._expr(elt) for elt in node.elts)
        if isinstance(node, ast.List):
            return [self._expr(elt) for elt in node.elts]
        raise CalcError(f"{type(node).__name__} is not allowed")  # validate() already refused it

    def _number(self, value: float) -> Any:
        return self.sp.Integer(int(value)) if value.is_integer() else self.sp.Float(value)

    def _expr(self, node: ast.AST) -> Any:
        value = self.build(node)
        if not isinstance(value, self.sp.Basic):
            raise CalcError("a list (such as an answer of solve) cannot be used here")
        return value

    def _binop(self, op: ast.operator, left: Any, right: Any) -> Any:
        sp = self.sp
        if isinstance(op, ast.Pow):
            self._check_power(left, right)
            return left**right
        if isinstance(op, ast.Div | ast.Mod | ast.FloorDiv) and right.is_zero:
            raise CalcError("division by zero")
        if left.is_Rational and right.is_Rational:
            bits = _bits(int(left.p), int(left.q)) + _bits(int(right.p), int(right.q))
            if bits > MAX_BITS:
                raise CalcError(
                    f"the number would have {_digits_text(bits)} digits (limit {MAX_RESULT_DIGITS:,})"
                )
        if isinstance(op, ast.Add):
            return left + right
        if isinstance(op, ast.Sub):
            return left - right
        if isinstance(op, ast.Mult):
            return left * right
        if isinstance(op, ast.Div):
            return left / right
        if isinstance(op, ast.Mod):
            return sp.Mod(left, right)
        return sp.floor(left / right)

    def _check_power(self, base: Any, exponent: Any) -> None:
        if not exponent.is_Rational:
            return
        magnitude = abs(Fraction(int(exponent.p), int(exponent.q)))
        if base.free_symbols:
            if magnitude > MAX_SYMBOLIC_EXPONENT:
                raise CalcError(
                    f"exponent too large for an expression with symbols (limit {MAX_SYMBOLIC_EXPONENT})"
                )
        elif base.is_Rational:
            check_power(_bits(int(base.p), int(base.q)), magnitude)
        elif magnitude > MAX_SYMBOLIC_EXPONENT and base.is_number:
            # sqrt(2)**20000 collapses to an exact 2**10000, so estimate from the base's size
            size = abs(complex(base.evalf(15)))
            if 0 < size < math.inf:
                check_power(abs(math.log2(size)), magnitude)

    def _call(self, node: ast.Call) -> Any:
        sp = self.sp
        name = node.func.id  # type: ignore[attr-defined]
        args = [
            self.build(arg) if isinstance(arg, ast.Tuple | ast.List) else self._expr(arg) for arg in node.args
        ]
        if name in ("factorial", "binomial") and args[0].is_Integer:
            check_factorial(int(args[0]))
        if name == "diff":
            orders = [arg[-1] if isinstance(arg, tuple | list) else arg for arg in args[1:]]
            if any(order.is_Integer and order > MAX_DIFF_ORDER for order in orders):
                raise CalcError(f"derivative order too large (limit {MAX_DIFF_ORDER})")
        if name == "N" and len(args) == 2:
            if not (args[1].is_Integer and 1 <= args[1] <= MAX_N_DIGITS):
                raise CalcError(f"N() takes 1 to {MAX_N_DIGITS} digits")
            return sp.N(args[0], int(args[1]))
        if name == "Sum":
            return sp.Sum(*args).doit()
        return self.functions[name](*args)

    def format(self, value: Any) -> str:
        sp = self.sp
        if isinstance(value, sp.Basic) and (value.has(sp.zoo) or value.has(sp.nan)):
            raise CalcError("the result is undefined (division by zero, a pole, or something like oo - oo)")
        if isinstance(value, sp.Rational):
            digits = _bits(int(value.p), int(value.q)) * math.log10(2)
            if digits > MAX_OUTPUT:
                raise CalcError(f"result too long ({math.floor(digits) + 1} digits)")
        try:
            exact = _clean(sp.sstr(value))
        except ValueError:  # Python refuses to print an int of over 4300 digits
            raise CalcError("result too long") from None
        if len(exact) > MAX_OUTPUT:
            raise CalcError(f"result too long ({len(exact)} characters)")
        approx = self._approx(value)
        if approx is not None and approx != exact and len(exact) + len(approx) + 3 <= MAX_OUTPUT:
            return f"{exact} ≈ {approx}"
        return exact

    def _approx(self, value: Any) -> str | None:
        items = value if isinstance(value, list | tuple) else [value]
        sp = self.sp
        if not items or not all(isinstance(item, sp.Basic) and item.is_number for item in items):
            return None
        if all(item.is_Integer or item.is_Float for item in items):
            return None
        decimals = [item.evalf(15) for item in items]
        if not all(atom.is_Number or atom == sp.I for item in decimals for atom in item.atoms()):
            return None
        return _clean(sp.sstr(decimals if isinstance(value, list | tuple) else decimals[0]))


def _clean(text: str) -> str:
    """Drop a float's trailing zeros: 48.7500000000000 -> 48.75, 3.00000000000000 -> 3."""

    def strip(match: re.Match[str]) -> str:
        fraction = match[2].rstrip("0")
        return f"{match[1]}.{fraction}" if fraction else match[1]

    return _FLOAT.sub(strip, text)


def _set_limits(memory_bytes: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # the worker writes only to its pipes
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _set_cpu_budget(seconds: float) -> None:
    """RLIMIT_CPU counts the process's whole life, so each call moves it to used + budget."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + seconds) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _load_plotting() -> None:
    """Import numpy and matplotlib (Agg) now, before the first plot's time limit starts."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends import backend_agg  # noqa: F401
    from matplotlib.figure import Figure

    Figure()  # loads the font manager


def _answer(builder: _Builder, request: dict[str, Any]) -> dict[str, Any]:
    if "plot" in request:
        from yanray.bot.tools.plot_draw import draw

        return {"ok": True, **draw(builder, str(request["plot"]))}
    return {"ok": True, "text": builder.evaluate(str(request["expression"]))}


def main(argv: list[str]) -> int:
    """Serve requests `{"id", "expression" or "plot", "cpu"}` with replies `{"id", "ok", "text",
    "restart"}` (a plot's also carry "image", "shows" and "caption"). argv: the memory limit in
    bytes, then "plot" to load the plotting libraries at start."""
    import os
    import signal
    import warnings

    # a write past RLIMIT_FSIZE fails with EFBIG instead of killing the worker
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # a stray print from any library must not corrupt the protocol
    sys.stdout = sys.stderr
    warnings.simplefilter("ignore")
    if "plot" in argv[1:]:
        # before the limits, while no request has been read: matplotlib may write its font
        # cache once (under RLIMIT_FSIZE 0 it would leave an empty file and rebuild each start)
        _load_plotting()
    _set_limits(int(argv[0]) if argv else 512 * 2**20)
    builder = _Builder()
    protocol.write('{"ready": true}\n')
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        _set_cpu_budget(float(request["cpu"]))
        restart = False
        try:
            reply = _answer(builder, request)
        except CalcError as exc:
            reply = {"ok": False, "text": str(exc)}
        except (MemoryError, SystemError):  # under RLIMIT_AS a failed C allocation can surface as either
            reply, restart = {"ok": False, "text": "the calculation needs too much memory"}, True
        except RecursionError:
            reply = {"ok": False, "text": "the calculation is too deeply nested"}
        except ZeroDivisionError:
            reply = {"ok": False, "text": "division by zero"}
        except Exception as exc:  # the process boundary: whatever sympy raises becomes one line
            reply = {"ok": False, "text": f"sympy could not calculate this ({type(exc).__name__}: {exc})"}
        reply.update(id=request["id"], text=one_line(str(reply["text"])), restart=restart)
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()
        if restart:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
