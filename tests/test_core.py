"""The path of a message through dispatcher, storage, queue, worker and tool loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.recording import RecordingAdapter, RecordingStream
from tests.scripted_engine import ScriptedEngine
from tests.waiting import until
from yanray.bot import worker as worker_module
from yanray.bot.app import Core
from yanray.bot.dispatcher import queue_notice
from yanray.bot.types import Incoming
from yanray.engine.base import ChatMessage
from yanray.storage import crud

pytestmark = pytest.mark.asyncio


def msg(text: str, *, user: str = "alice", chat: str | None = None, mid: str | None = None) -> Incoming:
    return Incoming(
        platform="test",
        chat_id=chat or user,
        user_id=user,
        display_name=user.title(),
        text=text,
        message_id=mid,
        route={"chat": chat or user, "user": user},
    )


async def ask(core: Core, text: str, **kw: Any) -> RecordingStream:
    out = RecordingStream(text)
    await core.dispatcher.handle(msg(text, **kw), out)
    return out


async def statuses(core: Core) -> dict[str, int]:
    async with core.db.transaction() as session:
        return await crud.request_counts(session=session)


async def test_question_is_answered_streamed_and_stored(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["Hello Alice, nice to meet you."])
    core = await core_factory(make_settings(tools=[]), engine)
    out = await ask(core, "Hi, I am Alice")
    assert await out.wait() == "Hello Alice, nice to meet you."
    assert out.of("progress")[-1] == "Hello Alice, nice to meet you."
    assert [m.role for m in engine.prompts[0]] == ["system", "user"]
    assert engine.prompts[0][1].content == "Hi, I am Alice"
    assert await statuses(core) == {"done": 1}
    async with core.db.transaction() as session:
        request = await crud.latest_request(session=session, conversation_id=1)
        assert request is not None and request.delivered and request.reply_text == out.answer


async def test_history_is_remembered_across_a_restart(make_settings, core_factory) -> None:
    settings = make_settings(tools=[])
    engine = ScriptedEngine(["Nice to meet you.", "Your name is Alice."])
    core = await core_factory(settings, engine)
    await (await ask(core, "My name is Alice")).wait()
    await core.aclose()
    core = await core_factory(settings, engine)
    await (await ask(core, "What is my name?")).wait()
    seen = [(m.role, m.content) for m in engine.prompts[-1][1:]]
    assert seen == [
        ("user", "My name is Alice"),
        ("assistant", "Nice to meet you."),
        ("user", "What is my name?"),
    ]


async def test_burst_from_one_user_does_not_starve_another(make_settings, core_factory) -> None:
    engine = ScriptedEngine(responder=lambda m: f"answer to {m[-1].content}", delay=0.002)
    core = await core_factory(make_settings(tools=[], queue_per_conversation=60, queue_max=100), engine)
    finished: list[str] = []

    class Tracked(RecordingStream):
        async def finish(self, text: str) -> None:
            finished.append(self.name)
            await super().finish(text)

    burst = [Tracked(f"a{i}") for i in range(50)]
    for i, out in enumerate(burst):
        await core.dispatcher.handle(msg(f"a{i}", user="alice"), out)
    bob = Tracked("bob")
    await core.dispatcher.handle(msg("b0", user="bob"), bob)
    started_at = len(engine.prompts)
    assert bob.of("notice") == [queue_notice(1)], "bob is told he is next"
    await bob.wait(30)
    # only the request that was running when bob arrived was generated before him (counted in
    # generation order: deliveries run in the background and may finish a little later)
    order = [prompt[-1].content for prompt in engine.prompts]
    assert order.index("b0") - started_at <= 1, order[started_at - 1 : started_at + 3]
    await core.wait_idle()
    assert len(finished) == 51 and await statuses(core) == {"done": 51}


async def test_a_full_queue_answers_busy_and_stores_nothing(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["ok"], delay=0.05)
    core = await core_factory(make_settings(tools=[], queue_per_conversation=2), engine)
    outs = [await ask(core, f"q{i}") for i in range(4)]
    busy = [o.answer for o in outs if o.of("send")]
    assert len(busy) == 2 and all("wait for their answers" in b for b in busy)
    await core.wait_idle()
    assert await statuses(core) == {"done": 2}


async def test_stop_cancels_running_and_waiting_requests(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["word " * 200], delay=0.01, piece=5)
    core = await core_factory(make_settings(tools=[], max_new_tokens=1000), engine)
    first = await ask(core, "tell me a long story")
    second = await ask(core, "and another")
    await until(lambda: first.of("progress"), what="the first answer is being written")
    stop = await ask(core, "/stop")
    assert stop.answer == "Stopped."
    assert (await second.wait()) == "Stopped."
    answer = await first.wait()
    assert answer is not None and answer.endswith("[Stopped.]") and len(answer) < 1000
    await core.wait_idle()
    assert await statuses(core) == {"cancelled": 2}
    assert (await ask(core, "/stop")).answer == "There is nothing to stop."


async def test_restart_answers_queued_and_running_requests_once(make_settings, core_factory) -> None:
    settings = make_settings(tools=[])
    hang = asyncio.Event()
    engine = ScriptedEngine(responder=lambda m: f"answer to {m[-1].content}")

    async def block() -> None:
        await hang.wait()

    engine.before_reply = block  # type: ignore[assignment]
    core = await core_factory(settings, engine)
    for text in ("one", "two", "three"):
        await ask(core, text)
    await until(lambda: engine.prompts, what="the engine is answering the first question")
    await core.aclose()  # the process dies: one request running, two queued
    assert await _counts(settings) == {"running": 1, "queued": 2}

    engine.before_reply = None
    adapter = RecordingAdapter("test")
    core = await core_factory(settings, engine, adapters=(adapter,))
    answers = [await stream.wait() for _route, stream in adapter.reopened]
    assert sorted(a or "" for a in answers) == ["answer to one", "answer to three", "answer to two"]
    assert all(route["platform"] == "test" for route, _ in adapter.reopened)
    await core.wait_idle()
    await core.aclose()
    # a second restart answers nothing again: start() returns once the journal is recovered
    asked = len(engine.prompts)
    again = RecordingAdapter("test")
    core = await core_factory(settings, engine, adapters=(again,))
    await core.wait_idle()
    assert again.reopened == [] and len(core.queue) == 0
    assert len(engine.prompts) == asked
    assert await statuses(core) == {"done": 3}


async def _counts(settings) -> dict[str, int]:
    from yanray.storage import Database

    db = await Database.open(settings.resolved_database_url)
    try:
        async with db.transaction() as session:
            return await crud.request_counts(session=session)
    finally:
        await db.close()


async def test_stored_but_undelivered_answer_is_delivered_without_regenerating(make_settings, core_factory):
    settings = make_settings(tools=[])
    engine = ScriptedEngine(["the answer"])

    class Broken(RecordingStream):
        async def finish(self, text: str) -> None:
            raise ConnectionError("platform down")

    core = await core_factory(settings, engine)
    out = Broken()
    await core.dispatcher.handle(msg("question"), out)
    await core.wait_idle()
    await core.aclose()
    adapter = RecordingAdapter("test")
    await core_factory(settings, engine, adapters=(adapter,))
    assert [await s.wait() for _r, s in adapter.reopened] == ["the answer"]
    assert len(engine.prompts) == 1


async def test_reset_leaves_old_turns_out_of_the_context(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["first answer", "second answer"])
    core = await core_factory(make_settings(tools=[]), engine)
    await (await ask(core, "first question")).wait()
    assert "Fresh start" in ((await ask(core, "/reset")).answer or "")
    await (await ask(core, "second question")).wait()
    assert [m.content for m in engine.prompts[-1][1:]] == ["second question"]
    history = await ask(core, "/history")
    assert history.answer == "You: second question\n\nYanray: second answer"


async def test_retry_regenerates_the_last_answer(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["a bad answer", "a better answer", "fine"])
    core = await core_factory(make_settings(tools=[]), engine)
    await (await ask(core, "question")).wait()
    retry = await ask(core, "/retry")
    assert await retry.wait() == "a better answer"
    assert [m.content for m in engine.prompts[-1][1:]] == ["question"]
    await (await ask(core, "next")).wait()
    assert [m.content for m in engine.prompts[-1][1:]] == ["question", "a better answer", "next"]


async def test_system_prompt_per_conversation(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["ok"])
    core = await core_factory(make_settings(tools=[], system_prompt="Default rules."), engine)
    assert "Default rules." in ((await ask(core, "/system")).answer or "")
    await ask(core, "/system Answer like a pirate.")
    await (await ask(core, "hello")).wait()
    assert engine.prompts[-1][0] == ChatMessage("system", "Answer like a pirate.")
    await (await ask(core, "hello", user="bob")).wait()
    assert engine.prompts[-1][0] == ChatMessage("system", "Default rules.")
    await ask(core, "/system default")
    await (await ask(core, "hello again")).wait()
    assert engine.prompts[-1][0] == ChatMessage("system", "Default rules.")


async def test_history_is_cut_oldest_first_to_the_budget(make_settings, core_factory) -> None:
    # the scripted engine counts one token per word plus four per message
    engine = ScriptedEngine(["short answer"], max_context=64 + 40)
    core = await core_factory(make_settings(tools=[], max_new_tokens=64, system_prompt="rules"), engine)
    for i in range(6):
        await (await ask(core, f"question number {i}")).wait()
    kept = [m.content for m in engine.prompts[-1][1:] if m.role == "user"]
    assert kept[-1] == "question number 5" and "question number 0" not in kept
    assert engine.count_tokens(engine.prompts[-1]) <= 40


async def test_a_cut_history_is_cut_in_large_steps_so_turns_share_a_prefix(
    make_settings, core_factory
) -> None:
    # 13 tokens a turn (scripted engine: a token per word, four per message), a 200-token budget
    engine = ScriptedEngine(["short answer"], max_context=64 + 200)
    core = await core_factory(make_settings(tools=[], max_new_tokens=64, system_prompt="rules"), engine)
    for i in range(40):
        await (await ask(core, f"question number {i}")).wait()
    sizes = [engine.count_tokens(prompt) for prompt in engine.prompts]
    assert max(sizes) <= 200
    first_cut = next(i for i, prompt in enumerate(engine.prompts) if prompt[1].content != "question number 0")
    moved = []  # turns whose prompt does not start with the previous one (the window moved)
    for i in range(first_cut, len(engine.prompts)):
        previous, prompt = engine.prompts[i - 1], engine.prompts[i]
        if prompt[: len(previous)] != previous:
            moved.append(i)
            assert sizes[i] <= 150  # cut down to three quarters of the budget
    cut_turns = len(engine.prompts) - first_cut
    # cut one turn at a time, every turn would move the window; in steps, about one turn in four
    assert 0 < len(moved) <= cut_turns // 3
    assert engine.prompts[-1][-1].content == "question number 39"


async def test_a_message_longer_than_the_budget_gets_a_clear_answer(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["never"], max_context=200)
    core = await core_factory(make_settings(tools=[], max_new_tokens=64), engine)
    out = await ask(core, "word " * 500)
    answer = await out.wait()
    assert answer is not None and "too long" in answer and "shorten" in answer
    assert engine.prompts == []
    assert await statuses(core) == {"failed": 1}
    # the refused message does not poison the next question's context
    engine.max_context = 4096
    await (await ask(core, "short one")).wait()
    assert [m.content for m in engine.prompts[-1][1:]] == ["short one"]


async def test_engine_failure_is_one_line_and_the_worker_keeps_serving(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["recovered"])
    engine.fail_with = "The model server cannot be reached."
    core = await core_factory(make_settings(tools=[]), engine)
    assert await (await ask(core, "hello")).wait() == "The model server cannot be reached."
    engine.fail_with = None
    assert await (await ask(core, "hello again")).wait() == "recovered"


async def test_huge_message_is_refused_before_storage(make_settings, core_factory) -> None:
    core = await core_factory(make_settings(tools=[]), ScriptedEngine())
    out = await ask(core, "x" * 200_000)
    assert "too long" in (out.answer or "")
    assert await statuses(core) == {}


async def test_allowlist_refuses_strangers_once(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["hi"])
    core = await core_factory(make_settings(tools=[], allowed_users=["test:alice"]), engine)
    first = await ask(core, "hello", user="mallory")
    second = await ask(core, "hello?", user="mallory")
    assert "only answer" in (first.answer or "") and second.events == []
    assert await (await ask(core, "hello", user="alice")).wait() == "hi"
    assert len(engine.prompts) == 1


async def test_edited_latest_question_is_answered_again(make_settings, core_factory) -> None:
    engine = ScriptedEngine(responder=lambda m: f"about {m[-1].content}")
    core = await core_factory(make_settings(tools=[]), engine)
    await (await ask(core, "cats", mid="7")).wait()
    edited = RecordingStream()
    assert await core.dispatcher.handle_edit(msg("dogs", mid="7"), lambda _shown: edited)
    assert await edited.wait() == "about dogs"
    await (await ask(core, "and?", mid="8")).wait()
    assert [m.content for m in engine.prompts[-1][1:]] == ["dogs", "about dogs", "and?"]
    assert not await core.dispatcher.handle_edit(msg("birds", mid="7"), lambda _shown: RecordingStream())


async def test_a_long_conversation_is_read_back_whole_when_it_fits(make_settings, core_factory) -> None:
    from yanray.bot.worker import HISTORY_PAGE

    engine = ScriptedEngine(["ok"], max_context=100_000)
    core = await core_factory(make_settings(tools=[]), engine)
    turns = HISTORY_PAGE // 2 + 8  # more messages than one page
    for i in range(turns):
        await (await ask(core, f"question {i}")).wait()
    prompt = engine.prompts[-1]
    assert len(prompt) == 1 + 2 * turns - 1
    assert prompt[1] == ChatMessage("user", "question 0")


async def test_reset_while_a_question_waits_keeps_that_question(make_settings, core_factory) -> None:
    engine = ScriptedEngine(responder=lambda m: f"about {m[-1].content}", delay=0.02)
    core = await core_factory(make_settings(tools=[]), engine)
    first = await ask(core, "old topic")
    second = await ask(core, "new topic")
    await ask(core, "/reset")
    assert await second.wait() == "about new topic"
    assert await first.wait() == "about old topic"
    assert [m.content for m in engine.prompts[-1][1:]] == ["new topic"]


async def test_an_edit_while_the_answer_is_being_stored_sets_that_answer_aside(
    make_settings, core_factory
) -> None:
    engine = ScriptedEngine(responder=lambda m: f"about {m[-1].content}", piece=100)
    core = await core_factory(make_settings(tools=[]), engine)
    release = asyncio.Event()

    class Slow(RecordingStream):
        async def progress(self, text: str) -> None:
            await super().progress(text)
            await release.wait()  # generation is over; the worker waits to store the answer

    first = Slow()
    await core.dispatcher.handle(msg("cats", mid="1"), first)
    await until(lambda: first.of("progress"), what="the answer is written and waits to be stored")
    edited = RecordingStream()
    assert await core.dispatcher.handle_edit(msg("dogs", mid="1"), lambda _shown: edited)
    release.set()
    assert await edited.wait() == "about dogs"
    assert "Replaced by your edited message." in (await first.wait() or "")
    await (await ask(core, "and then?")).wait()
    assert [m.content for m in engine.prompts[-1][1:]] == ["dogs", "about dogs", "and then?"]


async def test_a_message_accepted_before_start_is_answered_once(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["hello"])
    adapter = RecordingAdapter("test")
    core = await core_factory(make_settings(tools=[]), engine, start=False, adapters=(adapter,))
    out = await ask(core, "early bird")  # an adapter took it while the core was starting
    await core.start()
    assert await out.wait() == "hello"
    await core.wait_idle()
    assert adapter.reopened == [] and len(engine.prompts) == 1


async def test_console_streaming_prints_each_answer_once() -> None:
    import io

    from yanray.adapters.console import ConsoleStream

    output = io.StringIO()
    stream = ConsoleStream(output, streaming=True)
    await stream.progress("\nThe answer")
    await stream.progress("\nThe answer is 4.\n")
    await stream.finish("The answer is 4.")
    assert output.getvalue().count("The answer is 4.") == 1


async def test_first_messages_at_once_from_a_new_user_are_both_accepted(make_settings, core_factory) -> None:
    engine = ScriptedEngine(["hi"])
    core = await core_factory(make_settings(tools=[]), engine)
    outs = [RecordingStream(), RecordingStream()]
    await asyncio.gather(
        core.dispatcher.handle(msg("in the group", user="zoe", chat="group"), outs[0]),
        core.dispatcher.handle(msg("in private", user="zoe"), outs[1]),
    )
    assert [await out.wait() for out in outs] == ["hi", "hi"]
    assert await statuses(core) == {"done": 2}


async def test_an_answer_past_the_time_limit_shows_what_was_written(make_settings, core_factory) -> None:
    full = "word " * 400  # 400 pieces, 10 ms each: 4 s, past the 0.5 s limit
    engine = ScriptedEngine([full], delay=0.01, piece=5)
    core = await core_factory(make_settings(tools=[], max_new_tokens=1000, request_timeout=0.5), engine)
    out = await ask(core, "tell me a long story")
    answer = await out.wait()
    assert answer is not None and out.of("finish") == [answer]  # an answer, not a failure
    written, note = answer.split("\n\n")
    assert note == "[Stopped: that took longer than 0.5 s.]"
    assert written and full.startswith(written) and len(written) < len(full) // 2
    await core.wait_idle()
    assert await statuses(core) == {"done": 1}
    async with core.db.transaction() as session:
        request = await crud.latest_request(session=session, conversation_id=1)
        assert request is not None and request.reply_text == answer  # a restart delivers the same
        conversation = await crud.get_conversation(session=session, conversation_id=1)
        assert conversation is not None
        messages = await crud.context_messages(session=session, conversation=conversation, up_to_turn=10**9)
    # the conversation keeps what the model wrote, without the note
    assert [(m.role, m.text.strip()) for m in messages] == [
        ("user", "tell me a long story"),
        ("assistant", written),
    ]


async def test_an_engine_that_ignores_the_stop_is_cut_off(make_settings, core_factory, monkeypatch) -> None:
    monkeypatch.setattr(worker_module, "HARD_STOP_GRACE_S", 0.2)
    hang = asyncio.Event()
    engine = ScriptedEngine(["Back again."])

    async def deaf() -> None:  # never looks at the cancel flag
        await hang.wait()

    engine.before_reply = deaf  # type: ignore[assignment]
    core = await core_factory(make_settings(tools=[], request_timeout=0.3), engine)
    out = await ask(core, "are you there?")
    assert await out.wait() == "That took too long (over 0.3 s) and was stopped."
    assert out.of("fail") == [out.answer]
    engine.before_reply = None
    assert await (await ask(core, "again?")).wait() == "Back again."
    hang.set()


async def _stop_while_answering(
    settings, core_factory, question: str, *, times: int, graceful: bool
) -> tuple[ScriptedEngine, RecordingStream, Core]:
    """Ask `question`, stop the core `times` while the engine is answering it (a crash, or a
    stop on purpose), then start once more; the stream the recovered request answers on."""
    engine = ScriptedEngine(responder=lambda m: f"answer to {m[-1].content}")
    hang = asyncio.Event()

    async def block() -> None:
        await hang.wait()

    engine.before_reply = block  # type: ignore[assignment]
    core = await core_factory(settings, engine)
    await ask(core, question)
    for runs in range(1, times + 1):
        if runs > 1:  # the next start answers it again
            core = await core_factory(settings, engine, adapters=(RecordingAdapter("test"),))
        await until(lambda n=runs: len(engine.prompts) >= n, what=f"run {runs} is answering")
        await core.aclose(graceful=graceful)
    adapter = RecordingAdapter("test")
    engine.before_reply = None
    core = await core_factory(settings, engine, adapters=(adapter,))
    ((_route, stream),) = adapter.reopened
    return engine, stream, core


async def test_a_question_the_process_died_on_twice_is_failed_at_the_third_start(
    make_settings, core_factory
) -> None:
    engine, stream, core = await _stop_while_answering(
        make_settings(tools=[]), core_factory, "the question that kills", times=2, graceful=False
    )
    assert await stream.wait() == worker_module.INTERRUPTED
    assert [kind for kind, _ in stream.events] == ["fail"]
    assert len(engine.prompts) == 2  # not started a third time
    await core.wait_idle()
    assert await statuses(core) == {"failed": 1}
    # the next question is answered, without the one given up on
    assert await (await ask(core, "and this one?")).wait() == "answer to and this one?"
    assert [m.content for m in engine.prompts[-1][1:]] == ["and this one?"]


async def test_graceful_stops_do_not_count_as_deaths(make_settings, core_factory) -> None:
    # stopped on purpose (SIGTERM) three times while answering it
    _engine, stream, _core = await _stop_while_answering(
        make_settings(tools=[]), core_factory, "a long question", times=3, graceful=True
    )
    assert await stream.wait() == "answer to a long question"
