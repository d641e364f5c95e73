"""What a platform gives the reply streamer: a `Sink`, and the faults a sink may report.

A sink is one place an answer appears (a Telegram chat, a Discord channel, a slash
command's response) and does one platform call per method. It knows its platform's
length limit and formatting, and it turns its platform's errors into the few kinds below,
so that `adapters/streamer.py` decides, once for every platform, what to retry, what to
wait out and when to go quiet. A sink never retries by itself and never writes a text of
its own: every word comes from the core through the streamer.

`Throttle` spaces the writes in one chat: Telegram and Discord both limit how often a bot
may write to one chat, and several answers in a group share that budget.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable
from typing import Protocol

from yanray.bot.errors import YanrayError

Handle = int | str  # a sent message, as the sink names it (stored as JSON for restarts)


class SinkError(YanrayError):
    """A platform call failed; the kind says what the streamer does about it."""


class Flood(SinkError):
    """The platform asks to slow down (Telegram's 429 `retry_after`): wait, then try again."""

    def __init__(self, seconds: float, why: str) -> None:
        super().__init__(why)
        self.seconds = seconds


class Transient(SinkError):
    """A network fault, a time-out or a 5xx answer: retried with growing pauses."""


class Blocked(SinkError):
    """403: the chat refuses the bot (blocked, kicked, no permission) or is gone: go quiet."""


class MessageGone(SinkError):
    """The message to edit or delete no longer exists (someone deleted it)."""


class Rejected(SinkError):
    """The platform refuses this write for good (a 400 that no retry can fix)."""


class Moved(SinkError):
    """The sink now writes elsewhere (a slash command's token expired, so the channel takes
    over): the messages sent so far cannot be edited any more, so everything is sent anew."""


class Sink(Protocol):
    """Where the parts of one answer go."""

    @property
    def key(self) -> Hashable:
        """The chat: its writes share one `Throttle` line, a 403 is noted per key."""
        ...

    #: a one-person chat: previews are paced per answer (`preview_interval`) and the final
    #: text goes out at once; otherwise every write takes the chat's next slot
    private: bool
    #: previews can be drafts (Telegram's sendMessageDraft) until a message shows the answer
    drafts: bool
    #: seconds between "typing" actions (the platform shows one for a few seconds)
    typing_every: float

    def limit(self, text: str) -> int:
        """The most characters one part of `text` may have."""
        ...

    async def send(self, text: str, *, first: bool) -> Handle:
        """Post a new message showing `text` (Markdown); `first`: the answer's first part."""
        ...

    async def edit(self, handle: Handle, text: str) -> None:
        """Make message `handle` show `text`; an edit to what it already shows succeeds."""
        ...

    async def delete(self, handle: Handle) -> None: ...

    async def draft(self, text: str) -> None:
        """Show `text` as a draft of the coming message (only where `drafts` is true)."""
        ...

    async def typing(self) -> None: ...

    async def earlier(self) -> list[tuple[Handle, str]]:
        """The messages (handle, text) of an earlier answer to the same question that the
        platform itself can find (Discord's channel history after a restart), else []."""
        ...


class Throttle:
    """Per-chat spacing of writes: a write takes the chat's turn, which comes at least
    `interval` after the previous write there ended (several answers in a group share it)."""

    def __init__(self) -> None:
        self._turns: dict[Hashable, asyncio.Lock] = {}
        self._ended: dict[Hashable, float] = {}

    @contextlib.asynccontextmanager
    async def slot(self, key: Hashable, interval: float) -> AsyncIterator[None]:
        if interval <= 0:
            yield
            return
        loop = asyncio.get_running_loop()
        if len(self._turns) > 10_000:  # forget chats that have been quiet for a while
            now = loop.time()
            for old in [k for k, t in self._ended.items() if t + interval < now]:
                if not self._turns[old].locked():
                    del self._turns[old], self._ended[old]
        lock = self._turns.setdefault(key, asyncio.Lock())
        async with lock:
            wait = self._ended.get(key, float("-inf")) + interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                yield
            finally:
                self._ended[key] = loop.time()
