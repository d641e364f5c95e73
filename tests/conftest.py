"""Shared test fixtures: no internet, a temporary data folder, settings and a running core."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from yanray.bot.app import Core
from yanray.bot.settings import Settings

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check_address(address: Any) -> None:
    if isinstance(address, tuple) and address:
        host = address[0]
        try:
            local = ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            local = host == "localhost"
        if not local:
            raise OSError(f"tests may not reach the network (tried {host})")


def _guarded_connect(self: socket.socket, address: Any) -> None:
    _check_address(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    _check_address(address)
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs offline: only loopback connections, and the model hub is off."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
async def database_url(tmp_path: Path) -> str:
    """A fresh, empty database: SQLite in the test's folder, or, when TEST_POSTGRES_URL is set
    (`postgresql+asyncpg://user@127.0.0.1:5432/db`), that PostgreSQL database emptied first."""
    url = os.environ.get("TEST_POSTGRES_URL")
    if not url:
        return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'yanray.db'}"
    import asyncpg

    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await connection.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await connection.close()
    return url


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str) -> Callable[..., Settings]:
    """Settings for a test: a temporary data folder, greedy decoding, no rate limit."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "database_url": database_url,
            "temperature": 0.0,
            "rate_limit_per_minute": 0,
            "max_new_tokens": 64,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
async def core_factory() -> AsyncIterator[Callable[..., Any]]:
    """Opens cores (and closes whatever is still open at the end of the test)."""
    opened: list[Core] = []

    async def open_core(settings: Settings, engine: Any, *, start: bool = True, adapters: tuple = ()) -> Core:
        core = await Core.open(settings, engine)
        for adapter in adapters:
            core.add_adapter(adapter)
        opened.append(core)
        if start:
            await core.start()
        return core

    yield open_core
    for core in opened:
        await core.aclose()


@pytest.fixture(scope="session")
def random_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ChatGLM3 folder with random weights, where attention over the whole conversation
    decides every token (so a wrong cache, mask or position changes the reply)."""
    from tests.model_fixtures import chatglm3_config, random_chatglm3_state, write_chatglm3_folder

    cfg = chatglm3_config()
    return write_chatglm3_folder(tmp_path_factory.mktemp("random"), random_chatglm3_state(cfg, seed=11), cfg)
