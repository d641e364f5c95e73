"""A fake SearxNG: `GET /search?q=...&format=json` on 127.0.0.1 and a free port.

It records every query string it was sent (decoded, as SearxNG would read it) and
answers with what the test set: a JSON payload, raw bytes, or an HTTP status.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web


class FakeSearxng:
    def __init__(
        self, payload: Any = None, *, body: bytes | None = None, status: int = 200, hang: bool = False
    ) -> None:
        self.hang = hang  # never answers (until the client gives up)
        self.payload = payload if payload is not None else {"results": []}
        self.body = body  # sent as is instead of the payload's JSON
        self.status = status
        self.queries: list[dict[str, str]] = []
        self.headers: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> FakeSearxng:
        app = web.Application()
        app.router.add_get("/search", self._search)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _search(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(dict(request.query))
        self.headers.append(dict(request.headers))
        if self.hang:
            await asyncio.Event().wait()
        if self.status != 200:
            return web.Response(status=self.status, text="Forbidden")
        body = self.body if self.body is not None else json.dumps(self.payload).encode()
        return web.Response(body=body, content_type="application/json")
