"""What the model sees: the system prompt, and what the user is told when it cannot fit.

Budget = the engine's context minus `YANRAY_MAX_NEW_TOKENS` (room for the reply). The
engine fits the history to it (`Engine.fit`, one implementation in `engine/fit.py`:
the system prompt and the newest turn always stay, whole turns are dropped oldest first,
a cut history is cut in large steps so consecutive prompts share their beginning), with
its own tokenizer and off the event loop. A newest turn that alone does not fit is
refused with `ContextTooLong`, in the user's language (`too_long`), never cut silently.
"""

from __future__ import annotations

from collections.abc import Sequence

from yanray.bot.errors import ContextTooLong
from yanray.bot.i18n import lazy_gettext
from yanray.bot.tools import Tool
from yanray.engine.base import PromptTooLong

#: the fewest tokens a question must have room for; a context with less is refused at start
MIN_QUESTION_TOKENS = 32

SLASH_HELP = (
    "You can use tools. To use one, write its command alone on a line, for example:\n"
    "{examples}\n"
    'Then stop; the result comes back to you as "Tools: <result>", and you continue your answer '
    "using it. Use a tool only when it helps, and never show the command line to the user as an answer."
)


def system_prompt(base: str, tools: Sequence[Tool], *, native: bool) -> str:
    """The system message. A native-tool model (ChatGLM3) gets the tools from the engine,
    in its own format, and then the content is exactly `base`."""
    if not tools or native:
        return base
    # each description ends with its example call ("Example: /time Asia/Tokyo"), with nothing
    # after it on the line, so that a model copying the example copies no stray ")" or "."
    examples = "\n".join(f"{t.spec.usage} - {t.spec.description}" for t in tools)
    return f"{base}\n\n{SLASH_HELP.format(examples=examples)}"


def too_long(exc: PromptTooLong) -> ContextTooLong:
    """What the user is told when the engine cannot fit the prompt (`Engine.fit`)."""
    if exc.part == "instructions":
        return ContextTooLong(
            lazy_gettext(
                "My instructions for this conversation take about {fixed} tokens, more than the "
                "{budget} I can read; shorten them with /system, or /system default.",
                fixed=exc.tokens,
                budget=exc.budget,
            )
        )
    return ContextTooLong(
        lazy_gettext(
            "Your message is too long for me: about {tokens} tokens, and at most "
            "{room} fit. Please shorten it or send it in parts.",
            tokens=exc.tokens,
            room=exc.room,
        )
    )
