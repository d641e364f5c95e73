"""The tables: users, conversations, messages, requests (the journal of accepted work),
the chats that blocked the bot, the platform messages that show each answer, ratings of
answers, opt-ins to training export, and the people an admin allowed or denied.

A conversation is keyed by (platform, chat_id, user_key): `user_key` is the user's id,
or "" when a group chat shares one conversation. Messages are ordered by `turn` then
`id`: a user message's turn is its own id, and the assistant rounds, tool calls and tool
results that answer it carry the same turn. So a burst of queued user messages still
reads back as question, answer, question, answer. `/reset` moves the conversation's
`context_start` past the last turn; `superseded` messages (a regenerated answer, a
cancelled or failed question) stay stored but leave the context.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("platform", "external_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(64))
    display_name: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (UniqueConstraint("platform", "chat_id", "user_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    chat_id: Mapped[str] = mapped_column(String(64))
    user_key: Mapped[str] = mapped_column(String(64))
    system_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: "en" or "zh" chosen with /lang; None follows the platform's hint
    language: Mapped[str | None] = mapped_column(String(8), nullable=True)
    context_start: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_turn", "conversation_id", "turn", "id"),
        Index("ix_messages_conversation_external", "conversation_id", "external_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    turn: Mapped[int] = mapped_column(Integer, default=0)
    # No foreign key: requests reference messages, and a cycle of keys needs ALTER TABLE,
    # which SQLite lacks. The request that produced an answer is an index here.
    request_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    tool_name: Mapped[str] = mapped_column(String(64), default="")
    external_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Request(Base):
    __tablename__ = "requests"
    __table_args__ = (
        Index("ix_requests_status", "status"),
        # an edited question finds what showed its answer (`crud.shown_answer`)
        Index("ix_requests_user_message", "user_message_id"),
        # a process renews, and at shut-down releases, the leases of what it holds undelivered
        Index("ix_requests_claimed_by", "claimed_by", "delivered"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    user_message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    route: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: what the adapter reported showing for this request (the ids of its queue notice and
    #: partial answer), so that after a restart that message becomes the answer
    shown: Mapped[Any] = mapped_column(JSON, nullable=True)
    reply_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: the process answering (or holding in its queue) this request, and until when its claim
    #: holds unless renewed (`crud.renew_claims`); NULL: any process may take it
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class BlockedChat(Base):
    """A chat that refused the bot's messages (the user blocked it, or it left the group):
    nothing is written there until a message arrives from it again, restarts included."""

    __tablename__ = "blocked_chats"

    platform: Mapped[str] = mapped_column(String(32), primary_key=True)
    chat_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AnswerMessage(Base):
    """A platform message that shows (part of) an answer: a reaction on it rates that answer.

    Kept in step with `Request.shown` (`crud.set_shown`), which is JSON and cannot be looked
    up by message. The key is the chat as the conversation names it and the platform's
    message id; a message that comes to show a newer answer (an edited question) moves to it."""

    __tablename__ = "answer_messages"

    platform: Mapped[str] = mapped_column(String(32), primary_key=True)
    chat_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"), index=True)


class Rating(Base):
    """One person's rating of one answer: +1 (👍) or -1 (👎). A person's latest rating of
    an answer replaces the earlier one; taking the reaction away deletes the row."""

    __tablename__ = "ratings"

    request_id: Mapped[int] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"), primary_key=True)
    platform: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the rater's platform id
    value: Mapped[int] = mapped_column(SmallInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ShareConsent(Base):
    """A person who said `/share on`: their conversations may be exported for training.
    `/share off` deletes the row. Admins need no row."""

    __tablename__ = "share_consents"

    platform: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AccessRule(Base):
    """An admin's `/allow` (allowed true) or `/deny` (false) of one person, on top of
    `YANRAY_ALLOWED_USERS`: the latest word about a person replaces the earlier one."""

    __tablename__ = "access_rules"

    platform: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    allowed: Mapped[bool] = mapped_column(Boolean)
    #: the admin who said it, as platform:id
    set_by: Mapped[str] = mapped_column(String(128), default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
