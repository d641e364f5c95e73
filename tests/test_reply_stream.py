"""The reply streamer's behaviour, once for every platform: `ReplyStreamer` over an
in-memory sink that behaves like a chat (messages with ids, edits, deletions, faults).

The platforms' own tests (test_telegram*, test_discord) check the same table through the
fake servers and the real clients; here every row is checked precisely and quickly.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from tests.waiting import until
from yanray.adapters.sink import (
    Blocked,
    Flood,
    Handle,
    MessageGone,
    Moved,
    Rejected,
    Shown,
    StreamerContext,
    Transient,
    digest,
)
from yanray.adapters.split import join_parts
from yanray.adapters.streamer import ReplyStreamer
from yanray.bot.errors import AdapterStopped, DeliveryRefused
from yanray.bot.types import ReplyStream


class MemorySink:
    """A chat in memory: what a user would see, every call made, and faults on demand."""

    typing_every = 0.01

    def __init__(self, key: str = "chat", *, private: bool = False, drafts: bool = False, limit: int = 200):
        self.key, self.private, self.drafts, self._limit = key, private, drafts, limit
        self.shown: dict[Handle, str] = {}  # message id -> text, in the order sent
        self.deleted: list[Handle] = []
        self.calls: list[tuple[str, float]] = []
        self.draft_texts: list[str] = []
        self.typings = 0
        self.earlier_messages: list[tuple[Handle, str]] = []
        self._faults: list[tuple[str, Exception]] = []
        self._ids = itertools.count(1)

    def fail(self, method: str, exc: Exception, times: int = 1) -> None:
        self._faults.extend([(method, exc)] * times)

    def _call(self, method: str) -> None:
        self.calls.append((method, time.monotonic()))
        for index, (name, exc) in enumerate(self._faults):
            if name == method:
                del self._faults[index]
                raise exc

    def texts(self) -> list[str]:
        return list(self.shown.values())

    def writes(self) -> list[str]:
        return [name for name, _ in self.calls if name in ("send", "edit", "delete")]

    def limit(self, text: str) -> int:
        return self._limit

    async def send(self, text: str, *, first: bool) -> Handle:
        self._call("send")
        handle = next(self._ids)
        self.shown[handle] = text
        return handle

    async def edit(self, handle: Handle, text: str) -> None:
        self._call("edit")
        if handle not in self.shown:
            raise MessageGone("message to edit not found")
        self.shown[handle] = text

    async def delete(self, handle: Handle) -> None:
        self._call("delete")
        if self.shown.pop(handle, None) is None:
            raise MessageGone("message to delete not found")
        self.deleted.append(handle)

    async def draft(self, text: str) -> None:
        self._call("draft")
        self.draft_texts.append(text)

    async def typing(self) -> None:
        self._call("typing")
        self.typings += 1

    async def earlier(self) -> list[tuple[Handle, str]]:
        return list(self.earlier_messages)


class Recorder:
    """Stands in for the core's `ShownRecorder`: keeps what the stream last reported."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    async def __call__(self, value: Any) -> None:
        self.values.append(value)


@pytest.fixture
def ctx() -> StreamerContext:
    blocked: list[tuple[Any, str]] = []
    context = StreamerContext(edit_interval=0.0, preview_interval=0.01, retry_delays=(0.01, 0.02))
    context.on_blocked = lambda key, why: blocked.append((key, why))
    context.running = True
    context.blocked_calls = blocked  # type: ignore[attr-defined]
    return context


def stream(ctx: StreamerContext, sink: MemorySink, **kw: Any) -> ReplyStreamer:
    out = ReplyStreamer(ctx, sink, **kw)
    assert isinstance(out, ReplyStream)
    return out


async def test_the_notice_becomes_the_answer(ctx: StreamerContext) -> None:
    sink = MemorySink()
    out = stream(ctx, sink)
    await out.notice("⏳ You're next.")
    await until(lambda: sink.texts() == ["⏳ You're next."])
    await until(lambda: sink.typings >= 1)
    await out.started()
    await out.progress("The answer so")
    await until(lambda: sink.texts() == ["The answer so"])
    await out.finish("The answer so far and the rest.")
    assert sink.texts() == ["The answer so far and the rest."]
    assert sink.writes().count("send") == 1, "the notice's message was edited into the answer"
    assert ctx.settled()


async def test_a_failure_keeps_the_partial_answer_and_adds_the_reason(ctx: StreamerContext) -> None:
    sink = MemorySink()
    out = stream(ctx, sink)
    await out.started()
    await out.progress("Half of an answer")
    await until(lambda: sink.texts() == ["Half of an answer"])
    await out.fail("The model stopped working.")
    assert sink.texts() == ["Half of an answer\n\n⚠️ The model stopped working."]

    empty = MemorySink("other")
    out = stream(ctx, empty)
    await out.notice("⏳ 2 requests are ahead of yours.")
    await out.fail("Stopped.")  # /stop while it waited: the notice shows the reason
    assert empty.texts() == ["⚠️ Stopped."]


