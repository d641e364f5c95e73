"""Yanray's own overhead around the engine: end-to-end time divided by engine time.

Requests go through the real path: `Core.open` on a SQLite file in a temporary folder,
`Dispatcher.handle` with an `Incoming`, storage (the user turn and the request committed
before enqueueing), the fair queue, the engine worker, the tool loop (with the
calculator enabled, so its stop check runs on every piece) and delivery through a
`ReplyStream`. Only the engine is replaced: `TimedEngine` implements the Engine protocol
and takes a fixed time per reply, streaming it in a few pieces with `asyncio.sleep`.

What is measured (printed as the median of `--repeats` runs, each on a fresh core):
- ratio = wall time (the first `handle()` call to the last `finish()`) / the sum of the
  engine's own time. The engine's time is measured inside it, around its sleeps only, so
  everything else (callbacks, `stop_at`, storage, queue, delivery) counts as Yanray's.
  Target: at most 1.05.
- per-request overhead: the engine is one server, so each request owns the stretch from
  the later of its arrival and the previous finish up to its own finish; its overhead is
  that stretch minus its engine time. One after another this is the user's latency
  minus the engine time; at once the stretches tile the wall time, so they add up to
  wall - engine. Median and p99 are over every request of every repeat.
- cpu: this process's CPU time per request (all threads; the engine's sleeps use none,
  so it is all Yanray's; the calculator's own process is not included). It moves less
  with the machine's load than the wall-time figures do.

Choices: the main engine time is 1.0 s per reply, streamed in 40 pieces (40 tokens/s),
the shortest real local ChatGLM3 answer: a typical one is hundreds of tokens at 20-40
tokens/s, several seconds. The second, shorter time (0.2 s) is a stress figure that
makes the overhead look five to thirty times larger than in real use; the absolute
per-request overhead in ms is the figure that does not depend on the choice. Each run answers one
warm-up request first (SQLAlchemy's statement cache, the calculator's worker process: a
long-running bot is warm). "At once" is every user's `handle()` started together in one
`gather`; 100 conversations are 100 users, every twentieth sending a second message.
The tool variant, run at the main engine time only (to keep the run short), writes a
`/calculate` line in its first round and answers with the observation in the second,
each round half the reply time; the calculator runs in its real worker process, and
that time counts as Yanray's. The rate limit is off and the
queue sized to fit; every request is checked to be answered, once, by the engine.

Run: `python bench/pipeline.py [--engine-time 1.0] [--short-time 0.2] [--repeats 3]
[--conversations 100] [--requests 10] [--pieces 40]` (about seven minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yanray.bot.app import Core
from yanray.bot.settings import Settings
from yanray.bot.types import Incoming
from yanray.engine.base import ChatMessage, FinishReason, GenerateOptions, Generation, TextCallback, ToolSpec
from yanray.storage import crud

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: its tests' engine
from tests.scripted_engine import ScriptedEngine

TARGET = 1.05
FILLER = " Fine."
CALL = "\n/calculate 6.5*7.5\n"


class TimedEngine(ScriptedEngine):
    """An Engine that spends `round_time` per round, streamed in `pieces` sleeps (the test
    suite's scripted engine, for the protocol's plumbing: `count` and `fit` on a thread)."""

    name = "bench"

    def __init__(self, *, round_time: float, pieces: int, tool_call: bool) -> None:
        super().__init__(max_context=8192)
        self.round_time = round_time
        self.pieces = pieces
        self.tool_call = tool_call
        #: the engine's own seconds, by question tag (the first word of the user's message)
        self.spent: defaultdict[str, float] = defaultdict(float)

    def count_tokens(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> int:
        return 2 + sum(4 + len(m.content) // 4 for m in messages)

    async def start(  # type: ignore[override]
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()
    ) -> TimedSession:
        return TimedSession(self, messages)


class TimedSession:
    def __init__(self, engine: TimedEngine, messages: Sequence[ChatMessage]) -> None:
        self.engine = engine
        self.messages = list(messages)

    async def generate(self, options: GenerateOptions, on_text: TextCallback | None = None) -> Generation:
        engine = self.engine
        question = next(m.content for m in reversed(self.messages) if m.role == "user")
        tag = question.split()[0]
        observed = self.messages[-1].role == "observation"
        # about one piece per filler word: the reply grows with --pieces, as with tokens
        if engine.tool_call and not observed:
            reply = "Let me work that out." + FILLER * engine.pieces + CALL
        elif observed:
            reply = f"It is {self.messages[-1].content}. That answers {tag}." + FILLER * engine.pieces
        else:
            reply = f"Here is the answer to {tag}." + FILLER * engine.pieces
        size = -(-len(reply) // engine.pieces)
        text = ""
        finish: FinishReason = "stop"
        for start in range(0, len(reply), size):
            if options.cancel.is_set():
                finish = "cancelled"
                break
            slept = time.perf_counter()
            await asyncio.sleep(engine.round_time / engine.pieces)
            engine.spent[tag] += time.perf_counter() - slept
            piece = reply[start : start + size]
            text += piece
            if on_text is not None:
                on_text(piece)
            if options.stop_at is not None and (cut := options.stop_at(piece)) is not None:
                text = text[:cut]
                break
        self.messages.append(ChatMessage("assistant", text))
        return Generation(text=text, finish=finish)

    async def append(self, message: ChatMessage) -> None:
        self.messages.append(message)

    async def close(self) -> None:
        pass


class TimedStream:
    """A cheap ReplyStream that notes when the request was handed in and when it finished."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.accepted_at = 0.0
        self.finished_at = 0.0
        self.answer: str | None = None
        self.problem: str | None = None
        self.progress_calls = 0
        self.done = asyncio.Event()

    async def send(self, text: str) -> None:
        self.problem = f"send: {text}"
        self.done.set()

    async def notice(self, text: str) -> None:
        pass

    async def started(self) -> None:
        pass

    async def progress(self, text: str) -> None:
        self.progress_calls += 1

    async def finish(self, text: str) -> None:
        self.finished_at = time.perf_counter()
        self.answer = text
        self.done.set()

    async def fail(self, text: str) -> None:
        self.problem = f"fail: {text}"
        self.done.set()

    async def image(self, image: Any) -> None:
        pass  # the benchmark's model calls no tool that draws

    def watch(self, record: Any) -> None:
        pass  # nothing is shown that a restart would edit


