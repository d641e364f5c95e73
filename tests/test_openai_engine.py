"""The `openai` engine through real aiohttp against the scripted fake server."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import pytest

from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.waiting import until
from yanray.bot.toolloop import SlashCalls
from yanray.engine.base import (
    ChatMessage,
    Engine,
    EngineError,
    EngineSession,
    EngineUnavailable,
    GenerateOptions,
)
from yanray.engine.openai import OpenAIEngine, estimate_tokens
from yanray.engine.openai_stream import MAX_CHARS_PER_TOKEN

SYSTEM = ChatMessage(role="system", content="You are Yanray. Tools: /calculate <expression>")
ASK = ChatMessage(role="user", content="What is 6.5 times 7.5?")


def calculate_line_end() -> Callable[[str], int | None]:
    """The tool loop's stop condition: the end of a complete `/calculate ...` line."""
    return SlashCalls(["calculate"]).stop_at()


def make_engine(fake: FakeOpenAI | None = None, *, base_url: str = "", timeout: float = 5.0) -> OpenAIEngine:
    return OpenAIEngine(
        base_url=fake.base_url if fake else base_url, model="chatglm3-6b", api_key="sk-test", timeout=timeout
    )


async def assert_recovers(engine: OpenAIEngine, fake: FakeOpenAI, session: EngineSession) -> None:
    """After a failure the same session, and a new one, still answer."""
    engine.timeout = max(engine.timeout, 10.0)  # a short timeout was the failure under test, not this
    fake.replies += ["Back again.", "Fresh session."]
    again = await session.generate(GenerateOptions())
    assert (again.text, again.finish) == ("Back again.", "stop")
    fresh = await (await engine.start([ASK])).generate(GenerateOptions())
    assert fresh.text == "Fresh session."


def assert_one_line(error: BaseException, *words: str) -> None:
    message = str(error)
    assert "\n" not in message and message.endswith(".")
    for word in words:
        assert word in message
    assert "sk-test" not in message


async def test_it_is_an_engine() -> None:
    engine = make_engine(base_url="http://127.0.0.1:1/v1")
    assert isinstance(engine, Engine)
    assert isinstance(await engine.start([ASK]), EngineSession)
    assert (engine.name, engine.native_tools, engine.max_context) == ("openai", False, 8192)
    await engine.aclose()


async def test_streamed_pieces_arrive_in_order_and_the_request_is_what_the_model_sees() -> None:
    reply = "Hello! 你好, I am Yanray and I stream."
    async with FakeOpenAI(replies=[reply], chunk_size=4) as fake:
        engine = make_engine(fake)
        session = await engine.start([SYSTEM, ASK])
        pieces: list[str] = []
        result = await session.generate(GenerateOptions(max_new_tokens=77, temperature=0.0), pieces.append)
        await engine.aclose()
    assert len(pieces) > 5 and "".join(pieces) == reply == result.text
    assert result.finish == "stop" and result.new_tokens > 0 and result.prompt_tokens > 0
    body = fake.requests[0]
    assert body["messages"] == [
        {"role": "system", "content": SYSTEM.content},
        {"role": "user", "content": ASK.content},
    ]
    assert (body["model"], body["stream"], body["temperature"], body["max_tokens"]) == (
        "chatglm3-6b",
        True,
        0.0,
        77,
    )
    assert "stop" not in body and "top_p" not in body
    assert fake.headers[0]["Authorization"] == "Bearer sk-test"


