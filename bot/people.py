"""What people say about Yanray itself: ratings of its answers, the opt-in to training
export, and the admins' word on who may use it.

- **Ratings.** A 👍 or 👎 reaction on a message that shows an answer (Telegram, Discord)
  rates that answer for the person who reacted; `/good` and `/bad` rate the conversation's
  latest answer (the terminal has no reactions; they work everywhere). One rating per person
  per answer: a new one replaces it, taking the reaction away deletes it. Any skin tone of
  the thumbs counts; other emoji, reactions on other messages and people who may not use
  Yanray are ignored (logged at debug). Adapters call `rate`.
- **`/share [on|off]`.** Per person (platform:id), across their conversations on that
  platform: whether those conversations may be exported to train the model. Admins'
  conversations may be exported without it (see `yanray export`).
- **`/allow platform:id` and `/deny platform:id`**, for `YANRAY_ADMINS` only, stored in the
  database. The rules are few (an admin types each), so they are held in memory and read
  again at most every `RULES_FRESH_FOR` seconds: a message costs no query, a process sees its
  own changes at once and another process's on the same database within that time.
  `/allow` lets a person in even when `YANRAY_ALLOWED_USERS` does not name them, and lifts a
  `/deny`; `/deny` shuts a person out even if the setting names them. The latest word about
  a person counts. Admins are always allowed and cannot be denied. With
  `YANRAY_ALLOWED_USERS` empty everyone is allowed unless denied.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from yanray.bot.i18n import N_, translator
from yanray.bot.settings import Settings
from yanray.bot.types import Incoming, ReplyStream
from yanray.storage import Conversation, Database, crud

logger = logging.getLogger(__name__)

#: the chat commands this module answers
COMMAND_WORDS = ("good", "bad", "share", "allow", "deny")
THUMBS = {"👍": 1, "👎": -1}
_SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
_VARIATION = "\ufe0f"
#: platform:id as `/allow` and `/deny` take it (YANRAY_ALLOWED_USERS' form)
_PERSON = re.compile(r"([a-z]{1,32}):([A-Za-z0-9_.-]{1,64})")

SHARE_MEANS = N_(
    "With /share on, your conversations with me may be exported to train my model. Group chats "
    "and tool results can hold other people's words, and a trained model cannot forget."
)
RULES_FRESH_FOR = 5.0  # seconds
ADMINS_ONLY = N_("Only my admins (YANRAY_ADMINS) can use /{command}.")


def thumb(emoji: str) -> int | None:
    """+1 for 👍, -1 for 👎 (any skin tone, with or without the emoji variation selector);
    None for any other emoji."""
    if len(emoji) > 8:  # a thumb with a tone and a selector is 3 characters
        return None
    return THUMBS.get("".join(ch for ch in emoji if ch not in _SKIN_TONES and ch != _VARIATION))


class People:
    def __init__(self, *, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._rules: dict[str, bool] = {}
        self._read_at = float("-inf")
        self._reading = asyncio.Lock()

    # -- access ------------------------------------------------------------------------

    async def allowed(self, who: str) -> bool:
        """Whether `who` (platform:id) may use Yanray: admins always; else an admin's latest
        /allow or /deny; else YANRAY_ALLOWED_USERS (empty: everyone)."""
        if who in self.settings.admins:
            return True
        rule = await self._rule(who)
        if rule is not None:
            return rule
        return not self.settings.allowed_users or who in self.settings.allowed_users

    async def named(self, who: str) -> bool:
        """Whether `who` is let in by name (an admin, YANRAY_ALLOWED_USERS or /allow, and not
        /deny): the Discord adapter's test for a DM while its server fences are set."""
        if who in self.settings.admins:
            return True
        rule = await self._rule(who)
        return rule if rule is not None else who in self.settings.allowed_users

    async def _rule(self, who: str) -> bool | None:
        if time.monotonic() - self._read_at > RULES_FRESH_FOR:
            async with self._reading:  # one read for the messages that arrive meanwhile
                if time.monotonic() - self._read_at > RULES_FRESH_FOR:
                    async with self.db.reading() as session:
                        self._rules = await crud.access_rules(session=session)
                    self._read_at = time.monotonic()
        return self._rules.get(who)

    # -- ratings -----------------------------------------------------------------------

    async def rate(
        self,
        *,
        platform: str,
        chat_id: str,
        message_id: str,
        user_id: str,
        value: int | None,
        unless: int | None = None,
    ) -> bool:
        """A person reacted to a message: store their rating of the answer it shows (+1, -1),
        or delete it (`value` None). With `unless`, a deletion happens only while the stored
        rating is `unless` (Discord: taking 👍 away while 👎 stays leaves the 👎). Returns
        whether a rating was stored or deleted."""
        who = f"{platform}:{user_id}"
        if not await self.allowed(who):
            logger.debug("reaction by %s ignored: they may not use Yanray", who)
            return False
        # looked up in a read: Discord sends every thumb on every message of a server, and
        # only those on an answer may take SQLite's one writer from the bot's own work
        async with self.db.reading() as session:
            request_id = await crud.answer_at(
                session=session, platform=platform, chat_id=chat_id, message_id=message_id
            )
        if request_id is None:
            logger.debug("reaction by %s on %s message %s ignored: not an answer", who, chat_id, message_id)
            return False
        async with self.db.transaction() as session:
            if value is None and unless is not None:
                stored = await crud.rating_of(
                    session=session, request_id=request_id, platform=platform, user_id=user_id
                )
                if stored != unless:
                    logger.debug(
                        "%s took a reaction away from answer %d, still rated %s", who, request_id, stored
                    )
                    return False
            await crud.set_rating(
                session=session, request_id=request_id, platform=platform, user_id=user_id, value=value
            )
        logger.info("%s rated answer %d: %s", who, request_id, {1: "good", -1: "bad"}.get(value or 0, "none"))
        return True

    # -- commands ----------------------------------------------------------------------

    async def command(
        self,
        command: str,
        argument: str,
        conversation: Conversation,
        incoming: Incoming,
        out: ReplyStream,
        language: str,
    ) -> None:
        """Answer /good, /bad, /share, /allow or /deny."""
        if command in ("good", "bad"):
            await self._cmd_rate(1 if command == "good" else -1, conversation, incoming, out, language)
        elif command == "share":
            await self._cmd_share(argument, incoming, out, language)
        else:
            await self._cmd_access(command, argument, incoming, out, language)

    async def _cmd_rate(
        self, value: int, conversation: Conversation, incoming: Incoming, out: ReplyStream, language: str
    ) -> None:
        tr = translator(language)
        async with self.db.transaction() as session:
            request_id = await crud.last_answer(session=session, conversation_id=conversation.id)
            if request_id is not None:
                await crud.set_rating(
                    session=session,
                    request_id=request_id,
                    platform=incoming.platform,
                    user_id=incoming.user_id,
                    value=value,
                )
        if request_id is None:
            await out.send(tr.gettext("There is no answer to rate yet."))
            return
        logger.info("%s:%s rated answer %d: %+d", incoming.platform, incoming.user_id, request_id, value)
        if value > 0:
            await out.send(tr.gettext("Thanks: you rated my last answer 👍."))
        else:
            await out.send(tr.gettext("Thanks: you rated my last answer 👎."))

    async def _cmd_share(self, argument: str, incoming: Incoming, out: ReplyStream, language: str) -> None:
        tr = translator(language)
        choice = argument.lower()
        if choice not in ("", "on", "off"):
            await out.send(tr.gettext("Usage: /share on, /share off, or /share to see your choice."))
            return
        platform, user_id = incoming.platform, incoming.user_id
        admin = f"{platform}:{user_id}" in self.settings.admins
        if choice:
            async with self.db.transaction() as session:
                await crud.set_share(
                    session=session, platform=platform, user_id=user_id, share=choice == "on"
                )
            logger.info("%s:%s: /share %s", platform, user_id, choice)
            sharing = choice == "on"
        else:
            async with self.db.reading() as session:
                sharing = await crud.shares(session=session, platform=platform, user_id=user_id)
        if admin:
            state = tr.gettext(
                "You are one of my admins: your conversations may be exported for training in any case."
            )
        elif sharing:
            state = tr.gettext("Sharing is on: your conversations may be exported to train my model.")
        else:
            state = tr.gettext("Sharing is off: your conversations are not exported for training.")
        await out.send(state + "\n" + tr.gettext(SHARE_MEANS))

    async def _cmd_access(
        self, command: str, argument: str, incoming: Incoming, out: ReplyStream, language: str
    ) -> None:
        tr = translator(language)
        admin = f"{incoming.platform}:{incoming.user_id}"
        if admin not in self.settings.admins:
            logger.info("%s tried /%s but is not an admin", admin, command)
            await out.send(tr.gettext(ADMINS_ONLY).format(command=command))
            return
        match = _PERSON.fullmatch(argument.strip())
        if match is None:
            await out.send(
                tr.gettext("Usage: /{command} platform:id, for example /{command} telegram:123456.").format(
                    command=command
                )
            )
            return
        who = match.group(0)
        allow = command == "allow"
        if not allow and who in self.settings.admins:
            await out.send(
                tr.gettext("{who} is one of my admins (YANRAY_ADMINS) and cannot be denied.").format(who=who)
            )
            return
        async with self.db.transaction() as session:
            await crud.set_access_rule(
                session=session, platform=match.group(1), user_id=match.group(2), allowed=allow, set_by=admin
            )
        self._rules[who] = allow
        logger.info("%s: /%s %s", admin, command, who)
        if allow:
            await out.send(tr.gettext("{who} may use me now.").format(who=who))
        else:
            await out.send(tr.gettext("{who} may no longer use me.").format(who=who))
