"""The `time` tool: the current date and time in an IANA zone (`zoneinfo`).

The model may name a zone (`/time Asia/Tokyo`) or none (`/time`), which means the
operator's `YANRAY_TIMEZONE` (default `UTC`: the same answer on every host, where the
host's own zone is often UTC in a container anyway). Zones come from the system's zone
files or, where the OS has none, the `tzdata` package (a dependency).

The zone name is model output: it is bounded in length and checked for the characters
IANA names use before `zoneinfo` sees it (zoneinfo already refuses absolute and `..`
paths; the check keeps the refusal one clear line). A bad name is a one-line observation.
The clock is a parameter (`now`) so that tests can fix the instant.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from yanray.bot.errors import ToolError
from yanray.bot.tools import Tool, one_string
from yanray.engine.base import ToolSpec

logger = logging.getLogger(__name__)

MAX_ZONE_CHARS = 64  # the longest IANA name is about 32 characters
_ZONE_CHARS = frozenset(string.ascii_letters + string.digits + "/_+-")
TIMEOUT = 2.0


class ZoneError(ValueError):
    """A zone name that is not a known IANA zone; the message is one line."""


def zone(name: str) -> ZoneInfo:
    """The zone named `name` (e.g. `Europe/Berlin`, `UTC`); raises ZoneError."""
    shown = name if len(name) <= MAX_ZONE_CHARS else name[:MAX_ZONE_CHARS] + "…"
    if not name or len(name) > MAX_ZONE_CHARS or not set(name) <= _ZONE_CHARS or name.startswith("/"):
        raise ZoneError(f"{shown!r} is not a time zone name like Europe/Berlin or UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ZoneError(f"unknown time zone {shown!r}; use an IANA name like Europe/Berlin or UTC") from None


def describe(instant: datetime, name: str) -> str:
    """One line: `2026-12-01 06:14 (Tuesday) Europe/Berlin, CET, UTC+01:00`."""
    local = instant.astimezone(zone(name))
    offset = local.strftime("%z")
    sign, hours, minutes = offset[0], offset[1:3], offset[3:5]
    return f"{local:%Y-%m-%d %H:%M:%S} ({local:%A}) in {name}, {local.tzname()}, UTC{sign}{hours}:{minutes}"


def time_tool(default_zone: str = "UTC", *, now: Callable[[], datetime] | None = None) -> Tool:
    """The `time` tool; `now` (an aware datetime) defaults to the system clock."""
    zone(default_zone)  # checked at start-up (settings do too): a bad default never reaches a user
    clock = now if now is not None else (lambda: datetime.now(UTC))

    async def handler(args: Mapping[str, Any]) -> str:
        name = args.get("timezone") or default_zone
        if not isinstance(name, str):
            raise ToolError('time takes an optional "timezone" string, e.g. /time Europe/Berlin')
        try:
            return describe(clock(), name.strip())
        except ZoneError as exc:
            raise ToolError(str(exc)) from None

    spec = ToolSpec(
        name="time",
        description=(
            f"Tells the current date and time in {default_zone}, or in the IANA time zone given. "
            "Example: /time Asia/Tokyo"
        ),
        parameters=one_string("timezone", "IANA zone, e.g. Europe/Berlin", required=False),
        usage="/time [timezone]",
    )
    return Tool(
        spec=spec,
        handler=handler,
        slash_argument="timezone",
        timeout=TIMEOUT,
        max_argument_chars=MAX_ZONE_CHARS,
        argument_optional=True,
    )
