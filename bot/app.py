"""The core, built once and passed in: database, queue, engine worker and dispatcher.

`Core.open(settings, engine)` opens the database (running migrations), and wires the
queue, worker and dispatcher around the given engine, all reporting to one `Metrics`
(`bot/metrics.py`; the entry point may pass its own, which its HTTP listener serves). Adapters are added with
`add_adapter()` before `start()`, so requests recovered from the journal can be
answered on their platform. `aclose()` stops the worker; a request it was answering
stays `running` in storage and is answered again at the next start, or at once by another
process on the same PostgreSQL database (its claims are released; see `bot/claims.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

from yanray.bot.context import MIN_QUESTION_TOKENS
from yanray.bot.dispatcher import Dispatcher
from yanray.bot.errors import ConfigError
from yanray.bot.i18n import LANGUAGES
from yanray.bot.metrics import Metrics
from yanray.bot.queue import RequestQueue
from yanray.bot.settings import Settings
from yanray.bot.tools import build_tools
from yanray.bot.types import Adapter
from yanray.bot.worker import EngineWorker
from yanray.engine.base import Engine
from yanray.storage import Database, crud

logger = logging.getLogger(__name__)

DELIVERY_GRACE = 10.0  # seconds a stored answer may take to go out at shut-down


class Core:
    def __init__(
        self, *, settings: Settings, db: Database, engine: Engine, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.db = db
        self.engine = engine
        self.metrics = metrics if metrics is not None else Metrics()
        self.queue = RequestQueue(
            max_total=settings.queue_max, max_per_conversation=settings.queue_per_conversation
        )
        self.worker = EngineWorker(
            settings=settings,
            db=db,
            engine=engine,
            queue=self.queue,
            tools=build_tools(settings.tools, settings),
            metrics=self.metrics,
        )
        self.metrics.watch(queue=self.queue, engine=engine)
        self.dispatcher = Dispatcher(
            settings=settings, db=db, queue=self.queue, worker=self.worker, metrics=self.metrics
        )
        self._task: asyncio.Task[None] | None = None
        self._claims: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, settings: Settings, engine: Engine, *, metrics: Metrics | None = None) -> Core:
        db = await Database.open(settings.resolved_database_url)
        core = cls(settings=settings, db=db, engine=engine, metrics=metrics)
        try:
            core.check_context()
        except BaseException:
            await db.close()
            raise
        return core

    def check_context(self) -> None:
        """Refuse a context that cannot hold the instructions, the reply and a question:
        such a bot would answer every message with "too long"."""
        settings = self.settings
        # every language's default prompt can be a conversation's: the tightest one counts
        fixed, room = min(
            (self.worker.question_room(settings.default_prompt(language)) for language in LANGUAGES),
            key=lambda counts: counts[1],
        )
        if room >= MIN_QUESTION_TOKENS:
            return
        context = (
            f"YANRAY_MAX_CONTEXT={settings.max_context}"
            if settings.max_context
            else f"the model's context ({self.engine.max_context} tokens)"
        )
        raise ConfigError(
            f"{context} leaves {max(room, 0)} tokens for a question: the system prompt (with the "
            f"tools) takes {fixed} and YANRAY_MAX_NEW_TOKENS reserves {settings.max_new_tokens}; "
            f"at least {MIN_QUESTION_TOKENS} are needed. Raise YANRAY_MAX_CONTEXT, lower "
            "YANRAY_MAX_NEW_TOKENS or shorten YANRAY_SYSTEM_PROMPT."
        )

    def add_adapter(self, adapter: Adapter) -> None:
        self.worker.adapters[adapter.platform] = adapter

    async def start(self) -> None:
        """Re-queue what the last run left unanswered and start the worker."""
        await self.worker.recover()
        self._task = asyncio.create_task(self.worker.run(), name="yanray-engine-worker")
        if not self.worker.claims.exclusive:  # other processes may share the database
            self._claims = asyncio.create_task(
                self.worker.claims.run(self.worker.take_over), name="yanray-claims"
            )

    async def wait_idle(self) -> None:
        """Until nothing is queued or running (tests and the pipe mode of `yanray chat`)."""
        while len(self.queue) or self.queue.running is not None or self.worker.deliveries:
            await self.worker.idle.wait()
            if self.worker.deliveries:
                await asyncio.wait(self.worker.deliveries)
            await asyncio.sleep(0)

    async def aclose(self, *, graceful: bool = True) -> None:
        """Stop the worker and close the database. An answer being written stays `running`
        and is answered again at the next start; after a graceful stop (SIGTERM, Ctrl-C) that
        start does not count against it as an attempt the process died on. `graceful=False`
        is for tests that stand in for a crash."""
        running = list(self.queue.active)
        if graceful and running and self._task is not None:
            # written before the worker is cancelled: a transaction cut off by the cancellation
            # could still hold SQLite's write lock
            try:
                async with self.db.transaction() as session:
                    for job in running:
                        await crud.give_back_attempt(session=session, request_id=job.request_id)
            except Exception:  # noting it is a courtesy; shutting down must go on regardless
                logger.warning(
                    "requests %s: could not note the graceful stop",
                    [job.request_id for job in running],
                    exc_info=True,
                )
        if self._claims is not None:
            self._claims.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._claims
            self._claims = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.worker.deliveries:
            # answers already stored get a moment to go out; the rest go out at the next start
            _done, late = await asyncio.wait(self.worker.deliveries, timeout=DELIVERY_GRACE)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.worker.shown.flush()
        try:  # the requests this process held go to another process (or the next start) at once
            if not self.worker.claims.exclusive:
                await self.worker.claims.release()
        except Exception:
            logger.warning(
                "could not release this process's claims; they pass on when the lease ends", exc_info=True
            )
        for tool in self.worker.tools.values():
            if tool.close is not None:
                tool.close()
        await self.db.close()

    async def __aenter__(self) -> Core:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
