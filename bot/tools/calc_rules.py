"""The calculator's rules: validation and bounds, pure Python, with no sympy.

`validate` is run by BOTH processes: by the parent to refuse bad input at once, without
a round trip, and again by the worker (`calc_worker`) on the same text, so that the
worker never trusts the parent's say-so.

The text never reaches `eval`, `sympify` or `parse_expr`. It goes through
`ast.parse(mode="eval")`, and the tree may hold only: int/float/complex literals,
`+ - * / ** % //`, unary `- +`, names from a fixed table (constants and plain symbols),
calls of functions from a fixed table with positional arguments, and tuples/lists only
as direct arguments of integrate, Sum, solve and diff. Anything else is refused with
one line naming what is not allowed. sympy objects are then built node by node from
those tables; no string is ever handed to sympy.

Text rules: `^` means power (it is replaced by `**` before parsing, since models and
people write `2^10`); `×`, `÷`, `·`, `−` and `π` are read as `*`, `/`, `*`, `-`, `pi`;
any other non-ASCII character, control character, newline or `#` is refused (that also
covers fullwidth digits, look-alike names and null bytes). `e` is Euler's number and
`inf` is `oo`. An equation is written `Eq(a, b)`; `=` is refused with that hint.

Limits (constants below): 500 characters, 30 levels of brackets, AST depth 100,
250 nodes, 100-digit literals. Exact numbers may not grow past 100,000 digits: every
power whose base and exponent are known is estimated with log2 before it is computed
(so `9**9**9**9` and `10**10**10` are refused without being built); powers of
expressions with symbols are limited to exponent 1000 (so `expand((x+1)**100000)` is
refused); factorial and binomial take arguments up to 10,000; derivative orders up to
100; N() up to 1000 digits. The parent's static pass can only follow values it can
compute cheaply (up to 4096 bits); the worker repeats every check on the real sympy
values, which catches the rest (`factorial(factorial(3000))`, `sqrt(10**99)**10**5`).
Division by a literal zero is the error "division by zero"; a result that is `zoo` or
`nan` (e.g. `log(0)`) is the error "the result is undefined".

Output: sympy's exact result, plus `≈ <15 significant digits>` when the result is a
number and the decimal reads differently (`sqrt(2) ≈ 1.4142135623731`). Floats are shown
without trailing zeros (`6.5*7.5` gives `48.75`). Results over 1000 characters are
refused as "result too long (N digits)".
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction

MAX_TEXT = 500
MAX_BRACKETS = 30
MAX_DEPTH = 100
MAX_NODES = 250
MAX_LITERAL_DIGITS = 100
MAX_RESULT_DIGITS = 100_000
MAX_BITS = MAX_RESULT_DIGITS / math.log10(2)
MAX_SYMBOLIC_EXPONENT = 1000
MAX_FACTORIAL = 10_000
MAX_DIFF_ORDER = 100
MAX_N_DIGITS = 1000
MAX_OUTPUT = 1000
#: the parent's static pass follows exact values only up to this size, to stay cheap
TRACK_BITS = 4096

CONSTANTS = frozenset({"pi", "E", "e", "I", "oo", "inf"})
SYMBOLS = frozenset({"x", "y", "z", "t", "n", "k", "a", "b", "c", "m"})
#: function name -> (fewest, most) positional arguments
FUNCTIONS: dict[str, tuple[int, int]] = {
    **dict.fromkeys(
        "sqrt cbrt exp ln sin cos tan cot sec csc asin acos atan sinh cosh tanh asinh acosh atanh abs Abs "
        "sign floor ceiling re im arg conjugate factorial simplify expand factor".split(),
        (1, 1),
    ),
    **dict.fromkeys("root atan2 binomial gcd lcm Eq Sum".split(), (2, 2)),
    **dict.fromkeys("min max Min Max".split(), (1, 8)),
    **{"log": (1, 2), "N": (1, 2), "diff": (1, 4), "integrate": (1, 3), "solve": (1, 2), "limit": (3, 3)},
}
SEQUENCE_FUNCTIONS = frozenset({"integrate", "Sum", "solve", "diff"})
MAX_SEQUENCE = 8

_TRANSLATE = str.maketrans({"×": "*", "÷": "/", "·": "*", "−": "-", "π": "pi", "^": "**"})
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.Mod, ast.FloorDiv)
_OTHER_OPS = {"BitAnd": "&", "BitOr": "|", "LShift": "<<", "RShift": ">>", "MatMult": "@", "Invert": "~"}
#: what the refusal names, by AST node class; anything unlisted is named by its class
_DESCRIBE = {
    "Attribute": "attribute access ('.')", "Subscript": "indexing ('[...]')", "JoinedStr": "f-strings",
    "ListComp": "comprehensions", "SetComp": "comprehensions", "DictComp": "comprehensions",
    "GeneratorExp": "comprehensions", "Compare": "comparisons (write Eq(a, b))", "BoolOp": "'and'/'or'",
    "IfExp": "'if ... else'", "NamedExpr": "':='", "Starred": "'*' unpacking", "Not": "'not'",
    "Lambda": "lambda", "Dict": "dicts", "Set": "sets",
}  # fmt: skip
_SINGLE_EQUALS = re.compile(r"(?<![=!<>])=(?!=)")
_FLOAT = re.compile(r"(\d+)\.(\d+)")


class CalcError(ValueError):
    """Refused or failed input; `str()` is one short line."""


def _name(text: str) -> str:
    return text if len(text) <= 20 else text[:20] + "..."


# --- validation (both processes) -------------------------------------------------------------


def validate(text: str) -> ast.Expression:
    """Check `text` against every rule and bound that can be checked before evaluating."""
    if len(text) > MAX_TEXT:
        raise CalcError(f"expression too long ({len(text)} characters, limit {MAX_TEXT})")
    text = text.strip().translate(_TRANSLATE)
    if not text:
        raise CalcError("empty expression")
    for char in text:
        if char in "\n\r":
            raise CalcError("the expression must be a single line")
        if not (" " <= char <= "~") and char != "\t":
            raise CalcError(f"character U+{ord(char):04X} is not allowed (plain ASCII only)")
    if "#" in text:
        raise CalcError("comments ('#') are not allowed")
    depth = 0
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if depth > MAX_BRACKETS:
            raise CalcError(f"too deeply nested (limit {MAX_BRACKETS} levels of brackets)")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        if _SINGLE_EQUALS.search(text):
            raise CalcError("'=' is not allowed; write Eq(a, b), e.g. solve(Eq(x**2, 4), x)") from None
        raise CalcError(f"not a valid expression ({(exc.msg or 'syntax error').splitlines()[0]})") from None
    except (ValueError, RecursionError, MemoryError):
        raise CalcError("not a valid expression") from None
    _check_nodes(tree)
    _estimate(tree.body)
    return tree


def _check_nodes(tree: ast.Expression) -> None:
    count = 0
    stack: list[tuple[ast.AST, int, bool]] = [(tree.body, 1, False)]
    while stack:
        node, depth, sequence_ok = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise CalcError(f"expression too complex (limit {MAX_NODES} parts)")
        if depth > MAX_DEPTH:
            raise CalcError(f"expression too deeply nested (limit {MAX_DEPTH} levels)")
        children: list[ast.AST] = []
        if isinstance(node, ast.Constant):
            _check_constant(node.value)
        elif isinstance(node, ast.Name):
            if node.id in FUNCTIONS:
                raise CalcError(f"'{node.id}' is a function; call it, e.g. {node.id}(2)")
            if node.id not in CONSTANTS and node.id not in SYMBOLS:
                raise CalcError(f"unknown name '{_name(node.id)}'")
        elif isinstance(node, ast.BinOp):
            _check_operator(node.op)
            children = [node.left, node.right]
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, ast.USub | ast.UAdd):
                _check_operator(node.op)
            children = [node.operand]
        elif isinstance(node, ast.Call):
            _check_call(node)
            stack.extend((arg, depth + 1, node.func.id in SEQUENCE_FUNCTIONS) for arg in node.args)  # type: ignore[attr-defined]
        elif isinstance(node, ast.Tuple | ast.List):
            if not sequence_ok:
                raise CalcError(
                    "lists and tuples are only allowed as arguments of integrate, Sum, solve and diff"
                )
            if not 1 <= len(node.elts) <= MAX_SEQUENCE:
                raise CalcError(f"a list or tuple needs 1 to {MAX_SEQUENCE} items")
            children = list(node.elts)
        else:
            what = _DESCRIBE.get(type(node).__name__, type(node).__name__)
            raise CalcError(f"{what} is not allowed")
        stack.extend((child, depth + 1, False) for child in children)


def _check_constant(value: object) -> None:
    if isinstance(value, bool) or value is None or value is Ellipsis:
        raise CalcError(f"{value!r} is not allowed")
    if isinstance(value, str):
        raise CalcError("strings are not allowed")
    if isinstance(value, bytes):
        raise CalcError("bytes are not allowed")
    if isinstance(value, int):
        if value.bit_length() > MAX_LITERAL_DIGITS * 3.33:
            raise CalcError(f"number literal too long (limit {MAX_LITERAL_DIGITS} digits)")
    elif isinstance(value, float | complex):
        if not (math.isfinite(value.real) and math.isfinite(value.imag)):
            raise CalcError("number literal too large")
    else:
        raise CalcError(f"{type(value).__name__} literals are not allowed")


def _check_operator(op: ast.AST) -> None:
    if not isinstance(op, _BINOPS):
        name = type(op).__name__
        raise CalcError(f"{_DESCRIBE.get(name) or repr(_OTHER_OPS.get(name, name))} operator is not allowed")


def _check_call(node: ast.Call) -> None:
    if isinstance(node.func, ast.Attribute):
        raise CalcError(f"{_DESCRIBE['Attribute']} is not allowed")
    if not isinstance(node.func, ast.Name):
        raise CalcError("only the listed functions may be called, by name")
    name = node.func.id
    if name not in FUNCTIONS:
        raise CalcError(f"unknown function '{_name(name)}'")
    if node.keywords:
        raise CalcError("keyword arguments are not allowed")
    fewest, most = FUNCTIONS[name]
    if not fewest <= len(node.args) <= most:
        wanted = str(fewest) if fewest == most else f"{fewest} to {most}"
        raise CalcError(f"{name} takes {wanted} argument{'s' if most > 1 else ''}")


def _bits(numerator: int, denominator: int) -> float:
    """About how many bits a rational's numerator and denominator take together."""
    numerator = abs(numerator)
    return (math.log2(numerator) if numerator else 0.0) + math.log2(denominator)


