"""Yanray INT8: quantize the tiny ChatGLM3 fixtures (and a generic transformers model), load, compare.

Measured on this machine (CPU, float32 compute, torch 2.13), all block Linears + embedding
+ output layer in INT8 (the default):

- max |logit - golden| over seq0/seq1/seq2 and the 57-position full forward: 0.091
  (tiny-6b seq1; tiny-32k 0.091 on seq2), the golden logits reach |3.73|. Keeping the
  embedding and output layer 16-bit: 0.079. bf16/fp16 compute on the CPU: 0.096 / 0.093.
  Asserted bound: `LOGIT_BOUND` 0.12 (fp32), `HALF_BOUND` 0.15 (bf16/fp16). Quantization
  is deterministic, so only the matmul kernel's rounding can move these.
- greedy, free-running, 20 new tokens on tiny-32k (smallest fp32 top-2 gap 0.026): 20/20
  identical, safetensors and .bin sources alike.
- tiny-6b has near-ties at steps 0 (gap 0.0033) and 3 (0.0061), far below INT8 noise: its
  first token flips, so free-running greedy there says nothing about the quantization.
  Teacher-forced (golden tokens fed back), the argmax agrees at all 18 other steps, gaps
  from 0.011 up, most of them smaller than the logit error bound.
- size: the tiny folder's safetensors are 0.545 of the fp16 size of the same weights
  (64-column matrices make fp32 scales and 16-bit biases/norms weigh 9%); the
  6B shape's 0.500 is measured by `bench/engine.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import DynamicCache

from tests.model_fixtures import fixtures_dir, release_folder, tiny_llama_chat
from yanray.engine import int8_linear
from yanray.engine.base import EngineUnavailable
from yanray.engine.generate import decode_one_token, prefill
from yanray.engine.int8 import MANIFEST, is_int8_folder, load_int8_model, quantize_folder
from yanray.engine.int8_linear import Int8Embedding, Int8Linear, pick_kernel, quantize_rows, set_kernel

LOGIT_BOUND = 0.12
NEAR_TIE = 0.01  # fp32 top-2 gaps below this are coin flips for any 8-bit model
HALF_BOUND = 0.15
CPU = torch.device("cpu")


def _vectors(name: str) -> dict[str, torch.Tensor]:
    return load_file(fixtures_dir() / name / "vectors.safetensors")


def _quantized(
    tmp_path: Path, name: str, *, fmt: str = "safetensors", keep_16bit_outer: bool = False
) -> Path:
    src = release_folder(name, tmp_path / f"{name}-{fmt}", fmt=fmt, shards=2)
    dst = tmp_path / f"{name}-{fmt}-int8"
    quantize_folder(src, dst, progress=False, keep_16bit_outer=keep_16bit_outer)
    return dst


def _greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """Free-running greedy decoding through the engine's own prefill/decode steps."""
    out: list[int] = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)  # type: ignore[attr-defined]
        logits = prefill(model, cache, prompt, 0, CPU)
        for i in range(steps):
            out.append(int(logits.argmax()))
            if i + 1 < steps:
                logits = decode_one_token(model, cache, out[-1], len(prompt) + i, CPU)
    return out


def _teacher_forced(model: torch.nn.Module, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """The logits that pick each of `forced`, when the golden tokens are fed back. (steps, vocab)"""
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)  # type: ignore[attr-defined]
        rows = [prefill(model, cache, prompt, 0, CPU)]
        for i, token in enumerate(forced[:-1]):
            rows.append(decode_one_token(model, cache, token, len(prompt) + i, CPU))
    return torch.stack(rows)


