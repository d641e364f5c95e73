"""Platform payloads at the adapter boundary: text that can be encoded, and short log lines.

JSON can carry a lone UTF-16 surrogate (`"\\ud800"`); Python decodes it into a `str` that
cannot be encoded as UTF-8, so SQLite, the tokenizer and the platform's own JSON encoder
all fail on it, and the message got no answer. `clean_strings` repairs a decoded payload
in place: every lone surrogate becomes U+FFFD (one UTF-16 unit for one, so Telegram's
entity offsets still line up) and a valid pair that arrived as two separate code points
is joined. Both adapters run it on each raw update or gateway event before it is parsed.

`shorten` renders a payload for one log line: bounded in length and in the work it does,
whatever its size or depth (`reprlib`, which cuts long strings, long lists and deep
nesting as it goes).
"""

from __future__ import annotations

import reprlib
from typing import Any

LOGGED_CHARS = 400

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxstring, _repr.maxother = 4, 12, 6, 60, 60


def clean_text(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD (unchanged, and not copied, when valid)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def clean_strings(payload: Any) -> Any:
    """Repair every string value in a decoded JSON payload, in place; returns the payload.

    Iterative, so a deeply nested payload cannot exhaust the stack here."""
    if isinstance(payload, str):
        return clean_text(payload)
    stack: list[Any] = [payload]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            items: Any = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            continue
        for key, value in list(items):
            if isinstance(value, str):
                node[key] = clean_text(value)
            elif isinstance(value, dict | list):
                stack.append(value)
    return payload


def shorten(payload: Any) -> str:
    """One bounded log line showing what a payload looked like."""
    text = _repr.repr(payload)
    return text if len(text) <= LOGGED_CHARS else text[: LOGGED_CHARS - 1] + "…"
