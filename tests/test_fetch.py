"""The fetch tool against a local aiohttp server: reached only through the test allowance.

The server listens on 127.0.0.1, which the tool refuses by default; each test grants
itself `YANRAY_FETCH_ALLOW=127.0.0.1` and the server's port, and one test checks that the
same URL is refused without them. No test reaches the internet.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import io
import logging
import socket
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.scripted_engine import ScriptedEngine
from tests.test_toolloop import NativeSession
from tests.waiting import until
from yanray.adapters.console import ConsoleAdapter
from yanray.bot.errors import ConfigError, ToolError
from yanray.bot.settings import Settings, load_settings
from yanray.bot.toolloop import ToolLoop
from yanray.bot.tools.addresses import AddressRefused, AddressRules, check_url
from yanray.bot.tools.budget import cut_to_tokens, estimate_tokens
from yanray.bot.tools.fetch import (
    EXTRACT_THREADS,
    MAX_EXTRACT_BYTES,
    OBSERVATION_TOKENS,
    FetchConfig,
    _socket_guard,
    fetch_config,
    fetch_page,
    fetch_tool,
)
from yanray.engine.base import GenerateOptions, Generation, ToolCall

PAGE = """<!DOCTYPE html>
<html lang="en"><head>
<meta charset="utf-8"><title>The Moon - Notes</title>
<style>body { color: SECRETSTYLE; }</style>
<script>var tracking = "SECRETSCRIPT";</script>
</head><body>
<nav><a href="/">Home</a> | <a href="/about">About</a> | <a href="/login">Log in</a></nav>
<article>
<h1>The Moon</h1>
<p>The Moon is Earth's only natural satellite. It orbits at an average distance of
384,400 km, about 30 times the diameter of Earth.</p>
<h2>Formation</h2>
<p>The Moon formed about 4.5 billion years ago, most likely from the debris of a giant
impact between Earth and a Mars-sized body called Theia.</p>
<script>document.write("SECRETINLINE");</script>
<h2>Tides</h2>
<p>The gravitational pull of the Moon causes the ocean tides on Earth, which slowly
lengthen the day and push the Moon further away, by about 3.8 cm each year.</p>
</article>
<footer>Copyright 2026 Example Notes. All rights reserved.</footer>
</body></html>
"""


@functools.cache
def bomb() -> bytes:
    body = gzip.compress(b"A" * (64 * 2**20), compresslevel=9)
    assert len(body) < 100_000  # small on the wire, 64 MB inflated
    return body


class Server:
    def __init__(self) -> None:
        self.app = web.Application()
        self.release = asyncio.Event()  # the slow handler waits for it
        self.slow_started = asyncio.Event()
        self.port = 0
        routes = [
            web.get("/page", self.page),
            web.get("/json", self.json),
            web.get("/big", self.big),
            web.get("/slow", self.slow),
            web.get("/binary", self.binary),
            web.get("/bomb", self.bomb),
            web.get("/hop/{n}", self.hop),
            web.get("/to", self.to),
            web.get("/gbk", self.gbk),
            web.get("/cookie", self.cookie),
            web.get("/echo", self.echo),
            web.get("/paragraphs", self.paragraphs),
        ]
        self.app.add_routes(routes)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def gbk(self, request: web.Request) -> web.Response:
        html = "<html><head><meta charset='gbk'><title>月球</title></head><body><article><h1>月球</h1>"
        html += (
            "<p>" + "月球是地球唯一的天然卫星，平均距离约三十八万公里。" * 4 + "</p></article></body></html>"
        )
        return web.Response(body=html.encode("gbk"), headers={"Content-Type": "text/html"})

    async def json(self, request: web.Request) -> web.Response:
        return web.json_response({"answer": 42})

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(text="x" * (3 * 2**20), content_type="text/plain")

    async def paragraphs(self, request: web.Request) -> web.Response:
        """Hostile HTML: 1.5 MB of bare `<p>` tags, the slowest markup for trafilatura found."""
        return web.Response(text="<html><body>" + "<p>" * 500_000, content_type="text/html")

    async def slow(self, request: web.Request) -> web.StreamResponse:
        self.slow_started.set()
        await self.release.wait()
        return web.Response(text="late", content_type="text/plain")

    async def binary(self, request: web.Request) -> web.Response:
        return web.Response(body=b"\x7fELF" + bytes(100), content_type="application/octet-stream")

    async def bomb(self, request: web.Request) -> web.Response:
        return web.Response(
            body=bomb(), headers={"Content-Encoding": "gzip", "Content-Type": "text/plain; charset=utf-8"}
        )

    async def hop(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        target = "/page" if n == 0 else f"/hop/{n - 1}"
        raise web.HTTPFound(target)

    async def cookie(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/echo", headers={"Set-Cookie": "session=SECRETCOOKIE; Path=/"})

    async def echo(self, request: web.Request) -> web.Response:
        return web.Response(
            text=f"cookie: {request.headers.get('Cookie', 'none')}", content_type="text/plain"
        )

    async def to(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["url"])


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    runner = web.AppRunner(srv.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    srv.port = runner.addresses[0][1]
    yield srv
    srv.release.set()
    await runner.cleanup()


def allowed(server: Server, **kwargs: float | int) -> FetchConfig:
    """The test-only allowance: 127.0.0.1 and the server's port."""
    return FetchConfig(rules=AddressRules.from_settings([server.port], ["127.0.0.1"]), **kwargs)  # type: ignore[arg-type]


