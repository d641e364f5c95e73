"""Where one Discord answer goes, for `adapters/streamer.py`: channel messages, or a slash
command's webhook.

A sink does one REST call per method (after waiting for the gateway to be ready) and turns
discord.py's errors into the streamer's kinds: 403, and a 404 on sending (the channel is
gone), `Blocked`; a 404 on an edit or delete `MessageGone`; 5xx, connection errors and a
429 that discord.py did not handle itself (no `Via` header: a Cloudflare block)
`Transient`; any other 4xx `Rejected`. A part is at most 2000 characters. A picture is a
message with the PNG as an attachment (a multipart upload) and its caption escaped. Every send and
edit carries `NO_PINGS` (`AllowedMentions.none()`), so no text Yanray posts can ping
@everyone, @here, a role or a user, the asker included (they see the answer as a reply).

Interaction tokens live 15 minutes: when one has expired, `InteractionSink` moves to the
channel (`Moved`: the streamer sends the answer anew there).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import discord

from yanray.adapters.sink import Blocked, Handle, MessageGone, Moved, Rejected, Transient
from yanray.bot.types import Image

logger = logging.getLogger(__name__)

NO_PINGS = discord.AllowedMentions.none()
TRANSIENT = (discord.DiscordServerError, aiohttp.ClientError, OSError, asyncio.TimeoutError)
LIMIT = 2000  # characters in one Discord message


@contextlib.asynccontextmanager
async def _translated(*, sending: bool = False) -> AsyncIterator[None]:
    """discord.py's errors as the streamer's kinds."""
    try:
        yield
    except discord.Forbidden as exc:
        raise Blocked(str(exc)) from exc
    except discord.NotFound as exc:
        if sending:  # the channel itself is gone
            raise Blocked(str(exc)) from exc
        raise MessageGone(str(exc)) from exc
    except discord.HTTPException as exc:
        if exc.status >= 500 or exc.status == 429:
            raise Transient(str(exc)) from exc
        raise Rejected(str(exc)) from exc
    except TRANSIENT as exc:
        raise Transient(str(exc) or type(exc).__name__) from exc


def _file(image: Image) -> discord.File:
    return discord.File(io.BytesIO(image.data), filename=image.name)


def _caption(image: Image) -> str | None:
    """The caption as plain text: Discord would read `x**2` as bold."""
    return discord.utils.escape_markdown(image.caption)[:LIMIT] or None


class _DiscordSink:
    """What every Discord sink shares (implements `adapters.sink.Sink` with its subclasses)."""

    private = False  # DMs too: Discord limits every channel's writes
    drafts = False
    typing_every = 8.0  # Discord shows "typing" for 10 s

    def __init__(self, channel_id: int, wait_ready: Callable[[], Awaitable[None]]) -> None:
        self.key = self.channel_id = channel_id
        self.wait_ready = wait_ready

    def limit(self, text: str) -> int:
        return LIMIT

    async def draft(self, text: str) -> None:
        raise Rejected("Discord has no drafts")

    async def earlier(self) -> list[tuple[Handle, str]]:
        return []


class ChannelSink(_DiscordSink):
    """Parts as channel messages; the first replies to the user's message (if any).
    `look_back`: find an earlier answer to that message in the channel (after a restart)."""

    def __init__(
        self,
        client: discord.Client,
        channel_id: int,
        reply_to: int | None = None,
        *,
        wait_ready: Callable[[], Awaitable[None]],
        look_back: bool = False,
    ) -> None:
        super().__init__(channel_id, wait_ready)
        self.client = client
        self.channel = client.get_partial_messageable(channel_id)
        self.reply_to = reply_to
        self.look_back = look_back

    async def send(self, text: str, *, first: bool) -> Handle:
        reference = None
        if first and self.reply_to is not None:
            # fail_if_not_exists=False: a deleted question still gets its answer, as a plain message
            reference = discord.MessageReference(
                message_id=self.reply_to, channel_id=self.channel_id, fail_if_not_exists=False
            )
        async with _translated(sending=True):
            await self.wait_ready()
            if reference is None:
                message = await self.channel.send(content=text, allowed_mentions=NO_PINGS)
            else:
                message = await self.channel.send(
                    content=text, reference=reference, allowed_mentions=NO_PINGS
                )
        return message.id

    async def edit(self, handle: Handle, text: str) -> None:
        async with _translated():
            await self.wait_ready()
            await self.channel.get_partial_message(int(handle)).edit(content=text, allowed_mentions=NO_PINGS)

    async def delete(self, handle: Handle) -> None:
        async with _translated():
            await self.wait_ready()
            await self.channel.get_partial_message(int(handle)).delete()

    async def typing(self) -> None:
        async with _translated():
            await self.wait_ready()
            await self.channel.typing()

    async def photo(self, image: Image) -> Handle:
        async with _translated(sending=True):
            await self.wait_ready()
            message = await self.channel.send(
                content=_caption(image), file=_file(image), allowed_mentions=NO_PINGS
            )
        return message.id

    async def earlier(self) -> list[tuple[Handle, str]]:
        """The parts of an earlier reply to the same message (a restart mid-answer), to edit."""
        me = self.client.user
        if not self.look_back or self.reply_to is None or me is None:
            return []
        found: list[tuple[Handle, str]] = []
        try:
            await self.wait_ready()
            after = discord.Object(self.reply_to)
            async for message in self.channel.history(after=after, limit=50, oldest_first=True):
                ref = message.reference.message_id if message.reference else None
                if message.author.id != me.id:
                    if found:
                        break
                elif not found and ref == self.reply_to:
                    found.append((message.id, message.content))
                elif found and ref is None:
                    found.append((message.id, message.content))
                elif found:
                    break
        except (discord.HTTPException, *TRANSIENT) as exc:
            logger.info("Discord: could not look for an earlier reply in %s (%s)", self.channel_id, exc)
            return []
        return found


class InteractionSink(_DiscordSink):
    """Parts of a slash command's answer: the deferred response, then follow-ups; after the
    token expired, `fallback` (the channel), if any."""

    ORIGINAL = "@original"

    def __init__(
        self,
        interaction: discord.Interaction[Any],
        *,
        wait_ready: Callable[[], Awaitable[None]],
        fallback: ChannelSink | None = None,
    ) -> None:
        super().__init__(interaction.channel_id or 0, wait_ready)
        self.interaction = interaction
        self.fallback = fallback
        self.moved = False

    async def send(self, text: str, *, first: bool) -> Handle:
        if self.moved and self.fallback is not None:
            return await self.fallback.send(text, first=first)
        async with _translated(sending=True), self._expiry():
            handle: Handle = self.ORIGINAL
            if first:
                await self.interaction.edit_original_response(content=text, allowed_mentions=NO_PINGS)
            else:
                message = await self.interaction.followup.send(
                    content=text, wait=True, allowed_mentions=NO_PINGS
                )
                handle = message.id
        return handle

    async def edit(self, handle: Handle, text: str) -> None:
        if self.moved and self.fallback is not None:
            return await self.fallback.edit(handle, text)
        async with _translated(), self._expiry():
            if handle == self.ORIGINAL:
                await self.interaction.edit_original_response(content=text, allowed_mentions=NO_PINGS)
            else:
                await self.interaction.followup.edit_message(
                    int(handle), content=text, allowed_mentions=NO_PINGS
                )

    async def delete(self, handle: Handle) -> None:
        if self.moved and self.fallback is not None:
            return await self.fallback.delete(handle)
        async with _translated(), self._expiry():
            if handle == self.ORIGINAL:
                await self.interaction.delete_original_response()
            else:
                await self.interaction.followup.delete_message(int(handle))

    async def photo(self, image: Image) -> Handle:
        if self.moved and self.fallback is not None:
            return await self.fallback.photo(image)
        async with _translated(sending=True), self._expiry():
            message = await self.interaction.followup.send(
                content=_caption(image) or discord.utils.MISSING,
                file=_file(image),
                wait=True,
                allowed_mentions=NO_PINGS,
            )
        return message.id

    async def typing(self) -> None:
        """The deferred response already shows "Yanray is thinking…"."""
        if self.moved and self.fallback is not None:
            await self.fallback.typing()

    @contextlib.asynccontextmanager
    async def _expiry(self) -> AsyncIterator[None]:
        try:
            yield
        except discord.HTTPException as exc:
            # 50027 Invalid Webhook Token, 10015 Unknown Webhook: the 15-minute token ran out
            if exc.code not in (50027, 10015) and exc.status != 401:
                raise
            if self.fallback is None:
                raise Blocked("the interaction expired") from exc
            self.moved = True
            raise Moved("the interaction expired; answering in the channel instead") from exc
