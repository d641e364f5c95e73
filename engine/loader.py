"""Loading for the local engine: which kind of folder, will it fit, and the model + chat format.

Runs on the engine thread (`LocalEngine.load` submits it there). The kind of folder is
decided from its files, in this order: a Yanray INT8 folder (`engine/int8.py` says), a
ChatGLM3 release (`config.json` of model_type `chatglm`), otherwise a transformers folder
whose tokenizer has a chat template. An INT8 folder made from ChatGLM3 is recognised as
ChatGLM3 by its config (the ChatGLM3 config, or a `glm` config with ChatGLM3's 65,024-row
vocabulary) and a `tokenizer.model`.

The memory guard runs before any weight is read, with the shape taken from the model built
on the meta device (`engine/skeleton.py`). The context is `max_context` when given, else the
model's own (`seq_length`, 32768 for ChatGLM3-6B-32K); a value above the model's own is
lowered to it, since positions past its training length give nonsense.

`lora` (`YANRAY_LORA`) merges a PEFT LoRA adapter into a 16-bit ChatGLM3 release folder as
it loads (`engine/chatglm3/lora.py`); an INT8 folder cannot take one (its weights are already
rounded: merge before quantizing, `yanray quantize --lora`), nor can another kind of model.

ChatGLM3 and INT8 weights go straight onto the device, shard by shard. A generic
transformers folder is read with `from_pretrained` on the CPU and then moved: a
`device_map` would need `accelerate`, and its offloading is exactly what Yanray must not do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yanray.engine.base import EngineUnavailable
from yanray.engine.chat_format import ChatFormat, TemplateFormat
from yanray.engine.chatglm3.lora import LoraAdapter, check_release, read_adapter
from yanray.engine.chatglm3.prompt import ChatGLM3Format
from yanray.engine.chatglm3.tokenizer import ChatGLM3Tokenizer
from yanray.engine.chatglm3.weights import is_chatglm3_config, load_glm_model, read_config
from yanray.engine.device import (
    check_fits,
    free_memory,
    kept_cache_budget,
    model_shape,
    resolve_device,
    resolve_dtype,
    stored_weight_bytes,
)
from yanray.engine.skeleton import meta_model

logger = logging.getLogger(__name__)

CHATGLM3_VOCAB = 65024


@dataclass
class LoadedParts:
    model: Any
    fmt: ChatFormat
    device: torch.device
    max_context: int
    label: str
    kv_budget: int = 0  # bytes for kept conversations (engine/kept.py)


def _is_int8(folder: Path) -> bool:
    try:
        from yanray.engine.int8 import is_int8_folder
    except ImportError:  # the INT8 module is optional at this layer
        return False
    return bool(is_int8_folder(folder))


def is_chatglm3_folder(folder: Path, cfg: dict[str, Any]) -> bool:
    if is_chatglm3_config(cfg):
        return True
    return (
        cfg.get("model_type") == "glm"
        and int(cfg.get("vocab_size", 0)) == CHATGLM3_VOCAB
        and (folder / "tokenizer.model").is_file()
    )


def _model_context(config: Any) -> int:
    for key in ("max_position_embeddings", "seq_length", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


def _template_format(folder: Path, model: Any) -> TemplateFormat:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    stops: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            stops.add(value)
        elif isinstance(value, list | tuple):
            stops.update(int(v) for v in value)
    return TemplateFormat(tokenizer, frozenset(stops))


def _adapter(lora: str | Path, folder: Path, cfg: dict[str, Any], *, int8: bool) -> LoraAdapter:
    """The checked adapter for `YANRAY_LORA`, or `EngineUnavailable` saying why it cannot merge here."""
    if int8:
        raise EngineUnavailable(
            f"YANRAY_LORA={lora}: {folder} is an INT8 model, whose weights are already rounded; merge the "
            f"adapter while quantizing the 16-bit release instead: `yanray quantize SRC DST --lora {lora}`"
        )
    if not is_chatglm3_config(cfg):
        raise EngineUnavailable(
            f"YANRAY_LORA={lora}: {folder} is not a ChatGLM3 release folder; adapters merge only into ChatGLM3"
        )
    adapter = read_adapter(Path(lora), cfg)
    check_release(adapter, [str(cfg.get("_name_or_path", "")), folder.name])
    logger.info("merging %s", adapter.describe())
    return adapter


def load_parts(
    model: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_context: int = 0,
    data_dir: Path | None = None,
    kv_cache_gb: float | None = None,
    lora: str | Path | None = None,
) -> LoadedParts:
    from yanray.engine.hub import resolve_model

    if lora and not Path(model).expanduser().is_dir():  # before a hub id is downloaded and quantized
        raise EngineUnavailable(
            f"YANRAY_LORA={lora} merges into a 16-bit ChatGLM3 folder, and YANRAY_MODEL={model} is not a "
            f"folder: download the release and set YANRAY_MODEL to it, or merge into an INT8 copy with "
            f"`yanray quantize SRC DST --lora {lora}`"
        )
    folder = resolve_model(str(model), data_dir=data_dir or Path("data"))
    if not (folder / "config.json").is_file():
        raise EngineUnavailable(
            f"{folder} has no config.json; YANRAY_MODEL must be a model folder or a hub id"
        )
    target = resolve_device(device)
    compute = resolve_dtype(dtype, target)
    try:
        cfg = read_config(folder)
        int8 = _is_int8(folder)
        chatglm = is_chatglm3_folder(folder, cfg)
        skeleton = meta_model(cfg, folder)
    except (OSError, ValueError, KeyError) as exc:
        raise EngineUnavailable(f"cannot read the model in {folder}: {exc}") from None
    adapter = _adapter(lora, folder, cfg, int8=int8) if lora else None
    own = _model_context(skeleton.config)
    context = min(max_context, own) if max_context else own
    if max_context > own:
        logger.warning("YANRAY_MAX_CONTEXT=%d is longer than the model's %d; using %d", max_context, own, own)
    free = free_memory(target)
    # an explicit budget is counted by the guard; the default is what the guard finds left over
    kv_budget = int(kv_cache_gb * 2**30) if kv_cache_gb is not None else 0
    if free is not None:
        where = (
            f"the GPU ({torch.cuda.get_device_name(target)})"
            if target.type == "cuda"
            else "this machine's RAM"
        )
        weights = stored_weight_bytes(sorted(folder.glob("*.safetensors")), compute) if int8 else None
        estimate = check_fits(
            model_shape(skeleton.model, skeleton.config),
            free=free,
            context=context,
            dtype=compute,
            int8=int8,
            where=where,
            weights=weights,
            kept=kv_budget,
        )
        if kv_cache_gb is None:
            kv_budget = kept_cache_budget(None, left=free - estimate.total, device_type=target.type)
        logger.info(
            "memory estimate %.1f GiB of %.1f GiB free; %.2f GiB for kept conversations%s",
            estimate.total / 2**30,
            free / 2**30,
            kv_budget / 2**30,
            "" if kv_cache_gb is not None else " (the default: YANRAY_KV_CACHE_GB unset)",
        )
    del skeleton

    logger.info(
        "loading %s (%s) onto %s as %s, context %d",
        folder,
        "INT8" if int8 else "ChatGLM3" if chatglm else "transformers",
        target,
        compute,
        context,
    )
    try:
        if int8:
            from yanray.engine.int8 import load_int8_model

            loaded: Any = load_int8_model(folder, device=target, dtype=compute)
        elif chatglm:
            loaded = load_glm_model(folder, device=target, dtype=compute, cfg=cfg, lora=adapter)
        else:
            from transformers import AutoModelForCausalLM

            generic = AutoModelForCausalLM.from_pretrained(
                folder, dtype=compute, local_files_only=True, trust_remote_code=False
            )
            loaded = generic.to(target)  # type: ignore[arg-type]  # transformers' stub misses device
        loaded.eval()
        fmt: ChatFormat
        if chatglm:
            fmt = ChatGLM3Format(ChatGLM3Tokenizer(folder / "tokenizer.model"))
        else:
            fmt = _template_format(folder, loaded)
    except (OSError, ValueError, KeyError) as exc:
        raise EngineUnavailable(f"cannot load the model in {folder}: {exc}") from None
    return LoadedParts(
        model=loaded, fmt=fmt, device=target, max_context=context, label=str(folder), kv_budget=kv_budget
    )
