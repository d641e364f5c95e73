"""Read-only queries for the training export (`yanray export`, `bot/export.py`).

The export reads what the bot stored and writes nothing back, so every function here only
selects, in the caller's `Database.reading()` transaction. A person is named as the pair
(platform, platform id) that ratings, consents and `YANRAY_ADMINS` use; a message whose
writer is unknown (no `user_id`) is named None, which the export treats as a person who
did not agree to share.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncSession

from yanray.storage.models import Conversation, Message, Rating, Request, ShareConsent, User

Person = tuple[str, str]  # (platform, platform id)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for another database, or an in-memory one), so that a
    reader can refuse a missing file instead of creating an empty database."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(str(parsed.database))


async def share_consents(*, session: AsyncSession) -> set[Person]:
    """Everyone who said `/share on` (and has not said `/share off` since)."""
    rows = await session.execute(select(ShareConsent.platform, ShareConsent.user_id))
    return {(platform, user_id) for platform, user_id in rows.all()}


async def conversations(*, session: AsyncSession) -> Sequence[Conversation]:
    result = await session.scalars(select(Conversation).order_by(Conversation.id))
    return result.all()


async def writers(*, session: AsyncSession) -> dict[int, set[Person | None]]:
    """Per conversation, everyone who ever wrote in it: every user message counts, also those
    taken out of the context (a superseded question, turns before a /reset)."""
    rows = await session.execute(
        select(Message.conversation_id, User.platform, User.external_id)
        .outerjoin(User, Message.user_id == User.id)
        .where(Message.role == "user")
        .distinct()
    )
    out: dict[int, set[Person | None]] = defaultdict(set)
    for conversation_id, platform, external_id in rows.all():
        out[conversation_id].add((platform, external_id) if platform is not None else None)
    return dict(out)


async def messages(*, session: AsyncSession, conversation_id: int) -> list[tuple[Message, Person | None]]:
    """The conversation's messages that are not superseded, in order, each with its writer
    (None for the bot's own messages and for an unknown writer)."""
    rows = await session.execute(
        select(Message, User.platform, User.external_id)
        .outerjoin(User, Message.user_id == User.id)
        .where(Message.conversation_id == conversation_id, Message.superseded.is_(False))
        .order_by(Message.turn, Message.id)
    )
    return [
        (message, (platform, external_id) if platform is not None else None)
        for message, platform, external_id in rows.all()
    ]


async def net_ratings(*, session: AsyncSession, conversation_id: int) -> dict[int, int]:
    """Per rated request of the conversation, the sum of everyone's latest rating (+1 / -1)."""
    rows = await session.execute(
        select(Rating.request_id, func.sum(Rating.value))
        .join(Request, Request.id == Rating.request_id)
        .where(Request.conversation_id == conversation_id)
        .group_by(Rating.request_id)
    )
    return {request_id: int(total) for request_id, total in rows.all()}


async def request_routes(*, session: AsyncSession, conversation_id: int) -> dict[int, dict[str, Any]]:
    """Per request of the conversation, its route (where the answer went, and its language)."""
    rows = await session.execute(
        select(Request.id, Request.route).where(Request.conversation_id == conversation_id)
    )
    return {request_id: dict(route or {}) for request_id, route in rows.all()}
