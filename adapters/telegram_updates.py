"""Yanray's own Telegram update source: long polling that confirms only what was handled.

PTB's `Updater` is not used (the application is built with `updater(None)`), for two
reasons. It fetches a batch with `Bot.get_updates`, which parses the whole batch at once,
so one update PTB cannot parse (a proxy or a self-hosted Bot API server dropping a
field) failed every batch and was fetched again, hundreds of times a second, forever,
with every user locked out. And it asks for the next batch, whose `offset` confirms the
previous one to Telegram, while that batch is still being handled: a crash in that
window lost the questions for good, since Telegram never resends a confirmed update.

`UpdatePoller` asks `getUpdates` for the raw JSON (through PTB's own HTTP request class,
so errors map to PTB's `RetryAfter`, `Conflict`, `InvalidToken`, `NetworkError`) and
parses each update on its own (`read_update`): one that does not parse is logged once,
shortened, and skipped, and its `update_id` still moves the offset past it. Every parsed
update of a batch is handed to the adapter's `handle` (PTB's handlers behind the per-chat
processor: concurrent across chats, in order within one), and only when all of them have
returned is the next batch asked for. The adapter's message handler returns once the
dispatcher has committed the question to the database, so an update is confirmed only
after what it carries is stored, or after it was deliberately ignored. A crash before
that makes Telegram deliver the batch again at the next start.

Faults: network errors, time-outs and 5xx answers wait and retry with bounded exponential
backoff (`backoff`), a 429 waits as told, 409 Conflict (a second program polling with the
same token, or a webhook still set) is logged as such and retried the same way; a token
Telegram no longer accepts is fatal: `on_fatal` gets one line and the loop ends.

`stop()` stops asking (an open long poll is abandoned), lets the batch being handled
finish, and confirms it with one last short `getUpdates` so it is not delivered twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import urlencode

from telegram import Bot, Update
from telegram.error import Conflict, InvalidToken, RetryAfter, TelegramError
from telegram.request import HTTPXRequest

from yanray.adapters.payloads import clean_strings, shorten
from yanray.adapters.telegram_sink import retry_seconds

logger = logging.getLogger(__name__)

T = TypeVar("T")
Handle = Callable[[Update], Coroutine[Any, Any, None]]
POLL_TIMEOUT = 30  # seconds Telegram holds a getUpdates open while there is nothing new
READ_SLACK = 10.0  # extra seconds to read the answer of a long poll before calling it lost
BATCH = 100  # updates per getUpdates, Telegram's maximum
STALE_WAIT = 5.0  # longest pause while only id-less updates come back
_REMEMBERED = 100  # id-less bad updates remembered so that each is logged once


class _Stopped(Exception):
    """The poller was asked to stop while it waited."""


def read_update(raw: object, bot: Bot) -> Update | None:
    """One raw update as PTB's `Update`, its strings repaired; None (logged) if it does not parse."""
    try:
        if not isinstance(raw, dict):
            raise TypeError(f"an update is a JSON object, not {type(raw).__name__}")
        return Update.de_json(clean_strings(raw), bot)
    except Exception as exc:  # PTB raises KeyError, TypeError, AttributeError, ValueError...
        uid = raw.get("update_id") if isinstance(raw, dict) else None
        logger.warning(
            "Telegram: skipped update %s that could not be read (%s: %s): %s",
            uid,
            type(exc).__name__,
            exc,
            shorten(raw),
        )
        return None


def update_id(raw: object) -> int | None:
    uid = raw.get("update_id") if isinstance(raw, dict) else None
    return uid if isinstance(uid, int) and not isinstance(uid, bool) and uid >= 0 else None


