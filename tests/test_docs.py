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
