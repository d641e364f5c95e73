"""A running Yanray (real Core, real temp SQLite, real PTB) in front of the fake Bot API.

    async with FakeTelegram() as fake, running_bot(fake, settings, engine) as bot:
        fake.private_text(42, "hi")
        await fake.wait_for(lambda: fake.messages(42))

Intervals and retry waits are small so tests stay fast; the adapter is stopped before
the core is closed, as `yanray run` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from tests.fakes.telegram_server import FakeTelegram
from yanray.adapters.telegram import TelegramAdapter
from yanray.bot.app import Core
from yanray.bot.settings import Settings
from yanray.storage import crud


def telegram_settings(fake: FakeTelegram, base: Settings | None = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = base.model_dump() if base is not None else {}
    values.update(
        telegram_token=fake.token,
        telegram_base_url=fake.base_url,
        telegram_edit_interval=0.1,
        rate_limit_per_minute=0,
        tools=[],
    )
    values.update(overrides)
    return Settings(**values)


@dataclass
class RunningBot:
    fake: FakeTelegram
    core: Core
    adapter: TelegramAdapter

    async def settled(self, within: float = 10.0) -> None:
        """Until nothing is queued, answered or on its way, and every stream has shown its
        last word: the signal to check that nothing more is written."""
        await asyncio.wait_for(self.core.wait_idle(), within)
        await self.fake.wait_for(self.adapter.ctx.settled, within)

    async def statuses(self) -> dict[str, int]:
        async with self.core.db.transaction() as session:
            return dict(await crud.request_counts(session=session))


@asynccontextmanager
async def running_bot(
    fake: FakeTelegram,
    settings: Settings,
    engine: Any,
    *,
    draft_interval: float = 0.05,
    retry_base: float = 0.02,
    **adapter_options: Any,
) -> AsyncIterator[RunningBot]:
    adapter_options.setdefault("backoff", (0.02, 0.2))
    core = await Core.open(settings, engine)
    adapter = TelegramAdapter(
        settings=settings,
        dispatcher=core.dispatcher,
        draft_interval=draft_interval,
        retry_base=retry_base,
        **adapter_options,
    )
    core.add_adapter(adapter)
    try:
        await adapter.start()
        await core.start()
        yield RunningBot(fake, core, adapter)
    finally:
        await adapter.stop()
        await core.aclose()
