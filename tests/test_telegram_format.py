"""Model Markdown becomes Telegram HTML that Telegram accepts, with the user's text escaped."""

from __future__ import annotations

import random

import pytest

from tests.fakes.telegram_server import ApiError, visible_text
from yanray.adapters.telegram_format import markdown_to_html


@pytest.mark.parametrize(
    ("markdown", "html"),
    [
        ("plain <b>text</b> & more", "plain &lt;b&gt;text&lt;/b&gt; &amp; more"),
        ("**bold** and __also bold__", "<b>bold</b> and <b>also bold</b>"),
        (
            "*italic* and _italic_ but snake_case_name and 2*3*4",
            "<i>italic</i> and <i>italic</i> but snake_case_name and 2*3*4",
        ),
        ("***both*** ~~gone~~", "<b><i>both</i></b> <s>gone</s>"),
        ("`a < b` inline", "<code>a &lt; b</code> inline"),
        ("[docs](https://example.com/?a=1&b=2)", '<a href="https://example.com/?a=1&amp;b=2">docs</a>'),
        ("[no](javascript:alert(1))", "[no](javascript:alert(1))"),
        ("# Title\n- one\n* two", "<b>Title</b>\n• one\n• two"),
        ("> quoted\n> lines", "<blockquote>quoted\nlines</blockquote>"),
        (
            "```python\nif a < b:\n    pass\n```",
            '<pre><code class="language-python">if a &lt; b:\n    pass</code></pre>',
        ),
        ("```\nstill streaming <", "<pre>still streaming &lt;</pre>"),
        ("**a _b** c_", "<b>a _b</b> c_"),
        ("** not bold **", "** not bold **"),
    ],
)
def test_markdown_to_html(markdown: str, html: str) -> None:
    assert markdown_to_html(markdown) == html


def test_visible_text_never_grows() -> None:
    text = "**Bold** `code` [link](https://x.io) & <tag> — ünïcode 😀\n```js\nlet a = 1 < 2;\n```"
    assert len(visible_text(markdown_to_html(text), "HTML")) <= len(text)


def test_random_markdown_always_parses_as_telegram_html() -> None:
    pieces = [
        "**",
        "*",
        "__",
        "_",
        "~~",
        "`",
        "```",
        "```py\n",
        "[a](https://b.c)",
        "[x]",
        "(y)",
        "<",
        ">",
        "&",
        "&amp;",
        "#",
        "# ",
        "> ",
        "- ",
        "word",
        " ",
        "\n",
        "\n\n",
        "snake_case",
        "😀",
        '"',
    ]
    rnd = random.Random(7)
    for _ in range(3000):
        text = "".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 40)))
        html = markdown_to_html(text)
        try:
            visible_text(html, "HTML")
        except ApiError as exc:  # pragma: no cover - the failure message shows the input
            pytest.fail(f"{text!r} -> {html!r}: {exc}")
