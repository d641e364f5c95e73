"""One round's text as a backend produces it: the cut, the length bound, and what may be shown.

Both backends (local and openai) feed the model's text into a `RoundText` one piece at a
time. It cuts the text at the offset `stop_at` returns, or at a character bound
(`max_chars`, for a server that ignores `max_tokens`), and hands out only text that is
decided: where the round's end is stripped (the local engine), trailing whitespace is held
back until a later piece decides it. So the pieces handed out always join to the final
`text`, and text once handed out is never taken back (a cut never falls before it).

Every call costs time in proportion to the new piece, never to the text so far: the text is
kept as a list of pieces and joined once, at the end; the trailing whitespace run is counted
as it grows; `stop_at` is fed each new piece (see `engine/base.py`). A model writing 60,000
spaces, or a server streaming megabytes, costs linear time.
"""

from __future__ import annotations

from yanray.engine.base import FinishReason, GenerateOptions


class RoundText:
    """The text of one round, cut where it ends; `ready()` gives what may be handed out now."""

    def __init__(
        self, options: GenerateOptions, *, strip_end: bool = False, max_chars: int | None = None
    ) -> None:
        self.stop_at = options.stop_at
        self.strip_end = strip_end
        self.max_chars = max_chars
        #: why the text was cut ("stop": stop_at; "length": max_chars), or None
        self.cut: FinishReason | None = None
        self.length = 0
        self.sent = 0  # text[:sent] has been handed out
        self._parts: list[str] = []
        self._unsent: list[str] = []  # text[sent:], in pieces
        self._space = 0  # length of the trailing whitespace run

    def add(self, piece: str) -> bool:
        """Take the model's next text; True once the round is cut (later text is ignored)."""
        if not piece or self.cut is not None:
            return self.cut is not None
        before = self.length
        cut = self.stop_at(piece) if self.stop_at is not None else None
        reason: FinishReason = "stop"
        if self.max_chars is not None and before + len(piece) > self.max_chars:
            if cut is None or cut > self.max_chars:
                cut, reason = self.max_chars, "length"
        self._append(piece)
        if cut is not None:
            self._truncate(max(self.sent, min(cut, self.length)))
            self.cut = reason
        return self.cut is not None

    def ready(self, final: bool = False) -> str:
        """The text that may be handed out now (and marks it handed out); `final` at the end
        of the round releases what was held back (and strips the end, with `strip_end`)."""
        if final and self.cut is None and self.strip_end and self._space:
            self._truncate(self.length - self._space)
        held = self._space if self.strip_end else 0
        end = self.length if final or self.cut is not None else self.length - held
        if end <= self.sent:
            return ""
        unsent = "".join(self._unsent)
        piece, rest = unsent[: end - self.sent], unsent[end - self.sent :]
        self._unsent = [rest] if rest else []
        self.sent = end
        return piece

    @property
    def text(self) -> str:
        """The whole text so far (joined once; meant for the end of the round)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def _append(self, piece: str) -> None:
        self._parts.append(piece)
        self._unsent.append(piece)
        self.length += len(piece)
        kept = piece.rstrip()
        self._space = len(piece) - len(kept) if kept else self._space + len(piece)

    def _truncate(self, length: int) -> None:
        """Keep text[:length] (at least what was handed out); once per round, so a join is fine."""
        text = self.text[:length]
        self._parts = [text] if text else []
        self.length = len(text)
        self._unsent = [text[self.sent :]] if self.length > self.sent else []
        self._space = len(text) - len(text.rstrip())
