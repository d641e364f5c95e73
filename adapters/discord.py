"""Discord front end: @mentions in servers and threads, replies to Yanray, DMs, slash commands.

`DiscordAdapter(settings=..., dispatcher=...)` runs a discord.py client in the current
event loop: `start()` logs in, syncs the slash commands, connects the gateway and returns
once READY (or raises one clear line); `stop()` closes it. Replies stream through the one
`adapters.streamer.ReplyStreamer` over a sink of `discord_sinks`; the slash commands live
in `discord_commands`.

Who is answered: any DM; in a server, a message that mentions the bot user itself
(`@everyone`, `@here` and role mentions do not count) or replies to one of its messages.
Yanray's own mention is removed from the text. A conversation is per (channel, user), or
per channel when `YANRAY_DISCORD_CHANNEL_MODE=shared`. Message content needs no privileged
intent for mentions and DMs; `YANRAY_DISCORD_MESSAGE_CONTENT=true` asks for it (then a
reply to Yanray that does not ping it is readable too).

Choices where the design is silent:
- Allowlists: `YANRAY_DISCORD_ALLOWED_GUILDS`/`_CHANNELS` (a thread counts as its parent
  channel too)/`_ROLES` fence where Yanray answers, checked here; `YANRAY_ALLOWED_USERS`
  is the dispatcher's. A DM has no guild, channel or role, so while any of the three
  fences is set, only users named in `YANRAY_ALLOWED_USERS` or `YANRAY_ADMINS` may DM.
  Outside the fence a user gets one polite refusal per channel per run, then silence.
- An edit is acted on only when Discord marks the message edited (`edited_timestamp`) and
  its text changed: link previews also arrive as MESSAGE_UPDATE.
- After a restart, a recovered request's answer edits the earlier, partial reply to the
  same message: the messages the core stored (`ReplyStream.watch`), or else the reply
  found in the channel history, so a user sees one answer.
- A channel that answers 403 is logged once per run; each new question there is tried
  again (permissions can be fixed while Yanray runs).
- Ratings: a 👍 or 👎 (any skin tone) on a message of an answer rates it for the person who
  reacted (`Dispatcher.people.rate`); a new thumb replaces their rating. Discord lets one
  person put both on a message, so taking one away deletes the rating only while it is
  that one's: after 👍 then 👎, removing the 👍 leaves the 👎. The first message of a
  slash command's answer is the interaction's response, which Yanray knows by its token
  and not by id, so reactions count on channel answers and on a slash answer's later parts.

Connecting (the discord.py client, intents, the REST and gateway URLs) is `discord_client`;
it also skips (and logs once) a gateway event discord.py cannot parse, so the connection
stays up. If the client ends anyway while running (a close Discord does not let it
resume from, such as a revoked token), `on_fatal` gets one line and `yanray run` stops.
A message whose handling fails gets a one-line apology.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable, Hashable
from typing import Any

import discord

from yanray.adapters.discord_client import YanrayClient, explain_failure, point_urls
from yanray.adapters.discord_sinks import ChannelSink, InteractionSink
from yanray.adapters.sink import Shown, Sink, StreamerContext
from yanray.adapters.streamer import ReplyStreamer
from yanray.bot.dispatcher import Dispatcher
from yanray.bot.errors import ConfigError
from yanray.bot.i18n import N_, translator
from yanray.bot.people import thumb
from yanray.bot.settings import Settings
from yanray.bot.types import Incoming, Route

logger = logging.getLogger(__name__)

REFUSAL = N_("Sorry, I can't answer here: my owner has limited me to certain servers, channels or roles.")
APOLOGY = N_("Sorry, something went wrong on my side. Please try again.")
NON_TEXT = N_(
    "I can only read text for now. Please type your question (I can't see attachments or stickers)."
)
_ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)


class DiscordAdapter:
    platform = "discord"

    def __init__(
        self,
        *,
        settings: Settings,
        dispatcher: Dispatcher,
        ready_timeout: float = 60.0,
        guild_ready_timeout: float = 2.0,
        retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0),
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        #: told (one line) when the connection ends for good while running
        self.on_fatal = on_fatal
        self._stopping = False
        self.ready = asyncio.Event()
        self._ready_timeout = ready_timeout
        self._guild_ready_timeout = guild_ready_timeout
        self._client: YanrayClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._restore_urls: Callable[[], None] | None = None
        self._refused: set[tuple[int, int]] = set()
        self._forbidden: set[Hashable] = set()
        self.ctx = StreamerContext(
            edit_interval=settings.discord_edit_interval,
            retry_delays=retry_delays,
            on_blocked=self._note_forbidden,
            max_answers=1000,
            on_fault=functools.partial(dispatcher.metrics.platform_error, self.platform),
        )

    @property
    def client(self) -> YanrayClient:
        if self._client is None:
            raise RuntimeError("the Discord adapter is not started")
        return self._client

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """Connected to the gateway (the health check)."""
        client = self._client
        return client is not None and self.ready.is_set() and not client.is_closed()

    async def start(self) -> None:
        """Log in, sync the slash commands and connect; returns once READY, or raises one line."""
        token = self.settings.secret("discord_token")
        if not token:
            raise ConfigError("YANRAY_DISCORD_TOKEN is not set; the Discord adapter cannot start")
        if self._restore_urls is None:
            self._restore_urls = point_urls(self.settings)
        self._stopping = False
        self._client = YanrayClient(self, guild_ready_timeout=self._guild_ready_timeout)
        self._task = asyncio.create_task(self._run(self._client, token), name="discord-client")
        ready = asyncio.create_task(self.ready.wait())
        await asyncio.wait(
            {self._task, ready}, timeout=self._ready_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if self.ready.is_set():
            self._task.add_done_callback(self._client_ended)
            self.ctx.running = True
            return
        ready.cancel()
        failure = self._task.exception() if self._task.done() else None
        await self.stop()
        raise explain_failure(failure, self.settings, self._ready_timeout)

    async def _run(self, client: YanrayClient, token: str) -> None:
        async with client:
            await client.start(token)

    async def stop(self) -> None:
        """Stop taking messages and close the gateway and HTTP session."""
        client, task = self._client, self._task
        self._stopping = True
        self.ready.clear()
        await self.ctx.stop()
        if client is not None:
            await client.close()
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(task, timeout=10)
            except (TimeoutError, discord.DiscordException, OSError) as exc:
                logger.debug("Discord: the client ended with %r while closing", exc)
        if self._restore_urls is not None:
            self._restore_urls()
            self._restore_urls = None

    def connected(self) -> None:
        self.ready.set()

    def _client_ended(self, task: asyncio.Task[None]) -> None:
        """The client's task ended: expected while stopping, otherwise Discord is gone for good
        (discord.py reconnects by itself after network faults; what ends it cannot be retried)."""
        if self._stopping or task.cancelled():
            return
        exc = task.exception()
        reason = (
            f"Discord: the connection ended for good ({exc!r})" if exc else "Discord: the connection closed"
        )
        logger.error("%s", reason)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    async def _wait_ready(self) -> None:
        await asyncio.wait_for(self.ready.wait(), timeout=self._ready_timeout)

    def _note_forbidden(self, channel_id: Hashable, why: str) -> None:
        if channel_id not in self._forbidden:
            self._forbidden.add(channel_id)
            logger.warning(
                "Discord: no permission to answer in channel %s (%s); skipping it", channel_id, why
            )

    # -- answering -----------------------------------------------------------------------

    def reopen(self, route: Route) -> ReplyStreamer:
        """A stream answering at `route` again: into the messages the core stored as shown
        (channel messages only: an interaction's token does not outlive a restart), or else
        into the earlier reply found in the channel history."""
        reply_to = int(route["message_id"]) if route.get("message_id") else None
        shown = Shown.parse(route.get("shown"))
        if any(not isinstance(handle, int) for handle in shown.messages):
            shown = Shown()
        sink = ChannelSink(
            self.client, int(route["channel_id"]), reply_to, wait_ready=self._wait_ready, look_back=True
        )
        return self._stream(sink, reply_to, shown)

    def _stream(self, sink: Sink, message_id: int | None, shown: Shown | None = None) -> ReplyStreamer:
        return ReplyStreamer(self.ctx, sink, shown=shown, key=message_id)

    async def on_message(self, message: discord.Message) -> None:
        incoming = self._incoming(message)
        if incoming is None:
            return
        sink = ChannelSink(self.client, message.channel.id, message.id, wait_ready=self._wait_ready)
        out = self._stream(sink, message.id)
        if not await self._allowed(message.guild.id if message.guild else None, message.channel, incoming):
            key = (message.channel.id, message.author.id)
            if key not in self._refused:
                self._refused.add(key)
                await out.send(self._say(REFUSAL, incoming))
            return
        if not incoming.text and (message.attachments or message.stickers):
            await out.send(translator(await self.dispatcher.language(incoming)).gettext(NON_TEXT))
            return
        try:
            await self.dispatcher.handle(incoming, out)
        except Exception:
            logger.exception("Discord: message %s could not be handled", message.id)
            await out.send(self._say(APOLOGY, incoming))

    async def on_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        if payload.data.get("edited_timestamp") is None:
            return  # a link preview or other non-edit update
        message = payload.message
        before = payload.cached_message
        if before is not None and before.content == message.content:
            return
        incoming = self._incoming(message)
        if incoming is None or not await self._allowed(
            message.guild.id if message.guild else None, message.channel, incoming
        ):
            return
        # the stream answering that message in this run takes over; otherwise (after a
        # restart) what the core stored as shown, or the earlier reply in the channel history
        old = self.ctx.answers.get(message.id)

        def answer(shown: Any) -> ReplyStreamer:
            if old is not None:
                return old.successor()
            return self.reopen({"channel_id": message.channel.id, "message_id": message.id, "shown": shown})

        await self.dispatcher.handle_edit(incoming, answer)

    async def on_slash(self, interaction: discord.Interaction[Any], text: str) -> None:
        channel_id = interaction.channel_id or 0
        incoming = self._make_incoming(
            channel_id,
            interaction.user,
            text,
            guild_id=interaction.guild_id,
            message_id=None,
            moderator=interaction.guild_id is not None and interaction.permissions.manage_messages,
            language=interaction.locale.value,  # the user's own Discord app
        )
        if not await self._allowed(interaction.guild_id, interaction.channel, incoming):
            await interaction.response.send_message(self._say(REFUSAL, incoming), ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        fallback = ChannelSink(self.client, channel_id, wait_ready=self._wait_ready) if channel_id else None
        sink = InteractionSink(interaction, wait_ready=self._wait_ready, fallback=fallback)
        await self.dispatcher.handle(incoming, self._stream(sink, None))

    async def on_reaction(self, payload: discord.RawReactionActionEvent, added: bool) -> None:
        me = self.client.user
        if me is None or payload.user_id == me.id or (payload.member is not None and payload.member.bot):
            return
        value = thumb(payload.emoji.name or "") if payload.emoji.id is None else None  # no custom emoji
        if value is None:
            return
        await self.dispatcher.people.rate(
            platform=self.platform,
            chat_id=str(payload.channel_id),
            message_id=str(payload.message_id),
            user_id=str(payload.user_id),
            value=value if added else None,
            unless=None if added else value,
        )

    # -- who is answered -------------------------------------------------------------------

    def _incoming(self, message: discord.Message) -> Incoming | None:
        """The message as an `Incoming` if it is for Yanray: a DM, a mention of it, a reply to it."""
        me = self.client.user
        if me is None or message.author.bot or message.webhook_id or message.type not in _ANSWERED_TYPES:
            return None
        mentioned = any(user.id == me.id for user in message.mentions)
        if not (message.guild is None or mentioned or _replies_to(message, me.id)):
            return None
        # the mention and the whitespace around it become one space (split, not a pattern with
        # `\s*` on both sides: that restarts at every space of a long run, quadratic)
        text = " ".join(part.strip() for part in re.split(rf"<@!?{me.id}>", message.content)).strip()
        return self._make_incoming(
            message.channel.id,
            message.author,
            text,
            guild_id=message.guild.id if message.guild else None,
            message_id=message.id,
            moderator=_can_manage_messages(message.channel, message.author),
            # a message carries no locale of its sender: the server's preferred one, if any
            language=message.guild.preferred_locale.value if message.guild else None,
        )

    def _make_incoming(
        self,
        channel_id: int,
        user: discord.User | discord.Member,
        text: str,
        *,
        guild_id: int | None,
        message_id: int | None,
        moderator: bool = False,
        language: str | None = None,
    ) -> Incoming:
        return Incoming(
            platform=self.platform,
            chat_id=str(channel_id),
            user_id=str(user.id),
            display_name=user.display_name,
            text=text,
            message_id=_str(message_id),
            is_private=guild_id is None,
            shared=guild_id is not None and self.settings.discord_channel_mode == "shared",
            route={"channel_id": str(channel_id), "message_id": _str(message_id)},
            roles=tuple(str(r.id) for r in getattr(user, "roles", ()) if not r.is_default()),
            moderator=moderator,
            language=language,
        )

    def _say(self, message: str, incoming: Incoming) -> str:
        """An adapter's own line in the sender's language, without storage (a stranger, or
        what failed may be the database)."""
        return translator(self.dispatcher.hint_language(incoming.language)).gettext(message)

    async def _allowed(self, guild_id: int | None, channel: Any, incoming: Incoming) -> bool:
        """Inside the guild/channel/role fence (a DM: only named users while a fence is set:
        YANRAY_ALLOWED_USERS, YANRAY_ADMINS, or an admin's /allow)."""
        s = self.settings
        if guild_id is None:
            fenced = s.discord_allowed_guilds or s.discord_allowed_channels or s.discord_allowed_roles
            return not fenced or await self.dispatcher.people.named(f"discord:{incoming.user_id}")
        if s.discord_allowed_guilds and str(guild_id) not in s.discord_allowed_guilds:
            return False
        if s.discord_allowed_channels:
            places = {str(getattr(channel, "id", "")), str(getattr(channel, "parent_id", ""))}
            if not places & set(s.discord_allowed_channels):
                return False
        return not s.discord_allowed_roles or bool(set(incoming.roles) & set(s.discord_allowed_roles))


def _can_manage_messages(channel: Any, user: discord.User | discord.Member) -> bool:
    """Whether `user` moderates `channel` (Manage Messages there); never in a DM."""
    if not isinstance(user, discord.Member) or not hasattr(channel, "permissions_for"):
        return False
    return bool(channel.permissions_for(user).manage_messages)


def _replies_to(message: discord.Message, user_id: int) -> bool:
    if message.reference is None:
        return False
    replied = message.reference.resolved or message.reference.cached_message
    return isinstance(replied, discord.Message) and replied.author.id == user_id


def _str(value: int | None) -> str | None:
    return None if value is None else str(value)
