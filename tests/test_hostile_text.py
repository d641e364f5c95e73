"""Hostile text through every part that reads it: bounded time, and still the right output.

Anything a person or the model writes may be built to be slow: long runs of spaces (also
U+00A0 and tabs), unclosed code fences, nested emphasis, thousands of `[` or backticks,
100 KB lines. Each part that reads such text on the event loop (the Telegram formatter, the
splitter, the tool-line scanner, the round text both engines use, and the whole console
path) must take linear time: 100 KB well under a second. The bounds below are generous for a
loaded 2-core machine, and far below what the quadratic versions took (the heading pattern
alone: 41 s at 3,200 spaces; a 100 KB run of `[`: minutes).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.telegram_server import visible_text
from tests.test_cli import env, yanray
from yanray.adapters.split import join_parts, split_message
from yanray.adapters.telegram_format import markdown_to_html
from yanray.bot.toolloop import SlashCalls, _StreamedRound
from yanray.engine.base import GenerateOptions
from yanray.engine.round_text import RoundText

BOUND_S = 1.5  # for one 100 KB input through one part; ~0.1 s here
SIZE = 100_000
ATOMS = [
    " ", "\u00a0", "\t", "\n", "\n\n", "\r\n", "```", "```py\n", "`", "``", "*", "**", "***",
    "_", "__", "~~", "[", "]", "(", ")", "[a](https://b.c)", "#", "# ", "> ", "- ", "word",
    "<", "&", "😀", "中文。", "/calculate ", "/calculate 1+1\n", "<|user|>", "\\",
]  # fmt: skip


def hostile_texts(count: int = 24, seed: int = 8) -> list[str]:
    """The reproductions of issue 8 at 100 KB, then random mixtures of long runs of atoms."""
    fixed = [
        "# a" + " " * SIZE + "b",
        "# a" + "\u00a0" * SIZE + "b",
        "`" * (SIZE // 2) + "a" * (SIZE // 2),
        "[" * SIZE,
        "**a " * (SIZE // 4),
        "__a " * (SIZE // 4),
        "~~a " * (SIZE // 4),
        "```python\n" + "x = 1  # code\n" * (SIZE // 14),  # an unclosed fence
        "Sure.\n/calculate 1" + " " * SIZE + "x\n",
        "\t \u00a0" * (SIZE // 3),
        "*_~`[" * (SIZE // 5),
        "x" * SIZE,  # one 100 KB line
    ]
    rnd = random.Random(seed)
    mixed = []
    for _ in range(count):
        parts: list[str] = []
        while sum(map(len, parts)) < SIZE:
            atom = rnd.choice(ATOMS)
            parts.append(atom * rnd.choice((1, 2, 7, 100, 5000)) if rnd.random() < 0.3 else atom)
        mixed.append("".join(parts)[:SIZE])
    return fixed + mixed


def timed(work: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def pieces(text: str, rnd: random.Random) -> list[str]:
    """`text` cut as a model streams it: mostly small pieces, some large ones."""
    out, start = [], 0
    while start < len(text):
        size = rnd.choice((1, 3, 16, 16, 200, 5000))
        out.append(text[start : start + size])
        start += size
    return out


@pytest.mark.parametrize("space", [" ", "\u00a0"])
def test_a_heading_with_a_long_run_of_spaces_is_fast(space: str) -> None:
    # issue 8: 41 s at 3,200 spaces, and every chat waited
    text = "# a" + space * 3200 + "b"
    html, seconds = timed(lambda: markdown_to_html(text))
    assert html == f"<b>a{space * 3200}b</b>"
    assert seconds < 0.2


def test_every_hostile_text_is_formatted_split_and_scanned_in_linear_time() -> None:
    calls = SlashCalls(["calculate"])
    rnd = random.Random(1)
    for text in hostile_texts():
        html, seconds = timed(lambda text=text: markdown_to_html(text))
        assert seconds < BOUND_S, f"markdown_to_html took {seconds:.2f} s on {text[:40]!r}"
        shown = visible_text(html, "HTML")  # Telegram would accept it
        assert len(shown) <= len(text)

        parts, seconds = timed(lambda text=text: split_message(text, 4096))
        assert seconds < BOUND_S, f"split_message took {seconds:.2f} s on {text[:40]!r}"
        assert all(len(part) <= 4096 for part in parts) and join_parts(parts) == text

        (stripped, streamed, cut), seconds = timed(lambda text=text: scan(calls, text, rnd))
        assert seconds < BOUND_S, f"the tool-line scan took {seconds:.2f} s on {text[:40]!r}"
        lines = text.split("\n")
        assert stripped == "".join(line + "\n" for line in lines[:-1] if calls.parse(line) is None) + (
            lines[-1] if calls.parse(lines[-1]) is None else ""
        )
        assert streamed == calls.strip(text + "\n")
        first_call = next((i for i, line in enumerate(lines[:-1]) if calls.parse(line)), None)
        assert cut == (None if first_call is None else sum(len(line) + 1 for line in lines[: first_call + 1]))


def scan(calls: SlashCalls, text: str, rnd: random.Random) -> tuple[str, str, int | None]:
    """What the tool loop does with a round's text: strip the calls, stream it (pulling the
    visible text now and then, as the worker does), and look for the first call's end."""
    stripped = calls.strip(text)
    streamed = _StreamedRound(calls)
    stop_at = calls.stop_at()
    cut = None
    for index, piece in enumerate([*pieces(text, rnd), "\n"]):
        streamed.add(piece)
        if index % 500 == 0:
            streamed.visible()
        if cut is None:
            cut = stop_at(piece)
    calls.last_call(text)
    return stripped, streamed.visible(), cut


