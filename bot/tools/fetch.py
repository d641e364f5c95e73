"""The `fetch` tool: read a public web page and give the model its title and main text.

The model's URL is untrusted, so the tool is SSRF-safe by construction (the rules are in
`addresses`):

- the URL is checked before anything is resolved (scheme, credentials, port, numeric and
  `localhost` hosts);
- every address a name resolves to is checked by `_CheckingResolver`, which hands aiohttp
  only the public ones, so the connection goes to a checked address;
- `_guarded_socket`, the connector's `socket_factory`, checks the address each socket is
  about to connect to, because aiohttp does not ask the resolver for an IP-literal URL and
  happy-eyeballs may try addresses in its own order: nothing connects unchecked;
- redirects are followed by hand, at most `MAX_REDIRECTS`, each hop's URL checked again;
- no cookies (`DummyCookieJar`), no proxy or .netrc from the environment (`trust_env=False`).

Responses: only text, HTML, JSON and XML content types; the body is read in chunks after
decompression and reading stops at `max_bytes` (a small gzip body that inflates past it is
cut there); connect and read timeouts. HTML goes through trafilatura (title plus main text,
no scripts, styles or navigation), at most `MAX_EXTRACT_BYTES` of it, off the event loop on
a pool of its own (`EXTRACT_THREADS`); JSON and other text pass through.
The tool loop cuts the observation to `OBSERVATION_TOKENS` (`budget`) and says so; a body cut at
`max_bytes` says so here. A refused or failed fetch raises
`ToolError` with one line saying why.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from yanray.bot.errors import ToolError
from yanray.bot.tools import Tool, one_string
from yanray.bot.tools.addresses import AddressRefused, AddressRules, check_url
from yanray.engine.base import ToolSpec

if TYPE_CHECKING:
    from yanray.bot.settings import Settings

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
DEFAULT_MAX_BYTES = 2 * 2**20
#: the observation's budget in estimated tokens (about 3,000 characters of English)
OBSERVATION_TOKENS = 1500
#: HTML handed to trafilatura, in bytes (or characters). Its time grows about linearly, but
#: hostile markup is slow: on the loaded 2-core dev machine 256 KB of bare `<p>` tags took
#: 8.2 s alone and 10-14 s with two at once (128 KB: 4.1 s alone), of `<td>x` 4.1 s, of `<li>`
#: 3.0 s. 128 KB keeps the worst near 4-7 s, so a page that waits behind two others in the
#: pool still ends inside the tool's 35 s limit; most articles' text starts in their first
#: 128 KB, and a longer page's observation says that only the start was read
MAX_EXTRACT_BYTES = 128 * 1024
#: threads that run trafilatura: its own small pool, so hostile pages wait their turn there
#: instead of piling up threads or taking the default pool that other `to_thread` users share
#: (a thread cannot be stopped; one running when the tool times out finishes its page)
EXTRACT_THREADS = 2
_extractor = ThreadPoolExecutor(max_workers=EXTRACT_THREADS, thread_name_prefix="yanray-extract")
_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_TEXT_TYPES = frozenset({"application/json", "application/xml", "application/xhtml+xml"})
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
USER_AGENT = "Yanray-fetch/1.0 (a chat bot's page reader)"


@dataclass(frozen=True)
class FetchConfig:
    rules: AddressRules = field(default_factory=AddressRules)
    max_bytes: int = DEFAULT_MAX_BYTES
    connect_timeout: float = 5.0
    read_timeout: float = 10.0


class _CheckingResolver(AbstractResolver):
    """aiohttp's threaded resolver, handing on only the addresses the rules allow."""

    def __init__(self, rules: AddressRules) -> None:
        self._rules = rules
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        reasons: list[str] = []
        for result in results:
            why = self._rules.refusal(ipaddress.ip_address(result["host"]))
            if why is None:
                allowed.append(result)
            else:
                reasons.append(f"{result['host']}, {why}")
        if not allowed:
            logger.info("fetch: %s refused: %s", host, "; ".join(reasons))
            raise PermissionError(
                errno.EACCES, f"{host} resolves to {reasons[0] if reasons else 'no address'}"
            )
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _socket_guard(rules: AddressRules) -> Any:
    """The connector's `socket_factory`: refuses to open a socket to an unchecked address."""

    def guarded_socket(addr_info: Any) -> socket.socket:
        family, type_, proto, _, address = addr_info
        why = rules.refusal(ipaddress.ip_address(address[0]))
        if why is not None:
            logger.info("fetch: connection to %s refused: %s", address[0], why)
            raise PermissionError(errno.EACCES, f"{address[0]} is {why}")
        sock = socket.socket(family=family, type=type_, proto=proto)
        sock.setblocking(False)
        return sock

    return guarded_socket


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


async def fetch_page(url: str, config: FetchConfig) -> str:
    """The observation for `url`; `ToolError` (one line) when it is refused or fails."""
    try:
        check_url(url, config.rules)
    except AddressRefused as exc:
        raise ToolError(f"fetch refused: {exc}") from None
    connector = aiohttp.TCPConnector(
        resolver=_CheckingResolver(config.rules),
        socket_factory=_socket_guard(config.rules),
        use_dns_cache=False,
        limit=4,
    )
    # connect: name resolution and connecting together; sock_read: the longest silence
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=config.connect_timeout,
        sock_connect=config.connect_timeout,
        sock_read=config.read_timeout,
    )
    async with aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        timeout=timeout,
        headers={"User-Agent": USER_AGENT, "Accept": "text/html, application/json, text/*;q=0.8"},
    ) as session:
        try:
            return await _fetch(session, url, config)
        except AddressRefused as exc:
            raise ToolError(f"fetch refused: {exc}") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise ToolError(f"fetch failed: {url} did not answer in time") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, PermissionError):  # the resolver or the socket guard
                raise ToolError(f"fetch refused: {_one_line(exc.strerror or str(exc))}") from None
            raise ToolError(f"fetch failed: {_one_line(exc.strerror or str(exc))}") from None
        except (aiohttp.ClientError, OSError, UnicodeError, ValueError) as exc:
            logger.info("fetch of %s failed: %r", url, exc)
            raise ToolError(f"fetch failed: {_one_line(str(exc)) or type(exc).__name__}") from None


