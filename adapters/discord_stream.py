"""How Yanray's answer appears on Discord: one `ReplyStream` per answered message.

The reply is a reply to the user's message (or the slash command's deferred response),
streamed by editing: `progress` only records the text and wakes a render task, which
touches Discord at most once per `YANRAY_DISCORD_EDIT_INTERVAL`, counted from the end of
the previous render, so consecutive edits of one message reach Discord at least an
interval apart (the last edit included: `finish` waits out the interval too). Text
longer than 2000 characters is split by `adapters/split.py` (code blocks closed and
reopened), and every render reconciles the messages already sent with the parts: a part
that changed is edited, a new part is sent, and at the end surplus parts are deleted.
Every send and edit carries `AllowedMentions.none()`: no model output pings anyone, and
the reply does not ping the asker either (they see it as a reply).

While the request waits, a notice with its queue position is the first message (it
becomes the answer); a typing indicator is kept up from `queued`/`started` until the end.

Faults, where the design is silent:
- 403 (missing permission in the channel): logged once per channel by the adapter, and
  the stream goes quiet; `finish` returns normally, so the answer counts as delivered
  instead of being retried forever.
- 5xx, connection errors and a 429 that discord.py did not handle (no `Via` header: a
  Cloudflare block) are retried with the adapter's backoff; if `finish` still fails it
  raises, the core keeps the answer undelivered, and the next start delivers it.
- A reply message deleted by someone (404) is sent again on the next render.
- Interaction tokens live 15 minutes: if one has expired, the answer is posted in the
  channel instead.
- An edited question: `successor()` makes a stream that takes over this one's messages;
  this one holds back its last word until `settle()` says whether the dispatcher accepted
  the edit (then it is dropped; otherwise delivered as usual).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import discord

from yanray.adapters.discord_sinks import TRANSIENT, Expired, Gone, Sink
from yanray.adapters.split import split_message

logger = logging.getLogger(__name__)

LIMIT = 2000  # characters in one Discord message
TYPING_EVERY = 8.0  # seconds; Discord shows "typing" for 10 s


@dataclass
class StreamConfig:
    """What a stream needs from its adapter."""

    interval: float
    retry_delays: Sequence[float]
    wait_ready: Callable[[], Awaitable[None]]
    note_forbidden: Callable[[int, str], None]
    #: start a background task the adapter cancels at stop
    spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]


@dataclass
class Slots:
    """The messages of one reply as sent so far; shared when an edit regenerates the answer."""

    sent: list[tuple[int | str, str]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_render: float = float("-inf")


class DiscordReplyStream:
    def __init__(
        self,
        sink: Sink,
        config: StreamConfig,
        *,
        fallback: Sink | None = None,
        slots: Slots | None = None,
        adopt: Callable[[], Awaitable[list[tuple[int | str, str]]]] | None = None,
    ) -> None:
        self.sink = sink
        self._adopt = adopt
        self.config = config
        self.fallback = fallback
        self.slots = slots or Slots()
        self._text = ""
        self._notice = ""
        self._closed = False
        self._gone = False
        self._render_task: asyncio.Task[None] | None = None
        self._typing_task: asyncio.Task[None] | None = None
        #: None, "pending" (an edit may replace this answer) or "confirmed" (it did)
        self._superseded: str | None = None
        self._held: tuple[str, str] | None = None

    # -- ReplyStream -----------------------------------------------------------------

    async def send(self, text: str) -> None:
        await self._last_word("finish", text)

    async def queued(self, position: int) -> None:
        if self._quiet():
            return
        self._notice = (
            "⏳ You're next." if position <= 1 else f"⏳ In the queue: {position - 1} ahead of you."
        )
        self._keep_typing()
        self._wake()

    async def started(self) -> None:
        if self._quiet():
            return
        if self._notice:
            self._notice = "✍️ Writing…"
            self._wake()
        self._keep_typing()

    async def progress(self, text: str) -> None:
        if self._quiet():
            return
        self._text = text
        self._wake()

    async def finish(self, text: str) -> None:
        await self._last_word("finish", text)

    async def fail(self, text: str) -> None:
        await self._last_word("fail", text)

    def watch(self, record: Callable[[Any], Awaitable[None]]) -> None:
        """Not needed here: after a restart `reopen` finds its earlier reply in the channel
        history (`ChannelSink.previous`), with what each message shows."""

    # -- edits: one answer replaced by another ----------------------------------------

    def successor(self) -> DiscordReplyStream:
        """A stream for the regenerated answer, editing this one's messages."""
        self._superseded = "pending"
        return DiscordReplyStream(self.sink, self.config, fallback=self.fallback, slots=self.slots)

    async def settle(self, replaced: bool) -> None:
        """The dispatcher decided: the edit `replaced` this answer, or not."""
        if replaced:
            self._superseded = "confirmed"
            self._stop_typing()
            return
        self._superseded = None
        held, self._held = self._held, None
        if held is not None:
            await self._last_word(*held)
        elif self._text or self._notice:
            self._wake()

    # -- internals ---------------------------------------------------------------------

    def _quiet(self) -> bool:
        return self._closed or self._gone or self._superseded is not None

    async def _last_word(self, kind: str, text: str) -> None:
        if self._superseded == "pending":
            self._held = (kind, text)
            return
        if self._closed or self._superseded == "confirmed":
            return
        self._closed = True
        self._stop_typing()
        if self._gone:
            return
        final = text if kind == "finish" else f"⚠️ {text}"
        await self._render(final, final=True)

    def _wake(self) -> None:
        if self._render_task is None or self._render_task.done():
            self._render_task = self.config.spawn(self._render_loop(), "discord-reply-render")

    async def _render_loop(self) -> None:
        shown: str | None = None
        while not self._quiet() and (self._text or self._notice) != shown:
            try:
                shown = await self._render(self._text or self._notice, final=False)
            except (discord.HTTPException, *TRANSIENT) as exc:
                logger.warning("Discord: a streaming update failed (%s); the final answer will follow", exc)
                return

    async def _render(self, text: str, *, final: bool) -> str | None:
        """Show `text` (for a progress render: the freshest text), an interval after the last render."""
        async with self.slots.lock:
            wait = self.slots.last_render + self.config.interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not final:
                if self._quiet():
                    return None
                text = self._text or self._notice
            try:
                await self.config.wait_ready()
                if self._adopt is not None:
                    adopt, self._adopt = self._adopt, None
                    if not self.slots.sent:
                        self.slots.sent = await adopt()
                await self._reconcile(text, final=final)
            except Gone:
                self._gone = True
                self._stop_typing()
            finally:
                self.slots.last_render = time.monotonic()
            return text

    async def _reconcile(self, text: str, *, final: bool) -> None:
        parts = [p if p.strip() else "\u200b" for p in split_message(text, LIMIT)] if text else []
        try:
            await self._apply(parts, final=final)
        except Expired:
            if self.fallback is None:
                raise Gone() from None
            logger.info("Discord: the interaction expired; answering in the channel instead")
            self.sink, self.fallback = self.fallback, None
            self.slots.sent.clear()
            await self._apply(parts, final=final)

    async def _apply(self, parts: list[str], *, final: bool) -> None:
        """Edit the parts that changed, send the new ones, and (at the end) delete the surplus."""
        sent = self.slots.sent
        for i, part in enumerate(parts):
            if i < len(sent):
                handle, shown = sent[i]
                if shown == part:
                    continue
                try:
                    await self._call(self.sink.edit, handle, part)
                    sent[i] = (handle, part)
                    continue
                except discord.NotFound:
                    logger.info("Discord: reply message %s was deleted; sending it again", handle)
                    del sent[i:]
            handle = await self._call(self.sink.send, part, first=i == 0)
            sent.append((handle, part))
        if final:
            for handle, _ in sent[len(parts) :]:
                try:
                    await self._call(self.sink.delete, handle)
                except discord.NotFound:
                    pass
            del sent[len(parts) :]

    async def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """One Discord call, retried with backoff while the failure is transient."""
        delays = list(self.config.retry_delays)
        while True:
            try:
                return await fn(*args, **kwargs)
            except discord.Forbidden as exc:
                self.config.note_forbidden(self.sink.channel_id, str(exc))
                raise Gone() from None
            except discord.NotFound as exc:
                if fn.__name__ == "send":  # the channel itself is gone
                    self.config.note_forbidden(self.sink.channel_id, str(exc))
                    raise Gone() from None
                raise
            except (discord.HTTPException, *TRANSIENT) as exc:
                status = exc.status if isinstance(exc, discord.HTTPException) else 0
                if not delays or 400 <= status < 500 and status != 429:
                    raise
                delay = delays.pop(0)
                logger.warning("Discord: %s failed (%s); retrying in %.2f s", fn.__name__, exc, delay)
                await asyncio.sleep(delay)

    def _keep_typing(self) -> None:
        if self._typing_task is None or self._typing_task.done():
            self._typing_task = self.config.spawn(self._typing_loop(), "discord-typing")

    async def _typing_loop(self) -> None:
        await self.config.wait_ready()
        while not self._quiet():
            try:
                await self.sink.typing()
            except discord.Forbidden as exc:
                self.config.note_forbidden(self.sink.channel_id, str(exc))
                return
            except (discord.HTTPException, *TRANSIENT) as exc:
                logger.debug("Discord: typing indicator failed: %s", exc)
            await asyncio.sleep(TYPING_EVERY)

    def _stop_typing(self) -> None:
        if self._typing_task is not None and self._typing_task is not asyncio.current_task():
            self._typing_task.cancel()
