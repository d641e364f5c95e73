"""Reading one streamed chat completion from an OpenAI-compatible server.

`ChunkReader` turns the server-sent events of `/v1/chat/completions` (`data: {chunk}`
lines, blank-line separated, ending with `data: [DONE]`) into a `RoundState`, applying this
round's stop conditions as pieces arrive and feeding `on_text`. It does no HTTP error
handling of its own: it raises `MalformedChunk`, `ServerFailed` (an `{"error": ...}` event)
or `StreamCut` (no [DONE] and no finish_reason), which `engine/openai.py` turns into
one-line `EngineError`s.

The cut at `stop_at` and the length bound are `engine/round_text.py`'s, as for the local engine, so the pieces given to `on_text`
always join to the round's text. The bound: a server may ignore `max_tokens` (or count
differently), so a round is also cut, finish "length", after `max_new_tokens *
MAX_CHARS_PER_TOKEN` characters. No token of ChatGLM3's vocabulary is longer than 16
characters (its longest pieces are 16-character words and runs such as 16 `!`; it packs up to
16 spaces in one token), and other tokenizers' pieces are shorter, so a reply the server
counts as `max_new_tokens` tokens is never cut early, and a server that runs on forever is.
Incoming bytes are split into lines as they arrive, each byte looked at once or twice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from yanray.engine.base import FinishReason, GenerateOptions, TextCallback
from yanray.engine.round_text import RoundText

logger = logging.getLogger(__name__)

MAX_EVENT_BYTES = 1 << 20  # one SSE event; a chat chunk is well under a kilobyte
MAX_CHARS_PER_TOKEN = 16  # the longest token text in ChatGLM3's vocabulary (module docstring)
MAX_ERROR_CHARS = 200


@dataclass
class RoundState:
    """How one round went so far; it survives the reading task being cancelled."""

    finish: FinishReason = "stop"
    answered: bool = False  # the server sent response headers
    cut: bool = False  # a stop string, stop_at or the length bound ended the round here
    complete: bool = False  # the stream ended by itself: [DONE], or a finish_reason then EOF
    prompt_tokens: int = 0
    new_tokens: int = 0


class MalformedChunk(Exception):
    """A chunk that is not what an OpenAI-compatible server sends."""


class ServerFailed(Exception):
    """The server reported an error inside the stream."""


class StreamCut(Exception):
    """The stream ended with neither [DONE] nor a finish_reason."""


class ChunkReader:
    """Reads one answer into a `RoundState`, applying the stop conditions and feeding on_text."""

    def __init__(self, options: GenerateOptions, on_text: TextCallback | None) -> None:
        self.state = RoundState()
        self.options = options
        self.on_text = on_text
        self.round = RoundText(options, max_chars=options.max_new_tokens * MAX_CHARS_PER_TOKEN)

    async def events(self, resp: aiohttp.ClientResponse) -> None:
        """Parse server-sent events until [DONE], a stop, the cancel flag or the end."""
        buffer = bytearray()  # the unfinished line, then the block that may finish it
        data: list[bytes] = []
        size = 0  # bytes in `data`
        finish_seen = False
        async for block in resp.content.iter_any():
            buffer += block
            if b"\n" not in block:
                if len(buffer) > MAX_EVENT_BYTES:
                    raise MalformedChunk("an event larger than 1 MiB")
                continue
            *lines, rest = bytes(buffer).split(b"\n")
            buffer = bytearray(rest)
            for line in lines:
                line = line.rstrip(b"\r")
                if line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
                    size += len(data[-1])
                    if size > MAX_EVENT_BYTES:
                        raise MalformedChunk("an event larger than 1 MiB")
                elif not line and data:  # a blank line ends an event
                    payload, data, size = b"\n".join(data), [], 0
                    if payload == b"[DONE]":
                        return self._end()
                    finish_seen |= self.chunk(json.loads(payload))
                    if self.state.cut:
                        return None
                    if self.options.cancel.is_set():
                        return self.cancelled()
        if data and b"\n".join(data) == b"[DONE]":  # a last event without its blank line
            return self._end()
        if not finish_seen:
            raise StreamCut("the stream ended before [DONE] and without a finish_reason")
        return self._end()

    def chunk(self, chunk: Any) -> bool:
        """Take one parsed chunk; returns whether it carried a finish_reason."""
        if not isinstance(chunk, dict):
            raise MalformedChunk(f"a chunk that is not an object: {str(chunk)[:80]}")
        if "error" in chunk:  # vLLM and others report failures inside the stream
            raise ServerFailed(error_message(chunk))
        self._usage(chunk.get("usage"))
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise MalformedChunk("a chunk without a choices list")
        if not choices:
            return False  # e.g. the usage-only chunk
        choice = choices[0]
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            raise MalformedChunk("a chunk without a delta")
        content = delta.get("content")
        if content is not None and not isinstance(content, str):
            raise MalformedChunk("a delta whose content is not text")
        if content:
            self.piece(content)
        reason = choice.get("finish_reason")
        if reason is not None and not self.state.cut:
            self.state.finish = "length" if reason == "length" else "stop"
        return reason is not None

    def whole(self, payload: Any) -> None:
        """A non-streamed `chat.completion` body."""
        try:
            choice = payload["choices"][0]
            content = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise MalformedChunk("a completion without choices[0].message") from exc
        if not isinstance(content, str):
            raise MalformedChunk("a message whose content is not text")
        if content:
            self.piece(content)
        if not self.state.cut:
            self.state.finish = "length" if choice.get("finish_reason") == "length" else "stop"
        self._usage(payload.get("usage"))
        self._end()

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.state.prompt_tokens = _count(usage.get("prompt_tokens"))
            self.state.new_tokens = _count(usage.get("completion_tokens"))

    def piece(self, content: str) -> None:
        if self.round.add(content):
            self.state.cut = True
            self.state.finish = self.round.cut or "stop"
            if self.round.cut == "length":
                logger.warning(
                    "the model server sent more than %d characters for max_tokens=%d; the answer is cut",
                    self.round.max_chars,
                    self.options.max_new_tokens,
                )
        self._emit(self.round.ready())

    def cancelled(self) -> None:
        self._emit(self.round.ready(final=True))  # what was held back for a possible stop string
        self.state.finish = "cancelled"

    def _emit(self, piece: str) -> None:
        if piece and self.on_text is not None:
            self.on_text(piece)

    def _end(self) -> None:
        if not self.state.cut:
            self._emit(self.round.ready(final=True))
        self.state.complete = True


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def error_message(payload: Any) -> str:
    """The human part of an error body: OpenAI's {"error": {"message"}}, or the usual variants."""
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail") or error.get("msg") or ""
    text = " ".join(str(error).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
