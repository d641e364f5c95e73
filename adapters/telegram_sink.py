"""`TelegramSink`: where one answer goes in a Telegram chat, for `adapters/streamer.py`.

Telegram's side of the streamer: a part is at most 4096 characters, fewer when astral
characters are present (Telegram counts UTF-16 units, and those take two); each part is
sent as HTML from `telegram_format`, and again plain if Telegram says "can't parse
entities"; an edit answered "message is not modified" succeeded (by that text only).
Private chats preview with `sendMessageDraft`; a group answer quotes the question. A
picture goes out with `sendPhoto` (multipart upload), its caption plain.
PTB's errors become the streamer's kinds: `RetryAfter` a `Flood`, 403 `Blocked`, "message
to edit/delete not found" `MessageGone`, network errors, time-outs and 5xx `Transient`,
any other refusal `Rejected`.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from telegram import Bot, InputFile, Message, ReplyParameters
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError
from telegram.warnings import PTBDeprecationWarning

from yanray.adapters.sink import Blocked, Flood, Handle, MessageGone, Rejected, Transient
from yanray.adapters.telegram_format import markdown_to_html
from yanray.bot.types import Image

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_CHARS = 4096
MAX_CAPTION = 1024  # a photo's caption


def retry_seconds(exc: RetryAfter) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _says(exc: TelegramError, fragment: str) -> bool:
    return fragment in exc.message.lower()


async def _translated(call: Awaitable[T]) -> T:
    """`call`, with PTB's errors as the streamer's kinds."""
    try:
        return await call
    except RetryAfter as exc:
        raise Flood(retry_seconds(exc), exc.message) from exc
    except Forbidden as exc:
        raise Blocked(exc.message) from exc
    except BadRequest as exc:  # a subclass of NetworkError, but retrying cannot help
        if _says(exc, "message to edit not found") or _says(exc, "message to delete not found"):
            raise MessageGone(exc.message) from exc
        raise Rejected(exc.message) from exc
    except NetworkError as exc:  # also TimedOut and 5xx answers
        raise Transient(exc.message) from exc
    except TelegramError as exc:
        raise Rejected(exc.message) from exc


class TelegramSink:
    """One Telegram chat, answering one message (implements `adapters.sink.Sink`)."""

    typing_every = 4.5
    drafts: bool

    def __init__(
        self,
        get_bot: Callable[[], Bot],
        *,
        chat_id: int,
        reply_to: int | None,
        private: bool,
        thread_id: int | None = None,
    ) -> None:
        self.get_bot = get_bot
        self.key = self.chat_id = chat_id
        self.reply_to, self.thread_id = reply_to, thread_id
        self.private = self.drafts = private
        self._draft_id = reply_to or random.randint(1, 2**31 - 1)

    def limit(self, text: str) -> int:
        astral = sum(1 for char in text if ord(char) > 0xFFFF)
        return MAX_CHARS - min(astral, MAX_CHARS // 2)

    async def send(self, text: str, *, first: bool) -> Handle:
        quote = None
        if first and self.reply_to is not None and not self.private:  # private answers do not quote
            quote = ReplyParameters(message_id=self.reply_to, allow_sending_without_reply=True)

        def write(body: str, mode: str | None) -> Awaitable[Message]:
            return self.get_bot().send_message(
                self.chat_id, body, parse_mode=mode, reply_parameters=quote, message_thread_id=self.thread_id
            )

        message = await self._formatted(write, text)
        return message.message_id

    async def edit(self, handle: Handle, text: str) -> None:
        def write(body: str, mode: str | None) -> Awaitable[Message | bool]:
            return self.get_bot().edit_message_text(
                body, chat_id=self.chat_id, message_id=int(handle), parse_mode=mode
            )

        try:
            await self._formatted(write, text)
        except Rejected as exc:
            # after a restart an edit to the same text is answered so; it is shown, so done
            if "message is not modified" not in str(exc).lower():
                raise

    async def delete(self, handle: Handle) -> None:
        await _translated(self.get_bot().delete_message(self.chat_id, int(handle)))

    async def photo(self, image: Image) -> Handle:
        message = await _translated(
            self.get_bot().send_photo(
                self.chat_id,
                InputFile(image.data, filename=image.name),
                caption=image.caption[:MAX_CAPTION] or None,  # plain text: no parse_mode
                message_thread_id=self.thread_id,
            )
        )
        return message.message_id

    async def draft(self, text: str) -> None:
        def write(body: str, mode: str | None) -> Awaitable[bool]:
            return self.get_bot().send_message_draft(
                self.chat_id, self._draft_id, body, parse_mode=mode, message_thread_id=self.thread_id
            )

        await self._formatted(write, text)

    async def typing(self) -> None:
        await _translated(
            self.get_bot().send_chat_action(self.chat_id, ChatAction.TYPING, message_thread_id=self.thread_id)
        )

    async def earlier(self) -> list[tuple[Handle, str]]:
        return []  # Telegram cannot list a chat's messages: the core's stored `shown` stands in

    async def _formatted(self, write: Callable[[str, str | None], Awaitable[T]], part: str) -> T:
        """Send `part` as HTML, or plain if Telegram cannot parse the HTML."""
        return await _translated(self._html_or_plain(write, part))

    async def _html_or_plain(self, write: Callable[[str, str | None], Awaitable[T]], part: str) -> T:
        try:
            return await write(markdown_to_html(part), ParseMode.HTML)
        except BadRequest as exc:
            if not _says(exc, "can't parse entities"):
                raise
            logger.info("chat %s: Telegram rejected the formatting (%s); sending it plain", self.chat_id, exc)
        return await write(part, None)
