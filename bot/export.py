"""`yanray export --out DIR`: the stored conversations as a LLaMA-Factory dataset.

It writes `DIR/dataset_info.json` (an entry `yanray`, and `yanray_val` with `--val-ratio`),
the JSONL files those entries name, and `manifest.json` (which conversations each record
came from, pseudonymous user ids, counts and the export's settings). Every file is created
with mode 0600 (a private temporary file renamed into place), the folder, when created, 0700.

Privacy comes first, because weights cannot forget:

- Only conversations in which every writer is in `YANRAY_ADMINS` or said `/share on` are
  read. A shared group conversation with one writer who did not agree is left out whole,
  not just that person's messages: the answers around them were written having read
  them, and may quote them. A writer Yanray cannot name (no stored user) counts as one who
  did not agree. `--users` narrows this further to conversations written only by the
  people it names; it never widens it. A group conversation with `/system` instructions
  is left out too: a moderator wrote them, Yanray does not store who, so their consent
  cannot be known (a private conversation's instructions are its one writer's).
- Platform ids never reach the dataset or the manifest: people are named by a pseudonym,
  `u-` and the first 16 hex digits of HMAC-SHA256 over `platform:id`, keyed with 32
  random bytes kept in `$YANRAY_DATA_DIR/export.key` (made on first use, mode 0600; a key
  found readable by others is made 0600, with a warning), so
  the same person has the same pseudonym in every export from this data folder, and a
  pseudonym cannot be turned back into an id by trying ids without the key.
- E-mail addresses, phone numbers and key-like strings are replaced (`bot/redact.py`)
  in every text written, unless `--no-redact`.

What a record holds, and why each turn looks as it does, is `bot/export_records.py`; the
system text is what Yanray's ChatGLM3 prompt builder sends (`system` column: the
conversation's instructions, or the default persona in its language, then the enabled
tools' JSON as `engine/chatglm3/tokenizer.with_tools` appends it). The choices and the
differences from Yanray's own prompt are in docs/decisions/training-export.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from yanray.bot.context import system_prompt
from yanray.bot.errors import ConfigError
from yanray.bot.export_records import (
    Exchange,
    ExchangeReader,
    alpaca_record,
    judged,
    runs,
    sharegpt_problems,
    sharegpt_record,
    windows,
)
from yanray.bot.redact import Redactor
from yanray.bot.settings import Settings
from yanray.bot.tools import Tool, build_tools
from yanray.engine.base import ChatMessage
from yanray.engine.chatglm3.tokenizer import with_tools
from yanray.storage import Conversation, Database
from yanray.storage import dataset as stored

logger = logging.getLogger(__name__)

TRAIN, VALIDATION = "yanray", "yanray_val"
KEY_FILE = "export.key"
DEFAULT_MAX_CHARS = 6000
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": "system",
    "history": "history",
}


@dataclass(frozen=True)
class ExportOptions:
    out: Path
    rated_good: bool = False
    since: datetime | None = None
    users: tuple[str, ...] = ()  # "platform:id"
    format: str = "sharegpt"
    val_ratio: float = 0.0
    redact: bool = True
    max_chars: int = DEFAULT_MAX_CHARS


@dataclass
class _Record:
    conversation_id: int
    data: dict[str, Any]
    users: list[str]


@dataclass
class _Collected:
    records: list[_Record] = field(default_factory=list)
    conversations: dict[int, dict[str, Any]] = field(default_factory=dict)
    redactions: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    gaps: Counter[str] = field(default_factory=Counter)
    left_out: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class ExportResult:
    train: int
    validation: int
    conversations: int
    manifest: dict[str, Any]


def pseudonym_key(data_dir: Path) -> bytes:
    """The export's pseudonym key, made (mode 0600) on first use."""
    path = data_dir / KEY_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            found = path.stat()
            if not stat.S_ISREG(found.st_mode):
                raise ConfigError(f"{path}: the export's pseudonym key is not a file") from None
            mode = stat.S_IMODE(found.st_mode)
            if mode & 0o077:  # whoever can read the key can turn pseudonyms back into ids
                os.chmod(path, 0o600)
                logger.warning("%s was readable by others (mode %03o); it is 0600 now", path, mode)
            with path.open(encoding="ascii") as key_file:
                text = key_file.read(256).strip()  # 64 hex digits; a larger file is not a key
        else:
            text = secrets.token_hex(32)
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(text + "\n")
        key = bytes.fromhex(text)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not 64 hex digits"
        raise ConfigError(f"{path}: the export's pseudonym key cannot be used ({reason})") from None
    if len(key) < 16:
        raise ConfigError(f"{path}: the export's pseudonym key is too short; delete it to make a new one")
    return key


def pseudonym(key: bytes, person: tuple[str, str]) -> str:
    digest = hmac.new(key, f"{person[0]}:{person[1]}".encode(), hashlib.sha256).hexdigest()
    return "u-" + digest[:16]


def _people(items: Sequence[str]) -> set[tuple[str, str]]:
    return {(platform, ident) for platform, _, ident in (item.partition(":") for item in items)}


