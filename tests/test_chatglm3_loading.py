"""Loading ChatGLM3 release folders into GlmForCausalLM, checked against THUDM's golden outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.model_fixtures import fixtures_dir, release_folder
from yanray.engine.chatglm3.weights import (
    checkpoint_files,
    convert_tensor,
    glm_config,
    is_chatglm3_config,
    iter_checkpoint,
)
from yanray.engine.generate import decode_one_token, prefill
from yanray.engine.local import LocalEngine
from yanray.engine.skeleton import meta_model

CPU = torch.device("cpu")


@pytest.fixture(
    scope="module",
    params=[("tiny-32k", "bin"), ("tiny-32k", "safetensors"), ("tiny-6b", "bin"), ("tiny-6b", "safetensors")],
    ids=lambda p: "-".join(p),
)
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name, fmt = request.param
    folder = release_folder(name, tmp_path_factory.mktemp(f"{name}-{fmt}"), fmt=fmt, shards=2)
    engine = LocalEngine.load(folder, device="cpu", dtype="float32")
    vectors = load_file(fixtures_dir() / name / "vectors.safetensors")
    yield engine, vectors
    engine._executor.shutdown(wait=True)


def test_release_folder_shape(tmp_path: Path) -> None:
    folder = release_folder("tiny-32k", tmp_path / "r", fmt="bin", shards=2)
    assert [p.name for p in checkpoint_files(folder)] == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    assert (folder / "pytorch_model.bin.index.json").is_file() and (folder / "tokenizer.model").is_file()


def test_full_sequence_logits_match_the_reference(loaded) -> None:
    engine, vectors = loaded
    with torch.inference_mode():
        for seq in ("seq0", "seq1", "seq2"):
            logits = engine.model(vectors[f"{seq}.input_ids"][None]).logits[0]
            assert (logits - vectors[f"{seq}.logits"]).abs().max().item() < 1e-4, seq


def test_cached_greedy_decoding_matches_the_reference(loaded) -> None:
    engine, vectors = loaded
    model = engine.model
    prompt = vectors["gen.prompt_ids"].tolist()
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    new_ids, steps = [], []
    with torch.inference_mode():
        logits = prefill(model, cache, prompt, 0, CPU)
        for i in range(len(vectors["gen.greedy_new_ids"])):
            steps.append(logits)
            token = int(logits.argmax())
            new_ids.append(token)
            logits = decode_one_token(model, cache, token, len(prompt) + i, CPU)
        keys = cache.layers[0].keys[0, :, : len(prompt)]  # (kv_heads, T, D)
    assert new_ids == vectors["gen.greedy_new_ids"].tolist()
    assert (torch.stack(steps) - vectors["gen.step_logits_kvcache"]).abs().max().item() < 1e-4
    reference_keys = vectors["gen.kv_cache.layer0.key_after_prompt"].permute(
        1, 0, 2
    )  # [seq, G, D] -> [G, seq, D]
    assert (keys - reference_keys).abs().max().item() < 1e-4


def test_glm_config_sets_every_field_for_chatglm3() -> None:
    cfg = json.loads((fixtures_dir() / "reference-configs" / "chatglm3-6b-32k.config.json").read_text())
    assert is_chatglm3_config(cfg)
    config = glm_config(cfg)
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (65024, 4096, 13696)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (28, 32, 2)
    assert (config.head_dim, config.max_position_embeddings, config.rms_norm_eps) == (128, 32768, 1e-5)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert (config.pad_token_id, config.eos_token_id, config.tie_word_embeddings) == (0, 2, False)
    assert config.attention_bias is True
    model = meta_model(cfg).model
    assert sum(p.numel() for p in model.parameters()) == 6_243_584_000
    six_b = json.loads((fixtures_dir() / "reference-configs" / "chatglm3-6b.config.json").read_text())
    assert glm_config(six_b).rope_parameters["rope_theta"] == 10000.0  # no rope_ratio: 1


def test_unsupported_variants_are_refused() -> None:
    cfg = json.loads((fixtures_dir() / "tiny-32k" / "config.json").read_text())
    for key, value in (("rmsnorm", False), ("add_bias_linear", True), ("original_rope", False)):
        with pytest.raises(ValueError, match=key):
            glm_config({**cfg, key: value})
    assert not is_chatglm3_config({"model_type": "llama"})


def test_convert_tensor_splits_qkv_and_drops_inv_freq() -> None:
    cfg = json.loads((fixtures_dir() / "tiny-32k" / "config.json").read_text())
    qkv = torch.arange(128 * 3, dtype=torch.float32).reshape(128, 3)
    out = dict(convert_tensor("transformer.encoder.layers.1.self_attention.query_key_value.weight", qkv, cfg))
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], qkv[:64])
    assert torch.equal(out["model.layers.1.self_attn.k_proj.weight"], qkv[64:96])
    assert torch.equal(out["model.layers.1.self_attn.v_proj.weight"], qkv[96:])
    assert convert_tensor("transformer.rotary_pos_emb.inv_freq", torch.ones(4), cfg) == []
    with pytest.raises(KeyError):
        convert_tensor("transformer.something_else.weight", torch.ones(1), cfg)


def test_iter_checkpoint_follows_the_index_and_prefers_safetensors(tmp_path: Path) -> None:
    folder = release_folder("tiny-6b", tmp_path / "both", fmt="bin", shards=2)
    from tests.model_fixtures import write_shards

    write_shards(
        load_file(fixtures_dir() / "tiny-6b" / "model.safetensors"), folder, fmt="safetensors", shards=3
    )
    assert all(p.suffix == ".safetensors" for p in checkpoint_files(folder))
    names = [name for name, _ in iter_checkpoint(folder)]
    assert len(names) == len(set(names)) == len(load_file(fixtures_dir() / "tiny-6b" / "model.safetensors"))
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003"):
        checkpoint_files(folder)
