"""Yanray's slash commands on Discord: /ask, /reset, /stop, /retry, /history, /system, /lang, /share.

Each command only turns the interaction into the text the dispatcher already understands
("/history 5", "/system be brief", or the question itself for /ask) and hands it to the
adapter, which defers the response at once (Discord's 3-second window) and answers by
editing the deferred response and sending follow-ups. Descriptions come from the
dispatcher's `COMMANDS` so the menus of every platform say the same thing; they are
`locale_str`s, and `CatalogTranslator` gives Discord their Chinese for the zh-CN and zh-TW
clients from the same catalog (the command and option names stay as they are typed).

Synced at start-up: to one guild when `YANRAY_DISCORD_GUILD_ID` is set (the commands
appear at once, handy while testing), otherwise globally (Discord may take a while to
show new global commands). A failed sync (for example a bot invited without the
`applications.commands` scope) is logged and the bot runs without slash commands.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import discord
from discord import app_commands
from discord.app_commands import TranslationContextLocation, TranslationContextTypes, locale_str

from yanray.bot.dispatcher import COMMANDS
from yanray.bot.i18n import DEFAULT_LANGUAGE, N_, normalize, resolve, translator

logger = logging.getLogger(__name__)

Handler = Callable[["discord.Interaction[Any]", str], Awaitable[None]]
ASK_DESCRIPTION = N_("Ask Yanray a question")
FAILED = N_("Sorry, that command failed on my side. Please try again in a moment.")
MAX_DESCRIPTION = 100  # Discord's limit for a description, in every language
#: what Discord lets a bot translate that Yanray translates: the descriptions, not the names
_DESCRIPTIONS = frozenset(
    {TranslationContextLocation.command_description, TranslationContextLocation.parameter_description}
)


class CatalogTranslator(app_commands.Translator):
    """The slash commands' descriptions from Yanray's catalog, for every Chinese locale."""

    async def translate(
        self, string: locale_str, locale: discord.Locale, context: TranslationContextTypes
    ) -> str | None:
        language = normalize(locale.value)
        if language == DEFAULT_LANGUAGE or context.location not in _DESCRIPTIONS:
            return None  # Discord shows the English
        return translator(language).gettext(string.message)[:MAX_DESCRIPTION]


def build_commands(handler: Handler) -> list[app_commands.Command[Any, ..., None]]:
    """The slash commands, each calling `handler(interaction, text for the dispatcher)`."""
    described = dict(COMMANDS)

    def describe(name: str) -> locale_str:
        return locale_str(described.get(name, name)[:MAX_DESCRIPTION])

    @app_commands.command(name="ask", description=locale_str(ASK_DESCRIPTION))
    @app_commands.describe(question=locale_str(N_("What you want to ask")))
    async def ask(interaction: discord.Interaction[Any], question: str) -> None:
        await handler(interaction, question)

    @app_commands.command(name="reset", description=describe("reset"))
    async def reset(interaction: discord.Interaction[Any]) -> None:
        await handler(interaction, "/reset")

    @app_commands.command(name="stop", description=describe("stop"))
    async def stop(interaction: discord.Interaction[Any]) -> None:
        await handler(interaction, "/stop")

    @app_commands.command(name="retry", description=describe("retry"))
    async def retry(interaction: discord.Interaction[Any]) -> None:
        await handler(interaction, "/retry")

    @app_commands.command(name="history", description=describe("history"))
    @app_commands.describe(count=locale_str(N_("How many messages (default 10)")))
    async def history(
        interaction: discord.Interaction[Any], count: app_commands.Range[int, 1, 50] | None = None
    ) -> None:
        await handler(interaction, "/history" if count is None else f"/history {count}")

    @app_commands.command(name="system", description=describe("system"))
    @app_commands.describe(
        instructions=locale_str(N_("New instructions, or 'default'; leave empty to see them"))
    )
    async def system(interaction: discord.Interaction[Any], instructions: str | None = None) -> None:
        await handler(interaction, "/system" if not instructions else f"/system {instructions}")

    @app_commands.command(name="lang", description=describe("lang"))
    @app_commands.describe(language=locale_str(N_("en, zh, or auto (your app's language)")))
    @app_commands.choices(
        language=[
            app_commands.Choice(name="English", value="en"),
            app_commands.Choice(name="简体中文", value="zh"),
            app_commands.Choice(name="auto", value="auto"),
        ]
    )
    async def lang(interaction: discord.Interaction[Any], language: str | None = None) -> None:
        await handler(interaction, "/lang" if not language else f"/lang {language}")

    @app_commands.command(name="share", description=describe("share"))
    @app_commands.describe(choice=locale_str(N_("on or off; leave empty to see your choice")))
    @app_commands.choices(
        choice=[app_commands.Choice(name="on", value="on"), app_commands.Choice(name="off", value="off")]
    )
    async def share(interaction: discord.Interaction[Any], choice: str | None = None) -> None:
        await handler(interaction, "/share" if not choice else f"/share {choice}")

    return [ask, reset, stop, retry, history, system, lang, share]


async def install(
    tree: app_commands.CommandTree[Any], handler: Handler, guild_id: int | None, language: str = "auto"
) -> None:
    """Add the commands to `tree` and sync them with Discord, their descriptions translated.
    `language` is `YANRAY_LANGUAGE`, for the line a failed command answers with."""
    for command in build_commands(handler):
        tree.add_command(command)

    async def on_error(interaction: discord.Interaction[Any], error: app_commands.AppCommandError) -> None:
        await _on_error(interaction, error, resolve(language, None, interaction.locale.value))

    tree.on_error = on_error  # type: ignore[method-assign]
    await tree.set_translator(CatalogTranslator())
    guild = discord.Object(id=guild_id) if guild_id else None
    if guild is not None:
        tree.copy_global_to(guild=guild)
    try:
        synced = await tree.sync(guild=guild)
    except discord.HTTPException as exc:
        logger.warning(
            "Discord: could not register the slash commands (%s); invite the bot with the "
            "applications.commands scope. Mentions and DMs still work.",
            exc,
        )
        return
    logger.info(
        "Discord: %d slash commands synced %s",
        len(synced),
        f"to guild {guild_id}" if guild_id else "globally",
    )


async def _on_error(
    interaction: discord.Interaction[Any], error: app_commands.AppCommandError, language: str
) -> None:
    logger.error("Discord: slash command failed", exc_info=error)
    text = translator(language).gettext(FAILED)
    try:
        if interaction.response.is_done():
            await interaction.followup.send(
                text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
            )
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as exc:
        logger.warning("Discord: could not report the failed command: %s", exc)
