"""`yanray eval`: run an eval set through the real engine and tool loop, and compare two runs.

Each item is a fresh conversation: the system prompt a conversation in the item's language
gets (the built-in persona, or `YANRAY_SYSTEM_PROMPT`, with the enabled tools), the prompt as
its only message, fitted by the engine, then `ToolLoop.run` exactly as the worker runs it,
with `YANRAY_TOOL_ROUNDS`, `YANRAY_MAX_NEW_TOKENS` and `YANRAY_REQUEST_TIMEOUT`. Decoding is
greedy whatever `YANRAY_TEMPERATURE` says (temperature 0 reaches the engine through
`GenerateOptions`), so a run before and a run after a LoRA merge differ only by the model.
No database is opened: nothing is stored, and an eval can run beside a running bot.

Items run one after another, in the set's order, so a run does not depend on how the engine
batches. A failing model call fails its item (`engine error: ...`); an engine that cannot be
reached at all stops the run. The result file (`RESULT_FORMAT`) holds the model and settings,
the pass rate per check kind, and per item the outcome, why, the answer and the tool calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from yanray.bot.context import system_prompt
from yanray.bot.evalset import CHECKS, EvalError, EvalItem, judge
from yanray.bot.settings import Settings
from yanray.bot.toolloop import LoopResult, ToolLoop
from yanray.bot.tools import Tool, build_tools
from yanray.engine.base import (
    ChatMessage,
    Engine,
    EngineError,
    EngineUnavailable,
    GenerateOptions,
    PromptTooLong,
)

logger = logging.getLogger(__name__)

RESULT_FORMAT = "yanray-eval/1"
MAX_RESULT_BYTES = 64 * 1024 * 1024
HARD_STOP_GRACE_S = 10.0  # after the time limit's cancel, how long an engine may take to stop


async def run_eval(
    items: Sequence[EvalItem],
    *,
    engine: Engine,
    settings: Settings,
    set_name: str = "",
    set_sha256: str = "",
    progress: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every item and return the result (see the module docstring)."""
    started = datetime.now(UTC)
    clock = time.monotonic()
    toolsets: dict[tuple[str, ...], dict[str, Tool]] = {}
    outcomes: list[dict[str, Any]] = []
    try:
        for index, item in enumerate(items):
            names = tuple(item.enabled_tools(settings.tools)) if settings.tool_rounds > 0 else ()
            if names not in toolsets:
                toolsets[names] = build_tools(list(names), settings)
            outcome = await _run_item(item, engine=engine, settings=settings, tools=toolsets[names])
            outcomes.append(outcome)
            if progress is not None:
                progress(index, outcome)
    finally:
        for tools in toolsets.values():
            for tool in tools.values():
                if tool.close is not None:
                    tool.close()
    return {
        "format": RESULT_FORMAT,
        "set": set_name,
        "set_sha256": set_sha256,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - clock, 1),
        "model": model_info(settings, engine),
        "settings": {
            "temperature": 0.0,
            "max_new_tokens": settings.max_new_tokens,
            "tool_rounds": settings.tool_rounds,
            "tools": list(settings.tools),
            "max_context": engine.max_context,
            "request_timeout": settings.request_timeout,
            "system_prompt": "YANRAY_SYSTEM_PROMPT"
            if "system_prompt" in settings.model_fields_set
            else "built-in persona",
        },
        "summary": summarize(outcomes),
        "items": outcomes,
    }


def model_info(settings: Settings, engine: Engine) -> dict[str, Any]:
    """What a reader needs to tell two runs' models apart."""
    info: dict[str, Any] = {"engine": settings.engine, "backend": engine.name}
    if settings.engine == "openai":
        info.update(model=settings.openai_model, base_url=settings.openai_base_url)
    else:
        info.update(model=settings.model, device=settings.device, dtype=settings.dtype)
        if settings.lora:  # YANRAY_LORA: the adapter merged at load is part of the model
            info["lora"] = settings.lora
    return info


async def _run_item(
    item: EvalItem, *, engine: Engine, settings: Settings, tools: Mapping[str, Tool]
) -> dict[str, Any]:
    clock = time.monotonic()
    outcome: dict[str, Any] = {"id": item.id, "lang": item.lang, "check": item.check}
    try:
        result = await _answer(item, engine=engine, settings=settings, tools=tools)
    except EngineUnavailable:
        raise  # nothing after it can run either
    except PromptTooLong as exc:
        outcome.update(passed=False, why=f"does not fit the context: {exc}", answer="", tool_calls=[])
    except EngineError as exc:
        outcome.update(passed=False, why=f"engine error: {exc}", answer="", tool_calls=[])
    else:
        calls = [
            {"tool": r.tool_name, "round": r.text, "result": r.observation}
            for r in result.rounds
            if r.tool_name
        ]
        passed, why = judge(item, result.visible, [r.tool_name for r in result.rounds if r.tool_name])
        outcome.update(passed=passed, why=why, answer=result.visible, tool_calls=calls, finish=result.finish)
    outcome["seconds"] = round(time.monotonic() - clock, 2)
    return outcome