def _max_logit_diff(model: torch.nn.Module, vec: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    with torch.inference_mode():
        for seq in ("seq0", "seq1", "seq2"):
            logits = model(vec[f"{seq}.input_ids"][None]).logits[0].float()
            worst = max(worst, float((logits - vec[f"{seq}.logits"]).abs().max()))
        full = torch.cat([vec["gen.prompt_ids"], vec["gen.greedy_new_ids"]])[None]
        worst = max(
            worst, float((model(full).logits[0].float() - vec["gen.full_forward_logits"]).abs().max())
        )
    return worst


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_int8_tiny_32k_greedy_and_logits_match_fp32(tmp_path: Path, fmt: str) -> None:
    model = load_int8_model(_quantized(tmp_path, "tiny-32k", fmt=fmt), device=CPU, dtype=torch.float32)
    vec = _vectors("tiny-32k")
    golden = vec["gen.greedy_new_ids"].tolist()
    ids = _greedy(model, vec["gen.prompt_ids"].tolist(), 20)
    assert ids[:10] == golden[:10]
    assert ids == golden  # measured: all 20
    assert _max_logit_diff(model, vec) <= LOGIT_BOUND
    steps = _teacher_forced(model, vec["gen.prompt_ids"].tolist(), golden)
    assert float((steps - vec["gen.step_logits_kvcache"]).abs().max()) <= LOGIT_BOUND


def test_int8_tiny_6b_agrees_wherever_fp32_is_decisive(tmp_path: Path) -> None:
    model = load_int8_model(_quantized(tmp_path, "tiny-6b"), device=CPU, dtype=torch.float32)
    vec = _vectors("tiny-6b")
    golden = vec["gen.greedy_new_ids"].tolist()
    steps = _teacher_forced(model, vec["gen.prompt_ids"].tolist(), golden)
    reference = vec["gen.step_logits_kvcache"]
    assert float((steps - reference).abs().max()) <= LOGIT_BOUND
    top2 = reference.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > NEAR_TIE
    assert int(decisive.sum()) == 18  # all but steps 0 and 3
    assert torch.equal(steps.argmax(-1)[decisive], reference.argmax(-1)[decisive])
    assert _max_logit_diff(model, vec) <= LOGIT_BOUND


def test_keeping_embedding_and_output_layer_16bit(tmp_path: Path) -> None:
    folder = _quantized(tmp_path, "tiny-32k", keep_16bit_outer=True)
    model = load_int8_model(folder, device=CPU, dtype=torch.float32)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    vec = _vectors("tiny-32k")
    assert _greedy(model, vec["gen.prompt_ids"].tolist(), 20) == vec["gen.greedy_new_ids"].tolist()
    assert _max_logit_diff(model, vec) <= LOGIT_BOUND


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_compute(tmp_path: Path, dtype: torch.dtype) -> None:
    model = load_int8_model(_quantized(tmp_path, "tiny-32k"), device=CPU, dtype=dtype)
    assert model.model.norm.weight.dtype == dtype
    assert _max_logit_diff(model, _vectors("tiny-32k")) <= HALF_BOUND


def test_folder_is_safetensors_only_and_about_half_of_fp16(tmp_path: Path) -> None:
    src = release_folder("tiny-32k", tmp_path / "src", fmt="bin", shards=2)
    dst = tmp_path / "int8"
    quantize_folder(src, dst, progress=False)
    assert is_int8_folder(dst) and not is_int8_folder(src)
    assert not (tmp_path / "int8.partial").exists()
    for path in dst.iterdir():
        head = path.read_bytes()[:2]
        assert not head.startswith(b"\x80") and head != b"PK", (
            f"{path.name} looks like a pickle/torch.save file"
        )
        assert path.suffix in (".safetensors", ".json", ".model"), path.name
    assert (dst / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert json.loads((dst / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    manifest = json.loads((dst / MANIFEST).read_text())
    assert (
        manifest["format"] == "yanray-int8"
        and manifest["format_version"] == 1
        and manifest["arch"] == "chatglm3"
    )
    assert "model.layers.1.mlp.down_proj" in manifest["linear"]

    weights: dict[str, torch.Tensor] = {}
    for path in dst.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as reader:
            weights.update({key: reader.get_tensor(key) for key in reader.keys()})
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert weights[f"model.layers.0.self_attn.{name}.weight"].dtype == torch.int8
    assert weights["model.layers.0.mlp.gate_up_proj.weight"].dtype == torch.int8
    assert weights["model.layers.0.mlp.gate_up_proj.weight_scale"].shape == (256,)
    assert weights["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16

    fp16 = sum(t.numel() * 2 for t in load_file(fixtures_dir() / "tiny-32k" / "model.safetensors").values())
    int8 = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    assert int8 / fp16 <= 0.55  # measured 0.545 (tiny matrices; the 6B shape gives 0.500)


def test_newer_or_foreign_format_is_refused(tmp_path: Path) -> None:
    folder = _quantized(tmp_path, "tiny-32k")
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "format_version": 2}))
    assert is_int8_folder(folder)
    with pytest.raises(EngineUnavailable, match="format 2.*reads up to 1.*yanray quantize"):
        load_int8_model(folder, device=CPU, dtype=torch.float32)
    (folder / MANIFEST).write_text(json.dumps({**manifest, "format": "something-else"}))
    assert not is_int8_folder(folder)
    with pytest.raises(EngineUnavailable, match="not a Yanray INT8"):
        load_int8_model(folder, device=CPU, dtype=torch.float32)


def test_loading_never_requantizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _quantized(tmp_path, "tiny-32k")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("quantize_rows called while loading")

    monkeypatch.setattr(int8_linear, "quantize_rows", refuse)
    monkeypatch.setattr("yanray.engine.int8.quantize_rows", refuse)
    model = load_int8_model(folder, device=CPU, dtype=torch.float32)
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 2 * 6 + 1  # q, k, v, o, gate_up, down per layer + the output layer
    assert all(m.weight.dtype == torch.int8 for m in linears)
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_refuses_a_non_empty_destination_and_cleans_up_a_failed_run(tmp_path: Path) -> None:
    src = release_folder("tiny-32k", tmp_path / "src", shards=1)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    with pytest.raises(EngineUnavailable, match="not empty"):
        quantize_folder(src, taken, progress=False)

    state = load_file(src / "model.safetensors")
    del state["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    from safetensors.torch import save_file

    save_file(state, src / "model.safetensors")
    with pytest.raises(EngineUnavailable, match="lacks 1 tensors"):
        quantize_folder(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_generic_transformers_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = tiny_llama_chat(tmp_path / "llama")
    dst = tmp_path / "llama-int8"
    quantize_folder(src, dst, progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (src / name).is_file():
            assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert json.loads((dst / MANIFEST).read_text())["arch"] == "transformers"
    model = load_int8_model(dst, device=CPU, dtype=torch.float32)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear)
    assert isinstance(model.model.layers[1].mlp.down_proj, Int8Linear)
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(0, 20, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = reference(ids).logits, model(ids).logits
    # measured 0.0030 with logits up to |0.33| (transformers' std 0.02 init)
    assert float((want - got).abs().max()) <= 0.01
    assert torch.equal(want.argmax(-1), got.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int8_linear_kernels_agree(dtype: torch.dtype, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 96, generator=gen) * 0.05
    weight[7] = 0.0  # an all-zero row quantizes to zeros, not NaN
    qweight, scale = quantize_rows(weight, chunk_rows=64)
    assert float((qweight.float() * scale[:, None] - weight).abs().max()) <= float(scale.max()) / 2 + 1e-7
    layer = Int8Linear(96, 300, bias=True, dtype=dtype)
    layer.load_state_dict(
        {"weight": qweight, "weight_scale": scale.to(dtype), "bias": torch.ones(300, dtype=dtype)},
        assign=True,
    )
    x = torch.randn(2, rows, 96, generator=gen).to(dtype)
    want = torch.nn.functional.linear(x.float(), qweight.float() * scale[:, None]) + 1
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert pick_kernel(CPU, dtype) == "int8pack"
    results = []
    for kernel in ("int8pack", "dequant"):
        set_kernel(layer, kernel)
        results.append(layer(x))
    monkeypatch.setattr(int8_linear, "DEQUANT_CHUNK", 96 * 50)  # 6 slices of output rows
    results.append(layer(x))
    for got in results:
        assert got.shape == (2, rows, 300) and got.dtype == dtype
        assert float((got.float() - want).abs().max()) <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_kernel_gets_aligned_operands_from_views(dtype: torch.dtype) -> None:
    """A weight loaded as a view into a file's bytes, and an input that is a view into a larger
    tensor, start off a 64-byte boundary; on an AVX512 CPU torch's fused kernel crashed the
    process on such operands (a segmentation fault in test_half_precision_compute)."""
    gen = torch.Generator().manual_seed(0)
    qweight, scale = quantize_rows(torch.randn(96, 64, generator=gen) * 0.05)
    raw = torch.empty(qweight.numel() + 8, dtype=torch.int8)
    raw[8:] = qweight.flatten()
    layer = Int8Linear(64, 96, bias=False, dtype=dtype)
    layer.load_state_dict({"weight": raw[8:].view(96, 64), "weight_scale": scale.to(dtype)}, assign=True)
    assert layer.weight.data_ptr() % 64 != 0
    set_kernel(layer, pick_kernel(CPU, dtype))
    assert layer.kernel == "int8pack"
    assert layer.weight.data_ptr() % 64 == 0 and torch.equal(layer.weight, qweight)
    buffer = torch.randn(2 * 64 + 1, generator=gen).to(dtype)
    x = buffer[1:].view(2, 64)  # one element past an aligned start
    want = torch.nn.functional.linear(x.float(), qweight.float() * scale[:, None])
    for rows in (x[:1], x):  # the fused kernel's rows in fp32 (1) and in bf16 (up to 16)
        got = layer(rows)
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        assert float((got.float() - want[: rows.shape[0]]).abs().max()) <= tolerance
