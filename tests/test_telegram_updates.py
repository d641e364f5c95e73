"""Receiving Telegram updates: malformed ones are skipped once, and nothing is confirmed
before it is stored (polling and webhook), through the real PTB client and the fake Bot API."""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.fakes.telegram_harness import running_bot, telegram_settings
from tests.fakes.telegram_server import FakeTelegram
from tests.scripted_engine import ScriptedEngine
from yanray.bot.settings import Settings
from yanray.bot.types import Incoming, ReplyStream
from yanray.engine.base import ChatMessage

ALICE, BOB = 3001, 3002
GROUP = -300700
SECRET = "s3cret"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


def echo() -> ScriptedEngine:
    def reply(messages: list[ChatMessage]) -> str:
        return "You said: " + [m.content for m in messages if m.role == "user"][-1]

    return ScriptedEngine(responder=reply)


def skipped(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("yanray") and "skipped" in r.getMessage()]


def message(chat_id: int = ALICE, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "message_id": 900,
        "date": 1_700_000_000,
        "chat": {"id": chat_id, "type": "private", "first_name": "Alice"},
        "from": {"id": chat_id, "is_bot": False, "first_name": "Alice"},
        "text": "a question",
    }
    body.update(changes)
    return body


def without(path: str) -> dict[str, Any]:
    body = message()
    *parents, last = path.split(".")
    node = body
    for key in parents:
        node = node[key]
    del node[last]
    return body


MALFORMED: dict[str, dict[str, Any]] = {
    "entity without offset": message(entities=[{"type": "bold", "length": 2}]),
    "date missing": without("date"),
    "date is a string": message(date="yesterday"),
    "chat without type": without("chat.type"),
    "sender without first_name": without("from.first_name"),
    "entities is a string": message(entities="zzz"),
}


async def get_updates(fake: FakeTelegram, offset: int) -> list[Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{fake.base_url}{fake.token}/getUpdates", json={"offset": offset}) as rsp,
    ):
        return list((await rsp.json())["result"])


async def test_the_fake_drops_updates_only_when_a_higher_offset_confirms_them(fake: FakeTelegram) -> None:
    first = fake.private_text(ALICE, "one")
    second = fake.private_text(ALICE, "two")
    confirmed: list[list[int]] = []
    fake.confirm_listeners.append(confirmed.append)
    assert [u["update_id"] for u in await get_updates(fake, 0)] == [first, second]
    assert [u["update_id"] for u in await get_updates(fake, first)] == [first, second], "not confirmed yet"
    assert confirmed == []
    assert [u["update_id"] for u in await get_updates(fake, second)] == [second]
    assert confirmed == [[first]]
    assert await get_updates(fake, second + 1) == []
    assert confirmed == [[first], [second]]


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_update_is_skipped_once_and_the_next_is_answered(
    fake: FakeTelegram,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    payload: dict[str, Any],
) -> None:
    async with running_bot(fake, telegram_settings(fake, make_settings()), echo()):
        bad = fake.raw_update({"message": copy.deepcopy(payload)})
        fake.private_text(BOB, "are you there?")
        await fake.wait_for(lambda: fake.messages(BOB) == ["You said: are you there?"])
        await fake.wait_for(lambda: not fake.updates)  # both confirmed, the bad one too
    assert fake.messages(ALICE) == []
    logged = skipped(caplog)
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert f"update {bad}" in logged[0].getMessage()
    assert len(logged[0].getMessage()) < 800, "shortened"
    assert len(fake.polls) < 10, "no spinning on the bad update"


