"""`TelegramReply`: the ReplyStream that shows one answer in a Telegram chat.

How an answer appears:
- private chat, nothing shown yet: `sendMessageDraft` with the reply so far, at most
  once per `draft_interval` (1 s), then the final `sendMessage` at once;
- group chat, or once a message exists (a queue notice, or the reply being replaced
  after the user edited their question): one message edited with the growing text.
  In a group every write takes a per-chat slot, so the group sees at most one write per
  `YANRAY_TELEGRAM_EDIT_INTERVAL` seconds, final edit included (several answers in one
  group share the slots). In a private chat previews are paced per answer like drafts
  and the final text goes out at once: the engine worker awaits delivery, so a wait
  there would idle the engine for everyone;
- "typing" every 4.5 s from queued/started until the final text;
- the final text is split at 4096 (fewer when astral characters, which count twice in
  Telegram's UTF-16 limit, are present) with `adapters.split`; each part is sent as
  HTML from `telegram_format` and re-sent plain if Telegram says "can't parse
  entities"; an edit answered "message is not modified" is ignored (by that text only).

Faults: `RetryAfter` waits the given time and tries again (previews and final alike,
so flood control delays a reply but never drops it); network errors, time-outs and
5xx answers retry with exponential backoff; 403 marks the chat blocked (stored through
`StreamContext.store_blocked`, so a restart does not write there either) and the stream
stops quietly; any other Telegram error on the final text is logged once with its
traceback and the user gets a one-line apology. A failed preview is only a warning:
the final text is still sent. A time-out on `sendMessage` is retried, which can, rarely,
show a part twice; losing it would be worse.

After the adapter stopped, previews stop and a final text raises `AdapterStopped`, so
the worker leaves the stored answer undelivered and the next start sends it.

Where the design is silent: `fail()` after a partial answer keeps the partial text
and adds the reason below it; a stream that took over an earlier reply (the user
edited their question) edits that reply's messages and deletes ones no longer needed
(after a restart there is no earlier stream: the messages it reported, `shown`, stand in);
group answers reply to the user's message, private ones do not quote.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import warnings
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from telegram import Bot, Message, ReplyParameters
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError
from telegram.warnings import PTBDeprecationWarning

from yanray.adapters.split import split_message
from yanray.adapters.telegram_format import markdown_to_html
from yanray.bot.dispatcher import position_text
from yanray.bot.errors import YanrayError

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_CHARS = 4096
EMPTY = "(empty reply)"
APOLOGY = "Sorry, I could not send my answer because of a Telegram error. Please try again."
MAX_FLOOD_WAITS = 10
MAX_NETWORK_TRIES = 5


class AdapterStopped(YanrayError):
    """A final text arrived after the adapter stopped (shutdown while answering)."""


class ChatBlocked(Exception):
    """The user blocked the bot (or it left the group): stop writing to the chat."""


def retry_seconds(exc: RetryAfter) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


async def with_retries(make: Callable[[], Awaitable[T]], *, chat_id: int, retry_base: float) -> T:
    """Run one API call, waiting out flood control and retrying network faults."""
    floods = failures = 0
    while True:
        try:
            return await make()
        except RetryAfter as exc:
            floods += 1
            if floods > MAX_FLOOD_WAITS:
                raise
            wait = retry_seconds(exc)
            logger.info("chat %s: flood control, retrying in %.0f s", chat_id, wait)
            await asyncio.sleep(wait)
        except BadRequest:
            raise  # a subclass of NetworkError, but retrying cannot help
        except Forbidden as exc:
            raise ChatBlocked(exc.message) from exc
        except NetworkError as exc:  # also TimedOut and 5xx answers
            failures += 1
            if failures >= MAX_NETWORK_TRIES:
                raise
            wait = retry_base * 2 ** (failures - 1)
            logger.info("chat %s: %s; retrying in %.1f s", chat_id, exc.message, wait)
            await asyncio.sleep(wait)


def _digest(part: str) -> str:
    """What a message shows, in short: enough to tell after a restart whether it is current."""
    return hashlib.blake2b(part.encode("utf-8", "replace"), digest_size=8).hexdigest()


def _says(exc: TelegramError, fragment: str) -> bool:
    return fragment in exc.message.lower()


class Throttle:
    """Per-chat spacing of writes: each caller books the next free slot and waits for it."""

    def __init__(self) -> None:
        self._next: dict[int, float] = {}

    async def wait(self, chat_id: int, interval: float) -> None:
        if interval <= 0:
            return
        now = asyncio.get_running_loop().time()
        if len(self._next) > 10_000:
            self._next = {chat: t for chat, t in self._next.items() if t > now}
        slot = max(now, self._next.get(chat_id, 0.0))
        self._next[chat_id] = slot + interval
        if slot > now:
            try:
                await asyncio.sleep(slot - now)
            except asyncio.CancelledError:
                if self._next.get(chat_id) == slot + interval:
                    self._next[chat_id] = slot  # give the unused slot back
                raise


@dataclass
class StreamContext:
    """What every stream of one adapter shares."""

    get_bot: Callable[[], Bot]
    edit_interval: float
    draft_interval: float = 1.0
    typing_interval: float = 4.5
    retry_base: float = 0.5
    throttle: Throttle = field(default_factory=Throttle)
    #: chats that refused the bot's messages; loaded from storage at start
    blocked: set[int] = field(default_factory=set)
    #: stores that a chat blocked the bot (True) or wrote again (False); logs its own failures
    store_blocked: Callable[[int, bool], Awaitable[None]] | None = None
    #: (chat id, user message id) -> the stream answering it in this run, for edits of that
    #: message (one still writing is taken over; after a restart the stored `shown` is used)
    replies: OrderedDict[tuple[int, int], TelegramReply] = field(default_factory=OrderedDict)
    live: set[TelegramReply] = field(default_factory=set)
    #: small tasks that must not be garbage-collected while they run
    background: set[asyncio.Future[None]] = field(default_factory=set)
    #: False once the adapter stopped: previews stop, final texts raise (the core keeps them)
    running: bool = False
    max_replies: int = 4096

    def remember(self, key: tuple[int, int], stream: TelegramReply) -> None:
        self.replies[key] = stream
        self.replies.move_to_end(key)
        while len(self.replies) > self.max_replies:
            self.replies.popitem(last=False)


class TelegramReply:
    """One answer in one chat (implements `yanray.bot.types.ReplyStream`)."""

    def __init__(
        self,
        ctx: StreamContext,
        *,
        chat_id: int,
        reply_to: int | None,
        private: bool,
        thread_id: int | None = None,
        takeover: TelegramReply | None = None,
        shown: Sequence[Sequence[Any]] = (),
    ) -> None:
        self.ctx, self.chat_id, self.reply_to = ctx, chat_id, reply_to
        self.private, self.thread_id = private, thread_id
        # the bot's messages showing this answer, and a digest of the Markdown each shows;
        # `shown` is what an earlier run reported (`watch`), so they are edited, not repeated
        self.messages: list[int] = []
        self._shown: list[str] = []
        for item in shown:
            if len(item) == 2 and isinstance(item[0], int) and isinstance(item[1], str):
                self.messages.append(item[0])
                self._shown.append(item[1])
        self._record: Callable[[Any], Awaitable[None]] | None = None
        self._takeover = takeover
        self._latest = ""  # what the next preview shows
        self._partial = ""  # the reply so far
        # preview by editing a message instead of drafts
        self._use_messages = not private or bool(self.messages)
        self._closed = False
        self._wake = asyncio.Event()
        self._io = asyncio.Lock()  # held for every write, so writes never overlap
        self._claim = asyncio.Lock()
        self._pump: asyncio.Task[None] | None = None
        self._typing: asyncio.Task[None] | None = None
        self._last_preview = 0.0
        self._draft_id = reply_to or random.randint(1, 2**31 - 1)
        if reply_to is not None and takeover is None:
            ctx.remember((chat_id, reply_to), self)

    # -- ReplyStream -------------------------------------------------------------------

    async def send(self, text: str) -> None:
        await self._final(text)

    async def queued(self, position: int) -> None:
        if await self._begin():
            self._use_messages = True
            self._latest = f"⏳ {position_text(position)} I'll answer here."
            self._start_typing()
            self._kick()

    async def started(self) -> None:
        if await self._begin():
            self._start_typing()

    async def progress(self, text: str) -> None:
        if text.strip() and await self._begin():
            self._latest = self._partial = text
            self._kick()

    async def finish(self, text: str) -> None:
        await self._final(text)

    async def fail(self, text: str) -> None:
        partial = self._partial.rstrip()
        await self._final(f"{partial}\n\n⚠️ {text}" if partial else text)

    def watch(self, record: Callable[[Any], Awaitable[None]]) -> None:
        self._record = record

    async def _report(self) -> None:
        """Tell the core which messages show this answer now (stored for a restart), when a
        message was added or deleted."""
        if self._record is not None:
            await self._record(
                [[mid, digest] for mid, digest in zip(self.messages, self._shown, strict=True)]
            )

    def abort(self) -> None:
        """Stop background work without writing anything (the adapter is stopping)."""
        self._closed = True
        self._cancel_tasks()
        self.ctx.live.discard(self)

    # -- lifecycle ---------------------------------------------------------------------

    async def _begin(self, *, final: bool = False) -> bool:
        if not self.ctx.running:
            if final:  # the worker leaves the answer undelivered; it is sent at the next start
                raise AdapterStopped("the Telegram adapter has stopped; the answer is sent at the next start")
            return False
        if self._closed or self.chat_id in self.ctx.blocked:
            return False
        if self._takeover is not None:
            async with self._claim:  # concurrent progress() calls wait for the takeover
                old = self._takeover
                if old is not None:
                    async with old._io:  # let its write in flight land, so its message ids are known
                        old.abort()
                    self.messages, self._shown = list(old.messages), list(old._shown)
                    self._use_messages = bool(self.messages) or not self.private
                    if self.reply_to is not None:
                        self.ctx.remember((self.chat_id, self.reply_to), self)
                    self._takeover = None
        self.ctx.live.add(self)
        return True

    def _kick(self) -> None:
        self._wake.set()
        if self._pump is None:
            self._pump = asyncio.create_task(self._run_pump(), name=f"telegram-preview-{self.chat_id}")

    def _start_typing(self) -> None:
        if self._typing is None:
            self._typing = asyncio.create_task(self._run_typing(), name=f"telegram-typing-{self.chat_id}")

    def _cancel_tasks(self) -> None:
        for task in (self._pump, self._typing):
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    def _blocked(self) -> None:
        self.abort()
        if self.chat_id in self.ctx.blocked:
            return
        logger.info("chat %s blocked the bot; not writing to it until it writes again", self.chat_id)
        self.ctx.blocked.add(self.chat_id)
        if self.ctx.store_blocked is not None:
            task = asyncio.ensure_future(self.ctx.store_blocked(self.chat_id, True))
            self.ctx.background.add(task)
            task.add_done_callback(self.ctx.background.discard)

    def _bot(self) -> Bot:
        return self.ctx.get_bot()

    # -- background: previews and "typing" ---------------------------------------------

    async def _run_pump(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                if self.private:
                    await asyncio.sleep(max(0.0, self._last_preview + self.ctx.draft_interval - loop.time()))
                else:
                    await self.ctx.throttle.wait(self.chat_id, self.ctx.edit_interval)
                self._wake.clear()
                async with self._io:
                    if self._closed:
                        return
                    if self._use_messages:
                        if await self._sync_one(self._parts(self._latest)):
                            self._wake.set()
                    else:
                        await self._draft(self._parts(self._latest)[-1])
                    self._last_preview = loop.time()
        except ChatBlocked:
            self._blocked()
        except TelegramError as exc:
            logger.warning(
                "chat %s: preview failed (%s); the final answer will still be sent", self.chat_id, exc
            )

    async def _run_typing(self) -> None:
        while True:
            try:
                await self._bot().send_chat_action(
                    self.chat_id, ChatAction.TYPING, message_thread_id=self.thread_id
                )
            except Forbidden:
                self._blocked()
                return
            except RetryAfter as exc:
                await asyncio.sleep(retry_seconds(exc))
                continue
            except TelegramError as exc:
                logger.debug("chat %s: typing action failed: %s", self.chat_id, exc)
            await asyncio.sleep(self.ctx.typing_interval)

    # -- the final text ----------------------------------------------------------------

    async def _final(self, text: str) -> None:
        if not await self._begin(final=True):
            return
        self._closed = True
        async with self._io:
            self._cancel_tasks()
            await self._write_final(text)

    async def _write_final(self, text: str) -> None:
        edited = False
        try:
            parts = self._parts(text)
            for index, part in enumerate(parts):
                if index < len(self.messages) and self._shown[index] == _digest(part):
                    continue
                if not self.private:
                    await self.ctx.throttle.wait(self.chat_id, self.ctx.edit_interval)
                if index < len(self.messages):
                    await self._edit(index, part)
                    edited = True
                else:
                    await self._send_new(part)
            for message_id in self.messages[len(parts) :]:
                with contextlib.suppress(BadRequest):
                    await with_retries(
                        lambda mid=message_id: self._bot().delete_message(self.chat_id, mid),  # type: ignore[misc]
                        chat_id=self.chat_id,
                        retry_base=self.ctx.retry_base,
                    )
            if len(self.messages) > len(parts):
                del self.messages[len(parts) :], self._shown[len(parts) :]
                await self._report()
            elif edited and self._record is not None:
                # the final text is on the screen: stored in the background (no wait for the
                # database here), so a restart before `delivered` is stored touches nothing
                task = asyncio.ensure_future(self._report())
                self.ctx.background.add(task)
                task.add_done_callback(self.ctx.background.discard)
        except ChatBlocked:
            self._blocked()
        except (BadRequest, RetryAfter) as exc:
            await self._apologise(exc)  # Telegram refuses this text for good: say so once
        except NetworkError:
            # Telegram unreachable after every retry: the worker leaves the stored answer
            # undelivered, and the next start sends it
            logger.warning("chat %s: Telegram unreachable; the answer waits for the next start", self.chat_id)
            raise
        except TelegramError as exc:
            await self._apologise(exc)
        finally:
            self.ctx.live.discard(self)

    async def _apologise(self, exc: TelegramError) -> None:
        logger.error("chat %s: the answer could not be delivered", self.chat_id, exc_info=exc)
        try:
            await self._bot().send_message(self.chat_id, APOLOGY, message_thread_id=self.thread_id)
        except TelegramError as again:
            logger.warning("chat %s: the apology could not be sent either: %s", self.chat_id, again)

    # -- single writes -----------------------------------------------------------------

    def _parts(self, text: str) -> list[str]:
        astral = sum(1 for char in text if ord(char) > 0xFFFF)
        limit = MAX_CHARS - min(astral, MAX_CHARS // 2)
        parts = [part for part in split_message(text, limit) if part.strip()]
        return parts or [EMPTY]

    async def _sync_one(self, parts: list[str]) -> bool:
        """Make at most one write towards showing `parts`; True if more remain."""
        digests = [_digest(part) for part in parts]
        for index, part in enumerate(parts):
            if index >= len(self.messages):
                await self._send_new(part)
                break
            if self._shown[index] != digests[index]:
                await self._edit(index, part)
                break
        return len(parts) > len(self.messages) or self._shown[: len(parts)] != digests[: len(self._shown)]

    async def _formatted(self, write: Callable[[str, str | None], Awaitable[T]], part: str) -> T:
        """Send `part` as HTML, or plain if Telegram cannot parse the HTML."""
        try:
            return await with_retries(
                lambda: write(markdown_to_html(part), ParseMode.HTML),
                chat_id=self.chat_id,
                retry_base=self.ctx.retry_base,
            )
        except BadRequest as exc:
            if not _says(exc, "can't parse entities"):
                raise
            logger.info("chat %s: Telegram rejected the formatting (%s); sending it plain", self.chat_id, exc)
        return await with_retries(
            lambda: write(part, None), chat_id=self.chat_id, retry_base=self.ctx.retry_base
        )

    async def _send_new(self, part: str) -> None:
        quote = None
        if self.reply_to is not None and not self.private and not self.messages:
            quote = ReplyParameters(message_id=self.reply_to, allow_sending_without_reply=True)

        def write(text: str, mode: str | None) -> Awaitable[Message]:
            return self._bot().send_message(
                self.chat_id, text, parse_mode=mode, reply_parameters=quote, message_thread_id=self.thread_id
            )

        message = await self._formatted(write, part)
        self.messages.append(message.message_id)
        self._shown.append(_digest(part))
        await self._report()

    async def _edit(self, index: int, part: str) -> None:
        message_id = self.messages[index]

        def write(text: str, mode: str | None) -> Awaitable[Message | bool]:
            return self._bot().edit_message_text(
                text, chat_id=self.chat_id, message_id=message_id, parse_mode=mode
            )

        try:
            await self._formatted(write, part)
        except BadRequest as exc:
            if _says(exc, "message to edit not found"):
                # the user deleted it: show this part as a new message at the end instead
                del self.messages[index], self._shown[index]
                await self._send_new(part)
                return
            if not _says(exc, "message is not modified"):
                raise
        # not reported: after a restart an edit to the same text is "not modified", which is
        # harmless, so only a change of message ids is worth a database write
        self._shown[index] = _digest(part)

    async def _draft(self, part: str) -> None:
        def write(text: str, mode: str | None) -> Awaitable[bool]:
            return self._bot().send_message_draft(
                self.chat_id, self._draft_id, text, parse_mode=mode, message_thread_id=self.thread_id
            )

        await self._formatted(write, part)