async def test_a_stopped_answer_shows_what_the_core_says(ctx: StreamerContext) -> None:
    sink = MemorySink()
    out = stream(ctx, sink)
    await out.progress("Written so far")
    await until(lambda: sink.texts())
    await out.finish("Written so far\n\n[Stopped.]")  # the worker words the note
    assert sink.texts() == ["Written so far\n\n[Stopped.]"]
    await out.progress("late")  # nothing after the last word
    await out.fail("late")
    assert sink.texts() == ["Written so far\n\n[Stopped.]"]


async def test_a_long_answer_is_split_and_surplus_messages_are_deleted(ctx: StreamerContext) -> None:
    sink = MemorySink(limit=120)
    out = stream(ctx, sink)
    long = " ".join(f"Sentence {i} is here." for i in range(40))
    await out.progress(long)
    await until(lambda: len(sink.texts()) >= 6)
    final = long + "\n\n```\ncode\n```"
    await out.finish(final)
    parts = sink.texts()
    assert len(parts) > 1 and all(len(p) <= 120 for p in parts)
    assert join_parts(parts) == final
    # an edited question's shorter answer in the same messages: the rest are deleted
    new = out.successor()
    await new.finish("Short now.")
    assert sink.texts() == ["Short now."]
    assert len(sink.deleted) == len(parts) - 1


async def test_an_edited_question_takes_over_the_earlier_answer(ctx: StreamerContext) -> None:
    sink = MemorySink()
    old = stream(ctx, sink, key=("chat", 7))
    record = Recorder()
    old.watch(record)
    await old.progress("An answer to the old question")
    await until(lambda: sink.texts())
    new = ctx.answers[("chat", 7)].successor()
    assert ctx.answers[("chat", 7)] is new
    await old.finish("An answer to the old question\n\n[Replaced by your edited message.]")
    await old.progress("more of the old")
    assert sink.texts() == ["An answer to the old question"], "the old answer's last word is dropped"
    await new.notice("⏳ You're next.")
    await new.finish("The new answer.")
    assert sink.texts() == ["The new answer."]
    assert sink.writes().count("send") == 1
    assert record.values[-1] == [[1, digest("An answer to the old question")]]


async def test_flood_control_is_waited_out_and_nothing_is_dropped(ctx: StreamerContext) -> None:
    sink = MemorySink(limit=100)
    out = stream(ctx, sink)
    await out.progress("first")
    await until(lambda: sink.texts() == ["first"])
    sink.fail("edit", Flood(0.2, "Too Many Requests: retry after 0.2"))
    sink.fail("send", Flood(0.1, "Too Many Requests: retry after 0.1"))
    text = "first " + "and then much more. " * 10
    await out.finish(text)
    assert join_parts(sink.texts()) == text
    edits = [at for name, at in sink.calls if name == "edit"]
    sends = [at for name, at in sink.calls if name == "send"]
    assert len(edits) == 2 and edits[1] - edits[0] >= 0.2
    assert len(sends) == 4 and sends[2] - sends[1] >= 0.1  # the preview's, a refused one, two


async def test_transient_faults_are_retried_then_left_to_the_core(ctx: StreamerContext) -> None:
    sink = MemorySink()
    out = stream(ctx, sink)
    sink.fail("send", Transient("502 Bad Gateway"), times=2)
    await out.finish("Made it.")
    assert sink.texts() == ["Made it."] and sink.writes() == ["send"] * 3

    down = MemorySink("down")
    out = stream(ctx, down)
    down.fail("send", Transient("timed out"), times=3)
    with pytest.raises(Transient):
        await out.finish("Not now.")  # the core keeps the answer for the next start
    assert down.texts() == []


async def test_403_makes_the_stream_go_quiet_and_is_reported_once(ctx: StreamerContext) -> None:
    sink = MemorySink()
    out = stream(ctx, sink)
    sink.fail("send", Blocked("Forbidden: bot was blocked by the user"), times=5)
    await out.notice("⏳ You're next.")
    await until(lambda: ctx.blocked_calls)  # type: ignore[attr-defined]
    await out.progress("more")
    await out.finish("The answer.")  # returns: the answer counts as delivered
    assert sink.texts() == [] and sink.writes() == ["send"]
    assert ctx.blocked_calls == [("chat", "Forbidden: bot was blocked by the user")]  # type: ignore[attr-defined]

    ctx.blocked.add("chat")  # the adapter keeps blocked chats (Telegram)
    again = stream(ctx, sink)
    await again.notice("⏳ You're next.")
    await again.finish("Another answer.")
    assert sink.writes() == ["send"], "a blocked chat is not written to"


