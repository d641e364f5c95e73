"""The Telegram adapter: python-telegram-bot v22 in front of Yanray's dispatcher.

`TelegramAdapter(settings=..., dispatcher=...)`, then `await start()` (returns once
updates flow, in the current event loop: `Application.initialize/start`, never
`run_polling`, which would own the loop) and `await stop()`. `YANRAY_TELEGRAM_BASE_URL`
points PTB at a self-hosted Bot API server (or the tests' fake). PTB's `Application` and
`Bot` do everything except fetching updates: that is `telegram_updates.UpdatePoller`
(long polling), or with `YANRAY_TELEGRAM_WEBHOOK_URL` set `telegram_webhook.WebhookServer`
(on `YANRAY_TELEGRAM_WEBHOOK_LISTEN`:`_PORT`, at the URL's path, checked with
`YANRAY_TELEGRAM_WEBHOOK_SECRET`). Both parse each update on their own, so one malformed
update is skipped instead of stalling the bot, and confirm an update to Telegram only
after its handler returned, that is after the question it carries was stored. A token
Telegram stops accepting while running is reported to `on_fatal` (`yanray run` stops).

Who it answers: every message in a private chat; in a group an @mention of the bot (by
entity: `mention` of @botname or `text_mention` of the bot's id), a reply to one of its
messages, or a command (`/cmd` or `/cmd@botname`). The mention is removed from the text.
A caption counts as text; photos, stickers, voice and files without one get a short
note. Access control, commands and the queue are the dispatcher's (`yanray.bot`);
this module only builds `Incoming` values and the streams that answer them: the one
`adapters.streamer.ReplyStreamer` over a `telegram_sink.TelegramSink`.

The updates of a batch are handled concurrently across chats but in order within a chat
(a per-chat lock in the update processor); the next batch waits until the whole batch
is handled, which is short: a handler stores the question and at most sends a notice.
Edits of a user's message go to `dispatcher.handle_edit` with a stream that takes over
the bot's earlier reply, so that reply is edited to the new answer: the stream still
answering it in this run (`ReplyStreamer.successor`), or after a restart the messages that
showed it, which the core stored with the request (`ReplyStream.watch`) and hands back to
`handle_edit`'s factory. A
chat that blocked the bot is not written to until a message from it arrives again; the
core stores the set (`Dispatcher.note_blocked`), read back at start, so a restart keeps it.

Ratings: a 👍 or 👎 reaction on a message of an answer (`message_reaction` updates, asked for
in `allowed_updates`) goes to `Dispatcher.people.rate`. Telegram sends a person's whole set of
reactions before and after the change; only a change of their thumbs counts (if both are set,
the one just added). Telegram sends reactions in groups only to a bot that administers the
group, and never reactions of anonymous administrators (no user) or of bots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from telegram import Bot, BotCommand, Message, MessageEntity, ReactionType, ReactionTypeEmoji, Update
from telegram.constants import ChatMemberStatus, ChatType
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import (
    Application,
    BaseUpdateProcessor,
    ContextTypes,
    MessageHandler,
    MessageReactionHandler,
    filters,
)

from yanray.adapters.sink import Shown, StreamerContext
from yanray.adapters.streamer import ReplyStreamer
from yanray.adapters.telegram_sink import TelegramSink
from yanray.adapters.telegram_updates import POLL_TIMEOUT, UpdatePoller
from yanray.adapters.telegram_webhook import WebhookServer
from yanray.bot.dispatcher import COMMANDS, Dispatcher
from yanray.bot.errors import ConfigError, YanrayError
from yanray.bot.i18n import N_, translator
from yanray.bot.people import COMMAND_WORDS, thumb
from yanray.bot.settings import Settings
from yanray.bot.types import Incoming, Route

MAX_NETWORK_TRIES = 5
#: the command words the dispatcher answers (start is Telegram's first-contact command)
YANRAY_COMMANDS = frozenset({"start", *(name for name, _ in COMMANDS), *COMMAND_WORDS})

logger = logging.getLogger(__name__)

NON_TEXT_NOTE = N_(
    "I can only read text for now, so I can't see photos, stickers, voice messages or files. "
    "Please write your question (a caption on a photo counts)."
)
APOLOGY = N_("Sorry, something went wrong on my side. Please try again.")
#: the command menu is registered once in English (the default) and once per other language,
#: so each user's Telegram app shows it in their app's language
MENU_LANGUAGES = {"zh": "zh"}  # Yanray's language: Telegram's language_code
UPDATES = ["message", "edited_message", "message_reaction"]
#: commands whose effect in a shared group depends on whether the sender administers it
_MODERATED = re.compile(r"/(?:reset|system|stop|lang)(?![A-Za-z_])", re.IGNORECASE)


class PerChatProcessor(BaseUpdateProcessor):
    """Concurrent updates, but one at a time per chat so a user's messages keep their order."""

    def __init__(self, max_concurrent_updates: int) -> None:
        super().__init__(max_concurrent_updates)
        self._locks: dict[int, asyncio.Lock] = {}
        self._users: Counter[int] = Counter()

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        chat = update.effective_chat if isinstance(update, Update) else None
        if chat is None:
            await coroutine
            return
        self._users[chat.id] += 1
        lock = self._locks.setdefault(chat.id, asyncio.Lock())
        try:
            async with lock:
                await coroutine
        finally:
            self._users[chat.id] -= 1
            if not self._users[chat.id]:
                del self._users[chat.id], self._locks[chat.id]

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


