"""The `yanray` command: `chat` in a terminal, `run` the bots, `quantize` a model to INT8
(merging a LoRA adapter first with `--lora`), `export` the conversations as a training
dataset, `eval` a model on a prompt set (and `eval compare` two runs).

Everything is built here once and passed in (settings, engine, core, adapters).
Logging is configured here, to standard error; standard output carries only the
conversation. Every expected failure (a bad setting, a refused token, an unreachable
platform, database or engine, an adapter that loses its platform for good while `yanray
run` runs) is a `YanrayError` and ends the program with one line on standard error and
exit status 2 (configuration) or 1 (anything else); its traceback is logged at DEBUG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from yanray.bot.app import Core
from yanray.bot.errors import AdapterFailed, ConfigError, YanrayError
from yanray.bot.export_cli import add_export_parser, run_export
from yanray.bot.listener import StatusListener
from yanray.bot.logs import formatter, logs_json, route_library_logs
from yanray.bot.metrics import Metrics
from yanray.bot.settings import Settings, load_settings
from yanray.bot.types import Adapter
from yanray.engine.base import Engine
from yanray.storage import DatabaseLock

logger = logging.getLogger("yanray")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yanray",
        description="Yanray, a self-hosted personal AI assistant on a local language model.",
        epilog="Settings come from yanray.toml and YANRAY_* environment variables; see the README.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="settings file (default: $YANRAY_CONFIG, else ./yanray.toml if it exists)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "chat",
        help="talk to Yanray in this terminal",
        description="Talk to Yanray in this terminal. With a pipe as input: one message per line, "
        "each complete reply followed by a blank line; exits at end of input. Yanray's own texts "
        "are in the terminal's language (LANG; English or Chinese) unless YANRAY_LANGUAGE or /lang says otherwise.",
    )
    commands.add_parser(
        "run",
        help="run the Telegram and/or Discord bot, whichever has a token set",
        description="Run every adapter whose token is set (YANRAY_TELEGRAM_TOKEN, YANRAY_DISCORD_TOKEN) "
        "with the engine worker, until SIGINT or SIGTERM, and serve /healthz and /metrics on "
        "YANRAY_HTTP_LISTEN (default 127.0.0.1:8089; empty: none).",
    )
    quantize = commands.add_parser(
        "quantize",
        help="turn a model folder into a Yanray INT8 folder",
        description="Quantize a ChatGLM3 release folder (or another supported model) to INT8 weights, "
        "on the CPU, shard by shard. Then set YANRAY_MODEL=DST. With --lora, a PEFT LoRA adapter "
        "trained on ChatGLM3 is merged in fp32 first; the manifest records its sha256 and how much "
        "of its change INT8 keeps.",
    )
    quantize.add_argument("src", type=Path, help="model folder (config.json, tokenizer.model, weights)")
    quantize.add_argument("dst", type=Path, help="output folder for the INT8 model")
    quantize.add_argument(
        "--lora",
        type=Path,
        metavar="ADAPTER",
        help="PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) to merge first; "
        "targets query_key_value, dense, dense_h_to_4h, dense_4h_to_h. DoRA, PiSSA/OLoRA inits, "
        "rank/alpha patterns, trained biases and modules_to_save are refused",
    )
    quantize.add_argument(
        "--lora-scale",
        type=float,
        metavar="S",
        help="multiply the adapter's scale (lora_alpha/r, or lora_alpha/sqrt(r) with rsLoRA) by S (default 1)",
    )
    add_export_parser(commands)
    evaluate = commands.add_parser(
        "eval",
        help="measure the model on a prompt set, or compare two runs",
        usage="yanray eval [SET.jsonl] --out RESULT.json\n       yanray eval compare BEFORE.json AFTER.json",
        description="Run an eval set (default: the bundled evals/core.jsonl) through the configured "
        "model (YANRAY_ENGINE, YANRAY_MODEL) and the tool loop, greedily, each item a fresh "
        "conversation, and write RESULT.json; or compare two results: the pass rate per check kind "
        "before and after, and the items whose outcome changed. No database is used.",
    )
    evaluate.add_argument(
        "paths",
        nargs="*",
        metavar="SET.jsonl | compare BEFORE.json AFTER.json",
        help="the eval set to run (JSON lines; see the README), or `compare` and two result files",
    )
    evaluate.add_argument(
        "--out", type=Path, metavar="RESULT.json", help="where to write the result of a run"
    )
    return parser


def configure_logging(level: str, form: str = "text", secrets: list[str] | None = None) -> None:
    """Log to standard error at `level`, as lines or JSON lines (`form`, `bot/logs.py`), with
    `secrets` masked."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(form, secrets or ()))
    logging.basicConfig(level=level, handlers=[handler])
    logging.captureWarnings(True)  # a library's warnings.warn is a log line in the same form
    noisy_loggers = (
        "httpx",
        "aiosqlite",
        "discord.client",
        "discord.gateway",
        "telegram.ext.Application",
        "alembic.runtime.migration",
    )
    for noisy in noisy_loggers:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


