"""The model before its weights: built on the meta device, its block Linears, its buffers.

Every place that needs a model's structure without its memory (the memory guard, the INT8
plan, both loaders, the benchmarks, the tests) builds it with `meta_model`, so they all see
the same modules under the same names:

- a ChatGLM3 config becomes transformers' native `GlmForCausalLM` through
  `engine/chatglm3/weights.py`'s `glm_config` (the one home of that mapping); any other
  config is read by `AutoConfig` from its folder, never with remote code;
- `is_block_linear` is the one rule for "a Linear inside a transformer block": what INT8
  quantizes in every plan and what the memory guard counts as shrinkable. The embedding
  and the output layer are outside the blocks (INT8 decides them apart: `keep_16bit_outer`);
- `rebuild_meta_buffers` builds what a checkpoint does not hold (the rotary tables are
  non-persistent buffers) once the weights were assigned with `load_state_dict(assign=True)`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yanray.engine.base import EngineUnavailable

#: a module inside a transformer block ("model.layers.3.mlp.down_proj", "transformer.h.0.attn.c_attn")
BLOCK_MODULE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.\d++\.")


@dataclass(frozen=True)
class MetaModel:
    """A causal LM on the meta device with its transformers config."""

    model: Any  # a transformers PreTrainedModel
    config: Any  # its PretrainedConfig
    arch: str  # "chatglm3" (built from a ChatGLM3 config) or "transformers"


def meta_model(cfg: Mapping[str, Any], folder: Path | None = None) -> MetaModel:
    """The model a `config.json` describes, on the meta device (no memory for weights).

    `folder` is needed only for a config that is not ChatGLM's, which `AutoConfig` reads
    from there. Raises `ValueError` for a ChatGLM variant that cannot be mapped exactly.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GlmForCausalLM

    from yanray.engine.chatglm3.weights import glm_config

    if cfg.get("model_type") == "chatglm":  # glm_config says what a ChatGLM variant lacks
        glm = glm_config(cfg)
        with torch.device("meta"):
            return MetaModel(GlmForCausalLM(glm), glm, "chatglm3")
    if folder is None:
        raise ValueError(
            f"model_type {cfg.get('model_type')!r} is not ChatGLM3, and no folder to read it from"
        )
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return MetaModel(model, config, "transformers")


def is_block_linear(name: str, module: torch.nn.Module) -> bool:
    """Whether `module` (called `name` in its model) is a Linear inside a transformer block."""
    return isinstance(module, torch.nn.Linear) and BLOCK_MODULE.search(name) is not None


def block_linears(model: torch.nn.Module) -> list[str]:
    """The names of the model's block Linears, in module order."""
    return [name for name, module in model.named_modules() if is_block_linear(name, module)]


def rebuild_meta_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary tables) are not in the checkpoint: build them on `device`.

    They are computed on the CPU and moved, so a table is the same on every device.
    """
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if not type(module).__name__.endswith("RotaryEmbedding"):
            raise EngineUnavailable(f"cannot build {name} ({type(module).__name__}) after loading")
        parent_name, _, child = name.rpartition(".")
        rotary: Any = type(module)
        with torch.device("cpu"):
            rebuilt = rotary(module.config).to(device)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, rebuilt)
