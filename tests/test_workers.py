"""Several `yanray run` processes on one PostgreSQL database (Telegram webhook, openai engine):
each request is answered once, and one that a killed process held is answered by another
after its lease.

Real separate processes (`python -m yanray.bot.cli run`), each with its own webhook port,
in front of the fake Bot API and the fake OpenAI server of this test process; and two cores
in this process for the hand-over at a stop. They run in
the PostgreSQL pass (`scripts/postgres-tests.sh`); without TEST_POSTGRES_URL they are
skipped, since SQLite takes one process (tests/test_start.py checks that refusal).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.telegram_server import FakeTelegram
from tests.recording import RecordingAdapter
from tests.scripted_engine import ScriptedEngine
from tests.test_cli import env, spawn
from tests.test_core import ask
from tests.test_observe import samples
from tests.waiting import until
from yanray.storage import Database, crud

pytestmark = pytest.mark.skipif(
    not os.environ.get("TEST_POSTGRES_URL"), reason="several workers need PostgreSQL (TEST_POSTGRES_URL)"
)

SECRET = "workers-secret"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Worker:
    """One `yanray run` process and what it wrote to standard error."""

    process: asyncio.subprocess.Process
    hook: str
    #: its own /healthz and /metrics (each process has its own listener, on its own port)
    status: str
    log: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return any("Yanray is running" in line for line in self.log)

    async def read_log(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.log.append(line.decode(errors="replace").rstrip())


@asynccontextmanager
async def workers(
    count: int, tmp_path: Path, database_url: str, telegram: FakeTelegram, openai: FakeOpenAI, **extra: str
) -> AsyncIterator[list[Worker]]:
    """`count` processes started together (their migrations race, as in a deployment), until
    each says it is running; stopped with SIGTERM at the end (a killed one is left as it is)."""
    started: list[Worker] = []
    try:
        for index in range(count):
            port, status_port = _free_port(), _free_port()
            hook = f"http://127.0.0.1:{port}/hook"
            environ = env(
                tmp_path / f"worker{index}",
                YANRAY_DATABASE_URL=database_url,
                YANRAY_ENGINE="openai",
                YANRAY_OPENAI_BASE_URL=openai.base_url,
                YANRAY_TELEGRAM_TOKEN=telegram.token,
                YANRAY_TELEGRAM_BASE_URL=telegram.base_url,
                YANRAY_TELEGRAM_WEBHOOK_URL=hook,
                YANRAY_TELEGRAM_WEBHOOK_LISTEN="127.0.0.1",
                YANRAY_TELEGRAM_WEBHOOK_PORT=str(port),
                YANRAY_TELEGRAM_WEBHOOK_SECRET=SECRET,
                YANRAY_TOOLS="",
                YANRAY_RATE_LIMIT_PER_MINUTE="0",
                YANRAY_TELEGRAM_EDIT_INTERVAL="0.1",
                YANRAY_HTTP_LISTEN=f"127.0.0.1:{status_port}",
                **extra,
            )
            process = await spawn(["run"], environ, tmp_path, pipe_in_out=False)
            worker = Worker(process, hook, f"http://127.0.0.1:{status_port}")
            worker.reader = asyncio.create_task(worker.read_log())
            started.append(worker)
        for worker in started:
            await until(
                lambda w=worker: w.running or w.process.returncode is not None,
                within=120,
                what="the worker says it is running",
            )
            assert worker.running, "\n".join(worker.log)
        yield started
    finally:
        for worker in started:
            if worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in started:
            await asyncio.wait_for(worker.process.wait(), 60)
            if worker.reader is not None:
                await worker.reader


async def post(
    http: aiohttp.ClientSession, worker: Worker, telegram: FakeTelegram, user: int, text: str
) -> None:
    """`user` writes `text` in their private chat, and Telegram posts it to `worker`'s webhook."""
    telegram.private_text(user, text)
    _update_id, update = telegram.updates[-1]
    async with http.post(worker.hook, json=update, headers={SECRET_HEADER: SECRET}) as response:
        assert response.status == 200