def _fbits(value: Fraction) -> float:
    return _bits(value.numerator, value.denominator)


def _digits_text(bits: float) -> str:
    digits = bits * math.log10(2)
    return f"about {digits:,.0f}" if digits < 1e15 else "astronomically many"


def check_power(base_bits: float, exponent: Fraction) -> None:
    """Refuse an exact power whose result would pass MAX_RESULT_DIGITS, before computing it."""
    magnitude = abs(exponent)
    bits = math.inf if magnitude > 2**64 else float(magnitude) * base_bits
    if base_bits and bits > MAX_BITS:
        raise CalcError(f"the number would have {_digits_text(bits)} digits (limit {MAX_RESULT_DIGITS:,})")


def check_factorial(value: int) -> None:
    if value > MAX_FACTORIAL:
        raise CalcError(f"factorial/binomial argument too large (limit {MAX_FACTORIAL:,})")


def _estimate(node: ast.AST) -> tuple[Fraction | None, bool]:
    """(the exact value where cheaply known, whether symbols occur); raises on a bound."""
    if isinstance(node, ast.Constant):
        return (Fraction(node.value) if isinstance(node.value, int) else None), False
    if isinstance(node, ast.Name):
        return None, node.id in SYMBOLS
    if isinstance(node, ast.UnaryOp):
        value, symbolic = _estimate(node.operand)
        return (-value if value is not None and isinstance(node.op, ast.USub) else value), symbolic
    if isinstance(node, ast.BinOp):
        (left, left_sym), (right, right_sym) = _estimate(node.left), _estimate(node.right)
        symbolic = left_sym or right_sym
        if isinstance(node.op, ast.Pow) and right is not None:
            if left_sym and abs(right) > MAX_SYMBOLIC_EXPONENT:
                raise CalcError(
                    f"exponent too large for an expression with symbols (limit {MAX_SYMBOLIC_EXPONENT})"
                )
            if left is not None:
                check_power(_fbits(left), right)
        if left is None or right is None:
            return None, symbolic
        return _tracked(_exact_binop(node.op, left, right)), symbolic
    if isinstance(node, ast.Call):
        results = [_estimate(arg) for arg in node.args]
        values = [value for value, _ in results]
        symbolic = any(sym for _, sym in results)
        return _exact_call(node.func.id, values), symbolic  # type: ignore[attr-defined]
    if isinstance(node, ast.Tuple | ast.List):
        return None, any(_estimate(elt)[1] for elt in node.elts)
    return None, False


