"""The one meta-model builder and the one rule for "a Linear inside a block"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.model_fixtures import chatglm3_config, tiny_llama_chat
from yanray.engine.device import model_shape
from yanray.engine.int8 import plan_modules
from yanray.engine.skeleton import block_linears, is_block_linear, meta_model

GLM_BLOCK_LINEARS = [
    f"model.layers.{i}.{part}"
    for i in range(2)
    for part in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_up_proj",
        "mlp.down_proj",
    )
]


def test_a_chatglm3_config_becomes_a_glm_model_without_memory() -> None:
    skeleton = meta_model(chatglm3_config())
    assert skeleton.arch == "chatglm3"
    assert type(skeleton.model).__name__ == "GlmForCausalLM"
    assert skeleton.config.num_hidden_layers == 2
    assert all(p.is_meta for p in skeleton.model.parameters())


def test_block_linears_of_a_tiny_glm_model() -> None:
    model = meta_model(chatglm3_config()).model
    assert block_linears(model) == GLM_BLOCK_LINEARS
    modules = dict(model.named_modules())
    # the embedding and the output layer are outside the blocks, though lm_head is a Linear
    assert isinstance(modules["lm_head"], torch.nn.Linear)
    assert not is_block_linear("lm_head", modules["lm_head"])
    assert not is_block_linear("model.embed_tokens", modules["model.embed_tokens"])
    # a block itself, and a block's non-Linear parts, are not block Linears
    assert not is_block_linear("model.layers.0", modules["model.layers.0"])
    assert not is_block_linear("model.layers.0.input_layernorm", modules["model.layers.0.input_layernorm"])


def test_the_int8_plan_and_the_memory_guard_use_the_same_rule() -> None:
    skeleton = meta_model(chatglm3_config())
    linear, embedding = plan_modules(skeleton.model, skeleton.config, keep_16bit_outer=True)
    assert (linear, embedding) == (GLM_BLOCK_LINEARS, [])
    linear, embedding = plan_modules(skeleton.model, skeleton.config, keep_16bit_outer=False)
    assert (linear, embedding) == ([*GLM_BLOCK_LINEARS, "lm_head"], ["model.embed_tokens"])
    modules = dict(skeleton.model.named_modules())
    shape = model_shape(skeleton.model, skeleton.config)
    assert shape.block_linear_params == sum(modules[n].weight.numel() for n in GLM_BLOCK_LINEARS)
    assert shape.block_linear_rows == sum(modules[n].weight.shape[0] for n in GLM_BLOCK_LINEARS)


def test_other_layouts_name_their_blocks_differently() -> None:
    linear = torch.nn.Linear(2, 2)
    assert is_block_linear("transformer.h.0.attn.c_proj", linear)  # GPT-2 style
    assert is_block_linear("blocks.11.ff", linear)
    assert not is_block_linear("layers_extra.proj", linear)
    assert not is_block_linear("model.layers.x.proj", linear)


def test_a_transformers_folder_is_read_with_its_own_config(tmp_path: Path) -> None:
    folder = tiny_llama_chat(tmp_path / "llama")
    skeleton = meta_model({"model_type": "llama"}, folder)
    assert skeleton.arch == "transformers"
    assert type(skeleton.model).__name__ == "LlamaForCausalLM"
    assert all(p.is_meta for p in skeleton.model.parameters())
    assert len(block_linears(skeleton.model)) == 2 * 7  # q, k, v, o, gate, up, down per layer
    with pytest.raises(ValueError, match="no folder"):
        meta_model({"model_type": "llama"})


def test_an_unsupported_chatglm_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="rmsnorm"):
        meta_model(chatglm3_config(rmsnorm=False))