@dataclass
class Run:
    wall: float  # the first handle() to the last finish()
    engine: float  # the engine's own seconds, summed
    cpu: float  # this process's CPU seconds, all threads (the engine's sleeps use none)
    overheads: list[float] = field(default_factory=list)  # seconds, one per request

    @property
    def ratio(self) -> float:
        return self.wall / self.engine


def incoming(user: str, text: str, number: int) -> Incoming:
    return Incoming(
        platform="bench",
        chat_id=user,
        user_id=user,
        display_name=user,
        text=text,
        message_id=str(number),
        route={"chat": user},
    )


async def ask(core: Core, user: str, tag: str, number: int) -> TimedStream:
    out = TimedStream(tag)
    out.accepted_at = time.perf_counter()
    await core.dispatcher.handle(incoming(user, f"{tag} what is 6.5 times 7.5?", number), out)
    return out


def check(outs: list[TimedStream], counts: dict[str, int], *, tool: bool) -> None:
    """Every request answered once, and by the path under test (not a busy notice)."""
    problems = [f"{o.tag}: {o.problem}" for o in outs if o.problem is not None]
    if problems:
        raise RuntimeError(f"{len(problems)} requests were not answered, e.g. {problems[0]}")
    if tool and not all("48.75" in (o.answer or "") for o in outs):
        raise RuntimeError("a /calculate round did not reach the answer")
    if counts != {"done": len(outs) + 1}:  # the warm-up request too
        raise RuntimeError(f"unexpected request states: {counts}")


