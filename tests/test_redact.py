"""Redaction for the export: addresses, numbers and keys go; arithmetic and ordinary text stay;
hostile text takes linear time."""

from __future__ import annotations

import time

import pytest

from yanray.bot.redact import Redactor


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail john.doe+x@example.co.uk.", "mail [email]."),
        ("联系我abc@example.com谢谢", "联系我[email]谢谢"),
        ("call +86 138 0013 8000 now", "call [phone] now"),
        ("or (555) 123-4567, or 555-123-4567.", "or [phone], or [phone]."),
        ("电话13800138000", "电话[phone]"),
        ("+4915112345678", "[phone]"),
        ("key sk-proj-AbCdEf1234567890abcdef", "key [key]"),
        ("token 123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0", "token [key]"),
        ("ghp_abcdefghijklmnopqrstuvwxyz0123456789 AKIAIOSFODNN7EXAMPLE", "[key] [key]"),
        ("id 550e8400-e29b-41d4-a716-446655440000", "id [key]"),
        ("Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9xyz", "Bearer [key]"),
    ],
)
def test_what_is_redacted(text: str, expected: str) -> None:
    assert Redactor().redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "6.5*7.5 = 48.75",
        "2**35 = 34359738368",
        "1000-250-125 = 625",
        "factorial(20) = 2432902008176640000",
        "on 2024-05-01 at 12:30:45",
        "ping 192.168.100.200",
        "12 345 678 people",
        "pi = 3.14159265358979323846264338327950288",
        "https://example.com/some-long-article-title-with-words-in-2024",
        "MAX_ARGUMENT_CHARS_FOR_THE_CALCULATOR_TOOL_2",
        "x+1234567",
        "the user@ sign alone, or a@b without a dot",
    ],
)
def test_what_stays(text: str) -> None:
    redactor = Redactor()
    assert redactor.redact(text) == text
    assert not redactor.counts


def test_counts() -> None:
    redactor = Redactor()
    redactor.redact("a@b.cn, c@d.org, 13800138000, sk-abcdefghijklmnopqrstuvwx")
    assert redactor.counts == {"email": 2, "phone": 1, "key": 1}


@pytest.mark.parametrize(
    "unit",
    ["a", "a.", "a@", "a@b.", "1", "1-", "1 ", "+1", "(1", "A1b", "x-", "_", " ", "1:", "@a", "sk-"],
)
def test_hostile_text_takes_linear_time(unit: str) -> None:
    """100 KB of each repeated unit: linear patterns take milliseconds, a quadratic one minutes."""
    text = unit * (100_000 // len(unit))
    started = time.perf_counter()
    Redactor().redact(text)
    assert time.perf_counter() - started < 2.0
