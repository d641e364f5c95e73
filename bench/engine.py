"""Engine benchmark: prints ratios measured in one run (not a test).

    python bench/engine.py                 # (a), (b), (c), then the INT8 figures (kv), (size)
    python bench/engine.py --c-shape mid   # (c) on a quarter-width 6B shape (the 6B takes minutes)
    python bench/engine.py --full          # also (quantize): a 12.5 GB ChatGLM3-6B-shaped release

Parts named as in issue 9:

(a) time to first token of a conversation's next turn after a ~4K-token history, with the
    previous turn's KV cache kept (warm) divided by without (cold) (`bench/warm_turns.py`);
(b) aggregate decode tokens/s with 4 conversations at once divided by one at a time, and the
    per-stream slowdown (`bench/batching.py`);
(join) a long prompt joining a decoding conversation, prefilled whole vs in pieces between
    its steps: its longest wait between text pieces, and the joiner's time to first token
    (`bench/joining.py`);
(c) CPU decode of a ChatGLM3-6B-shaped INT8 model, in fp32, bf16 and what `YANRAY_DTYPE=auto`
    picks, as a fraction of the machine's read bandwidth measured in the same run
    (`bench/cpu_decode.py`);
(d) the compiled decode step (`engine/compiled.py`, CPU inductor) against the eager one, in
    tokens/s after a 1K-token prompt, on the 6B's width with 4 of its layers, random INT8
    weights, the auto dtype (`bench/compiled_decode.py`; the shape is printed);

and the INT8 figures of earlier work:

(kv) a tool round with the KV cache kept vs re-prefilling the conversation, at 1K and 4K
    tokens of history (`bench/kv_reuse.py`);
(size) INT8 folder size / fp16 size and the load time of each, on a mid-size random
    ChatGLM3-shaped release (the 6B's 28 layers and vocabulary, a quarter of its width;
    1.0 GB in fp16), plus the size ratio computed for the real 6B shape;
(quantize) with --full: a randomly initialised ChatGLM3-6B-32K-shaped release (7 fp16 .bin
    shards, ~12.5 GB, generated tensor by tensor, one shard in memory at a time), then
    `yanray quantize` on it in a subprocess: its peak resident memory (getrusage of the
    children), the output size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
GB = 1e9

#: chatglm3-6b-32k's config.json (fixtures/chatglm3/reference-configs), without the remote-code keys
CHATGLM3_6B_32K: dict[str, Any] = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False, "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696, "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096,
    "kv_channels": 128, "layernorm_epsilon": 1e-05, "rope_ratio": 50, "multi_query_attention": True,
    "multi_query_group_num": 2, "num_attention_heads": 32, "num_layers": 28, "original_rope": True,
    "padded_vocab_size": 65024, "post_layer_norm": True, "rmsnorm": True, "seq_length": 32768,
    "use_cache": True, "torch_dtype": "float16", "tie_word_embeddings": False, "eos_token_id": 2,
    "pad_token_id": 0,
}  # fmt: skip
#: the mid-size shape of (size) and (c) --c-shape mid: the 6B's depth, vocabulary and head size, a quarter of its width
MID_SIZE = {"hidden_size": 1024, "ffn_hidden_size": 3424, "num_attention_heads": 8, "num_layers": 28}


def chatglm3_shapes(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a ChatGLM3 checkpoint, in release order."""
    hidden, ffn, heads, kv = (
        cfg["hidden_size"],
        cfg["ffn_hidden_size"],
        cfg["num_attention_heads"],
        cfg["kv_channels"],
    )
    qkv = (heads + 2 * cfg["multi_query_group_num"]) * kv
    yield "transformer.embedding.word_embeddings.weight", (cfg["padded_vocab_size"], hidden)
    yield "transformer.rotary_pos_emb.inv_freq", (kv // 4,)
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attention.query_key_value.weight", (qkv, hidden)
        yield p + "self_attention.query_key_value.bias", (qkv,)
        yield p + "self_attention.dense.weight", (hidden, heads * kv)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.dense_h_to_4h.weight", (2 * ffn, hidden)
        yield p + "mlp.dense_4h_to_h.weight", (hidden, ffn)
    yield "transformer.encoder.final_layernorm.weight", (hidden,)
    yield "transformer.output_layer.weight", (cfg["padded_vocab_size"], hidden)


def _random(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("inv_freq"):
        return 1.0 / (10000 ** (torch.arange(0, 2 * shape[0], 2).float() / (2 * shape[0])))
    if name.endswith("layernorm.weight"):
        return torch.ones(shape, dtype=torch.float16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)


def write_random_release(dst: Path, cfg: dict[str, Any], *, shards: int, fmt: str) -> int:
    """A ChatGLM3 release folder with random fp16 weights, one shard in memory at a time; its bytes."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer = REPO.parent / "shared" / "fixtures" / "chatglm3" / "tokenizer.model"
    if tokenizer.is_file():
        shutil.copy(tokenizer, dst / "tokenizer.model")
    shapes = list(chatglm3_shapes(cfg))
    total = sum(2 * torch.Size(s).numel() for _, s in shapes)
    budget, gen = total / shards, torch.Generator().manual_seed(0)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for item in shapes:
        if size >= budget * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(item)
        size += 2 * torch.Size(item[1]).numel()
    weight_map: dict[str, str] = {}
    for n, group in enumerate(groups, start=1):
        ext = "safetensors" if fmt == "safetensors" else "bin"
        stem = "model" if fmt == "safetensors" else "pytorch_model"
        filename = f"{stem}-{n:05d}-of-{len(groups):05d}.{ext}"
        part = {name: _random(name, shape, gen) for name, shape in group}
        if fmt == "safetensors":
            save_file(part, str(dst / filename), metadata={"format": "pt"})
        else:
            torch.save(part, dst / filename)  # the real release format (loaded back with weights_only=True)
        weight_map.update(dict.fromkeys(part, filename))
        del part
    index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (dst / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return sum(p.stat().st_size for p in dst.iterdir() if p.suffix in (".bin", ".safetensors"))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def predicted_ratio(cfg: dict[str, Any], *, keep_16bit_outer: bool) -> float:
    """INT8 weight bytes / fp16 bytes for a ChatGLM3 shape, from the quantization plan alone."""
    from yanray.engine.int8 import plan_modules
    from yanray.engine.skeleton import meta_model

    skeleton = meta_model(cfg)
    model, config = skeleton.model, skeleton.config
    linear, embedding = plan_modules(model, config, keep_16bit_outer=keep_16bit_outer)
    quantized = {f"{n}.weight" for n in linear + embedding}
    fp16 = int8 = 0
    for name, tensor in model.state_dict().items():
        fp16 += 2 * tensor.numel()
        int8 += tensor.numel() + 4 * tensor.shape[0] if name in quantized else 2 * tensor.numel()
    return int8 / fp16


# -- (a), (c), (kv): the parts in modules of their own ----------------------------------


def bench_module(name: str, label: str, **kwargs: Any) -> None:
    """Import bench/<name>.py and call its run(**kwargs), which prints its own lines."""
    path = REPO / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"yanray_bench_{name}", path)
    if not path.is_file() or spec is None or spec.loader is None:
        print(f"{label} skipped: bench/{name}.py cannot be imported")
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    module.run(**kwargs)


# -- (size) ----------------------------------------------------------------------------


def _timed_load(fn: Any) -> float:
    start = time.perf_counter()
    model = fn()
    elapsed = time.perf_counter() - start
    del model
    return elapsed


def bench_size_and_load(work: Path) -> None:
    from yanray.engine.chatglm3.weights import load_glm_model
    from yanray.engine.int8 import load_int8_model, quantize_folder

    cfg = {**CHATGLM3_6B_32K, **MID_SIZE}
    src = work / "mid-fp16"
    start = time.perf_counter()
    fp16_bytes = write_random_release(src, cfg, shards=2, fmt="safetensors")
    print(f"(size) mid-size ChatGLM3-shaped release {MID_SIZE}: {fp16_bytes / GB:.3f} GB fp16 "
          f"(written in {time.perf_counter() - start:.1f} s)")  # fmt: skip
    cpu = torch.device("cpu")
    for keep in (False, True):
        dst = work / f"mid-int8-{'16bit-outer' if keep else 'all'}"
        start = time.perf_counter()
        quantize_folder(src, dst, progress=False, keep_16bit_outer=keep)
        took = time.perf_counter() - start
        label = "embedding + output layer 16-bit" if keep else "default: embedding + output layer INT8 too"
        print(f"(size) INT8 ({label}): {folder_bytes(dst) / GB:.3f} GB, size ratio INT8/fp16 = "
              f"{folder_bytes(dst) / fp16_bytes:.3f} (target <= 0.52); quantized in {took:.1f} s")  # fmt: skip
    fp16_load = _timed_load(lambda: load_glm_model(src, device=cpu, dtype=torch.float16))
    int8_load = _timed_load(lambda: load_int8_model(work / "mid-int8-all", device=cpu, dtype=torch.float16))
    print(f"(size) load onto the CPU as fp16: release {fp16_load:.2f} s, INT8 folder {int8_load:.2f} s "
          f"(ratio {int8_load / fp16_load:.2f}; files in the page cache)")  # fmt: skip
    for keep in (False, True):
        ratio = predicted_ratio(CHATGLM3_6B_32K, keep_16bit_outer=keep)
        label = "16-bit embedding/output" if keep else "default"
        print(f"(size) ChatGLM3-6B-32K shape, computed from the plan ({label}): size ratio {ratio:.3f}")


# -- (quantize) ------------------------------------------------------------------------


def bench_full(work: Path) -> None:
    free = shutil.disk_usage(work).free
    if free < 22 * GB:
        print(
            f"(quantize) skipped: {free / GB:.1f} GB free in {work}, needs 22 GB (12.5 release + 6.3 INT8 + margin)"
        )
        return
    src, dst = work / "chatglm3-6b-32k-random", work / "chatglm3-6b-32k-int8"
    start = time.perf_counter()
    fp16_bytes = write_random_release(src, CHATGLM3_6B_32K, shards=7, fmt="bin")
    print(f"(quantize) random ChatGLM3-6B-32K-shaped release: 7 .bin shards, {fp16_bytes / GB:.2f} GB "
          f"(written in {time.perf_counter() - start:.0f} s)")  # fmt: skip
    cli = Path(sys.executable).with_name("yanray")
    if cli.is_file():
        command = [str(cli), "quantize", str(src), str(dst)]
    else:
        code = "import sys; from pathlib import Path; from yanray.engine.int8 import quantize_folder; "
        code += "quantize_folder(Path(sys.argv[1]), Path(sys.argv[2]))"
        command = [sys.executable, "-c", code, str(src), str(dst)]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "TQDM_MININTERVAL": "10"})
    took = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    what = "yanray quantize" if cli.is_file() else "quantize_folder in a subprocess"
    print(f"(quantize) {what}: "
          f"{took:.0f} s, peak resident memory {peak / GB:.2f} GB (target < 8 GB), "
          f"output {folder_bytes(dst) / GB:.2f} GB = {folder_bytes(dst) / fp16_bytes:.3f} of the fp16 release")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="also (quantize): the 12.5 GB 6B-shaped release")
    parser.add_argument("--workdir", type=Path, default=None, help="temporary folder (default: the system's)")
    parser.add_argument("--c-shape", choices=("6b", "mid"), default="6b", help="the model shape of (c)")
    parser.add_argument("--skip", default="", help="parts to skip, comma-separated (e.g. kv,size)")
    args = parser.parse_args(argv)
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    if "a" not in skip:
        bench_module("warm_turns", "(a)")
    if "b" not in skip:
        bench_module("batching", "(b)")
    if "join" not in skip:
        bench_module("joining", "(join)")
    if "c" not in skip:
        bench_module("cpu_decode", "(c)", shape=args.c_shape)
    if "d" not in skip:
        bench_module("compiled_decode", "(d)")
    if "kv" not in skip:
        bench_module("kv_reuse", "(kv)")
    with tempfile.TemporaryDirectory(prefix="yanray-bench-", dir=args.workdir) as tmp:
        if "size" not in skip:
            bench_size_and_load(Path(tmp))
        if args.full:
            bench_full(Path(tmp))
        else:
            print("(quantize) not run: pass --full (writes ~19 GB to the temporary folder)")


if __name__ == "__main__":
    main()
