"""Data-access functions. Keyword-only, each takes the `AsyncSession` of the caller's transaction.

The caller owns the transaction (`Database.transaction()`), so several calls commit
together: the request is marked done in the same transaction that stores the reply.

Claims (several processes on one PostgreSQL database): a request is held by one process,
`Request.claimed_by`, until `Request.lease_until`. The process that stores a request claims
it; it renews the leases of everything it holds (`renew_claims`) and gives them up when it
stops (`release_claims`); `take_over` claims what nobody holds, or what a process that died
stopped renewing, with `FOR UPDATE SKIP LOCKED` so that two processes never take the same
row. Lease times are the database's clock on PostgreSQL (one clock for every host), this
process's on SQLite, where one process holds the database anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from yanray.storage.models import (
    AccessRule,
    AnswerMessage,
    BlockedChat,
    Conversation,
    Message,
    Rating,
    Request,
    ShareConsent,
    User,
    utcnow,
)

PENDING = ("queued", "running")
T = TypeVar("T", User, Conversation)


async def _get_or_add(
    session: AsyncSession, model: type[T], where: Sequence[Any], make: Callable[[], T]
) -> T:
    """The row matching `where`, inserted by `make()` if missing. Two first messages at once
    (PostgreSQL runs them in parallel) both try to insert: the loser reads the winner's row."""
    row = await session.scalar(select(model).where(*where))
    if row is not None:
        return row
    try:
        async with session.begin_nested():
            row = make()
            session.add(row)
    except IntegrityError:
        row = await session.scalar(select(model).where(*where))
        if row is None:
            raise
    return row


async def get_or_create_conversation(
    *,
    session: AsyncSession,
    platform: str,
    chat_id: str,
    user_key: str,
    user_external_id: str,
    display_name: str,
) -> tuple[Conversation, User]:
    """The conversation for (platform, chat, user_key) and the speaking user, created on first use."""
    name = display_name[:256]
    user = await _get_or_add(
        session,
        User,
        [User.platform == platform, User.external_id == user_external_id],
        lambda: User(platform=platform, external_id=user_external_id, display_name=name),
    )
    if name and user.display_name != name:
        user.display_name = name
    conversation = await _get_or_add(
        session,
        Conversation,
        [
            Conversation.platform == platform,
            Conversation.chat_id == chat_id,
            Conversation.user_key == user_key,
        ],
        lambda: Conversation(platform=platform, chat_id=chat_id, user_key=user_key, context_start=0),
    )
    return conversation, user


async def get_conversation(*, session: AsyncSession, conversation_id: int) -> Conversation | None:
    return await session.get(Conversation, conversation_id)


async def add_message(
    *,
    session: AsyncSession,
    conversation_id: int,
    role: str,
    text: str,
    turn: int | None = None,
    user_id: int | None = None,
    tool_name: str = "",
    request_id: int | None = None,
    external_id: str | None = None,
) -> Message:
    """Store one message. A user message (turn None) opens its own turn."""
    message = Message(
        conversation_id=conversation_id,
        role=role,
        text=text,
        turn=turn or 0,
        user_id=user_id,
        tool_name=tool_name,
        request_id=request_id,
        external_id=external_id,
        superseded=False,
    )
    session.add(message)
    await session.flush()
    if turn is None:
        message.turn = message.id
    return message


def _now(session: AsyncSession) -> Any:
    """The time leases are measured in: the database's on PostgreSQL, this process's elsewhere."""
    if session.get_bind().dialect.name == "postgresql":
        return func.now()
    return utcnow()


def _lease_end(session: AsyncSession, seconds: float) -> Any:
    return _now(session) + timedelta(seconds=seconds)


def _unclaimed(session: AsyncSession) -> ColumnElement[bool]:
    """Held by nobody: never claimed, released, or its holder stopped renewing it."""
    return or_(Request.claimed_by.is_(None), Request.lease_until < _now(session))


async def create_request(
    *,
    session: AsyncSession,
    conversation_id: int,
    user_message_id: int,
    route: dict[str, Any],
    owner: str | None = None,
    lease: float = 0.0,
) -> Request:
    """Store a queued request, claimed by `owner` for `lease` seconds when given."""
    request = Request(
        conversation_id=conversation_id,
        user_message_id=user_message_id,
        status="queued",
        route=dict(route),
        delivered=False,
        attempts=0,
        claimed_by=owner,
        lease_until=_lease_end(session, lease) if owner is not None else None,
    )
    session.add(request)
    await session.flush()
    return request