async def test_tool_round_stops_at_the_calculate_line_and_the_next_round_sees_the_observation() -> None:
    first = "Let me work it out.\n/calculate 6.5*7.5\nThis text must never be seen." + " more" * 40
    async with FakeOpenAI(replies=[first, "6.5 × 7.5 = 48.75."], chunk_size=3, chunk_delay=0.003) as fake:
        engine = make_engine(fake)
        session = await engine.start([SYSTEM, ASK])
        pieces: list[str] = []
        round1 = await session.generate(GenerateOptions(stop_at=calculate_line_end()), pieces.append)
        assert round1.text == "Let me work it out.\n/calculate 6.5*7.5\n" == "".join(pieces)
        assert round1.finish == "stop"
        await until(lambda: fake.disconnects == 1)  # the server was told to stop generating
        await session.append(ChatMessage(role="observation", content="48.75", name="calculate"))
        round2 = await session.generate(GenerateOptions(stop_at=calculate_line_end()))
        await engine.aclose()
    assert round2.text == "6.5 × 7.5 = 48.75."
    assert fake.requests[1]["messages"][-2:] == [
        {"role": "assistant", "content": "Let me work it out.\n/calculate 6.5*7.5\n"},
        {"role": "user", "content": "Tools: 48.75"},
    ]
    assert fake.requests[1]["messages"][:2] == fake.requests[0]["messages"]


async def test_length_finish_is_reported() -> None:
    async with FakeOpenAI(replies=[Reply("A long answer that was cut", finish_reason="length")]) as fake:
        engine = make_engine(fake)
        result = await (await engine.start([ASK])).generate(GenerateOptions(max_new_tokens=5))
        await engine.aclose()
    assert (result.text, result.finish) == ("A long answer that was cut", "length")


async def test_cancel_mid_stream_stops_reading() -> None:
    async with FakeOpenAI(replies=["x" * 300], chunk_size=2, chunk_delay=0.01) as fake:
        engine = make_engine(fake)
        options = GenerateOptions()
        pieces: list[str] = []

        def on_text(piece: str) -> None:
            pieces.append(piece)
            if len(pieces) == 3:
                options.cancel.set()

        session = await engine.start([ASK])
        result = await session.generate(options, on_text)
        assert result.finish == "cancelled" and result.text == "".join(pieces) == "x" * 6
        await until(lambda: fake.disconnects == 1)
        await assert_recovers(engine, fake, session)
        await engine.aclose()


async def test_cancel_while_the_server_is_silent() -> None:
    async with FakeOpenAI(replies=[Reply("abcdef", stall_after=1)], chunk_size=3) as fake:
        engine = make_engine(fake, timeout=30)
        options = GenerateOptions()
        pieces: list[str] = []
        # cancel once the first piece is in and the server has gone silent
        result_task = asyncio.ensure_future((await engine.start([ASK])).generate(options, pieces.append))
        await until(lambda: pieces and fake.stalls == 1, what="the first piece, then silence")
        options.cancel.set()
        result = await asyncio.wait_for(result_task, 5)
        assert (result.text, result.finish) == ("abc", "cancelled")
        await until(lambda: fake.disconnects == 1)
        await engine.aclose()


async def test_a_time_limit_from_outside_drops_the_stream_and_the_session_still_works() -> None:
    async with FakeOpenAI(replies=[Reply("abcdef", stall_after=1)]) as fake:
        engine = make_engine(fake, timeout=30)
        session = await engine.start([ASK])
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(session.generate(GenerateOptions()), 0.3)
        await until(lambda: fake.disconnects == 1)
        await assert_recovers(engine, fake, session)
        await engine.aclose()


async def test_a_refused_key_echoed_by_the_server_is_scrubbed(caplog: pytest.LogCaptureFixture) -> None:
    async with FakeOpenAI(replies=[Reply.http_error(401, "Incorrect API key provided: sk-test")]) as fake:
        engine = make_engine(fake)
        with caplog.at_level(logging.WARNING), pytest.raises(EngineError) as caught:
            await (await engine.start([ASK])).generate(GenerateOptions())
        await engine.aclose()
    assert_one_line(caught.value, "Incorrect API key provided: ***")
    assert "sk-test" not in caplog.text