class _Exporter:
    def __init__(
        self, settings: Settings, options: ExportOptions, tools: Mapping[str, Tool], key: bytes
    ) -> None:
        self.settings = settings
        self.options = options
        self.key = key
        self.reader = ExchangeReader(tools)
        self.admins = _people(settings.admins)
        self.chosen = _people(options.users) if options.users else None
        self.redactor = Redactor() if options.redact else None
        tool_list = list(tools.values())
        self.tools = tool_list
        self.specs = [t.spec for t in tool_list]
        self.out = _Collected()

    def system(self, conversation: Conversation, language: str) -> str:
        """The system message Yanray's ChatGLM3 prompt builder sends in this conversation."""
        base = conversation.system_prompt or self.settings.default_prompt(language)
        content = system_prompt(base, self.tools, native=True)
        return with_tools([ChatMessage("system", content)], self.specs)[0].content

    def allowed(self, writers: set[tuple[str, str] | None], consents: set[tuple[str, str]]) -> str | None:
        """Why a conversation with these writers is left out (None: it may be exported)."""
        if not writers:
            return "nobody wrote"
        if None in writers:
            return "a writer Yanray cannot name"
        people = {w for w in writers if w is not None}
        if people - self.admins - consents:
            return "a writer did not say /share on"
        if self.chosen is not None and people - self.chosen:
            return "not only --users"
        return None

    async def collect(self, db: Database) -> _Collected:
        async with db.reading() as session:
            consents = await stored.share_consents(session=session)
            conversations = await stored.conversations(session=session)
            writers = await stored.writers(session=session)
        for conversation in conversations:
            reason = self.allowed(writers.get(conversation.id, set()), consents)
            if reason is None and conversation.user_key == "" and conversation.system_prompt:
                reason = "group instructions by someone who may not have agreed"
            if reason is not None:
                self.out.left_out[reason] += 1
                continue
            async with db.reading() as session:
                rows = await stored.messages(session=session, conversation_id=conversation.id)
                ratings = await stored.net_ratings(session=session, conversation_id=conversation.id)
                routes = await stored.request_routes(session=session, conversation_id=conversation.id)
            self._conversation(conversation, rows, ratings, routes)
        if self.redactor is not None:
            self.out.redactions = self.redactor.counts
        return self.out

    def _conversation(
        self,
        conversation: Conversation,
        rows: Sequence[Any],
        ratings: Mapping[int, int],
        routes: Mapping[int, Mapping[str, Any]],
    ) -> None:
        options = self.options
        items = judged(
            self.reader.read(rows, context_start=conversation.context_start, since=options.since),
            ratings=ratings,
            max_chars=options.max_chars,
            tool_rounds=options.format == "sharegpt",
        )
        kept = 0

        def counted(items: Any) -> Any:
            for item in items:
                if isinstance(item, Exchange):
                    self.out.counts["exchanges"] += 1
                else:
                    self.out.gaps[item.reason] += 1
                yield item

        for run in runs(counted(items)):
            for window in windows(run, max_chars=options.max_chars, rated_good=options.rated_good):
                record = self._record(conversation, window, routes)
                if record is None:
                    continue
                kept += 1
                self.out.records.append(record)
        if kept:
            self.out.conversations[conversation.id] = {
                "platform": conversation.platform,
                "shared": conversation.user_key == "",
            }

    def _record(
        self, conversation: Conversation, window: Sequence[Exchange], routes: Mapping[int, Mapping[str, Any]]
    ) -> _Record | None:
        last = window[-1]
        route = routes.get(last.request_id, {}) if last.request_id is not None else {}
        language = str(route.get("language") or conversation.language or "en")
        system = self.system(conversation, language)
        if self.options.format == "alpaca":
            data = alpaca_record(window, system)
        else:
            data = sharegpt_record(window, system)
        if self.redactor is not None:
            data = _redacted(data, self.redactor)
        if self.options.format == "sharegpt" and (problems := sharegpt_problems(data)):
            # never written: the exchanges keep the rules, so this is a bug worth a log line
            logger.error(
                "conversation %d: a record breaks the sharegpt rules (%s)", conversation.id, problems
            )
            self.out.counts["broken"] += 1
            return None
        people = {p for e in window for p in e.speakers}
        self.out.counts["answers"] += len(window)
        self.out.counts["tool_rounds"] += sum(e.tool_rounds for e in window)
        return _Record(conversation.id, data, sorted(pseudonym(self.key, p) for p in people))


def _redacted(value: Any, redactor: Redactor) -> Any:
    if isinstance(value, str):
        return redactor.redact(value)
    if isinstance(value, list):
        return [_redacted(v, redactor) for v in value]
    if isinstance(value, dict):
        return {k: (v if k == "from" else _redacted(v, redactor)) for k, v in value.items()}
    return value


