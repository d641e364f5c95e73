"""The `calculate` tool: sympy arithmetic and algebra on model output, safely.

Security design, in layers (the rules and limits themselves are in `calc_rules`'s
docstring):

1. No code path turns text into code: no `eval`, `exec`, `sympify` or `parse_expr`. The
   text is parsed with `ast.parse(mode="eval")` and checked against a fixed allow-list
   of node types, names and functions (`calc_rules.validate`), here in the parent, so
   that bad input is refused at once with one line, without touching the worker.
2. Size bounds are checked before anything is computed: text length, bracket nesting,
   AST depth and node count, literal size, and log2 estimates of every exact power,
   factorial and binomial whose operands are known.
3. The worker process re-parses and re-validates the same text itself, builds sympy
   objects node by node from the fixed tables, and re-checks each bound on the real
   values as it builds (catching what the parent's cheap static pass cannot follow).
4. The worker runs under limits: `RLIMIT_AS` (512 MiB by default), `RLIMIT_CPU` (moved
   to used + budget before each call), `RLIMIT_FSIZE` 0, in its own session (so a
   terminal's Ctrl-C does not hit it), started with `python -I` (no user site, no
   PYTHON* variables, no current folder on `sys.path`). The parent enforces a
   wall-clock limit and kills the worker when it passes; the next call starts a new one.

What I chose where the design is silent: one warm worker per `Calculator`, reused
across calls (a fresh one costs about a second, mostly sympy's import:
docs/decisions/calculator-warm-worker.md), started on first use, recycled after 1000
calls, and restarted after any kill, crash or MemoryError. Calls are serialised by a lock; the exchange is one JSON line each way
over pipes (no pickle). The blocking pipe I/O runs in the loop's default executor, so
the event loop never blocks and the `Calculator` is not tied to one event loop;
cancelling a call kills the worker if that call is running. The worker exits by itself
when its stdin closes, so it never outlives the bot. The plot tool (`plot.py`) sends its
requests to the same kind of worker (`Calculator(plot=True)` loads matplotlib at start);
with both tools enabled they share one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from yanray.bot.errors import ToolError
from yanray.bot.tools import Tool, one_string
from yanray.bot.tools.calc_rules import MAX_TEXT, CalcError, one_line, validate
from yanray.engine.base import ToolSpec

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
DEFAULT_MEMORY = 512 * 2**20
STARTUP_TIMEOUT = 30.0
CALLS_PER_WORKER = 1000
_MAX_REPLY = 1024 * 1024  # a plot's PNG comes back base64-encoded (calc_rules.MAX_PNG_BYTES)
_POLL = 0.05  # how often a waiting call looks at its cancel flag


def _worker_environment() -> dict[str, str]:
    """The worker's environment: one BLAS thread (OpenBLAS reserves memory per thread, which a
    many-core host would spend of RLIMIT_AS before any work) and matplotlib's Agg backend."""
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


