"""A `ReplyStream` that records what a user would see, for core tests."""

from __future__ import annotations

import asyncio
from typing import Any

from yanray.bot.errors import DeliveryRefused


class RecordingStream:
    def __init__(self, name: str = "") -> None:
        self.name = name
        self.events: list[tuple[str, Any]] = []
        self.done = asyncio.Event()
        #: image() raises DeliveryRefused, as a platform that refuses the upload
        self.refuse_images = False

    async def send(self, text: str) -> None:
        self.events.append(("send", text))
        self.done.set()

    async def notice(self, text: str) -> None:
        self.events.append(("notice", text))

    async def started(self) -> None:
        self.events.append(("started", None))

    async def progress(self, text: str) -> None:
        self.events.append(("progress", text))

    async def finish(self, text: str) -> None:
        self.events.append(("finish", text))
        self.done.set()

    async def fail(self, text: str) -> None:
        self.events.append(("fail", text))
        self.done.set()

    async def image(self, image: Any) -> None:
        if self.refuse_images:
            raise DeliveryRefused("test: the platform did not take the image")
        self.events.append(("image", image))

    def watch(self, record: Any) -> None:
        self.record = record

    def of(self, kind: str) -> list[Any]:
        return [value for k, value in self.events if k == kind]

    @property
    def answer(self) -> str | None:
        """The final text: a finish, a fail or a one-off send."""
        for kind, value in reversed(self.events):
            if kind in ("finish", "fail", "send"):
                return value
        return None

    async def wait(self, timeout: float = 10.0) -> str | None:
        await asyncio.wait_for(self.done.wait(), timeout)
        return self.answer


class RecordingAdapter:
    """An adapter whose reopened streams are recorded (restart tests)."""

    def __init__(self, platform: str = "test") -> None:
        self.platform = platform
        self.reopened: list[tuple[dict[str, Any], RecordingStream]] = []

    def reopen(self, route: Any) -> RecordingStream:
        stream = RecordingStream(f"reopened {route}")
        self.reopened.append((dict(route), stream))
        return stream

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
