"""`yanray` refuses at start what cannot work: a second process on the same SQLite journal,
a context with no room for a question, a huge system prompt; and `yanray chat` survives
input that is not UTF-8."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.fakes.openai_server import FakeOpenAI
from tests.test_cli import env, spawn, yanray

pytestmark = pytest.mark.asyncio


async def test_a_second_process_on_the_same_database_is_refused(tmp_path: Path) -> None:
    async with FakeOpenAI(replies=["first", "third"]) as fake:
        environ = env(tmp_path, YANRAY_ENGINE="openai", YANRAY_OPENAI_BASE_URL=fake.base_url)
        first = await spawn(["chat"], environ, tmp_path)
        assert first.stdin is not None and first.stdout is not None
        try:
            # the first one answers, so it holds the journal
            first.stdin.write(b"hello\n")
            await first.stdin.drain()
            assert await asyncio.wait_for(first.stdout.readline(), 60) == b"first\n"
            code, out, err = await yanray(["chat"], environ, "hello too\n", cwd=tmp_path)
            assert code == 1 and out == ""
            assert err.count("\n") == 1 and f"Another Yanray (PID {first.pid})" in err
            assert "a SQLite database takes one Yanray; several share a PostgreSQL" in err
            assert "Traceback" not in err
        finally:
            first.stdin.close()
            assert await asyncio.wait_for(first.wait(), 60) == 0
        # released at exit: the next one starts and still remembers
        code, out, err = await yanray(["chat"], environ, "again\n", cwd=tmp_path)
    assert code == 0, err
    assert out == "third\n\n"
    assert [m["content"] for m in fake.requests[-1]["messages"] if m["role"] == "user"][0] == "hello"


async def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    async with FakeOpenAI(replies=["still here"]) as fake:
        environ = env(tmp_path, YANRAY_ENGINE="openai", YANRAY_OPENAI_BASE_URL=fake.base_url)
        lock = tmp_path / "data" / "yanray.db.lock"
        lock.parent.mkdir(parents=True)
        lock.write_text(f"{os.getpid() + 100_000}\n")  # a PID file nobody holds
        code, out, err = await yanray(["chat"], environ, "hi\n", cwd=tmp_path)
    assert code == 0, err
    assert out == "still here\n\n"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"YANRAY_MAX_CONTEXT": "10"}, "YANRAY_MAX_CONTEXT=10 leaves no room for a question"),
        (
            {"YANRAY_MAX_CONTEXT": "1100", "YANRAY_MAX_NEW_TOKENS": "1024"},
            "tokens for a question: the system prompt",
        ),
        ({"YANRAY_SYSTEM_PROMPT": "x" * 120_000}, "at most 16000 characters"),
    ],
)
async def test_a_context_that_cannot_work_is_refused_in_one_line(tmp_path: Path, extra, expected) -> None:
    environ = env(tmp_path, YANRAY_ENGINE="openai", YANRAY_OPENAI_BASE_URL="http://127.0.0.1:9/v1", **extra)
    code, out, err = await yanray(["chat"], environ, "hello\n", cwd=tmp_path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err
    assert len(err) < 600  # the bad value is quoted shortened


async def test_chat_reads_input_that_is_not_utf8(tmp_path: Path) -> None:
    async with FakeOpenAI(replies=["one", "two"]) as fake:
        environ = env(tmp_path, YANRAY_ENGINE="openai", YANRAY_OPENAI_BASE_URL=fake.base_url)
        code, out, err = await yanray(["chat"], environ, b"caf\xe9 \xff\xfe?\nnext line\n", cwd=tmp_path)
    assert code == 0, err
    assert out == "one\n\ntwo\n\n"
    asked = [m["content"] for r in fake.requests for m in r["messages"] if m["role"] == "user"]
    assert asked[0] == "caf\ufffd \ufffd\ufffd?" and asked[-1] == "next line"


async def test_an_endless_line_is_refused_and_the_next_one_answered(tmp_path: Path) -> None:
    async with FakeOpenAI(replies=["answered"]) as fake:
        environ = env(tmp_path, YANRAY_ENGINE="openai", YANRAY_OPENAI_BASE_URL=fake.base_url)
        code, out, err = await yanray(["chat"], environ, "a" * 300_000 + "\nshort\n", cwd=tmp_path)
    assert code == 0, err
    first, second = out.split("\n\n")[:2]
    assert "too long (over 100,000 characters)" in first and second == "answered"
    assert len(fake.requests) == 1
