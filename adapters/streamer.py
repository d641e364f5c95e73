"""`ReplyStreamer`: how one answer appears, the same on every platform that can edit.

It implements `yanray.bot.types.ReplyStream` once; a platform supplies a thin `Sink`
(`adapters/sink.py`: send, edit, delete, draft, typing, its length limit and formatting).
The core decides every word (the queue notice, a failure's reason, "[Stopped.]"); the
streamer only shows them.

How an answer appears:
- a notice (`notice`) is the first message, and becomes the answer;
- the reply so far is shown by a render task: `progress` only stores the text and wakes
  it. In a group every write takes the chat's next slot (`Throttle`, `edit_interval`),
  the final text included, so several answers in one chat share the platform's budget. In
  a private chat (`Sink.private`) previews are paced per answer (`preview_interval`) and
  the final text goes out at once: the engine worker may be waiting for it. While no
  message shows the answer, a sink with drafts (Telegram's sendMessageDraft) previews
  the last part as a draft; otherwise messages are edited;
- "typing" is kept up from the notice or start until the final text;
- the text is split with `adapters.split` at the sink's limit. Every write makes the
  messages show the parts: a changed part is edited, a new part sent, and the final text
  deletes the messages it no longer needs. A part whose message someone deleted is sent
  again (and the messages after it are sent anew, so the order holds);
- `fail(reason)` keeps the partial answer and adds "⚠️ reason" below it;
- an image (a tool's plot, `image`) is posted when the tool round produces it: the reply
  so far is first written out as messages (a notice alone is deleted), then the picture
  is sent, and those messages are sealed: the rest of the answer goes into new messages
  below the picture, so the order reads text, picture, text on every platform. A picture
  is not in `Shown` (it is never edited or deleted); a regenerated answer (an edit, a
  restart) draws it again below the text it rewrote. A picture the platform refuses, or
  cannot take after the retries, raises `DeliveryRefused`: the answer carries on.

Faults (each failed call is told to `StreamerContext.on_fault`, for the metrics): a flood
wait (`Flood`) is waited out and the write tried again, so a reply is
delayed but never dropped; network faults and 5xx answers (`Transient`) are retried with
the context's growing pauses, and if the final text still fails the error goes to the
core, which keeps the answer undelivered for the next start. A 403 (`Blocked`) makes the
stream go quiet: the adapter hears of it once (`on_blocked`) and the answer counts as
delivered. A final text the platform refuses for good (`Rejected`) raises
`DeliveryRefused`: the core then sends its one-line apology through the same stream. A
failed preview is only a warning; the final text still goes out.

Restarts and edits: `watch` reports the shown messages (handle and a digest of the part)
whenever a message is added or removed; after a restart they come back as `shown`, so
what is on the screen is edited and a part already showing the right text is not written
again. A sink may also find its earlier messages itself (`Sink.earlier`). When the user
edits their question, `successor()` hands this answer's messages to the stream of the new
answer: this one goes quiet at once (its last word is dropped) and the successor edits
its messages. After the adapter stopped (`StreamerContext.running` false) previews stop
and a final text raises `AdapterStopped`, so the core leaves the answer undelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from yanray.adapters.sink import (
    Blocked,
    Flood,
    MessageGone,
    Moved,
    Rejected,
    Shown,
    Sink,
    SinkError,
    StreamerContext,
    Transient,
    digest,
)
from yanray.adapters.split import split_message
from yanray.bot.errors import AdapterStopped, DeliveryRefused
from yanray.bot.types import Image

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_FLOOD_WAITS = 10


class ReplyStreamer:
    """One answer in one place (implements `yanray.bot.types.ReplyStream`)."""

    def __init__(
        self,
        ctx: StreamerContext,
        sink: Sink,
        *,
        shown: Shown | None = None,
        key: Hashable | None = None,
    ) -> None:
        self.ctx, self.sink = ctx, sink
        self.shown = shown if shown is not None else Shown()
        #: the user's message it answers, in `ctx.answers` (for edits)
        self.key = key
        if key is not None:
            ctx.remember(key, self)
        self._record: Callable[[Any], Awaitable[None]] | None = None
        self._latest = ""  # what the next preview shows
        self._partial = ""  # the reply so far
        self._noticed = False
        self._closed = False  # the final text is out, or the stream went quiet
        self._superseded = False
        self._wake = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._typing: asyncio.Task[None] | None = None
        self._last_preview = float("-inf")
        #: the reply up to the last image, and its parts: shown above the image, never rewritten
        self._sealed: tuple[str, list[str]] | None = None

    # -- ReplyStream -------------------------------------------------------------------

    async def send(self, text: str) -> None:
        await self._final(text)

    async def notice(self, text: str) -> None:
        if self._open():
            self._noticed = True
            self._latest = text
            self._start_typing()
            self._kick()

    async def started(self) -> None:
        if self._open():
            self._start_typing()

    async def progress(self, text: str) -> None:
        if text.strip() and self._open():
            self._latest = self._partial = text
            self._kick()

    async def finish(self, text: str) -> None:
        await self._final(text)

    async def fail(self, text: str) -> None:
        partial = self._partial.rstrip()
        await self._final(f"{partial}\n\n⚠️ {text}" if partial else f"⚠️ {text}")

    def watch(self, record: Callable[[Any], Awaitable[None]]) -> None:
        self._record = record

    async def image(self, image: Image) -> None:
        if not self._open():
            raise DeliveryRefused(f"{self.sink.key}: the answer is no longer shown here")
        try:
            async with self.shown.lock:
                await self._look_back()
                text = self._partial.strip()
                if text:
                    parts = self._parts(text)
                    await self._sync(parts, final=True)
                    self._sealed = (text, parts)
                elif self._sealed is None and self.shown.messages:
                    await self._remove_from(0)  # only a notice shows: the answer follows the picture
                await self._write(lambda: self.sink.photo(image), final=True)
        except Blocked as exc:
            self._blocked(exc)
            raise DeliveryRefused(f"{self.sink.key}: the chat refuses the bot ({exc})") from exc
        except SinkError as exc:
            logger.warning("%s: an image could not be sent (%s); the answer goes on", self.sink.key, exc)
            raise DeliveryRefused(f"{self.sink.key}: the platform did not take the image ({exc})") from exc

    # -- edits, stopping ---------------------------------------------------------------

    def successor(self) -> ReplyStreamer:
        """The stream of a regenerated answer (the user edited the question): it edits this
        one's messages, and this one goes quiet now (its last word is dropped)."""
        self._superseded = True
        self._wake.set()  # the render task sees it after its write in flight, and ends
        if self._typing is not None:
            self._typing.cancel()
        self.ctx.live.discard(self)
        return ReplyStreamer(self.ctx, self.sink, shown=self.shown, key=self.key)

    def abort(self) -> None:
        """Stop background work without writing anything (the adapter is stopping)."""
        self._closed = True
        for task in (self._pump, self._typing):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self.ctx.live.discard(self)

    def _open(self, *, final: bool = False) -> bool:
        if self._superseded:
            return False  # its successor answers now, also after a restart
        if not self.ctx.running:
            if final:  # the core leaves the answer undelivered; the next start sends it
                raise AdapterStopped("the adapter has stopped; the answer is sent at the next start")
            return False
        if self._quiet() or self.sink.key in self.ctx.blocked:
            return False
        self.ctx.live.add(self)
        return True

    def _quiet(self) -> bool:
        return self._closed or self._superseded or not self.ctx.running

    def _blocked(self, exc: Blocked) -> None:
        self.abort()
        if self.ctx.on_blocked is not None:
            self.ctx.on_blocked(self.sink.key, str(exc))

    # -- background: previews and "typing" ---------------------------------------------

    def _kick(self) -> None:
        self._wake.set()
        if self._pump is None:
            self._pump = asyncio.create_task(self._run_pump(), name=f"reply-preview-{self.sink.key}")

    def _start_typing(self) -> None:
        if self._typing is None:
            self._typing = asyncio.create_task(self._run_typing(), name=f"reply-typing-{self.sink.key}")

    def _slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        """A group write waits for the chat's next slot; a private chat's does not."""
        if self.sink.private:
            return contextlib.nullcontext()
        return self.ctx.throttle.slot(self.sink.key, self.ctx.edit_interval)

    async def _run_pump(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                if self.sink.private:
                    await asyncio.sleep(
                        max(0.0, self._last_preview + self.ctx.preview_interval - loop.time())
                    )
                busy = more = False
                async with self._slot():
                    self._wake.clear()
                    if self._quiet():
                        return
                    # never wait for the lock while holding a slot: the final text holds the
                    # lock and waits for slots (and a preview is moot once it is written)
                    busy = self.shown.lock.locked()
                    if not busy:
                        async with self.shown.lock:
                            more = await self._preview()
                if busy:  # another write (a successor's, the final's) first; then look again
                    async with self.shown.lock:
                        pass
                    self._wake.set()
                    continue
                self._last_preview = loop.time()
                if more:
                    self._wake.set()
        except Blocked as exc:
            self._blocked(exc)
        except SinkError as exc:
            logger.warning(
                "%s: a preview failed (%s); the final answer will still be sent", self.sink.key, exc
            )

    async def _run_typing(self) -> None:
        while not self._quiet():
            try:
                await self.sink.typing()
            except Blocked as exc:
                self.ctx.fault(exc)
                self._blocked(exc)
                return
            except Flood as exc:
                self.ctx.fault(exc)
                await asyncio.sleep(exc.seconds)
                continue
            except SinkError as exc:
                self.ctx.fault(exc)
                logger.debug("%s: the typing action failed: %s", self.sink.key, exc)
            await asyncio.sleep(self.sink.typing_every)

    async def _preview(self) -> bool:
        """One write towards showing the latest text; True if more remain."""
        await self._look_back()
        parts = self._parts(self._latest)
        if not parts:
            return False
        if self._noticed or self.shown.messages or not self.sink.drafts:
            return await self._sync(parts, final=False)
        await self._call(lambda: self.sink.draft(parts[-1]))
        return False

    # -- the final text ----------------------------------------------------------------

    async def _final(self, text: str) -> None:
        if not self._open(final=True):
            return
        self._closed = True
        if self._typing is not None:
            self._typing.cancel()
        try:
            async with self.shown.lock:
                if self._pump is not None:
                    self._pump.cancel()  # it does not hold the lock: no write of its is in flight
                if not self._superseded:
                    await self._write_final(text)
        finally:
            self.ctx.live.discard(self)

    async def _write_final(self, text: str) -> None:
        parts = self._parts(text)
        try:
            if not parts:
                raise Rejected("the answer has no visible text")
            await self._look_back()
            await self._sync(parts, final=True)
        except Blocked as exc:
            self._blocked(exc)
        except (Rejected, Flood) as exc:
            self._closed = False  # the core's one-line apology may follow through `send`
            raise DeliveryRefused(f"{self.sink.key}: the platform refused the answer ({exc})") from exc
        except Transient:
            logger.warning(
                "%s: the platform is unreachable; the answer waits for the next start", self.sink.key
            )
            raise

    # -- matching parts to messages ----------------------------------------------------

    def _parts(self, text: str) -> list[str]:
        if self._sealed is not None:
            sealed, parts = self._sealed
            body = text.lstrip()
            if body.startswith(sealed):  # the text above the last image stays as it was sent
                return parts + self._split(body[len(sealed) :].strip())
        return self._split(text)

    def _split(self, text: str) -> list[str]:
        return [part for part in split_message(text, self.sink.limit(text)) if part.strip()]

    async def _look_back(self) -> None:
        shown = self.shown
        if not shown.looked_back:
            shown.looked_back = True
            if not shown.messages:
                for handle, text in await self.sink.earlier():
                    shown.messages.append(handle)
                    shown.digests.append(digest(text))

    async def _sync(self, parts: list[str], *, final: bool) -> bool:
        """Make the messages show `parts`: all of them (and delete the surplus) for the final
        text; one write for a preview, returning whether more remain."""
        try:
            return await self._sync_once(parts, final=final)
        except Moved as exc:
            logger.info("%s: %s; sending the answer anew", self.sink.key, exc)
            self.shown.truncate(0)
            await self._report()
            return await self._sync_once(parts, final=final)

    async def _sync_once(self, parts: list[str], *, final: bool) -> bool:
        shown = self.shown
        digests = [digest(part) for part in parts]
        edited = False
        index = 0
        while index < len(parts):
            part = parts[index]
            if index < len(shown.messages):
                if shown.digests[index] == digests[index]:
                    index += 1
                    continue
                try:
                    await self._write(lambda h=shown.messages[index], p=part: self.sink.edit(h, p), final)  # type: ignore[misc]
                except MessageGone:
                    logger.info("%s: a message of the answer was deleted; sending it again", self.sink.key)
                    await self._remove_from(index)
                    continue
                shown.digests[index] = digests[index]
                edited = True
            else:
                first = index == 0
                handle = await self._write(lambda p=part, f=first: self.sink.send(p, first=f), final)  # type: ignore[misc]
                shown.messages.append(handle)
                shown.digests.append(digests[index])
                await self._report()
            index += 1
            if not final:
                return (
                    len(parts) > len(shown.messages)
                    or shown.digests[: len(parts)] != digests[: len(shown.digests)]
                )
        if not final:
            return False
        if len(shown.messages) > len(parts):
            await self._remove_from(len(parts))
        elif edited and self._record is not None:
            # the final text is on the screen: stored in the background (no wait for the
            # database here), so a restart before `delivered` is stored touches nothing
            self.ctx.spawn(self._report())
        return False

    async def _remove_from(self, index: int) -> None:
        """Delete the messages from `index` on (ones already gone are fine)."""
        for handle in self.shown.messages[index:]:
            try:
                await self._call(lambda h=handle: self.sink.delete(h))  # type: ignore[misc]
            except (MessageGone, Rejected) as exc:
                logger.info("%s: message %s could not be deleted (%s)", self.sink.key, handle, exc)
        self.shown.truncate(index)
        await self._report()

    async def _report(self) -> None:
        """Tell the core which messages show this answer now (stored for a restart)."""
        if self._record is not None:
            await self._record(self.shown.as_json())

    # -- single calls ------------------------------------------------------------------

    async def _write(self, make: Callable[[], Awaitable[T]], final: bool) -> T:
        """A send or edit: the final text's writes take the chat's slots one by one (a
        preview's render task already holds one)."""
        if not final:
            return await self._call(make)
        async with self._slot():
            return await self._call(make)

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        """One platform call, waiting out flood control and retrying transient faults."""
        floods = 0
        delays = iter(self.ctx.retry_delays)
        while True:
            try:
                return await make()
            except Flood as exc:
                self.ctx.fault(exc)
                floods += 1
                if floods > MAX_FLOOD_WAITS:
                    raise
                logger.info("%s: flood control, retrying in %.1f s", self.sink.key, exc.seconds)
                await asyncio.sleep(exc.seconds)
            except Transient as exc:
                self.ctx.fault(exc)
                delay = next(delays, None)
                if delay is None:
                    raise
                logger.info("%s: %s; retrying in %.2f s", self.sink.key, exc, delay)
                await asyncio.sleep(delay)
            except SinkError as exc:  # the rest are the caller's to handle; counted here, once
                self.ctx.fault(exc)
                raise
