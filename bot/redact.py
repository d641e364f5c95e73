"""Redaction of e-mail addresses, phone numbers and API-key-like strings, for the export.

Text a person or the model wrote (and tool results: web pages) may carry someone's
address, number or secret; a model trained on it can repeat them, and weights cannot
forget. `Redactor.redact` replaces each with a placeholder (`[email]`, `[phone]`, `[key]`)
and counts what it replaced.

The patterns are deliberately narrow where a false hit would damage arithmetic, the one
thing tool rounds are full of: a phone number is an international `+` number, a
parenthesised area code, three groups joined by one kind of separator with a last group
of four digits, or an 11-digit Chinese mobile number, with 7 to 15 digits in all; plain
runs of digits (results, years, ids) stay. A key is a run of 32 or more letters, digits,
`_` and `-` that mixes upper case, lower case and digits, or is hexadecimal (with `-`, as
a UUID), or starts with a known key prefix (`sk-`, `ghp_`, `xoxb-`, `AKIA`...); and a
Telegram bot token. Long lower-case slugs of URLs stay.

Every pattern is linear on hostile text: each may only start where the character before
cannot belong to it (a lookbehind), so a long run is entered once, and every repeat is
bounded or possessive (see tests/test_linear_regexes.py).
"""

from __future__ import annotations

import re
from collections import Counter

EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}+@[A-Za-z0-9-]{1,63}+(?:\.[A-Za-z0-9-]{1,63}+){1,8}+"
)
# three groups joined by one kind of separator (a backreference keeps `1 234-5678` out)
PHONE = re.compile(
    r"(?<![0-9A-Za-z+])(?<![0-9][.-])"
    r"(?:"
    r"\+[0-9]{1,3}+(?:[ .-]?+\(?+[0-9]{1,5}+\)?+){1,6}+"  # +86 138 0013 8000, +1 (555) 123-4567
    r"|\([0-9]{2,5}+\)[ .-]?+[0-9]{3,4}+[ .-]?+[0-9]{3,5}+"  # (555) 123-4567, (010) 6552 9988
    r"|[0-9]{2,5}+([ .-])[0-9]{3,4}+\1[0-9]{4}+"  # 555-123-4567, 010 6552 9988
    r"|1[3-9][0-9]{9}+"  # 13800138000
    r")"
    r"(?![0-9A-Za-z])(?!\.[0-9])"
)
KEY = re.compile(
    r"(?<![A-Za-z0-9_-])"
    r"(?:"
    r"[0-9]{6,12}+:[A-Za-z0-9_-]{30,}+"  # a Telegram bot token
    r"|AKIA[0-9A-Z]{16}+"  # an AWS access key id
    r"|(?:sk[_-]|[pr]k_|gh[pousr]_|github_pat_|hf_|glpat-|xox[abprs]-)[A-Za-z0-9_-]{16,}+"
    r"|AIza[A-Za-z0-9_-]{30,}+"
    r"|[A-Za-z0-9_-]{32,}+"  # anything long: `_looks_random` decides
    r")"
    r"(?![A-Za-z0-9_-])"
)
PLACEHOLDERS = {"email": "[email]", "phone": "[phone]", "key": "[key]"}
_PREFIXES = (
    *("sk-", "sk_", "pk_", "rk_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "hf_", "glpat-"),
    *("xoxa-", "xoxb-", "xoxp-", "xoxr-", "xoxs-", "AKIA", "AIza"),
)
_HEX = frozenset("0123456789abcdefABCDEF-")


def _looks_random(token: str) -> bool:
    """Whether a long run of token characters looks like a secret rather than a word or slug."""
    if ":" in token or token.startswith(_PREFIXES):  # a bot token, a known kind of key
        return True
    digits = any(c.isdigit() for c in token)
    upper = any(c.isupper() for c in token)
    lower = any(c.islower() for c in token)
    if digits and upper and lower:
        return True
    return digits and (upper or lower) and all(c in _HEX for c in token)


def _digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


class Redactor:
    """Replaces e-mail addresses, phone numbers and key-like strings; `counts` says how many."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def redact(self, text: str) -> str:
        text = KEY.sub(self._key, text)
        text = EMAIL.sub(self._email, text)
        return PHONE.sub(self._phone, text)

    def _key(self, match: re.Match[str]) -> str:
        if not _looks_random(match.group()):
            return match.group()
        self.counts["key"] += 1
        return PLACEHOLDERS["key"]

    def _email(self, match: re.Match[str]) -> str:
        self.counts["email"] += 1
        return PLACEHOLDERS["email"]

    def _phone(self, match: re.Match[str]) -> str:
        found = match.group()
        if not 7 <= _digits(found) <= 15 or (found.startswith("+") and _digits(found) < 8):
            return found
        self.counts["phone"] += 1
        return PLACEHOLDERS["phone"]
