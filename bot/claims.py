"""This process's hold on the requests it answers, when several processes share a database.

Every process has an owner id (`host:pid:random`). A request is claimed by the process
that stores it (the dispatcher, in the accepting transaction) and sits in that process's
fair queue; starting it re-checks the claim in the database (`crud.start_request`). While
the process lives, `Claims.run` renews the lease of everything it holds every third of
`YANRAY_CLAIM_LEASE`, and looks for requests nobody holds: those of a process that died
(its lease ran out) or stopped (it released them, `Core.aclose`). It takes them with
`FOR UPDATE SKIP LOCKED` (`crud.take_over`) and answers them through their stored route,
as after a restart (`EngineWorker.take_over`). So each request is answered by one process,
and a process can answer what another accepted.

SQLite has one process per database (`storage/lock.py`): there the claims are written but
never contested, nothing is renewed, and the start-up takes over every request left
unfinished at once, as it always did. See docs/decisions/several-workers.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable

from yanray.storage import Database, crud

logger = logging.getLogger(__name__)


def process_id() -> str:
    """`host:pid:random`, at most 64 characters: unique even for two cores in one process."""
    host = socket.gethostname()[:40] or "host"
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"


class Claims:
    def __init__(self, *, db: Database, lease: float) -> None:
        self.db = db
        self.owner = process_id()
        self.lease = lease
        #: one process per database (SQLite): nobody else could take or hold a request
        self.exclusive = db.engine.dialect.name == "sqlite"

    @property
    def every(self) -> float:
        """Seconds between renewals: a third of the lease, so two renewals can fail in a row."""
        return self.lease / 3

    async def renew(self) -> int:
        async with self.db.transaction() as session:
            return await crud.renew_claims(session=session, owner=self.owner, lease=self.lease)

    async def release(self) -> None:
        """Give up what this process holds (it stops): the others take it at once."""
        async with self.db.transaction() as session:
            await crud.release_claims(session=session, owner=self.owner)

    async def run(self, take_over: Callable[[], Awaitable[int]]) -> None:
        """Renew this process's leases and take over what nobody holds, forever. A failure (the
        database is unreachable a moment) is logged and tried again at the next round; if the
        leases run out meanwhile, the others take the requests and this process's answers to
        them are dropped when it stores them (`EngineWorker._close`)."""
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.renew()
                await take_over()
            except Exception:
                logger.warning("could not renew the claims of %s", self.owner, exc_info=True)
