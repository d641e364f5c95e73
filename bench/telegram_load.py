"""Telegram load: many users at once through the real PTB client, the fake Bot API and the core.

200 users (private chats) each send 5 messages, one after another: a user sends the
next message when the answer to the previous one has arrived, so 200 conversations
are in flight at once. The engine answers instantly (`ScriptedEngine`, the whole reply
in one piece), so what is measured is Yanray's own part: PTB long polling, the
dispatcher (two SQLite transactions per question), the fair queue, the single worker
(its transactions), the reply stream (drafts, queue notices, typing, final message) and
the HTTP round trips to the fake on 127.0.0.1.

Printed: messages per second (answers / wall time from the first message sent to the
last answer seen); the p50/p99 latency of one message from the fake receiving the user's
message to the fake receiving the answer's final text (with the engine instant this is
all Yanray's, but with 200 conversations in flight and one engine worker most of it is
the wait in the queue); and the worker's time per request with the engine's time taken
out (storage, tool loop, delivery), which is what bounds the throughput. The bench times
it itself: around the worker's `process` and around each of the engine's `generate`
rounds (one worker answers one request at a time, so the engine time between a request's
start and end is its own). Checked: every message answered exactly once (each chat shows exactly its 5
answers, in order, nothing twice, nothing lost) and every request `done` in storage.

Settings are the defaults except the rate limit (off: one user's 5 messages are not a
flood here) and the queue bound (sized to fit), so nothing is turned away. The default
`YANRAY_TELEGRAM_EDIT_INTERVAL` (1.5 s) applies to the queue notices that become answers;
`--edit-interval` changes it.

Run: `python bench/telegram_load.py [--users 200] [--messages 5] [--edit-interval 1.5]`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.fakes / tests.scripted_engine

from tests.fakes.telegram_harness import running_bot, telegram_settings
from tests.fakes.telegram_server import FakeTelegram, SentMessage
from tests.scripted_engine import ScriptedEngine, ScriptedSession
from yanray.bot.queue import Job
from yanray.bot.settings import Settings
from yanray.bot.worker import EngineWorker
from yanray.engine.base import ChatMessage, GenerateOptions, Generation, TextCallback, ToolSpec

FIRST_USER = 10_000


def answer_to(messages: list[ChatMessage]) -> str:
    question = [m.content for m in messages if m.role == "user"][-1]
    return f"echo {question}"


class ClockedEngine(ScriptedEngine):
    """The scripted engine, adding up the time its sessions spend in `generate`."""

    spent = 0.0

    async def start(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> ScriptedSession:
        session = await super().start(messages, tools)
        generate = session.generate

        async def timed(options: GenerateOptions, on_text: TextCallback | None = None) -> Generation:
            began = time.perf_counter()
            try:
                return await generate(options, on_text)
            finally:
                self.spent += time.perf_counter() - began

        session.generate = timed  # type: ignore[method-assign]
        return session


def time_requests(worker: EngineWorker, engine: ClockedEngine) -> list[tuple[float, float]]:
    """(engine seconds, whole-request seconds) of every request the worker answers from now on."""
    timings: list[tuple[float, float]] = []
    process = worker.process

    async def timed(job: Job) -> None:
        engine_before, started = engine.spent, time.perf_counter()
        try:
            await process(job)
        finally:
            timings.append((engine.spent - engine_before, time.perf_counter() - started))

    worker.process = timed  # type: ignore[method-assign]
    return timings


async def run(users: int, per_user: int, edit_interval: float) -> int:
    async with FakeTelegram() as fake:
        with tempfile.TemporaryDirectory() as folder:
            base = Settings(data_dir=Path(folder), rate_limit_per_minute=0, queue_max=users * per_user)
            settings = telegram_settings(fake, base, telegram_edit_interval=edit_interval)
            engine = ClockedEngine(responder=answer_to, piece=10_000)
            waiting: dict[tuple[int, str], tuple[float, asyncio.Future[float]]] = {}

            def seen(message: SentMessage) -> None:
                entry = waiting.pop((message.chat_id, message.visible), None)
                if entry is not None and not entry[1].done():
                    entry[1].set_result(time.perf_counter() - entry[0])

            fake.listeners.append(seen)
            latencies: list[float] = []

            async def user(uid: int) -> None:
                for n in range(per_user):
                    text = f"u{uid} m{n}"
                    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                    waiting[(uid, f"echo {text}")] = (time.perf_counter(), done)
                    fake.private_text(uid, text)
                    latencies.append(await asyncio.wait_for(done, 120))

            async with running_bot(fake, settings, engine, draft_interval=1.0, retry_base=0.5) as bot:
                timings = time_requests(bot.core.worker, engine)
                started = time.perf_counter()
                await asyncio.gather(*(user(FIRST_USER + i) for i in range(users)))
                wall = time.perf_counter() - started
                await asyncio.sleep(0.5)  # anything sent twice would show up now
                statuses = await bot.statuses()

            total = users * per_user
            problems = []
            for i in range(users):
                uid = FIRST_USER + i
                expected = [f"echo u{uid} m{n}" for n in range(per_user)]
                if fake.messages(uid) != expected:
                    problems.append(f"chat {uid}: {fake.messages(uid)}")
            if statuses != {"done": total}:
                problems.append(f"request statuses {statuses}")
            latencies.sort()
            p50 = statistics.median(latencies)
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            print(
                f"telegram load: {users} users x {per_user} messages = {total} messages, "
                f"edit interval {edit_interval:g} s"
            )
            if problems:
                print(f"  answered exactly once: NO ({'; '.join(problems[:3])})")
            else:
                print(f"  answered exactly once: yes, {total} of {total}, none lost, none twice")
            print(f"  throughput: {total / wall:.1f} messages/s ({wall:.2f} s wall)")
            print(
                f"  latency per message, sent -> answer shown (queue wait included): "
                f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
            )
            own = sorted(whole - engine_time for engine_time, whole in timings)
            print(
                f"  worker time per request, engine excluded: p50 {statistics.median(own) * 1000:.1f} ms, "
                f"p99 {own[min(len(own) - 1, int(len(own) * 0.99))] * 1000:.1f} ms"
            )
            calls = {}
            for call in fake.calls:
                calls[call.method] = calls.get(call.method, 0) + 1
            print("  Bot API calls: " + ", ".join(f"{k} {v}" for k, v in sorted(calls.items())))
            return 1 if problems else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--edit-interval", type=float, default=1.5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.exit(asyncio.run(run(args.users, args.messages, args.edit_interval)))


if __name__ == "__main__":
    main()
