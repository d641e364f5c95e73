"""PEFT LoRA adapters for the tiny ChatGLM3 models, and the reference merge, for the LoRA tests.

- `write_adapter(dst, cfg, ...)`: a PEFT adapter folder (`adapter_config.json` and
  `adapter_model.safetensors`) for the ChatGLM3 config `cfg`, with random lora_A and a
  non-zero random lora_B, so the merged change is visible.
- `merge_chatglm3_way(state, adapter, scale)`: the reference merge, the way a ChatGLM3 user
  merges with THUDM's code and peft: into the original fused tensors (query_key_value whole,
  never split) of a ChatGLM3 state dict, in fp32, `W + (B @ A) * scale`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

TARGET_MODULES = {
    "query_key_value": "self_attention.query_key_value",
    "dense": "self_attention.dense",
    "dense_h_to_4h": "mlp.dense_h_to_4h",
    "dense_4h_to_h": "mlp.dense_4h_to_h",
}
PREFIX = "base_model.model.transformer.encoder.layers."


def target_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """(out, in) of each target's ChatGLM3 weight, from the config."""
    d, h, g = cfg["kv_channels"], cfg["num_attention_heads"], cfg["multi_query_group_num"]
    hidden, ffn = cfg["hidden_size"], cfg["ffn_hidden_size"]
    return {
        "query_key_value": ((h + 2 * g) * d, hidden),
        "dense": (hidden, h * d),
        "dense_h_to_4h": (2 * ffn, hidden),
        "dense_4h_to_h": (hidden, ffn),
    }


def adapter_config(**overrides: Any) -> dict[str, Any]:
    """An adapter_config.json as PEFT (through LLaMA-Factory) writes it for ChatGLM3."""
    conf: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "THUDM/chatglm3-6b-32k",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": list(TARGET_MODULES),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
        "layers_to_transform": None,
        "inference_mode": True,
        "revision": None,
    }
    conf.update(overrides)
    return conf


def adapter_tensors(
    cfg: Mapping[str, Any],
    *,
    r: int = 4,
    targets: Sequence[str] = tuple(TARGET_MODULES),
    seed: int = 0,
    b_std: float = 0.05,
    key_suffix: str = ".weight",
) -> dict[str, torch.Tensor]:
    """Random lora_A / lora_B for every layer and target, under PEFT's saved key names."""
    gen = torch.Generator().manual_seed(seed)
    shapes = target_shapes(cfg)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(cfg["num_layers"]):
        for target in targets:
            out, inp = shapes[target]
            key = f"{PREFIX}{layer}.{TARGET_MODULES[target]}"
            tensors[f"{key}.lora_A{key_suffix}"] = torch.randn(r, inp, generator=gen) / inp**0.5
            tensors[f"{key}.lora_B{key_suffix}"] = torch.randn(out, r, generator=gen) * b_std
    return tensors


def write_adapter(
    dst: Path,
    cfg: Mapping[str, Any],
    *,
    tensors: Mapping[str, torch.Tensor] | None = None,
    **config_overrides: Any,
) -> Path:
    """A PEFT adapter folder for `cfg`; `tensors` default to `adapter_tensors(cfg, r=...)`."""
    conf = adapter_config(**config_overrides)
    if tensors is None:
        targets = conf["target_modules"] if isinstance(conf["target_modules"], list) else TARGET_MODULES
        tensors = adapter_tensors(cfg, r=conf["r"], targets=[t for t in targets if t in TARGET_MODULES])
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "adapter_config.json").write_text(json.dumps(conf, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "adapter_model.safetensors")
    return dst


def merge_chatglm3_way(
    state: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """The ChatGLM3 state dict with the adapter merged into its original (fused) tensors, in fp32."""
    merged = dict(state)
    for key, a in tensors.items():
        if ".lora_A" not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A")[0]
        b = tensors[key.replace(".lora_A", ".lora_B")]
        weight = f"{module}.weight"
        merged[weight] = state[weight].float() + (b.float() @ a.float()) * scale
    return merged
