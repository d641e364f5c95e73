"""The `openai` backend: any OpenAI-compatible chat server (vLLM, llama.cpp server, Ollama).

One `OpenAIEngine` holds the HTTP session and the server's address; each `OpenAISession`
holds a conversation's message list. A round POSTs the whole list to
`{base_url}/chat/completions` with `stream: true`; `engine/openai_stream.py` reads the
server-sent events, passing each text piece to `on_text`. This module owns the HTTP side
and turns every failure into one line for the user. There is no KV cache on this side (vLLM's prefix
caching does that job on the server), so every round resends everything.

Choices where the design is silent:

- Tokens are estimated, since the remote tokenizer is unknown: `ceil(utf8_bytes / 3)` per
  message plus 4 for its role markers, plus 3 to prime the reply. A CJK character is 3 UTF-8
  bytes, so it counts as one token (ChatGLM3 needs fewer); English counts about 1 token per
  3 characters (tokenizers need about 4). The estimate errs on the long side, so a cut
  history still fits. The server's `usage`, when it sends one, fills `Generation`'s counts.
  Fitting a history (`fit`, `engine/fit.py`) estimates on a thread of the engine's own,
  off the event loop: the estimate reads every byte of people's text.
- An observation is sent as a `user` message `Tools: <content>` (the seed's plain format),
  because OpenAI-compatible servers have no observation role that all of them accept.
  Roles system, user and assistant map to themselves. `tools` are not sent
  (`native_tools = False`): the bot describes them in the system prompt (slash dialect).
- Stops: `stop_at` is fed every piece; at a cut the response is closed, so the server
  stops generating. `max_tokens` is sent, and also enforced here as a character bound
  (`engine/openai_stream.py`), since some servers ignore it. The pieces given to `on_text`
  always join to `text`.
- `cancel` (a threading.Event) is checked between pieces and polled every 50 ms while the
  server is silent, so /stop works even when the server stalls.
- `timeout` is the longest silence allowed: to connect, for the first byte, and between
  two chunks (aiohttp `sock_connect` / `sock_read`). There is no total limit here: a long
  answer that keeps streaming is fine, and the worker's per-request time limit bounds it.
- After a round the assistant text (if any) joins the session's messages, also when the
  round was cut by a stop or cancelled. A failed round changes nothing, so the same session
  can simply generate again.
- Every failure (cannot connect, timeout, non-200, malformed or cut stream) raises
  `EngineError` (`EngineUnavailable` when the server cannot be reached) whose `str()` is one
  line for the user; the details go to the log. The API key goes only in the
  `Authorization: Bearer` header and is never logged. A `user:password@` in the base URL is
  sent as basic auth (when there is no API key) and never shown.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from yanray.engine.base import (
    ChatMessage,
    EngineError,
    EngineUnavailable,
    GenerateOptions,
    Generation,
    TextCallback,
    ToolSpec,
)
from yanray.engine.fit import Fitter
from yanray.engine.openai_stream import (
    ChunkReader,
    MalformedChunk,
    RoundState,
    ServerFailed,
    StreamCut,
    error_message,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

BYTES_PER_TOKEN = 3
TOKENS_PER_MESSAGE = 4
REPLY_PRIMING_TOKENS = 3
OBSERVATION_PREFIX = "Tools: "
CANCEL_POLL_S = 0.05


def estimate_tokens(messages: Sequence[ChatMessage]) -> int:
    """The conservative token estimate described in the module docstring."""
    return sum(_estimate_text(_content_of(m)) + TOKENS_PER_MESSAGE for m in messages) + REPLY_PRIMING_TOKENS


def to_openai_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """ChatGLM3 roles to OpenAI chat messages (an observation becomes a `Tools: ...` user turn)."""
    return [
        {"role": "user" if m.role == "observation" else m.role, "content": _content_of(m)} for m in messages
    ]


def _estimate_text(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)


def _basic_auth(url: URL) -> str | None:
    if not url.user:
        return None
    return "Basic " + base64.b64encode(f"{url.user}:{url.password or ''}".encode()).decode("ascii")


def _content_of(message: ChatMessage) -> str:
    return OBSERVATION_PREFIX + message.content if message.role == "observation" else message.content


class OpenAIEngine:
    name = "openai"
    native_tools = False
    #: requests the worker sends at once when YANRAY_MAX_BATCH is unset: the server batches them
    #: (vLLM, SGLang) or queues them (a one-slot llama.cpp), so a few in flight cost nothing here
    max_batch = 4

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None,
        timeout: float,
        max_context: int = 8192,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        url = URL(base_url.rstrip("/"))
        if not url.absolute or url.scheme not in ("http", "https"):
            raise EngineUnavailable(
                "The model server address is not an http(s) URL like http://127.0.0.1:8000/v1. "
                "Check YANRAY_OPENAI_BASE_URL."
            )
        # Requests, users and logs see the address without any user:password part; those
        # become HTTP basic auth, unless there is an API key (a Bearer header), which wins.
        self.base_url = self.display_url = str(url.with_user(None))
        self.model = model
        self.max_context = max_context
        self.timeout = timeout
        self._authorization = f"Bearer {api_key}" if api_key else _basic_auth(url)
        self._secrets = tuple(filter(None, (api_key, url.password)))  # scrubbed from server text
        self._http = http
        self._owns_http = http is None
        self.fitter = Fitter(
            cost=lambda message: estimate_tokens([message]) - REPLY_PRIMING_TOKENS,
            fixed=lambda system, tools: estimate_tokens([system]),
        )
        self._estimating: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIEngine(base_url={self.display_url!r}, model={self.model!r})"

    def count_tokens(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> int:
        return estimate_tokens(messages)

    async def count(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> int:
        return await self._estimate(self.count_tokens, list(messages))

    async def fit(
        self, system: ChatMessage, history: Sequence[ChatMessage], tools: Sequence[ToolSpec], budget: int
    ) -> list[ChatMessage]:
        return await self._estimate(self.fitter.fit, system, list(history), (), budget)

    async def _estimate(self, fn: Callable[..., T], *args: Any) -> T:
        """Run an estimate on this engine's own thread: it grows with people's text."""
        if self._estimating is None:
            self._estimating = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yanray-estimate")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._estimating, fn, *args)

    async def start(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> OpenAISession:
        return OpenAISession(self, messages)

    async def aclose(self) -> None:
        if self._estimating is not None:
            self._estimating.shutdown(wait=False)
            self._estimating = None
        if self._owns_http and self._http is not None:
            await self._http.close()
            self._http = None

    # --- one round ----------------------------------------------------------------------

    async def complete(
        self, messages: Sequence[ChatMessage], options: GenerateOptions, on_text: TextCallback | None
    ) -> Generation:
        """POST `messages`, stream the answer to `on_text`, and return this round's result."""
        if options.cancel.is_set():
            return Generation(text="", finish="cancelled")
        reader = ChunkReader(options, on_text)
        await self._guard(self._stream(messages, options, reader), reader.state)
        state, text = reader.state, reader.round.text
        return Generation(
            text=text,
            finish=state.finish,
            prompt_tokens=state.prompt_tokens or estimate_tokens(messages),
            new_tokens=state.new_tokens or _estimate_text(text),
        )

    def _body(self, messages: Sequence[ChatMessage], options: GenerateOptions) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": to_openai_messages(messages),
            "stream": True,
            "temperature": max(0.0, options.temperature),  # 0 asks the server for greedy decoding
            "max_tokens": options.max_new_tokens,
        }
        return body

    async def _stream(
        self, messages: Sequence[ChatMessage], options: GenerateOptions, reader: ChunkReader
    ) -> None:
        url = f"{self.base_url}/chat/completions"
        body = self._body(messages, options)
        async with self._session().post(url, json=body, **self._request_kwargs()) as resp:
            reader.state.answered = True
            if resp.status != 200:
                raise await self._status_error(resp)
            if resp.content_type == "application/json":  # the server ignored `stream`
                reader.whole(await resp.json())
                return
            # The reading runs as its own task so that a cancel flag set while the server is
            # silent is noticed within CANCEL_POLL_S, not only when the next chunk arrives.
            task = asyncio.ensure_future(reader.events(resp))
            try:
                while not task.done():
                    await asyncio.wait({task}, timeout=CANCEL_POLL_S)
                    if not task.done() and options.cancel.is_set():
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                        reader.cancelled()
                if not task.cancelled():
                    task.result()
            finally:
                if not task.done():  # this coroutine itself was cancelled
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                if not reader.state.complete:
                    resp.close()  # stopped early: drop the connection so the server stops generating

    async def _guard(self, work: Coroutine[Any, Any, Any], state: RoundState) -> Any:
        """Run one HTTP exchange, turning every way it can fail into a one-line EngineError."""
        try:
            return await work
        except EngineError:
            raise
        except TimeoutError as exc:
            raise self._fail(
                f"sent nothing for {self.timeout:g} s. It may be overloaded; try again later", exc
            ) from exc
        except aiohttp.ClientConnectorDNSError as exc:
            raise self._unreachable("host not found", exc) from exc
        except aiohttp.ClientConnectorError as exc:
            reason = (
                "connection refused" if isinstance(exc.os_error, ConnectionRefusedError) else exc.strerror
            )
            raise self._unreachable(reason or "connection failed", exc) from exc
        except (StreamCut, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            where = "in the middle of the answer" if state.answered else "without answering"
            raise self._fail(f"closed the connection {where}. Try again", exc) from exc
        except aiohttp.InvalidURL as exc:
            raise self._unreachable("the address is not a valid URL", exc) from exc
        except ServerFailed as exc:
            raise self._fail(
                f"failed while answering ({self._scrub(str(exc))}). Try again later", exc
            ) from exc
        except (MalformedChunk, aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._fail(
                "sent a reply Yanray cannot read. Check that it is OpenAI-compatible", exc
            ) from exc

    # --- helpers ------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    def _request_kwargs(self) -> dict[str, Any]:
        headers = {"Accept": "text/event-stream, application/json"}
        if self._authorization:
            headers["Authorization"] = self._authorization
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)
        return {"headers": headers, "timeout": timeout}

    async def _status_error(self, resp: aiohttp.ClientResponse) -> EngineError:
        raw = self._scrub(await resp.text(errors="replace"))
        try:
            message = error_message(json.loads(raw))
        except json.JSONDecodeError:
            message = ""
        shown = (
            f"HTTP {resp.status}: {message}" if message else f"HTTP {resp.status} {resp.reason or ''}".strip()
        )
        logger.warning("Model server %s answered %s: %s", self.display_url, resp.status, raw[:1000])
        if resp.status in (401, 403):
            logger.error("check YANRAY_OPENAI_API_KEY: the model server refused it")
            return EngineError(self._line(f"refused Yanray's API key ({shown}); the owner should check it"))
        if resp.status == 404:
            logger.error("check YANRAY_OPENAI_MODEL and YANRAY_OPENAI_BASE_URL: the server answered 404")
            return EngineError(self._line(f"does not know the configured model ({shown})"))
        if resp.status == 429:
            return EngineError(self._line(f"is busy ({shown}); try again in a moment"))
        if resp.status < 500:
            return EngineError(self._line(f"rejected the request ({shown})"))
        return EngineError(self._line(f"failed ({shown}); try again later"))

    def _scrub(self, text: str) -> str:
        """Servers sometimes echo the key they refused; it must not reach a user or a log."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _line(self, what: str) -> str:
        """One line for the user: what went wrong, without the server's address (it goes to the log),
        since answers can land in public chats."""
        return " ".join(f"The model server {what}.".split())

    def _fail(self, what: str, exc: BaseException) -> EngineError:
        logger.warning("Model server %s %s: %s", self.display_url, what, self._scrub(repr(exc)))
        return EngineError(self._line(what))

    def _unreachable(self, reason: str, exc: BaseException) -> EngineUnavailable:
        logger.warning(
            "Model server %s cannot be reached (check YANRAY_OPENAI_BASE_URL): %r", self.display_url, exc
        )
        return EngineUnavailable(self._line(f"cannot be reached ({reason}); try again later"))


class OpenAISession:
    """One conversation on the server: the message list, grown by each round and observation."""

    def __init__(self, engine: OpenAIEngine, messages: Sequence[ChatMessage]) -> None:
        self._engine = engine
        self.messages: list[ChatMessage] = list(messages)

    async def generate(self, options: GenerateOptions, on_text: TextCallback | None = None) -> Generation:
        generation = await self._engine.complete(self.messages, options, on_text)
        if generation.text:
            self.messages.append(ChatMessage(role="assistant", content=generation.text))
        return generation

    async def append(self, message: ChatMessage) -> None:
        self.messages.append(message)

    async def close(self) -> None:
        self.messages.clear()
