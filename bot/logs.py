"""The log's two forms: lines for a person (the default) and JSON lines for a log shipper
(`YANRAY_LOG_FORMAT=json`: Loki, Elasticsearch, `docker logs | jq`).

A JSON line is one object: `time` (UTC, ISO 8601 with milliseconds), `level`, `logger`,
`message` (the %-arguments applied) and, when a traceback is logged, `exception` (its text).
A formatter of our own rather than python-json-logger: these five fields are twenty lines,
and a dependency for them would be one more thing to keep current in the image.

Either form masks the secrets it is given (the tokens, the API key, the database password)
as `***` in the finished line, exception text included: a library may name one in an
error (PTB's "The token `...` was rejected"), and a log is read by more people than the
environment is.

Every line goes through the root logger's one handler, so every line has the chosen form:
Python warnings (`warnings.warn`, from any library) are logged (`logging.captureWarnings`),
and torch, transformers and huggingface_hub, which install stderr handlers of their own
when imported (torch also stops propagation), are made to propagate instead
(`route_library_logs`, called once they are imported: only the local engine and `yanray
quantize` import them). In the JSON form their progress bars are off too: a bar on standard
error is not a JSON line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime

#: libraries that give their loggers handlers of their own on import
LIBRARIES = ("torch", "transformers", "huggingface_hub")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the text are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


#: shorter values are not masked: they would blank out ordinary words, and hide nothing
MIN_SECRET_CHARS = 6
MASK = "***"


class MaskingFormatter(logging.Formatter):
    """`inner`'s line with every secret's value replaced by `***` (str.replace: linear)."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self.inner = inner
        forms = {form for value in secrets if len(value) >= MIN_SECRET_CHARS for form in _forms(value)}
        self.secrets = sorted(forms, key=len, reverse=True)  # a secret inside another: the longer first

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        for secret in self.secrets:
            line = line.replace(secret, MASK)
        return line


def _forms(value: str) -> set[str]:
    """The value as text and as JSON writes it inside a string (a password with `"` or `\\`)."""
    return {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}


def logs_json() -> bool:
    """Whether the root logger writes JSON lines (`YANRAY_LOG_FORMAT=json`)."""
    return any(
        isinstance(getattr(h.formatter, "inner", h.formatter), JsonFormatter)
        for h in logging.getLogger().handlers
    )


def formatter(form: str, secrets: Iterable[str] = ()) -> logging.Formatter:
    """The formatter for `YANRAY_LOG_FORMAT` ("text" or "json"), masking `secrets`."""
    inner = JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT)
    return MaskingFormatter(inner, secrets)


def route_library_logs(form: str) -> None:
    """Send torch's, transformers' and huggingface_hub's records through the root logger's
    handler, in the chosen form, instead of their own stderr handlers; in the JSON form, turn
    their progress bars off. Imports the three (the caller is about to use them)."""
    import torch  # noqa: F401 (its import installs its handlers)
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_logger()  # installs its handler, once, if not yet done
    hub_utils.logging.get_logger()
    names = [name for name in logging.root.manager.loggerDict if name.split(".")[0] in LIBRARIES]
    for name in names:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            if type(handler) is logging.StreamHandler:  # theirs: to stderr; not a file someone set
                library.removeHandler(handler)
        library.propagate = True
    if form == "json":
        hub_utils.disable_progress_bars()
        transformers_logging.disable_progress_bar()
