"""A scripted, local stand-in for an OpenAI-compatible chat server (vLLM, llama.cpp, Ollama).

Serves, on 127.0.0.1 and a free port:

- `POST /v1/chat/completions`, streaming (server-sent events: `data: {chunk}` lines whose
  `choices[0].delta.content` carry the reply a few characters at a time, a last chunk with
  `finish_reason`, then `data: [DONE]`) or not (one `chat.completion` JSON body).

It is scripted, never clever: each request takes the next entry of `replies` (or asks
`responder(messages)`), and every request body is recorded in `requests`, so a test can
assert exactly what the model saw. An entry is reply text, or a `Reply` that also scripts a
fault: an HTTP error with an OpenAI-style JSON body, a connection closed after N chunks, a
stall (the stream never finishes), or a malformed chunk.

    from tests.fakes.openai_server import FakeOpenAI, Reply

    async with FakeOpenAI(replies=["/calculate 6.5*7.5\n", "It is 48.75."]) as fake:
        engine = OpenAIEngine(base_url=fake.base_url, model="m", api_key=None, timeout=5)
        ...
        assert fake.requests[1]["messages"][-1] == {"role": "user", "content": "Tools: 48.75"}

Client disconnects (the client stops reading at a stop condition) end the handler quietly
and are counted in `disconnects`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

Responder = Callable[[list[dict[str, Any]]], "str | Reply | Awaitable[str | Reply]"]


@dataclass(frozen=True)
class Reply:
    """One scripted answer. Plain strings in `replies` become `Reply(text)`.

    - `status` != 200: answer that status with `{"error": {"message": error, ...}}`.
    - `cut_after=N`: send N content chunks, then close the connection (no final chunk, no [DONE]).
    - `stall_after=N`: send N content chunks, then send nothing more, ever (until the client leaves).
    - `malformed_after=N`: send N content chunks, then a chunk that is not JSON.
    - `error_after=N`: send N content chunks, then an in-stream `{"error": {"message": error}}`
      event and end the stream (as vLLM does when generation fails mid-way).
    - `finish_reason`: what the last chunk says ("stop", "length", ...).
    - `chunk_size` / `chunk_delay` / `delay`: override the server's defaults for this reply;
      `delay` is waited before the response headers are sent (a model's prefill time).
    """

    text: str = ""
    finish_reason: str = "stop"
    status: int = 200
    error: str = ""
    cut_after: int | None = None
    stall_after: int | None = None
    malformed_after: int | None = None
    error_after: int | None = None
    chunk_size: int | None = None
    chunk_delay: float | None = None
    delay: float | None = None

    @classmethod
    def http_error(cls, status: int, message: str) -> Reply:
        return cls(status=status, error=message)


class FakeOpenAI:
    """`async with FakeOpenAI(replies=[...]) as fake:` then point a client at `fake.base_url`."""

    def __init__(
        self,
        replies: Sequence[str | Reply] = (),
        *,
        responder: Responder | None = None,
        model: str = "fake-model",
        api_key: str | None = None,
        chunk_size: int = 3,
        chunk_delay: float = 0.0,
        delay: float = 0.0,
        streaming: bool = True,
    ) -> None:
        self.replies: list[str | Reply] = list(replies)
        self.responder = responder
        self.model = model
        self.api_key = api_key  # when set, requests without `Authorization: Bearer <key>` get 401
        self.chunk_size = chunk_size
        self.chunk_delay = chunk_delay
        self.delay = delay
        self.streaming = streaming  # False: answer one JSON body even when asked to stream
        #: parsed JSON bodies of every POST /v1/chat/completions, in arrival order
        self.requests: list[dict[str, Any]] = []
        #: the headers of those requests (same order)
        self.headers: list[dict[str, str]] = []
        #: how many streams the client abandoned before the end
        self.disconnects = 0
        #: how many streams went silent (`stall_after`), counted when the silence starts
        self.stalls = 0
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self.port = 0

    @property
    def base_url(self) -> str:
        """What a client takes as its base URL, e.g. "http://127.0.0.1:41234/v1"."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def last_messages(self) -> list[dict[str, Any]]:
        return list(self.requests[-1]["messages"])

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        # handler_cancellation: a client that leaves mid-stream cancels its handler, so a
        # stalled stream ends with the client instead of holding the server open.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site.port

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- handlers -----------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "request body is not JSON")
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided.")
        reply = await self._next_reply(body.get("messages", []))
        delay = self.delay if reply.delay is None else reply.delay
        if delay:
            await asyncio.sleep(delay)
        if reply.status != 200:
            return _error(reply.status, reply.error or "scripted error")
        text, finish = reply.text, reply.finish_reason
        if not (body.get("stream") and self.streaming):
            return web.json_response(self._completion(text, finish, body))
        try:
            return await self._stream(request, reply, text, finish)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise

    async def _next_reply(self, messages: list[dict[str, Any]]) -> Reply:
        if self.replies:
            entry: str | Reply = self.replies.pop(0)
        elif self.responder is not None:
            result = self.responder(messages)
            entry = await result if inspect.isawaitable(result) else result
        else:
            entry = Reply.http_error(
                500, f"FakeOpenAI has no scripted reply for request #{len(self.requests)}"
            )
        return Reply(text=entry) if isinstance(entry, str) else entry

    async def _stream(self, request: web.Request, reply: Reply, text: str, finish: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        size = reply.chunk_size or self.chunk_size
        pause = self.chunk_delay if reply.chunk_delay is None else reply.chunk_delay
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        await _send(resp, self._chunk({"role": "assistant", "content": ""}, None))
        for sent, piece in enumerate(pieces):
            if sent == reply.cut_after:
                return _drop_connection(request, resp)
            if sent == reply.stall_after:
                self.stalls += 1
                await self._closing.wait()
                return resp
            if sent == reply.malformed_after:
                await resp.write(b'data: {"choices": [{"delta": {"content": "oops"\n\n')
                await resp.write_eof()
                return resp
            if sent == reply.error_after:
                error = {
                    "error": {"message": reply.error or "scripted error", "type": "server_error", "code": 500}
                }
                await _send(resp, error)
                await resp.write_eof()
                return resp
            if pause:
                await asyncio.sleep(pause)
            await _send(resp, self._chunk({"content": piece}, None))
        if reply.cut_after is not None:
            return _drop_connection(request, resp)
        if reply.stall_after is not None:
            self.stalls += 1
            await self._closing.wait()
            return resp
        await _send(resp, self._chunk({}, finish))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def _completion(self, text: str, finish: str, body: dict[str, Any]) -> dict[str, Any]:
        prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            ],
            "usage": {
                "prompt_tokens": prompt_chars // 4,
                "completion_tokens": len(text) // 4,
                "total_tokens": prompt_chars // 4 + len(text) // 4,
            },
        }


def _error(status: int, message: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


async def _send(resp: web.StreamResponse, chunk: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")


def _drop_connection(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    # Abort the socket so the chunked body never gets its terminator: the client sees a
    # connection lost in the middle of the payload, as when a server process dies.
    if request.transport is not None:
        request.transport.abort()
    return resp
