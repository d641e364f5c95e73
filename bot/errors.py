"""Yanray's error hierarchy: one base, a few meaningful kinds, each with a user-facing line.

`str(error)` is always a short sentence that can be shown to the user as it is; the
traceback goes to the log. The engine and storage layers sit below `bot/` and cannot
import it, so their errors (`EngineError`, `StorageError`) are defined there and
re-exported here; handle them by those names.
"""

from __future__ import annotations

from yanray.engine.base import EngineError, EngineUnavailable
from yanray.storage.db import StorageError

__all__ = [
    "AdapterFailed",
    "ConfigError",
    "ContextTooLong",
    "EngineError",
    "EngineUnavailable",
    "QueueFull",
    "StorageError",
    "ToolError",
    "YanrayError",
]


class YanrayError(Exception):
    """Base of every error Yanray raises on purpose."""


class ConfigError(YanrayError):
    """A setting is wrong; start-up stops with this one line."""


class AdapterFailed(YanrayError):
    """A platform adapter lost its platform for good while running; `yanray run` stops."""


class ContextTooLong(YanrayError):
    """A single message does not fit the model's context, even alone."""


class QueueFull(YanrayError):
    """The request queue is full (overall or for this conversation)."""


class ToolError(YanrayError):
    """A tool refused its input or failed; the text goes back to the model as the observation."""
