"""Observability: /metrics and /healthz over the real HTTP listener, JSON logs, /stats.

The metrics are scraped with a real HTTP request from the listener on an ephemeral port,
after conversations through the real Telegram adapter (PTB against the fake Bot API, whose
flood injection gives the 429), the real worker, tool loop and calculator, and a scripted
engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.telegram_harness import running_bot, telegram_settings
from tests.fakes.telegram_server import FakeTelegram
from tests.hooks import ForwardCalls
from tests.recording import RecordingAdapter, RecordingStream
from tests.scripted_engine import ScriptedEngine
from tests.test_i18n import said
from yanray.bot.listener import StatusListener
from yanray.bot.metrics import Metrics
from yanray.bot.settings import Settings
from yanray.engine.base import ChatMessage
from yanray.storage import Database

pytestmark = pytest.mark.asyncio

ALICE, BOB, CAROL = 3001, 3002, 3003


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition: (name, sorted labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def get(listener: StatusListener, path: str) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{listener.port}{path}") as response,
    ):
        return response.status, response.headers["Content-Type"], await response.text()


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


def calculating(messages: list[ChatMessage]) -> str:
    """Asked to calculate: calls the calculator, then answers with its result."""
    last = messages[-1]
    if last.role == "observation":
        return f"It is {last.content.removeprefix('Tools:').strip()}."
    if "calculate" in last.content:
        return "/calculate 6*7\n"
    return "Hello there."


async def test_metrics_count_requests_tools_tokens_and_a_429_with_their_labels(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = ScriptedEngine(responder=calculating, piece=3)
    settings = telegram_settings(fake, make_settings(), tools=["calculate"])
    async with running_bot(fake, settings, engine) as bot:
        listener = StatusListener("127.0.0.1", 0, metrics=bot.core.metrics)
        async with listener:
            listener.attach(engine=engine, db=bot.core.db, adapters=[bot.adapter])
            status, _type, before = await get(listener, "/metrics")
            assert status == 200
            assert samples(before)[("yanray_requests_total", (("status", "done"),))] == 0

            fake.fail("sendMessage", "flood", retry_after=1)  # Alice's answer meets a 429 first
            fake.private_text(ALICE, "hi")
            await fake.wait_for(lambda: fake.messages(ALICE) == ["Hello there."], within=8)
            fake.private_text(BOB, "please calculate six times seven")
            await fake.wait_for(lambda: fake.messages(BOB) == ["It is 42."], within=15)
            engine.fail_with = "The model broke."
            fake.private_text(CAROL, "hi")
            await fake.wait_for(lambda: any("The model broke." in m for m in fake.messages(CAROL)), within=8)
            await bot.settled()

            status, content_type, text = await get(listener, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    found = samples(text)
    assert found[("yanray_requests_total", (("status", "done"),))] == 2
    assert found[("yanray_requests_total", (("status", "failed"),))] == 1
    assert found[("yanray_requests_total", (("status", "cancelled"),))] == 0
    assert found[("yanray_tool_calls_total", (("outcome", "ok"), ("tool", "calculate")))] == 1
    assert found[("yanray_platform_errors_total", (("kind", "rate_limited"), ("platform", "telegram")))] == 1
    assert found[("yanray_queue_wait_seconds_count", ())] == 3
    # the answers with text: Alice's and Bob's (Carol's engine failed before any text)
    assert found[("yanray_time_to_first_token_seconds_count", ())] == 2
    # pieces of 3 characters: "Hello there." is 4, "/calculate 6*7\n" 5 and "It is 42." 3
    assert found[("yanray_generated_tokens_total", ())] == 12
    assert found[("yanray_queue_depth", ())] == 0
    assert found[("yanray_requests_running", ())] == 0
    assert ("yanray_gpu_memory_used_bytes", ()) not in found  # the scripted engine reports none


async def test_healthz_is_200_when_well_and_503_naming_an_unreachable_database(
    make_settings: Callable[..., Settings], core_factory, tmp_path: Path
) -> None:
    core = await core_factory(make_settings(tools=[]), ScriptedEngine())
    async with StatusListener("127.0.0.1", 0, metrics=core.metrics) as listener:
        status, _type, body = await get(listener, "/healthz")
        assert (status, json.loads(body)) == (503, {"status": "starting", "engine": "loading"})

        listener.attach(engine=core.engine, db=core.db, adapters=[RecordingAdapter("test")])
        status, content_type, body = await get(listener, "/healthz")
        assert status == 200 and content_type.startswith("application/json")
        assert json.loads(body) == {
            "status": "ok",
            "engine": "ok",
            "database": "ok",
            "adapters": {"test": "ok"},
        }

        # the database's folder is gone (a disk unmounted): no connection can open the file
        await core.db.engine.dispose()
        data = tmp_path / "data"
        shutil.move(data, tmp_path / "moved")
        data.write_text("not a folder")
        try:
            status, _type, body = await get(listener, "/healthz")
        finally:
            data.unlink()
            shutil.move(tmp_path / "moved", data)
    report = json.loads(body)
    assert status == 503
    assert report["status"] == "unhealthy" and report["engine"] == "ok"
    assert (
        report["database"].startswith("unreachable: ")
        and "unable to open database file" in report["database"]
    )


@asynccontextmanager
async def silent_database() -> AsyncIterator[tuple[Database, list[asyncio.StreamWriter]]]:
    """A PostgreSQL address where something accepts connections and never answers (a hung
    server), with the connections it accepted so far."""
    from sqlalchemy.ext.asyncio import create_async_engine

    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    db = Database(create_async_engine(f"postgresql+asyncpg://yanray@127.0.0.1:{port}/yanray"))
    try:
        yield db, held
    finally:
        for writer in held:
            writer.close()
        server.close()
        await db.close()


async def test_healthz_gives_a_database_that_does_not_answer_a_time_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PostgreSQL address where something accepts connections and never answers (a hung
    server): the check gives up after HEALTH_TIMEOUT_S instead of hanging the healthcheck."""
    from yanray.bot import listener as listener_module

    monkeypatch.setattr(listener_module, "HEALTH_TIMEOUT_S", 0.5)
    async with silent_database() as (db, _held):
        async with StatusListener("127.0.0.1", 0, metrics=Metrics()) as listener:
            listener.attach(engine=ScriptedEngine(), db=db, adapters=[])
            status, _type, body = await get(listener, "/healthz")
    assert status == 503
    assert json.loads(body)["database"] == "no answer within 0.5 s"