async def build_engine(settings: Settings) -> Engine:
    """The engine the settings ask for. A local model loads in a thread (it takes a while)."""
    if settings.engine == "openai":
        from yanray.engine.openai import OpenAIEngine

        key = settings.secret("openai_api_key")
        return OpenAIEngine(
            base_url=settings.openai_base_url,
            model=settings.openai_model,
            api_key=key,
            timeout=settings.openai_timeout,
            max_context=settings.max_context or 8192,
        )
    from yanray.engine.local import LocalEngine

    route_library_logs(settings.log_format)  # imported now; their lines take Yanray's form
    return await asyncio.to_thread(
        LocalEngine.load,
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        max_context=settings.max_context,
        data_dir=settings.data_dir,
        kv_cache_gb=settings.kv_cache_gb,
        compile=settings.compile,
        max_batch=settings.max_batch,
        lora=settings.lora or None,
    )


async def chat(settings: Settings) -> None:
    from yanray.adapters.console import ConsoleAdapter

    engine = await build_engine(settings)
    try:
        async with await Core.open(settings, engine) as core:
            console = ConsoleAdapter(dispatcher=core.dispatcher, images=settings.data_dir / "images")
            core.add_adapter(console)
            await core.start()
            await console.converse()
            await core.wait_idle()
    finally:
        await engine.aclose()


def platform_adapters(
    settings: Settings, core: Core, on_fatal: Callable[[str], None] | None = None
) -> list[Adapter]:
    adapters: list[Adapter] = []
    if settings.telegram_token is not None:
        from yanray.adapters.telegram import TelegramAdapter

        adapters.append(TelegramAdapter(settings=settings, dispatcher=core.dispatcher, on_fatal=on_fatal))
    if settings.discord_token is not None:
        from yanray.adapters.discord import DiscordAdapter

        adapters.append(DiscordAdapter(settings=settings, dispatcher=core.dispatcher, on_fatal=on_fatal))
    return adapters


async def run(settings: Settings) -> None:
    if settings.telegram_token is None and settings.discord_token is None:
        raise ConfigError("nothing to run: set YANRAY_TELEGRAM_TOKEN and/or YANRAY_DISCORD_TOKEN")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # an adapter that can no longer reach its platform stops the process, rather than leave
    # it running and answering nobody (a supervisor can restart it)
    failed: asyncio.Future[str] = loop.create_future()

    def adapter_failed(reason: str) -> None:
        if not failed.done():
            failed.set_result(reason)

    metrics = Metrics()
    async with status_listener(settings, metrics) as listener:
        await _run(settings, metrics, listener, stop, failed, adapter_failed)
    if failed.done():
        raise AdapterFailed(failed.result())