async def run_once(folder: Path, *, engine_time: float, pieces: int, tool: bool, plan: list[str]) -> Run:
    """One fresh core; `plan` names the user of each request. One user: sent one after
    another, each when the previous answer is finished; several: all at once."""
    rounds = 2 if tool else 1
    engine = TimedEngine(round_time=engine_time / rounds, pieces=pieces, tool_call=tool)
    settings = Settings(
        data_dir=folder,
        tools=["calculate"],
        temperature=0.0,
        max_new_tokens=256,
        rate_limit_per_minute=0,
        queue_max=max(200, len(plan) + 10),
        log_level="WARNING",
    )
    core = await Core.open(settings, engine)
    try:
        await core.start()
        warm = await ask(core, "warmup", "w0", 0)
        await warm.done.wait()
        if warm.problem is not None:
            raise RuntimeError(f"warm-up request: {warm.problem}")
        await core.wait_idle()
        engine.spent.clear()

        cpu0, t0 = time.process_time(), time.perf_counter()
        outs: list[TimedStream] = []
        if len(set(plan)) == 1:
            for number, user in enumerate(plan, 1):
                out = await ask(core, user, f"q{number}", number)
                await out.done.wait()
                outs.append(out)
        else:
            outs = list(await asyncio.gather(*(ask(core, u, f"q{n}", n) for n, u in enumerate(plan, 1))))
            await asyncio.gather(*(out.done.wait() for out in outs))
        await core.wait_idle()
        cpu = time.process_time() - cpu0

        async with core.db.transaction() as session:
            counts = await crud.request_counts(session=session)
        check(outs, counts, tool=tool)
        run = Run(wall=max(o.finished_at for o in outs) - t0, engine=sum(engine.spent.values()), cpu=cpu)
        previous = t0
        for out in sorted(outs, key=lambda o: o.finished_at):
            stretch = out.finished_at - max(previous, out.accepted_at)
            run.overheads.append(stretch - engine.spent[out.tag])
            previous = out.finished_at
        return run
    finally:
        await core.aclose()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def scenario(
    label: str, *, engine_time: float, pieces: int, tool: bool, plan: list[str], repeats: int
) -> None:
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="yanray-bench-") as folder:
            run = await run_once(Path(folder), engine_time=engine_time, pieces=pieces, tool=tool, plan=plan)
            runs.append(run)
    ratio = statistics.median(r.ratio for r in runs)
    overheads = [o * 1000 for r in runs for o in r.overheads]
    cpu = statistics.median(r.cpu / len(plan) * 1000 for r in runs)
    print(
        f"{label:<40} {len(plan):>4} {statistics.median(r.wall for r in runs):>7.2f} "
        f"{statistics.median(r.engine for r in runs):>7.2f} {ratio:>6.3f} {'ok' if ratio <= TARGET else 'OVER':<4} "
        f"{statistics.median(overheads):>6.1f} {percentile(overheads, 0.99):>6.1f} {cpu:>6.1f}  "
        f"({' '.join(f'{r.ratio:.3f}' for r in runs)})",
        flush=True,
    )


async def main(args: argparse.Namespace) -> None:
    one = ["alice"] * args.requests
    many = [f"user{i}" for i in range(args.conversations)]
    many += [f"user{i}" for i in range(0, args.conversations, 20)]  # every twentieth sends a second message
    times = [args.engine_time] + ([args.short_time] if args.short_time > 0 else [])
    print(
        "Yanray pipeline benchmark: dispatcher, SQLite, queue, worker and tool loop around a timed engine.\n"
        f"ratio = wall / engine time (median of {args.repeats} runs; target <= {TARGET}); "
        f"{args.pieces} pieces per reply round; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs."
    )
    started = time.perf_counter()
    for engine_time in times:
        print(f"\nengine time per reply {engine_time:.3f} s")
        print(
            f"{'scenario':<40} {'reqs':>4} {'wall s':>7} {'engine':>7} {'ratio':>6} {'':<4} "
            f"{'ovh50':>6} {'ovh99':>6} {'cpu':>6}  (ratio of each repeat)"
        )
        common = {"engine_time": engine_time, "pieces": args.pieces, "repeats": args.repeats}
        await scenario("1 conversation, one after another", tool=False, plan=one, **common)
        await scenario(f"{args.conversations} conversations at once", tool=False, plan=many, **common)
        if engine_time == args.engine_time:  # the tool round once, at the time the target is judged at
            await scenario("1 conversation, with a /calculate round", tool=True, plan=one, **common)
    print(
        "\novh50/ovh99: median and p99 per-request time outside the engine (ms, all repeats); "
        "cpu: this process's CPU per request (ms; the calculator's process not included).\n"
        f"done in {time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.2f}."
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Yanray's overhead around a fixed-time engine.")
    parser.add_argument("--engine-time", type=float, default=1.0, help="engine seconds per reply (1.0)")
    parser.add_argument(
        "--short-time", type=float, default=0.2, help="a second, shorter engine time (0.2); 0 skips"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each scenario (3)")
    parser.add_argument("--conversations", type=int, default=100, help="conversations at once (100)")
    parser.add_argument("--requests", type=int, default=10, help="requests one after another (10)")
    parser.add_argument("--pieces", type=int, default=40, help="streamed pieces per reply round (40)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(main(parse_args()))