async def get_request(*, session: AsyncSession, request_id: int, lock: bool = False) -> Request | None:
    """The request; with `lock`, its row locked until the transaction ends (PostgreSQL), so
    that no other process takes it over meanwhile."""
    if lock:
        return await session.get(Request, request_id, with_for_update=True, populate_existing=True)
    return await session.get(Request, request_id)


async def start_request(
    *, session: AsyncSession, request_id: int, owner: str | None = None, lease: float = 0.0
) -> Request | None:
    """Mark a queued request running (claimed by `owner`, when given); None if it is no longer
    queued (cancelled meanwhile) or another process holds it (it took the request over while
    this one did not renew its lease)."""
    request = await session.get(Request, request_id, with_for_update=True, populate_existing=True)
    if request is None or request.status != "queued":
        return None
    if owner is not None and request.claimed_by not in (None, owner):
        held = await session.scalar(select(Request.id).where(Request.id == request_id, _unclaimed(session)))
        if held is None:
            return None
    request.status = "running"
    request.attempts += 1
    request.started_at = utcnow()
    if owner is not None:
        request.claimed_by = owner
        request.lease_until = _lease_end(session, lease)
    return request


async def renew_claims(*, session: AsyncSession, owner: str, lease: float) -> int:
    """Extend the lease of every request `owner` holds and has not delivered (a request waiting,
    running, or answered but not yet shown); returns how many. A row another transaction is
    writing just now (this process storing an answer, say) is skipped, not waited for: waiting
    could deadlock with a transaction that locks several rows in another order, and the row
    is renewed at the next round, well within its lease."""
    held = (
        select(Request.id)
        .where(Request.claimed_by == owner, Request.delivered.is_(False))
        .with_for_update(skip_locked=True)
    )
    result = await session.execute(
        update(Request)
        .where(Request.id.in_(held))
        .values(lease_until=_lease_end(session, lease))
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def release_claims(*, session: AsyncSession, owner: str) -> None:
    """Give up every undelivered request `owner` holds, so that another process takes them at
    once (a delivered one keeps the name of the process that answered it)."""
    await session.execute(
        update(Request)
        .where(Request.claimed_by == owner, Request.delivered.is_(False))
        .values(claimed_by=None, lease_until=None)
        .execution_options(synchronize_session=False)
    )


async def take_over(
    *,
    session: AsyncSession,
    owner: str,
    lease: float,
    platforms: Collection[str] | None = None,
    limit: int | None = None,
    everything: bool = False,
) -> list[Request]:
    """Claim, oldest first, the requests left to finish that no process holds (`everything`:
    held or not, for the one process of a SQLite database): queued, running, or done but not
    delivered. Only those of `platforms`, when given; at most `limit`. Rows another
    transaction is claiming are skipped (`SKIP LOCKED`), never waited for or taken twice."""
    pending = Request.status.in_(PENDING) | (
        Request.status.in_(("done", "failed")) & Request.delivered.is_(False)
    )
    query = select(Request).where(pending)
    if not everything:
        query = query.where(_unclaimed(session))
    if platforms is not None:
        query = query.where(Request.route["platform"].as_string().in_(list(platforms)))
    query = query.order_by(Request.id).limit(limit).with_for_update(skip_locked=True)
    requests = list((await session.scalars(query.execution_options(populate_existing=True))).all())
    if requests:
        await session.execute(
            update(Request)
            .where(Request.id.in_([r.id for r in requests]))
            .values(claimed_by=owner, lease_until=_lease_end(session, lease))
            .execution_options(synchronize_session=False)
        )
    return requests


async def finish_request(
    *,
    session: AsyncSession,
    request_id: int,
    status: str,
    reply_text: str | None = None,
    error: str | None = None,
) -> None:
    """Close a request as done, failed or cancelled. A request that did not end done
    takes its question out of the context, so a retry or the next question starts clean."""
    request = await session.get(Request, request_id)
    if request is None:
        return
    request.status = status
    request.reply_text = reply_text
    request.error = error
    request.finished_at = utcnow()
    if status != "done":
        await session.execute(update(Message).where(Message.request_id == request_id).values(superseded=True))
        # the question leaves the context too, unless a newer request asks it again (a retry,
        # an edit) while this one is being closed
        again = await session.scalar(
            select(Request.id).where(
                Request.user_message_id == request.user_message_id,
                Request.id != request_id,
                Request.status.in_(PENDING),
            )
        )
        if again is None:
            await session.execute(
                update(Message).where(Message.id == request.user_message_id).values(superseded=True)
            )


async def set_shown(*, session: AsyncSession, request_id: int, shown: Any) -> None:
    """Store what the request's stream shows (a list of [message handle, digest]), and index
    its messages (`AnswerMessage`) so that a reaction on one finds this answer. A handle that
    is no message id (Discord's "@original" slash-command response) is not indexed. Most
    updates only change a digest (an edit of the text): the index is rewritten only when the
    set of messages changed."""
    await session.execute(update(Request).where(Request.id == request_id).values(shown=shown))
    handles = sorted(
        {
            str(item[0])
            for item in (shown if isinstance(shown, list) else ())
            if isinstance(item, list | tuple) and item and str(item[0]).isdigit() and len(str(item[0])) <= 64
        }
    )
    indexed = await session.scalars(
        select(AnswerMessage.message_id).where(AnswerMessage.request_id == request_id)
    )
    if sorted(indexed) == handles:
        return
    place = (
        await session.execute(
            select(Conversation.platform, Conversation.chat_id)
            .join(Request, Request.conversation_id == Conversation.id)
            .where(Request.id == request_id)
        )
    ).first()
    if place is None:
        return
    platform, chat_id = place
    await session.execute(delete(AnswerMessage).where(AnswerMessage.request_id == request_id))
    if not handles:
        return
    # a message that showed an earlier answer (an edited question's) now shows this one
    await session.execute(
        delete(AnswerMessage).where(
            AnswerMessage.platform == platform,
            AnswerMessage.chat_id == chat_id,
            AnswerMessage.message_id.in_(handles),
        )
    )
    session.add_all(
        AnswerMessage(platform=platform, chat_id=chat_id, message_id=handle, request_id=request_id)
        for handle in handles
    )
    await session.flush()


async def answer_at(*, session: AsyncSession, platform: str, chat_id: str, message_id: str) -> int | None:
    """The request whose answer the platform message shows, or None (not an answer)."""
    return await session.scalar(
        select(AnswerMessage.request_id).where(
            AnswerMessage.platform == platform,
            AnswerMessage.chat_id == chat_id,
            AnswerMessage.message_id == message_id,
        )
    )


async def shown_answer(*, session: AsyncSession, user_message_id: int) -> Any | None:
    """What the messages showing the latest answer to this question are, as its stream last
    reported them (`set_shown`); None if no stream reported any. An answer regenerated by an
    edit that only edited those messages may have reported nothing: the earlier request's
    report then still names them."""
    return await session.scalar(
        select(Request.shown)
        .where(Request.user_message_id == user_message_id, Request.shown.is_not(None))
        .order_by(Request.id.desc())
        .limit(1)
    )


async def give_back_attempt(*, session: AsyncSession, request_id: int) -> None:
    """The process stopped on purpose while answering: that start does not count as a death."""
    await session.execute(
        update(Request)
        .where(Request.id == request_id, Request.status == "running", Request.attempts > 0)
        .values(attempts=Request.attempts - 1)
    )


async def fail_interrupted(*, session: AsyncSession, request_id: int, max_attempts: int, error: str) -> bool:
    """Close a request left running by a previous run as failed if it was already started
    `max_attempts` times (each of those runs died while answering it); returns whether it was.
    Such a request is likely what kills the process, so it is not started again."""
    request = await session.get(Request, request_id)
    if request is None or request.status != "running" or request.attempts < max_attempts:
        return False
    await finish_request(session=session, request_id=request_id, status="failed", error=error)
    return True


async def mark_delivered(*, session: AsyncSession, request_id: int) -> None:
    await session.execute(update(Request).where(Request.id == request_id).values(delivered=True))


async def requeue(*, session: AsyncSession, request_id: int) -> None:
    """Put a request that was running when the process stopped back in the queue."""
    await session.execute(
        update(Request).where(Request.id == request_id, Request.status == "running").values(status="queued")
    )


async def pending_requests(*, session: AsyncSession) -> Sequence[Request]:
    """Requests to finish after a restart: queued, running, or done but not yet delivered."""
    result = await session.scalars(
        select(Request)
        .where(
            Request.status.in_(PENDING)
            | ((Request.status.in_(("done", "failed"))) & (Request.delivered.is_(False)))
        )
        .order_by(Request.id)
    )
    return result.all()


async def active_requests(*, session: AsyncSession, conversation_id: int) -> Sequence[Request]:
    result = await session.scalars(
        select(Request)
        .where(Request.conversation_id == conversation_id, Request.status.in_(PENDING))
        .order_by(Request.id)
    )
    return result.all()


async def latest_request(*, session: AsyncSession, conversation_id: int) -> Request | None:
    query = select(Request).where(Request.conversation_id == conversation_id)
    return await session.scalar(query.order_by(Request.id.desc()).limit(1))


async def context_messages(
    *, session: AsyncSession, conversation: Conversation, up_to_turn: int, newest: int | None = None
) -> list[Message]:
    """The conversation's messages in context, turn by turn, up to and including `up_to_turn`;
    with `newest`, only that many of the latest ones."""
    result = await session.scalars(
        select(Message)
        .where(
            Message.conversation_id == conversation.id,
            # a question asked before a /reset that is answered after it keeps its own turn
            (Message.turn > conversation.context_start) | (Message.turn == up_to_turn),
            Message.turn <= up_to_turn,
            Message.superseded.is_(False),
        )
        .order_by(Message.turn.desc(), Message.id.desc())
        .limit(newest)
    )
    return list(reversed(result.all()))


async def supersede_answer(*, session: AsyncSession, request_id: int) -> None:
    """Take a request's stored answer (assistant rounds, tool results) out of the context."""
    await session.execute(update(Message).where(Message.request_id == request_id).values(superseded=True))


async def restore_message(*, session: AsyncSession, message_id: int, text: str | None = None) -> None:
    """Bring a user message back into the context (a retry or an edit asks it again)."""
    values: dict[str, Any] = {"superseded": False}
    if text is not None:
        values["text"] = text
    await session.execute(update(Message).where(Message.id == message_id).values(**values))


async def reset_conversation(*, session: AsyncSession, conversation_id: int) -> None:
    """Leave every stored turn out of the context from now on; nothing is deleted."""
    last_turn = await session.scalar(
        select(func.max(Message.turn)).where(Message.conversation_id == conversation_id)
    )
    await session.execute(
        update(Conversation).where(Conversation.id == conversation_id).values(context_start=last_turn or 0)
    )


async def set_system_prompt(*, session: AsyncSession, conversation_id: int, text: str | None) -> None:
    await session.execute(
        update(Conversation).where(Conversation.id == conversation_id).values(system_prompt=text)
    )


async def set_language(*, session: AsyncSession, conversation_id: int, language: str | None) -> None:
    await session.execute(
        update(Conversation).where(Conversation.id == conversation_id).values(language=language)
    )


async def recent_messages(*, session: AsyncSession, conversation: Conversation, limit: int) -> list[Message]:
    """The last `limit` user and assistant messages in context, oldest first (for /history)."""
    result = await session.scalars(
        select(Message)
        .where(
            Message.conversation_id == conversation.id,
            Message.turn > conversation.context_start,
            Message.superseded.is_(False),
            Message.role.in_(("user", "assistant")),
            Message.tool_name == "",
        )
        .order_by(Message.turn.desc(), Message.id.desc())
        .limit(limit)
    )
    return list(reversed(result.all()))


async def find_user_message(
    *, session: AsyncSession, conversation_id: int, external_id: str
) -> Message | None:
    return await session.scalar(
        select(Message)
        .where(
            Message.conversation_id == conversation_id,
            Message.external_id == external_id,
            Message.role == "user",
        )
        .order_by(Message.id.desc())
        .limit(1)
    )


async def latest_user_message(*, session: AsyncSession, conversation_id: int) -> Message | None:
    return await session.scalar(
        select(Message)
        .where(Message.conversation_id == conversation_id, Message.role == "user")
        .order_by(Message.id.desc())
        .limit(1)
    )


async def request_counts(*, session: AsyncSession) -> dict[str, int]:
    """How many requests are in each status (for tests, benchmarks and the log)."""
    rows = await session.execute(select(Request.status, func.count()).group_by(Request.status))
    return {status: count for status, count in rows.all()}


async def user_counts(*, session: AsyncSession, since: datetime) -> tuple[int, int]:
    """(users known, users who wrote a message since `since`), for /stats."""
    known = await session.scalar(select(func.count()).select_from(User))
    active = await session.scalar(
        select(func.count(func.distinct(Message.user_id))).where(
            Message.user_id.is_not(None), Message.created_at >= since
        )
    )
    return int(known or 0), int(active or 0)


async def blocked_chats(*, session: AsyncSession, platform: str) -> set[str]:
    """The chats of `platform` that refused the bot's messages and have not written since."""
    result = await session.scalars(select(BlockedChat.chat_id).where(BlockedChat.platform == platform))
    return set(result.all())


async def set_blocked(*, session: AsyncSession, platform: str, chat_id: str, blocked: bool) -> None:
    """Remember that a chat refused the bot's messages (`blocked`), or that it wrote again."""
    where = [BlockedChat.platform == platform, BlockedChat.chat_id == chat_id]
    if not blocked:
        await session.execute(delete(BlockedChat).where(*where))
        return
    if await session.scalar(select(BlockedChat.chat_id).where(*where)) is not None:
        return
    try:
        async with session.begin_nested():  # two streams of one chat may note it at once
            session.add(BlockedChat(platform=platform, chat_id=chat_id))
    except IntegrityError:
        pass


async def last_answer(*, session: AsyncSession, conversation_id: int) -> int | None:
    """The conversation's latest answered request (what /good and /bad rate), or None."""
    return await session.scalar(
        select(Request.id)
        .where(Request.conversation_id == conversation_id, Request.status == "done")
        .order_by(Request.id.desc())
        .limit(1)
    )


async def set_rating(
    *, session: AsyncSession, request_id: int, platform: str, user_id: str, value: int | None
) -> None:
    """A person's rating of an answer: +1 or -1 replaces their earlier one; None deletes it."""
    where = [Rating.request_id == request_id, Rating.platform == platform, Rating.user_id == user_id]
    if value is None:
        await session.execute(delete(Rating).where(*where))
        return
    updated = await session.execute(update(Rating).where(*where).values(value=value, updated_at=utcnow()))
    if getattr(updated, "rowcount", 0):
        return
    try:
        async with session.begin_nested():  # two reactions of one person at once
            session.add(Rating(request_id=request_id, platform=platform, user_id=user_id, value=value))
    except IntegrityError:
        await session.execute(update(Rating).where(*where).values(value=value, updated_at=utcnow()))


async def ratings(*, session: AsyncSession, request_id: int) -> dict[tuple[str, str], int]:
    """Every person's rating of one answer: (platform, user id) -> +1 or -1."""
    rows = await session.execute(
        select(Rating.platform, Rating.user_id, Rating.value).where(Rating.request_id == request_id)
    )
    return {(platform, user): value for platform, user, value in rows.all()}


async def rating_of(*, session: AsyncSession, request_id: int, platform: str, user_id: str) -> int | None:
    return await session.scalar(
        select(Rating.value).where(
            Rating.request_id == request_id, Rating.platform == platform, Rating.user_id == user_id
        )
    )


async def shares(*, session: AsyncSession, platform: str, user_id: str) -> bool:
    """Whether the person said `/share on` (and not `/share off` since)."""
    found = await session.scalar(
        select(ShareConsent.user_id).where(ShareConsent.platform == platform, ShareConsent.user_id == user_id)
    )
    return found is not None


async def set_share(*, session: AsyncSession, platform: str, user_id: str, share: bool) -> None:
    where = [ShareConsent.platform == platform, ShareConsent.user_id == user_id]
    if not share:
        await session.execute(delete(ShareConsent).where(*where))
        return
    if await shares(session=session, platform=platform, user_id=user_id):
        return
    try:
        async with session.begin_nested():
            session.add(ShareConsent(platform=platform, user_id=user_id))
    except IntegrityError:
        pass  # said at the same moment elsewhere: on either way


async def access_rules(*, session: AsyncSession) -> dict[str, bool]:
    """Every admin's word about a person: "platform:id" -> True (/allow) or False (/deny)."""
    rows = await session.execute(select(AccessRule.platform, AccessRule.user_id, AccessRule.allowed))
    return {f"{platform}:{user_id}": allowed for platform, user_id, allowed in rows.all()}


async def set_access_rule(
    *, session: AsyncSession, platform: str, user_id: str, allowed: bool, set_by: str
) -> None:
    """Store `/allow` (allowed) or `/deny`; it replaces the earlier word about the person."""
    where = [AccessRule.platform == platform, AccessRule.user_id == user_id]
    values = {"allowed": allowed, "set_by": set_by[:128], "updated_at": utcnow()}
    updated = await session.execute(update(AccessRule).where(*where).values(**values))
    if getattr(updated, "rowcount", 0):
        return
    try:
        async with session.begin_nested():
            session.add(AccessRule(platform=platform, user_id=user_id, **values))
    except IntegrityError:
        await session.execute(update(AccessRule).where(*where).values(**values))
