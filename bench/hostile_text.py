"""Hostile text through each part that reads it: seconds per MB at two sizes, and their ratio.

A linear part takes the same time per MB at both sizes (ratio about 1); a quadratic one
takes `size ratio` times longer per MB at the larger size (4 here). The parts, each on the
text that used to be its worst case (issue 8):

- markdown_to_html: a mix of a heading with a long run of spaces and of U+00A0, `**a `
  repeated, a run of `[`, backtick runs;
- split_message: an unclosed code fence of short lines, split for Telegram (4096);
- tool-line scan: a round's text through `_StreamedRound` and the tool loop's `stop_at` in
  16-character pieces (a ChatGLM3 token packs up to 16 spaces), with a `/calculate` line
  holding a long run of spaces, the visible text pulled every 1,000 pieces;
- RoundText: the same text through the round text both engines use (the length cut, the
  trailing-space hold-back), in 16-character pieces;
- openai answer: the whole path (dispatcher, SQLite, queue, worker, tool loop, OpenAI
  backend over HTTP) for a reply streamed by the fake OpenAI server in 64-character chunks.
  Its smaller sizes (the default `YANRAY_MAX_NEW_TOKENS` bound is 16 characters a token) and
  the fake server's own JSON work make it the noisiest figure.

Run: `python bench/hostile_text.py [--mb 0.25] [--factor 4]` (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fakes, run from anywhere

from tests.fakes.openai_server import FakeOpenAI
from tests.recording import RecordingStream
from yanray.adapters.split import split_message
from yanray.adapters.telegram_format import markdown_to_html
from yanray.bot.app import Core
from yanray.bot.settings import Settings
from yanray.bot.toolloop import SlashCalls, _StreamedRound
from yanray.bot.types import Incoming
from yanray.engine.base import GenerateOptions
from yanray.engine.openai import OpenAIEngine
from yanray.engine.round_text import RoundText


def markdown(size: int) -> str:
    unit = "# a" + " " * 3000 + "b\n# c" + "\u00a0" * 3000 + "d\n" + "**a " * 500 + "\n" + "[" * 2000
    unit += "\n" + "``a`" * 500 + "\n"
    return (unit * (size // len(unit) + 1))[:size]


def fenced(size: int) -> str:
    return "```python\n" + "x = 1  # some code\n" * (size // 19)


def model_text(size: int) -> str:
    unit = "Some words of an answer.\n" * 20 + "/calculate 1" + " " * 2000 + "x\n" + "   " * 300 + "\n"
    return (unit * (size // len(unit) + 1))[:size]


def tool_scan(text: str) -> None:
    calls = SlashCalls(["calculate"])
    streamed, stop_at = _StreamedRound(calls), calls.stop_at()
    for index in range(0, len(text), 16):
        piece = text[index : index + 16]
        streamed.add(piece)
        stop_at(piece)
        if index % 16_000 == 0:
            streamed.visible()
    calls.strip(text)


def round_text(text: str) -> None:
    visible = RoundText(GenerateOptions(), strip_end=True)
    for index in range(0, len(text), 16):
        visible.add(text[index : index + 16])
        visible.ready()
    visible.ready(final=True)


async def openai_answer(size: int) -> float:
    rnd = random.Random(size)
    reply = "".join(rnd.choice(["word ", "  ", "\n", "**", "`"]) for _ in range(size // 3))[:size]
    async with FakeOpenAI(replies=[reply], chunk_size=64) as fake:
        with tempfile.TemporaryDirectory() as folder:
            settings = Settings(
                data_dir=Path(folder),
                rate_limit_per_minute=0,
                max_new_tokens=32768,
                max_context=200_000,
                request_timeout=600,
                engine="openai",
            )
            engine = OpenAIEngine(
                base_url=fake.base_url, model="m", api_key=None, timeout=60, max_context=200_000
            )
            core = await Core.open(settings, engine)
            await core.start()
            try:
                out = RecordingStream()
                started = time.perf_counter()
                await core.dispatcher.handle(
                    Incoming(platform="bench", chat_id="c", user_id="u", display_name="U", text="go"), out
                )
                await out.done.wait()
                seconds = time.perf_counter() - started
                assert out.answer == reply.strip(), f"the answer did not arrive whole: {out.answer[:300]!r}"
            finally:
                await core.aclose()
                await engine.aclose()
    return seconds


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    small = int(args.mb * 1_000_000)
    sizes = (small, small * args.factor)
    parts: list[tuple[str, Callable[[int], float]]] = [
        ("markdown_to_html", lambda n: timed(lambda: markdown_to_html(markdown(n)))),
        ("split_message", lambda n: timed(lambda: split_message(fenced(n), 4096))),
        ("tool-line scan", lambda n: timed(lambda: tool_scan(model_text(n)))),
        ("RoundText", lambda n: timed(lambda: round_text(model_text(n)))),
    ]
    print(
        f"{'part':18} {'MB':>6} {'s/MB':>7} {'MB':>6} {'s/MB':>7} {'ratio':>6}  (linear ~1, quadratic {args.factor})"
    )
    for name, run in parts:
        per_mb = [run(n) / (n / 1e6) for n in sizes]
        print(
            f"{name:18} {sizes[0] / 1e6:6.2f} {per_mb[0]:7.3f} {sizes[1] / 1e6:6.2f} {per_mb[1]:7.3f} "
            f"{per_mb[1] / per_mb[0]:6.2f}"
        )
    answer_sizes = (sizes[0] // 4, sizes[1] // 4)
    per_mb = [await openai_answer(n) / (n / 1e6) for n in answer_sizes]
    print(
        f"{'openai answer':18} {answer_sizes[0] / 1e6:6.2f} {per_mb[0]:7.3f} {answer_sizes[1] / 1e6:6.2f} "
        f"{per_mb[1]:7.3f} {per_mb[1] / per_mb[0]:6.2f}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Seconds per MB of hostile text, at two sizes.")
    parser.add_argument("--mb", type=float, default=0.25, help="the smaller size in MB (0.25)")
    parser.add_argument("--factor", type=int, default=4, help="the larger size is this many times more (4)")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
