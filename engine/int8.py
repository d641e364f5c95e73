"""Yanray's INT8 format: `quantize_folder` (release folder -> INT8 folder) and `load_int8_model`.

What is quantized: weight-only, symmetric, per output channel (`engine/int8_linear.py`), for
every Linear inside the transformer blocks (`engine/skeleton.py`'s `is_block_linear`), and by
default also the embedding table (per token) and the output layer, without which the 6B
misses its size target (docs/decisions/int8-embedding-and-output-layer.md).
`keep_16bit_outer=True` keeps them 16-bit.

The folder (format version 1):

- `yanray-int8.json`: `format` "yanray-int8", `format_version`, `arch` ("chatglm3" or
  "transformers"), the module names quantized as Linear / as Embedding, the source;
- `config.json`: the source's own config, unchanged (a ChatGLM3 config is turned into a
  `GlmConfig` at load by `engine/chatglm3/weights.py`, the one home of that mapping);
- `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`: for a quantized
  module `M`, `M.weight` (int8, (out, in)) and `M.weight_scale` (float32, (out,)); every
  other tensor under the transformers name, 16-bit (fp16, bf16 where fp16 would overflow);
- the tokenizer files and chat template, copied. No pickle anywhere.

With `lora` (`yanray quantize --lora`), a PEFT LoRA adapter is merged into each weight it
changes, in fp32, before that weight is quantized (`engine/chatglm3/lora.py`; ChatGLM3 only).
The manifest's `lora` entry then records the adapter (its weights' sha256, r, alpha, scale,
targets) and `kept_through_int8`, how much of the change the INT8 weights keep.

Quantizing runs on the CPU one source shard at a time (`.bin` shards are memory-mapped),
each weight in 4096-row chunks, and writes an output shard every `SHARD_BYTES`, so peak
memory is about one input shard plus one output shard. It writes into `DST.partial` and
renames at the end: a crash never leaves a folder that looks complete.

Loading builds the model on the meta device, swaps the quantized modules, reads every
tensor with `safe_open(device=...)` straight onto the target device and
`load_state_dict(assign=True)`: no re-quantization, no full-precision copy.

Own modules, not torchao: torchao's forward casts each whole int8 weight to the compute dtype
on every call, and its on-disk format is a prototype API (docs/decisions/int8-own-format-not-torchao.md).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from yanray.engine.base import EngineUnavailable
from yanray.engine.chatglm3.lora import LoraAdapter, Survival, check_release, read_adapter, survival_line
from yanray.engine.int8_linear import convert_for_runtime, pick_kernel, quantize_rows, set_kernel
from yanray.engine.skeleton import block_linears, meta_model, rebuild_meta_buffers

logger = logging.getLogger(__name__)

FORMAT = "yanray-int8"
FORMAT_VERSION = 1
MANIFEST = "yanray-int8.json"
SHARD_BYTES = 1024**3
#: files copied from the source besides the weights (tokenizers, chat templates, generation defaults)
EXTRA_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class Int8Manifest:
    """What `yanray-int8.json` says about a folder."""

    format_version: int
    arch: str  # "chatglm3" or "transformers"
    linear: tuple[str, ...]
    embedding: tuple[str, ...]
    source: str


def read_manifest(folder: Path) -> Int8Manifest:
    """The folder's manifest; `EngineUnavailable` for a missing, foreign or newer one."""
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EngineUnavailable(
            f"{folder} is not a readable Yanray INT8 folder ({path.name}: {exc})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EngineUnavailable(f"{path} is not a Yanray INT8 manifest")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise EngineUnavailable(f"{path}: format_version {version!r} is not valid")
    if version > FORMAT_VERSION:
        raise EngineUnavailable(
            f"{folder} is Yanray INT8 format {version}, this Yanray reads up to {FORMAT_VERSION}: "
            "update Yanray, or quantize the original model again with `yanray quantize`"
        )
    return Int8Manifest(
        format_version=version,
        arch=str(data.get("arch", "transformers")),
        linear=tuple(data.get("linear", ())),
        embedding=tuple(data.get("embedding", ())),
        source=str(data.get("source", "")),
    )


def is_int8_folder(folder: Path) -> bool:
    """Whether `folder` holds a Yanray INT8 model (of any format version)."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


# -- quantizing -------------------------------------------------------------------------


def plan_modules(model: Any, config: Any, *, keep_16bit_outer: bool) -> tuple[list[str], list[str]]:
    """Names of the modules to quantize as Linear and as Embedding."""
    linear = block_linears(model)
    embedding: list[str] = []
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if not keep_16bit_outer and not tied:
        names = {id(m): n for n, m in model.named_modules()}
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        if isinstance(inp, torch.nn.Embedding) and isinstance(out, torch.nn.Linear):
            embedding.append(names[id(inp)])
            linear.append(names[id(out)])
    return linear, embedding


def _source_tensors(src: Path, cfg: dict[str, Any], arch: str) -> Iterator[tuple[int, str, torch.Tensor]]:
    """(source bytes, transformers name, tensor) for every tensor of the source checkpoint."""
    from yanray.engine.chatglm3.weights import convert_tensor, iter_checkpoint

    for name, tensor in iter_checkpoint(src):
        size = tensor.numel() * tensor.element_size()
        if arch == "chatglm3":
            converted = convert_tensor(name, tensor, cfg)
            if not converted:
                yield size, "", tensor  # a dropped buffer still counts for the progress bar
            for i, (new_name, value) in enumerate(converted):
                yield (size if i == 0 else 0), new_name, value
        else:
            yield size, name, tensor


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that is not quantized, as stored: 16-bit floats, anything else unchanged.

    Always a fresh tensor: a view would keep the whole memory-mapped source shard resident
    until the output shard holding it is written (docs/decisions/int8-quantize-memory.md).
    """
    if tensor.dtype in (torch.float16, torch.bfloat16) or not tensor.is_floating_point():
        return tensor.clone(memory_format=torch.contiguous_format)
    fits_fp16 = tensor.numel() == 0 or float(tensor.abs().max()) <= torch.finfo(torch.float16).max
    return tensor.to(torch.float16 if fits_fp16 else torch.bfloat16, copy=True).contiguous()


class _ShardWriter:
    """Collects output tensors and writes a safetensors shard whenever `limit` bytes are reached."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in keys for _, keys in self.files):
            raise ValueError(f"tensor {name} appears twice in the checkpoint")
        self.pending[name] = tensor
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt", "yanray": FORMAT})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> int:
        """Write the last shard, give the shards their final names and the index; total bytes."""
        self.flush()
        weight_map: dict[str, str] = {}
        total = 0
        for i, (tmp_name, keys) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            (self.folder / tmp_name).rename(self.folder / final)
            total += (self.folder / final).stat().st_size
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=1), encoding="utf-8"
        )
        return total


def _write_weights(
    src: Path,
    cfg: dict[str, Any],
    arch: str,
    work: Path,
    *,
    expected: set[str],
    quantized: set[str],
    tied_head: set[str],
    progress: bool,
    adapter: LoraAdapter | None = None,
    survival: Survival | None = None,
) -> int:
    """Convert, (merge,) quantize and write every tensor of `src` into `work`; the bytes written."""
    writer = _ShardWriter(work, SHARD_BYTES)
    seen: set[str] = set()
    total = sum(p.stat().st_size for p in _weight_files(src))
    with tqdm(total=total, unit="B", unit_scale=True, desc="quantize", disable=not progress) as bar:
        for size, name, tensor in _source_tensors(src, cfg, arch):
            bar.update(size)
            if not name or (name in tied_head and name not in expected):
                continue
            if name not in expected:
                raise ValueError(f"tensor {name} is not part of the model")
            seen.add(name)
            merged = tensor if adapter is None else adapter.merge(name, tensor)
            if name in quantized:
                qweight, scale = quantize_rows(merged)
                if adapter is not None and merged is not tensor and survival is not None:
                    survival.add(name, tensor, merged, qweight, scale, adapter.factors[name])
                writer.add(name, qweight)
                writer.add(name.removesuffix("weight") + "weight_scale", scale)
            else:
                writer.add(name, _stored(merged))
            del merged
        bar.update(max(0, total - bar.n))  # file headers
    missing = sorted(expected - seen - tied_head)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    if adapter is not None and not set(adapter.factors) <= seen:
        raise ValueError(f"the adapter changes {sorted(set(adapter.factors) - seen)[0]}, not in the model")
    return writer.finish()


def _adapter(src: Path, cfg: dict[str, Any], arch: str, lora: Path, lora_scale: float) -> LoraAdapter:
    from yanray.engine.chatglm3.weights import is_chatglm3_config

    if arch != "chatglm3" or not is_chatglm3_config(cfg):
        raise EngineUnavailable(
            f"--lora: {src} is not a ChatGLM3 release folder; adapters merge only into ChatGLM3"
        )
    adapter = read_adapter(lora, cfg, lora_scale=lora_scale)
    check_release(adapter, [str(cfg.get("_name_or_path", "")), src.name])
    logger.info("merging %s", adapter.describe())
    return adapter


def quantize_folder(
    src: Path,
    dst: Path,
    *,
    progress: bool = True,
    keep_16bit_outer: bool = False,
    lora: Path | None = None,
    lora_scale: float = 1.0,
) -> dict[str, Any]:
    """Quantize a ChatGLM3 release (or a transformers safetensors folder) into a Yanray INT8 folder.

    `lora`: a PEFT LoRA adapter folder merged first, scaled by `lora_scale` (ChatGLM3 only).
    Returns the manifest written.
    """
    from yanray.engine.chatglm3.weights import read_config

    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise EngineUnavailable(f"{dst} already exists and is not empty; choose a new folder")
    try:
        cfg = read_config(src)
        skeleton = meta_model(cfg, src)
    except (OSError, ValueError, KeyError) as exc:
        raise EngineUnavailable(f"cannot read the model in {src}: {exc}") from None
    arch, config = skeleton.arch, skeleton.config
    linear, embedding = plan_modules(skeleton.model, config, keep_16bit_outer=keep_16bit_outer)
    quantized = {f"{name}.weight" for name in linear + embedding}
    expected = set(skeleton.model.state_dict())
    tied_head = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    del skeleton
    adapter = _adapter(src, cfg, arch, lora, lora_scale) if lora is not None else None
    survival = Survival() if adapter is not None else None

    work = dst.with_name(dst.name + ".partial")
    if work.exists():
        shutil.rmtree(work)  # a previous run of ours that did not finish
    work.mkdir(parents=True)
    try:
        size = _write_weights(
            src,
            cfg,
            arch,
            work,
            expected=expected,
            quantized=quantized,
            tied_head=tied_head,
            progress=progress,
            adapter=adapter,
            survival=survival,
        )
    except (OSError, ValueError, KeyError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise EngineUnavailable(f"cannot quantize {src}: {exc}") from None
    _copy_extras(src, work)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "scheme": "weight-only int8, symmetric, per output channel: w = weight * weight_scale[:, None]",
        "linear": linear,
        "embedding": embedding,
        "source": src.name,
        "weights_bytes": size,
        "torch": torch.__version__,
    }
    if adapter is not None and survival is not None:
        manifest["lora"] = {**adapter.record(), "kept_through_int8": survival.figures()}
        logger.info("%s", survival_line(survival.figures()))
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    if dst.exists():
        dst.rmdir()  # empty, checked above
    work.rename(dst)
    logger.info("quantized %s -> %s (%.2f GB of weights)", src, dst, size / 1e9)
    return manifest


def _weight_files(src: Path) -> list[Path]:
    from yanray.engine.chatglm3.weights import checkpoint_files

    return checkpoint_files(src)


def _copy_extras(src: Path, dst: Path) -> None:
    shutil.copy2(src / "config.json", dst / "config.json")
    for name in EXTRA_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# -- loading ----------------------------------------------------------------------------


def _safetensors_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    try:
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise EngineUnavailable(f"{folder}: cannot read {index.name} ({exc})") from None
    return [folder / name for name in dict.fromkeys(weight_map.values())]


def load_int8_model(folder: Path, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A Yanray INT8 folder as a causal LM on `device`, computing in `dtype`, in eval mode."""
    from yanray.engine.chatglm3.weights import read_config

    folder = Path(folder)
    manifest = read_manifest(folder)
    try:
        skeleton = meta_model(read_config(folder), folder)
    except (OSError, ValueError, KeyError) as exc:
        raise EngineUnavailable(f"cannot read the model in {folder}: {exc}") from None
    model, config = skeleton.model, skeleton.config
    convert_for_runtime(model, manifest.linear + manifest.embedding, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    where = _safetensors_device(device)
    for path in _shard_files(folder):
        with safe_open(str(path), framework="pt", device=where) as reader:
            for key in reader.keys():
                tensor = reader.get_tensor(key)
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    tied = bool(getattr(config, "tie_word_embeddings", False)) and "lm_head.weight" not in state
    try:
        result = model.load_state_dict(state, strict=not tied, assign=True)
    except RuntimeError as exc:
        raise EngineUnavailable(f"{folder}: the weights do not match the model ({exc})") from None
    del state
    if tied:
        unexpected = [k for k in result.missing_keys if k != "lm_head.weight"] + list(result.unexpected_keys)
        if unexpected:
            raise EngineUnavailable(f"{folder}: the weights do not match the model ({unexpected[0]})")
        output = model.get_output_embeddings()
        output.weight = model.get_input_embeddings().weight
    rebuild_meta_buffers(model, device)
    kernel = pick_kernel(device, dtype)
    count = set_kernel(model, kernel)
    model.config.dtype = dtype
    logger.info(
        "INT8 model from %s: %d quantized Linears, kernel %s, %s on %s", folder, count, kernel, dtype, device
    )
    return model.eval().requires_grad_(False)
