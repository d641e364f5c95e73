"""Builders for model folders shaped like real releases, for tests and benchmarks.

- `fixtures_dir()`: the ChatGLM3 golden fixtures in `tests/fixtures/chatglm3` (or
  `$YANRAY_FIXTURES`); a test that needs them fails when they are not there.
- `release_folder(name, dst, fmt=..., shards=...)`: a fixture checkpoint (`tiny-6b`,
  `tiny-32k`) as a ChatGLM3 release folder: config.json, tokenizer.model and the weights
  re-saved as `model-0000N-of-0000M.safetensors` or `pytorch_model-0000N-of-0000M.bin`
  shards with their index json.
- `chatglm3_config(...)`, `random_chatglm3_state(...)`, `write_chatglm3_folder(...)`: a
  ChatGLM3 folder with random weights of any shape (default: tiny, full 65,024-row vocab,
  so the real tokenizer's prompts fit).
- `steered_chatglm3(dst, chain)`: a tiny full-vocab ChatGLM3 whose greedy output is fixed:
  every block's output projections are zero, so the last hidden state is the current
  token's embedding, and the output layer maps token `a` to `chain[a]`. Its output
  follows `chain` from the prompt's last token (`<|assistant|>`); chains may loop.
- `tiny_llama_chat(dst)`: a generic transformers chat model folder (LlamaForCausalLM, a
  WordLevel tokenizer and a chat template), built locally.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from yanray.engine.chatglm3.tokenizer import ASSISTANT

REPO = Path(__file__).resolve().parents[1]
VOCAB = 65024


def fixtures_dir() -> Path:
    """The ChatGLM3 fixtures: kept in the repository, so a clone tests itself. Missing
    fixtures fail the test (a silent skip would hide every model test)."""
    candidates = [Path(os.environ["YANRAY_FIXTURES"])] if os.environ.get("YANRAY_FIXTURES") else []
    candidates.append(REPO / "tests" / "fixtures" / "chatglm3")
    for path in candidates:
        if (path / "tokenizer.model").is_file():
            return path
    pytest.fail(f"ChatGLM3 fixtures not found (looked in {', '.join(map(str, candidates))})")


def write_shards(
    state: Mapping[str, torch.Tensor], dst: Path, *, fmt: str = "safetensors", shards: int = 1
) -> None:
    """Save `state` as a release does: one file, or N shards plus the index json."""
    names = list(state)
    if fmt not in ("safetensors", "bin"):
        raise ValueError(fmt)
    single = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    weight_map: dict[str, str] = {}
    for n, group in enumerate(groups, start=1):
        if shards == 1:
            filename = single
        elif fmt == "safetensors":
            filename = f"model-{n:05d}-of-{shards:05d}.safetensors"
        else:
            filename = f"pytorch_model-{n:05d}-of-{shards:05d}.bin"
        part = {k: state[k].contiguous() for k in group}
        if fmt == "safetensors":
            save_file(part, dst / filename, metadata={"format": "pt"})
        else:
            torch.save(part, dst / filename)
        weight_map.update(dict.fromkeys(group, filename))
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / f"{single}.index.json").write_text(json.dumps(index, indent=2))


def release_folder(name: str, dst: Path, *, fmt: str = "safetensors", shards: int = 2) -> Path:
    """A fixture checkpoint (`tiny-6b`, `tiny-32k`) as a ChatGLM3 release folder."""
    src = fixtures_dir() / name
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    shutil.copy(fixtures_dir() / "tokenizer.model", dst / "tokenizer.model")
    write_shards(load_file(src / "model.safetensors"), dst, fmt=fmt, shards=shards)
    return dst


def chatglm3_config(**overrides: Any) -> dict[str, Any]:
    """A ChatGLM3 config.json (release format); tiny and full-vocab unless overridden."""
    cfg: dict[str, Any] = {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": 128,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": 64,
        "kv_channels": 16,
        "layernorm_epsilon": 1e-05,
        "rope_ratio": 50,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "num_attention_heads": 4,
        "num_layers": 2,
        "original_rope": True,
        "padded_vocab_size": VOCAB,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 4096,
        "use_cache": True,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    cfg.update(overrides)
    return cfg


def random_chatglm3_state(
    cfg: Mapping[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.1
) -> dict[str, torch.Tensor]:
    """Random weights under ChatGLM3's tensor names (norm weights near 1)."""
    gen = torch.Generator().manual_seed(seed)
    hidden, ffn, vocab = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    qkv = (
        cfg["num_attention_heads"] * cfg["kv_channels"]
        + 2 * cfg["multi_query_group_num"] * cfg["kv_channels"]
    )

    def rand(*shape: int, scale: float = std) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    state = {"transformer.embedding.word_embeddings.weight": rand(vocab, hidden, scale=1.0)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        state[p + "input_layernorm.weight"] = (1 + rand(hidden)).to(dtype)
        state[p + "self_attention.query_key_value.weight"] = rand(qkv, hidden)
        state[p + "self_attention.query_key_value.bias"] = rand(qkv)
        state[p + "self_attention.dense.weight"] = rand(
            hidden, cfg["num_attention_heads"] * cfg["kv_channels"]
        )
        state[p + "post_attention_layernorm.weight"] = (1 + rand(hidden)).to(dtype)
        state[p + "mlp.dense_h_to_4h.weight"] = rand(2 * ffn, hidden)
        state[p + "mlp.dense_4h_to_h.weight"] = rand(hidden, ffn)
    state["transformer.encoder.final_layernorm.weight"] = (1 + rand(hidden)).to(dtype)
    state["transformer.output_layer.weight"] = rand(vocab, hidden)
    rot = cfg["kv_channels"] // 2  # ChatGLM3 stores base-10000 frequencies; the loader drops them
    state["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    return state


def write_chatglm3_folder(
    dst: Path,
    state: Mapping[str, torch.Tensor],
    cfg: Mapping[str, Any],
    *,
    fmt: str = "safetensors",
    shards: int = 1,
) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(fixtures_dir() / "tokenizer.model", dst / "tokenizer.model")
    write_shards(state, dst, fmt=fmt, shards=shards)
    return dst


def steer_chain(ids: Sequence[int], *, start: int = ASSISTANT) -> dict[int, int]:
    """The transitions that make the steered model write `ids` after `start`."""
    seq = [start, *ids]
    chain: dict[int, int] = {}
    for a, b in zip(seq, seq[1:], strict=False):
        if chain.get(a, b) != b:
            raise ValueError(f"token {a} would need two successors ({chain[a]} and {b}); pick other text")
        chain[a] = b
    return chain


def steered_chatglm3(
    dst: Path, chain: Mapping[int, int], *, hidden: int = 128, seed: int = 0, fmt: str = "safetensors"
) -> Path:
    """A tiny full-vocab ChatGLM3 whose greedy next token after `a` is `chain[a]`."""
    cfg = chatglm3_config(hidden_size=hidden, kv_channels=hidden // 4)
    state = random_chatglm3_state(cfg, seed=seed, std=0.02)
    for name in list(state):
        if name.endswith(("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")):
            state[name].zero_()  # every block adds nothing: the last hidden state is the token's embedding
        if name.endswith("layernorm.weight"):
            state[name].fill_(1.0)
    emb = state["transformer.embedding.word_embeddings.weight"]
    out = torch.zeros(VOCAB, hidden)
    for a, b in chain.items():
        out[b] += 10.0 * emb[a] / emb[a].norm()
    state["transformer.output_layer.weight"] = out
    return write_chatglm3_folder(dst, state, cfg, fmt=fmt)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_llama_chat(dst: Path, *, seed: int = 0) -> Path:
    """A generic chat model folder: LlamaForCausalLM + WordLevel tokenizer + chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    words = (
        "[UNK] hello world how are you i am fine thanks tools calculate the answer is 42 what time".split()
    )
    # specials are added tokens, not words, so plain text can never produce them (as in real tokenizers)
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="[UNK]",
        additional_special_tokens=specials[2:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst
