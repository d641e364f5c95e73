"""A local stand-in for Discord's REST API and gateway, driven by the real discord.py client.

Serves, on 127.0.0.1 and a free port, `api_base` (`http://127.0.0.1:PORT/api/v10`) and
`gateway_url` (`ws://127.0.0.1:PORT/gateway`). One bot user, one application, one guild
with two text channels, a thread and a role, and two human members (alice, bob):

    async with FakeDiscord() as fake:
        adapter = DiscordAdapter(settings=Settings(discord_api_base=fake.api_base,
                                                   discord_gateway_url=fake.gateway_url, ...), ...)
        await adapter.start()
        mid = await fake.user_message(fake.channel_id, fake.alice, f"<@{fake.bot_id}> hi",
                                      mentions=[fake.bot])
        await fake.wait_for(lambda: fake.replies_to(mid))

The gateway speaks plain JSON text frames (the `compress=zlib-stream` query is ignored;
discord.py decompresses only binary frames): HELLO, heartbeat ACKs, READY (guilds
unavailable) followed by a full GUILD_CREATE after IDENTIFY, RESUMED plus a replay of the
events the client missed after RESUME. Tests push events with `user_message`,
`edit_user_message`, `slash` and `dispatch`, and `drop_gateway()` closes the socket so the
client resumes (`drop_gateway(4004)`: so that it cannot).

A message posted with files (a multipart upload: `payload_json` and `files[N]`) keeps
them in `Msg.files` as (name, bytes) and lists them as its attachments.

REST answers carry `Content-Type: application/json` exactly (with a charset discord.py
reads the body as text). Every REST call is recorded in `calls` (method, path, query,
JSON body, time), and the messages users would see are kept in `messages` with the time of
each create/edit, so a test reads what a user would see. Faults: `fail(...)` answers the
next matching calls with a status (a 429 carries `retry_after` and a `Via` header, as
Discord's does, so discord.py waits and retries), `forbid_channel(id)` answers every
write in that channel with 403 Missing Permissions.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.discord_payloads import DiscordWorld, Msg, member_payload, snowflake

#: the gateway intents that bring reactions (Discord sends none to a client without them)
GUILD_MESSAGE_REACTIONS, DIRECT_MESSAGE_REACTIONS = 1 << 10, 1 << 13


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    at: float


@dataclass
class _Rule:
    method: str
    path: re.Pattern[str]
    status: int
    times: int
    retry_after: float
    via: bool
    code: int
    uploads: bool = False


def _multipart(content_type: str, raw: bytes) -> dict[str, Any]:
    """A multipart upload as discord.py sends one: `payload_json` (the message) and
    `files[N]` fields; the result is the message's JSON with "files": [(name, bytes)]."""
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    body: dict[str, Any] = {"files": []}
    for part in parsed.iter_parts():
        name = part.get_param("name", header="content-disposition")
        content = part.get_payload(decode=True) or b""
        if name == "payload_json":
            body.update(json.loads(content))
        elif isinstance(name, str) and name.startswith("files["):
            body["files"].append((part.get_filename() or "", content))
    return body