async def test_already_cancelled_sends_nothing() -> None:
    async with FakeOpenAI(replies=["never"]) as fake:
        engine = make_engine(fake)
        options = GenerateOptions()
        options.cancel.set()
        result = await (await engine.start([ASK])).generate(options)
        await engine.aclose()
    assert result.finish == "cancelled" and fake.requests == []


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (500, ["failed", "HTTP 500: CUDA out of memory"]),
        (401, ["refused Yanray's API key", "HTTP 401", "owner should check"]),
        (429, ["is busy", "HTTP 429"]),
        (404, ["does not know the configured model", "HTTP 404"]),
    ],
)
async def test_http_errors_are_one_line_with_the_server_message(status: int, words: list[str]) -> None:
    message = {500: "CUDA out of memory", 401: "Incorrect API key", 429: "Too many", 404: "no such model"}
    async with FakeOpenAI(replies=[Reply.http_error(status, message[status])]) as fake:
        engine = make_engine(fake)
        session = await engine.start([ASK])
        with pytest.raises(EngineError) as caught:
            await session.generate(GenerateOptions())
        assert_one_line(caught.value, *words)
        await assert_recovers(engine, fake, session)
        await engine.aclose()


async def test_connection_refused(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = make_engine(base_url=f"http://127.0.0.1:{port}/v1")
    with caplog.at_level(logging.WARNING), pytest.raises(EngineUnavailable) as caught:
        await (await engine.start([ASK])).generate(GenerateOptions())
    assert str(caught.value) == "The model server cannot be reached (connection refused); try again later."
    # the address and the setting to check go to the log, not to a possibly public chat
    assert f"127.0.0.1:{port}" in caplog.text and "YANRAY_OPENAI_BASE_URL" in caplog.text
    assert "cannot be reached" in caplog.text and "sk-test" not in caplog.text
    await engine.aclose()


def test_a_base_url_that_is_not_http_is_refused_at_once() -> None:
    with pytest.raises(EngineUnavailable, match="YANRAY_OPENAI_BASE_URL"):
        make_engine(base_url="127.0.0.1:8000/v1")


async def test_credentials_in_the_url_become_basic_auth_and_are_never_shown() -> None:
    async with FakeOpenAI(replies=[Reply.http_error(502, "bad gateway")]) as fake:
        url = fake.base_url.replace("http://", "http://user:hunter2@")
        engine = OpenAIEngine(base_url=url, model="m", api_key=None, timeout=5)
        with pytest.raises(EngineError) as caught:
            await (await engine.start([ASK])).generate(GenerateOptions())
        await engine.aclose()
    assert fake.headers[0]["Authorization"] == "Basic dXNlcjpodW50ZXIy"
    assert_one_line(caught.value, "HTTP 502: bad gateway")
    assert "hunter2" not in str(caught.value) and "hunter2" not in repr(engine)


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (Reply("abcdefghijkl", cut_after=2), ["closed the connection in the middle of the answer"]),
        (Reply("abcdefghijkl", malformed_after=2), ["cannot read", "OpenAI-compatible"]),
        (Reply("abcdefghijkl", stall_after=2), ["sent nothing for 1 s"]),
        (Reply("abcdefghijkl", delay=3.0), ["sent nothing for 1 s"]),
    ],
    ids=["disconnect", "malformed", "stall-mid-stream", "stall-before-headers"],
)
async def test_broken_streams_raise_one_line_and_the_engine_recovers(
    reply: Reply, words: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeOpenAI(replies=[reply], chunk_size=3) as fake:
        # 1 s, not less: on a loaded machine a first request can take a few tenths of a
        # second to reach the server, and must not time out before it meets its fault
        engine = make_engine(fake, timeout=1.0)
        session = await engine.start([SYSTEM, ASK])
        pieces: list[str] = []
        with caplog.at_level(logging.WARNING), pytest.raises(EngineError) as caught:
            await session.generate(GenerateOptions(), pieces.append)
        assert_one_line(caught.value, *words)
        assert "Model server" in caplog.text and "sk-test" not in caplog.text
        await assert_recovers(engine, fake, session)
        # The failed round left nothing behind: the retry sent the same messages.
        assert fake.requests[1]["messages"] == fake.requests[0]["messages"]
        await engine.aclose()


async def test_error_inside_the_stream_is_reported() -> None:
    async with FakeOpenAI(
        replies=[Reply("abcdef", error="CUDA error: device-side assert", error_after=1)]
    ) as fake:
        engine = make_engine(fake)
        session = await engine.start([ASK])
        with pytest.raises(EngineError) as caught:
            await session.generate(GenerateOptions())
        assert_one_line(caught.value, "failed while answering (CUDA error: device-side assert)")
        await assert_recovers(engine, fake, session)
        await engine.aclose()


async def test_a_responder_answers_from_the_messages() -> None:
    async def responder(messages: list[dict[str, object]]) -> str:
        return f"You said {len(messages)} things."

    async with FakeOpenAI(responder=responder) as fake:
        engine = make_engine(fake)
        assert (await (await engine.start([ASK])).generate(GenerateOptions())).text == "You said 1 things."
        await engine.aclose()


async def test_a_shared_http_session_is_not_closed() -> None:
    import aiohttp

    async with FakeOpenAI(replies=["one"]) as fake, aiohttp.ClientSession() as http:
        engine = OpenAIEngine(base_url=fake.base_url, model="m", api_key=None, timeout=5, http=http)
        assert (await (await engine.start([ASK])).generate(GenerateOptions())).text == "one"
        await engine.aclose()
        assert not http.closed
        assert "Authorization" not in fake.headers[0]


async def test_a_server_that_ignores_stream_still_answers() -> None:
    async with FakeOpenAI(replies=["Whole answer at once."], streaming=False) as fake:
        engine = make_engine(fake)
        pieces: list[str] = []
        result = await (await engine.start([ASK])).generate(GenerateOptions(), pieces.append)
        await engine.aclose()
    assert pieces == ["Whole answer at once."] and result.text == "Whole answer at once."
    assert result.new_tokens == 5  # the server's usage: len(text) // 4


async def test_the_fake_answers_plain_clients_without_streaming() -> None:
    import aiohttp

    async with FakeOpenAI(replies=["plain"], api_key="k") as fake, aiohttp.ClientSession() as http:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(f"{fake.base_url}/chat/completions", json=body) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["message"] == "Incorrect API key provided."
        headers = {"Authorization": "Bearer k"}
        async with http.post(f"{fake.base_url}/chat/completions", json=body, headers=headers) as resp:
            answer = await resp.json()
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "plain"}
    assert fake.last_messages == body["messages"] and len(fake.requests) == 2


