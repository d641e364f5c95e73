"""The `search` tool: web search through the operator's SearxNG instance (its JSON API).

`YANRAY_SEARXNG_URL` is the operator's own instance (self-hosted, no API key), often a
private address such as a compose service; that is fine because the operator chose it,
so unlike `fetch` no address is refused here. What comes from the model is only the
query: it is bounded (`MAX_QUERY_CHARS`) and goes into the query string through yarl,
which percent-encodes it, so it can never change the path, host or other parameters.

The request: `GET {url}/search?q=...&format=json`, with connect and total timeouts, no
cookies and no proxy from the environment. The body is read up to `MAX_RESPONSE_BYTES`
(decompressed) before any JSON parsing; a larger answer is refused. The observation is
the top `results` results, each title, URL and snippet cut to a bound; the tool loop cuts
the whole to `OBSERVATION_TOKENS` (`budget`) with a note saying so. Every failure is one line. SearxNG answers 403
when its `settings.yml` does not list `json` under `search.formats`; the log says so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from yarl import URL

from yanray.bot.errors import ToolError
from yanray.bot.tools import Tool, one_string
from yanray.engine.base import ToolSpec

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 300
MAX_RESPONSE_BYTES = 1_000_000
RESULTS = 5
TITLE_CHARS = 120
URL_CHARS = 300
SNIPPET_CHARS = 300
#: the whole observation's budget in estimated tokens (about 1,200 characters of English)
OBSERVATION_TOKENS = 600
CONNECT_TIMEOUT = 5.0
TIMEOUT = 15.0  # the tool's limit; the HTTP request's own is a little shorter
REQUEST_TIMEOUT = 12.0


def _clean(value: Any, limit: int) -> str:
    """A result field as one short line: whitespace collapsed, cut to `limit` with `…`."""
    if not isinstance(value, str):
        return ""
    text = " ".join(value[: limit * 4].split())  # bounded first: a field may be megabytes
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def format_results(query: str, payload: Any, *, results: int = RESULTS) -> str:
    """The observation for SearxNG's JSON answer `payload`; raises ToolError for a wrong shape."""
    items = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(items, list):
        raise ToolError("SearxNG's answer has no result list")
    lines: list[str] = []
    for item in items:
        if len(lines) >= results:
            break
        if not isinstance(item, dict):
            continue
        title, url = _clean(item.get("title"), TITLE_CHARS), _clean(item.get("url"), URL_CHARS)
        if not url:
            continue
        entry = f"{len(lines) + 1}. {title or url}\n   {url}"
        if snippet := _clean(item.get("content"), SNIPPET_CHARS):
            entry += f"\n   {snippet}"
        lines.append(entry)
    if not lines:
        return f"No results for {_clean(query, 100)!r}."
    return "\n".join(lines)


class Searcher:
    """Queries one SearxNG instance; a fresh HTTP session per search (searches are rare)."""

    def __init__(self, base_url: str, *, results: int = RESULTS, timeout: float = REQUEST_TIMEOUT) -> None:
        self.endpoint = URL(base_url.rstrip("/") + "/search")
        self.results = results
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT)

    def url(self, query: str) -> URL:
        return self.endpoint.update_query({"q": query, "format": "json"})

    async def search(self, query: str) -> str:
        query = " ".join(query.split())
        if not query:
            raise ToolError("search needs a query, e.g. /search weather in Paris")
        if len(query) > MAX_QUERY_CHARS:
            raise ToolError(f"the query is {len(query)} characters long; the limit is {MAX_QUERY_CHARS}")
        body = await self._get(self.url(query))
        try:
            payload = json.loads(body)
        except ValueError:  # UnicodeDecodeError included
            logger.warning("SearxNG at %s answered with something that is not JSON", self.endpoint)
            raise ToolError("the search service gave an answer that is not JSON") from None
        except RecursionError:  # json's decoder refuses arrays or objects nested thousands deep
            logger.warning("SearxNG at %s answered with JSON nested too deeply", self.endpoint)
            raise ToolError("the search service's answer is nested too deeply to read") from None
        return format_results(query, payload, results=self.results)

    async def _get(self, url: URL) -> bytes:
        try:
            async with aiohttp.ClientSession(
                timeout=self.timeout, trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
            ) as session:
                async with session.get(url, headers={"Accept": "application/json"}) as response:
                    if response.status != 200:
                        hint = " (is json in its search.formats?)" if response.status == 403 else ""
                        logger.warning(
                            "SearxNG at %s answered HTTP %d%s", self.endpoint, response.status, hint
                        )
                        raise ToolError(f"the search service answered HTTP {response.status}")
                    body = bytearray()
                    async for chunk in response.content.iter_chunked(65536):
                        body += chunk
                        if len(body) > MAX_RESPONSE_BYTES:
                            logger.warning("SearxNG's answer passed %d bytes; refused", MAX_RESPONSE_BYTES)
                            raise ToolError(
                                f"the search service's answer was larger than {MAX_RESPONSE_BYTES:,} bytes"
                            )
                    return bytes(body)
        except TimeoutError:
            logger.warning("SearxNG at %s did not answer in time", self.endpoint)
            raise ToolError("the search service did not answer in time") from None
        except aiohttp.ClientError as exc:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            logger.warning("SearxNG at %s failed: %s", self.endpoint, reason)
            raise ToolError("the search service could not be reached") from None


def search_tool(base_url: str, *, results: int = RESULTS) -> Tool:
    """The `search` tool over the SearxNG instance at `base_url`."""
    searcher = Searcher(base_url, results=results)

    async def handler(args: Mapping[str, Any]) -> str:
        query = args.get("query")
        if not isinstance(query, str):
            raise ToolError('search needs a "query" string, e.g. /search weather in Paris')
        return await searcher.search(query)

    spec = ToolSpec(
        name="search",
        description=(
            f"Searches the web: the top {results} results as title, URL and snippet. "
            "Example: /search weather in Paris"
        ),
        parameters=one_string("query", "what to search for"),
        usage="/search <query>",
    )
    return Tool(
        spec=spec,
        handler=handler,
        slash_argument="query",
        timeout=TIMEOUT,
        max_argument_chars=MAX_QUERY_CHARS,
        max_observation_tokens=OBSERVATION_TOKENS,
    )
