"""`yanray export`: golden datasets from a small real database, privacy, options and files.

The database is built through the storage layer as the dispatcher and the worker store
conversations (questions, slash and native tool rounds, a cancelled question, a /reset),
with ratings and `/share on` consents inserted as rows. Every dataset written here is
read back the way LLaMA-Factory reads it (`tests/llamafactory.py`), which fails on any
record it would skip or drop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from tests import llamafactory
from yanray.bot.cli import build_parser, main
from yanray.bot.errors import ConfigError
from yanray.bot.export import ExportOptions, ExportResult, export
from yanray.bot.settings import Settings
from yanray.engine.chatglm3.tools import tool_call_content
from yanray.storage import Database, Message, crud
from yanray.storage.models import Rating, ShareConsent

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")

# distinctive platform ids, so a test can look for them in every file written
ALICE, BOB, CAROL, DAVE = "731904", "558211", "664120", "990417"
SYSTEM = "You are Yanray."


@dataclass
class Built:
    requests: dict[str, int] = field(default_factory=dict)  # name -> request id
    messages: dict[str, list[int]] = field(default_factory=dict)  # name -> message ids
    conversations: dict[str, int] = field(default_factory=dict)


async def ask(
    db: Database,
    built: Built,
    name: str,
    conversation: tuple[str, str, str],
    who: str,
    question: str,
    answered: Sequence[tuple[str, str, str]] | str,
) -> None:
    """One question and its answer rounds ((role, text, tool_name)), or the status of a
    question left without an answer, stored as the worker does."""
    platform, chat_id, user_key = conversation
    rounds, status = ((), answered) if isinstance(answered, str) else (answered, "done")
    async with db.transaction() as session:
        conv, user = await crud.get_or_create_conversation(
            session=session,
            platform=platform,
            chat_id=chat_id,
            user_key=user_key,
            user_external_id=who,
            display_name=f"user {who}",
        )
        built.conversations.setdefault(f"{platform}:{chat_id}:{user_key}", conv.id)
        message = await crud.add_message(
            session=session, conversation_id=conv.id, role="user", text=question, user_id=user.id
        )
        request = await crud.create_request(
            session=session,
            conversation_id=conv.id,
            user_message_id=message.id,
            route={"platform": platform, "language": "en"},
        )
        ids = [message.id]
        for role, text, tool_name in rounds:
            stored = await crud.add_message(
                session=session,
                conversation_id=conv.id,
                role=role,
                text=text,
                turn=message.turn,
                tool_name=tool_name,
                request_id=request.id,
            )
            ids.append(stored.id)
        if status != "queued":
            await crud.finish_request(session=session, request_id=request.id, status=status, reply_text="")
    built.requests[name] = request.id
    built.messages[name] = ids


async def rate(db: Database, request_id: int, platform: str, who: str, value: int) -> None:
    async with db.transaction() as session:
        session.add(Rating(request_id=request_id, platform=platform, user_id=who, value=value))


async def share(db: Database, platform: str, who: str) -> None:
    async with db.transaction() as session:
        session.add(ShareConsent(platform=platform, user_id=who))


ALICE_CHAT = ("telegram", ALICE, ALICE)
GROUP_CHAT = ("telegram", "-1001", "")
OTHER_GROUP = ("telegram", "-1002", "")
DAVE_CHAT = ("telegram", DAVE, DAVE)


def answer(text: str) -> list[tuple[str, str, str]]:
    return [("assistant", text, "")]


# `ask`'s arguments: name, conversation, who, question, and its answer rounds or the status
# of a question left without an answer
QUESTIONS: list[tuple[str, tuple[str, str, str], str, str, Sequence[tuple[str, str, str]] | str]] = [
    (
        "hello",
        ALICE_CHAT,
        ALICE,
        "Hi, I am Alice: alice.smith@example.com, +1 (555) 123-4567.",
        answer("Hello Alice!"),
    ),
    ("cancelled", ALICE_CHAT, ALICE, "Never mind", "cancelled"),
    (
        "slash",
        ALICE_CHAT,
        ALICE,
        "What is 6.5*7.5?",
        [
            ("assistant", "Let me compute.\n/calculate 6.5*7.5\n", ""),
            ("tool", "48.75", "calculate"),
            ("assistant", "6.5 × 7.5 = 48.75.", ""),
        ],
    ),
    ("disliked", ALICE_CHAT, ALICE, "Tell me a joke", answer("No.")),
    (
        "native",
        ALICE_CHAT,
        ALICE,
        "And 2+2?",
        [
            ("assistant", "I will use the calculator.", ""),
            ("assistant", tool_call_content({"expression": "2+2"}), "calculate"),
            ("tool", "4", "calculate"),
            ("assistant", "2 + 2 = 4.", ""),
        ],
    ),
    ("trailing", ALICE_CHAT, ALICE, "Bye?", "queued"),
    ("bob", ("discord", BOB, BOB), BOB, "I am Bob and I did not agree", answer("Hi Bob.")),
    ("group1", GROUP_CHAT, CAROL, "Carol here, my number is 13800138000", answer("Hi Carol.")),
    ("group2", GROUP_CHAT, ALICE, "Alice too", "queued"),
    ("group3", GROUP_CHAT, CAROL, "What's up?", answer("Not much.")),
    ("mixed1", OTHER_GROUP, CAROL, "Hello everyone", answer("Hello!")),
    ("mixed2", OTHER_GROUP, BOB, "Bob here", "cancelled"),
    ("old", DAVE_CHAT, DAVE, "Old topic", answer("Old.")),
]


async def build_database(url: str) -> Built:
    """Alice and Carol said /share on, Bob did not, Dave is an admin, and said /reset after
    his first question."""
    db = await Database.open(url)
    built = Built()
    try:
        for question in QUESTIONS:
            await ask(db, built, *question)
        async with db.transaction() as session:
            await crud.reset_conversation(
                session=session, conversation_id=built.conversations[":".join(DAVE_CHAT)]
            )
        await ask(db, built, "new", DAVE_CHAT, DAVE, "New topic", answer("New."))
        await rate(db, built.requests["slash"], "telegram", ALICE, 1)
        await rate(db, built.requests["slash"], "discord", BOB, -1)
        await rate(db, built.requests["slash"], "telegram", CAROL, 1)
        await rate(db, built.requests["disliked"], "telegram", ALICE, -1)
        await rate(db, built.requests["native"], "telegram", ALICE, 1)
        await share(db, "telegram", ALICE)
        await share(db, "telegram", CAROL)
    finally:
        await db.close()
    return built


def settings_for(make_settings: Any, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"admins": [f"telegram:{DAVE}"], "system_prompt": SYSTEM, "tools": ["calculate"]}
    values.update(overrides)
    return make_settings(**values)


async def run(settings: Settings, out: Path, **options: Any) -> tuple[ExportResult, dict[str, list[dict]]]:
    result = await export(settings, ExportOptions(out=out, **options))
    info = json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))
    llamafactory.load(out)  # every record passes LLaMA-Factory's checks
    files = {
        name: [
            json.loads(line) for line in (out / entry["file_name"]).read_text(encoding="utf-8").splitlines()
        ]
        for name, entry in info.items()
    }
    return result, files


def turns(*pairs: str) -> list[dict[str, str]]:
    roles = {"h": "human", "g": "gpt", "o": "observation"}
    return [{"from": roles[p[0]], "value": p[2:]} for p in pairs]


HELLO = ("h Hi, I am Alice: [email], [phone].", "g Hello Alice!")
SLASH = ("h What is 6.5*7.5?", "g Let me compute.\n/calculate 6.5*7.5\n", "o 48.75", "g 6.5 × 7.5 = 48.75.")
NATIVE = ("h And 2+2?", "g I will use the calculator.\n/calculate 2+2\n", "o 4", "g 2 + 2 = 4.")
GROUP = ("h Carol here, my number is [phone]", "g Hi Carol.", "h Alice too\n\nWhat's up?", "g Not much.")


async def test_golden_default_export(make_settings, database_url, tmp_path) -> None:
    await build_database(database_url)
    settings = settings_for(make_settings)
    result, files = await run(settings, tmp_path / "out")
    records = files["yanray"]
    assert [r["conversations"] for r in records] == [
        turns(*HELLO, *SLASH),  # the cancelled question is gone; the 👎 answer cuts the chat
        turns(*NATIVE),  # the native call in the slash form; the unanswered "Bye?" is dropped
        turns(*GROUP),  # Alice and Carol both said /share on; Alice's unanswered line is merged
        turns("h Old topic", "g Old."),  # a /reset starts a new record
        turns("h New topic", "g New."),
    ]
    system = records[0]["system"]
    assert system.startswith(SYSTEM + "\n")  # then the tools, as the ChatGLM3 prompt carries them
    assert [tool["name"] for tool in json.loads(system[len(SYSTEM) + 1 :])] == ["calculate"]
    assert all(r["system"] == system for r in records)
    assert (result.train, result.validation, result.conversations) == (5, 0, 3)
    text = "".join(
        (tmp_path / "out" / name).read_text(encoding="utf-8") for name in os.listdir(tmp_path / "out")
    )
    for private in (
        ALICE,
        BOB,
        CAROL,
        DAVE,
        "alice.smith",
        "123-4567",
        "13800138000",
        "I am Bob",
        "Hello everyone",
    ):
        assert private not in text


async def test_manifest_names_records_by_pseudonym(make_settings, database_url, tmp_path) -> None:
    built = await build_database(database_url)
    settings = settings_for(make_settings)
    result, _ = await run(settings, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest == result.manifest
    key = bytes.fromhex((settings.data_dir / "export.key").read_text().strip())
    assert stat.S_IMODE((settings.data_dir / "export.key").stat().st_mode) == 0o600

    def alias(platform: str, who: str) -> str:
        return "u-" + hmac.new(key, f"{platform}:{who}".encode(), hashlib.sha256).hexdigest()[:16]

    assert manifest["conversations"] == [
        {
            "id": built.conversations[f"telegram:{ALICE}:{ALICE}"],
            "platform": "telegram",
            "shared": False,
            "users": [alias("telegram", ALICE)],
            "lines": {"yanray": [1, 2]},
        },
        {
            "id": built.conversations["telegram:-1001:"],
            "platform": "telegram",
            "shared": True,
            "users": sorted([alias("telegram", ALICE), alias("telegram", CAROL)]),
            "lines": {"yanray": [3]},
        },
        {
            "id": built.conversations[f"telegram:{DAVE}:{DAVE}"],
            "platform": "telegram",
            "shared": False,
            "users": [alias("telegram", DAVE)],
            "lines": {"yanray": [4, 5]},
        },
    ]
    counts = manifest["counts"]
    assert counts["records"] == {"yanray": 5}
    assert counts["answers"] == 7 and counts["tool_rounds"] == 2
    assert counts["broken_records_not_written"] == 0
    assert counts["redacted"] == {"email": 1, "phone": 2}
    assert counts["left_out_conversations"] == {"a writer did not say /share on": 2}
    assert counts["gaps"] == {"/reset": 1, "rated 👎": 1}
    assert manifest["settings"] == {
        "format": "sharegpt",
        "rated": None,
        "since": None,
        "users": [],
        "val_ratio": 0.0,
        "redact": True,
        "max_chars": 6000,
        "tools": ["calculate"],
    }
    # the same person has the same pseudonym in the next export from this data folder
    again, _ = await run(settings, tmp_path / "again")
    assert again.manifest["conversations"][0]["users"] == [alias("telegram", ALICE)]


async def test_rated_good_keeps_only_liked_answers_with_their_context(
    make_settings, database_url, tmp_path
) -> None:
    await build_database(database_url)
    _, files = await run(settings_for(make_settings), tmp_path / "out", rated_good=True)
    # the slash answer has 👍👍👎 (net 👍): with the question before it as context; the native
    # answer's context stops at the 👎 answer before it; unrated chats are not exported
    assert [r["conversations"] for r in files["yanray"]] == [turns(*HELLO, *SLASH), turns(*NATIVE)]


async def test_no_redact_keeps_the_text(make_settings, database_url, tmp_path) -> None:
    await build_database(database_url)
    result, files = await run(settings_for(make_settings), tmp_path / "out", redact=False)
    first = files["yanray"][0]["conversations"][0]["value"]
    assert first == "Hi, I am Alice: alice.smith@example.com, +1 (555) 123-4567."
    assert result.manifest["counts"]["redacted"] == {}


async def test_since_leaves_out_earlier_questions(make_settings, database_url, tmp_path) -> None:
    built = await build_database(database_url)
    db = await Database.open(database_url)
    try:
        async with db.transaction() as session:
            await session.execute(
                update(Message)
                .where(Message.id.in_(built.messages["hello"]))
                .values(created_at=datetime(2024, 1, 1, tzinfo=UTC))
            )
    finally:
        await db.close()
    _, files = await run(
        settings_for(make_settings), tmp_path / "out", since=datetime(2025, 1, 1, tzinfo=UTC)
    )
    assert [r["conversations"][0]["value"] for r in files["yanray"]] == [
        "What is 6.5*7.5?",
        "And 2+2?",
        "Carol here, my number is [phone]",
        "Old topic",
        "New topic",
    ]


async def test_users_narrows_to_conversations_of_those_people_alone(
    make_settings, database_url, tmp_path
) -> None:
    await build_database(database_url)
    settings = settings_for(make_settings)
    _, files = await run(settings, tmp_path / "a", users=(f"telegram:{ALICE}",))
    assert [r["conversations"][0]["value"] for r in files["yanray"]] == [HELLO[0][2:], NATIVE[0][2:]]
    _, files = await run(settings, tmp_path / "b", users=(f"telegram:{ALICE}", f"telegram:{CAROL}"))
    assert len(files["yanray"]) == 3  # Alice's two records and the group's
    # naming someone who did not agree exports nothing of theirs
    result, files = await run(settings, tmp_path / "c", users=(f"discord:{BOB}",))
    assert files["yanray"] == [] and result.conversations == 0
    assert BOB not in (tmp_path / "c" / "manifest.json").read_text(encoding="utf-8")


async def test_alpaca_leaves_out_tool_answers(make_settings, database_url, tmp_path) -> None:
    await build_database(database_url)
    result, files = await run(settings_for(make_settings), tmp_path / "out", format="alpaca")
    assert [{k: v for k, v in r.items() if k != "system"} for r in files["yanray"]] == [
        {"instruction": HELLO[0][2:], "input": "", "output": "Hello Alice!", "history": []},
        {
            "instruction": "Alice too\n\nWhat's up?",
            "input": "",
            "output": "Not much.",
            "history": [["Carol here, my number is [phone]", "Hi Carol."]],
        },
        {"instruction": "Old topic", "input": "", "output": "Old.", "history": []},
        {"instruction": "New topic", "input": "", "output": "New.", "history": []},
    ]
    assert result.manifest["counts"]["gaps"]["tool rounds (alpaca has none)"] == 2
    info = json.loads((tmp_path / "out" / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["yanray"]["formatting"] == "alpaca"


async def test_val_ratio_puts_whole_conversations_in_a_second_entry(
    make_settings, database_url, tmp_path
) -> None:
    await build_database(database_url)
    result, files = await run(settings_for(make_settings), tmp_path / "out", val_ratio=0.4)
    assert set(files) == {"yanray", "yanray_val"}
    assert len(files["yanray"]) + len(files["yanray_val"]) == 5 and files["yanray_val"]
    assert (result.train, result.validation) == (len(files["yanray"]), len(files["yanray_val"]))
    for conversation in result.manifest["conversations"]:
        assert len(conversation["lines"]) == 1  # no conversation has records in both
    info = json.loads((tmp_path / "out" / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["yanray_val"]["file_name"] == "yanray_val.jsonl"
    # an export without --val-ratio into the same folder leaves no stale validation file
    await run(settings_for(make_settings), tmp_path / "out")
    assert not (tmp_path / "out" / "yanray_val.jsonl").exists()


async def test_long_chats_are_cut_into_windows_that_end_on_an_answer(
    make_settings, database_url, tmp_path
) -> None:
    await build_database(database_url)
    hello = len("Hi, I am Alice: alice.smith@example.com, +1 (555) 123-4567.Hello Alice!")  # as stored
    _, files = await run(settings_for(make_settings), tmp_path / "out", max_chars=hello + 10)
    first = [r["conversations"] for r in files["yanray"][:3]]
    assert first == [turns(*HELLO), turns(*SLASH), turns(*NATIVE)]
    # an exchange longer than a window is left out, and no window spans it
    result, files = await run(settings_for(make_settings), tmp_path / "small", max_chars=50)
    assert result.manifest["counts"]["gaps"]["longer than --max-chars"] == 3  # Alice's three
    assert [r["conversations"] for r in files["yanray"]] == [
        turns(*GROUP[:2]),
        turns(*GROUP[2:]),
        turns("h Old topic", "g Old."),
        turns("h New topic", "g New."),
    ]


async def test_group_instructions_of_unknown_authorship_keep_the_group_out(
    make_settings, database_url, tmp_path
) -> None:
    """A moderator's /system text in a group is someone's words, and Yanray does not store
    whose: the group is left out; a private chat's own instructions are exported."""
    built = await build_database(database_url)
    db = await Database.open(database_url)
    try:
        async with db.transaction() as session:
            for key, text in (
                ("telegram:-1001:", "Moderator Erin's house rules"),
                (f"telegram:{ALICE}:{ALICE}", "Be brief, Alice said"),
            ):
                await crud.set_system_prompt(
                    session=session, conversation_id=built.conversations[key], text=text
                )
    finally:
        await db.close()
    result, files = await run(settings_for(make_settings), tmp_path / "out")
    records = files["yanray"]
    assert turns(*GROUP) not in [r["conversations"] for r in records]
    assert records[0]["conversations"] == turns(*HELLO, *SLASH)
    assert records[0]["system"].startswith("Be brief, Alice said\n")
    assert "house rules" not in "".join(p.read_text() for p in (tmp_path / "out").iterdir())
    left_out = result.manifest["counts"]["left_out_conversations"]
    assert left_out["group instructions by someone who may not have agreed"] == 1


