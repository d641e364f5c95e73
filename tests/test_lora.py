"""Merging a PEFT LoRA adapter into a tiny ChatGLM3: YANRAY_LORA at load, `yanray quantize --lora`.

The reference is the merge a ChatGLM3 user does (tests/lora_fixtures.py): into the original
fused `query_key_value` (never split), in fp32, then the folder is loaded or quantized as any
other. Yanray merges into the converted Glm tensors, cutting lora_B's rows into q, k and v, so
the two paths share no merge code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.lora_fixtures import adapter_tensors, merge_chatglm3_way, write_adapter
from tests.model_fixtures import chatglm3_config, random_chatglm3_state, release_folder, write_chatglm3_folder
from tests.test_cli import env, yanray
from yanray.bot.cli import build_parser
from yanray.bot.errors import ConfigError
from yanray.bot.settings import load_settings
from yanray.engine.base import ChatMessage, EngineUnavailable, GenerateOptions
from yanray.engine.chatglm3.lora import AdapterRefused, check_release, read_adapter, release
from yanray.engine.chatglm3.weights import load_glm_model, read_config
from yanray.engine.int8 import MANIFEST, quantize_folder
from yanray.engine.local import LocalEngine

CPU = torch.device("cpu")
PROMPT = [ChatMessage("system", "You are Yanray."), ChatMessage("user", "What is a low-rank adapter?")]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """A tiny full-vocab ChatGLM3 release folder (real prompts fit), its config and weights."""
    cfg = chatglm3_config(_name_or_path="THUDM/chatglm3-6b-32k")
    state = random_chatglm3_state(cfg, seed=11)
    return write_chatglm3_folder(tmp_path_factory.mktemp("base"), state, cfg), cfg, state


def _engine(folder: Path, **kwargs: Any) -> LocalEngine:
    return LocalEngine.load(folder, device="cpu", dtype="float32", kv_cache_gb=0, **kwargs)


async def _reply(folder: Path, **kwargs: Any) -> list[int]:
    """The greedy reply's token ids, through the engine's own session."""
    engine = _engine(folder, **kwargs)
    try:
        session = await engine.start(PROMPT)
        before = session.tokens
        await session.generate(GenerateOptions(max_new_tokens=24))
        ids = list(session.state.tokens[before:])
        await session.close()
        return ids
    finally:
        engine._executor.shutdown(wait=True)


def _int8_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


# -- the merge gives what merging the ChatGLM3 way gives -----------------------------------------


async def test_yanray_lora_replies_as_the_folder_merged_the_chatglm3_way(base, tmp_path: Path) -> None:
    folder, cfg, state = base
    tensors = adapter_tensors(cfg, r=4)
    adapter = write_adapter(tmp_path / "adapter", cfg, tensors=tensors, r=4, lora_alpha=8)
    merged = write_chatglm3_folder(tmp_path / "merged", merge_chatglm3_way(state, tensors, 8 / 4), cfg)

    with_lora = await _reply(folder, lora=adapter)
    assert with_lora == await _reply(merged)
    assert len(with_lora) > 4
    assert with_lora != await _reply(folder)  # the adapter changes what the model says


@pytest.mark.slow
async def test_yanray_chat_with_yanray_lora_says_what_the_merged_folder_says(base, tmp_path: Path) -> None:
    folder, cfg, state = base
    tensors = adapter_tensors(cfg, r=4, seed=3)
    adapter = write_adapter(tmp_path / "adapter", cfg, tensors=tensors, r=4, lora_alpha=8)
    merged = write_chatglm3_folder(tmp_path / "merged", merge_chatglm3_way(state, tensors, 8 / 4), cfg)
    common = {"YANRAY_DEVICE": "cpu", "YANRAY_MAX_NEW_TOKENS": "16", "YANRAY_TOOLS": ""}
    lora_env = env(tmp_path / "a", YANRAY_MODEL=str(folder), YANRAY_LORA=str(adapter), **common)
    code, with_lora, err = await yanray(["chat"], lora_env, "Hello\n")
    assert code == 0, err
    assert f"merging LoRA adapter {adapter}" in err
    code, from_merged, err = await yanray(
        ["chat"], env(tmp_path, YANRAY_MODEL=str(merged), **common), "Hello\n"
    )
    assert code == 0, err
    assert with_lora == from_merged and with_lora.strip()


def test_every_merged_weight_equals_the_chatglm3_way(base, tmp_path: Path) -> None:
    folder, cfg, state = base
    tensors = adapter_tensors(cfg, r=4, targets=["query_key_value", "dense_4h_to_h"])
    adapter = write_adapter(tmp_path / "adapter", cfg, tensors=tensors, r=4, lora_alpha=16)
    merged = write_chatglm3_folder(tmp_path / "merged", merge_chatglm3_way(state, tensors, 16 / 4), cfg)
    ours = load_glm_model(
        folder, device=CPU, dtype=torch.float32, lora=read_adapter(adapter, cfg)
    ).state_dict()
    theirs = load_glm_model(merged, device=CPU, dtype=torch.float32).state_dict()
    untouched = load_glm_model(folder, device=CPU, dtype=torch.float32).state_dict()
    changed = [name for name in ours if not torch.equal(ours[name], untouched[name])]
    assert sorted(changed) == sorted(
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-6, msg=name)


def test_default_named_keys_merge_the_same(base, tmp_path: Path) -> None:
    _, cfg, _ = base
    plain = read_adapter(write_adapter(tmp_path / "plain", cfg, tensors=adapter_tensors(cfg)), cfg)
    named = adapter_tensors(cfg, key_suffix=".default.weight")  # a PEFT model's own state dict
    default = read_adapter(write_adapter(tmp_path / "default", cfg, tensors=named), cfg)
    assert plain.factors.keys() == default.factors.keys()
    for name, (b, a) in plain.factors.items():
        assert torch.equal(default.factors[name][0], b) and torch.equal(default.factors[name][1], a)


@pytest.mark.parametrize(
    ("use_rslora", "lora_scale", "expected"),
    [(False, 1.0, 8 / 4), (True, 1.0, 8 / 2), (True, 0.5, 8 / 2 * 0.5), (False, 3.0, 8 / 4 * 3)],
)
def test_scale_plain_rslora_and_lora_scale(
    tmp_path: Path, use_rslora: bool, lora_scale: float, expected: float
) -> None:
    src = release_folder("tiny-6b", tmp_path / "src", shards=1)
    cfg, state = read_config(src), load_file(src / "model.safetensors")
    tensors = adapter_tensors(cfg, r=4)
    folder = write_adapter(
        tmp_path / "adapter", cfg, tensors=tensors, r=4, lora_alpha=8, use_rslora=use_rslora
    )
    adapter = read_adapter(folder, cfg, lora_scale=lora_scale)
    assert adapter.scale == pytest.approx(expected)
    ours = load_glm_model(src, device=CPU, dtype=torch.float32, lora=adapter).state_dict()
    merged = write_chatglm3_folder(tmp_path / "merged", merge_chatglm3_way(state, tensors, expected), cfg)
    theirs = load_glm_model(merged, device=CPU, dtype=torch.float32).state_dict()
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-6, msg=name)


# -- yanray quantize --lora ------------------------------------------------------------------------


def test_quantize_with_lora_equals_quantizing_the_merged_folder(tmp_path: Path, caplog) -> None:
    src = release_folder("tiny-6b", tmp_path / "src", fmt="bin", shards=2)
    cfg = read_config(src)
    state = {
        k: v
        for k, v in load_file(
            release_folder("tiny-6b", tmp_path / "st", shards=1) / "model.safetensors"
        ).items()
    }
    tensors = adapter_tensors(cfg, r=4, targets=["query_key_value", "dense", "dense_h_to_4h"])
    adapter = write_adapter(
        tmp_path / "adapter",
        cfg,
        tensors=tensors,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["query_key_value", "dense", "dense_h_to_4h"],
    )
    merged = write_chatglm3_folder(tmp_path / "merged", merge_chatglm3_way(state, tensors, 8 / 2 * 0.5), cfg)

    with caplog.at_level(logging.INFO):
        manifest = quantize_folder(src, tmp_path / "int8-lora", progress=False, lora=adapter, lora_scale=0.5)
    quantize_folder(merged, tmp_path / "int8-merged", progress=False)
    ours, theirs = _int8_tensors(tmp_path / "int8-lora"), _int8_tensors(tmp_path / "int8-merged")
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name

    record = json.loads((tmp_path / "int8-lora" / MANIFEST).read_text())["lora"]
    assert record == manifest["lora"]
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert record["sha256"] == digest
    assert (record["r"], record["lora_alpha"], record["use_rslora"], record["scale"]) == (4, 8, True, 2.0)
    assert record["targets"] == ["query_key_value", "dense", "dense_h_to_4h"]
    kept = record["kept_through_int8"]
    assert list(kept) == ["query_key_value", "dense", "dense_h_to_4h", "overall"]
    assert 0.9 < kept["overall"]["kept"] < 1.1 and kept["overall"]["error"] < 0.3
    assert kept["overall"]["error_along_adapter"] < 0.05
    assert "LoRA change kept through INT8" in caplog.text
    assert "lora" not in json.loads((tmp_path / "int8-merged" / MANIFEST).read_text())


async def test_the_quantized_lora_folder_loads_and_replies_as_the_quantized_merged_one(
    base, tmp_path: Path
) -> None:
    """What `yanray quantize --lora` writes is a model folder the engine runs (YANRAY_MODEL=DST)."""
    folder, cfg, state = base
    tensors = adapter_tensors(cfg, r=4, seed=5)
    adapter = write_adapter(tmp_path / "adapter", cfg, tensors=tensors, r=4, lora_alpha=8)
    merged = write_chatglm3_folder(tmp_path / "merged", merge_chatglm3_way(state, tensors, 8 / 4), cfg)
    quantize_folder(folder, tmp_path / "int8-lora", progress=False, lora=adapter)
    quantize_folder(merged, tmp_path / "int8-merged", progress=False)
    quantize_folder(folder, tmp_path / "int8-base", progress=False)

    with_lora = await _reply(tmp_path / "int8-lora")
    assert with_lora == await _reply(tmp_path / "int8-merged") and len(with_lora) > 4
    assert with_lora != await _reply(tmp_path / "int8-base")  # the merged change comes through INT8


def test_the_figure_tells_noise_from_a_lost_change(tmp_path: Path) -> None:
    src = release_folder("tiny-6b", tmp_path / "src", shards=1)
    cfg = read_config(src)

    def figures(b_std: float) -> dict[str, float]:
        small = adapter_tensors(cfg, r=4, targets=["dense_4h_to_h"], b_std=b_std)
        adapter = write_adapter(tmp_path / f"a{b_std}", cfg, tensors=small, target_modules=["dense_4h_to_h"])
        kept = quantize_folder(src, tmp_path / f"q{b_std}", progress=False, lora=adapter)["lora"][
            "kept_through_int8"
        ]
        assert kept["overall"] == kept["dense_4h_to_h"]
        return kept["overall"]

    # below INT8's step: the few weights near a rounding edge jump a whole step, so element by
    # element the change is mostly noise, yet along the adapter's directions it comes through
    # (measured: kept 2.14, error 1.88, along the adapter 0.12)
    noisy = figures(1e-3)
    assert noisy["kept"] > 1.5 and noisy["error"] > 1 and noisy["error_along_adapter"] < 0.3
    # far below it, too few weights move to carry it at all (measured: 22.2, 22.2, 1.00)
    lost = figures(1e-5)
    assert lost["error"] > 10 and lost["error_along_adapter"] > 0.5


@pytest.mark.slow
async def test_quantize_command_merges_prints_the_figure_and_refuses_in_one_line(tmp_path: Path) -> None:
    src = release_folder("tiny-32k", tmp_path / "src")
    cfg = read_config(src)
    adapter = write_adapter(tmp_path / "adapter", cfg, base_model_name_or_path="THUDM/chatglm3-6b")
    dst = tmp_path / "int8"
    code, out, err = await yanray(
        ["quantize", str(src), str(dst), "--lora", str(adapter), "--lora-scale", "2"],
        env(tmp_path),
        cwd=tmp_path,
    )
    assert code == 0, err
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert f"sha256 {digest}, scale 4)" in out
    assert "LoRA change kept through INT8, ||Q(W+dW) - Q(W)|| / ||dW||: query_key_value " in out
    assert json.loads((dst / MANIFEST).read_text())["lora"]["lora_scale"] == 2.0

    refused = write_adapter(tmp_path / "dora", cfg, use_dora=True)
    code, out, err = await yanray(
        ["quantize", str(src), str(tmp_path / "no"), "--lora", str(refused)], env(tmp_path)
    )
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("yanray: LoRA adapter ") and "use_dora=True" in err
    assert not (tmp_path / "no").exists() and not (tmp_path / "no.partial").exists()

    code, out, err = await yanray(
        ["quantize", str(src), str(tmp_path / "no"), "--lora-scale", "2"], env(tmp_path)
    )
    assert code == 2 and err.strip() == "yanray: bad setting: --lora-scale needs --lora ADAPTER"


def test_quantize_help_names_the_lora_options() -> None:
    quantize = build_parser()._subparsers._group_actions[0].choices["quantize"]  # type: ignore[union-attr]
    text = quantize.format_help()
    assert "--lora ADAPTER" in text and "--lora-scale S" in text and "sqrt(r)" in text


# -- refusals --------------------------------------------------------------------------------------

REFUSED_FLAGS = [
    ({"use_dora": True}, "use_dora=True"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"init_lora_weights": "pissa_niter_16"}, "init_lora_weights='pissa_niter_16'"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
    ({"init_lora_weights": "corda"}, "init_lora_weights='corda'"),
    ({"rank_pattern": {"query_key_value": 8}}, "rank_pattern="),
    ({"alpha_pattern": {"dense": 32}}, "alpha_pattern="),
    ({"lora_bias": True}, "lora_bias=True"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"modules_to_save": ["output_layer"]}, "modules_to_save=['output_layer']"),
    ({"target_modules": ["query_key_value", "word_embeddings"]}, "target_modules 'word_embeddings'"),
    ({"use_qalora": True}, "use_qalora=True"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=True"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
]


@pytest.mark.parametrize(("overrides", "named"), REFUSED_FLAGS)
def test_each_refused_flag_is_refused_by_name(
    base, tmp_path: Path, overrides: dict[str, Any], named: str
) -> None:
    _, cfg, _ = base
    folder = write_adapter(tmp_path / "adapter", cfg, tensors=adapter_tensors(cfg), **overrides)
    with pytest.raises(AdapterRefused) as refused:
        read_adapter(folder, cfg)
    assert named in str(refused.value) and "\n" not in str(refused.value)


def test_a_config_with_no_size_to_stat_is_read_only_to_the_limit(base, tmp_path: Path) -> None:
    """adapter_config.json as a FIFO (or a link to /dev/zero) stats as 0 bytes: it is read up to
    the limit and refused, not read to an end that may never come."""
    _, cfg, _ = base
    folder = write_adapter(tmp_path / "adapter", cfg)
    config = folder / "adapter_config.json"
    config.unlink()
    os.mkfifo(config)
    written: list[int] = []

    def feed() -> None:
        try:
            with open(config, "wb") as fifo:
                for _ in range(4):
                    fifo.write(b" " * (1 << 20))
                    written.append(1)
        except BrokenPipeError:
            pass  # the reader had enough

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    with pytest.raises(AdapterRefused, match="adapter_config.json is larger than 1048576 bytes"):
        read_adapter(folder, cfg)
    feeder.join(timeout=10)
    assert not feeder.is_alive() and len(written) < 4


def _with(
    tensors: dict[str, torch.Tensor], key: str, value: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    changed = dict(tensors)
    if value is None:
        del changed[key]
    else:
        changed[key] = value
    return changed


def test_every_key_it_cannot_place_is_refused_by_name(base, tmp_path: Path) -> None:
    _, cfg, _ = base
    good = adapter_tensors(cfg, r=4)
    qkv = "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value"
    cases = {
        "base_model.model.transformer.output_layer.lora_A.weight": torch.zeros(4, 64),
        f"{qkv}.lora_magnitude_vector": torch.ones(128),  # DoRA's
        f"{qkv}.lora_A.other.weight": torch.zeros(4, 64),  # a second adapter's name
        "base_model.model.transformer.encoder.layers.2.mlp.dense_4h_to_h.lora_A.weight": torch.zeros(4, 128),
        "transformer.encoder.layers.0.mlp.dense_4h_to_h.lora_A.weight": torch.zeros(4, 128),
        f"{qkv}.lora_embedding_A": torch.zeros(4, 64),
    }
    for n, (key, value) in enumerate(cases.items()):
        folder = write_adapter(tmp_path / f"a{n}", cfg, tensors=_with(good, key, value))
        with pytest.raises(AdapterRefused, match="cannot be placed") as refused:
            read_adapter(folder, cfg)
        assert f"key {key} " in str(refused.value)

    lacking = write_adapter(tmp_path / "lacking", cfg, tensors=_with(good, f"{qkv}.lora_B.weight"))
    with pytest.raises(AdapterRefused, match=r"layers\.0\.self_attention\.query_key_value has no lora_B"):
        read_adapter(lacking, cfg)
    wrong_rank = write_adapter(tmp_path / "rank", cfg, tensors=good, r=8)
    with pytest.raises(
        AdapterRefused,
        match=r"dense has lora_A \(4, 64\) and lora_B \(64, 4\), expected \(8, 64\) and \(64, 8\) for r=8",
    ):
        read_adapter(wrong_rank, cfg)


def test_a_pickled_adapter_is_refused_with_what_to_do(base, tmp_path: Path) -> None:
    _, cfg, _ = base
    folder = tmp_path / "adapter"
    write_adapter(folder, cfg)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")  # never opened
    with pytest.raises(
        AdapterRefused,
        match="adapter_model.bin is a pickle file.*save the adapter as adapter_model.safetensors",
    ):
        read_adapter(folder, cfg)


def test_yanray_lora_refusals_at_load(base, tmp_path: Path) -> None:
    folder, cfg, _ = base
    with pytest.raises(EngineUnavailable, match="use_dora=True"):
        _engine(folder, lora=write_adapter(tmp_path / "dora", cfg, use_dora=True))
    good = write_adapter(tmp_path / "good", cfg)
    int8 = tmp_path / "int8"
    quantize_folder(folder, int8, progress=False)
    with pytest.raises(EngineUnavailable, match="is an INT8 model.*yanray quantize SRC DST --lora"):
        _engine(int8, lora=good)
    with pytest.raises(EngineUnavailable, match="YANRAY_MODEL=THUDM/chatglm3-6b-32k is not a folder"):
        LocalEngine.load("THUDM/chatglm3-6b-32k", device="cpu", data_dir=tmp_path, lora=good)
    assert not (tmp_path / "models").exists()  # refused before any download


def test_yanray_lora_needs_the_local_engine(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("YANRAY_LORA", str(tmp_path))
    assert load_settings().lora == str(tmp_path)
    monkeypatch.setenv("YANRAY_ENGINE", "openai")
    with pytest.raises(ConfigError, match="YANRAY_LORA is merged by the local engine"):
        load_settings()


# -- the release check -----------------------------------------------------------------------------


def test_release_names() -> None:
    assert release("THUDM/chatglm3-6b-32k") == "chatglm3-6b-32k"
    assert release("/models/ZhipuAI/chatglm3-6b") == "chatglm3-6b"
    assert release("/cache/models--THUDM--chatglm3-6b-base/snapshots/0123abc") == "chatglm3-6b-base"
    assert release("ChatGLM3-6B-128K") == "chatglm3-6b-128k"
    assert release("Qwen/Qwen-7B") == release("") == ""


def test_an_adapter_of_another_release_is_merged_with_a_warning(base, tmp_path: Path, caplog) -> None:
    _, cfg, _ = base
    other = read_adapter(
        write_adapter(tmp_path / "6b", cfg, base_model_name_or_path="THUDM/chatglm3-6b"), cfg
    )
    same = read_adapter(
        write_adapter(tmp_path / "32k", cfg, base_model_name_or_path="/m/chatglm3-6b-32k"), cfg
    )
    with caplog.at_level(logging.INFO):
        check_release(same, ["THUDM/chatglm3-6b-32k", "base"])
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        check_release(other, ["THUDM/chatglm3-6b-32k", "base"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert (
        "trained on chatglm3-6b (base_model_name_or_path 'THUDM/chatglm3-6b'), but the model is chatglm3-6b-32k"
        in warnings[0]
    )