async def test_a_flood_of_healthz_takes_one_connection_not_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anyone who reaches the listener may ask /healthz many times at once: the requests share
    one database check, so the pool keeps its connections for the bot (the silent server
    counts the connections the checks open)."""
    from yanray.bot import listener as listener_module

    monkeypatch.setattr(listener_module, "HEALTH_TIMEOUT_S", 1.0)
    async with silent_database() as (db, held):
        async with StatusListener("127.0.0.1", 0, metrics=Metrics()) as listener:
            listener.attach(engine=ScriptedEngine(), db=db, adapters=[])
            answers = await asyncio.gather(*(get(listener, "/healthz") for _ in range(20)))
            opened_by_flood = len(held)
            again = await get(listener, "/healthz")  # a later request checks anew
    assert [(status, json.loads(body)["database"]) for status, _type, body in answers] == [
        (503, "no answer within 1 s")
    ] * 20
    assert opened_by_flood == 1
    assert again[0] == 503 and len(held) == 2


async def raw_status(port: int, request: bytes) -> bytes:
    """The status line the listener answers a raw request with."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 10)).strip()
    finally:
        writer.close()


async def test_the_listener_serves_two_paths_and_refuses_oversized_requests_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only GET on /healthz and /metrics; an overlong request line, header or too many headers
    is a 400 from the parser, and none of it puts a traceback in the log."""
    async with StatusListener("127.0.0.1", 0, metrics=Metrics()) as listener:
        port = listener.port
        host = b"Host: x\r\n"
        answers = [
            await raw_status(port, b"GET /metrics HTTP/1.1\r\n" + host + b"\r\n"),
            await raw_status(port, b"POST /metrics HTTP/1.1\r\n" + host + b"Content-Length: 2\r\n\r\n{}"),
            await raw_status(port, b"GET /admin HTTP/1.1\r\n" + host + b"\r\n"),
            await raw_status(port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n" + host + b"\r\n"),
            await raw_status(
                port, b"GET /healthz HTTP/1.1\r\n" + host + b"X: " + b"a" * 100_000 + b"\r\n\r\n"
            ),
            await raw_status(port, b"GET /healthz HTTP/1.1\r\n" + b"X: a\r\n" * 50_000 + b"\r\n"),
        ]
    assert [answer.split(b" ")[1] for answer in answers] == [b"200", b"405", b"404", b"400", b"400", b"400"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []


async def test_healthz_names_an_adapter_that_is_not_connected(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    async with running_bot(fake, telegram_settings(fake, make_settings()), ScriptedEngine()) as bot:
        listener = StatusListener("127.0.0.1", 0, metrics=bot.core.metrics)
        async with listener:
            listener.attach(engine=bot.core.engine, db=bot.core.db, adapters=[bot.adapter])
            assert (await get(listener, "/healthz"))[0] == 200
            await bot.adapter.stop()
            status, _type, body = await get(listener, "/healthz")
    assert status == 503
    assert json.loads(body)["adapters"] == {"telegram": "not connected"}


async def test_a_taken_port_is_one_line_and_json_logs_parse(tmp_path: Path) -> None:
    """`yanray run` with YANRAY_HTTP_LISTEN on a port in use: one line on standard error, exit
    status 2, before any model loads; with YANRAY_LOG_FORMAT=json every log line is an object."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("YANRAY_")}
    environ.update(
        YANRAY_DATA_DIR=str(tmp_path / "data"),
        YANRAY_TELEGRAM_TOKEN="123:fake",
        YANRAY_HTTP_LISTEN=f"127.0.0.1:{port}",
        YANRAY_LOG_FORMAT="json",
        YANRAY_LOG_LEVEL="DEBUG",
        YANRAY_MODEL=str(tmp_path / "no-model-here"),
        YANRAY_TEMPERATUR="0.1",  # a typo: warned about while the settings load, before logging is set up
    )
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "yanray.bot.cli",
            "run",
            env=environ,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        taken.close()
    assert process.returncode == 2
    *logged, last = err.decode().splitlines()
    assert last.startswith(f"yanray: bad setting: YANRAY_HTTP_LISTEN=127.0.0.1:{port}: cannot listen there")
    assert logged, "DEBUG logs the stop with its traceback"
    records = [json.loads(line) for line in logged]
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    stopped = [r for r in records if r["logger"] == "yanray" and r["message"].startswith("stopped: ")]
    assert len(stopped) == 1 and stopped[0]["level"] == "DEBUG"
    assert "Traceback" in stopped[0]["exception"] and "ConfigError" in stopped[0]["exception"]
    why = [r for r in records if r["level"] == "ERROR"]
    assert [r["message"] for r in why] == [last.removeprefix("yanray: bad setting: ")]
    typo = [r for r in records if r["message"].startswith("YANRAY_TEMPERATUR is not a Yanray setting")]
    assert len(typo) == 1 and typo[0]["level"] == "WARNING"


