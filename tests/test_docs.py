"""The README says what the code does: every setting is in the table, and no stale ones."""

from __future__ import annotations

import re
from pathlib import Path

from yanray.bot.cli import build_parser
from yanray.bot.dispatcher import COMMANDS
from yanray.bot.settings import Settings

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def test_settings_table_matches_the_settings() -> None:
    table = set(re.findall(r"^\| `(YANRAY_[A-Z_]+)` \|", README, re.MULTILINE))
    fields = {f"YANRAY_{name.upper()}" for name in Settings.model_fields} | {"YANRAY_CONFIG"}
    assert table == fields


def default_matches(name: str, written: str) -> bool:
    """Whether `written` (a README cell or an .env.example value) says the default of the
    setting `name` (a field of Settings): a literal compares by value (`120` is 120.0,
    `80,443` a list, `./data` a path), and `empty`/`none`/`unset` (or nothing) is a default
    that is empty or None."""
    default = Settings.model_fields[name].get_default(call_default_factory=True)
    literal = re.match(r"`([^`]*)`", written)
    text = literal.group(1) if literal else written.strip()
    if not literal and (not text or re.match(r"(empty|none|unset)\b", text)):
        return default in (None, "", [])
    if not literal:
        return True  # said in words (the persona)
    if isinstance(default, bool):
        return text == str(default).lower()
    if isinstance(default, list):
        return text.split(",") == [str(item) for item in default]
    if isinstance(default, Path):
        return Path(text) == default
    if isinstance(default, int | float):
        return float(text) == default
    return text == default


def test_settings_table_says_each_default() -> None:
    rows = re.findall(r"^\| `YANRAY_([A-Z_]+)` \| ([^|]*) \|", README, re.MULTILINE)
    assert len(rows) == len(Settings.model_fields) + 1  # and YANRAY_CONFIG
    wrong = [
        (name, cell) for name, cell in rows if name != "CONFIG" and not default_matches(name.lower(), cell)
    ]
    assert wrong == []


def test_every_chat_command_is_documented() -> None:
    for name, _description in COMMANDS:
        assert f"| `/{name}" in README


def test_every_cli_command_is_documented() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in commands:
        assert f"`yanray {name}" in README


def test_the_training_loop_names_only_real_options_and_commands() -> None:
    """The training-loop walk-through names no option, command or setting the code lacks."""
    section = README[README.index("## The training loop") :]
    section = section[: section.index("\n## ")]
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    options = {o for parser in commands.values() for action in parser._actions for o in action.option_strings}
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", section))
    assert named and named <= options, named - options
    used = set(re.findall(r"(?<![\w/-])yanray ([a-z]+)\b", section))
    assert used and used <= set(commands), used - set(commands)
    settings = {f"YANRAY_{name.upper()}" for name in Settings.model_fields}
    mentioned = set(re.findall(r"\b(YANRAY_[A-Z_]+)\b", section))
    assert mentioned <= settings, mentioned - settings


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else len(README)]


def _metrics_table() -> dict[str, str]:
    """The Monitoring section's metrics table: each metric name -> its labels cell."""
    rows = {}
    for line in _section("Monitoring").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`yanray_"):
            for name in re.findall(r"`(yanray_\w+)`", cells[0]):
                rows[name] = cells[2]
    return rows


class _Engine:
    """What `Metrics` reads from an engine at scrape time: the local engine's counters and its
    GPU memory (on a GPU), so that every series the code can expose is exposed."""

    def __init__(self) -> None:
        from yanray.engine.stats import EngineStats

        self.stats = EngineStats()

    def memory(self) -> object:
        from yanray.engine.stats import GpuMemory

        return GpuMemory(used=1, peak=2, total=3)


def test_the_metrics_table_names_exactly_what_metrics_exposes() -> None:
    import asyncio

    from prometheus_client.parser import text_string_to_metric_families

    from yanray.bot.metrics import Metrics
    from yanray.bot.queue import RequestQueue

    async def scrape() -> str:  # the queue's event wants a running loop
        metrics = Metrics()
        metrics.watch(queue=RequestQueue(max_total=2, max_per_conversation=1), engine=_Engine())
        metrics.tool_called("calculate", "ok")  # labelled series exist once used
        metrics.platform_error("telegram", "rate_limited")
        return metrics.render().decode()

    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(asyncio.run(scrape())):
        name = family.name + ("_total" if family.type == "counter" else "")
        exposed[name] = {label for sample in family.samples for label in sample.labels} - {"le"}
    table = _metrics_table()
    # prometheus-client adds NAME_created (when a series began) beside each counter and
    # histogram; the README says so once rather than in each row
    created = {name for name in exposed if name.endswith("_created")}
    assert {name.removesuffix("_created") for name in created} <= {
        name.removesuffix("_total") for name in table
    }
    assert not created or "`_created`" in _section("Monitoring")
    assert set(table) == set(exposed) - created
    for name, labels in exposed.items():
        if name in created:
            continue
        cell = table[name]
        assert all(f"`{label}`" in cell for label in labels), (name, labels, cell)
        assert bool(labels) == bool(cell), (name, labels, cell)
