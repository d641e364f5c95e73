"""Telegram's webhook, served by Yanray itself: the answer 200 means "stored".

Telegram treats the HTTP answer to a webhook POST as the confirmation: after a 2xx it
never sends that update again. PTB's webhook server answers 200 before the update is
processed, so a crash in between lost the question. `WebhookServer` (aiohttp, on
`YANRAY_TELEGRAM_WEBHOOK_LISTEN`:`_PORT`, at the path of `YANRAY_TELEGRAM_WEBHOOK_URL`)
answers only after the adapter's handler returned, which is after the dispatcher
committed the question; Telegram holds the next updates of a chat until then.

Each POST must carry `X-Telegram-Bot-Api-Secret-Token` equal to the configured secret
(compared in constant time; anything else is 403). The body is limited to `MAX_BODY`
bytes, checked from `Content-Length` before reading and enforced while reading. A body
that is not JSON, or an update PTB cannot parse (`telegram_updates.read_update`), is
logged once, shortened, and answered 200 so that Telegram does not send it again
forever. A handler's failure is PTB's error handler's business (the user gets a line), so
that update is answered 200 too.

`start()` listens first and then registers the URL with `setWebhook` (with the secret and
the update types); `stop()` stops listening and lets requests being handled finish. The
webhook stays registered, so Telegram keeps the updates that arrive while Yanray is down.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Sequence
from urllib.parse import urlsplit

from aiohttp import web
from telegram import Bot

from yanray.adapters.payloads import shorten
from yanray.adapters.telegram_updates import Handle, read_update

logger = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_BODY = 1024 * 1024  # an update is a few KB; a 4096-character message with entities is far below this
SHUTDOWN_GRACE = 30.0  # seconds requests being handled get at shut-down


class WebhookServer:
    def __init__(
        self,
        *,
        bot: Bot,
        handle: Handle,
        url: str,
        listen: str,
        port: int,
        secret: str,
        allowed_updates: Sequence[str],
    ) -> None:
        self.bot = bot
        self.handle = handle
        self.url = url
        self.listen = listen
        self.port = port
        self._secret = secret.encode()
        self.allowed_updates = list(allowed_updates)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post(urlsplit(self.url).path or "/", self._receive)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.listen, self.port).start()
            await self.bot.set_webhook(
                self.url, secret_token=self._secret.decode(), allowed_updates=self.allowed_updates
            )
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()  # closes the listener, then waits for requests in progress

    async def _receive(self, request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, self._secret):
            logger.warning("Telegram webhook: refused a request without the right secret token")
            return web.Response(status=403)
        if request.content_length is not None and request.content_length > MAX_BODY:
            logger.warning("Telegram webhook: refused a body of %d bytes", request.content_length)
            return web.Response(status=413)
        body = await request.read()  # raises 413 past client_max_size (a body without a length)
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError) as exc:
            logger.warning("Telegram webhook: skipped a body that is not JSON (%s): %s", exc, shorten(body))
            return web.Response()
        update = read_update(raw, self.bot)
        if update is not None:
            await self.handle(update)
        return web.Response()