async def rows(database_url: str) -> list[dict[str, Any]]:
    """The stored requests with their questions, oldest first, read straight from PostgreSQL."""
    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        records = await connection.fetch(
            "SELECT r.id, r.status, r.delivered, r.attempts, r.claimed_by, r.shown, m.text"
            " FROM requests r JOIN messages m ON m.id = r.user_message_id ORDER BY r.id"
        )
    finally:
        await connection.close()
    return [dict(record) for record in records]


async def stored_when(
    database_url: str, condition: Callable[[list[dict[str, Any]]], bool], *, within: float, what: str
) -> list[dict[str, Any]]:
    """The stored requests once `condition` holds for them; fails the test after `within` s."""
    stored: list[dict[str, Any]] = []

    async def met() -> bool:
        stored[:] = await rows(database_url)
        return condition(stored)

    await until(met, within=within, what=what, every=0.05)
    return stored


def answer_to(messages: list[dict[str, Any]]) -> str:
    return f"answer to {messages[-1]['content']}"


def asked(openai: FakeOpenAI) -> list[str]:
    return [request["messages"][-1]["content"] for request in openai.requests]


async def test_two_workers_answer_200_requests_each_exactly_once(tmp_path: Path, database_url: str) -> None:
    users = range(1001, 1201)
    async with (
        FakeTelegram() as telegram,
        FakeOpenAI(responder=answer_to) as openai,
        workers(2, tmp_path, database_url, telegram, openai, YANRAY_MAX_BATCH="8") as (one, two),
        aiohttp.ClientSession() as http,
    ):
        gate = asyncio.Semaphore(16)  # Telegram posts to a webhook a few connections at a time

        async def ask(index: int, user: int) -> None:
            async with gate:
                await post(http, (one, two)[index % 2], telegram, user, f"question {user}")

        await asyncio.gather(*(ask(index, user) for index, user in enumerate(users)))

        await until(
            lambda: all(telegram.messages(user) for user in users),
            within=180,
            what="every user has an answer",
        )
        stored = await stored_when(
            database_url,
            lambda rs: len(rs) == 200 and all(r["delivered"] for r in rs),
            within=30,
            what="all 200 requests delivered",
        )
        # each process counts what it answered itself: scraped one by one, they add up
        done = []
        for worker in (one, two):
            async with http.get(f"{worker.status}/healthz") as response:
                assert response.status == 200, await response.text()
            async with http.get(f"{worker.status}/metrics") as response:
                found = samples(await response.text())
            done.append(found[("yanray_requests_total", (("status", "done"),))])
        assert done == [100, 100]
    # each user sees exactly one message, their answer; the model was asked each question once
    assert {user: telegram.messages(user) for user in users} == {
        user: [f"answer to question {user}"] for user in users
    }
    assert sorted(asked(openai)) == sorted(f"question {user}" for user in users)
    assert len(stored) == 200
    assert {(r["status"], r["delivered"], r["attempts"]) for r in stored} == {("done", True, 1)}
    # each process answered what it accepted: the questions posted to one are one's claims
    owners = {r["text"]: r["claimed_by"] for r in stored}
    first = {owners[f"question {user}"] for index, user in enumerate(users) if index % 2 == 0}
    second = {owners[f"question {user}"] for index, user in enumerate(users) if index % 2 == 1}
    assert len(first) == len(second) == 1 and first != second and None not in first | second
    assert one.process.returncode == two.process.returncode == 0
    assert not [line for w in (one, two) for line in w.log if "Traceback" in line or "ERROR" in line], (
        "\n".join(one.log + two.log)
    )