async def _answer(
    item: EvalItem, *, engine: Engine, settings: Settings, tools: Mapping[str, Tool]
) -> LoopResult:
    """One fresh conversation, answered as the worker answers (`EngineWorker._generate`)."""
    listed = list(tools.values())
    specs = [t.spec for t in listed] if engine.native_tools else []
    base = settings.default_prompt(item.lang)
    system = ChatMessage("system", system_prompt(base, listed, native=engine.native_tools))
    budget = engine.max_context - settings.max_new_tokens
    messages = await engine.fit(system, [ChatMessage("user", item.prompt)], specs, budget)
    cancel = threading.Event()
    timer = asyncio.get_running_loop().call_later(settings.request_timeout, cancel.set)
    loop = ToolLoop(tools=tools, max_rounds=settings.tool_rounds)

    def options() -> GenerateOptions:
        return GenerateOptions(max_new_tokens=settings.max_new_tokens, temperature=0.0, cancel=cancel)

    session = await engine.start(messages, specs)
    try:
        async with asyncio.timeout(settings.request_timeout + HARD_STOP_GRACE_S):
            return await loop.run(session, options=options)
    except TimeoutError:
        cancel.set()
        raise EngineError(
            f"the engine did not stop at the time limit ({settings.request_timeout:g} s)"
        ) from None
    finally:
        timer.cancel()
        await session.close()


def summarize(outcomes: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per check kind (in `CHECKS` order, those present) and `all`: passed, total, rate."""
    summary: dict[str, dict[str, Any]] = {}
    for kind in (*CHECKS, "all"):
        chosen = [o for o in outcomes if kind in ("all", o["check"])]
        if chosen:
            passed = sum(1 for o in chosen if o["passed"])
            summary[kind] = {"passed": passed, "total": len(chosen), "rate": round(passed / len(chosen), 4)}
    return summary


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_result(result: Mapping[str, Any], path: Path) -> None:
    """Write the result as indented UTF-8 JSON, whole or not at all (a temporary file renamed)."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise EvalError(f"{path}: cannot be written ({exc.strerror or type(exc).__name__})") from None


def read_result(path: Path) -> dict[str, Any]:
    """A result file `yanray eval` wrote, or `EvalError` in one line."""
    try:
        with path.open("rb") as result_file:  # to the limit: a FIFO has no size to stat
            raw = result_file.read(MAX_RESULT_BYTES + 1)
        if len(raw) > MAX_RESULT_BYTES:
            raise EvalError(f"{path}: larger than a result file may be ({MAX_RESULT_BYTES:,} bytes)")
        data = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise EvalError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EvalError(f"{path}: not a JSON file") from None
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        raise EvalError(f'{path}: not a yanray eval result (no "format": "{RESULT_FORMAT}")')
    items = data.get("items")
    if not isinstance(items, list) or not all(
        isinstance(i, dict)
        and isinstance(i.get("id"), str)
        and i.get("check") in CHECKS
        and isinstance(i.get("passed"), bool)
        for i in items
    ):
        raise EvalError(f"{path}: its items are not those of a yanray eval result")
    return data


# -- the tables ----------------------------------------------------------------------------

MAX_FLIPS_SHOWN = 40


def _cell(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "-"
    return f"{entry['passed']}/{entry['total']} {100 * entry['passed'] / entry['total']:5.1f}%"


def format_summary(result: Mapping[str, Any]) -> str:
    """The pass rate per check kind, one line each, and `all`."""
    lines = [f"{'check':<10} {'passed':>14}"]
    for kind, entry in result["summary"].items():
        lines.append(f"{kind:<10} {_cell(entry):>14}")
    return "\n".join(lines)


def format_compare(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """Per check kind: before, after and the change in percentage points; then the items
    whose outcome changed (matched by id), and the items only one run has."""
    a, b = summarize(before["items"]), summarize(after["items"])
    lines = [f"{'check':<10} {'before':>14} {'after':>14} {'change':>10}"]
    for kind in (*CHECKS, "all"):
        if kind not in a and kind not in b:
            continue
        change = ""
        if kind in a and kind in b:
            rates = [entry["passed"] / entry["total"] for entry in (a[kind], b[kind])]
            change = f"{100 * (rates[1] - rates[0]):+.1f} pts"
        lines.append(f"{kind:<10} {_cell(a.get(kind)):>14} {_cell(b.get(kind)):>14} {change:>10}")
    lines.append("")
    lines.append(f"before: {_describe(before)}")
    lines.append(f"after:  {_describe(after)}")
    if before.get("set_sha256") != after.get("set_sha256"):
        lines.append(
            "note: the two runs used different eval sets; only items in both are compared item by item"
        )
    old = {item["id"]: item for item in before["items"]}
    new = {item["id"]: item for item in after["items"]}
    flips = [(i, new[i]) for i in new if i in old and bool(old[i]["passed"]) != bool(new[i]["passed"])]
    fixed = sum(1 for _, item in flips if item["passed"])
    lines.append(f"flips: {fixed} now pass, {len(flips) - fixed} now fail")
    for item_id, item in flips[:MAX_FLIPS_SHOWN]:
        lines.append(f"  {'+' if item['passed'] else '-'} {item_id} ({item['check']}): {item.get('why', '')}")
    if len(flips) > MAX_FLIPS_SHOWN:
        lines.append(f"  ... and {len(flips) - MAX_FLIPS_SHOWN} more")
    for label, mine, other in (("before", old, new), ("after", new, old)):
        only = [i for i in mine if i not in other]
        if only:
            shown = ", ".join(only[:5]) + (", ..." if len(only) > 5 else "")
            lines.append(f"only in {label}: {len(only)} item{'s' if len(only) != 1 else ''} ({shown})")
    return "\n".join(lines)


def _describe(result: Mapping[str, Any]) -> str:
    model = result.get("model") or {}
    parts = [str(model.get("engine", "?")), str(model.get("model", "?"))]
    if model.get("lora"):
        parts.append(f"+ LoRA {model['lora']}")
    if result.get("started"):
        parts.append(f"({result['started']})")
    return " ".join(parts)
