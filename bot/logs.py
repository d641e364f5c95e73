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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime

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


def formatter(form: str, secrets: Iterable[str] = ()) -> logging.Formatter:
    """The formatter for `YANRAY_LOG_FORMAT` ("text" or "json"), masking `secrets`."""
    inner = JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT)
    return MaskingFormatter(inner, secrets)
