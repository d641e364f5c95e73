"""The log's two forms: lines for a person (the default) and JSON lines for a log shipper
(`YANRAY_LOG_FORMAT=json`: Loki, Elasticsearch, `docker logs | jq`).

A JSON line is one object: `time` (UTC, ISO 8601 with milliseconds), `level`, `logger`,
`message` (the %-arguments applied) and, when a traceback is logged, `exception` (its text).
A formatter of our own rather than python-json-logger: these five fields are twenty lines,
and a dependency for them would be one more thing to keep current in the image.
"""

from __future__ import annotations

import json
import logging
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


def formatter(form: str) -> logging.Formatter:
    """The formatter for `YANRAY_LOG_FORMAT` ("text" or "json")."""
    return JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT)