class FakeDiscord(DiscordWorld):
    def __init__(self, *, token: str = "fake-token") -> None:
        super().__init__()
        self.token = token
        self.calls: list[Call] = []
        self.commands: list[dict[str, Any]] = []
        self.identifies: list[dict[str, Any]] = []
        self.resumes = 0
        #: what READY says to resume at (a real gateway names another host; the client must
        #: still resume through the configured gateway URL)
        self.resume_url = ""
        self.forbidden_channels: set[str] = set()
        self._rules: list[_Rule] = []
        self._events: list[tuple[int, str, dict[str, Any]]] = []
        self._seq = 0
        self._ws: web.WebSocketResponse | None = None
        self._session_id = ""
        self._runner: web.AppRunner | None = None
        self._originals: dict[str, str] = {}  # interaction id -> its original response message id
        self._interaction_channels: dict[str, str] = {}
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # -- faults --------------------------------------------------------------------------

    def fail(
        self,
        method: str,
        path: str,
        status: int,
        *,
        times: int = 1,
        retry_after: float = 0.05,
        via: bool = True,
        code: int = 0,
        uploads: bool = False,
    ) -> None:
        """Answer the next `times` calls matching `method` and the `path` regex with `status`
        (and Discord's JSON error `code`, e.g. 50027 Invalid Webhook Token); `uploads`: only
        calls that upload files."""
        self._rules.append(_Rule(method, re.compile(path), status, times, retry_after, via, code, uploads))

    def forbid_channel(self, channel_id: str) -> None:
        self.forbidden_channels.add(channel_id)

    # -- what users see ------------------------------------------------------------------

    def bot_messages(self, channel_id: str | None = None) -> list[Msg]:
        return [
            m
            for m in self.messages.values()
            if m.author_id == self.bot_id and not m.deleted and channel_id in (None, m.channel_id)
        ]

    def replies_to(self, message_id: str) -> list[Msg]:
        """The bot's visible messages answering `message_id`: the reply and the parts after it."""
        first = [m for m in self.bot_messages() if m.reply_to == message_id]
        if not first:
            return []
        head = first[0]
        ids = list(self.messages)
        after = [self.messages[i] for i in ids[ids.index(head.id) + 1 :]]
        parts = [head]
        for m in after:
            if m.channel_id == head.channel_id and m.author_id == self.bot_id and not m.deleted:
                if m.reply_to not in (None, message_id):
                    break
                parts.append(m)
            elif m.channel_id == head.channel_id:
                break
        return parts

    def interaction_response(self, interaction_id: str) -> Msg | None:
        """The message a slash command's (deferred) response became, once it exists."""
        mid = self._originals.get(interaction_id)
        return self.messages[mid] if mid else None

    def writes(self, channel_id: str | None = None) -> list[Call]:
        """Every message create/edit the bot asked for (channel and interaction webhooks)."""
        out = []
        for c in self.calls:
            if c.method not in ("POST", "PATCH") or not isinstance(c.body, dict):
                continue
            if "/messages" in c.path or c.path.startswith("/webhooks/") or c.path.endswith("/callback"):
                if channel_id is None or f"/channels/{channel_id}/" in c.path:
                    out.append(c)
        return out

    @staticmethod
    async def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the fake Discord to see it")
            await asyncio.sleep(0.01)

    # -- events a test pushes ------------------------------------------------------------

    async def dispatch(self, name: str, data: dict[str, Any]) -> None:
        self._seq += 1
        self._events.append((self._seq, name, data))
        if self._ws is not None and not self._ws.closed:
            await self._ws.send_str(json.dumps({"op": 0, "t": name, "s": self._seq, "d": data}))

    async def user_message(self, channel_id: str, author: dict[str, Any], content: str, **kw: Any) -> str:
        data = self.message_payload(channel_id, author, content, **kw)
        history = [(time.monotonic(), content)]
        self.messages[data["id"]] = Msg(
            data["id"], channel_id, author["id"], content, kw.get("reply_to"), history=history
        )
        await self.dispatch("MESSAGE_CREATE", data)
        return str(data["id"])

    async def edit_user_message(self, mid: str, content: str, **kw: Any) -> None:
        msg = self.messages[mid]
        msg.content = content
        msg.history.append((time.monotonic(), content))
        data = self.message_payload(
            msg.channel_id, self.user(msg.author_id), content, mid=mid, edited=True, **kw
        )
        await self.dispatch("MESSAGE_UPDATE", data)

    async def slash(
        self,
        name: str,
        author: dict[str, Any],
        options: Iterable[dict[str, Any]] = (),
        channel_id: str | None = None,
        locale: str = "en-US",
    ) -> str:
        """A user runs /name (in `channel_id`, #general by default) from a Discord app in
        `locale`; returns the interaction id."""
        command_id = next((str(c["id"]) for c in self.commands if c["name"] == name), snowflake())
        data = self.interaction_payload(
            name, command_id, author, options, channel_id or self.channel_id, locale=locale
        )
        await self.dispatch("INTERACTION_CREATE", data)
        return str(data["id"])

    async def react(self, user: dict[str, Any], message_id: str, emoji: str, *, add: bool = True) -> bool:
        """`user` adds (or removes) the unicode `emoji` on a message: MESSAGE_REACTION_ADD or
        _REMOVE, sent only to a client that asked for the reactions intent of that kind of
        channel, as Discord does; returns whether it was sent."""
        msg = self.messages[message_id]
        guild = self.in_guild(msg.channel_id)
        intents = int(self.identifies[-1].get("intents", 0)) if self.identifies else 0
        if not intents & (GUILD_MESSAGE_REACTIONS if guild else DIRECT_MESSAGE_REACTIONS):
            return False
        data: dict[str, Any] = {
            "user_id": user["id"], "channel_id": msg.channel_id, "message_id": message_id,
            "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0,
        }  # fmt: skip
        if add:
            data["message_author_id"] = msg.author_id
        if guild:
            data["guild_id"] = self.guild_id
            if add:
                data["member"] = dict(member_payload(self.member_roles.get(user["id"], [])), user=user)
        await self.dispatch("MESSAGE_REACTION_ADD" if add else "MESSAGE_REACTION_REMOVE", data)
        return True

    async def drop_gateway(self, code: int = 4000) -> None:
        """Close the gateway socket as a network fault would (4000: the client resumes), or with
        a code Discord gives no way back from (4004 Authentication failed)."""
        if self._ws is not None:
            await self._ws.close(code=code, message=b"fake drop")

    # -- REST ----------------------------------------------------------------------------

    @staticmethod
    def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        if status == 204:
            return web.Response(status=204)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        return web.Response(status=status, body=json.dumps(data).encode(), headers=hdrs)

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            ctype = request.headers.get("Content-Type", "")
            if ctype.startswith("application/json"):
                body = json.loads(raw)
            elif ctype.startswith("multipart/"):
                body = _multipart(ctype, raw)
        self.calls.append(Call(request.method, path, dict(request.query), body, time.monotonic()))
        if request.headers.get("Authorization") not in (f"Bot {self.token}", None):
            return self._json({"message": "401: Unauthorized", "code": 0}, 401)
        for rule in self._rules:
            uploading = isinstance(body, dict) and bool(body.get("files"))
            if (
                rule.times > 0
                and rule.method == request.method
                and rule.path.search(path)
                and (uploading or not rule.uploads)
            ):
                rule.times -= 1
                if rule.status == 429:
                    headers = {"Retry-After": str(rule.retry_after), "X-RateLimit-Scope": "user"}
                    if rule.via:
                        headers["Via"] = "1.1 google"
                    payload = {
                        "message": "You are being rate limited.",
                        "retry_after": rule.retry_after,
                        "global": False,
                    }
                    return self._json(payload, 429, headers)
                return self._json({"message": f"fake {rule.status}", "code": rule.code}, rule.status)
        m = re.fullmatch(r"/channels/(\d+)/.*", path)
        if m and m.group(1) in self.forbidden_channels and request.method != "GET":
            return self._json({"message": "Missing Permissions", "code": 50013}, 403)
        return self._route(request.method, path, dict(request.query), body)

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> web.Response:
        if path == "/users/@me":
            return self._json(self.bot)
        if path == "/oauth2/applications/@me":
            return self._json(self.application_json())
        if path in ("/gateway", "/gateway/bot"):
            return self._json({"url": self.gateway_url, "shards": 1})
        if re.fullmatch(r"/applications/\d+(/guilds/\d+)?/commands", path):
            if method == "PUT":
                self.commands = [
                    dict(
                        c,
                        id=snowflake(),
                        application_id=self.app_id,
                        version="1",
                        guild_id=self.guild_id if "/guilds/" in path else None,
                    )
                    for c in body or []
                ]
                return self._json(self.commands)
            return self._json(self.commands)
        m = re.fullmatch(r"/channels/(\d+)/typing", path)
        if m:
            return self._json(None, 204)
        m = re.fullmatch(r"/channels/(\d+)/messages", path)
        if m and method == "GET":  # history: Discord answers newest first
            after = int(query.get("after", 0))
            found = [
                msg
                for msg in self.messages.values()
                if msg.channel_id == m.group(1) and not msg.deleted and int(msg.id) > after
            ]
            found = found[: int(query.get("limit", 50))]
            return self._json([self.message_json(msg) for msg in reversed(found)])
        if m and method == "POST":
            ref = (body or {}).get("message_reference") or {}
            reply_to = str(ref["message_id"]) if ref.get("message_id") else None
            msg = self._new_message(m.group(1), (body or {}).get("content", ""), reply_to)
            msg.files = list((body or {}).get("files", []))
            return self._json(self.message_json(msg))
        m = re.fullmatch(r"/channels/(\d+)/messages/(\d+)", path)
        if m:
            msg = self.messages.get(m.group(2))
            if msg is None or msg.deleted:
                return self._json({"message": "Unknown Message", "code": 10008}, 404)
            return self._edit_or_delete(method, msg, body)
        m = re.fullmatch(r"/interactions/(\d+)/([^/]+)/callback", path)
        if m:
            return self._callback(m.group(1), body)
        m = re.fullmatch(r"/webhooks/(\d+)/tok-(\d+)", path)
        if m and method == "POST":
            cid = self._interaction_channels.get(m.group(2), self.channel_id)
            msg = self._new_message(cid, (body or {}).get("content", ""), None)
            msg.files = list((body or {}).get("files", []))
            return self._json(self.message_json(msg, webhook=True))
        m = re.fullmatch(r"/webhooks/(\d+)/tok-(\d+)/messages/(@original|\d+)", path)
        if m:
            mid = self._originals.get(m.group(2)) if m.group(3) == "@original" else m.group(3)
            msg = self.messages.get(mid or "")
            if msg is None or msg.deleted:
                return self._json({"message": "Unknown Message", "code": 10008}, 404)
            return self._edit_or_delete(method, msg, body, webhook=True)
        return self._json({"message": "404: Not Found", "code": 0}, 404)

    def _new_message(self, channel_id: str, content: str, reply_to: str | None) -> Msg:
        msg = Msg(
            snowflake(), channel_id, self.bot_id, content, reply_to, history=[(time.monotonic(), content)]
        )
        self.messages[msg.id] = msg
        return msg

    def _edit_or_delete(self, method: str, msg: Msg, body: Any, *, webhook: bool = False) -> web.Response:
        if method == "DELETE":
            msg.deleted = True
            return self._json(None, 204)
        if method == "PATCH" and "content" in (body or {}):
            msg.content = body["content"] or ""
            msg.history.append((time.monotonic(), msg.content))
        return self._json(self.message_json(msg, webhook=webhook))

    def _callback(self, iid: str, body: Any) -> web.Response:
        cid = next(
            (
                e[2].get("channel_id")
                for e in reversed(self._events)
                if e[1] == "INTERACTION_CREATE" and e[2]["id"] == iid
            ),
            self.channel_id,
        )
        self._interaction_channels[iid] = cid
        kind = (body or {}).get("type")
        content = ((body or {}).get("data") or {}).get("content", "")
        msg = self._new_message(cid, content, None)
        self._originals[iid] = msg.id
        interaction = {
            "id": iid,
            "type": 2,
            "response_message_id": msg.id,
            "response_message_loading": kind == 5,
            "response_message_ephemeral": False,
        }
        resource = {"type": kind, "message": self.message_json(msg, webhook=True)}
        return self._json({"interaction": interaction, "resource": resource})

    # -- gateway -------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        async for frame in ws:
            if frame.type is not WSMsgType.TEXT:
                continue
            msg = json.loads(frame.data)
            op = msg.get("op")
            if op == 1:
                await ws.send_str(json.dumps({"op": 11}))
            elif op == 2:
                self.identifies.append(msg["d"])
                self._ws = ws
                await self._identify(ws)
            elif op == 6:
                self.resumes += 1
                self._ws = ws
                last = msg["d"].get("seq") or 0
                for seq, name, data in [e for e in self._events if e[0] > last]:  # what it missed
                    await ws.send_str(json.dumps({"op": 0, "t": name, "s": seq, "d": data}))
                await ws.send_str(json.dumps({"op": 0, "t": "RESUMED", "s": None, "d": {}}))
        if self._ws is ws:
            self._ws = None
        return ws

    async def _identify(self, ws: web.WebSocketResponse) -> None:
        self._session_id = snowflake()
        ready = self.ready_json(self._session_id, self.resume_url or self.gateway_url)
        self._events.clear()
        self._seq = 1
        await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": 1, "d": ready}))
        await self.dispatch("GUILD_CREATE", self.guild_json())