def split(records: Sequence[_Record], ratio: float, key: bytes) -> tuple[list[int], list[int]]:
    """(training, validation) record indexes. Whole conversations go to validation, chosen in
    an order fixed by the key, until about `ratio` of the records are there, so no text is in
    both; with one conversation only, its last records."""
    indexes = list(range(len(records)))
    if ratio <= 0 or len(records) < 2:
        return indexes, []
    target = max(1, round(ratio * len(records)))
    by_conversation: dict[int, list[int]] = {}
    for index, record in enumerate(records):
        by_conversation.setdefault(record.conversation_id, []).append(index)
    if len(by_conversation) == 1:
        target = min(target, len(records) - 1)
        return indexes[:-target], indexes[-target:]
    order = sorted(by_conversation, key=lambda c: hmac.new(key, b"split:%d" % c, hashlib.sha256).digest())
    chosen: list[int] = []
    for conversation_id in order:
        group = by_conversation[conversation_id]
        if len(chosen) + len(group) <= target:
            chosen += group
    if not chosen:  # every conversation is larger than the target: the smallest one
        chosen = min(by_conversation.values(), key=len)
    picked = set(chosen)
    return [i for i in indexes if i not in picked], sorted(picked)


def _write_private(path: Path, data: bytes) -> None:
    """Write `path` as a new file created with mode 0600, renamed over any older one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def dataset_info(format_: str, validation: bool) -> dict[str, Any]:
    def entry(name: str) -> dict[str, Any]:
        if format_ == "alpaca":
            return {"file_name": f"{name}.jsonl", "formatting": "alpaca", "columns": dict(ALPACA_COLUMNS)}
        return {
            "file_name": f"{name}.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system"},
            "tags": dict(SHAREGPT_TAGS),
        }

    info = {TRAIN: entry(TRAIN)}
    if validation:
        info[VALIDATION] = entry(VALIDATION)
    return info


def _output_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot be made ({exc.strerror})") from None


async def export(settings: Settings, options: ExportOptions) -> ExportResult:
    """Read the database and write the dataset; `ConfigError`/`StorageError` in one line."""
    url = settings.resolved_database_url
    sqlite = stored.sqlite_file(url)
    if sqlite is not None and not sqlite.is_file():
        raise ConfigError(f"no database at {sqlite}: set YANRAY_DATABASE_URL or YANRAY_DATA_DIR to Yanray's")
    _output_folder(options.out)
    key = pseudonym_key(settings.data_dir)
    tools = build_tools(settings.tools, settings) if settings.tool_rounds > 0 else {}
    try:
        db = await Database.open(url)
        try:
            collected = await _Exporter(settings, options, tools, key).collect(db)
        finally:
            await db.close()
    finally:
        for tool in tools.values():
            if tool.close is not None:
                tool.close()
    return _write(settings, options, collected, key)


def _write(settings: Settings, options: ExportOptions, collected: _Collected, key: bytes) -> ExportResult:
    records = collected.records
    train, validation = split(records, options.val_ratio, key)
    files = {TRAIN: train}
    if options.val_ratio > 0:
        files[VALIDATION] = validation
    lines: dict[int, dict[str, list[int]]] = {}
    users: dict[int, set[str]] = {}
    for name, indexes in files.items():
        for line, index in enumerate(indexes, start=1):
            record = records[index]
            lines.setdefault(record.conversation_id, {}).setdefault(name, []).append(line)
            users.setdefault(record.conversation_id, set()).update(record.users)
    manifest = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {name: f"{name}.jsonl" for name in files},
        "settings": {
            "format": options.format,
            "rated": "good" if options.rated_good else None,
            "since": options.since.isoformat() if options.since is not None else None,
            "users": sorted(pseudonym(key, p) for p in _people(options.users)),
            "val_ratio": options.val_ratio,
            "redact": options.redact,
            "max_chars": options.max_chars,
            "tools": list(settings.tools) if settings.tool_rounds > 0 else [],
        },
        "pseudonyms": f"u- and the first 16 hex digits of HMAC-SHA256(key, 'platform:id'); the key is "
        f"{KEY_FILE} in YANRAY_DATA_DIR",
        "counts": {
            "records": {name: len(indexes) for name, indexes in files.items()},
            "conversations": len(collected.conversations),
            "answers": collected.counts["answers"],
            "tool_rounds": collected.counts["tool_rounds"],
            "broken_records_not_written": collected.counts["broken"],
            "redacted": dict(sorted(collected.redactions.items())),
            "left_out_conversations": dict(sorted(collected.left_out.items())),
            "gaps": dict(sorted(collected.gaps.items())),
        },
        "conversations": [
            {"id": cid, **meta, "users": sorted(users.get(cid, ())), "lines": lines.get(cid, {})}
            for cid, meta in sorted(collected.conversations.items())
        ],
    }
    out = options.out
    for name, indexes in files.items():
        _write_private(out / f"{name}.jsonl", _jsonl([records[i].data for i in indexes]))
    if VALIDATION not in files:
        (out / f"{VALIDATION}.jsonl").unlink(missing_ok=True)  # from an earlier export, now unnamed
    info = dataset_info(options.format, VALIDATION in files)
    _write_private(out / "dataset_info.json", (json.dumps(info, indent=2) + "\n").encode())
    _write_private(
        out / "manifest.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()
    )
    return ExportResult(
        len(train), len(validation) if VALIDATION in files else 0, len(collected.conversations), manifest
    )
