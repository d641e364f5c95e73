"""split_message / join_parts: long replies arrive whole, in order, in readable pieces."""

from __future__ import annotations

import random
import time

import pytest

from yanray.adapters.split import MIN_LIMIT, join_parts, open_fence, split_message


def _check(text: str, limit: int) -> list[str]:
    parts = split_message(text, limit)
    assert all(len(part) <= limit for part in parts), [len(part) for part in parts]
    assert all(part for part in parts) or parts == [""]
    assert join_parts(parts) == text
    return parts


def test_short_text_is_one_part() -> None:
    assert split_message("hello", 4096) == ["hello"]
    assert split_message("", 4096) == [""]


def test_nine_thousand_characters_make_three_messages_on_paragraphs() -> None:
    paragraph = ("Yanray explains one thing clearly. " * 25).strip()
    text = "\n\n".join([paragraph] * 10)
    assert 8500 < len(text) < 9500
    parts = _check(text, 4096)
    assert len(parts) == 3
    assert all(part.endswith(".\n\n") for part in parts[:-1])
    assert "".join(parts) == text  # no fences involved: plain concatenation


def test_line_then_sentence_then_word_boundaries() -> None:
    lines = "\n".join(f"line number {i} with some words" for i in range(40))
    parts = _check(lines, 200)
    assert all(part.endswith("\n") for part in parts[:-1])

    sentences = " ".join(f"Sentence {i} ends here." for i in range(40))
    parts = _check(sentences, 200)
    assert all(part.endswith(". ") for part in parts[:-1])

    words = " ".join(f"word{i}" for i in range(200))
    parts = _check(words, 150)
    assert all(part.endswith(" ") for part in parts[:-1])


def test_chinese_sentences_split_after_full_stop() -> None:
    text = "这是一个很长的句子，用来测试中文的分割。" * 60
    parts = _check(text, 300)
    assert all(part.endswith("。") for part in parts[:-1])


def test_one_huge_word_is_cut_hard() -> None:
    text = "x" * 1000
    parts = _check(text, 300)
    assert [len(part) for part in parts] == [300, 300, 300, 100]


def test_code_block_that_fits_is_never_cut() -> None:
    block = "```python\n" + "".join(f"value_{i} = {i}\n" for i in range(20)) + "```\n"
    text = "Some intro words here. " * 6 + "\n\n" + block + "\nAnd a closing remark."
    limit = len(block) + 40
    parts = _check(text, limit)
    assert any(block in part for part in parts)
    assert all(open_fence(part + "\n") is None for part in parts)


def test_code_block_longer_than_limit_is_closed_and_reopened() -> None:
    block = "```python\n" + "".join(f"print({i})\n" for i in range(600)) + "```\n"
    text = "Intro paragraph.\n\n" + block + "\nAfter."
    parts = _check(text, 2000)
    assert len(parts) >= 4
    for part in parts[:-1]:
        assert part.endswith("\n```")
    for part in parts[1:]:
        assert part.startswith("```python\n")
    # every message renders as balanced Markdown
    assert all(part.count("```") % 2 == 0 for part in parts)


def test_long_code_line_inside_block_is_cut_and_fenced() -> None:
    text = "```\n" + "y" * 700 + "\n```"
    parts = _check(text, 250)
    assert all(part.startswith("```\n") for part in parts)
    assert all(part.endswith("```") for part in parts)


def test_limit_too_small_is_refused() -> None:
    with pytest.raises(ValueError):
        split_message("text", MIN_LIMIT - 1)


def test_join_parts_rejects_foreign_parts() -> None:
    with pytest.raises(ValueError):
        join_parts(["```py\nopen block\n", "no reopening fence"])


def test_random_texts_round_trip() -> None:
    pieces = [
        "hello",
        "world.",
        "ok!",
        "```",
        "```py",
        "````",
        "\n",
        "\n\n",
        " ",
        "  ```",
        "x" * 50,
        "é",
        "😀",
        "`",
        "a.b",
        "。",
        "```js`x",
        "~~~",
        "    ```",
    ]
    rnd = random.Random(4096)
    for _ in range(3000):
        text = "".join(rnd.choice(pieces) + rnd.choice(["", " ", "\n"]) for _ in range(rnd.randint(0, 150)))
        _check(text, rnd.randint(MIN_LIMIT, 400))


def test_an_800_kb_unclosed_code_fence_is_split_in_linear_time() -> None:
    # issue 8: each candidate cut walked the whole open block (minutes for this text here)
    text = "```python\n" + "x = 1  # some code\n" * (800_000 // 19)
    started = time.perf_counter()
    parts = _check(text, 4096)
    assert time.perf_counter() - started < 4  # ~0.7 s here
    assert len(parts) > 190 and all(part.startswith("```python\n") for part in parts)
