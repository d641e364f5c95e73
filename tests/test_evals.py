"""`yanray eval`: a prompt set through the scripted engine, the real tool loop and calculator,
the result and its table, `compare`, refused sets, and the shipped evals/core.jsonl."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.openai_server import FakeOpenAI
from tests.scripted_engine import ScriptedEngine
from tests.test_cli import env, yanray
from yanray.bot.context import system_prompt
from yanray.bot.evals import format_compare, format_summary, read_result, run_eval, write_result
from yanray.bot.evalset import CHECKS, EvalError, EvalItem, default_set, judge, load_set, parse_set
from yanray.bot.tools import build_tools
from yanray.engine.base import ChatMessage

REPO = Path(__file__).parents[1]

SET = [
    {"id": "e1", "lang": "en", "prompt": "Capital of France?", "check": "exact", "expected": "Paris"},
    {"id": "e2", "lang": "en", "prompt": "Capital of Italy?", "check": "exact", "expected": "Rome"},
    {
        "id": "c1",
        "lang": "zh",
        "prompt": "中国最长的河流？",
        "check": "contains",
        "expected": ["长江", "扬子江"],
    },
    {"id": "c2", "lang": "en", "prompt": "The Red Planet?", "check": "contains", "expected": "Mars"},
    {"id": "t1", "lang": "en", "prompt": "1234*5678?", "check": "tool", "expected": "7006652"},
    {"id": "t2", "lang": "zh", "prompt": "345 乘以 789？", "check": "tool", "expected": "272205"},
    {"id": "t3", "lang": "en", "prompt": "98765/125?", "check": "tool", "expected": "790.12"},
    {"id": "n1", "lang": "en", "prompt": "Hi!", "check": "no_tool"},
    {"id": "n2", "lang": "zh", "prompt": "你好！", "check": "no_tool", "tools": ["calculate"]},
    {"id": "p1", "lang": "en", "prompt": "Who are you?", "check": "persona"},
    {"id": "p2", "lang": "zh", "prompt": "你是谁？", "check": "persona"},
    {"id": "p3", "lang": "zh", "prompt": "你叫什么？", "check": "persona"},
    {"id": "p4", "lang": "en", "prompt": "Your name?", "check": "persona", "forbidden": ["ChatGLM"]},
]

# what the "before" model answers: (first round, answer after the tool's observation)
BEFORE = {
    "Capital of France?": "**Paris.**",  # exact: formatting and punctuation around it do not count
    "Capital of Italy?": "The capital is Rome.",  # not exact
    "中国最长的河流？": "是长江。",
    "The Red Planet?": "Jupiter.",
    "1234*5678?": ("Let me compute.\n/calculate 1234*5678\n", "It is 7,006,652."),
    "345 乘以 789？": "等于 272205。",  # right, but no calculator
    "98765/125?": ("/calculate 98765/125\n", "It is about 790."),  # the calculator, a wrong answer
    "Hi!": "Hello! How can I help?",
    "你好！": ("/calculate 1+1\n", "你好！"),
    "Who are you?": "I am Yanray, your personal assistant.",
    "你是谁？": "I am Yanray, a helpful assistant.",  # English to a Chinese question
    "你叫什么？": "我叫 Yanray，是你的私人助手。",
    "Your name?": "I am Yanray, built on ChatGLM.",  # a forbidden word
}
# the "after" model: e2, t2, t3 and p2 now pass, p1 now fails
AFTER = {
    **BEFORE,
    "Capital of Italy?": "Rome",
    "345 乘以 789？": ("/calculate 345*789\n", "345 × 789 = 272205。"),
    "98765/125?": ("/calculate 98765/125\n", "It is 790.12."),
    "你是谁？": "我是 Yanray，一个乐于助人的助手。",
    "Who are you?": "I am an AI assistant.",
}


def responder(script: dict[str, Any]) -> Callable[[list[ChatMessage]], str]:
    def answer(messages: list[ChatMessage]) -> str:
        reply = script[messages[1].content]
        if isinstance(reply, str):
            return reply
        return reply[1] if messages[-1].role == "observation" else reply[0]

    return answer


def write_set(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    return path


async def run_scripted(script: dict[str, Any], settings: Any) -> tuple[dict[str, Any], ScriptedEngine]:
    items = parse_set("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in SET), name="set.jsonl")
    engine = ScriptedEngine(responder=responder(script))
    result = await run_eval(items, engine=engine, settings=settings, set_name="set.jsonl", set_sha256="x")
    return result, engine


async def test_a_set_with_known_outcomes_gives_the_expected_table(make_settings) -> None:
    # YANRAY_TEMPERATURE is 0.9 and the calculator is not configured: an eval is greedy, and a
    # tool item has its tool all the same
    settings = make_settings(temperature=0.9, tools=[], max_new_tokens=256)
    result, engine = await run_scripted(BEFORE, settings)

    assert format_summary(result) == (
        "check              passed\n"
        "exact          1/2  50.0%\n"
        "contains       1/2  50.0%\n"
        "tool           1/3  33.3%\n"
        "no_tool        1/2  50.0%\n"
        "persona        2/4  50.0%\n"
        "all           6/13  46.2%"
    )
    outcomes = {o["id"]: o for o in result["items"]}
    assert {i: (o["passed"], o["why"]) for i, o in outcomes.items()} == {
        "e1": (True, "exact answer"),
        "e2": (False, "answer is not 'Rome'"),
        "c1": (True, "contains '长江'"),
        "c2": (False, "does not contain 'Mars'"),
        "t1": (True, "called calculate, and the result is in the answer"),
        "t2": (False, "did not call calculate"),
        "t3": (False, "called calculate, but '790.12' is not in the answer"),
        "n1": (True, "no tool call"),
        "n2": (False, "called calculate"),
        "p1": (True, "says Yanray, in English"),
        "p2": (False, "answered in English, asked in Chinese"),
        "p3": (True, "says Yanray, in Chinese"),
        "p4": (False, "says 'ChatGLM', which it must not"),
    }
    # the answer is what a user would see (the call line left out), the real calculator ran
    assert outcomes["t1"]["answer"] == "Let me compute.\nIt is 7,006,652."
    assert outcomes["t1"]["tool_calls"] == [
        {"tool": "calculate", "round": "Let me compute.\n/calculate 1234*5678\n", "result": "7006652"}
    ]
    assert outcomes["e1"]["tool_calls"] == [] and outcomes["e1"]["finish"] == "stop"
    assert result["settings"]["temperature"] == 0.0 and result["settings"]["tools"] == []
    assert result["model"]["engine"] == "local" and result["summary"]["all"] == {
        "passed": 6,
        "total": 13,
        "rate": 0.4615,
    }

    # every item is a fresh conversation: its first prompt is the system prompt of its language
    # (with the tool it has) and the question alone
    firsts = [p for p in engine.prompts if len(p) == 2]
    assert [p[1] for p in firsts] == [ChatMessage("user", i["prompt"]) for i in SET]
    calculator = list(build_tools(["calculate"]).values())
    zh_tool = system_prompt(settings.default_prompt("zh"), calculator, native=False)
    assert firsts[5][0] == ChatMessage("system", zh_tool)
    assert firsts[8][0] == ChatMessage("system", zh_tool)  # its own "tools"
    # an item with no tool of its own gets the configured ones: here none
    assert firsts[0][0] == ChatMessage("system", settings.default_prompt("en"))
    assert "Yanray" in firsts[0][0].content


async def test_compare_shows_the_change_per_kind_and_the_flips(make_settings, tmp_path) -> None:
    settings = make_settings(tools=["calculate"], max_new_tokens=256)
    before, _ = await run_scripted(BEFORE, settings)
    # the same model with YANRAY_LORA: the result records the adapter
    after, _ = await run_scripted(AFTER, settings.model_copy(update={"lora": "saves/yanray-lora"}))
    assert after["model"]["lora"] == "saves/yanray-lora" and "lora" not in before["model"]
    write_result(before, tmp_path / "before.json")
    write_result(after, tmp_path / "after.json")

    text = format_compare(read_result(tmp_path / "before.json"), read_result(tmp_path / "after.json"))
    lines = text.split("\n")
    assert lines[:7] == [
        "check              before          after     change",
        "exact          1/2  50.0%     2/2 100.0%  +50.0 pts",
        "contains       1/2  50.0%     1/2  50.0%   +0.0 pts",
        "tool           1/3  33.3%     3/3 100.0%  +66.7 pts",
        "no_tool        1/2  50.0%     1/2  50.0%   +0.0 pts",
        "persona        2/4  50.0%     2/4  50.0%   +0.0 pts",
        "all           6/13  46.2%    9/13  69.2%  +23.1 pts",
    ]
    assert lines[8].startswith("before: local THUDM/chatglm3-6b-32k (")
    assert lines[9].startswith("after:  local THUDM/chatglm3-6b-32k + LoRA saves/yanray-lora (")
    assert lines[10:] == [
        "flips: 4 now pass, 1 now fail",
        "  + e2 (exact): exact answer",
        "  + t2 (tool): called calculate, and the result is in the answer",
        "  + t3 (tool): called calculate, and the result is in the answer",
        "  - p1 (persona): does not say 'Yanray'",
        "  + p2 (persona): says Yanray, in Chinese",
    ]


async def test_the_command_runs_greedily_through_the_configured_engine_and_compares(tmp_path) -> None:
    """`yanray eval SET --out RESULT` and `yanray eval compare` as a person runs them."""
    items = [SET[0], SET[4], SET[9]]
    script = {
        "Capital of France?": "Paris",
        "1234*5678?": ("/calculate 1234*5678\n", "7006652"),
        "Who are you?": "I am Yanray.",
    }

    def answer(messages: list[dict[str, Any]]) -> str:
        user = next(m["content"] for m in messages if m["role"] == "user")
        reply = script[user]
        if isinstance(reply, str):
            return reply
        return reply[1] if messages[-1]["content"].startswith("Tools:") else reply[0]

    path = write_set(tmp_path / "mine.jsonl", items)
    async with FakeOpenAI(responder=answer) as fake:
        environ = env(
            tmp_path, YANRAY_ENGINE="openai", YANRAY_OPENAI_BASE_URL=fake.base_url, YANRAY_TEMPERATURE="0.9"
        )
        code, out, err = await yanray(["eval", str(path), "--out", "before.json"], environ, cwd=tmp_path)
        assert code == 0, err
        assert out == (
            "check              passed\n"
            "exact          1/1 100.0%\n"
            "tool           1/1 100.0%\n"
            "persona        1/1 100.0%\n"
            "all            3/3 100.0%\n"
            "Result written to before.json\n"
        )
        assert "eval 2/3 t1 (tool): pass" in err
        assert {r["temperature"] for r in fake.requests} == {0.0}  # greedy, whatever the setting
        assert len(fake.requests) == 4  # three questions, and the round after the calculator
        script["Who are you?"] = "I am an assistant."
        code, out, err = await yanray(["eval", str(path), "--out", "after.json"], environ, cwd=tmp_path)
        assert code == 0, err
    result = json.loads((tmp_path / "after.json").read_text(encoding="utf-8"))
    assert result["model"] == {
        "engine": "openai",
        "backend": "openai",
        "model": "chatglm3-6b-32k",
        "base_url": fake.base_url,
    }
    assert result["set"] == str(path) and [i["passed"] for i in result["items"]] == [True, True, False]

    code, out, err = await yanray(["eval", "compare", "before.json", "after.json"], environ, cwd=tmp_path)
    assert code == 0, err
    assert "persona        1/1 100.0%     0/1   0.0% -100.0 pts" in out
    assert out.endswith("flips: 0 now pass, 1 now fail\n  - p1 (persona): does not say 'Yanray'\n")


async def test_a_bad_line_is_refused_in_one_line_before_the_model_loads(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(SET[0])
        + "\n\n"
        + '{"id": "x", "lang": "en", "prompt": "?", "check": "contains"}\n{oops\n',
        encoding="utf-8",
    )
    # an engine that cannot be reached: the set is refused before anything connects
    environ = env(tmp_path, YANRAY_ENGINE="openai", YANRAY_OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    code, out, err = await yanray(["eval", str(path), "--out", "r.json"], environ, cwd=tmp_path)
    assert code == 1 and out == ""
    assert (
        err
        == "yanray: bad.jsonl line 3: 'expected' is missing; a contains check needs it (and 1 more bad line)\n"
    )
    assert not (tmp_path / "r.json").exists()

    code, out, err = await yanray(["eval", "compare", str(path), "nothing.json"], environ, cwd=tmp_path)
    assert (code, err) == (1, f"yanray: {path}: not a JSON file\n")
    code, out, err = await yanray(["eval", str(path)], environ, cwd=tmp_path)
    assert (code, err) == (
        1,
        "yanray: eval needs --out RESULT.json: yanray eval [SET.jsonl] --out RESULT.json\n",
    )


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("[1, 2]", "not a JSON object"),
        (
            '{"id": "a", "lang": "en", "prompt": "?", "check": "contains", "expect": "x"}',
            "unknown field 'expect'",
        ),
        (
            '{"id": "a", "lang": "fr", "prompt": "?", "check": "persona"}',
            "'lang' is 'fr'; it must be one of en, zh",
        ),
        (
            '{"id": "a", "lang": "en", "prompt": " ", "check": "persona"}',
            "'prompt' must be a non-empty string",
        ),
        (
            '{"id": "a", "lang": "en", "prompt": "?", "check": "vibes"}',
            "'check' is 'vibes'; it must be one of",
        ),
        ('{"lang": "en", "prompt": "?", "check": "persona"}', "'id' is missing"),
        (
            '{"id": "a", "lang": "en", "prompt": "?", "check": "exact", "expected": []}',
            "'expected' must be a string",
        ),
        (
            '{"id": "a", "lang": "en", "prompt": "?", "check": "exact", "expected": 7}',
            "'expected' must be a string",
        ),
        (
            '{"id": "a", "lang": "en", "prompt": "?", "check": "exact", "expected": "7", "tool": "calculate"}',
            "'tool' is only for a tool check",
        ),
        (
            '{"id": "a", "lang": "en", "prompt": "?", "check": "tool", "expected": "7", "tool": "rm"}',
            "'tool' names 'rm', not a tool",
        ),
        (
            '{"id": "a", "lang": "en", "prompt": "?", "check": "no_tool", "tools": "calculate"}',
            "'tools' must be a list",
        ),
        ("x" * 70_000, "70,000 characters, more than a line may have"),
    ],
)
def test_each_kind_of_bad_line_is_named(line: str, error: str) -> None:
    with pytest.raises(EvalError) as caught:
        parse_set(
            '{"id": "ok", "lang": "en", "prompt": "?", "check": "persona"}\n' + line + "\n", name="s.jsonl"
        )
    message = str(caught.value)
    assert message.startswith(f"s.jsonl line 2: {error}") and "\n" not in message


def test_a_repeated_id_and_an_empty_set_are_refused() -> None:
    line = '{"id": "a", "lang": "en", "prompt": "?", "check": "persona"}\n'
    with pytest.raises(EvalError, match=r"^s.jsonl line 3: the id 'a' is used twice$"):
        parse_set(line + "\n" + line, name="s.jsonl")
    with pytest.raises(EvalError, match=r"^s.jsonl: no items$"):
        parse_set("\n  \n", name="s.jsonl")


def test_the_checks_compare_what_a_reader_would() -> None:
    tool = EvalItem(id="t", lang="zh", prompt="?", check="tool", expected=("7006652",), tool="calculate")
    assert judge(tool, "结果是 ７,００６,６５２。", ["calculate"])[0]  # full-width digits, a separator
    assert not judge(tool, "结果是 7006652。", [])[0]
    exact = EvalItem(id="e", lang="en", prompt="?", check="exact", expected=("H2O",))
    assert judge(exact, "“h₂o”.", [])[0] and not judge(exact, "It is H2O.", [])[0]
    persona = EvalItem(id="p", lang="zh", prompt="?", check="persona", expected=("Yanray", "言睿"))
    assert judge(persona, "我是言睿。", []) == (True, "says 言睿, in Chinese")
    assert judge(persona, "", []) == (False, "no answer")


def test_the_shipped_core_set_validates_and_covers_every_kind_in_both_languages() -> None:
    path = default_set()
    assert path.resolve() == (REPO / "evals" / "core.jsonl").resolve()
    items = load_set(path)
    assert len(items) >= 30
    assert {(i.check, i.lang) for i in items} == {(c, lang) for c in CHECKS for lang in ("en", "zh")}


def test_help_shows_both_forms(capsys) -> None:
    from yanray.bot.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(
        "usage: yanray eval [SET.jsonl] --out RESULT.json\n       yanray eval compare BEFORE.json AFTER.json\n"
    )
    assert "evals/core.jsonl" in text


def test_a_set_or_result_with_no_size_to_stat_is_read_only_to_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`yanray eval <(generate)` and `eval compare` read a FIFO, which stats as 0 bytes: it is
    read up to the limit and refused, not read to an end that may never come."""
    from yanray.bot import evals, evalset

    monkeypatch.setattr(evalset, "MAX_SET_BYTES", 10_000)
    monkeypatch.setattr(evals, "MAX_RESULT_BYTES", 10_000)
    for name, read, said in (
        ("set.jsonl", load_set, "more than the 10,000 bytes an eval set may have"),
        ("result.json", read_result, r"larger than a result file may be \(10,000 bytes\)"),
    ):
        fifo = tmp_path / name
        os.mkfifo(fifo)

        def feed(fifo: Path = fifo) -> None:
            try:
                with open(fifo, "wb") as out:
                    out.write(b" " * 200_000)
            except BrokenPipeError:
                pass  # the reader had enough

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        with pytest.raises(EvalError, match=said):
            read(fifo)
        feeder.join(timeout=10)
        assert not feeder.is_alive()
