"""`yanray export`'s options and its run from the command line (the work is `bot/export.py`).

The options are checked by argparse, so a bad one ends with the usage line and exit
status 2 before anything is read; what is wrong with a setting or the database is one
line from `bot/cli.py`'s handler.
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from yanray.bot.export import DEFAULT_MAX_CHARS, ExportOptions, export
from yanray.bot.settings import Settings

DESCRIPTION = (
    "Write the stored conversations as a LLaMA-Factory dataset: DIR/dataset_info.json (entry "
    "yanray, and yanray_val with --val-ratio), the JSONL files it names and manifest.json, each "
    "with mode 0600. Only conversations in which every writer is in YANRAY_ADMINS or said "
    "/share on are exported; e-mail addresses, phone numbers and key-like strings are redacted."
)

#: --users: the whole list, and one platform:id (as /allow takes it: 32 + 1 + 64)
MAX_USERS_CHARS = 100_000
MAX_PERSON_CHARS = 97


def _date(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: use YYYY-MM-DD or an ISO time") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _people(text: str) -> tuple[str, ...]:
    if len(text) > MAX_USERS_CHARS:  # before splitting it
        raise argparse.ArgumentTypeError(
            f"{len(text):,} characters, more than --users may have ({MAX_USERS_CHARS:,})"
        )
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    for item in items:
        platform, _, ident = item.partition(":")
        if len(item) > MAX_PERSON_CHARS or not platform.isalpha() or not ident:
            shown = item if len(item) <= MAX_PERSON_CHARS else item[:MAX_PERSON_CHARS] + "..."
            raise argparse.ArgumentTypeError(f"{shown!r} is not platform:id, e.g. telegram:123456")
    if not items:
        raise argparse.ArgumentTypeError("no one named: give platform:id,...")
    return items


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1, e.g. 0.1")
    return value


def _size(text: str) -> int:
    if not text.isdigit() or not 200 <= int(text) <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of characters from 200 to 1000000")
    return int(text)


def add_export_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "export", help="write the shared conversations as a LLaMA-Factory dataset", description=DESCRIPTION
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="the dataset folder")
    parser.add_argument(
        "--rated",
        choices=["good"],
        help="good: only answers rated 👍 (more 👍 than 👎), each with what came before it",
    )
    parser.add_argument(
        "--since",
        type=_date,
        metavar="DATE",
        help="only questions asked from DATE on (YYYY-MM-DD or an ISO time; UTC unless it says)",
    )
    parser.add_argument(
        "--users",
        type=_people,
        default=(),
        metavar="platform:id,...",
        help="only conversations written by these people alone (who must still be admins or have said /share on)",
    )
    parser.add_argument(
        "--format",
        choices=["sharegpt", "alpaca"],
        default="sharegpt",
        help="sharegpt (default), or alpaca, which has no tool turns: answers that used tools are left out",
    )
    parser.add_argument(
        "--val-ratio",
        type=_ratio,
        default=0.0,
        metavar="R",
        help="also write the entry yanray_val with about this share of the records (whole conversations)",
    )
    parser.add_argument(
        "--no-redact",
        action="store_true",
        help="keep e-mail addresses, phone numbers and key-like strings as they are",
    )
    parser.add_argument(
        "--max-chars",
        type=_size,
        default=DEFAULT_MAX_CHARS,
        metavar="N",
        help=f"most characters of conversation in one record (default {DEFAULT_MAX_CHARS}); "
        "a longer chat is cut into windows that end on an answer",
    )


def run_export(settings: Settings, args: argparse.Namespace) -> None:
    options = ExportOptions(
        out=args.out,
        rated_good=args.rated == "good",
        since=args.since,
        users=args.users,
        format=args.format,
        val_ratio=args.val_ratio,
        redact=not args.no_redact,
        max_chars=args.max_chars,
    )
    result = asyncio.run(export(settings, options))
    validation = f" and {result.validation} for validation" if args.val_ratio else ""
    print(
        f"Exported {result.train} records{validation} from {result.conversations} conversations "
        f"to {args.out} (see manifest.json)."
    )
    left_out = result.manifest["counts"]["left_out_conversations"]
    if left_out:
        print(
            f"Left out {sum(left_out.values())} conversations: only those of YANRAY_ADMINS and of people "
            "who said /share on are exported."
        )