async def test_a_refused_final_text_is_reported_and_the_apology_follows(ctx: StreamerContext) -> None:
    sink = MemorySink()
    out = stream(ctx, sink)
    await out.progress("Partial")
    await until(lambda: sink.texts())
    sink.fail("edit", Rejected("Bad Request: message thread not found"))
    with pytest.raises(DeliveryRefused):
        await out.finish("Partial and the rest.")
    await out.send("Sorry, I could not send my answer.")  # the core's one line
    assert sink.texts() == ["Sorry, I could not send my answer."]


async def test_after_the_adapter_stopped_a_final_text_raises(ctx: StreamerContext) -> None:
    sink = MemorySink()
    out = stream(ctx, sink)
    await out.progress("Partial")
    await until(lambda: sink.texts())
    replaced = stream(ctx, MemorySink("other"))
    replaced.successor()
    await ctx.stop()
    await out.progress("Partial and more")
    with pytest.raises(AdapterStopped):
        await out.finish("Partial and more.")
    assert sink.texts() == ["Partial"]
    await replaced.finish("[Replaced by your edited message.]")  # its successor answers: no error


async def test_after_a_restart_the_shown_messages_are_edited_not_repeated(ctx: StreamerContext) -> None:
    sink = MemorySink()
    sink.shown = {1: "⏳ You're next.", 2: "The whole answer, part two."}
    shown = Shown.parse([[1, digest("⏳ You're next.")], [2, digest("The whole answer, part two.")], "junk"])
    out = stream(ctx, sink, shown=shown)
    await out.finish("The whole answer.")
    assert sink.texts() == ["The whole answer."]
    assert sink.writes() == ["edit", "delete"]

    done = MemorySink("done")
    done.shown = {5: "Already complete."}
    out = stream(ctx, done, shown=Shown.parse([[5, digest("Already complete.")]]))
    await out.finish("Already complete.")
    assert done.writes() == [], "a visibly complete answer is not written again"

    found = MemorySink("found")  # a platform that finds its earlier reply itself (Discord)
    found.shown = {9: "a cut-off partial"}
    found.earlier_messages = [(9, "a cut-off partial")]
    out = stream(ctx, found)
    await out.finish("The answer.")
    assert found.texts() == ["The answer."] and found.writes() == ["edit"]


async def test_a_deleted_message_is_sent_again_in_order(ctx: StreamerContext) -> None:
    sink = MemorySink(limit=100)
    out = stream(ctx, sink)
    text = "One sentence here. " * 12
    await out.progress(text)
    await until(lambda: len(sink.texts()) == 3)
    middle = list(sink.shown)[1]
    del sink.shown[middle]  # a moderator deleted the second part
    final = "One sentence there. " * 12 + "End."
    await out.finish(final)
    assert join_parts(sink.texts()) == final
    assert sink.writes()[3:5] == ["edit", "edit"], "the first part was edited in place"


async def test_a_moved_sink_gets_the_whole_answer_anew(ctx: StreamerContext) -> None:
    sink = MemorySink()
    out = stream(ctx, sink)
    await out.progress("Partial")
    await until(lambda: sink.texts())
    sink.fail("edit", Moved("the interaction expired"))
    await out.finish("The answer.")
    assert sink.texts() == ["Partial", "The answer."]  # the old place is no longer ours to edit


async def test_private_previews_are_drafts_and_the_final_goes_out_at_once(ctx: StreamerContext) -> None:
    sink = MemorySink(private=True, drafts=True)
    out = stream(ctx, sink)
    await out.started()
    for n in range(1, 6):
        await out.progress("word " * n)
        await asyncio.sleep(0.02)
    await until(lambda: len(sink.draft_texts) >= 2)
    await out.finish("word word word word word done")
    assert sink.texts() == ["word word word word word done"]
    assert sink.writes() == ["send"], "no message before the final one"


async def test_a_group_shares_its_write_slots(ctx: StreamerContext) -> None:
    ctx.edit_interval = 0.05
    first, second = MemorySink("group"), MemorySink("group")
    one, two = stream(ctx, first), stream(ctx, second)
    for n in range(1, 8):
        await one.progress("alpha " * n)
        await two.progress("beta " * n)
        await asyncio.sleep(0.01)
    await asyncio.gather(one.finish("alpha done"), two.finish("beta done"))
    times = sorted(at for sink in (first, second) for name, at in sink.calls if name in ("send", "edit"))
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 0.045
    assert first.texts() == ["alpha done"] and second.texts() == ["beta done"]