async def refused(url: str, config: FetchConfig) -> str:
    with pytest.raises(ToolError) as caught:
        await fetch_page(url, config)
    message = str(caught.value)
    assert "\n" not in message
    return message


async def test_a_page_gives_its_title_headings_and_paragraphs_without_scripts(server: Server) -> None:
    text = await fetch_page(server.url("/page"), allowed(server))
    assert text.startswith(f"Title: The Moon\nURL: {server.url('/page')}\n\n")
    for kept in (
        "The Moon",
        "Formation",
        "Tides",
        "Earth's only natural satellite",
        "about 3.8 cm each year",
    ):
        assert kept in text
    assert text.index("Formation") < text.index("giant") < text.index("Tides") < text.index("3.8 cm")
    for dropped in ("SECRET", "<p>", "<h1>", "tracking", "{"):
        assert dropped not in text


async def test_a_page_without_a_charset_header_is_read_in_its_own_charset(server: Server) -> None:
    text = await fetch_page(server.url("/gbk"), allowed(server))
    assert text.startswith("Title: 月球\n") and "地球唯一的天然卫星" in text


async def test_with_the_default_rules_the_same_url_is_refused(server: Server) -> None:
    url = server.url("/page")
    assert f"port {server.port} is not allowed" in await refused(url, FetchConfig())
    ports_only = FetchConfig(rules=AddressRules(ports=frozenset({server.port})))
    assert await refused(url, ports_only) == "fetch refused: 127.0.0.1 is a loopback address"


async def test_json_passes_through(server: Server) -> None:
    text = await fetch_page(server.url("/json"), allowed(server))
    assert text == f"URL: {server.url('/json')}\n\n" + '{"answer": 42}'


async def test_a_long_body_is_cut_at_the_size_cap_and_the_observation_at_its_budget(server: Server) -> None:
    text = await fetch_page(server.url("/big"), allowed(server, max_bytes=100_000))
    head, _, body = text.partition("\n\n")
    assert head.endswith("\n[cut: the page is longer than 100,000 bytes; only the start was read]")
    assert body == "x" * 100_000  # read up to the cap, no further
    seen = cut_to_tokens(text, OBSERVATION_TOKENS)  # what the tool loop hands the model
    assert estimate_tokens(seen) <= OBSERVATION_TOKENS and seen.endswith("more characters not shown]")


async def test_a_gzip_bomb_is_cut_at_the_decompressed_cap(server: Server) -> None:
    config = allowed(server, max_bytes=1_000_000)
    bomb()  # made before measuring
    tracemalloc.start()
    try:
        text = await fetch_page(server.url("/bomb"), config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # inflated in bounded steps: a few copies of the 1 MB read, never the 64 MB body
    assert peak < 16 * 2**20, f"{peak:,} bytes"
    head, body = text.split("\n\n", 1)
    assert body == "A" * 1_000_000
    assert head.endswith("[cut: the page is longer than 1,000,000 bytes; only the start was read]")


async def test_a_slow_server_times_out(server: Server) -> None:
    config = allowed(server, read_timeout=0.3)
    message = await refused(server.url("/slow"), config)
    assert server.slow_started.is_set()
    assert message == f"fetch failed: {server.url('/slow')} did not answer in time"


async def test_a_binary_content_type_is_refused(server: Server) -> None:
    message = await refused(server.url("/binary"), allowed(server))
    assert (
        message == "fetch refused: the content type is application/octet-stream, not text, HTML, JSON or XML"
    )


async def test_redirects_are_followed_up_to_five(server: Server) -> None:
    text = await fetch_page(server.url("/hop/4"), allowed(server))  # 5 redirects
    assert text.startswith(f"Title: The Moon\nURL: {server.url('/page')}\n")
    assert await refused(server.url("/hop/5"), allowed(server)) == "fetch failed: more than 5 redirects"


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("http://127.0.0.2:{port}/page", "127.0.0.2 is a loopback address"),
        ("http://[::1]:{port}/page", "::1 is a loopback address"),
        ("http://localhost:{port}/page", "localhost is this machine"),
        ("http://169.254.169.254/latest/meta-data/", "port 80 is not allowed"),
        ("file:///etc/passwd", "only http and https"),
    ],
)
async def test_a_redirect_to_a_refused_address_is_refused(server: Server, target: str, why: str) -> None:
    url = server.url("/to?url=" + target.format(port=server.port))
    message = await refused(url, allowed(server))
    assert message.startswith("fetch refused: ") and why in message


