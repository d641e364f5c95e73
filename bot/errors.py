"""The bot layer's errors, under Yanray's one root (`yanray.errors`).

`str(error)` is always a short sentence that can be shown to the user as it is; the
traceback goes to the log. The root and the kinds the lower layers raise (`YanrayError`,
`ConfigError`, `EngineError`, `StorageError`) live in `yanray.errors`, below every layer,
and are re-exported here so the bot and the adapters import all their errors from one place.
"""

from __future__ import annotations

from yanray.bot.i18n import Text
from yanray.errors import ConfigError, EngineError, EngineUnavailable, StorageError, YanrayError

__all__ = [
    "AdapterFailed",
    "AdapterStopped",
    "ConfigError",
    "ContextTooLong",
    "DeliveryRefused",
    "EngineError",
    "EngineUnavailable",
    "LocalizedError",
    "QueueFull",
    "StorageError",
    "ToolError",
    "YanrayError",
]


class AdapterFailed(YanrayError):
    """A platform adapter lost its platform for good while running; `yanray run` stops."""


class AdapterStopped(YanrayError):
    """A final text arrived after its adapter stopped (shutdown while answering): the worker
    leaves the stored answer undelivered, and the next start sends it."""


class DeliveryRefused(YanrayError):
    """The platform refuses this final text for good (no retry can fix it): the worker tells
    the user its one-line apology instead, through the same stream."""


class LocalizedError(YanrayError):
    """An error the user is told about in their language: `say(language)`; `str()` is English."""

    def __init__(self, text: Text) -> None:
        super().__init__(str(text))
        self.text = text

    def say(self, language: str) -> str:
        return self.text.render(language)


class ContextTooLong(LocalizedError):
    """A single message does not fit the model's context, even alone."""


class QueueFull(LocalizedError):
    """The request queue is full (overall or for this conversation)."""


class ToolError(YanrayError):
    """A tool refused its input or failed; the text goes back to the model as the observation."""
