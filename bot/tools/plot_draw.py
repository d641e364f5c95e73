"""The plot, drawn in the calculator's worker process: sample an expression, draw a PNG.

Imported only by `calc_worker` (numpy and matplotlib live in that sandboxed process, under
its memory, CPU and file limits). The expression and the range's bounds are validated
again here and built by the calculator's `_Builder` from the fixed tables: no string ever
reaches `eval`, `sympify` or `lambdify`. The built sympy expression is evaluated over the
samples by walking its tree with numpy's complex ufuncs (a table of sympy classes); a
part the table does not know (erf from an integral, say) is evaluated point by point with
`evalf`, so every result of the calculator can be drawn.

What cannot be drawn is one line for the model: an expression without x (with its value),
other variables, a range that is reversed, empty, too large or too narrow, and an
expression with no real finite value anywhere on the range. Points where the value is
not real (sqrt of a negative) or not finite (a pole) are left out of the line, and the
observation says how many. Near a pole the y-axis is cut to where most of the curve
lies, and the line is broken where it jumps across that window.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
figure state); text is drawn without mathtext (`parse_math=False`).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from typing import Any

from yanray.bot.tools.calc_rules import CalcError, validate
from yanray.bot.tools.plot_rules import (
    DPI,
    HEIGHT,
    MAX_PNG_BYTES,
    SAMPLES,
    WIDTH,
    check_range,
    shorten,
    split_argument,
)

#: |imaginary part| up to this fraction of the value (or absolutely, near 0) counts as real
REAL_TOLERANCE = 1e-9


def _ufuncs(sp: Any, np: Any) -> dict[Any, Callable[..., Any]]:
    def real(f: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *zs: f(*(z.real for z in zs)) + 0j

    def scalar(f: Callable[[float], float]) -> Callable[..., Any]:
        """A real function of `math`, point by point: NaN where the argument is not real or
        `math` refuses it (a pole of gamma)."""

        def one(z: complex) -> complex:
            if z.imag:
                return complex("nan")
            try:
                return complex(f(z.real))
            except (ValueError, OverflowError):
                return complex("nan")

        return lambda z: np.array([one(complex(v)) for v in z], dtype=complex)

    return {
        sp.sin: np.sin, sp.cos: np.cos, sp.tan: np.tan,
        sp.cot: lambda z: 1 / np.tan(z), sp.sec: lambda z: 1 / np.cos(z), sp.csc: lambda z: 1 / np.sin(z),
        sp.asin: np.arcsin, sp.acos: np.arccos, sp.atan: np.arctan,
        sp.sinh: np.sinh, sp.cosh: np.cosh, sp.tanh: np.tanh,
        sp.asinh: np.arcsinh, sp.acosh: np.arccosh, sp.atanh: np.arctanh,
        sp.exp: np.exp, sp.log: np.log, sp.Abs: lambda z: np.abs(z) + 0j,
        sp.re: lambda z: z.real + 0j, sp.im: lambda z: z.imag + 0j, sp.conjugate: np.conj,
        sp.arg: lambda z: np.angle(z) + 0j,
        sp.sign: lambda z: np.where(z == 0, 0, z / np.where(z == 0, 1, np.abs(z))),
        sp.floor: lambda z: np.floor(z.real) + 1j * np.floor(z.imag),
        sp.ceiling: lambda z: np.ceil(z.real) + 1j * np.ceil(z.imag),
        sp.Mod: real(np.mod), sp.atan2: real(np.arctan2),
        sp.Min: real(lambda *xs: np.minimum.reduce(xs)), sp.Max: real(lambda *xs: np.maximum.reduce(xs)),
        sp.erf: scalar(math.erf), sp.erfc: scalar(math.erfc), sp.gamma: scalar(math.gamma),
        sp.loggamma: scalar(math.lgamma), sp.factorial: scalar(lambda v: math.gamma(v + 1)),
    }  # fmt: skip


class _Sampler:
    """Evaluates a sympy expression in x at numpy points (complex128), without eval."""

    def __init__(self, sp: Any, np: Any, x: Any, xs: Any) -> None:
        self.sp, self.np, self.x, self.xs = sp, np, x, xs
        self.table = _ufuncs(sp, np)

    def __call__(self, node: Any) -> Any:
        sp, np = self.sp, self.np
        if node == self.x:
            return self.xs + 0j
        if not node.free_symbols:
            return np.full(self.xs.shape, self._number(node), dtype=complex)
        if isinstance(node, sp.Add):
            return sum((self(arg) for arg in node.args), np.zeros(self.xs.shape, dtype=complex))
        if isinstance(node, sp.Mul):
            product = np.ones(self.xs.shape, dtype=complex)
            for arg in node.args:
                product = product * self(arg)
            return product
        if isinstance(node, sp.Pow):
            base, exponent = node.args
            if exponent.is_Integer and abs(int(exponent)) <= 64:
                return self(base) ** int(exponent)  # repeated products: exact for negative bases
            return np.power(self(base), self(exponent))
        function = self.table.get(node.func)
        if function is not None and not (node.func is sp.log and len(node.args) != 1):
            return function(*(self(arg) for arg in node.args))
        return self._pointwise(node)

    def _number(self, node: Any) -> complex:
        try:
            return complex(node.evalf(15))
        except (TypeError, ValueError):  # oo, zoo, nan, or a value that is not a number
            return complex("nan")

    def _pointwise(self, node: Any) -> Any:
        """A part numpy's table does not know: evalf at each point (slower, still bounded
        by the worker's CPU limit)."""
        sp, np = self.sp, self.np
        values = [self._number(node.evalf(15, subs={self.x: sp.Float(float(v))})) for v in self.xs]
        return np.array(values, dtype=complex)