async def _fetch(session: aiohttp.ClientSession, url: str, config: FetchConfig) -> str:
    for _hop in range(MAX_REDIRECTS + 1):
        async with session.get(url, allow_redirects=False) as response:
            if response.status in _REDIRECTS:
                location = response.headers.get("Location", "")
                if not location:
                    raise ToolError(f"fetch failed: a {response.status} redirect without a Location")
                url = urljoin(url, location)
                check_url(url, config.rules)  # AddressRefused: the caller says why
                continue
            if response.status >= 400:
                raise ToolError(
                    f"fetch failed: the server answered {response.status} {response.reason or ''}".rstrip()
                )
            kind = response.content_type.lower()
            if not (kind.startswith("text/") or kind in _TEXT_TYPES or kind.endswith(("+json", "+xml"))):
                raise ToolError(
                    f"fetch refused: the content type is {_one_line(kind, 80)}, not text, HTML, JSON or XML"
                )
            body, cut = await _read_capped(response, config.max_bytes)
            if kind in _HTML_TYPES and response.charset is None:
                # no charset in the header: trafilatura reads the page's own <meta charset>
                return await _observation(url, kind, body, cut, config)
            try:
                text = body.decode(response.charset or "utf-8", errors="replace")
            except LookupError:  # an unknown charset name
                text = body.decode("utf-8", errors="replace")
            return await _observation(url, kind, text, cut, config)
    raise ToolError(f"fetch failed: more than {MAX_REDIRECTS} redirects")


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most `limit` decompressed bytes of the body, and whether there was more."""
    parts: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            logger.info("fetch: %s cut at %d bytes", response.url, limit)
            return b"".join(parts)[:limit], True
    return b"".join(parts), False


async def _observation(url: str, kind: str, page: str | bytes, cut: bool, config: FetchConfig) -> str:
    title = ""
    if kind in _HTML_TYPES:
        if len(page) > MAX_EXTRACT_BYTES:
            logger.info(
                "fetch: %s has %d bytes of HTML; extracting from the first %d",
                url,
                len(page),
                MAX_EXTRACT_BYTES,
            )
            # cut before the last tag that starts within the cap: no half tag read as text
            end = page.rfind("<" if isinstance(page, str) else b"<", 0, MAX_EXTRACT_BYTES)  # type: ignore[arg-type]
            page, cut = page[: end if end > 0 else MAX_EXTRACT_BYTES], True
        loop = asyncio.get_running_loop()
        title, text = await loop.run_in_executor(_extractor, extract_html, page, url)
        if not text:
            raise ToolError(f"fetch found no readable text at {url}")
    else:
        text = page if isinstance(page, str) else page.decode("utf-8", errors="replace")
    lines = [f"Title: {_one_line(title)}"] if title else []
    lines.append(f"URL: {url}")
    if cut:  # said first: the loop's cut to the token budget may take the end away
        read = min(config.max_bytes, MAX_EXTRACT_BYTES) if kind in _HTML_TYPES else config.max_bytes
        lines.append(f"[cut: the page is longer than {read:,} bytes; only the start was read]")
    head = "\n".join(lines) + "\n\n"
    body = text.strip()
    return head + body


def extract_html(html: str | bytes, url: str) -> tuple[str, str]:
    """(title, main text) of an HTML page, with trafilatura; runs in a worker thread."""
    import trafilatura  # a slow import, paid on the first fetch only

    document = trafilatura.bare_extraction(
        html, url=url, include_comments=False, include_tables=True, with_metadata=True, favor_recall=True
    )
    if document is None:
        return "", ""
    title = getattr(document, "title", None) or ""
    text = getattr(document, "text", None) or ""
    return title, text


def fetch_config(settings: Settings | None) -> FetchConfig:
    """The tool's configuration from `YANRAY_FETCH_PORTS` and `YANRAY_FETCH_ALLOW`."""
    if settings is None:
        return FetchConfig()
    return FetchConfig(rules=AddressRules.from_settings(settings.fetch_ports, settings.fetch_allow))


def fetch_tool(config: FetchConfig | None = None) -> Tool:
    """The `fetch` tool with `config` (the defaults when None)."""
    settings = config or FetchConfig()

    async def handler(args: Mapping[str, Any]) -> str:
        url = args.get("url")
        if not isinstance(url, str) or not url.strip():
            raise ToolError('fetch needs a "url" string, e.g. /fetch https://example.org/')
        return await fetch_page(url.strip(), settings)

    spec = ToolSpec(
        name="fetch",
        description=(
            "Reads a public web page: its title and main text. "
            "Example: /fetch https://en.wikipedia.org/wiki/Moon"
        ),
        parameters=one_string("url", "e.g. https://en.wikipedia.org/wiki/Moon"),
        usage="/fetch <url>",
    )
    timeout = settings.connect_timeout + settings.read_timeout * 2 + 10.0
    return Tool(
        spec=spec,
        handler=handler,
        slash_argument="url",
        timeout=timeout,
        max_argument_chars=2000,
        max_observation_tokens=OBSERVATION_TOKENS,
    )