async def test_updates_without_an_id_or_not_an_object_do_not_wedge_the_loop(
    fake: FakeTelegram, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    async with running_bot(fake, telegram_settings(fake, make_settings()), echo()):
        fake.raw_update("garbage")
        fake.raw_update({"message": message()}, with_id=False)
        fake.private_text(BOB, "still there?")
        await fake.wait_for(lambda: fake.messages(BOB) == ["You said: still there?"])
        await fake.wait_for(lambda: not fake.updates)
    assert fake.messages(ALICE) == [], "an update without an id is not answered"
    assert len(skipped(caplog)) == 2
    assert len(fake.polls) < 10


async def test_an_id_less_update_alone_is_logged_once_and_polled_slowly(
    fake: FakeTelegram, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """Telegram sends it again and again while nothing confirms it: logged once, no spin."""
    async with running_bot(fake, telegram_settings(fake, make_settings()), echo()):
        fake.raw_update({"message": message()}, with_id=False)
        await fake.wait_for(lambda: len(fake.polls) >= 4, within=10)
        fake.private_text(BOB, "hello")
        await fake.wait_for(lambda: fake.messages(BOB) == ["You said: hello"], within=10)
    assert len(skipped(caplog)) == 1


async def test_a_lone_surrogate_is_answered_with_a_replacement_character(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    engine = echo()
    async with running_bot(fake, telegram_settings(fake, make_settings()), engine):
        fake.private_text(ALICE, "broken \ud800 text")
        fake.group_text(GROUP, BOB, "@yanray_bot half \udc00 a pair")  # mention offsets still line up
        await fake.wait_for(lambda: fake.messages(GROUP) == ["You said: half \ufffd a pair"])
        await fake.wait_for(lambda: fake.messages(ALICE) == ["You said: broken \ufffd text"])


async def test_an_update_is_confirmed_only_after_its_question_is_stored(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    async with running_bot(fake, telegram_settings(fake, make_settings()), echo()) as bot:
        storing = asyncio.Event()
        release = asyncio.Event()
        handle = bot.adapter.dispatcher.handle

        async def slow_store(incoming: Incoming, out: ReplyStream) -> None:
            storing.set()
            await release.wait()
            await handle(incoming, out)

        bot.adapter.dispatcher.handle = slow_store  # type: ignore[method-assign]
        uid = fake.private_text(ALICE, "keep this")
        try:
            await asyncio.wait_for(storing.wait(), 5)
            # while the question is being stored no getUpdates is open, so none can confirm it
            assert fake.open_polls == 0
            assert all(offset <= uid for offset in fake.polls), "confirmed before it was stored"
            assert [u for u, _ in fake.updates] == [uid]
        finally:
            release.set()
        await fake.wait_for(lambda: fake.messages(ALICE) == ["You said: keep this"])
        await fake.wait_for(lambda: not fake.updates)
        assert max(fake.polls) == uid + 1


async def test_stop_lets_the_batch_finish_and_confirms_it(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    settings = telegram_settings(fake, make_settings())
    async with running_bot(fake, settings, echo()) as bot:
        storing = asyncio.Event()
        release = asyncio.Event()
        handle = bot.adapter.dispatcher.handle

        order: list[str] = []

        async def slow_store(incoming: Incoming, out: ReplyStream) -> None:
            storing.set()
            await release.wait()
            await handle(incoming, out)
            order.append("stored")

        bot.adapter.dispatcher.handle = slow_store  # type: ignore[method-assign]
        fake.private_text(ALICE, "asked just before shutdown")
        await asyncio.wait_for(storing.wait(), 5)
        stopping = asyncio.create_task(bot.adapter.stop())
        stopping.add_done_callback(lambda _task: order.append("stopped"))
        await asyncio.sleep(0)  # stop() starts (and would end, if it did not wait) first
        release.set()
        await asyncio.wait_for(stopping, 5)
        assert order == ["stored", "stopped"], "stop waits for the handler"
        assert fake.updates == [], "the handled update was confirmed at stop"
        assert await bot.statuses() in ({"queued": 1}, {"running": 1}, {"done": 1})
    async with running_bot(fake, settings, echo()) as bot:
        await fake.wait_for(lambda: fake.messages(ALICE))
        await asyncio.wait_for(bot.core.wait_idle(), 5)
    assert fake.messages(ALICE) == ["You said: asked just before shutdown"], "answered once"


async def test_get_updates_faults_back_off_and_recover(
    fake: FakeTelegram, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail("getUpdates", "server", times=3)
    fake.fail("getUpdates", "bad_gateway", times=2)
    async with running_bot(fake, telegram_settings(fake, make_settings()), echo()):
        fake.private_text(ALICE, "after the outage")
        await fake.wait_for(lambda: fake.messages(ALICE) == ["You said: after the outage"], within=10)
    failures = [r for r in caplog.records if "getUpdates failed" in r.getMessage()]
    assert len([r for r in failures if r.levelno >= logging.WARNING]) == 1, "one warning per outage"
    assert len(fake.polls) < 15


async def test_a_revoked_token_is_reported_as_fatal(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    reasons: list[str] = []
    settings = telegram_settings(fake, make_settings())
    async with running_bot(fake, settings, echo(), on_fatal=reasons.append):
        fake.token = "123456:REVOKED"  # every call with the old token is now 401
        fake.private_text(ALICE, "hello?")
        await fake.wait_for(lambda: reasons)
    assert len(reasons) == 1 and "YANRAY_TELEGRAM_TOKEN" in reasons[0]


# -- webhook -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def webhook_settings(fake: FakeTelegram, make_settings: Callable[..., Settings]) -> Settings:
    port = _free_port()
    return telegram_settings(
        fake,
        make_settings(),
        telegram_webhook_url=f"http://127.0.0.1:{port}/yanray/hook",
        telegram_webhook_listen="127.0.0.1",
        telegram_webhook_port=port,
        telegram_webhook_secret=SECRET,
    )


async def post(settings: Settings, body: Any, secret: str = SECRET, raw: bytes | None = None) -> int:
    headers = {"X-Telegram-Bot-Api-Secret-Token": secret}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            settings.telegram_webhook_url,
            json=None if raw is not None else body,
            data=raw,
            headers=headers,
        ) as rsp,
    ):
        return rsp.status


async def test_the_webhook_answers_only_after_the_question_is_stored(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    settings = webhook_settings(fake, make_settings)
    async with running_bot(fake, settings, echo()) as bot:
        assert fake.webhook_url == settings.telegram_webhook_url
        assert fake.calls_of("setWebhook")[-1].params["secret_token"] == SECRET
        handle = bot.adapter.dispatcher.handle

        async def slow_store(incoming: Incoming, out: ReplyStream) -> None:
            await asyncio.sleep(0.3)  # a busy database
            await handle(incoming, out)

        bot.adapter.dispatcher.handle = slow_store  # type: ignore[method-assign]
        assert await post(settings, {"update_id": 10, "message": message(text="stored first")}) == 200
        assert await bot.statuses() in ({"queued": 1}, {"running": 1}, {"done": 1})
        await fake.wait_for(lambda: fake.messages(ALICE) == ["You said: stored first"])
        assert not fake.polls


async def test_the_webhook_refuses_a_wrong_secret_and_an_oversized_body(
    fake: FakeTelegram, make_settings: Callable[..., Settings]
) -> None:
    settings = webhook_settings(fake, make_settings)
    engine = echo()
    async with running_bot(fake, settings, engine) as bot:
        update = {"update_id": 11, "message": message(text="forged")}
        assert await post(settings, update, secret="wrong") == 403
        assert await post(settings, update, secret="") == 403
        assert await post(settings, None, raw=b"{" + b" " * (2 * 1024 * 1024) + b"}") == 413
        assert await bot.statuses() == {}
    assert engine.prompts == []


async def test_a_malformed_webhook_update_is_answered_200_and_skipped_once(
    fake: FakeTelegram, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = webhook_settings(fake, make_settings)
    async with running_bot(fake, settings, echo()):
        assert await post(settings, {"update_id": 12, "message": MALFORMED["chat without type"]}) == 200
        assert await post(settings, None, raw=b"\xff not json") == 200
        assert await post(settings, {"update_id": 13, "message": message(text="next one")}) == 200
        await fake.wait_for(lambda: fake.messages(ALICE) == ["You said: next one"])
    assert len(skipped(caplog)) == 2