@contextlib.asynccontextmanager
async def status_listener(settings: Settings, metrics: Metrics) -> AsyncIterator[StatusListener | None]:
    """The /healthz and /metrics listener (`bot/listener.py`), started first so a taken port
    stops `yanray run` before the model loads; None when YANRAY_HTTP_LISTEN is empty."""
    address = settings.http_address
    if address is None:
        yield None
        return
    async with StatusListener(*address, metrics=metrics) as listener:
        yield listener


async def _run(
    settings: Settings,
    metrics: Metrics,
    listener: StatusListener | None,
    stop: asyncio.Event,
    failed: asyncio.Future[str],
    adapter_failed: Callable[[str], None],
) -> None:
    engine = await build_engine(settings)
    try:
        async with await Core.open(settings, engine, metrics=metrics) as core:
            adapters = platform_adapters(settings, core, adapter_failed)
            for adapter in adapters:
                core.add_adapter(adapter)
            if listener is not None:
                listener.attach(engine=engine, db=core.db, adapters=adapters)
            started: list[Adapter] = []
            try:
                for adapter in adapters:
                    await adapter.start()
                    started.append(adapter)
                await core.start()
                logger.info(
                    "Yanray is running (%s)%s; Ctrl-C stops it",
                    ", ".join(a.platform for a in adapters),
                    ""
                    if listener is None
                    else f"; health and metrics on http://{listener.host}:{listener.port}/healthz and /metrics",
                )
                stopped = asyncio.ensure_future(stop.wait())
                waiting: set[asyncio.Future[Any]] = {stopped, failed}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                logger.info("stopping: no new messages are taken; a running answer resumes at the next start")
            finally:
                for adapter in reversed(started):
                    await adapter.stop()
    finally:
        await engine.aclose()


def quantize(
    src: Path, dst: Path, lora: Path | None = None, lora_scale: float | None = None, log_format: str = "text"
) -> None:
    from yanray.engine.int8 import quantize_folder

    if lora_scale is not None and lora is None:
        raise ConfigError("--lora-scale needs --lora ADAPTER")
    route_library_logs(log_format)
    manifest = quantize_folder(
        src,
        dst,
        progress=log_format != "json",  # a progress bar is not a JSON line
        lora=lora,
        lora_scale=1.0 if lora_scale is None else lora_scale,
    )
    if "lora" in manifest:
        from yanray.engine.chatglm3.lora import survival_line

        merged = manifest["lora"]
        print(f"Merged the LoRA adapter {lora} (sha256 {merged['sha256']}, scale {merged['scale']:g}).")
        print(survival_line(merged["kept_through_int8"]) + ".")
    print(f"INT8 model written to {dst}. Use it with YANRAY_MODEL={dst}")


async def evaluate(settings: Settings, set_path: Path | None, out: Path) -> None:
    from yanray.bot.evals import format_summary, run_eval, sha256_of, write_result
    from yanray.bot.evalset import default_set, load_set

    path = set_path or default_set()
    items = load_set(path)  # a bad line is refused before the model loads
    total = len(items)

    def progress(index: int, outcome: dict[str, Any]) -> None:
        verdict = "pass" if outcome["passed"] else "FAIL"
        logger.info(
            "eval %d/%d %s (%s): %s, %s",
            index + 1,
            total,
            outcome["id"],
            outcome["check"],
            verdict,
            outcome["why"],
        )

    engine = await build_engine(settings)
    try:
        result = await run_eval(
            items,
            engine=engine,
            settings=settings,
            set_name=str(path),
            set_sha256=sha256_of(path),
            progress=progress,
        )
    finally:
        await engine.aclose()
    write_result(result, out)
    print(format_summary(result))
    print(f"Result written to {out}")


