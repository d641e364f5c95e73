"""The operator's HTTP listener (`YANRAY_HTTP_LISTEN`, default 127.0.0.1:8089; empty: none):
`/healthz` for a container healthcheck or a load balancer, `/metrics` for Prometheus.

It starts before the model loads, so the port is claimed (or found taken: one line, and
`yanray run` stops before spending minutes on the model) and `/healthz` answers "starting"
meanwhile; the entry point hands it the core and the adapters once they are up (`attach`).

`/healthz` is 200 with `{"status": "ok", ...}` when every part is well, else 503 naming the
part that is not, one short reason each:
- engine: loaded (a local model not shut down; an engine that does not say is taken as
  loaded);
- database: answers `SELECT 1` within HEALTH_TIMEOUT_S (a real query on a pooled connection).
  One check runs at a time: requests that arrive while it runs share its answer, so a flood
  of `/healthz` costs one connection of the pool, not all of them (the bot needs them);
- adapters: each started and connected to its platform (`online`; the terminal always is).

A request the HTTP parser refuses (a header line over 8 KB, too many headers, a bad request
line) gets aiohttp's 400 and one debug line here, not aiohttp's logged traceback: anyone who
reaches the port could otherwise fill the log with them.

It listens on loopback by default: the metrics name no user, but the port is for the
operator's own tools. To scrape from another host or container, set 0.0.0.0:8089 behind a
firewall.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST

from yanray.bot.errors import ConfigError
from yanray.bot.metrics import Metrics
from yanray.storage import Database

logger = logging.getLogger(__name__)

#: seconds the database has to answer the health check's query
HEALTH_TIMEOUT_S = 2.0


class _MalformedInOneLine(logging.LoggerAdapter):
    """aiohttp's server logger, with a request it could not parse as one debug line."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            logger.debug("refused a malformed request (%s)", type(exc_info).__name__)
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)


class StatusListener:
    """`/healthz` and `/metrics` over aiohttp, on `host:port`."""

    def __init__(self, host: str, port: int, *, metrics: Metrics) -> None:
        self.host, self.port = host, port
        self.metrics = metrics
        self.engine: Any = None
        self.db: Database | None = None
        self.adapters: Sequence[Any] = ()
        self._runner: web.AppRunner | None = None
        self._checking: asyncio.Future[str] | None = None

    def attach(self, *, engine: Any, db: Database, adapters: Sequence[Any]) -> None:
        """The parts `/healthz` looks at, once they exist."""
        self.engine, self.db, self.adapters = engine, db, adapters

    async def start(self) -> None:
        """Listen, or raise `ConfigError` (one line) if the address cannot be had."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            logger=_MalformedInOneLine(logging.getLogger("aiohttp.server"), {}),
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(
                f"YANRAY_HTTP_LISTEN={self.host}:{self.port}: cannot listen there ({reason}); "
                "is another program using it? Choose another port, or leave it empty for no listener"
            ) from exc
        self._runner = runner
        sockets = getattr(site._server, "sockets", None) or ()  # the port actually bound (port 0)
        if sockets:
            self.port = sockets[0].getsockname()[1]
        # at debug: a start that fails later (a refused token) stays one line on stderr;
        # `yanray run` names the address at info once it is running
        logger.debug("health and metrics on http://%s:%d/healthz and /metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._checking is not None:  # a check no request waits for any more
            self._checking.cancel()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> StatusListener:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- handlers ----------------------------------------------------------------------

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = self.metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _healthz(self, _request: web.Request) -> web.Response:
        report = await self.health()
        healthy = report.pop("healthy")
        return web.json_response(report, status=200 if healthy else 503)

    async def health(self) -> dict[str, Any]:
        """Each part's state ("ok" or why not), `status`, and `healthy` (for the status code)."""
        if self.db is None:
            return {"healthy": False, "status": "starting", "engine": "loading"}
        parts: dict[str, Any] = {
            "engine": "ok" if getattr(self.engine, "loaded", True) else "not loaded",
            "database": await self._database(),
            "adapters": {
                adapter.platform: "ok" if getattr(adapter, "online", True) else "not connected"
                for adapter in self.adapters
            },
        }
        healthy = (
            parts["engine"] == "ok"
            and parts["database"] == "ok"
            and all(state == "ok" for state in parts["adapters"].values())
        )
        return {"healthy": healthy, "status": "ok" if healthy else "unhealthy", **parts}

    async def _database(self) -> str:
        if self._checking is None:
            checking = self._checking = asyncio.ensure_future(self._ping())
            checking.add_done_callback(lambda _done: setattr(self, "_checking", None))
        # shielded: a request that goes away does not cancel the check the others wait for
        return await asyncio.shield(self._checking)

    async def _ping(self) -> str:
        assert self.db is not None
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await self.db.ping()
        except TimeoutError:
            logger.warning("health check: the database did not answer within %g s", HEALTH_TIMEOUT_S)
            return f"no answer within {HEALTH_TIMEOUT_S:g} s"
        except Exception as exc:  # StorageError, or a driver's own: the check reports, never fails
            logger.warning("health check: the database is unreachable: %s", exc)
            return f"unreachable: {exc}"
        return "ok"