class UpdatePoller:
    def __init__(
        self,
        *,
        bot: Bot,
        handle: Handle,
        allowed_updates: Sequence[str],
        on_fatal: Callable[[str], None],
        poll_timeout: int = POLL_TIMEOUT,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.bot = bot
        self.handle = handle
        self.allowed_updates = list(allowed_updates)
        self.on_fatal = on_fatal
        self.poll_timeout = poll_timeout
        self.backoff = backoff
        self.offset = 0  # the next update_id wanted; every id below it has been handled
        self._asked = 0  # the offset of the last getUpdates Telegram answered: confirmed
        self._request = HTTPXRequest(connection_pool_size=1)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idless: list[str] = []

    async def start(self) -> None:
        # polling and a webhook exclude each other (Telegram answers 409 Conflict)
        await self.bot.delete_webhook()
        await self._request.initialize()
        self._task = asyncio.create_task(self._run(), name="telegram-updates")
        self._task.add_done_callback(self._ended)

    async def stop(self) -> None:
        """Stop asking, let the batch being handled finish, and confirm it."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task  # _ended has already reported a failure
        try:
            if self.offset > self._asked:
                await self._get_updates(self.offset, wait=0, limit=1)
        except TelegramError as exc:
            logger.warning(
                "Telegram: could not confirm the last updates (%s); they will be delivered again", exc
            )
        finally:
            await self._request.shutdown()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        logger.error("Telegram: receiving updates failed", exc_info=exc)
        self.on_fatal(f"Telegram: receiving updates failed ({exc!r})")

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        stale = 0
        while not self._stopping.is_set():
            batch = await self._next_batch()
            if batch is None:
                return
            updates: list[Update] = []
            before = self.offset
            for raw in batch:
                uid = update_id(raw)
                if uid is None:
                    self._note_idless(raw)
                    continue
                if uid < before:
                    continue  # handled already; Telegram itself never sends it again
                self.offset = max(self.offset, uid + 1)
                update = read_update(raw, self.bot)
                if update is not None:
                    updates.append(update)
            if updates:
                await self._handle_all(updates)
            stale = stale + 1 if batch and self.offset == before else 0
            if stale:
                # only updates without a usable id, which no offset confirms: Telegram sends
                # them again at once, so wait (a little longer each time) instead of spinning
                await self._sleep(min(STALE_WAIT, self._delay(stale)))

    async def _handle_all(self, updates: list[Update]) -> None:
        # started in order, so the per-chat processor keeps each chat's order
        tasks = [asyncio.create_task(self.handle(u), name=f"telegram-update-{u.update_id}") for u in updates]
        for update, result in zip(updates, await asyncio.gather(*tasks, return_exceptions=True), strict=True):
            if isinstance(result, BaseException):
                logger.error("Telegram: update %s failed", update.update_id, exc_info=result)

    def _note_idless(self, raw: object) -> None:
        line = shorten(raw)
        if line in self._idless:
            return
        self._idless = [*self._idless[-(_REMEMBERED - 1) :], line]
        logger.warning("Telegram: skipped an update without a usable update_id: %s", line)

    async def _next_batch(self) -> list[Any] | None:
        """The next batch of raw updates (confirming everything below `offset`); None to stop."""
        failures = 0
        while not self._stopping.is_set():
            try:
                result = await self._unless_stopped(self._get_updates(self.offset, self.poll_timeout, BATCH))
            except _Stopped:
                return None
            except InvalidToken as exc:
                self.on_fatal(
                    f"Telegram no longer accepts YANRAY_TELEGRAM_TOKEN ({exc.message}); "
                    "get the current token from @BotFather"
                )
                return None
            except RetryAfter as exc:
                wait = retry_seconds(exc)
                logger.warning("Telegram: flood control on getUpdates, waiting %.0f s", wait)
            except Conflict as exc:
                failures += 1
                wait = self._delay(failures)
                logger.error(
                    "Telegram: another program is receiving this bot's updates (%s); is a second "
                    "Yanray running with this token? Trying again in %.1f s",
                    exc.message,
                    wait,
                )
            except Exception as exc:  # network faults, time-outs, 5xx, a garbled answer
                failures += 1
                wait = self._delay(failures)
                level = logging.WARNING if failures == 1 else logging.DEBUG
                logger.log(level, "Telegram: getUpdates failed (%r); trying again in %.1f s", exc, wait)
            else:
                self._asked = max(self._asked, self.offset)
                if failures:
                    logger.info("Telegram: receiving updates again")
                if isinstance(result, list):
                    return result
                failures += 1
                wait = self._delay(failures)
                logger.warning("Telegram: getUpdates answered %s, not a list of updates", shorten(result))
            await self._sleep(wait)
        return None

    def _delay(self, failures: int) -> float:
        first, cap = self.backoff
        return min(cap, first * 2 ** (failures - 1))

    async def _get_updates(self, offset: int, wait: int, limit: int) -> Any:
        # parameters in the query: PTB's public request API takes no other form of them here
        query = urlencode(
            {
                "offset": offset,
                "limit": limit,
                "timeout": wait,
                "allowed_updates": json.dumps(self.allowed_updates),
            }
        )
        return await self._request.post(
            f"{self.bot.base_url}/getUpdates?{query}", read_timeout=wait + READ_SLACK
        )

    async def _unless_stopped(self, coro: Coroutine[Any, Any, T]) -> T:
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise _Stopped
        return task.result()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
