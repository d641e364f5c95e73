"""Storage: SQLAlchemy 2 async models, data-access functions and Alembic migrations.

The only package that imports SQLAlchemy. Others use `Database.transaction()` and the
keyword-only functions in `crud`.
"""

from yanray.storage import crud
from yanray.storage.db import Database, StorageError
from yanray.storage.lock import DatabaseLock
from yanray.storage.models import BlockedChat, Conversation, Message, Rating, Request, User

__all__ = [
    "BlockedChat",
    "Conversation",
    "Database",
    "DatabaseLock",
    "Message",
    "Rating",
    "Request",
    "StorageError",
    "User",
    "crud",
]
