"""What a platform gives the reply streamer (a `Sink`, and the faults a sink may report),
and what the streams of one adapter share (`StreamerContext`, `Throttle`, `Shown`).

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
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from yanray.bot.errors import YanrayError
from yanray.bot.types import Image

if TYPE_CHECKING:
    from yanray.adapters.streamer import ReplyStreamer

Handle = int | str  # a sent message, as the sink names it (stored as JSON for restarts)


class SinkError(YanrayError):
    """A platform call failed; the kind says what the streamer does about it."""

    #: the `kind` label of yanray_platform_errors_total
    kind = "error"


class Flood(SinkError):
    """The platform asks to slow down (Telegram's 429 `retry_after`): wait, then try again."""

    kind = "rate_limited"

    def __init__(self, seconds: float, why: str) -> None:
        super().__init__(why)
        self.seconds = seconds


class Transient(SinkError):
    """A network fault, a time-out or a 5xx answer: retried with growing pauses."""

    kind = "transient"


class Blocked(SinkError):
    """403: the chat refuses the bot (blocked, kicked, no permission) or is gone: go quiet."""

    kind = "blocked"


class MessageGone(SinkError):
    """The message to edit or delete no longer exists (someone deleted it)."""

    kind = "gone"


class Rejected(SinkError):
    """The platform refuses this write for good (a 400 that no retry can fix)."""

    kind = "rejected"


class Moved(SinkError):
    """The sink now writes elsewhere (a slash command's token expired, so the channel takes
    over): the messages sent so far cannot be edited any more, so everything is sent anew."""

    kind = "moved"


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

    async def photo(self, image: Image) -> Handle:
        """Post `image` (a PNG) as a message of its own, with its caption as plain text."""
        ...

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


def digest(part: str) -> str:
    """What a message shows, in short: enough to tell after a restart whether it is current."""
    return hashlib.blake2b(part.encode("utf-8", "replace"), digest_size=8).hexdigest()


@dataclass
class Shown:
    """The messages showing one answer; shared with the stream that takes it over."""

    messages: list[Handle] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    #: held for every write, so writes (also those of a successor) never overlap
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    looked_back: bool = False

    @classmethod
    def parse(cls, value: Any) -> Shown:
        """What `watch` reported in an earlier run; anything malformed is skipped."""
        shown = cls()
        for item in value if isinstance(value, list) else ():
            if (
                isinstance(item, list | tuple)
                and len(item) == 2
                and isinstance(item[0], int | str)
                and isinstance(item[1], str)
            ):
                shown.messages.append(item[0])
                shown.digests.append(item[1])
        return shown

    def as_json(self) -> list[list[Any]]:
        return [[handle, d] for handle, d in zip(self.messages, self.digests, strict=True)]

    def truncate(self, count: int) -> None:
        del self.messages[count:], self.digests[count:]


@dataclass
class StreamerContext:
    """What every stream of one adapter shares."""

    edit_interval: float
    preview_interval: float = 1.0
    #: pauses between tries of a call that failed transiently (their number is the retries)
    retry_delays: Sequence[float] = (0.5, 1.0, 2.0, 4.0)
    throttle: Throttle = field(default_factory=Throttle)
    #: chats not written to (Telegram: those that blocked the bot, kept by the adapter)
    blocked: set[Hashable] = field(default_factory=set)
    #: told once per stream that a chat answered 403 (key, the platform's words)
    on_blocked: Callable[[Hashable, str], None] | None = None
    #: the user's message -> the stream answering it in this run, for edits of that message
    answers: OrderedDict[Hashable, ReplyStreamer] = field(default_factory=OrderedDict)
    max_answers: int = 4096
    live: set[ReplyStreamer] = field(default_factory=set)
    #: small tasks (reports) that must not be garbage-collected while they run
    background: set[asyncio.Future[None]] = field(default_factory=set)
    #: False once the adapter stopped: previews stop, final texts raise (the core keeps them)
    running: bool = False
    #: told the kind (`SinkError.kind`) of every platform call that failed, for the metrics
    on_fault: Callable[[str], None] | None = None

    def fault(self, exc: SinkError) -> None:
        if self.on_fault is not None:
            self.on_fault(exc.kind)

    def remember(self, key: Hashable, stream: ReplyStreamer) -> None:
        self.answers[key] = stream
        self.answers.move_to_end(key)
        while len(self.answers) > self.max_answers:
            self.answers.popitem(last=False)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def settled(self) -> bool:
        """No stream is showing an answer and nothing is on its way to storage."""
        return not self.live and not self.background

    async def stop(self) -> None:
        """The adapter stops: streams stop writing (final texts raise), reports are awaited."""
        self.running = False
        for stream in list(self.live):
            stream.abort()
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)