def test_token_estimate_is_conservative() -> None:
    english = ChatMessage(role="user", content="a" * 300)
    chinese = ChatMessage(role="user", content="你" * 100)
    assert estimate_tokens([english]) == 100 + 4 + 3
    assert estimate_tokens([chinese]) == 100 + 4 + 3
    observation = ChatMessage(role="observation", content="48.75", name="calculate")
    assert estimate_tokens([observation]) == estimate_tokens(
        [ChatMessage(role="user", content="Tools: 48.75")]
    )


async def test_a_server_that_ignores_max_tokens_is_cut_at_a_character_bound() -> None:
    flood = "0123456789" * 200_000  # 2 MB, and the fake never looks at max_tokens
    async with FakeOpenAI(replies=[flood], chunk_size=4000, chunk_delay=0.002) as fake:
        engine = make_engine(fake)
        pieces: list[str] = []
        started = asyncio.get_running_loop().time()
        result = await (await engine.start([ASK])).generate(
            GenerateOptions(max_new_tokens=100), pieces.append
        )
        seconds = asyncio.get_running_loop().time() - started
        await until(lambda: fake.disconnects == 1)  # the server was told to stop
        await engine.aclose()
    assert result.finish == "length" and seconds < 2
    assert result.text == "".join(pieces) == flood[: 100 * MAX_CHARS_PER_TOKEN]
