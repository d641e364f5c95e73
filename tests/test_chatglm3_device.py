"""Device and dtype choice, the memory guard's arithmetic and messages, and the first-run path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.model_fixtures import fixtures_dir, steer_chain, steered_chatglm3
from yanray.engine.base import EngineUnavailable
from yanray.engine.device import (
    GiB,
    ModelShape,
    auto_dtype,
    check_fits,
    cpu_bf16_units,
    cpu_computes_bf16,
    estimate_memory,
    kept_cache_budget,
    kv_cache_bytes,
    model_shape,
    resolve_device,
    resolve_dtype,
)
from yanray.engine.hub import int8_dir, is_hub_id, resolve_model, weight_patterns
from yanray.engine.skeleton import meta_model


@pytest.mark.parametrize(
    ("capability", "bf16", "expected"),
    [
        (None, False, torch.float32),  # CPU without bf16 units (AVX2: bf16 emulated)
        (None, True, torch.bfloat16),  # CPU with AVX512-BF16 or AMX
        ((6, 1), False, torch.float32),  # Pascal: fp16 at 1/64 rate
        ((7, 0), False, torch.float16),  # Volta
        ((7, 5), True, torch.float16),  # Turing (bf16 only emulated)
        ((8, 6), True, torch.bfloat16),  # Ampere
        ((9, 0), True, torch.bfloat16),  # Hopper
    ],
)
def test_auto_dtype_follows_the_gpu(
    capability: tuple[int, int] | None, bf16: bool, expected: torch.dtype
) -> None:
    assert auto_dtype(capability, bf16) == expected


@pytest.mark.parametrize(
    ("units", "speedup", "expected"),
    [
        (False, None, False),  # AVX2 only: fp32
        (True, None, True),  # units, not measured
        (True, 2.5, True),  # units, bf16 measured faster
        (True, 0.95, True),  # units, about even (noise on a loaded machine)
        (True, 0.3, False),  # units reported but bf16 measured slow (emulated): fp32
    ],
)
def test_cpu_auto_dtype_needs_bf16_units_that_measure_fast(
    units: bool, speedup: float | None, expected: bool
) -> None:
    assert cpu_computes_bf16(units, speedup) is expected


def test_cpu_auto_dtype_on_this_machine(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="yanray.engine.device")
    chosen = resolve_dtype("auto", torch.device("cpu"))
    if not cpu_bf16_units():
        assert chosen == torch.float32
    assert chosen in (torch.float32, torch.bfloat16)
    assert any("YANRAY_DTYPE=auto on the CPU" in r.getMessage() for r in caplog.records)


def test_device_and_dtype_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(EngineUnavailable, match="YANRAY_DTYPE"):
        resolve_dtype("int4", torch.device("cpu"))
    with pytest.raises(EngineUnavailable, match="YANRAY_DEVICE"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(EngineUnavailable, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.fixture(scope="module")
def shape_6b() -> ModelShape:
    cfg = json.loads((fixtures_dir() / "reference-configs" / "chatglm3-6b-32k.config.json").read_text())
    skeleton = meta_model(cfg)
    return model_shape(skeleton.model, skeleton.config)


def test_estimate_for_chatglm3_6b_32k(shape_6b: ModelShape) -> None:
    assert shape_6b.block_linear_params + shape_6b.other_params == 6_243_584_000
    assert (shape_6b.layers, shape_6b.kv_heads, shape_6b.head_dim) == (28, 2, 128)
    assert kv_cache_bytes(shape_6b, context=32768, dtype_size=2) == 2 * 28 * 2 * 128 * 32768 * 2
    fp16 = estimate_memory(shape_6b, context=8192, dtype_size=2, int8=False)
    int8 = estimate_memory(shape_6b, context=8192, dtype_size=2, int8=True)
    assert 11.5 * GiB < fp16.weights < 11.7 * GiB
    assert int8.weights < 0.55 * fp16.weights
    assert int8.total < 8 * GiB


def test_guard_on_a_10_gb_card_suggests_int8(shape_6b: ModelShape) -> None:
    with pytest.raises(EngineUnavailable) as refused:
        check_fits(
            shape_6b,
            free=int(9.5 * GiB),
            context=32768,
            dtype=torch.bfloat16,
            int8=False,
            where="the GPU (RTX 3080)",
        )
    message = str(refused.value)
    assert "\n" not in message
    assert (
        "bfloat16 with a 32768-token context" in message and "the GPU (RTX 3080) has 9.5 GiB free" in message
    )
    assert "INT8 weights (`yanray quantize SRC DST`" in message
    assert "never offloaded" in message


def test_guard_suggests_a_context_that_fits(shape_6b: ModelShape) -> None:
    free = int(7.5 * GiB)
    with pytest.raises(EngineUnavailable, match=r"YANRAY_MAX_CONTEXT=(\d+)") as refused:
        check_fits(shape_6b, free=free, context=32768, dtype=torch.float16, int8=True)
    suggested = int(str(refused.value).split("YANRAY_MAX_CONTEXT=")[1].split()[0].rstrip(",."))
    assert 1024 <= suggested < 32768 and suggested % 1024 == 0
    fits = check_fits(shape_6b, free=free, context=suggested, dtype=torch.float16, int8=True)
    assert fits.total <= free
    with pytest.raises(EngineUnavailable):
        check_fits(shape_6b, free=free, context=suggested + 1024, dtype=torch.float16, int8=True)


def test_guard_when_nothing_fits(shape_6b: ModelShape) -> None:
    with pytest.raises(EngineUnavailable, match="does not fit this device"):
        check_fits(shape_6b, free=2 * GiB, context=8192, dtype=torch.float16, int8=True)


def test_guard_counts_the_kept_conversations_budget(shape_6b: ModelShape) -> None:
    free = int(9.8 * GiB)  # a 10 GB card (P102-100) once CUDA has started
    plain = check_fits(shape_6b, free=free, context=8192, dtype=torch.float32, int8=True)
    left = free - plain.total
    with_kept = check_fits(shape_6b, free=free, context=8192, dtype=torch.float32, int8=True, kept=left)
    assert with_kept.total == free and with_kept.kept == left
    with pytest.raises(EngineUnavailable) as refused:
        check_fits(shape_6b, free=free, context=8192, dtype=torch.float32, int8=True, kept=left + GiB)
    message = str(refused.value)
    assert "\n" not in message and "YANRAY_KV_CACHE_GB" in message
    assert f"at most {left / GiB:.1f}" in message


def test_default_kept_budget_is_what_is_left_less_a_margin() -> None:
    assert kept_cache_budget(1.5, left=0, device_type="cuda") == int(1.5 * GiB)  # explicit: as asked
    assert kept_cache_budget(0, left=10 * GiB, device_type="cpu") == 0  # 0: off
    assert kept_cache_budget(None, left=2 * GiB, device_type="cuda") == int(2 * GiB * 0.95) - 512 * 1024**2
    assert kept_cache_budget(None, left=100 * 1024**2, device_type="cuda") == 0
    assert kept_cache_budget(None, left=6 * GiB, device_type="cpu") == 2 * GiB  # half of what is past 2 GiB
    assert kept_cache_budget(None, left=64 * GiB, device_type="cpu") == 4 * GiB  # at most 4 GiB
    assert kept_cache_budget(None, left=GiB, device_type="cpu") == 0


# -- first run -----------------------------------------------------------------------------


def test_hub_ids_and_patterns() -> None:
    assert is_hub_id("THUDM/chatglm3-6b-32k") and not is_hub_id("./models/x") and not is_hub_id("a/../b")
    both = ["config.json", "model-00001-of-00007.safetensors", "pytorch_model-00001-of-00007.bin", "x.py"]
    assert "*.bin" not in weight_patterns(both) and "*.safetensors" in weight_patterns(both)
    assert "*.bin" in weight_patterns(["pytorch_model.bin"])
    assert not any(p.endswith(".py") for p in weight_patterns(both))


def test_offline_first_run_says_what_to_put_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EngineUnavailable) as refused:
        resolve_model("THUDM/chatglm3-6b-32k", data_dir=tmp_path)
    message = str(refused.value)
    src = tmp_path / "models" / "THUDM--chatglm3-6b-32k-download"
    dst = tmp_path / "models" / "THUDM--chatglm3-6b-32k-int8"
    assert f"`yanray quantize {src} {dst}`" in message
    assert (
        "config.json, tokenizer.model" in message
        and "modelscope.cn/models/ZhipuAI/chatglm3-6b-32k" in message
    )
    assert not dst.exists()


@pytest.mark.slow
async def test_first_run_downloads_quantizes_once_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hub id -> (fake) download -> real INT8 quantization -> LocalEngine, then the copy is reused."""
    import yanray.engine.hub as hub
    from yanray.engine.base import ChatMessage, GenerateOptions
    from yanray.engine.chatglm3.tokenizer import EOS, ChatGLM3Tokenizer
    from yanray.engine.local import LocalEngine

    tok = ChatGLM3Tokenizer(fixtures_dir() / "tokenizer.model")
    answer = "你好👋！INT8"
    calls: list[str] = []

    def list_files(model_id: str) -> list[str]:
        return ["config.json", "tokenizer.model", "model.safetensors", "modeling_chatglm.py"]

    def download(model_id: str, dst: Path, patterns: list[str]) -> None:
        calls.append("download")
        assert "*.py" not in patterns and "*.bin" not in patterns
        steered_chatglm3(dst, steer_chain(tok.encode_text("\n") + tok.encode_text(answer) + [EOS]))

    monkeypatch.setattr(hub, "_hub_list", list_files)
    monkeypatch.setattr(hub, "_hub_download", download)
    engine = LocalEngine.load("THUDM/chatglm3-6b-32k", device="cpu", dtype="float32", data_dir=tmp_path)
    found = int8_dir("THUDM/chatglm3-6b-32k", tmp_path)
    assert engine.label == str(found) and (found / "yanray-int8.json").is_file()
    assert not (tmp_path / "models" / "THUDM--chatglm3-6b-32k-download").exists()
    session = await engine.start([ChatMessage("user", "hi")])
    assert (await session.generate(GenerateOptions(max_new_tokens=32))).text == answer
    await engine.aclose()
    assert resolve_model("THUDM/chatglm3-6b-32k", data_dir=tmp_path) == found
    assert calls == ["download"]


def test_a_missing_folder_that_is_not_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match="no such folder"):
        resolve_model(str(tmp_path / "nope" / "deeper" / "x"), data_dir=tmp_path)
