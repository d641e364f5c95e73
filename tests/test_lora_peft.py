"""Yanray's LoRA merge against peft's own `merge_and_unload`, where peft is installed (the dev extras).

peft cannot put a ChatGLM3 adapter on transformers' native Glm as it is (other module names, no
fused query_key_value), so the test converts the adapter's keys by hand, the way the merge must
(lora_A shared by q, k and v; lora_B's rows cut [H·D | G·D | G·D]), builds the LoRA with peft on
the Glm model, lets peft merge it, and compares every weight with Yanray's merge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.lora_fixtures import PREFIX, TARGET_MODULES, adapter_tensors, write_adapter
from tests.model_fixtures import release_folder
from yanray.engine.chatglm3.lora import read_adapter
from yanray.engine.chatglm3.weights import load_glm_model, read_config

peft = pytest.importorskip("peft")
# peft asks transformers a deprecated question while wrapping; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

CPU = torch.device("cpu")
GLM_MODULES = {
    "query_key_value": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "dense": ("self_attn.o_proj",),
    "dense_h_to_4h": ("mlp.gate_up_proj",),
    "dense_4h_to_h": ("mlp.down_proj",),
}


def _to_glm(tensors: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The adapter under Glm's module names, as peft saves a LoRA of the Glm model."""
    d = cfg["kv_channels"]
    rows = [
        cfg["num_attention_heads"] * d,
        cfg["multi_query_group_num"] * d,
        cfg["multi_query_group_num"] * d,
    ]
    converted: dict[str, torch.Tensor] = {}
    for layer in range(cfg["num_layers"]):
        for target, module in TARGET_MODULES.items():
            key = f"{PREFIX}{layer}.{module}"
            if f"{key}.lora_A.weight" not in tensors:
                continue
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            parts = torch.split(b, rows) if target == "query_key_value" else (b,)
            for glm, b_part in zip(GLM_MODULES[target], parts, strict=True):
                glm_key = f"base_model.model.model.layers.{layer}.{glm}"
                converted[f"{glm_key}.lora_A.weight"] = a.clone()
                converted[f"{glm_key}.lora_B.weight"] = b_part.clone()
    return converted


@pytest.mark.parametrize(
    ("targets", "use_rslora"),
    [
        (tuple(TARGET_MODULES), False),
        (("query_key_value",), True),
        (("dense", "dense_h_to_4h", "dense_4h_to_h"), False),
    ],
)
def test_merge_equals_peft_merge_and_unload(tmp_path: Path, targets: Sequence[str], use_rslora: bool) -> None:
    src = release_folder("tiny-32k", tmp_path / "src", shards=1)
    cfg = read_config(src)
    tensors = adapter_tensors(cfg, r=4, targets=targets)
    folder = write_adapter(
        tmp_path / "adapter",
        cfg,
        tensors=tensors,
        r=4,
        lora_alpha=16,
        use_rslora=use_rslora,
        target_modules=list(targets),
    )
    ours = load_glm_model(src, device=CPU, dtype=torch.float32, lora=read_adapter(folder, cfg)).state_dict()

    model = load_glm_model(src, device=CPU, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        use_rslora=use_rslora,
        target_modules=sorted({m.rsplit(".", 1)[1] for t in targets for m in GLM_MODULES[t]}),
        init_lora_weights=False,
    )
    wrapped = peft.get_peft_model(model, config)
    loaded = peft.set_peft_model_state_dict(wrapped, _to_glm(tensors, cfg))
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if "lora_" in k]
    theirs = wrapped.merge_and_unload().state_dict()

    assert ours.keys() == theirs.keys()
    changed = 0
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(value, before[name])
    assert changed == cfg["num_layers"] * sum(len(GLM_MODULES[t]) for t in targets)
