"""Where the parts of one Discord reply go: channel messages, or a slash command's webhook.

A sink does one REST call per method and lets discord.py's errors through; the stream in
`discord_stream` decides what to retry. Every send and edit carries `NO_PINGS`
(`AllowedMentions.none()`), so no text Yanray posts can ping @everyone, @here, a role or
a user, the asker included (they see the answer as a reply to their message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import discord

logger = logging.getLogger(__name__)

NO_PINGS = discord.AllowedMentions.none()
TRANSIENT = (discord.DiscordServerError, aiohttp.ClientError, OSError, asyncio.TimeoutError)


class Gone(Exception):
    """The channel refused us (403) or no longer exists: stop talking there."""


class Expired(Exception):
    """The interaction token expired; continue in the channel."""


class Sink(Protocol):
    """Where the parts of one reply go: a channel, or an interaction's webhook."""

    channel_id: int

    async def send(self, text: str, *, first: bool) -> int | str: ...

    async def edit(self, handle: int | str, text: str) -> None: ...

    async def delete(self, handle: int | str) -> None: ...

    async def typing(self) -> None: ...


class ChannelSink:
    """Parts as channel messages; the first replies to the user's message (if any)."""

    def __init__(self, client: discord.Client, channel_id: int, reply_to: int | None = None) -> None:
        self.channel_id = channel_id
        self.channel = client.get_partial_messageable(channel_id)
        self.reply_to = reply_to

    async def send(self, text: str, *, first: bool) -> int | str:
        reference = None
        if first and self.reply_to is not None:
            # fail_if_not_exists=False: a deleted question still gets its answer, as a plain message
            reference = discord.MessageReference(
                message_id=self.reply_to, channel_id=self.channel_id, fail_if_not_exists=False
            )
        if reference is None:
            message = await self.channel.send(content=text, allowed_mentions=NO_PINGS)
        else:
            message = await self.channel.send(content=text, reference=reference, allowed_mentions=NO_PINGS)
        return message.id

    async def edit(self, handle: int | str, text: str) -> None:
        await self.channel.get_partial_message(int(handle)).edit(content=text, allowed_mentions=NO_PINGS)

    async def delete(self, handle: int | str) -> None:
        await self.channel.get_partial_message(int(handle)).delete()

    async def typing(self) -> None:
        await self.channel.typing()

    async def previous(self, bot_id: int) -> list[tuple[int | str, str]]:
        """The parts of an earlier reply to the same message (a restart mid-answer), to edit."""
        if self.reply_to is None:
            return []
        found: list[tuple[int | str, str]] = []
        try:
            after = discord.Object(self.reply_to)
            async for message in self.channel.history(after=after, limit=50, oldest_first=True):
                ref = message.reference.message_id if message.reference else None
                if message.author.id != bot_id:
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


class InteractionSink:
    """Parts of a slash command's answer: the deferred response, then follow-ups."""

    ORIGINAL = "@original"

    def __init__(self, interaction: discord.Interaction[Any]) -> None:
        self.interaction = interaction
        self.channel_id = interaction.channel_id or 0

    async def send(self, text: str, *, first: bool) -> int | str:
        async with self._expiry():
            if first:
                await self.interaction.edit_original_response(content=text, allowed_mentions=NO_PINGS)
                return self.ORIGINAL
            message = await self.interaction.followup.send(content=text, wait=True, allowed_mentions=NO_PINGS)
            return message.id

    async def edit(self, handle: int | str, text: str) -> None:
        async with self._expiry():
            if handle == self.ORIGINAL:
                await self.interaction.edit_original_response(content=text, allowed_mentions=NO_PINGS)
            else:
                await self.interaction.followup.edit_message(
                    int(handle), content=text, allowed_mentions=NO_PINGS
                )

    async def delete(self, handle: int | str) -> None:
        async with self._expiry():
            if handle == self.ORIGINAL:
                await self.interaction.delete_original_response()
            else:
                await self.interaction.followup.delete_message(int(handle))

    async def typing(self) -> None:
        """The deferred response already shows "Yanray is thinking…"."""

    @contextlib.asynccontextmanager
    async def _expiry(self) -> AsyncIterator[None]:
        try:
            yield
        except discord.HTTPException as exc:
            # 50027 Invalid Webhook Token, 10015 Unknown Webhook: the 15-minute token ran out
            if exc.code in (50027, 10015) or exc.status == 401:
                raise Expired() from exc
            raise
