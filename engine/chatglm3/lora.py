"""Merging a PEFT LoRA adapter trained on ChatGLM3 into the Glm weights, in fp32, before INT8.

An adapter is PEFT's folder: `adapter_config.json` and `adapter_model.safetensors`, whose keys
name ChatGLM3's modules (`base_model.model.transformer.encoder.layers.N.self_attention.
query_key_value.lora_A.weight`; a `.default` before `.weight`, as in a PEFT model's own state
dict, is the same key). `adapter_model.bin` is a pickle and is refused: Yanray never unpickles.
peft itself cannot put such an adapter on transformers' native `GlmForCausalLM` (other module
names, and no fused `query_key_value` to split), so the merge is done here, tensor by tensor,
as the checkpoint is converted (`engine/chatglm3/weights.py`):

    W += s · B · A, s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora) × --lora-scale

computed in fp32 whatever the checkpoint's dtype, written `W + (B @ A) * s` as peft's
`merge_and_unload` writes it. `query_key_value` -> `q_proj`, `k_proj`, `v_proj`: A is shared and
B's rows are cut where the fused weight's are ([H·D | G·D | G·D], from the config);
`dense` -> `o_proj`, `dense_h_to_4h` -> `gate_up_proj`, `dense_4h_to_h` -> `down_proj`.

Refused, each with an error naming the flag or key, because merging W + s·B·A would compute
something other than what was trained: `use_dora` (a learned magnitude rescales each column),
an `init_lora_weights` that rewrites the base weights at initialisation (PiSSA, OLoRA, LoftQ,
CorDA, LoRA-GA: the adapter is relative to a base we do not have; PEFT can save such an adapter
converted to a plain one), `rank_pattern` / `alpha_pattern`
(other r or alpha per module), `lora_bias` and `bias` other than "none" (trained biases),
`modules_to_save` and `trainable_token_indices` (whole trained copies of other modules),
`fan_in_fan_out`, `layer_replication`, `target_parameters`, the variants that compute something
else than B·A (QA-LoRA, activated LoRA, block-diagonal LoRA, Arrow), a `target_modules` name outside
the four targets, and every key that is not one of the four targets' `lora_A` / `lora_B`.

`base_model_name_or_path` naming another ChatGLM3 release than the model (6B, 6B-32K,
6B-base, 6B-128K share every shape, so nothing else would notice) is a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from yanray.engine.base import EngineUnavailable

logger = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLED = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few KB

#: PEFT target name -> (its module under a ChatGLM3 layer, the Glm modules it becomes)
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "query_key_value": (
        "self_attention.query_key_value",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ),
    "dense": ("self_attention.dense", ("self_attn.o_proj",)),
    "dense_h_to_4h": ("mlp.dense_h_to_4h", ("mlp.gate_up_proj",)),
    "dense_4h_to_h": ("mlp.dense_4h_to_h", ("mlp.down_proj",)),
}
_BY_MODULE = {module: target for target, (module, _) in TARGETS.items()}
_KEY_PREFIX = "base_model.model.transformer.encoder.layers."
#: init_lora_weights values that leave the base weights as they are (the rest rewrite them)
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
#: settings that must be empty, false or absent, and why (the end of the one-line refusal)
_MUST_BE_EMPTY = {
    "use_dora": "DoRA rescales the weights by a learned magnitude",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "lora_bias": "the adapter trains biases",
    "modules_to_save": "the adapter carries trained copies of whole modules",
    "trainable_token_indices": "the adapter carries trained embedding rows",
    "fan_in_fan_out": "weights stored transposed (GPT-2 style)",
    "layer_replication": "the adapter duplicates layers",
    "target_parameters": "the adapter targets parameters, not modules",
    "megatron_config": "Megatron parallel layers",
    "use_qalora": "QA-LoRA pools the input",
    "alora_invocation_tokens": "activated LoRA acts only after its invocation tokens",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routes between several adapters",
}
_RELEASE = re.compile(r"chatglm3-6b(?:-32k|-128k|-base)?+(?![\w.-])", re.IGNORECASE)


class AdapterRefused(EngineUnavailable):
    """The adapter cannot be merged exactly; `str()` says which flag or key, in one line."""


@dataclass(frozen=True)
class LoraAdapter:
    """A checked adapter, ready to merge into one ChatGLM3 model's Glm tensors."""

    folder: Path
    sha256: str  # of adapter_model.safetensors
    r: int
    lora_alpha: float
    use_rslora: bool
    lora_scale: float  # --lora-scale
    base_model: str  # base_model_name_or_path, as the adapter says
    #: Glm weight name -> (B rows for that tensor (out, r), A (r, in)), both fp32
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def scale(self) -> float:
        """s in W + s·B·A."""
        rank = math.sqrt(self.r) if self.use_rslora else self.r
        return self.lora_alpha / rank * self.lora_scale

    @property
    def targets(self) -> list[str]:
        """The PEFT target names this adapter changes, in TARGETS order."""
        return [t for t in TARGETS if any(target_of(name) == t for name in self.factors)]

    def delta(self, name: str) -> torch.Tensor | None:
        """s·B·A for the Glm weight `name` (fp32), or None when the adapter leaves it alone."""
        found = self.factors.get(name)
        if found is None:
            return None
        b, a = found
        return (b @ a).mul_(self.scale)  # (out, r) @ (r, in)

    def merge(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` with the adapter merged, as a new fp32 tensor; `weight` itself when untouched."""
        delta = self.delta(name)
        if delta is None:
            return weight
        if delta.shape != weight.shape:
            raise ValueError(
                f"{name}: the adapter changes {tuple(delta.shape)}, the weight is {tuple(weight.shape)}"
            )
        return weight.to(torch.float32, copy=True).add_(delta)

    def describe(self) -> str:
        kind = f"lora_alpha {self.lora_alpha:g} / {'sqrt(r)' if self.use_rslora else 'r'}, r {self.r}"
        extra = f" × --lora-scale {self.lora_scale:g}" if self.lora_scale != 1 else ""
        return (
            f"LoRA adapter {self.folder} (sha256 {self.sha256[:12]}…): {', '.join(self.targets)}, "
            f"scale {self.scale:g} ({kind}{extra})"
        )

    def record(self) -> dict[str, Any]:
        """What an INT8 manifest says about the merged adapter."""
        return {
            "adapter": self.folder.name,
            "weights": WEIGHTS,
            "sha256": self.sha256,
            "base_model_name_or_path": self.base_model,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "lora_scale": self.lora_scale,
            "scale": self.scale,
            "targets": self.targets,
        }


def target_of(glm_name: str) -> str:
    """The PEFT target a Glm weight name belongs to ("" for none)."""
    for target, (_, glm_modules) in TARGETS.items():
        if any(glm_name.endswith(f".{module}.weight") for module in glm_modules):
            return target
    return ""


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    try:
        # read to the limit, not to the end: a FIFO or a link to /dev/zero has no size to stat
        with path.open("rb") as config_file:
            raw = config_file.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise AdapterRefused(f"LoRA adapter {folder}: {CONFIG} is larger than {MAX_CONFIG_BYTES} bytes")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise AdapterRefused(f"LoRA adapter {folder}: no {CONFIG} (expected a PEFT adapter folder)") from None
    except (OSError, ValueError) as exc:
        raise AdapterRefused(f"LoRA adapter {folder}: cannot read {CONFIG} ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterRefused(f"LoRA adapter {folder}: {CONFIG} is not a JSON object")
    return data


def _check_config(folder: Path, conf: Mapping[str, Any]) -> tuple[int, float, bool]:
    """(r, lora_alpha, use_rslora) of a config Yanray can merge exactly; `AdapterRefused` otherwise."""
    where = f"LoRA adapter {folder}"
    kind = conf.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise AdapterRefused(f"{where}: peft_type {kind!r} is not LORA")
    for key, why in _MUST_BE_EMPTY.items():
        if conf.get(key):
            raise AdapterRefused(f"{where}: {key}={conf[key]!r} is not supported ({why}); train a plain LoRA")
    if conf.get("bias", "none") != "none":
        raise AdapterRefused(f"{where}: bias={conf['bias']!r} is not supported (the adapter trains biases)")
    init = conf.get("init_lora_weights", True)
    if not any(init is plain or (isinstance(init, str) and init == plain) for plain in _PLAIN_INITS):
        raise AdapterRefused(
            f"{where}: init_lora_weights={init!r} is not supported (PiSSA/OLoRA-style inits rewrite "
            "the base weights; convert the adapter to a plain LoRA first)"
        )
    targets = conf.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise AdapterRefused(
                f"{where}: target_modules {unknown[0]!r} cannot be merged (only {', '.join(TARGETS)})"
            )
    r, alpha = conf.get("r"), conf.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterRefused(f"{where}: r={r!r} is not a positive whole number")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterRefused(f"{where}: lora_alpha={alpha!r} is not a number")
    return r, float(alpha), bool(conf.get("use_rslora", False))


def _place(key: str) -> tuple[int, str, str] | None:
    """(layer, PEFT target, "lora_A"/"lora_B") of an adapter key, or None if it names nothing we merge."""
    if not key.startswith(_KEY_PREFIX):
        return None
    index, _, rest = key[len(_KEY_PREFIX) :].partition(".")
    if not index.isdigit():
        return None
    rest = rest.removesuffix(".weight")
    rest = rest.removesuffix(".default")  # the adapter name in an unsaved PEFT model's state dict
    module, _, factor = rest.rpartition(".")
    if factor not in ("lora_A", "lora_B") or module not in _BY_MODULE:
        return None
    if not key.endswith(".weight"):
        return None
    return int(index), _BY_MODULE[module], factor


def _split_rows(cfg: Mapping[str, Any]) -> list[int]:
    """Rows of the fused query_key_value: [H·D, G·D, G·D] (as `weights.convert_tensor` cuts them)."""
    head_dim = int(cfg["kv_channels"])
    groups = (
        int(cfg["multi_query_group_num"])
        if cfg.get("multi_query_attention")
        else int(cfg["num_attention_heads"])
    )
    return [int(cfg["num_attention_heads"]) * head_dim, groups * head_dim, groups * head_dim]


def _shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """(out, in) of each target's ChatGLM3 weight."""
    hidden, ffn = int(cfg["hidden_size"]), int(cfg["ffn_hidden_size"])
    q_rows = _split_rows(cfg)[0]
    return {
        "query_key_value": (sum(_split_rows(cfg)), hidden),
        "dense": (hidden, q_rows),
        "dense_h_to_4h": (2 * ffn, hidden),
        "dense_4h_to_h": (hidden, ffn),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_file(folder: Path) -> Path:
    path = folder / WEIGHTS
    if path.is_file():
        return path
    if (folder / PICKLED).is_file():
        raise AdapterRefused(
            f"LoRA adapter {folder}: {PICKLED} is a pickle file, which Yanray does not load; "
            f"save the adapter as {WEIGHTS} (PEFT's default, save_pretrained(safe_serialization=True))"
        )
    raise AdapterRefused(f"LoRA adapter {folder}: no {WEIGHTS}")


def read_adapter(folder: Path, cfg: Mapping[str, Any], *, lora_scale: float = 1.0) -> LoraAdapter:
    """The adapter in `folder`, checked against the ChatGLM3 config `cfg` it will be merged into.

    Raises `AdapterRefused` (one line, naming the flag or key) for anything it cannot merge exactly.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapterRefused(f"LoRA adapter {folder}: no such folder")
    if not math.isfinite(lora_scale) or lora_scale == 0:
        raise AdapterRefused(f"--lora-scale {lora_scale:g}: must be a finite number other than 0")
    conf = _read_config(folder)
    r, alpha, rslora = _check_config(folder, conf)
    path = _weights_file(folder)
    layers, shapes, cut = int(cfg["num_layers"]), _shapes(cfg), _split_rows(cfg)
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            for key in reader.keys():
                placed = _place(key)
                if placed is None or placed[0] >= layers:
                    raise AdapterRefused(
                        f"LoRA adapter {folder}: key {key} cannot be placed (Yanray merges lora_A/lora_B of "
                        f"{', '.join(TARGETS)} in layers 0-{layers - 1})"
                    )
                layer, target, factor = placed
                slot = found.setdefault((layer, target), {})
                if factor in slot:
                    raise AdapterRefused(f"LoRA adapter {folder}: key {key} appears twice")
                slot[factor] = reader.get_tensor(key).to(torch.float32)
    except SafetensorError as exc:
        raise AdapterRefused(f"LoRA adapter {folder}: cannot read {WEIGHTS} ({exc})") from None
    if not found:
        raise AdapterRefused(f"LoRA adapter {folder}: {WEIGHTS} holds no LoRA weights")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, target), slot in sorted(found.items()):
        name = f"layers.{layer}.{TARGETS[target][0]}"
        if set(slot) != {"lora_A", "lora_B"}:
            lacking = ({"lora_A", "lora_B"} - set(slot)).pop()
            raise AdapterRefused(f"LoRA adapter {folder}: {name} has no {lacking}")
        a, b = slot["lora_A"], slot["lora_B"]
        out, inp = shapes[target]
        if a.shape != (r, inp) or b.shape != (out, r):
            raise AdapterRefused(
                f"LoRA adapter {folder}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"expected {(r, inp)} and {(out, r)} for r={r} on this model"
            )
        glm_modules = TARGETS[target][1]
        rows = torch.split(b, cut, dim=0) if target == "query_key_value" else (b,)  # [q | k | v] rows
        for module, b_rows in zip(glm_modules, rows, strict=True):
            factors[f"model.layers.{layer}.{module}.weight"] = (b_rows.contiguous(), a)
    adapter = LoraAdapter(
        folder=folder,
        sha256=_sha256(path),
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        lora_scale=float(lora_scale),
        base_model=str(conf.get("base_model_name_or_path") or ""),
        factors=factors,
    )
    return adapter


def release(text: str) -> str:
    """The ChatGLM3 release a model name or path names ("chatglm3-6b-32k"), or ""."""
    found = _RELEASE.findall(text or "")
    return found[-1].lower() if found else ""


def check_release(adapter: LoraAdapter, model_names: list[str]) -> None:
    """Warn when the adapter was trained on another ChatGLM3 release than the model's.

    `model_names`: what names the model, best first (its config's `_name_or_path`, its folder).
    The releases share every shape, so only this name can tell them apart.
    """
    trained = release(adapter.base_model)
    model = next((found for found in map(release, model_names) if found), "")
    if not trained:
        logger.info(
            "LoRA adapter %s: base_model_name_or_path %r names no ChatGLM3 release; cannot check it",
            adapter.folder,
            adapter.base_model,
        )
    elif not model:
        logger.info(
            "cannot tell which ChatGLM3 release %s is; the adapter was trained on %s", model_names, trained
        )
    elif trained != model:
        logger.warning(
            "LoRA adapter %s was trained on %s (base_model_name_or_path %r), but the model is %s: "
            "the shapes match, so it merges, but it may not behave as trained",
            adapter.folder,
            trained,
            adapter.base_model,
            model,
        )


class Survival:
    """How much of the merged change an INT8 copy keeps, per target and overall.

    With Q the per-row INT8 round trip (`engine/int8_linear.py`), C = Q(W+ΔW) − Q(W) the
    change between the INT8 models with and without the adapter, and all three over ||ΔW||:

    - kept = ||C||: near 1 when the change comes through;
    - error = ||C − ΔW||, element by element: when ΔW is below INT8's rounding step, most
      weights do not move and the few near a rounding edge jump a whole step, so kept and error
      are then both large (rounding noise), although the noise averages out to ΔW;
    - error_along_adapter = ||P_B (C − ΔW) P_A||, that error inside the directions the adapter
      works in (the column space of B, the row space of A): what a LoRA changes in the
      activations. Rounding noise spreads over every direction, so this stays small where the
      element-wise error is large; near 1, INT8 has lost the change itself.
    """

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}  # target -> [kept², delta², error², along²]

    def add(
        self,
        name: str,
        base: torch.Tensor,
        merged: torch.Tensor,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        factors: tuple[torch.Tensor, torch.Tensor],
        *,
        chunk_rows: int = 4096,
    ) -> None:
        """Count one merged weight: `base` W, `merged` W+ΔW, its INT8 pair (`qweight`, `scale`),
        and the adapter's (B, A) for it."""
        from yanray.engine.int8_linear import quantize_rows

        b, a = factors
        basis_out = torch.linalg.qr(b.float()).Q  # (out, r): B's column space
        basis_in = torch.linalg.qr(a.float().T).Q  # (in, r): A's row space
        along = torch.zeros(basis_out.shape[1], basis_in.shape[1], dtype=torch.float64)  # (r, r)
        sums = self._sums.setdefault(target_of(name), [0.0, 0.0, 0.0, 0.0])
        for start in range(0, base.shape[0], chunk_rows):  # bounded fp32 temporaries, as quantize_rows
            rows = slice(start, start + chunk_rows)
            w = base[rows].float()
            delta = merged[rows].float() - w  # (rows, in)
            q_base, s_base = quantize_rows(w)
            change = qweight[rows].float() * scale[rows, None] - q_base.float() * s_base[:, None]
            miss = change - delta
            sums[0] += float(change.square().sum(dtype=torch.float64))
            sums[1] += float(delta.square().sum(dtype=torch.float64))
            sums[2] += float(miss.square().sum(dtype=torch.float64))
            along += (basis_out[rows].T @ (miss @ basis_in)).double()  # (r, rows) @ (rows, r)
        sums[3] += float(along.square().sum())

    def figures(self) -> dict[str, dict[str, float]]:
        """{target or "overall": {"kept", "error", "error_along_adapter"}}, targets in TARGETS order."""
        totals = [sum(s[i] for s in self._sums.values()) for i in range(4)]
        rows = [(t, self._sums[t]) for t in TARGETS if t in self._sums] + [("overall", totals)]
        return {
            target: {
                key: math.sqrt(value / delta) if delta else 0.0
                for key, value in (("kept", kept), ("error", error), ("error_along_adapter", along))
            }
            for target, (kept, delta, error, along) in rows
        }


def survival_line(figures: Mapping[str, Mapping[str, float]]) -> str:
    """`Survival.figures()` (as an INT8 manifest records them) in one line for the operator."""
    parts = [
        f"{t} {f['kept']:.3f} (error {f['error']:.3f}, along the adapter {f['error_along_adapter']:.3f})"
        for t, f in figures.items()
    ]
    return "LoRA change kept through INT8, ||Q(W+dW) - Q(W)|| / ||dW||: " + "; ".join(parts)
