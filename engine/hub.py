"""First run: a hub id in `YANRAY_MODEL` becomes a local INT8 folder, downloaded and quantized once.

`resolve_model(model, data_dir=...)` returns a folder to load:

- an existing folder is used as it is;
- a hub id (`THUDM/chatglm3-6b-32k`, the default) maps to `<data_dir>/models/<owner>--<name>-int8`.
  If that INT8 copy is there, it is used. Otherwise the release is downloaded with
  `huggingface_hub.snapshot_download` (its progress bars) into
  `<data_dir>/models/<owner>--<name>-download`, quantized with `engine/int8.py`'s
  `quantize_folder` (which writes `<dst>.partial` and renames it when complete, so a
  half-written copy is never loaded), and the download is removed (12 GB for ChatGLM3-6B;
  the INT8 copy is all Yanray needs).

Only config, tokenizer and weight files are fetched, never the repository's `*.py` remote
code. When a repository has both `.safetensors` and `.bin` weights, only the safetensors
are fetched. Without network (or with `HF_HUB_OFFLINE=1`) the error says which files to
put where and the `yanray quantize` command to run; "without network" is found by one
TCP connection to the hub's endpoint (`HF_ENDPOINT`, or the proxy for it) before any
download, so it is said at once rather than after huggingface_hub's retries.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import shutil
import socket
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from yanray.engine.base import EngineUnavailable

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SMALL_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]
SAFETENSORS = ["*.safetensors", "model.safetensors.index.json"]
BIN = ["*.bin", "pytorch_model.bin.index.json"]
REACH_TIMEOUT = 5.0  # seconds for the one connection that tells whether there is a network
MODELSCOPE = {"THUDM/chatglm3-6b-32k": "ZhipuAI/chatglm3-6b-32k", "THUDM/chatglm3-6b": "ZhipuAI/chatglm3-6b"}

Download = Callable[[str, Path, list[str]], None]
ListFiles = Callable[[str], Sequence[str]]
Quantize = Callable[[Path, Path], None]


def is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and ".." not in text


def int8_dir(model_id: str, data_dir: Path) -> Path:
    return data_dir / "models" / (model_id.replace("/", "--") + "-int8")


def download_dir(model_id: str, data_dir: Path) -> Path:
    return data_dir / "models" / (model_id.replace("/", "--") + "-download")


def weight_patterns(files: Sequence[str]) -> list[str]:
    """What to fetch from a repository with these files: safetensors if it has them, else .bin."""
    if any(fnmatch.fnmatch(f, "*.safetensors") for f in files):
        return SMALL_FILES + SAFETENSORS
    return SMALL_FILES + BIN


def offline_message(model_id: str, data_dir: Path) -> str:
    src, dst = download_dir(model_id, data_dir), int8_dir(model_id, data_dir)
    where = f"https://huggingface.co/{model_id}"
    if model_id in MODELSCOPE:
        where += f" (or https://modelscope.cn/models/{MODELSCOPE[model_id]})"
    return (
        f"Cannot download {model_id}: no network, or HF_HUB_OFFLINE is set. Copy config.json, tokenizer.model "
        "and the weights (model-*.safetensors with model.safetensors.index.json, or pytorch_model-*.bin with "
        f"pytorch_model.bin.index.json; the *.py files are not needed) from {where} into {src}, "
        f"then run `yanray quantize {src} {dst}` and start again "
        f"(or set YANRAY_MODEL={src} to run it without INT8)."
    )


def _network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [
        OfflineModeIsEnabled,
        LocalEntryNotFoundError,
        ConnectionError,
        TimeoutError,
    ]
    try:
        import httpx2  # what huggingface_hub 1.x/2.x uses

        errors.append(httpx2.TransportError)
    except ImportError:
        pass
    return tuple(errors)


def hub_reachable(timeout: float = REACH_TIMEOUT) -> bool:
    """Whether the hub (or the proxy in front of it) takes a TCP connection; False at once
    with `HF_HUB_OFFLINE` set. One quick check instead of huggingface_hub's own retries,
    which log each failed attempt (twice, through its logger and warnings) for half a minute."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlsplit(constants.ENDPOINT)
    target = endpoint
    proxy = urlsplit(urllib.request.getproxies().get(endpoint.scheme, ""))
    if proxy.hostname and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        target = proxy
    try:
        port = target.port or (443 if target.scheme == "https" else 80)
        with socket.create_connection((target.hostname or "", port), timeout=timeout):
            return True
    except (OSError, ValueError) as exc:
        logger.debug("the hub at %s cannot be reached: %s", constants.ENDPOINT, exc)
        return False


def _hub_list(model_id: str) -> Sequence[str]:
    from huggingface_hub import HfApi

    if not hub_reachable():  # the first call to the hub: find out about the network once
        raise ConnectionError("the Hugging Face hub cannot be reached")
    return HfApi().list_repo_files(model_id)


def _hub_download(model_id: str, dst: Path, patterns: list[str]) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=model_id, local_dir=dst, allow_patterns=patterns, ignore_patterns=["*.py"])


def _quantize(src: Path, dst: Path) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled

    from yanray.engine.int8 import quantize_folder

    # a bar like the download's, or none when they are off (JSON logs: bot/logs.py)
    quantize_folder(src, dst, progress=not are_progress_bars_disabled())


def _is_ready(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    try:
        from yanray.engine.int8 import is_int8_folder
    except ImportError:
        return True
    return bool(is_int8_folder(folder))


def resolve_model(
    model: str,
    *,
    data_dir: Path,
    list_files: ListFiles | None = None,
    download: Download | None = None,
    quantize: Quantize | None = None,
) -> Path:
    """The folder to load for `YANRAY_MODEL=model` (downloading and quantizing on first use).

    `list_files`, `download` and `quantize` default to the hub and `engine/int8.py`.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(model):
        raise EngineUnavailable(
            f"YANRAY_MODEL={model}: no such folder, and not a hub id like THUDM/chatglm3-6b-32k"
        )
    dst = int8_dir(model, data_dir)
    if _is_ready(dst):
        return dst
    src = download_dir(model, data_dir)
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        patterns = weight_patterns((list_files or _hub_list)(model))
        logger.info("first run: downloading %s into %s (only once)", model, src)
        (download or _hub_download)(model, src, patterns)
    except (RepositoryNotFoundError, GatedRepoError):
        raise EngineUnavailable(f"{model} is not a public model on the Hugging Face hub") from None
    except _network_errors() as exc:
        logger.debug("download of %s failed: %s", model, exc)  # the error says it in one line
        raise EngineUnavailable(offline_message(model, data_dir)) from None

    logger.info("quantizing %s to INT8 into %s (only once)", model, dst)
    (quantize or _quantize)(src, dst)  # writes <dst>.partial and renames it when complete
    size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    shutil.rmtree(src)
    logger.info("removed the downloaded copy (%.1f GB); the INT8 copy is %s", size / 1e9, dst)
    return dst