def _utf16(text: str) -> bytes:
    return text.encode("utf-16-le")


def _remove_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` without the given (offset, length) spans, counted in UTF-16 units as Telegram does."""
    data = _utf16(text)
    for offset, length in sorted(spans, reverse=True):
        before, after = data[: offset * 2], data[(offset + length) * 2 :]
        if before.endswith(b" \x00") and after.startswith(b" \x00"):
            after = after[2:]  # "hey @bot what" -> "hey what"
        data = before + after
    return data.decode("utf-16-le").strip()


class TelegramAdapter:
    platform = "telegram"

    def __init__(
        self,
        *,
        settings: Settings,
        dispatcher: Dispatcher,
        draft_interval: float = 1.0,
        retry_base: float = 0.5,
        on_fatal: Callable[[str], None] | None = None,
        poll_timeout: int = POLL_TIMEOUT,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        #: told (one line) when the adapter cannot go on, e.g. the token was revoked
        self.on_fatal = on_fatal
        self._poll_timeout = poll_timeout
        self._backoff = backoff
        self.app: Application[Any, Any, Any, Any, Any, Any] | None = None
        self._source: UpdatePoller | WebhookServer | None = None
        self.ctx = StreamerContext(
            edit_interval=settings.telegram_edit_interval,
            preview_interval=draft_interval,
            retry_delays=tuple(retry_base * 2**i for i in range(MAX_NETWORK_TRIES - 1)),
            on_blocked=self._on_blocked,
            on_fault=functools.partial(dispatcher.metrics.platform_error, self.platform),
        )

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """Started and taking updates (the health check)."""
        return self.app is not None and self._source is not None and self.ctx.running

    def _bot(self) -> Bot:
        if self.app is None:
            raise RuntimeError("the Telegram adapter is not running")
        return self.app.bot

    async def start(self) -> None:
        token = self.settings.secret("telegram_token")
        if not token:
            raise ConfigError("YANRAY_TELEGRAM_TOKEN is not set")
        # read before the client opens, so a storage failure leaves nothing to close
        blocked = await self.dispatcher.blocked_chats(self.platform)
        self.ctx.blocked.clear()
        self.ctx.blocked.update(int(chat) for chat in blocked if chat.lstrip("-").isdigit())
        base_url = self.settings.telegram_base_url
        file_url = base_url[: -len("/bot")] + "/file/bot" if base_url.endswith("/bot") else base_url
        app = (
            Application.builder()
            .token(token)
            .base_url(base_url)
            .base_file_url(file_url)
            .concurrent_updates(PerChatProcessor(256))
            .updater(None)  # updates come from telegram_updates / telegram_webhook (see there)
            .build()
        )
        app.add_handler(MessageHandler(filters.UpdateType.MESSAGE, self._on_message))
        app.add_handler(MessageHandler(filters.UpdateType.EDITED_MESSAGE, self._on_edit))
        app.add_handler(MessageReactionHandler(self._on_reaction))
        app.add_error_handler(self._on_error)
        await _initialize(app, base_url)  # getMe: a wrong token or base URL fails here
        source: UpdatePoller | WebhookServer
        if self.settings.telegram_webhook_url:
            source = WebhookServer(
                bot=app.bot,
                handle=self._process,
                url=self.settings.telegram_webhook_url,
                listen=self.settings.telegram_webhook_listen,
                port=self.settings.telegram_webhook_port,
                secret=self.settings.secret("telegram_webhook_secret") or "",
                allowed_updates=UPDATES,
            )
        else:
            source = UpdatePoller(
                bot=app.bot,
                handle=self._process,
                allowed_updates=UPDATES,
                on_fatal=self._fatal,
                poll_timeout=self._poll_timeout,
                backoff=self._backoff,
            )
        try:
            await _register_menus(app.bot)
            await app.start()
            self.app, self.ctx.running = app, True
            await source.start()
            self._source = source
        except BaseException as exc:
            self.app, self.ctx.running = None, False
            if app.running:
                await app.stop()
            await app.shutdown()
            if isinstance(exc, OSError):  # only the webhook's listener opens a port
                where = f"{self.settings.telegram_webhook_listen}:{self.settings.telegram_webhook_port}"
                raise ConfigError(
                    f"YANRAY_TELEGRAM_WEBHOOK_PORT: cannot listen on {where} "
                    f"({os.strerror(exc.errno) if exc.errno else exc}); "
                    "is another program using it?"
                ) from exc
            if isinstance(exc, TelegramError):
                raise YanrayError(f"Telegram refused to start the bot ({exc})") from exc
            raise
        logger.info(
            "Telegram: @%s is %s",
            app.bot.username,
            "on its webhook" if self.settings.telegram_webhook_url else "polling",
        )

    async def stop(self) -> None:
        """Stop taking updates, let handlers finish (and confirm their updates), close the client."""
        app, source = self.app, self._source
        if app is None:
            return
        self._source = None
        if source is not None:
            await source.stop()
        if app.running:
            await app.stop()
        self.app = None
        await self.ctx.stop()  # reports and blocked chats on their way to storage are awaited
        await app.shutdown()

    async def _process(self, update: Update) -> None:
        """One parsed update through PTB's handlers, behind the per-chat processor."""
        app = self.app
        if app is None:
            raise RuntimeError("the Telegram adapter is not running")
        await app.update_processor.process_update(update, app.process_update(update))

    def _fatal(self, reason: str) -> None:
        logger.error("%s", reason)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _on_blocked(self, chat: Hashable, why: str) -> None:
        """A write was refused with 403: the chat blocked the bot (or it left the group)."""
        if chat in self.ctx.blocked:
            return
        logger.info("chat %s blocked the bot (%s); not writing to it until it writes again", chat, why)
        self.ctx.blocked.add(chat)
        self.ctx.spawn(self._store_blocked(int(str(chat)), True))

    async def _store_blocked(self, chat_id: int, blocked: bool) -> None:
        try:
            await self.dispatcher.note_blocked(self.platform, str(chat_id), blocked)
        except Exception:
            # the set in memory still holds for this run; only a restart forgets it
            logger.warning(
                "chat %s: could not store that it blocked the bot or wrote again", chat_id, exc_info=True
            )

    def reopen(self, route: Route) -> ReplyStreamer:
        return self._streamer(
            int(route["chat_id"]),
            route.get("message_id"),
            private=bool(route.get("private", True)),
            thread_id=route.get("thread_id"),
            shown=route.get("shown"),
        )

    def _streamer(
        self, chat_id: int, reply_to: int | None, *, private: bool, thread_id: int | None, shown: Any = None
    ) -> ReplyStreamer:
        sink = TelegramSink(
            self._bot, chat_id=chat_id, reply_to=reply_to, private=private, thread_id=thread_id
        )
        key = (chat_id, reply_to) if reply_to is not None else None
        return ReplyStreamer(self.ctx, sink, shown=Shown.parse(shown), key=key)

    # -- updates -----------------------------------------------------------------------

    def _for_us(self, message: Message) -> tuple[bool, str | None]:
        """(addressed to the bot, the text without the mention)."""
        text = message.text if message.text is not None else message.caption
        entities = message.entities if message.text is not None else message.caption_entities
        if message.chat.type == ChatType.PRIVATE:
            return True, text
        bot = self._bot()
        name = f"@{bot.username}".lower()
        spans: list[tuple[int, int]] = []
        command = False
        for entity in entities or ():
            value = _utf16(text or "")[entity.offset * 2 : (entity.offset + entity.length) * 2].decode(
                "utf-16-le"
            )
            if entity.type == MessageEntity.MENTION and value.lower() == name:
                spans.append((entity.offset, entity.length))
            elif (
                entity.type == MessageEntity.TEXT_MENTION
                and entity.user is not None
                and entity.user.id == bot.id
            ):
                spans.append((entity.offset, entity.length))
            elif entity.type == MessageEntity.BOT_COMMAND and entity.offset == 0:
                # "/reset" or "/reset@this_bot"; another bot's "/weather" is not for Yanray
                word, _, target = value.lower().partition("@")
                command = word[1:] in YANRAY_COMMANDS and (not target or f"@{target}" == name)
        replied = message.reply_to_message
        to_bot = replied is not None and replied.from_user is not None and replied.from_user.id == bot.id
        if not spans and not to_bot and not command:
            return False, text
        return True, _remove_spans(text, spans) if text is not None and spans else text

    def _incoming(self, message: Message, text: str) -> Incoming:
        user = message.from_user
        assert user is not None
        private = message.chat.type == ChatType.PRIVATE
        thread = message.message_thread_id if message.is_topic_message else None
        route: dict[str, Any] = {
            "chat_id": message.chat.id,
            "message_id": message.message_id,
            "private": private,
        }
        if thread is not None:
            route["thread_id"] = thread
        return Incoming(
            platform=self.platform,
            chat_id=str(message.chat.id),
            user_id=str(user.id),
            display_name=user.full_name,
            text=text,
            message_id=str(message.message_id),
            is_private=private,
            shared=not private and self.settings.telegram_group_mode == "shared",
            route=route,
            language=user.language_code,
        )

    def _stream(self, incoming: Incoming, shown: Any = None) -> ReplyStreamer:
        return self._streamer(
            int(incoming.chat_id),
            int(incoming.message_id) if incoming.message_id else None,
            private=incoming.is_private,
            thread_id=incoming.route.get("thread_id"),
            shown=shown,
        )

    async def _on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return
        for_us, text = self._for_us(message)
        if not for_us:
            return
        if message.chat.id in self.ctx.blocked:  # they write to us, so they unblocked us
            self.ctx.blocked.discard(message.chat.id)
            await self._store_blocked(message.chat.id, False)
        if text is None:
            if message.effective_attachment is not None:
                incoming = self._incoming(message, "")
                tr = translator(await self.dispatcher.language(incoming))
                await self._stream(incoming).send(tr.gettext(NON_TEXT_NOTE))
            return  # service messages (members joining, pins...) are not for Yanray
        incoming = self._incoming(message, text)
        if incoming.shared and _MODERATED.match(text):
            incoming = dataclasses.replace(incoming, moderator=await self._moderates(message))
        await self.dispatcher.handle(incoming, self._stream(incoming))

    async def _moderates(self, message: Message) -> bool:
        """Whether the sender administers the group (asked only for commands that need it)."""
        if message.sender_chat is not None and message.sender_chat.id == message.chat.id:
            return True  # an anonymous administrator, posting as the group itself
        assert message.from_user is not None
        try:
            member = await message.chat.get_member(message.from_user.id)
        except TelegramError as exc:
            logger.warning("chat %s: could not check who administers it: %s", message.chat.id, exc)
            return False
        return member.status in (ChatMemberStatus.OWNER, ChatMemberStatus.ADMINISTRATOR)

    async def _on_edit(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.edited_message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return
        for_us, text = self._for_us(message)
        if not for_us or text is None:
            return
        incoming = self._incoming(message, text)
        # the stream answering that message in this run takes over; otherwise (after a
        # restart) the core hands over what showed the earlier answer
        old = self.ctx.answers.get((message.chat.id, message.message_id))

        def answer(shown: Any) -> ReplyStreamer:
            return old.successor() if old is not None else self._stream(incoming, shown)

        if not await self.dispatcher.handle_edit(incoming, answer):
            logger.debug("edit of message %s in chat %s ignored", message.message_id, message.chat.id)

    async def _on_reaction(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        reaction = update.message_reaction
        if reaction is None or reaction.user is None or reaction.user.is_bot:
            return  # an anonymous administrator's (actor_chat) rates nobody's answer
        old, new = _thumbs(reaction.old_reaction), _thumbs(reaction.new_reaction)
        if old == new:
            return  # another emoji changed
        added = new - old
        if not new:
            value = None
        elif len(new) == 1 or len(added) == 1:
            (value,) = new if len(new) == 1 else added
        else:
            return
        await self.dispatcher.people.rate(
            platform=self.platform,
            chat_id=str(reaction.chat.id),
            message_id=str(reaction.message_id),
            user_id=str(reaction.user.id),
            value=value,
        )

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """PTB's central error handler: one log with the traceback, one line to the user."""
        logger.error("error while handling a Telegram update", exc_info=context.error)
        chat = update.effective_chat if isinstance(update, Update) else None
        if chat is None or chat.id in self.ctx.blocked:
            return
        user = update.effective_user if isinstance(update, Update) else None
        # no storage here: what failed may be the database
        language = self.dispatcher.hint_language(user.language_code if user is not None else None)
        try:
            await context.bot.send_message(chat.id, translator(language).gettext(APOLOGY))
        except TelegramError as exc:
            logger.warning("chat %s: the apology could not be sent: %s", chat.id, exc)


def _thumbs(reactions: tuple[ReactionType, ...]) -> set[int]:
    """The ratings (+1, -1) a set of reactions holds: its 👍 and 👎."""
    found = (thumb(r.emoji) for r in reactions if isinstance(r, ReactionTypeEmoji))
    return {value for value in found if value is not None}


async def _initialize(app: Application[Any, Any, Any, Any, Any, Any], base_url: str) -> None:
    """`app.initialize()` (getMe), its failures as one line each: a refused token is a
    setting to fix (`ConfigError`), an unreachable server is not."""
    try:
        await app.initialize()
    except InvalidToken as exc:
        raise ConfigError(
            "YANRAY_TELEGRAM_TOKEN was refused by Telegram (401 Unauthorized); copy the token "
            "from @BotFather again"
        ) from exc
    except NetworkError as exc:
        raise YanrayError(f"Telegram cannot be reached at {base_url} ({exc}); check the network") from exc
    except TelegramError as exc:
        raise YanrayError(f"Telegram refused to start the bot ({exc})") from exc


async def _register_menus(bot: Bot) -> None:
    """The command menu in English for every user, and in Chinese for Chinese apps. A refusal
    is logged: the commands still work when typed."""
    menus: list[tuple[str | None, str]] = [(None, "en"), *MENU_LANGUAGES.items()]
    for language_code, language in menus:
        tr = translator(language)
        commands = [BotCommand(name, tr.gettext(about)) for name, about in COMMANDS]
        try:
            await bot.set_my_commands(commands, language_code=language_code)
        except TelegramError as exc:
            logger.warning("could not register the command menu (%s): %s", language_code or "default", exc)