async def test_a_key_readable_by_others_is_made_private_and_kept(
    make_settings, database_url, tmp_path, caplog
) -> None:
    await build_database(database_url)
    settings = settings_for(make_settings)
    key_file = settings.data_dir / "export.key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(32)
    key_file.write_text(key.hex() + "\n")
    os.chmod(key_file, 0o644)  # copied with a careless umask: anyone could undo the pseudonyms
    result, _ = await run(settings, tmp_path / "out")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "export.key was readable by others (mode 644); it is 0600 now" in caplog.text
    alice = "u-" + hmac.new(key, f"telegram:{ALICE}".encode(), hashlib.sha256).hexdigest()[:16]
    assert alice in {user for c in result.manifest["conversations"] for user in c["users"]}
    key_file.unlink()
    key_file.mkdir(mode=0o755)  # not a key: refused in one line, its mode left alone
    with pytest.raises(ConfigError, match="export.key: the export's pseudonym key is not a file"):
        await export(settings, ExportOptions(out=tmp_path / "out"))
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o755


async def test_files_are_created_private(make_settings, database_url, tmp_path) -> None:
    await build_database(database_url)
    out = tmp_path / "out"
    out.mkdir()
    (out / "yanray.jsonl").write_text("old")
    os.chmod(out / "yanray.jsonl", 0o644)
    previous = os.umask(0)  # nothing masks the mode: the files are made 0600, not 0666 masked
    try:
        await run(settings_for(make_settings), out, val_ratio=0.3)
    finally:
        os.umask(previous)
    names = sorted(os.listdir(out))
    assert names == ["dataset_info.json", "manifest.json", "yanray.jsonl", "yanray_val.jsonl"]
    assert {name: stat.S_IMODE((out / name).stat().st_mode) for name in names} == dict.fromkeys(names, 0o600)
    await run(settings_for(make_settings), tmp_path / "new" / "folder")
    assert stat.S_IMODE((tmp_path / "new" / "folder").stat().st_mode) == 0o700


