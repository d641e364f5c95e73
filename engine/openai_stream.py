"""Reading one streamed chat completion from an OpenAI-compatible server.

`ChunkReader` turns the server-sent events of `/v1/chat/completions` (`data: {chunk}`
lines, blank-line separated, ending with `data: [DONE]`) into a `RoundState`, applying this
round's stop conditions as pieces arrive and feeding `on_text`. It does no HTTP error
handling of its own: it raises `MalformedChunk`, `ServerFailed` (an `{"error": ...}` event)
or `StreamCut` (no [DONE] and no finish_reason), which `engine/openai.py` turns into
one-line `EngineError`s.

Text that could be the start of a stop string is held back from `on_text` until it is
decided, so the pieces given to `on_text` always join to the round's `text`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from yanray.engine.base import FinishReason, GenerateOptions, TextCallback

MAX_EVENT_BYTES = 1 << 20  # one SSE event; a chat chunk is well under a kilobyte
MAX_ERROR_CHARS = 200


@dataclass
class RoundState:
    """What one round has produced so far; it survives the reading task being cancelled."""

    text: str = ""
    emitted: int = 0  # how much of `text` went to on_text
    finish: FinishReason = "stop"
    answered: bool = False  # the server sent response headers
    cut: bool = False  # a stop string or stop_at ended the round here
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
        self.stops = tuple(s for s in options.stop if s)

    async def events(self, resp: aiohttp.ClientResponse) -> None:
        """Parse server-sent events until [DONE], a stop, the cancel flag or the end."""
        buffer = b""
        data: list[bytes] = []
        finish_seen = False
        async for block in resp.content.iter_any():
            *lines, buffer = (buffer + block).split(b"\n")
            if len(buffer) > MAX_EVENT_BYTES:
                raise MalformedChunk("an event larger than 1 MiB")
            for line in lines:
                line = line.rstrip(b"\r")
                if line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
                elif not line and data:  # a blank line ends an event
                    payload, data = b"\n".join(data), []
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
        state = self.state
        start = len(state.text)
        state.text += content
        cut = find_stop(state.text, self.stops, start)
        if self.options.stop_at is not None:
            at = self.options.stop_at(state.text)
            if at is not None:
                at = max(0, min(at, len(state.text)))
                cut = at if cut is None else min(cut, at)
        if cut is not None:
            self._emit(cut)
            state.text, state.finish, state.cut = state.text[:cut], "stop", True
            return
        self._emit(len(state.text) - held_back(state.text, self.stops))

    def cancelled(self) -> None:
        self._emit(len(self.state.text))  # what was held back for a possible stop string
        self.state.finish = "cancelled"

    def _emit(self, upto: int) -> None:
        state = self.state
        if upto > state.emitted:
            piece, state.emitted = state.text[state.emitted : upto], upto
            if self.on_text is not None:
                self.on_text(piece)

    def _end(self) -> None:
        if not self.state.cut:
            self._emit(len(self.state.text))
        self.state.complete = True


def find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Where the first stop string begins, looking only where the new piece could complete one."""
    hits = [i for s in stops if (i := text.find(s, max(0, start - len(s) + 1))) != -1]
    return min(hits) if hits else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    return max(
        (k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
        default=0,
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def error_message(payload: Any) -> str:
    """The human part of an error body: OpenAI's {"error": {"message"}}, or the usual variants."""
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail") or error.get("msg") or ""
    text = " ".join(str(error).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