class _Worker:
    """One worker process and the blocking exchange with it; used from executor threads."""

    def __init__(self, memory: int, plot: bool = False) -> None:
        self._memory = memory
        self._plot = plot
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = bytearray()
        self._ids = itertools.count(1)
        self._calls = 0

    def run(self, text: str, timeout: float, cancelled: threading.Event) -> str:
        return str(self.call({"expression": text}, timeout, cancelled)["text"])

    def call(self, request: dict[str, Any], timeout: float, cancelled: threading.Event) -> dict[str, Any]:
        """Send `request` (an expression, or a plot) and return the worker's successful reply."""
        with self._lock:
            if cancelled.is_set():
                raise CalcError("the calculation was cancelled")
            proc = self._ensure_started(cancelled)
            request_id = next(self._ids)
            line = json.dumps({**request, "id": request_id, "cpu": timeout}) + "\n"
            try:
                assert proc.stdin is not None
                proc.stdin.write(line.encode())
                proc.stdin.flush()
            except OSError:  # the worker died between calls
                self.stop()
                raise CalcError("the calculator stopped unexpectedly; try again") from None
            self._calls += 1
            reply = self._read_line(proc, time.monotonic() + timeout, cancelled)
            if reply is None:
                self.stop()
                raise CalcError(f"calculation took too long (limit {timeout:g} s)")
            if reply.get("id") != request_id or not isinstance(reply.get("text"), str):
                self.stop()
                raise CalcError("the calculator gave a malformed answer")
            if reply.get("restart") or self._calls >= CALLS_PER_WORKER:
                self.stop()
            if not reply.get("ok"):
                raise CalcError(reply["text"])
            return reply

    def _ensure_started(self, cancelled: threading.Event) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self.stop()
        command = [sys.executable, "-I", "-m", "yanray.bot.tools.calc_worker", str(self._memory)]
        if self._plot:
            command.append("plot")  # numpy and matplotlib load at start, not in a plot's time
        started = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
                start_new_session=True,
                env=_worker_environment(),
            )
        except OSError as exc:
            logger.error("cannot start the calculator worker: %s", exc)
            raise CalcError("the calculator could not start") from None
        self._buffer.clear()
        self._calls = 0
        ready = self._read_line(self._proc, started + STARTUP_TIMEOUT, cancelled)
        if ready is None or not ready.get("ready"):
            self.stop()
            raise CalcError("the calculator could not start")
        logger.info("calculator worker %d started in %.2f s", self._proc.pid, time.monotonic() - started)
        return self._proc

    def _read_line(
        self, proc: subprocess.Popen[bytes], deadline: float, cancelled: threading.Event
    ) -> dict[str, Any] | None:
        """The next JSON line; None on timeout. Raises CalcError when the worker dies."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        poller = select.poll()  # not select.select: a busy bot may hold file descriptors past 1024
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buffer:
            if cancelled.is_set():
                self.stop()
                raise CalcError("the calculation was cancelled")
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not poller.poll(min(left, _POLL) * 1000):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise CalcError(self._death_message(proc))
            self._buffer += chunk
            if len(self._buffer) > _MAX_REPLY:
                self.stop()
                raise CalcError("the calculator's answer was too long")
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.stop()
            raise CalcError("the calculator gave a malformed answer")
        return message

    def _death_message(self, proc: subprocess.Popen[bytes]) -> str:
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self.stop()
        logger.warning("calculator worker %d exited with %s", proc.pid, code)
        if code == -signal.SIGXCPU:
            return "calculation took too long (CPU limit)"
        return "the calculation stopped (it may have needed too much memory)"

    def shutdown(self) -> None:
        """Kill the worker from outside: a running call sees it die and lets go of the lock."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        if self._lock.acquire(timeout=10):
            try:
                self.stop()
            finally:
                self._lock.release()

    def stop(self) -> None:
        """Kill the worker (if any) and reap it; only while holding the lock (or from shutdown)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.warning("calculator worker %d did not exit after SIGKILL", proc.pid)


class Calculator:
    """A warm calculator worker, reused across calls. `close()` it, or let it go with the process."""

    def __init__(
        self, *, timeout: float = DEFAULT_TIMEOUT, memory: int = DEFAULT_MEMORY, plot: bool = False
    ) -> None:
        """`plot`: the worker loads the plotting libraries when it starts (the plot tool)."""
        self.timeout = timeout
        self._worker = _Worker(memory, plot)
        self._finalizer = weakref.finalize(self, self._worker.shutdown)

    # `timeout` is the worker's wall-clock limit (it kills the process), not an asyncio timeout
    async def calculate(self, expression: str, *, timeout: float | None = None) -> str:  # noqa: ASYNC109
        """The result text; raises ToolError (one line) for bad input or a failed calculation."""
        try:
            validate(expression)
        except CalcError as exc:
            raise ToolError(one_line(str(exc))) from None
        reply = await self.request({"expression": expression}, timeout=timeout)
        return str(reply["text"])

    async def request(self, payload: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        """The worker's successful reply to `payload` (already validated by the caller; the
        worker validates it again); raises ToolError (one line)."""
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        limit = self.timeout if timeout is None else timeout
        try:
            return await loop.run_in_executor(None, self._worker.call, payload, limit, cancelled)
        except CalcError as exc:
            raise ToolError(one_line(str(exc))) from None
        finally:
            cancelled.set()  # a cancelled await leaves the thread running: this stops it

    def close(self) -> None:
        self._finalizer()


async def calculate(
    expression: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109  (the worker's kill limit, as above)
    calculator: Calculator | None = None,
) -> str:
    """Evaluate `expression`; with no `calculator`, a worker is started for this one call (~1.5 s)."""
    if calculator is not None:
        return await calculator.calculate(expression, timeout=timeout)
    own = Calculator(timeout=timeout)
    try:
        return await own.calculate(expression)
    finally:
        own.close()


def calculator_tool(calculator: Calculator | None = None) -> Tool:
    """The `calculate` tool; pass a `Calculator` to share its worker or to close it yourself."""
    calc = calculator if calculator is not None else Calculator()

    async def handler(args: Mapping[str, Any]) -> str:
        expression = args.get("expression")
        if not isinstance(expression, str):
            raise ToolError('calculate needs an "expression" string, e.g. /calculate 2*(3+4)')
        return await calc.calculate(expression)

    spec = ToolSpec(
        name="calculate",
        description=(
            "Calculates exactly and in decimals with sympy: + - * / ** % // (^ is power too), sqrt, exp, "
            "log, trig, factorial, binomial, gcd, lcm, diff, integrate, solve, limit, Sum, simplify, "
            "expand, factor, N; symbols x y z t n k a b c m; pi, E, I, oo; equations as Eq(a, b). "
            "Example: /calculate solve(Eq(x**2, 4), x)"
        ),
        parameters=one_string("expression", "e.g. integrate(x**2, (x, 0, 1))"),
        usage="/calculate <expression>",
    )
    owned = calc.close if calculator is None else None
    return Tool(
        spec=spec, handler=handler, slash_argument="expression", close=owned, max_argument_chars=MAX_TEXT
    )
