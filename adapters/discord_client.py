"""Connecting to Discord: the discord.py client subclass, its intents and its URLs.

`YanrayClient` forwards the events Yanray uses (messages, raw edits, raw reactions, slash commands via
its `app_commands.CommandTree`) to the adapter and registers the slash commands in
`setup_hook`, which discord.py runs after login and before the gateway connects.

URLs: discord.py keeps its REST base in the class attribute `discord.http.Route.BASE`
(read whenever a `Route` is built, also for interaction webhooks) and its first gateway
URL in `DiscordWebSocket.DEFAULT_GATEWAY`; both are process-wide and there is no
per-client setting. `point_urls(settings)` sets them from `YANRAY_DISCORD_API_BASE` and
`YANRAY_DISCORD_GATEWAY_URL` and returns the function that restores them, so one process
runs one Discord client at a time (Yanray runs one). With a custom gateway (a gateway
proxy, or the tests' fake), the `resume_gateway_url` READY hands out is replaced by it,
so the client also resumes through the proxy and never talks to Discord's hosts itself.

Gateway events: discord.py parses each event inside its gateway reader, so an event it
cannot parse (a MESSAGE_CREATE without `author`) raised out of `Client.start` and ended
the connection for good. `guard_parsers` wraps every parser of the client's connection
state: the event's strings are repaired first (`payloads.clean_strings`: a lone surrogate
would fail later, in the database), and an event that still fails is logged once,
shortened, and skipped while the connection stays up. discord.py offers no public hook
for this; the parsers live in `ConnectionState.parsers`, the dict the gateway reads.

Intents: guilds, guild messages and DMs, and reactions in both (👍/👎 rate answers: the
raw events, so that a reaction on a message discord.py no longer caches still counts);
message content (privileged) only with `YANRAY_DISCORD_MESSAGE_CONTENT=true`. Without it
Discord still sends the text of DMs and of messages that mention the bot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from yanray.adapters.discord_commands import install
from yanray.adapters.discord_sinks import NO_PINGS
from yanray.adapters.payloads import clean_strings, shorten
from yanray.bot.errors import ConfigError, YanrayError
from yanray.bot.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_GATEWAY = "wss://gateway.discord.gg/"


class Handlers(Protocol):
    """What the client hands events to (the adapter)."""

    settings: Settings

    def connected(self) -> None: ...

    async def on_message(self, message: discord.Message) -> None: ...

    async def on_edit(self, payload: discord.RawMessageUpdateEvent) -> None: ...

    async def on_slash(self, interaction: discord.Interaction[Any], text: str) -> None: ...

    async def on_reaction(self, payload: discord.RawReactionActionEvent, added: bool) -> None: ...


class YanrayClient(discord.Client):
    def __init__(self, handlers: Handlers, *, guild_ready_timeout: float) -> None:
        settings = handlers.settings
        # Yanray has no voice features; spare users discord.py's "PyNaCl/davey missing" warnings
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        super().__init__(
            intents=intents_for(settings),
            allowed_mentions=NO_PINGS,
            chunk_guilds_at_startup=False,
            guild_ready_timeout=guild_ready_timeout,
        )
        self.handlers = handlers
        self.tree: app_commands.CommandTree[Any] = app_commands.CommandTree(self)
        guard_parsers(self._connection.parsers)

    async def setup_hook(self) -> None:
        settings = self.handlers.settings
        await install(self.tree, self.handlers.on_slash, settings.discord_guild_id, settings.language)

    async def on_ready(self) -> None:
        logger.info("Discord: connected as %s in %d servers", self.user, len(self.guilds))
        self.handlers.connected()

    async def on_socket_event_type(self, event: str) -> None:
        # READY has just set ws.gateway to Discord's resume_gateway_url; keep resuming via ours
        gateway = self.handlers.settings.discord_gateway_url
        if event == "READY" and gateway != DEFAULT_GATEWAY and self.ws is not None:
            self.ws.gateway = yarl.URL(gateway)

    async def on_message(self, message: discord.Message) -> None:
        await self.handlers.on_message(message)

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        await self.handlers.on_edit(payload)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.handlers.on_reaction(payload, True)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self.handlers.on_reaction(payload, False)

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        logger.exception("Discord: handling %s failed", event_method)


def guard_parsers(parsers: dict[str, Callable[[Any], None]]) -> None:
    """Make each gateway event parser repair the event's text and skip an event it cannot parse."""
    for event, parse in list(parsers.items()):
        parsers[event] = _guarded(event, parse)


def _guarded(event: str, parse: Callable[[Any], None]) -> Callable[[Any], None]:
    def parse_or_skip(data: Any) -> None:
        try:
            parse(clean_strings(data))
        except Exception as exc:
            logger.warning(
                "Discord: skipped a %s event that could not be read (%s: %s): %s",
                event,
                type(exc).__name__,
                exc,
                shorten(data),
            )

    return parse_or_skip


def intents_for(settings: Settings) -> discord.Intents:
    intents = discord.Intents.none()
    intents.guilds = intents.guild_messages = intents.dm_messages = True
    intents.guild_reactions = intents.dm_reactions = True
    intents.message_content = settings.discord_message_content
    return intents


def point_urls(settings: Settings) -> Callable[[], None]:
    """Point discord.py at the configured REST base and gateway; returns the undo."""
    saved = (discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
    discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)

    def restore() -> None:
        discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved

    return restore


def explain_failure(failure: BaseException | None, settings: Settings, waited: float) -> YanrayError:
    """One line saying why the client did not connect, and what to do."""
    if isinstance(failure, discord.LoginFailure):
        return ConfigError(
            "YANRAY_DISCORD_TOKEN was rejected by Discord; copy the bot token again "
            "(Developer Portal > your application > Bot > Reset Token)"
        )
    if isinstance(failure, discord.PrivilegedIntentsRequired):
        return ConfigError(
            "YANRAY_DISCORD_MESSAGE_CONTENT=true needs the Message Content intent: enable it in the "
            "Developer Portal (Bot > Privileged Gateway Intents) or unset the setting"
        )
    if failure is not None:
        return YanrayError(f"Discord: could not connect via {settings.discord_api_base} ({failure!r})")
    return YanrayError(
        f"Discord: not connected to {settings.discord_gateway_url} after {waited:g} s; "
        "check the network and YANRAY_DISCORD_GATEWAY_URL"
    )
