"""Waiting on a signal in tests: poll a condition until it holds, or fail loudly at a deadline.

Tests wait for what they are about (the engine got the prompt, the server saw the client
leave) instead of sleeping a fixed time and hoping it was long enough; a condition that
never holds fails the test with its description instead of hanging it. A condition may be
a coroutine function (a database read, say): it is awaited each time, `every` seconds apart.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable


async def until(
    condition: Callable[[], object], *, within: float = 10.0, what: str = "", every: float = 0.005
) -> None:
    """Return once `condition()` (awaited, if it gives an awaitable) is true; fail the test if
    it is not within `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if loop.time() >= deadline:
            raise AssertionError(f"not met within {within:g} s: {what or condition}")
        await asyncio.sleep(every)