def _bound(builder: Any, text: str) -> float:
    value = builder.build(validate(text).body)
    sp = builder.sp
    if not isinstance(value, sp.Basic) or value.free_symbols:
        raise CalcError(f"the x-range bounds must be numbers, not {shorten(text)!r}")
    number = complex(value.evalf(15)) if value.is_finite is not False else complex("inf")
    if number.imag:
        raise CalcError(f"the x-range bounds must be real numbers, not {shorten(text)!r}")
    return number.real


def draw(builder: Any, argument: str) -> dict[str, Any]:
    """The worker's reply to a plot request: `text` (notes for the model), `image` (the PNG,
    base64), `shows` (what it shows, for the observation) and `caption`."""
    import numpy as np

    sp = builder.sp
    expression, a_text, b_text = split_argument(argument)
    expr = builder.build(validate(expression).body)
    if not isinstance(expr, sp.Basic):
        raise CalcError("a list (such as an answer of solve) cannot be plotted")
    a, b = _bound(builder, a_text), _bound(builder, b_text)
    check_range(a, b, (a_text, b_text))
    x = builder.names["x"]
    others = sorted(str(s) for s in expr.free_symbols - {x})
    if others:
        raise CalcError(f"plot draws y = f(x): use x as the only variable (found {', '.join(others)})")
    if x not in expr.free_symbols:
        raise CalcError(
            f"{shorten(expression)} does not depend on x (it is {builder.format(expr)}); nothing to plot"
        )
    xs = np.linspace(a, b, SAMPLES)
    with np.errstate(all="ignore"):
        values = _Sampler(sp, np, x, xs)(expr)
        finite = np.isfinite(values)
        real = finite & (np.abs(values.imag) <= REAL_TOLERANCE * np.maximum(1.0, np.abs(values.real)))
    ys = np.where(real, values.real, np.nan)
    shown = f"{shorten(expression)} for x from {a_text} to {b_text}"
    not_real, not_finite = int(np.count_nonzero(finite & ~real)), int(np.count_nonzero(~finite))
    if not real.any():
        if expr.has(sp.Integral, sp.Sum, sp.Limit):
            raise CalcError(f"sympy left {shorten(expression)} unevaluated (no closed form); nothing to plot")
        if not_real >= not_finite:
            raise CalcError(f"{shown} has no real values (complex results only); nothing to plot")
        raise CalcError(f"{shown} is undefined or infinite everywhere; nothing to plot")
    notes = []
    if not_real:
        notes.append(f"Left out {not_real} of {SAMPLES} points where the value is not real.")
    if not_finite:
        notes.append(f"Left out {not_finite} of {SAMPLES} points where it is undefined or infinite.")
    png = _render(np, xs, ys, f"y = {shorten(expression)}", (a, b))
    return {
        "text": " ".join(notes),
        "image": base64.b64encode(png).decode("ascii"),
        "shows": f"the plot of {shown}",
        "caption": f"y = {shorten(expression)}, x from {a_text} to {b_text}",
    }


def _render(np: Any, xs: Any, ys: Any, title: str, x_range: tuple[float, float]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = ys[np.isfinite(ys)]
    low, high = np.percentile(drawn, [5, 95])
    span = high - low
    if span > 0 and drawn.max() - drawn.min() > 3 * span:
        # a pole: show where most of the curve lies, and break the line where it jumps across
        low, high = low - span / 4, high + span / 4
        ax.set_ylim(low, high)
        ys = ys.copy()
        jumps = np.abs(np.diff(ys)) > (high - low)
        ys[1:][jumps] = np.nan
    ax.plot(xs, ys, linewidth=1.8, color="#1f77b4")
    ax.set_xlim(*x_range)
    ax.axhline(0, color="0.55", linewidth=0.8)
    if x_range[0] < 0 < x_range[1]:
        ax.axvline(0, color="0.55", linewidth=0.8)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("x", parse_math=False)
    ax.set_title(title, parse_math=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    png = buffer.getvalue()
    if len(png) > MAX_PNG_BYTES:
        raise CalcError("the plot came out too large to send")
    return png
