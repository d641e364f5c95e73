"""A forward-hook recorder: what a model was fed, call by call, for engine tests."""

from __future__ import annotations

from typing import Any


class ForwardCalls:
    """The shape (rows, tokens per row) of `input_ids` in every forward call of `model`, from
    now until `close()`: a decode step is a call of one token per row, a prefill a wider one."""

    def __init__(self, model: Any) -> None:
        self.seen: list[tuple[int, int]] = []
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        rows, width = kwargs["input_ids"].shape
        self.seen.append((int(rows), int(width)))

    @property
    def decode_rows(self) -> list[int]:
        """The rows (conversations decoded together) of each one-token call."""
        return [rows for rows, width in self.seen if width == 1]

    @property
    def tokens(self) -> list[int]:
        """The token ids each call was fed."""
        return [rows * width for rows, width in self.seen]

    def close(self) -> None:
        self._handle.remove()
