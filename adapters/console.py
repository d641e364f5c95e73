"""The terminal adapter behind `yanray chat`: one user, platform `console`.

In a terminal it prompts, and streams each reply as it is generated. When standard
input is not a terminal it reads one message per line, prints each complete reply
followed by a blank line, and exits at end of input; lines are answered in order, each
before the next is read. Only the conversation goes to standard output; logs go to
standard error.

A picture a tool draws (the plot) is saved under the data folder, in `images/`, and its
path printed where it comes in the answer, as `[caption: /path/to/file.png]`.

Input is untrusted like any other: bytes that are not UTF-8 are read as U+FFFD (the line
is answered, and the rest of the input is not dropped), and a line is read at most
`MAX_LINE_CHARS` at a time, so an endless line is refused as too long without ever being
held whole in memory.

A terminal has no reactions: `/good` and `/bad` rate the last answer (the dispatcher's
commands, `bot/people.py`).

Yanray's own texts follow the terminal's language (`LANGUAGE`, `LC_ALL`, `LC_MESSAGES`,
`LANG`, the first one set, as gettext reads them), unless `YANRAY_LANGUAGE` or `/lang` says
otherwise.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from yanray.bot.dispatcher import MAX_MESSAGE_CHARS, Dispatcher
from yanray.bot.errors import DeliveryRefused
from yanray.bot.i18n import environment_hint
from yanray.bot.types import Image, Incoming, ReplyStream, Route

logger = logging.getLogger(__name__)

PROMPT = "you> "
#: one more than a message may have, so that an overlong line is seen to be overlong
MAX_LINE_CHARS = MAX_MESSAGE_CHARS + 1


class ConsoleStream:
    """Prints one answer; `done` is set once it is complete. An image is saved as a file in
    `images` and its path printed where it comes in the answer: `[caption: path]`."""

    def __init__(self, output: TextIO, *, streaming: bool, images: Path | None = None) -> None:
        self.output = output
        self.streaming = streaming
        self.images = images
        self.done = asyncio.Event()
        self._printed = ""
        self._latest = ""

    def _write(self, text: str) -> None:
        self.output.write(text)
        self.output.flush()

    async def send(self, text: str) -> None:
        self._write(text + "\n\n")
        self.done.set()

    async def notice(self, text: str) -> None:
        if self.streaming:
            self._write(f"{text}\n")

    async def started(self) -> None:
        pass

    async def progress(self, text: str) -> None:
        self._latest = text
        if self.streaming:
            self._catch_up()

    def _catch_up(self) -> None:
        if self._latest.startswith(self._printed):
            self._write(self._latest[len(self._printed) :])
            self._printed = self._latest

    async def image(self, image: Image) -> None:
        if self.images is None:
            raise DeliveryRefused("the terminal has no folder for images")
        try:
            path = await asyncio.to_thread(_save, self.images, image)
        except OSError as exc:
            logger.warning("could not save an image in %s: %s", self.images, exc)
            raise DeliveryRefused(f"could not save the image ({exc.strerror or exc})") from exc
        self._catch_up()  # the reply so far first, also when replies print whole
        lead = "\n" if self._printed and not self._printed.endswith("\n") else ""
        self._write(f"{lead}[{image.caption or image.name}: {path}]\n")

    async def finish(self, text: str) -> None:
        shown = self._printed.strip()  # the final text is stripped; what streamed may not be
        if shown and text.startswith(shown):
            self._write(text[len(shown) :] + "\n\n")
        else:
            self._write(("\n" if self._printed else "") + text + "\n\n")
        self.done.set()

    async def fail(self, text: str) -> None:
        self._write(("\n" if self._printed else "") + f"[{text}]\n\n")
        self.done.set()

    def watch(self, record: Callable[[Any], Awaitable[None]]) -> None:
        """A terminal cannot edit what it printed; a restarted `yanray chat` prints anew."""


def _save(folder: Path, image: Image) -> Path:
    """Write `image` to a new file in `folder` (made if missing); returns its absolute path."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}-{Path(image.name).name}"
    path = (folder / name).resolve()
    with open(path, "xb") as file:
        file.write(image.data)
    return path


class ConsoleAdapter:
    platform = "console"

    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        user: str = "local",
        language: str | None = None,
        images: Path | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        #: where pictures (a tool's plot) are saved; their path is printed in the answer
        self.images = images
        #: the terminal's language tag (`language` or the environment's)
        self.language = language or environment_hint(os.environ)
        self.stdin = stdin or sys.stdin
        if isinstance(self.stdin, io.TextIOWrapper):
            self.stdin.reconfigure(errors="replace")  # bad UTF-8 is read as U+FFFD, not a crash
        self.stdout = stdout or sys.stdout
        if isinstance(self.stdout, io.TextIOWrapper):
            self.stdout.reconfigure(errors="replace")  # a lone surrogate from a server, say
        self.user = user
        self.interactive = self.stdin.isatty() and self.stdout.isatty()
        self._count = 0
        # message ids unique across runs: the core ignores a message id it already stored
        self._run = f"{time.time_ns():x}"

    def reopen(self, route: Route) -> ReplyStream:
        return ConsoleStream(self.stdout, streaming=self.interactive, images=self.images)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def _read_line(self) -> str | None:
        if self.interactive:
            self.stdout.write(PROMPT)
            self.stdout.flush()
        line = await asyncio.to_thread(self.stdin.readline, MAX_LINE_CHARS)
        if len(line) >= MAX_LINE_CHARS and not line.endswith("\n"):
            # an overlong line: its first part is refused as too long, the rest is skipped
            await asyncio.to_thread(self._skip_rest_of_line)
        return line if line else None

    def _skip_rest_of_line(self) -> None:
        while (chunk := self.stdin.readline(1 << 16)) and not chunk.endswith("\n"):
            pass

    async def converse(self) -> None:
        """Answer lines until end of input (Ctrl-D)."""
        while (line := await self._read_line()) is not None:
            text = line.rstrip("\n")
            if not text.strip():
                continue
            self._count += 1
            stream = ConsoleStream(self.stdout, streaming=self.interactive, images=self.images)
            incoming = Incoming(
                platform=self.platform,
                chat_id=self.user,
                user_id=self.user,
                display_name=self.user,
                text=text,
                message_id=f"{self._run}-{self._count}",
                route=self._route(),
                language=self.language,
            )
            await self.dispatcher.handle(incoming, stream)
            if stream.done.is_set() or not self.dispatcher.is_pending(stream):
                continue
            await stream.done.wait()

    def _route(self) -> dict[str, Any]:
        return {"user": self.user}
