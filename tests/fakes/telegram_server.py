"""A local stand-in for the Telegram Bot API, driven by the real python-telegram-bot.

Serves `/bot{token}/{method}` on 127.0.0.1 and a free port; point PTB at it with
`base_url=fake.base_url` (`http://127.0.0.1:PORT/bot`, PTB appends the token):

    async with FakeTelegram() as fake:
        settings = Settings(telegram_token=fake.token, telegram_base_url=fake.base_url, ...)
        ...
        mid = fake.private_text(42, "hello")
        await fake.wait_for(lambda: fake.messages(42))
        assert fake.messages(42) == ["Hello!"]

Methods: getMe, deleteWebhook, setWebhook, getWebhookInfo, getUpdates (long poll with
`offset`, `timeout`, `limit`), sendMessage, sendPhoto (a multipart upload of a PNG or JPEG,
kept in `photos` with its bytes, file name and caption), editMessageText, deleteMessage,
sendMessageDraft, sendChatAction, setMyCommands, getMyCommands, deleteMyCommands,
getChatMember (members of `admins` are administrators). Bodies
are read as PTB sends them (form fields, each non-string value JSON-encoded) or as JSON.

Like Telegram it checks what it is sent: HTML is parsed with Telegram's tag set and a
bad tag or an unclosed one is "Bad Request: can't parse entities", a text over 4096
UTF-16 units is "message is too long", an edit to the same content is "message is not
modified", an empty text is "message text is empty". Users' messages get entities as
Telegram makes them (`@name` mentions, a leading `/command[@bot]`), in UTF-16 offsets.

Updates are kept until confirmed, as Telegram does: a `getUpdates` with `offset` N drops
every update below N (and only then); `confirm_listeners` are called with the ids it
dropped, at the moment that call arrives (a test can kill the bot there), and `polls`
records the offset of every `getUpdates`. `raw_update(payload)` queues any JSON, for
updates PTB cannot parse (`with_id=False` leaves out `update_id`; the fake still knows
the update's place, as Telegram would).

Faults: `fail(method, kind, times=1)` answers the next matching calls with `flood`
(429 with `parameters.retry_after`), `parse`, `not_modified`, `blocked` (403), `server`
(500), `bad_gateway` (502) or `bad_request` (a 400 nothing can fix); `block(chat_id)` makes every write to that chat 403.

Every call is recorded in `calls` (method, decoded params, monotonic time, error), the
bot's messages in `sent` (with every text each one showed), drafts in `drafts`, so a
test reads the transcript a user would see: `messages(chat_id)` are the visible texts of
the bot's messages after all edits and deletions.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from aiohttp import web

MAX_TEXT = 4096
STRING_FIELDS = frozenset(
    {"text", "parse_mode", "action", "caption", "url", "secret_token", "language_code", "inline_message_id"}
)
ALLOWED_TAGS = frozenset(
    {
        "b",
        "strong",
        "i",
        "em",
        "u",
        "ins",
        "s",
        "strike",
        "del",
        "a",
        "code",
        "pre",
        "tg-spoiler",
        "span",
        "blockquote",
        "tg-emoji",
    }
)
FAULTS: dict[str, tuple[int, str]] = {
    "flood": (429, "Too Many Requests: retry after {retry_after}"),
    "parse": (
        400,
        "Bad Request: can't parse entities: Can't find end of the entity starting at byte offset 0",
    ),
    "not_modified": (
        400,
        "Bad Request: message is not modified: specified new message content and reply "
        "markup are exactly the same as a current content and reply markup of the message",
    ),
    "blocked": (403, "Forbidden: bot was blocked by the user"),
    "bad_request": (400, "Bad Request: message thread not found"),
    "server": (500, "Internal Server Error"),
    "bad_gateway": (502, "Bad Gateway"),
}


class ApiError(Exception):
    def __init__(self, code: int, description: str, parameters: dict[str, Any] | None = None) -> None:
        super().__init__(description)
        self.code, self.description, self.parameters = code, description, parameters


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class _TelegramHTML(HTMLParser):
    """Telegram's HTML subset to plain text; raises ApiError as Telegram answers."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ALLOWED_TAGS:
            raise ApiError(400, f'Bad Request: can\'t parse entities: Unsupported start tag "{tag}"')
        self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            raise ApiError(400, f'Bad Request: can\'t parse entities: Unexpected end tag "{tag}"')
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def visible_text(text: str, parse_mode: str | None) -> str:
    if parse_mode is None:
        return text
    if parse_mode.upper() != "HTML":
        raise ApiError(400, f"Bad Request: unsupported parse_mode {parse_mode} in this fake")
    parser = _TelegramHTML()
    parser.feed(text)
    parser.close()
    if parser.open:
        raise ApiError(
            400,
            f"Bad Request: can't parse entities: Can't find end tag corresponding to start tag "
            f'"{parser.open[-1]}"',
        )
    return "".join(parser.text)


