"""Chinese and English: the catalogs are complete and current, and the language follows the user.

The platform tests (Telegram's language_code, Discord's locale, the terminal's LANG) are in
test_telegram.py, test_discord.py and test_cli.py; these are the catalogs and the core.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from babel.messages.pofile import read_po

from tests.recording import RecordingAdapter, RecordingStream
from tests.scripted_engine import ScriptedEngine
from tests.waiting import until
from yanray.bot.app import Core
from yanray.bot.dispatcher import COMMANDS, HELP, position_text, queue_notice
from yanray.bot.i18n import environment_hint, normalize, resolve, translator
from yanray.bot.settings import DEFAULT_SYSTEM_PROMPT, Settings, load_settings
from yanray.bot.types import Incoming

ROOT = Path(__file__).parents[1]
ZH_HELP = translator("zh").gettext(HELP)
ZH_PROMPT = translator("zh").gettext(DEFAULT_SYSTEM_PROMPT)
_PLACEHOLDER = re.compile(r"\{(\w*)\}")


def _catalog_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("yanray_i18n_script", ROOT / "scripts" / "i18n.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# -- the catalogs ------------------------------------------------------------------------


def test_every_marked_text_is_in_the_catalogs_and_the_compiled_catalog_is_current() -> None:
    """Extracting the code's marked texts again gives the committed template, the Chinese
    .po merged with it is unchanged, and the committed .mo is that .po compiled."""
    tool = _catalog_tool()
    stale = [
        str(path.relative_to(ROOT))
        for path, data in tool.build().items()
        if not path.is_file() or path.read_bytes() != data
    ]
    assert stale == [], "run .venv/bin/python scripts/i18n.py (and translate what is new)"


def test_every_entry_is_translated_with_the_same_placeholders() -> None:
    with (ROOT / "bot/locale/yanray.pot").open("rb") as handle:
        template = read_po(handle)
    with (ROOT / "bot/locale/zh/LC_MESSAGES/yanray.po").open("rb") as handle:
        chinese = read_po(handle, locale="zh")
    ids = {m.id for m in template if m.id}
    assert len(ids) > 50
    assert ids == {m.id for m in chinese if m.id}, "the same entries in both languages"
    for message in template:
        if not message.id:
            continue
        translated = chinese[message.id]
        assert translated is not None and not translated.fuzzy, message.id
        english = message.id if isinstance(message.id, tuple) else (message.id,)
        forms = translated.string if isinstance(translated.string, tuple) else (translated.string,)
        for form in forms:
            assert form.strip(), f"no Chinese for {english[0]!r}"
            assert sorted(_PLACEHOLDER.findall(form)) == sorted(_PLACEHOLDER.findall(english[-1])), form
            assert re.search(r"[\u4e00-\u9fff]", form), f"not Chinese: {form!r}"


def test_the_shipped_catalog_is_what_gettext_reads() -> None:
    assert ZH_HELP != HELP and ZH_HELP.startswith("我是 Yanray")
    assert "/lang" in HELP and "/lang" in ZH_HELP
    zh = translator("zh")
    assert all(zh.gettext(about) != about for _name, about in COMMANDS)
    assert position_text(1, "zh") == "下一个就轮到你。"
    assert position_text(4, "zh") == "前面还有 3 个请求。"
    assert (position_text(2, "en"), position_text(3, "en")) == (
        "1 request is ahead of yours.",
        "2 requests are ahead of yours.",
    )


# -- which language ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "language"),
    [
        ("zh", "zh"),
        ("zh-hans", "zh"),
        ("zh-CN", "zh"),
        ("zh-TW", "zh"),
        ("zh_CN.UTF-8", "zh"),
        ("zh_TW.Big5@radical", "zh"),
        ("ZH-Hant-HK", "zh"),
        ("en", "en"),
        ("en-US", "en"),
        ("en_GB.UTF-8", "en"),
        ("C.UTF-8", "en"),
        ("POSIX", "en"),
        ("de-DE", "en"),
        ("", "en"),
        (None, "en"),
    ],
)
def test_platform_tags_become_english_or_chinese(tag: str | None, language: str) -> None:
    assert normalize(tag) == language


def test_the_terminal_language_is_read_in_gettexts_order() -> None:
    assert environment_hint({"LANG": "zh_CN.UTF-8"}) == "zh_CN.UTF-8"
    assert environment_hint({"LANG": "zh_CN.UTF-8", "LC_MESSAGES": "en_US.UTF-8"}) == "en_US.UTF-8"
    assert environment_hint({"LC_MESSAGES": "en_US.UTF-8", "LC_ALL": "zh_CN.UTF-8"}) == "zh_CN.UTF-8"
    assert environment_hint({"LC_ALL": "C", "LANGUAGE": "zh_CN:en"}) == "zh_CN"
    assert environment_hint({"LANG": "", "TERM": "xterm"}) is None


def test_the_operator_then_the_conversation_then_the_platform_decide() -> None:
    assert resolve("zh", "en", "en-US") == "zh"
    assert resolve("en", "zh", "zh-CN") == "en"
    assert resolve("auto", "zh", "en-US") == "zh"
    assert resolve("auto", None, "zh-hans") == "zh"
    assert resolve("auto", None, None) == "en"


def test_the_default_persona_is_in_the_conversations_language_unless_the_operator_set_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.default_prompt("en") == DEFAULT_SYSTEM_PROMPT
    assert settings.default_prompt("zh") == ZH_PROMPT and ZH_PROMPT.startswith("你是 Yanray")
    monkeypatch.setenv("YANRAY_SYSTEM_PROMPT", "You are a pirate.")
    operator = load_settings()
    assert operator.default_prompt("zh") == operator.default_prompt("en") == "You are a pirate."


# -- the core ----------------------------------------------------------------------------


def said(text: str, *, language: str | None = None, mid: str | None = None, user: str = "li") -> Incoming:
    return Incoming(
        platform="test",
        chat_id=user,
        user_id=user,
        display_name=user,
        text=text,
        message_id=mid,
        route={"chat": user},
        language=language,
    )


async def say(core: Core, text: str, **kw: Any) -> str | None:
    out = RecordingStream(text)
    await core.dispatcher.handle(said(text, **kw), out)
    return await out.wait()


@pytest.mark.parametrize(
    ("settings", "english", "chinese"),
    [
        ({"tools": []}, None, None),
        ({"tools": ["calculate"]}, "While answering I can use: a calculator.", "回答时我可以使用：计算器。"),
        (
            {"tools": ["time", "fetch", "search", "plot"], "searxng_url": "http://searxng:8080"},
            "While answering I can use: a clock with time zones, a web page reader, web search, graph plotting.",
            "回答时我可以使用：带时区的时钟、网页阅读、网页搜索、函数作图。",
        ),
        # search without a SearxNG is left out, and no tool rounds means no tools at all
        (
            {"tools": ["search", "calculate"]},
            "While answering I can use: a calculator.",
            "回答时我可以使用：计算器。",
        ),
        ({"tools": ["calculate"], "tool_rounds": 0}, None, None),
    ],
)
async def test_help_names_the_tools_that_are_enabled(
    make_settings: Any, core_factory: Any, settings: dict[str, Any], english: str | None, chinese: str | None
) -> None:
    core = await core_factory(make_settings(**settings), ScriptedEngine([]))
    for language, line, mine in (
        ("en", english, "I remember our conversation."),
        ("zh-hans", chinese, "我会记住我们的对话。"),
    ):
        text = await say(core, "/help", language=language)
        assert text is not None
        intro, commands = text.split("\n\n", 1)
        assert intro.split("\n")[1:] == [mine] + ([line] if line else [])
        assert commands.startswith("/reset")
        if line is None:
            assert "calculator" not in text and "计算器" not in text and "use:" not in text


async def test_lang_is_stored_with_the_conversation_and_survives_a_restart(
    make_settings: Any, core_factory: Any
) -> None:
    settings = make_settings(tools=[])
    engine = ScriptedEngine(responder=lambda m: "好的")
    core = await core_factory(settings, engine)
    assert await say(core, "/help") == HELP  # no hint: English
    assert await say(core, "/lang zh") == "从现在起，我在这里用简体中文回复。"
    await core.aclose()

    core = await core_factory(settings, engine)
    assert await say(core, "/help") == ZH_HELP
    assert (await say(core, "/lang") or "").startswith("我在这里用简体中文回复（通过 /lang 选择）")
    assert await say(core, "你好", mid="1") == "好的"
    assert engine.prompts[-1][0].content == ZH_PROMPT, "a Chinese conversation gets the Chinese persona"
    assert await say(core, "/lang klingon") == "用法：/lang en、/lang zh 或 /lang auto。"
    assert await say(core, "/lang auto") == "I'll follow your app's language again: English."
    assert await say(core, "/help") == HELP
    assert await say(core, "/help", language="zh-hans") == ZH_HELP


async def test_the_operators_language_is_for_everyone(make_settings: Any, core_factory: Any) -> None:
    core = await core_factory(make_settings(tools=[], language="en"), ScriptedEngine(["ok"]))
    assert await say(core, "/help", language="zh-CN") == HELP
    assert await say(core, "/lang zh", language="zh-CN") == (
        "My owner set my language to English for everyone (YANRAY_LANGUAGE), so /lang cannot change it."
    )
    assert await say(core, "/help", language="zh-CN") == HELP


async def test_the_workers_own_lines_are_in_the_askers_language(
    make_settings: Any, core_factory: Any
) -> None:
    engine = ScriptedEngine(["unused"])
    core = await core_factory(make_settings(tools=[]), engine)
    assert await say(core, "/stop", language="zh-CN") == "没有需要停止的回答。"
    hang = asyncio.Event()
    engine.before_reply = hang.wait  # type: ignore[assignment]
    first = RecordingStream()
    await core.dispatcher.handle(said("第一个问题", language="zh-CN", mid="1"), first)
    await until(lambda: engine.prompts, what="the engine got the first question")
    waiting = RecordingStream()
    await core.dispatcher.handle(said("第二个问题", language="zh-CN", mid="2"), waiting)
    assert waiting.of("notice") == ["⏳ 下一个就轮到你。"] == [queue_notice(1, "zh")]
    assert await say(core, "/stop", language="zh-CN") == "已停止。"
    assert await waiting.wait() == "已停止。"  # the waiting one, told in its asker's language
    hang.set()
    assert await first.wait() == "已停止。"  # the running one, stopped before it wrote a word


async def test_a_recovered_request_is_answered_in_its_askers_language(
    make_settings: Any, core_factory: Any
) -> None:
    settings = make_settings(tools=[])
    engine = ScriptedEngine(responder=lambda m: "答案")
    hang = asyncio.Event()
    engine.before_reply = hang.wait  # type: ignore[assignment]
    core = await core_factory(settings, engine)
    await core.dispatcher.handle(said("问题", language="zh-hans", mid="1"), RecordingStream())
    await until(lambda: engine.prompts, what="the engine got the first question")
    await core.aclose(graceful=False)  # the process dies while answering
    engine.before_reply = None
    adapter = RecordingAdapter("test")
    await core_factory(settings, engine, adapters=(adapter,))
    ((route, stream),) = adapter.reopened
    assert route["language"] == "zh"
    assert await stream.wait() == "答案"
    assert engine.prompts[-1][0].content == ZH_PROMPT


async def test_in_a_shared_conversation_only_moderators_change_the_language(
    make_settings: Any, core_factory: Any
) -> None:
    core = await core_factory(make_settings(tools=[]), ScriptedEngine(["ok"]))

    def member(text: str, *, moderator: bool) -> Incoming:
        return Incoming(
            platform="test",
            chat_id="group",
            user_id="mod" if moderator else "li",
            display_name="x",
            text=text,
            shared=True,
            moderator=moderator,
            language="zh-CN",
        )

    async def send(incoming: Incoming) -> str | None:
        out = RecordingStream()
        await core.dispatcher.handle(incoming, out)
        return await out.wait()

    assert await send(member("/lang en", moderator=False)) == "在这个共享对话中，只有管理员才能修改我的语言。"
    assert (await send(member("/lang", moderator=False)) or "").startswith("我在这里用简体中文回复")
    assert await send(member("/lang en", moderator=True)) == "From now on I write in English here."
    assert await send(member("/help", moderator=False)) == HELP  # the whole group's language now