async def test_requests_a_killed_worker_held_are_answered_by_the_other_after_the_lease(
    tmp_path: Path, database_url: str
) -> None:
    released = asyncio.Event()

    async def responder(messages: list[dict[str, Any]]) -> str:
        if messages[-1]["content"].startswith("hold") and not released.is_set():
            await released.wait()  # the first worker dies while answering
        return answer_to(messages)

    held = [2001, 2002, 2003, 2004]
    async with (
        FakeTelegram() as telegram,
        FakeOpenAI(responder=responder) as openai,
        # a short lease, renewed every 2/3 s; two at a time, so two of the four wait in the queue
        workers(
            2, tmp_path, database_url, telegram, openai, YANRAY_CLAIM_LEASE="2", YANRAY_MAX_BATCH="2"
        ) as (
            doomed,
            survivor,
        ),
        aiohttp.ClientSession() as http,
    ):
        for user in held:
            await post(http, doomed, telegram, user, f"hold {user}")
        await post(http, survivor, telegram, 2100, "still there?")
        await until(lambda: telegram.messages(2100), within=30, what="the survivor answers its own question")
        await until(lambda: len(openai.requests) == 3, within=30, what="the doomed worker is answering two")
        claimed = await stored_when(
            database_url,
            lambda rs: (
                sorted(r["status"] for r in rs if r["text"].startswith("hold"))
                == ["queued", "queued", "running", "running"]
            ),
            within=30,
            what="the doomed worker answers two held questions and holds two in its queue",
        )
        doomed_owner = {r["claimed_by"] for r in claimed if r["text"].startswith("hold")}
        assert len(doomed_owner) == 1
        doomed.process.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(doomed.process.wait(), 30) == -signal.SIGKILL
        released.set()
        await until(
            lambda: all(telegram.messages(user) == [f"answer to hold {user}"] for user in held),
            within=60,
            what="the survivor answers what the killed worker held",
        )
        stored = await stored_when(
            database_url,
            lambda rs: all(r["delivered"] for r in rs),
            within=30,
            what="every request delivered",
        )
    assert {user: telegram.messages(user) for user in held} == {
        user: [f"answer to hold {user}"] for user in held
    }
    assert telegram.messages(2100) == ["answer to still there?"]
    survivor_owner = {r["claimed_by"] for r in stored if r["text"] == "still there?"}
    assert {r["claimed_by"] for r in stored} == survivor_owner and survivor_owner != doomed_owner
    # the two the killed worker was answering count that start (crash-retry limit); the two it
    # only held in its queue were started once, by the survivor
    attempts = sorted(r["attempts"] for r in stored if r["text"].startswith("hold"))
    assert attempts == [1, 1, 2, 2]
    assert {r["status"] for r in stored} == {"done"}
    # the model was asked each held question again only once, by the survivor
    assert sorted(q for q in asked(openai) if q.startswith("hold")) == sorted(
        [f"hold {user}" for user in held] + [f"hold {user}" for user in held[:2]]
    )


async def test_a_stopping_process_gives_up_what_it_holds_and_another_answers_it(
    make_settings: Any, core_factory: Any
) -> None:
    """Two cores on one database stand in for two processes. The first stops (SIGTERM) with one
    question being answered and two waiting: it releases them with their starts given back,
    and the second answers all three at its start, through their stored routes."""
    settings = make_settings(tools=[], claim_lease=60)  # only the release can hand them over
    first = ScriptedEngine(responder=lambda m: "never")
    hang = asyncio.Event()
    first.before_reply = hang.wait  # type: ignore[assignment]
    stopping = await core_factory(settings, first)
    for text in ("one", "two", "three"):
        await ask(stopping, text)
    await until(lambda: first.prompts, what="the first process answers the first question")
    async with stopping.db.transaction() as session:
        held = {r.claimed_by for r in await crud.pending_requests(session=session)}
    assert held == {stopping.worker.claims.owner}
    await stopping.aclose()
    db = await Database.open(settings.resolved_database_url)
    try:
        async with db.transaction() as session:
            left = list(await crud.pending_requests(session=session))
    finally:
        await db.close()
    assert [(r.status, r.attempts, r.claimed_by) for r in left] == [
        ("running", 0, None),
        ("queued", 0, None),
        ("queued", 0, None),
    ]

    adapter = RecordingAdapter("test")
    second = ScriptedEngine(responder=lambda m: f"answer to {m[-1].content}")
    taking = await core_factory(settings, second, adapters=(adapter,))
    answers = sorted([await stream.wait() or "" for _route, stream in adapter.reopened])
    assert answers == ["answer to one", "answer to three", "answer to two"]
    await taking.wait_idle()
    async with taking.db.transaction() as session:
        done = [await crud.get_request(session=session, request_id=r.id) for r in left]
    assert [(r.status, r.attempts, r.claimed_by) for r in done if r is not None] == [
        ("done", 1, taking.worker.claims.owner)
    ] * 3
