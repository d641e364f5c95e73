"""`yanray chat` on the local engine: a steered tiny ChatGLM3 answers through the whole path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model_fixtures import fixtures_dir, steer_chain, steered_chatglm3
from tests.test_cli import env, yanray
from yanray.engine.chatglm3.tokenizer import EOS, ChatGLM3Tokenizer

ANSWER = "你好👋！我是 Yanray。"


@pytest.mark.slow
async def test_chat_with_a_local_chatglm3_folder(tmp_path: Path) -> None:
    tok = ChatGLM3Tokenizer(fixtures_dir() / "tokenizer.model")
    folder = steered_chatglm3(
        tmp_path / "model", steer_chain(tok.encode_text("\n") + tok.encode_text(ANSWER) + [EOS])
    )
    environ = env(tmp_path, YANRAY_MODEL=str(folder), YANRAY_DEVICE="cpu", YANRAY_MAX_CONTEXT="2048")
    code, out, err = await yanray(["chat"], environ, "你好\n/history\n", cwd=tmp_path)
    assert code == 0, err
    assert out == f"{ANSWER}\n\nYou: 你好\n\nYanray: {ANSWER}\n\n"


@pytest.mark.slow
async def test_quantize_command_writes_a_loadable_int8_folder(tmp_path: Path) -> None:
    from tests.model_fixtures import release_folder
    from yanray.engine.int8 import is_int8_folder

    src = release_folder("tiny-32k", tmp_path / "release", fmt="bin")
    dst = tmp_path / "int8"
    code, out, err = await yanray(["quantize", str(src), str(dst)], env(tmp_path), cwd=tmp_path)
    assert code == 0, err
    assert f"YANRAY_MODEL={dst}" in out
    assert is_int8_folder(dst) and not list(dst.glob("*.bin"))