def eval_command(settings: Settings, paths: list[str], out: Path | None) -> None:
    """`yanray eval [SET] --out RESULT` or `yanray eval compare BEFORE AFTER`."""
    from yanray.bot.evals import format_compare, read_result
    from yanray.bot.evalset import EvalError

    if paths[:1] == ["compare"]:
        if len(paths) != 3:
            raise EvalError("eval compare needs two result files: yanray eval compare BEFORE.json AFTER.json")
        print(format_compare(read_result(Path(paths[1])), read_result(Path(paths[2]))))
        return
    if len(paths) > 1:
        raise EvalError(
            f"eval runs one set at a time, not {len(paths)}: yanray eval [SET.jsonl] --out RESULT.json"
        )
    if out is None:
        raise EvalError("eval needs --out RESULT.json: yanray eval [SET.jsonl] --out RESULT.json")
    if not out.parent.is_dir():  # found out before the model loads, not after the run
        raise EvalError(f"{out}: its folder {out.parent} does not exist")
    check_data_dir(settings)
    asyncio.run(evaluate(settings, Path(paths[0]) if paths else None, out))


def check_data_dir(settings: Settings) -> None:
    """Make sure the data folder exists and takes files, when something will write there
    (the default SQLite database, a downloaded model), so that a wrong YANRAY_DATA_DIR is
    named at once rather than by whichever part first fails to write."""
    if settings.database_url and settings.engine != "local":
        return
    folder = settings.data_dir
    where = f"YANRAY_DATA_DIR={folder}"
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{where}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".yanray-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{where}: cannot be written ({reason}); choose a folder Yanray may write") from exc


class _Held(logging.Handler):
    """Keeps records until the log's form is known."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def settings_and_logging(config: Path | None) -> Settings:
    """Load the settings, configure logging as they say, then log what loading them warned
    (an unknown YANRAY_* variable) in that form: with YANRAY_LOG_FORMAT=json those warnings
    are JSON lines too. If the settings are refused, the log takes YANRAY_LOG_FORMAT as the
    environment gives it (text unless it says json)."""
    held = _Held()
    root = logging.getLogger()
    root.addHandler(held)
    try:
        settings = load_settings(config)
    except BaseException:
        root.removeHandler(held)
        form = "json" if os.environ.get("YANRAY_LOG_FORMAT", "").strip().lower() == "json" else "text"
        configure_logging("INFO", form)
        _replay(held.records)
        raise
    root.removeHandler(held)
    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    _replay(held.records)
    return settings


def _replay(records: list[logging.LogRecord]) -> None:
    for record in records:
        logger_of = logging.getLogger(record.name)
        if logger_of.isEnabledFor(record.levelno):  # YANRAY_LOG_LEVEL=ERROR hides a warning
            logger_of.handle(record)


def main(argv: list[str] | None = None) -> int:
    """The `yanray` command. Every expected failure is a `YanrayError`, caught here once:
    one line on standard error, exit status 2 for a configuration problem (`ConfigError`)
    and 1 for any other; the traceback goes to the log at YANRAY_LOG_LEVEL=DEBUG only."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_and_logging(args.config)
        if args.command == "quantize":
            quantize(args.src, args.dst, args.lora, args.lora_scale, settings.log_format)
            return 0
        if args.command == "export":
            run_export(settings, args)
            return 0
        if args.command == "eval":
            eval_command(settings, args.paths, args.out)
            return 0
        check_data_dir(settings)
        # one process per SQLite journal, checked before the model loads (which takes a while)
        lock = DatabaseLock.for_url(settings.resolved_database_url)
        try:
            asyncio.run(chat(settings) if args.command == "chat" else run(settings))
        finally:
            if lock is not None:
                lock.release()
    except YanrayError as exc:
        logger.debug("stopped: %s", exc, exc_info=True)
        config = isinstance(exc, ConfigError)
        line = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever it quotes
        if logs_json():
            logger.error("%s", line)  # a log shipper reading JSON lines sees why it stopped too
        print(f"yanray: {'bad setting: ' if config else ''}{line}", file=sys.stderr)
        return 2 if config else 1
    except KeyboardInterrupt:
        with contextlib.suppress(BrokenPipeError):
            print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