LIBRARIES_WARN = """
import logging, sys, warnings
from yanray.bot.cli import configure_logging
from yanray.bot.logs import route_library_logs
configure_logging("INFO", sys.argv[1])
route_library_logs(sys.argv[1])  # as build_engine does once it has imported the local engine
warnings.warn("a library's warning", UserWarning)
logging.getLogger("transformers.modeling_utils").warning("from transformers")
logging.getLogger("huggingface_hub.file_download").warning("from the hub")
logging.getLogger("torch._dynamo.utils").warning("from torch")
logging.getLogger("transformers.modeling_utils").info("below transformers' level")
from huggingface_hub.utils import are_progress_bars_disabled
print(are_progress_bars_disabled())
"""


@pytest.mark.parametrize("form", ["json", "text"])
async def test_library_warnings_take_the_logs_form_once_each(form: str) -> None:
    """torch, transformers and huggingface_hub install stderr handlers of their own, and
    warnings.warn writes to stderr directly: all of it becomes log lines in Yanray's form,
    each once, and the JSON form turns the progress bars off."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LIBRARIES_WARN,
        form,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == str(form == "json")
    lines = err.decode().splitlines()
    if form == "text":
        messages = [line for line in lines if " WARNING " in line]
        assert len(messages) == 4, lines
        return
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert len(records) == 4, records
    messages = {r["logger"]: r["message"] for r in records}
    assert "UserWarning: a library's warning" in messages.pop("py.warnings")
    assert messages == {
        "huggingface_hub.file_download": "from the hub",
        "torch._dynamo.utils": "from torch",
        "transformers.modeling_utils": "from transformers",
    }


async def test_stats_answers_admins_in_their_language_and_refuses_others(
    make_settings: Callable[..., Settings], core_factory
) -> None:
    core = await core_factory(make_settings(tools=[], admins=["test:boss"]), ScriptedEngine(["Hi!"]))
    question = RecordingStream()
    await core.dispatcher.handle(said("hello", user="alice"), question)
    assert await question.wait() == "Hi!"
    await core.wait_idle()

    out = RecordingStream()
    await core.dispatcher.handle(said("/stats", user="boss"), out)
    text = await out.wait()
    assert text is not None and text.startswith("📊 Yanray, up for 0 min")
    assert "Queue: 0 waiting, 0 of 1 being answered" in text
    assert "Answers since start: 1 done, 0 failed, 0 stopped" in text
    assert "GPU memory: none in use (CPU or remote engine)" in text
    # alice asked; the boss only has a conversation (the /stats command wrote no message)
    assert "Users: 2 known, 1 active in the last 24 h" in text
    assert "tokens/s over the last 5 min" in text

    chinese = RecordingStream()
    await core.dispatcher.handle(said("/stats", user="boss", language="zh-hans"), chinese)
    shown = await chinese.wait()
    assert shown is not None and "队列" in shown and "Queue" not in shown

    refused = RecordingStream()
    await core.dispatcher.handle(said("/stats", user="alice"), refused)
    assert await refused.wait() == "Only Yanray's admins (YANRAY_ADMINS) can use /stats."
    assert core.engine.prompts == [core.engine.prompts[0]], "no command reached the model"


async def test_engine_metrics_show_warm_hits_and_batch_occupancy(
    make_settings: Callable[..., Settings], core_factory, random_folder: Path
) -> None:
    """The local engine on a tiny random ChatGLM3: two conversations at once, then a second turn
    of one (a warm start); the scraped counters match what the model was fed."""
    from yanray.engine.local import LocalEngine

    engine = LocalEngine.load(
        random_folder, device="cpu", dtype="float32", seed=1, kv_cache_gb=0.05, max_batch=2
    )
    try:
        core = await core_factory(make_settings(tools=[], max_new_tokens=20), engine)
        rows = ForwardCalls(engine.model)
        first = [RecordingStream(), RecordingStream()]
        await core.dispatcher.handle(said("Tell me about tea.", user="alice"), first[0])
        await core.dispatcher.handle(said("Tell me about rain.", user="bob"), first[1])
        for out in first:
            await out.wait(60)
        again = RecordingStream()
        await core.dispatcher.handle(said("And about coffee?", user="alice"), again)
        await again.wait(60)
        await core.wait_idle()
        rows.close()
        found = samples(core.metrics.render().decode())
    finally:
        await engine.aclose()
    assert found[("yanray_requests_total", (("status", "done"),))] == 3
    assert found[("yanray_warm_cache_hits_total", ())] >= 1  # alice's second turn at least
    assert found[("yanray_warm_cache_hits_total", ())] + found[("yanray_warm_cache_misses_total", ())] == 3
    assert found[("yanray_warm_cache_reused_tokens_total", ())] > 0
    assert found[("yanray_warm_cache_bytes", ())] > 0
    assert found[("yanray_decode_steps_total", ())] == len(rows.decode_rows) > 0
    assert found[("yanray_decoded_rounds_total", ())] == sum(rows.decode_rows)
    assert found[("yanray_batch_rounds", ())] == 0
    assert found[("yanray_batch_slots", ())] == 2
    assert found[("yanray_out_of_memory_total", ())] == 0
    assert found[("yanray_prefilled_tokens_total", ())] > 0
    assert ("yanray_gpu_memory_used_bytes", ()) not in found  # the CPU keeps no such account


@pytest.mark.parametrize("form", ["text", "json"])
async def test_the_log_masks_every_secret_in_either_form(form: str) -> None:
    """A library may name a secret in an error (PTB's InvalidToken names the token); the log line
    has `***` there instead, in the message and in the traceback."""
    from telegram.error import InvalidToken

    from yanray.bot.logs import formatter

    token, password = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw", 'pa"ss\\w0rd'
    settings = Settings(
        telegram_token=token,
        discord_token="MTA5.discord-token-value",
        database_url="postgresql+asyncpg://yanray:pa%22ss%5Cw0rd@db/yanray",
    )
    secrets = settings.secret_values()
    assert {token, "MTA5.discord-token-value", password} <= set(secrets)
    try:
        raise InvalidToken(f"The token `{token}` was rejected by the server.")
    except InvalidToken:
        record = logging.LogRecord(
            "telegram.ext", logging.ERROR, __file__, 1, "start failed: %s", (password,), sys.exc_info()
        )
    line = formatter(form, secrets).format(record)
    for secret in (token, password, json.dumps(password)[1:-1], "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"):
        assert secret not in line
    assert line.count("***") == 2
    if form == "json":
        entry = json.loads(line)
        assert (
            entry["message"] == "start failed: ***" and "The token `***` was rejected" in entry["exception"]
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_gpu_memory_is_scraped_from_the_local_engine_on_a_gpu(
    make_settings: Callable[..., Settings], core_factory, random_folder: Path
) -> None:
    """On a GPU the gauges say what torch holds for the model and a conversation: something
    now, at least as much at the peak, at most the card."""
    from yanray.engine.local import LocalEngine

    engine = LocalEngine.load(
        random_folder, device="cuda", dtype="float32", seed=1, kv_cache_gb=0.05, max_batch=2, compile="off"
    )
    try:
        core = await core_factory(make_settings(tools=[], max_new_tokens=20), engine)
        out = RecordingStream()
        await core.dispatcher.handle(said("Tell me about tea.", user="alice"), out)
        await out.wait(60)
        await core.wait_idle()
        found = samples(core.metrics.render().decode())
    finally:
        await engine.aclose()
    used, peak, total = (found[(f"yanray_gpu_memory_{kind}_bytes", ())] for kind in ("used", "peak", "total"))
    assert 0 < used <= peak <= total