def make_entities(text: str) -> list[dict[str, Any]]:
    """Entities Telegram attaches to a user's text: mentions and a leading bot command."""
    entities = []
    for match in re.finditer(r"(?<![\w@])@\w{3,}", text):
        entities.append(
            {
                "type": "mention",
                "offset": utf16_len(text[: match.start()]),
                "length": utf16_len(match.group()),
            }
        )
    command = re.match(r"/\w+(@\w+)?", text)
    if command:
        entities.append({"type": "bot_command", "offset": 0, "length": utf16_len(command.group())})
    return sorted(entities, key=lambda e: e["offset"])


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float
    error: str | None = None


@dataclass
class SentMessage:
    chat_id: int
    message_id: int
    text: str  # as sent (HTML or plain)
    parse_mode: str | None
    visible: str
    reply_to: int | None
    history: list[str] = field(default_factory=list)  # every visible text it showed
    deleted: bool = False


@dataclass
class SentPhoto:
    """A photo the bot sent (sendPhoto, a multipart upload)."""

    chat_id: int
    message_id: int
    data: bytes
    filename: str
    caption: str


@dataclass
class Draft:
    chat_id: int
    draft_id: int
    visible: str
    at: float


class FakeTelegram:
    def __init__(
        self, *, token: str = "123456:TESTTOKEN", bot_id: int = 777000, username: str = "yanray_bot"
    ) -> None:
        self.token, self.bot_id, self.username = token, bot_id, username
        self.calls: list[Call] = []
        self.sent: list[SentMessage] = []
        self.photos: list[SentPhoto] = []
        self.drafts: list[Draft] = []
        self.commands: list[dict[str, str]] = []
        #: each command menu set, by its language_code ("" for the default one)
        self.menus: dict[str, list[dict[str, str]]] = {}
        self.webhook_url = ""
        #: the update types the bot last asked for (getUpdates or setWebhook); as Telegram does,
        #: reactions are withheld unless asked for (Telegram's default list leaves them out)
        self.allowed_updates: list[str] | None = None
        self.updates: list[tuple[int, Any]] = []  # (update_id, what getUpdates returns)
        #: the offset of each getUpdates call, in order
        self.polls: list[int] = []
        #: getUpdates calls being answered now (a long poll waiting for updates)
        self.open_polls = 0
        #: called with the update ids a getUpdates confirmed, when that call arrives
        self.confirm_listeners: list[Callable[[list[int]], None]] = []
        self.user_messages: dict[tuple[int, int], dict[str, Any]] = {}
        self.blocked: set[int] = set()
        #: (chat id, user id) of group administrators, for getChatMember
        self.admins: set[tuple[int, int]] = set()
        #: called with each bot message after it is sent or edited (benchmarks time answers with it)
        self.listeners: list[Callable[[SentMessage], None]] = []
        self._faults: list[tuple[str, str, int | None, int]] = []  # method, kind, chat, retry_after
        self._update_ids = itertools.count(1)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._by_id: dict[tuple[int, int], SentMessage] = {}
        self._wakeup = asyncio.Event()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()  # end long polls at once
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTelegram:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def bot_user(self) -> dict[str, Any]:
        return {"id": self.bot_id, "is_bot": True, "first_name": "Yanray", "username": self.username}

    # -- faults ------------------------------------------------------------------------

    def fail(
        self, method: str, kind: str, *, times: int = 1, chat_id: int | None = None, retry_after: int = 1
    ) -> None:
        """Answer the next `times` calls of `method` (in `chat_id`, if given) with fault `kind`."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}")
        self._faults.extend([(method, kind, chat_id, retry_after)] * times)

    def block(self, chat_id: int) -> None:
        self.blocked.add(chat_id)

    def _take_fault(self, method: str, params: dict[str, Any]) -> None:
        chat = params.get("chat_id")
        if (
            method
            in (
                "sendMessage",
                "editMessageText",
                "sendMessageDraft",
                "sendChatAction",
                "deleteMessage",
                "sendPhoto",
            )
            and chat in self.blocked
        ):
            raise ApiError(*FAULTS["blocked"])
        for index, (f_method, kind, f_chat, retry_after) in enumerate(self._faults):
            if f_method == method and (f_chat is None or f_chat == chat):
                del self._faults[index]
                code, description = FAULTS[kind]
                parameters = {"retry_after": retry_after} if kind == "flood" else None
                raise ApiError(code, description.format(retry_after=retry_after), parameters)

    # -- users' side -------------------------------------------------------------------

    def _next_message_id(self, chat_id: int) -> int:
        return next(self._message_ids.setdefault(chat_id, itertools.count(1)))

    def _chat(self, chat_id: int) -> dict[str, Any]:
        if chat_id > 0:
            return {"id": chat_id, "type": "private", "first_name": f"User{chat_id}"}
        return {"id": chat_id, "type": "supergroup", "title": f"Group {chat_id}"}

    @staticmethod
    def _user(user_id: int, first_name: str | None = None) -> dict[str, Any]:
        return {
            "id": user_id,
            "is_bot": False,
            "first_name": first_name or f"User{user_id}",
            "username": f"user{user_id}",
        }

    def _push(self, update: dict[str, Any]) -> int:
        update["update_id"] = next(self._update_ids)
        self.updates.append((update["update_id"], update))
        self._wakeup.set()
        return int(update["update_id"])

    def raw_update(self, payload: Any, *, with_id: bool = True) -> int:
        """Queue `payload` as it is (any JSON), with the next update_id unless `with_id` is False;
        returns the id the update has on the fake's side."""
        if with_id and isinstance(payload, dict):
            return self._push(payload)
        uid = next(self._update_ids)
        self.updates.append((uid, payload))
        self._wakeup.set()
        return uid

    def user_message(
        self,
        chat_id: int,
        user_id: int,
        text: str | None = None,
        *,
        first_name: str | None = None,
        reply_to: int | None = None,
        entities: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
        language_code: str | None = None,
    ) -> int:
        """A user writes in a chat; returns the new message id. `language_code` is the
        language of the user's Telegram app, as Telegram sends it."""
        message_id = self._next_message_id(chat_id)
        message: dict[str, Any] = {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": self._chat(chat_id),
            "from": self._user(user_id, first_name),
        }
        if language_code is not None:
            message["from"]["language_code"] = language_code
        if text is not None:
            message["text"] = text
            found = make_entities(text) + (entities or [])
            if found:
                message["entities"] = found
        if reply_to is not None:
            message["reply_to_message"] = self._message_json(chat_id, reply_to)
        message.update(extra or {})
        self.user_messages[(chat_id, message_id)] = message
        self._push({"message": message})
        return message_id

    def private_text(self, user_id: int, text: str, **kwargs: Any) -> int:
        return self.user_message(user_id, user_id, text, **kwargs)

    def group_text(self, chat_id: int, user_id: int, text: str, **kwargs: Any) -> int:
        return self.user_message(chat_id, user_id, text, **kwargs)

    def photo(self, chat_id: int, user_id: int, caption: str | None = None) -> int:
        extra: dict[str, Any] = {
            "photo": [{"file_id": "p1", "file_unique_id": "u1", "width": 90, "height": 90}]
        }
        if caption is not None:
            extra["caption"] = caption
            if make_entities(caption):
                extra["caption_entities"] = make_entities(caption)
        return self.user_message(chat_id, user_id, None, extra=extra)

    def sticker(self, chat_id: int, user_id: int) -> int:
        extra = {
            "sticker": {
                "file_id": "s1",
                "file_unique_id": "su1",
                "type": "regular",
                "width": 512,
                "height": 512,
                "is_animated": False,
                "is_video": False,
            }
        }
        return self.user_message(chat_id, user_id, None, extra=extra)

    def edit(self, chat_id: int, message_id: int, text: str) -> None:
        """The user edits one of their messages."""
        message = dict(self.user_messages[(chat_id, message_id)])
        message["text"] = text
        message.pop("entities", None)
        if make_entities(text):
            message["entities"] = make_entities(text)
        message["edit_date"] = int(time.time())
        self.user_messages[(chat_id, message_id)] = message
        self._push({"edited_message": message})

    def reaction(
        self,
        chat_id: int,
        user_id: int,
        message_id: int,
        new: tuple[str, ...] | list[str],
        old: tuple[str, ...] | list[str] = (),
    ) -> int:
        """A user changes their reactions on a message, from the emoji `old` to `new` (Telegram
        sends both whole lists); returns the update id."""

        def emoji(items: tuple[str, ...] | list[str]) -> list[dict[str, str]]:
            return [{"type": "emoji", "emoji": e} for e in items]

        return self._push(
            {
                "message_reaction": {
                    "chat": self._chat(chat_id),
                    "message_id": message_id,
                    "user": self._user(user_id),
                    "date": int(time.time()),
                    "old_reaction": emoji(old),
                    "new_reaction": emoji(new),
                }
            }
        )

    def _message_json(self, chat_id: int, message_id: int) -> dict[str, Any]:
        sent = self._by_id.get((chat_id, message_id))
        if sent is not None:
            return {
                "message_id": message_id,
                "date": int(time.time()),
                "chat": self._chat(chat_id),
                "from": self.bot_user,
                "text": sent.visible,
            }
        return dict(self.user_messages[(chat_id, message_id)])

    # -- transcript --------------------------------------------------------------------

    def bot_messages(self, chat_id: int) -> list[SentMessage]:
        return [m for m in self.sent if m.chat_id == chat_id and not m.deleted]

    def messages(self, chat_id: int) -> list[str]:
        """The visible texts of the bot's messages in a chat, after every edit and deletion."""
        return [m.visible for m in self.bot_messages(chat_id)]

    def calls_of(self, method: str, chat_id: int | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.method == method and (chat_id is None or c.params.get("chat_id") == chat_id)
        ]

    def drafts_of(self, chat_id: int) -> list[str]:
        return [d.visible for d in self.drafts if d.chat_id == chat_id]

    async def wait_for(self, predicate: Callable[[], object], within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {within} s; calls: {[c.method for c in self.calls][-20:]}"
                )
            await asyncio.sleep(0.01)

    # -- the API -----------------------------------------------------------------------

    async def _read_params(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            body = await request.json()
            return dict(body) if body else {}
        form = await request.post()
        params: dict[str, Any] = {}
        for key, value in form.items():
            if not isinstance(value, str) or key in STRING_FIELDS:
                params[key] = value
                continue
            try:
                params[key] = json.loads(value)
            except ValueError:
                params[key] = value
        params.update({k: v for k, v in request.query.items() if k not in params})
        return params

    async def _handle(self, request: web.Request) -> web.Response:
        match = re.fullmatch(r"/bot([^/]+)/(\w+)", request.path)
        if match is None or match.group(1) != self.token:
            return web.json_response(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401
            )
        method = match.group(2)
        params = await self._read_params(request)
        call = Call(method, params, time.monotonic())
        if method != "getUpdates":
            self.calls.append(call)
        try:
            self._take_fault(method, params)
            handler = getattr(self, f"_api_{method}", None)
            if handler is None:
                raise ApiError(404, "Not Found: method not found")
            result = await handler(params)
        except ApiError as exc:
            call.error = exc.description
            body: dict[str, Any] = {"ok": False, "error_code": exc.code, "description": exc.description}
            if exc.parameters:
                body["parameters"] = exc.parameters
            return web.json_response(body, status=exc.code)
        return web.json_response({"ok": True, "result": result})

    async def _api_getMe(self, params: dict[str, Any]) -> Any:
        return {
            **self.bot_user,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    async def _api_deleteWebhook(self, params: dict[str, Any]) -> Any:
        self.webhook_url = ""
        return True

    async def _api_setWebhook(self, params: dict[str, Any]) -> Any:
        self.webhook_url = str(params.get("url", ""))
        self.allowed_updates = _update_types(params.get("allowed_updates"))
        return True

    async def _api_getChatMember(self, params: dict[str, Any]) -> Any:
        chat_id, user_id = int(params["chat_id"]), int(params["user_id"])
        if (chat_id, user_id) in self.admins:
            return {
                "status": "administrator",
                "user": self._user(user_id),
                "can_be_edited": False,
                "is_anonymous": False,
                "can_manage_chat": True,
                "can_delete_messages": True,
                "can_manage_video_chats": False,
                "can_restrict_members": True,
                "can_promote_members": False,
                "can_change_info": True,
                "can_invite_users": True,
                "can_post_stories": False,
                "can_edit_stories": False,
                "can_delete_stories": False,
            }
        return {"status": "member", "user": self._user(user_id)}

    async def _api_getWebhookInfo(self, params: dict[str, Any]) -> Any:
        return {"url": self.webhook_url, "has_custom_certificate": False, "pending_update_count": 0}

    async def _api_getUpdates(self, params: dict[str, Any]) -> Any:
        offset = int(params.get("offset") or 0)
        limit = int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        self.polls.append(offset)
        self.allowed_updates = _update_types(params.get("allowed_updates"))
        asked = self.allowed_updates or []
        self.updates = [(uid, u) for uid, u in self.updates if not _withheld(u, asked)]  # never sent
        confirmed = [uid for uid, _ in self.updates if uid < offset] if offset else []
        if confirmed:
            self.updates = [(uid, u) for uid, u in self.updates if uid >= offset]
            for listener in self.confirm_listeners:
                listener(confirmed)
        deadline = time.monotonic() + timeout
        self.open_polls += 1
        try:
            while not self.updates and not self._closing and time.monotonic() < deadline:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), deadline - time.monotonic())
                except TimeoutError:
                    break
        finally:
            self.open_polls -= 1
        return [u for _, u in self.updates if not _withheld(u, asked)][:limit]

    def _check_text(self, params: dict[str, Any]) -> tuple[str, str | None, str]:
        text = str(params.get("text") or "")
        parse_mode = params.get("parse_mode")
        visible = visible_text(text, parse_mode)
        if not visible.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        if utf16_len(visible) > MAX_TEXT:
            raise ApiError(400, "Bad Request: message is too long")
        return text, parse_mode, visible

    async def _api_sendMessage(self, params: dict[str, Any]) -> Any:
        chat_id = int(params["chat_id"])
        text, parse_mode, visible = self._check_text(params)
        reply = params.get("reply_parameters") or {}
        reply_to = reply.get("message_id") if isinstance(reply, dict) else None
        message = SentMessage(
            chat_id,
            self._next_message_id(chat_id),
            text,
            parse_mode,
            visible,
            reply_to or params.get("reply_to_message_id"),
            [visible],
        )
        self.sent.append(message)
        self._by_id[(chat_id, message.message_id)] = message
        for listener in self.listeners:
            listener(message)
        result = self._message_json(chat_id, message.message_id)
        if message.reply_to is not None and (chat_id, message.reply_to) in self.user_messages:
            result["reply_to_message"] = self._message_json(chat_id, message.reply_to)
        return result

    async def _api_sendPhoto(self, params: dict[str, Any]) -> Any:
        chat_id = int(params["chat_id"])
        upload = params.get("photo")
        if not isinstance(upload, web.FileField):
            raise ApiError(400, "Bad Request: there is no photo in the request")
        data = upload.file.read()
        if not data.startswith(b"\x89PNG\r\n\x1a\n") and not data.startswith(b"\xff\xd8"):
            raise ApiError(400, "Bad Request: IMAGE_PROCESS_FAILED")
        caption = str(params.get("caption") or "")
        if len(caption) > 1024:
            raise ApiError(400, "Bad Request: message caption is too long")
        photo = SentPhoto(chat_id, self._next_message_id(chat_id), data, upload.filename, caption)
        self.photos.append(photo)
        result = {
            "message_id": photo.message_id,
            "date": int(time.time()),
            "chat": self._chat(chat_id),
            "from": self.bot_user,
            "photo": [{"file_id": f"photo-{photo.message_id}", "file_unique_id": f"u{photo.message_id}",
                       "width": 800, "height": 500, "file_size": len(data)}],
        }  # fmt: skip
        if caption:
            result["caption"] = caption
        return result

    async def _api_editMessageText(self, params: dict[str, Any]) -> Any:
        chat_id, message_id = int(params["chat_id"]), int(params["message_id"])
        message = self._by_id.get((chat_id, message_id))
        if message is None or message.deleted:
            raise ApiError(400, "Bad Request: message to edit not found")
        text, parse_mode, visible = self._check_text(params)
        if visible == message.visible and (text, parse_mode) == (message.text, message.parse_mode):
            raise ApiError(*FAULTS["not_modified"])
        message.text, message.parse_mode, message.visible = text, parse_mode, visible
        message.history.append(visible)
        for listener in self.listeners:
            listener(message)
        return {**self._message_json(chat_id, message_id), "edit_date": int(time.time())}

    async def _api_deleteMessage(self, params: dict[str, Any]) -> Any:
        message = self._by_id.get((int(params["chat_id"]), int(params["message_id"])))
        if message is None or message.deleted:
            raise ApiError(400, "Bad Request: message to delete not found")
        message.deleted = True
        return True

    async def _api_sendMessageDraft(self, params: dict[str, Any]) -> Any:
        chat_id = int(params["chat_id"])
        if chat_id < 0:
            raise ApiError(400, "Bad Request: drafts can be sent only to private chats")
        if not int(params.get("draft_id") or 0):
            raise ApiError(400, "Bad Request: draft_id must be non-zero")
        text = str(params.get("text") or "")
        visible = visible_text(text, params.get("parse_mode"))
        if utf16_len(visible) > MAX_TEXT:
            raise ApiError(400, "Bad Request: message is too long")
        self.drafts.append(Draft(chat_id, int(params["draft_id"]), visible, time.monotonic()))
        return True

    async def _api_sendChatAction(self, params: dict[str, Any]) -> Any:
        return True

    async def _api_setMyCommands(self, params: dict[str, Any]) -> Any:
        commands = list(params.get("commands") or [])
        language = params.get("language_code") or ""
        self.menus[language] = commands
        if not language:
            self.commands = commands
        return True

    async def _api_getMyCommands(self, params: dict[str, Any]) -> Any:
        return self.commands

    async def _api_deleteMyCommands(self, params: dict[str, Any]) -> Any:
        self.commands = []
        return True


def _update_types(value: Any) -> list[str] | None:
    """`allowed_updates` as sent: a JSON list in the query, or a list in a JSON body."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return [str(v) for v in value] if isinstance(value, list) else None


def _withheld(update: Any, asked: list[str]) -> bool:
    """Telegram sends reactions only to a bot that asked for them by name."""
    return isinstance(update, dict) and "message_reaction" in update and "message_reaction" not in asked
