"""Yanray's one error root: `YanrayError` and the kinds every layer raises.

`str(error)` is always one short sentence that can be shown as it is (to a user in a
chat, or to an operator on standard error); the traceback goes to the log. The CLI
catches `YanrayError` once: a `ConfigError` ends the program with exit status 2, any
other with 1 (`bot/cli.py`).

Why a package of its own (`yanray.errors`, the `errors/` folder): the layers depend
downwards, adapters -> bot -> engine, storage, and engine and storage are peers that
import neither each other nor `bot/`. The root must sit below all of them, so it lives
in a package that imports nothing of the project (and nothing outside the standard
library). Each layer defines or re-exports its own kinds from here: `engine.base`
(`EngineError`), `storage.db` (`StorageError`), `bot.errors` (the dispatcher's kinds).
"""

from __future__ import annotations

__all__ = ["ConfigError", "EngineError", "EngineUnavailable", "StorageError", "YanrayError"]


class YanrayError(Exception):
    """Base of every error Yanray raises on purpose; `str()` is one line for a person."""


class ConfigError(YanrayError):
    """A setting (or what it points at: a token, a URL, a folder) is wrong; start-up stops
    with this one line and exit status 2."""


class EngineError(YanrayError):
    """The model could not answer this request; `str()` is one line for the user."""


class EngineUnavailable(EngineError):
    """The engine cannot be reached or loaded at all."""


class StorageError(YanrayError):
    """The database cannot be used; `str()` is one line for the user or the operator."""