async def test_fetch_in_the_tool_loop_through_the_console(
    make_settings, core_factory, server: Server
) -> None:
    url = server.url("/page")
    engine = ScriptedEngine(
        [f"Let me read it.\n/fetch {url}\n", "The page says the Moon formed 4.5 billion years ago."]
    )
    settings = make_settings(tools=["fetch"], fetch_allow=["127.0.0.1"], fetch_ports=[server.port])
    core = await core_factory(settings, engine)
    output = io.StringIO()
    console = ConsoleAdapter(
        dispatcher=core.dispatcher, stdin=io.StringIO("How old is the Moon?\n"), stdout=output
    )
    await console.converse()
    assert output.getvalue() == "Let me read it.\nThe page says the Moon formed 4.5 billion years ago.\n\n"
    system = engine.prompts[0][0]
    assert (
        system.role == "system" and "/fetch <url>" in system.content and "/fetch https://" in system.content
    )
    observation = engine.prompts[1][-1]
    assert observation.role == "observation" and observation.name == "fetch"
    assert observation.content.startswith("Title: The Moon\n") and "Theia" in observation.content
    assert "SECRET" not in observation.content


async def test_a_refused_fetch_in_the_tool_loop_is_a_one_line_observation(
    make_settings, core_factory
) -> None:
    engine = ScriptedEngine(["/fetch http://169.254.169.254/latest/meta-data/\n", "I cannot read that page."])
    core = await core_factory(make_settings(tools=["fetch"]), engine)
    output = io.StringIO()
    console = ConsoleAdapter(
        dispatcher=core.dispatcher, stdin=io.StringIO("read the metadata\n"), stdout=output
    )
    await console.converse()
    assert output.getvalue() == "I cannot read that page.\n\n"
    observation = engine.prompts[1][-1]
    assert observation.content == "Error: fetch refused: 169.254.169.254 is a cloud metadata address"


