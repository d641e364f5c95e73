"""The request queue: one line in front of the engine, fair across conversations.

Round-robin by conversation, done as start-time fair queuing: each job gets a tag, the
larger of the tag being served now and its conversation's previous tag plus one, and the
smallest tag runs next (ties in arrival order). So conversations take turns, and a
person who arrives while another's burst of 50 is being answered goes next: their one
message waits at most for the engine turn already running. Bounded overall and per conversation: `reserve()`
raises `QueueFull` before anything is stored, so the caller can answer "busy" and keep
nothing half-accepted. A reservation becomes a job with `put()` once the request is
committed to storage (the journal), or is given back with `release()`.

The engine answers up to `slots` jobs at once (`YANRAY_MAX_BATCH`; the worker sets it). The
jobs being answered are `active`; `get()` hands out the next job in fair order whose
conversation has no answer being written (a conversation's next question needs the answer
before it), so whenever a slot frees the next job goes out in fair order, and a burst from
one conversation never holds a slot another conversation could use.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import threading
import time
from dataclasses import dataclass, field

from yanray.bot.errors import QueueFull
from yanray.bot.i18n import DEFAULT_LANGUAGE, lazy_gettext, lazy_ngettext
from yanray.bot.types import ReplyStream


@dataclass(eq=False)
class Job:
    """One stored request waiting for, or being answered by, the engine."""

    request_id: int
    conversation_id: int
    out: ReplyStream
    cancel: threading.Event = field(default_factory=threading.Event)
    #: what the user is told when the job is cancelled (in `language`)
    cancel_reason: str = "Stopped."
    #: who asked ("platform:user id"), so that in a shared conversation /stop stops only
    #: the asker's own answers; "" when unknown (a request stored by an older Yanray)
    asker: str = ""
    #: the language the core's own texts about this job are written in ("en", "zh")
    language: str = DEFAULT_LANGUAGE
    #: when it was queued (`time.monotonic()`), for the queue-wait metric
    queued_at: float = field(default_factory=time.monotonic)


class RequestQueue:
    def __init__(self, *, max_total: int, max_per_conversation: int) -> None:
        self.max_total = max_total
        self.max_per_conversation = max_per_conversation
        self._jobs: list[tuple[int, int, Job]] = []  # (tag, arrival, job), kept sorted
        self._next_tag: dict[int, int] = {}  # per conversation: the tag its next job starts from
        self._serving_tag = 0
        self._arrivals = itertools.count()
        self._reserved: dict[int, int] = {}
        self._ready = asyncio.Event()
        #: the jobs being answered, in the order they started
        self.active: list[Job] = []
        #: jobs answered at once, at most
        self.slots = 1

    @property
    def running(self) -> Job | None:
        """The oldest job being answered, or None when none is."""
        return self.active[0] if self.active else None

    def running_job(self, request_id: int) -> Job | None:
        return next((job for job in self.active if job.request_id == request_id), None)

    def begin(self, job: Job) -> None:
        """`job` (handed out by `get()`) is being answered."""
        self.active.append(job)

    def end(self, job: Job) -> None:
        """`job` is no longer being answered: its slot, and its conversation, are free."""
        if job in self.active:
            self.active.remove(job)
        self._ready.set()

    def __len__(self) -> int:
        return len(self._jobs)

    def _waiting(self, conversation_id: int) -> int:
        return sum(1 for _t, _a, job in self._jobs if job.conversation_id == conversation_id)

    def reserve(self, conversation_id: int) -> None:
        """Claim a place for a request about to be stored, or raise `QueueFull`."""
        if len(self._jobs) + sum(self._reserved.values()) >= self.max_total:
            raise QueueFull(
                lazy_gettext("I'm busy with many requests right now; please try again in a few minutes.")
            )
        mine = self._waiting(conversation_id) + self._reserved.get(conversation_id, 0)
        mine += sum(1 for job in self.active if job.conversation_id == conversation_id)
        if mine >= self.max_per_conversation:
            raise QueueFull(
                lazy_ngettext(
                    "You already have {count} request waiting; wait for its answer (or /stop it) first.",
                    "You already have {count} requests waiting; wait for their answers (or /stop them) first.",
                    mine,
                    count=mine,
                )
            )
        self._reserved[conversation_id] = self._reserved.get(conversation_id, 0) + 1

    def release(self, conversation_id: int) -> None:
        left = self._reserved.get(conversation_id, 0) - 1
        if left > 0:
            self._reserved[conversation_id] = left
        else:
            self._reserved.pop(conversation_id, None)

    def put(self, job: Job, *, reserved: bool = True) -> int:
        """Queue a job (turning its reservation into a place); returns its position (0: runs now)."""
        if reserved:
            self.release(job.conversation_id)
        tag = max(self._serving_tag, self._next_tag.get(job.conversation_id, 0))
        self._next_tag[job.conversation_id] = tag + 1
        bisect.insort(self._jobs, (tag, next(self._arrivals), job), key=lambda entry: entry[:2])
        self._ready.set()
        return self.position(job)

    async def get(self) -> Job:
        """The next job in fair order whose conversation has no answer being written; waits
        while there is none."""
        while True:
            busy = {job.conversation_id for job in self.active}
            for index, (tag, _arrival, job) in enumerate(self._jobs):
                if job.conversation_id not in busy:
                    del self._jobs[index]
                    self._serving_tag = max(self._serving_tag, tag)
                    return job
            self._ready.clear()
            await self._ready.wait()

    def schedule(self) -> list[Job]:
        """Every waiting job in the order it will run."""
        return [job for _t, _a, job in self._jobs]

    def position(self, job: Job) -> int:
        """`job`'s place in line: 0 when a free slot takes it now, 1 when it goes out at the
        next free slot (or once its conversation's answer being written is done), n when
        n - 1 waiting requests go out before it."""
        ahead = self.schedule().index(job)
        free = max(0, self.slots - len(self.active))
        place = max(0, ahead + 1 - free)
        if place == 0 and any(a.conversation_id == job.conversation_id for a in self.active):
            return 1  # a free slot cannot take it: it waits for its conversation's answer
        return place

    def remove(self, job: Job) -> bool:
        for index, (_t, _a, queued) in enumerate(self._jobs):
            if queued is job:
                del self._jobs[index]
                return True
        return False

    def cancel_conversation(self, conversation_id: int, *, asker: str | None = None) -> list[Job]:
        """Take the waiting jobs of a conversation (only `asker`'s, if given) out of the queue."""

        def taken(job: Job) -> bool:
            return job.conversation_id == conversation_id and (asker is None or job.asker == asker)

        jobs = [job for _t, _a, job in self._jobs if taken(job)]
        self._jobs = [entry for entry in self._jobs if not taken(entry[2])]
        return jobs

    def find(self, request_id: int) -> Job | None:
        return next((job for _t, _a, job in self._jobs if job.request_id == request_id), None)