@pytest.mark.parametrize("strip_end", [False, True])
def test_round_text_is_linear_and_exact_on_hostile_text(strip_end: bool) -> None:
    rnd = random.Random(2)
    for text in hostile_texts(count=8):
        round_text = RoundText(GenerateOptions(), strip_end=strip_end, max_chars=SIZE - 10)

        def feed(text: str = text, round_text: RoundText = round_text) -> list[str]:
            out = []
            for piece in pieces(text, rnd):
                round_text.add(piece)
                out.append(round_text.ready())
            out.append(round_text.ready(final=True))
            return out

        handed_out, seconds = timed(feed)
        assert seconds < BOUND_S, f"RoundText took {seconds:.2f} s on {text[:40]!r}"
        expected = text[: SIZE - 10]
        if strip_end and len(text) <= SIZE - 10:
            expected = expected.rstrip()
        assert round_text.text == expected == "".join(handed_out)


async def test_the_console_path_answers_hostile_text_quickly(tmp_path: Path) -> None:
    """`yanray chat` through a pipe with the OpenAI fake: a 100 KB question full of traps,
    a tool call with 60,000 spaces, and a 100 KB hostile answer, all delivered whole."""
    answer = "# a" + " " * 30_000 + "b\n" + "**a " * 5000 + "\n```\n" + "[`" * 20_000 + " end."
    replies = ["Sure.\n/calculate 1" + " " * 60_000 + "x\n", answer]
    question = ("# q" + "\u00a0" * 30_000 + "*_`[" * 10_000)[:90_000]
    async with FakeOpenAI(replies=replies, chunk_size=64) as fake:
        environ = env(
            tmp_path,
            YANRAY_ENGINE="openai",
            YANRAY_OPENAI_BASE_URL=fake.base_url,
            YANRAY_MAX_NEW_TOKENS="8192",
            YANRAY_MAX_CONTEXT="262144",  # the question alone is ~45K estimated tokens
        )
        started = time.perf_counter()
        code, out, err = await yanray(["chat"], environ, question + "\n", cwd=tmp_path)
        seconds = time.perf_counter() - started
    assert code == 0, err[-2000:]
    assert out == "Sure.\n" + answer + "\n\n"
    observation = fake.requests[1]["messages"][-1]["content"]
    assert observation.startswith("Tools: Error: the calculate argument is 60,002 characters long")
    assert fake.requests[0]["messages"][-1]["content"] == question
    assert seconds < 30  # start-up included (~5 s here); a quadratic path took minutes