async def test_a_missing_database_is_one_line_and_not_created(make_settings, tmp_path) -> None:
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(ConfigError, match="no database at"):
        await export(settings, ExportOptions(out=tmp_path / "out"))
    assert not (tmp_path / "none.db").exists()


def test_the_command_exports_and_its_options_are_in_the_readme(tmp_path, monkeypatch, capsys) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'yanray.db'}"
    asyncio.run(build_database(url))
    for name in [n for n in os.environ if n.startswith("YANRAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("YANRAY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("YANRAY_ADMINS", f"telegram:{DAVE}")
    assert main(["export", "--out", str(tmp_path / "out"), "--val-ratio", "0.4", "--rated", "good"]) == 0
    printed = capsys.readouterr().out
    assert "Exported 1 records and 1 for validation from 1 conversations" in printed
    assert "Left out 2 conversations" in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--out", str(tmp_path / "x"), "--users", "alice"])
    assert exit_info.value.code == 2
    assert "'alice' is not platform:id" in capsys.readouterr().err
    # the README's Export paragraph names every option `yanray export --help` lists, and no other
    export_parser = build_parser()._subparsers._group_actions[0].choices["export"]  # type: ignore[union-attr]
    options = {o for action in export_parser._actions for o in action.option_strings} - {"-h", "--help"}
    section = README[README.index("### Export") :]
    section = section[: section.index("\n## ")]
    documented = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", section))
    assert documented == options


def test_users_has_size_limits_checked_before_it_is_split(capsys) -> None:
    parser = build_parser()
    for users, said in (
        ("telegram:1," * 20_000, "220,000 characters, more than --users may have (100,000)"),
        ("telegram:" + "7" * 5_000, "'telegram:" + "7" * 88 + "...' is not platform:id"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["export", "--out", "x", "--users", users])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert said in err and len(err) < 1_000
    assert parser.parse_args(["export", "--out", "x", "--users", "telegram:1,discord:2"]).users == (
        "telegram:1",
        "discord:2",
    )
