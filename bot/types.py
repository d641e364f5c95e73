"""The platform-neutral values and contracts between adapters and the core.

An adapter turns a platform event into one `Incoming` and hands it to the dispatcher
together with a `ReplyStream`: the adapter's way of answering that one message. The
dispatcher answers commands through it at once; for a question it stores the request,
enqueues it, and the engine worker later streams the answer through the same stream.

`route` is what the adapter needs to answer again later, after a restart (for example
the chat id and the message id to reply to). It is stored with the request as JSON, and
`Adapter.reopen(route)` turns it back into a `ReplyStream` for a recovered request, with
what the stream last reported showing (`ReplyStream.watch`) under `route["shown"]`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Route = Mapping[str, Any]  # JSON-serialisable


@dataclass(frozen=True)
class Image:
    """A picture for the user (a tool's plot): a PNG, its file name, and a short plain-text
    caption (no Markdown: each platform shows it as it is)."""

    data: bytes
    name: str  # e.g. "plot.png"
    caption: str = ""


@dataclass(frozen=True)
class Incoming:
    """One message for Yanray, whatever platform it came from. Its strings can be encoded
    (an adapter repairs lone surrogates from a platform's JSON at its boundary)."""

    platform: str  # "telegram", "discord", "console"
    chat_id: str
    user_id: str
    display_name: str
    text: str
    message_id: str | None = None
    is_private: bool = True
    #: the whole chat shares one conversation (group "shared" mode) instead of one per user
    shared: bool = False
    #: adapter data needed to answer this message again after a restart
    route: Route = field(default_factory=dict)
    #: the platform's role ids of the sender (Discord allowlists); empty elsewhere
    roles: tuple[str, ...] = ()
    #: the sender moderates this chat (a Telegram group's administrator, a Discord member with
    #: Manage Messages there); in a shared conversation only they (and YANRAY_ADMINS) may
    #: /reset it, change its /system instructions or /stop someone else's answer
    moderator: bool = False
    #: the platform's language hint for the sender (Telegram's `language_code`, Discord's
    #: locale, the terminal's `LANG`); `bot/i18n.py` turns it into "en" or "zh"
    language: str | None = None

    @property
    def conversation_user(self) -> str:
        """The user part of the conversation key: "" when the chat shares one conversation."""
        return "" if self.shared else self.user_id


@runtime_checkable
class ReplyStream(Protocol):
    """How the core answers one incoming message. The adapter owns throttling and splitting.

    The core calls, for a command: `send` once. For a question: optionally `notice`
    (repeatedly, as the queue position changes), `started`, `progress` any number of times
    with the whole reply so far (and `image` between them when a tool drew one), and finally
    exactly one of `finish` (the complete reply) or `fail` (one line saying what went wrong
    and what to do). The core words every text;
    a stream only shows it (one that can edit turns the notice into the answer, and keeps a
    partial answer above a failure's reason). The core never passes an empty text.
    A final text the platform refuses for good raises `bot.errors.DeliveryRefused` (the
    core then `send`s its apology); one that arrives after the adapter stopped raises
    `AdapterStopped` (the core keeps it for the next start).
    """

    async def send(self, text: str) -> None:
        """A complete one-off answer (command output, refusal, busy notice)."""
        ...

    async def notice(self, text: str) -> None:
        """The request waits; `text` says so (the queue position), worded by the core."""
        ...

    async def started(self) -> None:
        """Generation starts (show "typing")."""
        ...

    async def progress(self, text: str) -> None:
        """The reply so far (the whole text, not a delta). Called often; must be cheap."""
        ...

    async def finish(self, text: str) -> None:
        """The complete reply. Every character must reach the user, split as needed."""
        ...

    async def fail(self, text: str) -> None:
        """The request failed; `text` is one line for the user."""
        ...

    async def image(self, image: Image) -> None:
        """Show a picture now, while the answer is written (a tool round produced it): the
        reply so far stays above it and the reply continues below it. Returns once it is
        shown; a picture the platform refuses or cannot take raises
        `bot.errors.DeliveryRefused` (the core tells the user and the model in one line)."""
        ...

    def watch(self, record: Callable[[Any], Awaitable[None]]) -> None:
        """The core asks to be told what this stream shows, for a question it stored.

        The stream awaits `record(value)` whenever the messages showing the answer change
        (a notice or a partial answer posted, a part edited); `value` is JSON only the
        adapter reads. It is stored with the request, and after a restart `reopen(route)`
        finds it under `route["shown"]`, so the notice or partial answer already on the
        screen becomes the answer instead of a new message beside it. When the user edits
        the question, `Dispatcher.handle_edit` hands it to the adapter's stream factory, so
        the new answer replaces the old one on the screen, restarts included. A stream whose
        platform cannot edit (the terminal) ignores it."""
        ...


@runtime_checkable
class Adapter(Protocol):
    """A platform front end, started and stopped by the entry point."""

    platform: str

    def reopen(self, route: Route) -> ReplyStream:
        """A stream that answers a stored request (after a restart) at `route`."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
