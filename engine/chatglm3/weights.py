"""ChatGLM3 checkpoints in transformers' native `GlmForCausalLM`: config, tensor mapping, shards.

No THUDM Python file is imported or run. The mapping follows the fixtures'
MAPPING_NOTES.md and is exact (float32 logits equal THUDM's own code):

- config: every `GlmConfig` field is set explicitly, because its defaults are GLM-4's
  (eps 1.5625e-7, vocab 151552, ...). rope_theta = 10000 * rope_ratio, half of each head
  rotated (`partial_rotary_factor` 0.5), interleaved pairs (Glm's own rotary).
- tensors: the fused `query_key_value` rows are [all query heads | all key groups | all
  value groups] and are cut at those offsets; `dense_h_to_4h` is already [gate | up];
  `rotary_pos_emb.inv_freq` is dropped, since it is always base 10000 and the reference
  forward never reads it.
- shards: `*.safetensors` (preferred when both are present) through `safe_open`, or
  `pytorch_model*.bin` through `torch.load(weights_only=True, mmap=True)`; the index json
  decides the shard list when there is one. One shard is open at a time.

`load_glm_model` builds the model on the meta device (`engine/skeleton.py`) and assigns
each shard's converted tensors straight onto the target device and dtype
(`load_state_dict(assign=True)`), so no full-precision copy of the whole model exists anywhere.

Only the ChatGLM2/3 architecture with RMSNorm, original rope, a final norm and no linear
biases is accepted (every ChatGLM3 release); other variants raise `ValueError` rather than
load into a model that computes something else.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from transformers import GlmConfig, GlmForCausalLM

from yanray.engine.skeleton import meta_model, rebuild_meta_buffers

if TYPE_CHECKING:
    from yanray.engine.chatglm3.lora import LoraAdapter

logger = logging.getLogger(__name__)

#: what each setting must be for the Glm mapping to be exact (absent keys take these values)
_REQUIRED_FLAGS = {
    "rmsnorm": True,
    "original_rope": True,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False,
}
_REQUIRED_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "kv_channels",
    "padded_vocab_size",
)

_LAYER_PREFIX = "transformer.encoder.layers."
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_DROPPED = ("transformer.rotary_pos_emb.inv_freq",)


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's `config.json` as a dict."""
    with (folder / "config.json").open(encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{folder / 'config.json'} is not a JSON object")
    return data


def is_chatglm3_config(cfg: Mapping[str, Any]) -> bool:
    """Whether `cfg` is a ChatGLM2/3-architecture config (ChatGLM3-6B, -6B-32K, -6B-base)."""
    return cfg.get("model_type") == "chatglm" and all(key in cfg for key in _REQUIRED_KEYS)


def _kv_groups(cfg: Mapping[str, Any]) -> int:
    if cfg.get("multi_query_attention", False):
        return int(cfg["multi_query_group_num"])
    return int(cfg["num_attention_heads"])


def glm_config(cfg: Mapping[str, Any]) -> GlmConfig:
    """The `GlmConfig` that computes exactly what this ChatGLM3 config computes."""
    if not is_chatglm3_config(cfg):
        raise ValueError("not a ChatGLM3 config (model_type 'chatglm' with num_layers, kv_channels, ...)")
    for key, wanted in _REQUIRED_FLAGS.items():
        if bool(cfg.get(key, wanted)) != wanted:
            raise ValueError(f"unsupported ChatGLM variant: {key}={cfg.get(key)!r} (Yanray needs {wanted})")
    rope_ratio = float(cfg.get("rope_ratio", 1.0))
    return GlmConfig(
        vocab_size=int(cfg["padded_vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["ffn_hidden_size"]),
        num_hidden_layers=int(cfg["num_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        num_key_value_heads=_kv_groups(cfg),
        head_dim=int(cfg["kv_channels"]),
        hidden_act="silu",
        attention_dropout=0.0,
        max_position_embeddings=int(cfg.get("seq_length", 8192)),
        initializer_range=0.02,
        rms_norm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
        use_cache=True,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * rope_ratio,
            "partial_rotary_factor": 0.5,
        },
        pad_token_id=int(cfg.get("pad_token_id", 0)),
        eos_token_id=int(cfg.get("eos_token_id", 2)),
        bos_token_id=1,
        attention_bias=bool(cfg.get("add_qkv_bias", True)),
    )


def convert_tensor(name: str, tensor: torch.Tensor, cfg: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """ChatGLM3 tensor name and value -> the Glm tensors it becomes ([] for dropped buffers).

    Raises `KeyError` for a name that is not part of a ChatGLM3 checkpoint.
    """
    if name in _DROPPED:
        return []
    if name in _TOP_RENAMES:
        return [(_TOP_RENAMES[name], tensor)]
    if name.startswith(_LAYER_PREFIX):
        index, _, rest = name[len(_LAYER_PREFIX) :].partition(".")
        prefix = f"model.layers.{int(index)}."
        if rest in _LAYER_RENAMES:
            return [(prefix + _LAYER_RENAMES[rest], tensor)]
        if rest.startswith("self_attention.query_key_value."):
            kind = rest.rsplit(".", 1)[1]  # weight or bias
            q_rows = int(cfg["num_attention_heads"]) * int(cfg["kv_channels"])
            kv_rows = _kv_groups(cfg) * int(cfg["kv_channels"])
            if tensor.shape[0] != q_rows + 2 * kv_rows:
                raise ValueError(f"{name}: {tensor.shape[0]} rows, expected {q_rows + 2 * kv_rows}")
            # rows: [q heads (H*D) | k groups (G*D) | v groups (G*D)]
            q, k, v = torch.split(tensor, [q_rows, kv_rows, kv_rows], dim=0)
            return [
                (f"{prefix}self_attn.q_proj.{kind}", q),
                (f"{prefix}self_attn.k_proj.{kind}", k),
                (f"{prefix}self_attn.v_proj.{kind}", v),
            ]
    raise KeyError(f"unexpected tensor in a ChatGLM3 checkpoint: {name}")


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight shards of a release folder, in index order; safetensors preferred over .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            with index.open(encoding="utf-8") as fh:
                weight_map: dict[str, str] = json.load(fh)["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists {missing[0]}, which is not in {folder}")
            return [folder / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    for pattern in ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise FileNotFoundError(
        f"no weights in {folder}: expected model*.safetensors or pytorch_model*.bin (with their index json)"
    )


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # files written before torch's zip format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def iter_checkpoint(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of a checkpoint folder, one shard open at a time, on the CPU."""
    for path in checkpoint_files(folder):
        logger.debug("reading %s", path.name)
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as reader:
                for key in reader.keys():
                    yield key, reader.get_tensor(key)
        else:
            state = _load_bin(path)
            try:
                yield from state.items()
            finally:
                del state


def load_glm_model(
    folder: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    cfg: Mapping[str, Any] | None = None,
    lora: LoraAdapter | None = None,
) -> GlmForCausalLM:
    """A ChatGLM3 release folder as a `GlmForCausalLM` on `device` in `dtype`, in eval mode.

    `lora`: an adapter merged into each weight it changes, in fp32, before the cast to `dtype`
    (`engine/chatglm3/lora.py`)."""
    cfg = read_config(folder) if cfg is None else cfg
    model = meta_model(cfg).model
    expected = set(model.state_dict())
    # converted tensors already live on the target device (that memory is the model's anyway);
    # on the CPU side only the shard being read is open
    state: dict[str, torch.Tensor] = {}
    for name, tensor in iter_checkpoint(folder):
        for new_name, value in convert_tensor(name, tensor, cfg):
            if new_name not in expected:
                raise ValueError(f"{folder}: tensor {name} maps to {new_name}, which the model does not have")
            if new_name in state:
                raise ValueError(f"{folder}: tensor {new_name} appears twice")
            if lora is not None:
                value = lora.merge(new_name, value)
            # copy=True: never keep a view into a memory-mapped shard or into the fused qkv tensor
            state[new_name] = value.to(device=device, dtype=dtype, copy=True)
    seen = set(state)
    missing = sorted(expected - seen)
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    if lora is not None and not set(lora.factors) <= seen:
        raise ValueError(
            f"{folder}: the adapter changes {sorted(set(lora.factors) - seen)[0]}, not in the model"
        )
    model.load_state_dict(state, strict=True, assign=True)
    del state
    rebuild_meta_buffers(model, device)
    model.config.dtype = dtype
    return model.eval()
