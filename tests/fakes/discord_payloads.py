"""The fake Discord's world and the JSON payloads discord.py expects of it.

One bot user (its application has the same id), one guild ("Test Server") with two text
channels (#general = `channel_id`, #random = `other_channel_id`), a public thread under
#general, an `@everyone` role and a "helpers" role, and two human members: alice (who has
the helpers role) and bob. Any other channel id is treated as a DM channel.

Payloads are complete as Discord sends them (discord.py reads some keys without
defaults: a message without `member.flags`, `mention_roles` or `attachments` raises
inside the library). The snowflakes come from one counter, so they grow like real ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

TIMESTAMP = "2024-01-01T00:00:00.000000+00:00"
_SNOWFLAKES = itertools.count(1_200_000_000_000_000_000)

# fmt: off


def snowflake() -> str:
    return str(next(_SNOWFLAKES))


def user_payload(uid: str, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {"id": uid, "username": name, "global_name": name.title(), "discriminator": "0", "avatar": None,
            "bot": bot, "public_flags": 0, "flags": 0}


def member_payload(roles: Iterable[str] = ()) -> dict[str, Any]:
    return {"roles": list(roles), "joined_at": TIMESTAMP, "deaf": False, "mute": False, "flags": 0,
            "nick": None, "avatar": None, "pending": False, "premium_since": None,
            "communication_disabled_until": None}


@dataclass
class Msg:
    """A message as users see it now, with the time and text of its creation and each edit."""

    id: str
    channel_id: str
    author_id: str
    content: str
    reply_to: str | None = None
    deleted: bool = False
    history: list[tuple[float, str]] = field(default_factory=list)
    #: uploaded files: (file name, bytes)
    files: list[tuple[str, bytes]] = field(default_factory=list)


class DiscordWorld:
    def __init__(self) -> None:
        self.bot_id = snowflake()
        self.app_id = self.bot_id
        self.guild_id = snowflake()
        self.channel_id = snowflake()
        self.other_channel_id = snowflake()
        self.thread_id = snowflake()
        self.role_id = snowflake()
        self.alice = user_payload(snowflake(), "alice")
        self.bob = user_payload(snowflake(), "bob")
        self.bot = user_payload(self.bot_id, "yanray", bot=True)
        #: role ids per member (alice has the helpers role)
        self.member_roles: dict[str, list[str]] = {self.alice["id"]: [self.role_id], self.bob["id"]: []}
        #: the server's preferred locale (Community settings), sent with GUILD_CREATE
        self.guild_locale = "en-US"
        #: every message, users' and the bot's, in the order they were created
        self.messages: dict[str, Msg] = {}

    def in_guild(self, channel_id: str) -> bool:
        return channel_id in (self.channel_id, self.other_channel_id, self.thread_id)

    def user(self, uid: str) -> dict[str, Any]:
        return next(u for u in (self.bot, self.alice, self.bob) if u["id"] == uid)

    def message_payload(
        self, channel_id: str, author: dict[str, Any], content: str, *, mid: str | None = None,
        mentions: Iterable[dict[str, Any]] = (), mention_everyone: bool = False,
        mention_roles: Iterable[str] = (), reply_to: str | None = None,
        attachments: Iterable[dict[str, Any]] = (), stickers: Iterable[dict[str, Any]] = (),
        edited: bool = False,
    ) -> dict[str, Any]:
        """A user's MESSAGE_CREATE / MESSAGE_UPDATE payload."""
        data: dict[str, Any] = {
            "id": mid or snowflake(), "channel_id": channel_id, "author": author, "content": content,
            "timestamp": TIMESTAMP, "edited_timestamp": TIMESTAMP if edited else None, "tts": False,
            "mention_everyone": mention_everyone, "mention_roles": list(mention_roles),
            "mentions": [dict(u, member=member_payload(self.member_roles.get(u["id"], []))) for u in mentions],
            "attachments": list(attachments), "embeds": [], "pinned": False, "type": 19 if reply_to else 0,
            "flags": 0, "components": [], "sticker_items": list(stickers),
        }
        if self.in_guild(channel_id):
            data["guild_id"] = self.guild_id
            data["member"] = member_payload(self.member_roles.get(author["id"], []))
        if reply_to:
            data["message_reference"] = {"message_id": reply_to, "channel_id": channel_id, "type": 0}
            if reply_to in self.messages:
                data["referenced_message"] = self.message_json(self.messages[reply_to])
        return data

    def message_json(self, msg: Msg, *, webhook: bool = False) -> dict[str, Any]:
        """A stored message as the REST API returns it."""
        data: dict[str, Any] = {
            "id": msg.id, "channel_id": msg.channel_id, "author": self.user(msg.author_id),
            "content": msg.content, "timestamp": TIMESTAMP,
            "edited_timestamp": TIMESTAMP if len(msg.history) > 1 else None, "tts": False,
            "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
            "pinned": False, "type": 19 if msg.reply_to else 0, "flags": 0, "components": [],
        }
        data["attachments"] = [
            {
                "id": f"{msg.id}{index}", "filename": name, "size": len(content), "content_type": "image/png",
                "url": f"https://cdn.example/{msg.id}/{name}", "proxy_url": f"https://cdn.example/{msg.id}/{name}",
            }
            for index, (name, content) in enumerate(msg.files)
        ]  # fmt: skip
        if webhook:
            data["webhook_id"] = data["application_id"] = self.app_id
        if self.in_guild(msg.channel_id):
            data["guild_id"] = self.guild_id
        if msg.reply_to:
            data["message_reference"] = {"message_id": msg.reply_to, "channel_id": msg.channel_id, "type": 0}
        return data

    def interaction_payload(
        self, name: str, command_id: str, author: dict[str, Any], options: Iterable[dict[str, Any]], cid: str,
        locale: str = "en-US",
    ) -> dict[str, Any]:
        """INTERACTION_CREATE for a slash command (type 2), from a user whose Discord app is in
        `locale`; its token is "tok-<id>"."""
        iid = snowflake()
        data: dict[str, Any] = {
            "id": iid, "application_id": self.app_id, "type": 2, "token": f"tok-{iid}", "version": 1,
            "data": {"id": command_id, "name": name, "type": 1, "options": list(options)},
            "channel_id": cid, "app_permissions": "0", "locale": locale, "attachment_size_limit": 8_000_000,
            "entitlements": [], "authorizing_integration_owners": {},
        }
        if self.in_guild(cid):
            roles = self.member_roles.get(author["id"], [])
            data.update(guild_id=self.guild_id, guild_locale=self.guild_locale, context=0,
                        channel=self.channel_json(cid, "general"),
                        member=dict(member_payload(roles), user=author, permissions="0"))
        else:
            data.update(user=author, context=1, channel={"id": cid, "type": 1, "recipients": [author],
                                                         "last_message_id": None, "flags": 0})
        return data

    def application_json(self) -> dict[str, Any]:
        return {"id": self.app_id, "name": "Yanray", "icon": None, "description": "", "bot_public": True,
                "bot_require_code_grant": False, "verify_key": "0" * 64, "flags": 0, "owner": self.alice,
                "team": None, "summary": "", "interactions_endpoint_url": None}

    def ready_json(self, session_id: str, resume_url: str) -> dict[str, Any]:
        """READY: the guild is announced unavailable; its GUILD_CREATE follows."""
        return {"v": 10, "user": self.bot, "guilds": [{"id": self.guild_id, "unavailable": True}],
                "session_id": session_id, "resume_gateway_url": resume_url,
                "application": {"id": self.app_id, "flags": 0}, "private_channels": [], "relationships": [],
                "presences": [], "user_settings": {}, "geo_ordered_rtc_regions": [], "shard": [0, 1]}

    def channel_json(self, cid: str, name: str) -> dict[str, Any]:
        return {"id": cid, "type": 0, "guild_id": self.guild_id, "name": name, "position": 0,
                "permission_overwrites": [], "nsfw": False, "topic": None, "last_message_id": None,
                "parent_id": None, "rate_limit_per_user": 0, "flags": 0}

    def guild_json(self) -> dict[str, Any]:
        """The full GUILD_CREATE that follows READY."""
        everyone = {"id": self.guild_id, "name": "@everyone", "permissions": "1071698660929", "position": 0,
                    "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}
        helpers = dict(everyone, id=self.role_id, name="helpers", position=1, mentionable=True)
        thread = {"id": self.thread_id, "type": 11, "guild_id": self.guild_id, "name": "a thread",
                  "parent_id": self.channel_id, "owner_id": self.alice["id"], "last_message_id": None,
                  "rate_limit_per_user": 0, "message_count": 0, "member_count": 1, "flags": 0,
                  "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                      "archive_timestamp": TIMESTAMP, "locked": False}}
        return {
            "id": self.guild_id, "name": "Test Server", "icon": None, "owner_id": self.alice["id"],
            "region": "us", "afk_channel_id": None, "afk_timeout": 300, "verification_level": 0,
            "default_message_notifications": 0, "explicit_content_filter": 0, "features": [], "mfa_level": 0,
            "system_channel_id": None, "system_channel_flags": 0, "rules_channel_id": None,
            "vanity_url_code": None, "description": None, "banner": None, "premium_tier": 0,
            "preferred_locale": self.guild_locale, "public_updates_channel_id": None, "nsfw_level": 0,
            "premium_progress_bar_enabled": False, "unavailable": False, "large": False, "member_count": 3,
            "joined_at": TIMESTAMP, "roles": [everyone, helpers], "emojis": [], "stickers": [],
            "channels": [self.channel_json(self.channel_id, "general"),
                         self.channel_json(self.other_channel_id, "random")],
            "threads": [thread], "members": [dict(member_payload(), user=self.bot)], "voice_states": [],
            "presences": [], "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [],
        }


# fmt: on
