"""Observation budgets: how many tokens a tool's text may take, and cutting it to fit.

The tool loop cuts every observation here, in one place (`cut_to_tokens`), so each tool
returns its whole text and the model always reads at most the tool's `max_observation_tokens`
(fewer when the conversation is near the model's context), with a `[cut: ...]` note saying
so. The engine's tokenizer is not at hand in the loop (the engine may be remote), so tokens
are estimated by a linear rule that errs on the long side:

- ASCII letters count one token per `ASCII_PER_TOKEN`, rounded up;
- every other character counts as one token: each Chinese, Japanese or Korean character,
  accent or emoji, and each ASCII digit, blank and punctuation mark (ChatGLM3 spells numbers
  digit by digit, and a blank before a digit or sign is a token of its own).

Measured against ChatGLM3's own tokenizer (tests/fixtures/chatglm3/tokenizer.model,
tests/test_observation_budget.py): English prose takes about 0.25 real tokens per
character, 0.51 of this estimate (1,000 estimated tokens are about 510 real ones); Chinese
prose 0.64 per character, 0.64 of the estimate; URLs 0.8, JSON 0.7, runs of digits 1.0 of
it. What it counts short: rare CJK characters the tokenizer spells as three UTF-8 byte
tokens (3.2 times the estimate) and random letters such as base64 (about 2.3 times).

Cutting looks at no more than `ASCII_PER_TOKEN` characters per token of budget, whatever
the text's length: a tool's text may be megabytes, and this runs on the event loop.
"""

from __future__ import annotations

import math
import string

#: ASCII letters per estimated token (ChatGLM3 needs about 5 letters a token for English words)
ASCII_PER_TOKEN = 3
#: the characters counted at 1/ASCII_PER_TOKEN; every other one counts as a whole token
_PLAIN = frozenset(string.ascii_letters)
#: the room the cut note itself takes, in estimated tokens (it names a count of characters)
NOTE_TOKENS = 32


def estimate_tokens(text: str) -> int:
    """A count of tokens that is at least what ChatGLM3 needs for ordinary `text` (see above)."""
    plain = 0  # ASCII letters
    costly = 0  # digits, punctuation and everything outside ASCII: one token each
    for char in text:
        if char in _PLAIN:
            plain += 1
        else:
            costly += 1
    return costly + math.ceil(plain / ASCII_PER_TOKEN)


def cut_to_tokens(text: str, budget: int) -> str:
    """`text` if its estimate fits in `budget` tokens, else its longest start that fits with
    a note, `[cut: N more characters not shown]`, together within `budget`."""
    # every character costs at least 1/ASCII_PER_TOKEN of a token: nothing past this can fit
    head = text[: budget * ASCII_PER_TOKEN + 1]
    if len(head) == len(text) and estimate_tokens(text) <= budget:
        return text
    room = max(budget - NOTE_TOKENS, 0)
    plain = costly = 0
    end = 0
    for end, char in enumerate(head):  # noqa: B007 (end is the cut when the loop breaks)
        if char in _PLAIN:
            plain += 1
        else:
            costly += 1
        if costly + math.ceil(plain / ASCII_PER_TOKEN) > room:
            break
    else:
        end = len(head)
    kept = text[:end].rstrip()
    return f"{kept}\n[cut: {len(text) - len(kept):,} more characters not shown]"
