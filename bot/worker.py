"""The engine worker: the one consumer of the request queue.

It answers up to `slots` jobs at once (`YANRAY_MAX_BATCH`; the local engine decodes them
together, an OpenAI-compatible server batches them itself), each in a task of its own, taking
the next in the queue's fair order whenever one ends. For each job it marks the stored
request running (a short write transaction), reads the history back in read-only
transactions that take no write lock, has the engine fit it to the token budget
(`Engine.fit`: counted with the model's tokenizer, off the event loop), runs the tool loop on
a fresh engine session while streaming the visible text to the adapter, then stores every
round, tool result and the reply and marks the request done in one transaction, and only
then delivers the final text (in the background, so a platform's rate limit does not hold
up the engine) and marks it delivered.

Exactly once: a request is answered from its stored reply if the process died after
storing it but before delivering; a request left queued or running is generated
again. The window in which an answer can be delivered twice is the time between the
platform accepting the final message and the `delivered` flag being committed.

A request left running by two runs that both died while answering it (`Request.attempts`)
is not started a third time: it probably is what kills the process. `recover` closes it as
failed and tells the user one line (`INTERRUPTED`). A graceful stop while answering
(`Core.aclose`) gives that start back, so only deaths count.

Failures never stop the worker: the engine's, the context check's and unexpected ones
each close the request as failed and tell the user one line.

An answer that reaches the time limit (`YANRAY_REQUEST_TIMEOUT`) is stopped through its
cancel flag, like /stop, and what was written so far is stored and delivered as a normal
answer with a last line "[Stopped: ...]"; one cut at the length limit ends with
"[Cut short: ...]". Only an engine that ignores the flag for HARD_STOP_GRACE_S more is cut
off and closed as failed. The growing reply reaches the adapter through `_Progress`, which
pulls the visible text at most every PROGRESS_INTERVAL_S: nothing per piece grows with
the reply.

Every text the user sees comes from here or the dispatcher; the adapters only show it. The
worker never hands a stream an empty text, and when a platform refuses a final text for
good (`DeliveryRefused`) it says so in one line (`UNDELIVERABLE`) instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from yanray.bot.claims import Claims
from yanray.bot.context import system_prompt, too_long
from yanray.bot.errors import AdapterStopped, ContextTooLong, DeliveryRefused, EngineError
from yanray.bot.i18n import N_, normalize, translator
from yanray.bot.metrics import Metrics
from yanray.bot.queue import Job, RequestQueue
from yanray.bot.settings import Settings
from yanray.bot.toolloop import LoopResult, ToolLoop
from yanray.bot.tools import Tool
from yanray.bot.types import Adapter, Image, ReplyStream
from yanray.engine.base import ChatMessage, Engine, GenerateOptions, PromptTooLong, Role, ToolSpec
from yanray.storage import Conversation, Database, Message, crud

logger = logging.getLogger(__name__)

PROMPT_ROLE: dict[str, Role] = {
    "user": "user",
    "assistant": "assistant",
    "tool": "observation",
    "system": "system",
}
PROGRESS_INTERVAL_S = 0.1
#: after the time limit the answer is stopped through its cancel flag (the engine stops within a
#: token, a running tool is abandoned); an engine that does not react by then is cut off here
HARD_STOP_GRACE_S = 5.0
HISTORY_PAGE = 64  # messages read back at first; more only while they all fit the budget
APOLOGY = N_("Sorry, something went wrong while answering. Please try again.")
#: runs that may die while answering one request before it is given up at the next start
MAX_ATTEMPTS = 2
INTERRUPTED = N_(
    "Sorry, I stopped twice while answering this, so I gave up on it. Please ask in another way."
)
UNDELIVERABLE = N_("Sorry, I could not send my answer: the chat service refused it. Please try again.")
NO_ANSWER = N_("(I have no answer to that.)")


def unsent_note(result: LoopResult, language: str) -> str | None:
    """What ends an answer whose pictures could not be sent (the text is kept)."""
    count = len(result.unsent)
    if not count:
        return None
    template = translator(language).ngettext(
        "A picture could not be sent: the chat service did not take it.",
        "{count} pictures could not be sent: the chat service did not take them.",
        count,
    )
    return template.format(count=count)


def to_chat(message: Message) -> ChatMessage:
    role = PROMPT_ROLE[message.role]
    return ChatMessage(role, message.text, message.tool_name)


class _Progress:
    """Shows the growing reply: one adapter call in flight, always the newest text, pulled at
    most every PROGRESS_INTERVAL_S (building the text costs time in proportion to its length,
    so it is never built per piece; the adapters throttle to a second or more anyway).
    `drain` shows the newest text at once and waits for it."""

    def __init__(self, out: ReplyStream) -> None:
        self.out = out
        self._visible: Callable[[], str] = str
        self._dirty = False
        self._pulled = -PROGRESS_INTERVAL_S  # loop time of the last pull
        self._now = asyncio.Event()  # set by drain: pull without waiting for the interval
        self._task: asyncio.Task[None] | None = None

    def update(self, visible: Callable[[], str]) -> None:
        self._visible, self._dirty = visible, True
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self._dirty:
            due = self._pulled + PROGRESS_INTERVAL_S - loop.time()
            if due > 0 and not self._now.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due):
                        await self._now.wait()
            self._dirty, self._pulled = False, loop.time()
            await self.out.progress(self._visible())

    async def drain(self) -> None:
        if self._task is None:
            return
        self._now.set()
        (outcome,) = await asyncio.gather(self._task, return_exceptions=True)
        self._now.clear()
        if isinstance(outcome, Exception):
            # the final answer still goes out through finish(); a lost progress update is cosmetic
            logger.warning("showing the reply so far failed: %r", outcome)


class ShownRecorder:
    """Stores what each request's stream shows, many updates per transaction.

    `record()` returns once the value is committed (or the write failed: what a stream
    shows is a courtesy for after a restart, never a reason to hold up an answer)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: dict[int, Any] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    async def record(self, request_id: int, shown: Any) -> None:
        self._pending[request_id] = shown
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._write(), name="yanray-shown-writer")
        await asyncio.shield(waiter)

    async def flush(self) -> None:
        """Wait for the writes under way (before the database closes)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            waiters, self._waiters = self._waiters, []
            try:
                async with self.db.transaction() as session:
                    for request_id, shown in batch.items():
                        await crud.set_shown(session=session, request_id=request_id, shown=shown)
            except Exception:
                logger.warning("could not store which messages show %d answers", len(batch), exc_info=True)
            finally:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)


class EngineWorker:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        engine: Engine,
        queue: RequestQueue,
        tools: Mapping[str, Tool],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.db = db
        self.engine = engine
        self.queue = queue
        self.tools = tools
        self.metrics = metrics
        self.loop = ToolLoop(
            tools=tools,
            max_rounds=settings.tool_rounds,
            on_tool=metrics.tool_called,
            on_round=metrics.tokens_generated,
            max_context=engine.max_context,
        )
        self.adapters: dict[str, Adapter] = {}
        self.shown = ShownRecorder(db)
        #: this process's claims on the requests it answers (several processes on PostgreSQL)
        self.claims = Claims(db=db, lease=settings.claim_lease)
        self.idle = asyncio.Event()
        self.idle.set()
        #: jobs answered at once: YANRAY_MAX_BATCH, else what the engine batches (1 if it does not say)
        self.slots = settings.max_batch or max(1, int(getattr(engine, "max_batch", 1)))
        queue.slots = self.slots
        self._slot_freed = asyncio.Event()
        #: final answers on their way to the platforms
        self.deliveries: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Answer jobs forever, up to `slots` at once, each taken in the queue's fair order
        when a slot frees. Cancelling this cancels the answers being written."""
        answering: set[asyncio.Task[None]] = set()
        try:
            while True:
                while len(self.queue.active) >= self.slots:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                job = await self.queue.get()
                self.queue.begin(job)
                self.metrics.waited(time.monotonic() - job.queued_at)
                self.idle.clear()
                task = asyncio.create_task(self._answer(job), name=f"yanray-request-{job.request_id}")
                answering.add(task)
                task.add_done_callback(answering.discard)
        finally:
            for task in answering:
                task.cancel()
            if answering:
                await asyncio.gather(*answering, return_exceptions=True)

    async def _answer(self, job: Job) -> None:
        try:
            await self.process(job)
        except Exception:
            # storage or an adapter failed outside generation; this worker goes on
            logger.exception("request %d: could not be processed", job.request_id)
            await self._give_up(job)
        finally:
            self.queue.end(job)
            self._slot_freed.set()
            if not len(self.queue) and not self.queue.active:
                self.idle.set()

    def cancel_running(
        self, conversation_id: int, *, reason: str = N_("Stopped."), asker: str | None = None
    ) -> Job | None:
        """Cancel the answer being written for this conversation (only if `asker` asked it, if
        given); `reason` is a msgid, told in the job's language."""
        for job in self.queue.active:
            if job.conversation_id == conversation_id and (asker is None or job.asker == asker):
                job.cancel_reason = translator(job.language).gettext(reason)
                job.cancel.set()
                return job
        return None

    def question_room(self, base_prompt: str) -> tuple[int, int]:
        """(tokens the instructions take, tokens left for the history and the question)
        with `base_prompt` as the system prompt and the reply's tokens reserved. Blocking:
        for start-up; a request uses `measure_room`."""
        system, specs = self._instructions(base_prompt)
        return self._room(self.engine.count_tokens([system], specs))

    async def measure_room(self, base_prompt: str) -> tuple[int, int]:
        """`question_room`, counted off the event loop (new instructions are people's text)."""
        system, specs = self._instructions(base_prompt)
        return self._room(await self.engine.count([system], specs))

    def _instructions(self, base_prompt: str) -> tuple[ChatMessage, list[ToolSpec]]:
        tools = list(self.tools.values()) if self.settings.tool_rounds > 0 else []
        specs = [t.spec for t in tools] if self.engine.native_tools else []
        return ChatMessage(
            "system", system_prompt(base_prompt, tools, native=self.engine.native_tools)
        ), specs

    def _room(self, fixed: int) -> tuple[int, int]:
        return fixed, self.engine.max_context - self.settings.max_new_tokens - fixed

    def track(self, request_id: int, out: ReplyStream) -> None:
        """Have `out` report what it shows for this stored request (see `ReplyStream.watch`)."""
        out.watch(functools.partial(self.shown.record, request_id))

    async def recover(self) -> int:
        """Take over what a previous run left unanswered (at start-up); returns how many requests
        were queued again. On SQLite, everything (this is its one process); on PostgreSQL, what
        no live process holds."""
        return await self.take_over(start=True)

    async def take_over(self, *, start: bool = False) -> int:
        """Claim requests nobody holds and finish them: queue the unanswered ones again, deliver
        the stored but undelivered ones. A request that runs kept dying on (MAX_ATTEMPTS) is
        closed as failed instead, with one line. After the start (`Claims.run`), only as many
        as keep this process's waiting line at `slots`, so a busy process leaves them to idle
        ones. Returns how many requests were queued again."""
        everything = start and self.claims.exclusive
        limit = None
        if not start:
            limit = min(self.settings.queue_max, self.slots) - len(self.queue)
            if limit <= 0:
                return 0
        async with self.db.transaction() as session:
            pending = await crud.take_over(
                session=session,
                owner=self.claims.owner,
                lease=self.claims.lease,
                platforms=None if everything else list(self.adapters),
                limit=limit,
                everything=everything,
            )
        count = 0
        for request in pending:
            platform = str(request.route.get("platform", ""))
            adapter = self.adapters.get(platform)
            if adapter is None:
                logger.warning(
                    "request %d waits for the %s adapter, which is not running", request.id, platform
                )
                continue
            if self.queue.find(request.id) is not None or self.queue.running_job(request.id) is not None:
                continue  # accepted by this run while the adapters were starting
            route = dict(request.route)
            if request.shown is not None:
                route["shown"] = request.shown
            out = adapter.reopen(route)
            self.track(request.id, out)
            language = normalize(str(request.route.get("language", "")))  # "en" if stored without
            if request.status in ("done", "failed"):
                await self._hand_over(
                    self._deliver(
                        request.id, out, request.reply_text, request.status == "done", request.error, language
                    ),
                    wait=start,
                )
                continue
            interrupted = translator(language).gettext(INTERRUPTED)
            async with self.db.transaction() as session:
                poisoned = await crud.fail_interrupted(
                    session=session, request_id=request.id, max_attempts=MAX_ATTEMPTS, error=interrupted
                )
                if not poisoned:
                    await crud.requeue(session=session, request_id=request.id)
            if poisoned:
                logger.error(
                    "request %d: the process stopped while answering it %d times; closed as failed",
                    request.id,
                    request.attempts,
                )
                self.metrics.request_finished("failed")
                await self._hand_over(
                    self._deliver(request.id, out, None, False, interrupted, language), wait=start
                )
                continue
            asker = str(request.route.get("asker", ""))
            job = Job(request.id, request.conversation_id, out, asker=asker, language=language)
            self.queue.put(job, reserved=False)
            count += 1
        if count:
            logger.info("re-queued %d requests left unanswered by the last run or another process", count)
        return count

    async def _hand_over(self, delivery: Coroutine[Any, Any, None], *, wait: bool) -> None:
        """Deliver an answer found stored: at the start, before the worker runs; later (a take-over
        while this process answers), in the background, so that its leases are renewed on time."""
        if wait:
            await delivery
            return
        task = asyncio.create_task(delivery)
        self.deliveries.add(task)
        task.add_done_callback(self.deliveries.discard)

    async def process(self, job: Job) -> None:
        async with self.db.transaction() as session:  # short: the write lock is not held for reading
            request = await crud.start_request(
                session=session, request_id=job.request_id, owner=self.claims.owner, lease=self.claims.lease
            )
            if request is None:
                return  # cancelled while it waited, or another process took it over
            conversation = await crud.get_conversation(session=session, conversation_id=job.conversation_id)
            assert conversation is not None
            turn = request.user_message_id
            base_prompt = conversation.system_prompt or self.settings.default_prompt(job.language)
        try:
            await job.out.started()
        except Exception:  # showing "typing" is cosmetic; the answer still goes out
            logger.exception("request %d: the platform refused the typing notice", job.request_id)
        limit = self.settings.request_timeout
        timed_out = False
        tr = translator(job.language)

        def deadline() -> None:
            # stop the answer the way /stop does, so what was written so far is kept and shown
            nonlocal timed_out
            if not job.cancel.is_set():
                timed_out = True
                job.cancel.set()

        timer = asyncio.get_running_loop().call_later(limit, deadline)
        try:
            async with asyncio.timeout(limit + HARD_STOP_GRACE_S):
                try:
                    result = await self._generate(job, conversation, turn, base_prompt)
                finally:
                    timer.cancel()  # storing and delivering are not part of the answer's time
        except ContextTooLong as exc:
            await self._close(job, "failed", error=exc.say(job.language))
        except TimeoutError:
            job.cancel.set()
            logger.warning("request %d: the engine did not stop at the time limit", job.request_id)
            error = tr.gettext("That took too long (over {seconds} s) and was stopped.").format(
                seconds=f"{limit:g}"
            )
            await self._close(job, "failed", error=error)
        except EngineError as exc:
            logger.warning("request %d: engine error: %s", job.request_id, exc)
            await self._close(job, "failed", error=str(exc))
        except Exception:
            logger.exception("request %d failed unexpectedly", job.request_id)
            await self._close(job, "failed", error=tr.gettext(APOLOGY))
        else:
            if timed_out:
                logger.info("request %d: stopped at the time limit of %g s", job.request_id, limit)
                note = tr.gettext("Stopped: that took longer than {seconds} s.").format(seconds=f"{limit:g}")
                await self._close(job, "done", rounds=result, turn=turn, note=note)
            # cancelled while the answer was being stored counts too: a /stop, or an edit whose
            # new request has already set this answer aside
            elif result.finish == "cancelled" or job.cancel.is_set():
                await self._close(job, "cancelled", error=job.cancel_reason, rounds=result, turn=turn)
            elif result.finish == "length":
                note = tr.gettext("Cut short: the answer reached its limit of {tokens} tokens.").format(
                    tokens=f"{self.settings.max_new_tokens:,}"
                )
                await self._close(job, "done", rounds=result, turn=turn, note=note)
            else:
                await self._close(job, "done", rounds=result, turn=turn)

    async def _load_history(
        self, conversation: Conversation, turn: int, system: ChatMessage, specs: list[ToolSpec]
    ) -> list[ChatMessage]:
        """The prompt's messages: the system message and the newest history the engine fits in
        the token budget. Read back a page at a time, in read-only transactions that take no
        write lock, so a long conversation is not read back whole for every question; the
        engine counts (off the event loop) and fits."""
        budget = self.engine.max_context - self.settings.max_new_tokens
        limit = HISTORY_PAGE
        while True:
            async with self.db.reading() as session:
                stored = await crud.context_messages(
                    session=session, conversation=conversation, up_to_turn=turn, newest=limit
                )
            history = [to_chat(m) for m in stored]
            try:
                messages = await self.engine.fit(system, history, specs, budget)
            except PromptTooLong as exc:
                raise too_long(exc) from None
            if len(stored) < limit or len(messages) <= len(history):  # all read, or some cut
                return messages
            limit *= 4

    async def _generate(
        self, job: Job, conversation: Conversation, turn: int, base_prompt: str
    ) -> LoopResult:
        begun = time.monotonic()  # time to first token: reading and fitting the history count
        tools = list(self.tools.values()) if self.settings.tool_rounds > 0 else []
        specs = [t.spec for t in tools] if self.engine.native_tools else []
        system = ChatMessage("system", system_prompt(base_prompt, tools, native=self.engine.native_tools))
        messages = await self._load_history(conversation, turn, system, specs)

        def options() -> GenerateOptions:
            return GenerateOptions(
                max_new_tokens=self.settings.max_new_tokens,
                temperature=self.settings.temperature,
                cancel=job.cancel,
            )

        progress = _Progress(job.out)
        first = True

        def on_visible(visible: Callable[[], str]) -> None:
            nonlocal first
            if first:  # the answer's first text: its time to first token
                first = False
                self.metrics.first_text(time.monotonic() - begun)
            progress.update(visible)

        async def show(images: Sequence[Image]) -> str | None:
            # the text so far first: the picture comes below it, and the answer continues below
            await progress.drain()
            for image in images:
                try:
                    await job.out.image(image)
                except (DeliveryRefused, AdapterStopped) as exc:
                    logger.warning("request %d: an image could not be sent: %s", job.request_id, exc)
                    return "the chat service did not take the picture"
                except Exception:  # a picture never costs the answer: it goes on without it
                    logger.exception("request %d: an image could not be sent", job.request_id)
                    return "the chat service did not take the picture"
            return None

        session = await self.engine.start(messages, specs)
        try:
            return await self.loop.run(session, options=options, on_visible=on_visible, on_images=show)
        finally:
            await session.close()
            await progress.drain()

    async def _close(
        self,
        job: Job,
        status: str,
        *,
        error: str | None = None,
        rounds: LoopResult | None = None,
        turn: int = 0,
        note: str | None = None,
    ) -> None:
        """Store the outcome in one transaction, then deliver it. A `note` (the answer was cut
        short) ends the reply as one bracketed line; it is stored with the reply, so a restart
        delivers the same text, while the conversation keeps only what the model wrote."""
        reply = rounds.visible if rounds is not None else None
        unsent = unsent_note(rounds, job.language) if rounds is not None and status == "done" else None
        if unsent is not None:
            note = f"{note} {unsent}" if note else unsent
        if note is not None:
            reply = f"{reply}\n\n[{note}]" if reply else f"[{note}]"
        if status == "done" and not (reply and reply.strip()):
            reply = translator(job.language).gettext(NO_ANSWER)
        async with self.db.transaction() as session:
            request = await crud.get_request(session=session, request_id=job.request_id, lock=True)
            if request is None:
                return
            if request.claimed_by not in (None, self.claims.owner):
                # this process did not renew its claim in time (stalled, cut off from the
                # database) and another one took the request over: its answer counts
                logger.warning(
                    "request %d: another process took it over; this answer is dropped", job.request_id
                )
                return
            if rounds is not None:
                await self._store_rounds(session, request.conversation_id, job.request_id, turn, rounds)
            await crud.finish_request(
                session=session, request_id=job.request_id, status=status, reply_text=reply, error=error
            )
        self.metrics.request_finished(status)
        if status == "cancelled":
            # Delivered before this conversation's next job starts: an edit's new answer reuses this message.
            # What was already written stays, marked as cut short.
            cut = f"{reply}\n\n[{error}]" if reply and reply.strip() else None
            await self._deliver(job.request_id, job.out, cut, cut is not None, error, job.language)
            return
        # Delivery can wait on a platform's rate limit (a group's edit slot); the engine need
        # not: the final text goes out in the background while the next job runs.
        task = asyncio.create_task(
            self._deliver(job.request_id, job.out, reply, status == "done", error, job.language)
        )
        self.deliveries.add(task)
        task.add_done_callback(self.deliveries.discard)

    async def _store_rounds(
        self, session: Any, conversation_id: int, request_id: int, turn: int, result: LoopResult
    ) -> None:
        for round_ in result.rounds:
            if round_.text:
                name = round_.tool_name if round_.native else ""  # a slash call is plain text
                await crud.add_message(
                    session=session,
                    conversation_id=conversation_id,
                    role="assistant",
                    text=round_.text,
                    turn=turn,
                    tool_name=name,
                    request_id=request_id,
                )
            if round_.observation is not None:
                await crud.add_message(
                    session=session,
                    conversation_id=conversation_id,
                    role="tool",
                    text=round_.observation,
                    turn=turn,
                    tool_name=round_.tool_name,
                    request_id=request_id,
                )

    async def _give_up(self, job: Job) -> None:
        """Close a request that broke outside generation as failed, with an apology; if even
        that fails (the database is gone), it stays in the journal for the next start."""
        apology = translator(job.language).gettext(APOLOGY)
        try:
            await self._close(job, "failed", error=apology)
        except Exception:
            logger.exception(
                "request %d: could not be closed; it is retried at the next start", job.request_id
            )
            try:
                await job.out.fail(apology)
            except Exception:
                logger.exception("request %d: could not tell the user either", job.request_id)

    async def _deliver(
        self,
        request_id: int,
        out: ReplyStream,
        reply: str | None,
        ok: bool,
        error: str | None,
        language: str,
    ) -> None:
        try:
            if ok and reply is not None:
                await out.finish(reply)
            else:
                await out.fail(error or translator(language).gettext(APOLOGY))
        except DeliveryRefused as exc:
            # retrying cannot help: the user hears why in one line, and it counts as delivered
            logger.error("request %d: the answer could not be delivered", request_id, exc_info=exc)
            try:
                await out.send(translator(language).gettext(UNDELIVERABLE))
            except Exception as again:
                logger.warning("request %d: the apology could not be sent either: %r", request_id, again)
        except Exception:
            # The adapter could not deliver (it logged why); the answer stays stored and undelivered.
            logger.exception("request %d: the answer could not be delivered", request_id)
            return
        async with self.db.transaction() as session:
            await crud.mark_delivered(session=session, request_id=request_id)