def _exact_binop(op: ast.operator, left: Fraction, right: Fraction) -> Fraction | None:
    if isinstance(op, ast.Div | ast.Mod | ast.FloorDiv | ast.Pow) and right == 0:
        if not isinstance(op, ast.Pow):
            raise CalcError("division by zero")
        return Fraction(1)
    if isinstance(op, ast.Add):
        return left + right
    if isinstance(op, ast.Sub):
        return left - right
    if isinstance(op, ast.Mult):
        return left * right
    if isinstance(op, ast.Div):
        return left / right
    if isinstance(op, ast.Mod):
        return left % right
    if isinstance(op, ast.FloorDiv):
        return Fraction(left // right)
    if right.denominator != 1:
        return None
    if left == 0 and right < 0:
        raise CalcError("division by zero")
    if _fbits(left) == 0:  # 0, 1 or -1, whatever the exponent's size
        return left if int(right) % 2 else abs(left)
    if _fbits(left) * float(abs(right)) > TRACK_BITS:  # check_power has bounded abs(right)
        return None
    return left ** int(right)


def _exact_call(name: str, values: list[Fraction | None]) -> Fraction | None:
    known = [v for v in values if v is not None and v.denominator == 1]
    first = values[0] if values else None
    if name in ("factorial", "binomial") and first is not None and first.denominator == 1:
        check_factorial(int(first))
        if name == "factorial" and 0 <= first <= 500:
            return Fraction(math.factorial(int(first)))
    elif name == "diff" and any(v is not None and v > MAX_DIFF_ORDER for v in values[1:]):
        raise CalcError(f"derivative order too large (limit {MAX_DIFF_ORDER})")
    elif name == "N" and len(values) == 2 and values[1] is not None and not 1 <= values[1] <= MAX_N_DIGITS:
        raise CalcError(f"N() takes 1 to {MAX_N_DIGITS} digits")
    elif name in ("gcd", "lcm") and len(known) == 2:
        a, b = (int(v) for v in known)
        return _tracked(Fraction(math.gcd(a, b) if name == "gcd" else math.lcm(a, b)))
    elif name in ("abs", "Abs") and values[0] is not None:
        return abs(values[0])
    return None


def _tracked(value: Fraction | None) -> Fraction | None:
    return value if value is not None and _fbits(value) <= TRACK_BITS else None


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