async def test_aiohttp_opens_every_socket_through_the_guard_even_for_an_ip_literal(server: Server) -> None:
    # aiohttp does not ask the resolver for an IP literal: the socket guard is what stops it
    connector = aiohttp.TCPConnector(socket_factory=_socket_guard(AddressRules()))
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(aiohttp.ClientConnectorError, match="127.0.0.1 is a loopback address"):
            await session.get(server.url("/page"))
    assert not server.slow_started.is_set()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("YANRAY_FETCH_ALLOW", "127.0.0.1,not-a-net", "'not-a-net' is not an address or network"),
        ("YANRAY_FETCH_PORTS", "80,70000", "70000 is not a list of ports"),
    ],
)
def test_a_bad_fetch_setting_is_one_line(monkeypatch, name: str, value: str, expected: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert expected in str(caught.value) and "\n" not in str(caught.value)


async def test_a_native_chatglm3_fetch_call_gets_the_page(server: Server) -> None:
    url = server.url("/page")
    session = NativeSession(
        [
            Generation("", "tool_call", ToolCall("fetch", {"url": url}, stored=f'tool_call(url="{url}")')),
            Generation("It formed 4.5 billion years ago.", "stop"),
        ]
    )
    tool = fetch_tool(allowed(server))
    assert tool.spec.parameters["required"] == ["url"] and "/fetch https://" in tool.spec.description
    result = await ToolLoop(tools={"fetch": tool}, max_rounds=2).run(session, options=GenerateOptions)  # type: ignore[arg-type]
    [observation] = session.appended
    assert observation.role == "observation" and observation.name == "fetch"
    assert observation.content.startswith("Title: The Moon\n") and "Theia" in observation.content
    assert result.visible == "It formed 4.5 billion years ago."


async def test_hostile_html_is_a_one_line_observation_in_time_on_a_bounded_pool(server: Server) -> None:
    """Three fetches of 1.5 MB of `<p>` at once: each is extracted from at most MAX_EXTRACT_BYTES
    (uncapped, each takes over 30 s on a loaded machine), no more than EXTRACT_THREADS threads
    extract, and the default thread pool stays free for everything else."""
    tool = fetch_tool(allowed(server))
    url = server.url("/paragraphs")
    busy: set[str] = set()
    done = threading.Event()

    def watch() -> None:  # the threads extracting, seen every 10 ms
        while not done.wait(0.01):
            busy.update(t.name for t in threading.enumerate() if t.name.startswith("yanray-extract"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    engines = [ScriptedEngine([f"/fetch {url}\n", "No text there."]) for _ in range(3)]
    loop = ToolLoop(tools={"fetch": tool}, max_rounds=1)
    started = time.monotonic()
    try:
        runs = [
            asyncio.create_task(loop.run(await engine.start([]), options=GenerateOptions))
            for engine in engines
        ]
        await until(lambda: busy, within=30, what="an extraction begins")  # then: to_thread is still free
        begun = time.monotonic()
        await asyncio.to_thread(time.sleep, 0)
        assert time.monotonic() - begun < 1.0
        results = await asyncio.gather(*runs)
    finally:
        done.set()
        watcher.join()
    assert time.monotonic() - started < tool.timeout
    for result in results:
        (observation,) = [r.observation for r in result.rounds if r.observation is not None]
        assert observation == f"Error: fetch found no readable text at {url}"
        assert result.visible == "No text there."
    assert 1 <= len(busy) <= EXTRACT_THREADS, busy
    assert MAX_EXTRACT_BYTES < 1_500_000


class NamesResolver:
    """Stands in for aiohttp's threaded resolver (the system's DNS): fixed names, fixed addresses."""

    names: dict[str, list[str]] = {}

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        return [
            {"hostname": host, "host": a, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
            for a in self.names[host]
        ]

    async def close(self) -> None:
        pass


@pytest.fixture
def names(monkeypatch) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    monkeypatch.setattr(NamesResolver, "names", table)
    monkeypatch.setattr(aiohttp, "ThreadedResolver", NamesResolver)
    return table


async def test_a_name_that_resolves_to_a_private_address_is_refused(server: Server, names, caplog) -> None:
    caplog.set_level(logging.INFO, logger="yanray.bot.tools.fetch")
    names["intranet.example"] = ["10.1.2.3"]
    names["both.example"] = ["192.168.1.1", "127.0.0.1"]
    config = allowed(server)
    url = f"http://intranet.example:{server.port}/page"
    assert (
        await refused(url, config)
        == "fetch refused: intranet.example resolves to 10.1.2.3, a private address"
    )
    # only the checked address is connected to: the private one never reaches a socket
    text = await fetch_page(f"http://both.example:{server.port}/page", config)
    assert text.startswith("Title: The Moon\n")
    assert "both.example refused" not in caplog.text and "connection to" not in caplog.text
    names["both.example"] = ["192.168.1.1", "10.0.0.1"]
    message = await refused(f"http://both.example:{server.port}/page", config)
    assert message == "fetch refused: both.example resolves to 192.168.1.1, a private address"


def test_the_allowance_setting_defaults_to_nothing(server: Server, tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, fetch_ports=[server.port])
    assert settings.fetch_allow == [] and fetch_config(settings).rules.allow == ()
    with pytest.raises(AddressRefused, match="127.0.0.1 is a loopback address"):
        check_url(server.url("/page"), fetch_config(settings).rules)
    granted = Settings(data_dir=tmp_path, fetch_ports=[server.port], fetch_allow=["127.0.0.1"])
    assert check_url(server.url("/page"), fetch_config(granted).rules).port == server.port


async def test_no_cookies_and_no_proxy_from_the_environment(server: Server, names, monkeypatch) -> None:
    # a proxy that does not exist: a client that took it from the environment would fail
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    names["pages.example"] = ["127.0.0.1"]  # a name: a cookie jar keeps no cookies for an IP
    url = f"http://pages.example:{server.port}"
    text = await fetch_page(f"{url}/cookie", allowed(server))
    assert text == f"URL: {url}/echo\n\ncookie: none"  # the redirect's cookie is not sent back
