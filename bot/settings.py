"""Yanray's one `Settings`: a `yanray.toml` file plus `YANRAY_*` environment variables.

Precedence, highest first: environment variables, the TOML file, the defaults here.
The TOML file's keys are the setting names in lower case without the prefix
(`max_new_tokens = 256`). Secrets (bot tokens, API keys, webhook secret) are read only
from the environment: a secret in the TOML file stops start-up, because config files
end up in backups and repositories.

List settings (`YANRAY_TOOLS`, `YANRAY_ALLOWED_USERS`, ...) are comma-separated in the
environment and TOML arrays (or the same comma-separated string) in the file.

`load_settings()` turns every validation failure into one `ConfigError` line naming the
setting, the value and what is allowed, and warns about unknown `YANRAY_*` names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from yanray.bot.errors import ConfigError
from yanray.bot.i18n import N_, translator

logger = logging.getLogger(__name__)

ENV_PREFIX = "YANRAY_"
SECRET_FIELDS = frozenset({"openai_api_key", "telegram_token", "telegram_webhook_secret", "discord_token"})
DEFAULT_MODEL = "THUDM/chatglm3-6b-32k"
#: the persona when the operator sets none, in each language through the catalog (a Chinese
#: user gets the Chinese one: Yanray's persona is Chinese in origin)
DEFAULT_SYSTEM_PROMPT = N_(
    "You are Yanray, a helpful, honest and concise personal assistant. "
    "Answer in the language the user writes in."
)

#: longest default system prompt; a conversation's own (/system) has a tighter limit
MAX_SYSTEM_PROMPT_CHARS = 16_000
MAX_SHOWN_VALUE = 60  # characters of a bad value quoted in the one-line error

# The TOML file of the construction in progress (set by load_settings, read by the sources hook).
_TOML_PATH: ContextVar[Path | None] = ContextVar("yanray_toml_path", default=None)

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _check_url(value: str, schemes: tuple[str, ...]) -> None:
    """A URL the clients can use: one of `schemes`, a host, a port in range."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError as exc:
        raise ValueError(f"not a usable URL ({exc})") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"not a URL like {schemes[-1]}://host/path")


class Settings(BaseSettings):
    """Every setting Yanray reads. The README's settings table lists the same names."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    # -- core --------------------------------------------------------------------------
    data_dir: Path = Path("./data")
    database_url: str = ""  # empty: sqlite+aiosqlite:///<data_dir>/yanray.db
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per line
    http_listen: str = "127.0.0.1:8089"  # host:port of /healthz and /metrics; empty: none

    # -- engine ------------------------------------------------------------------------
    engine: Literal["local", "openai"] = "local"
    model: str = DEFAULT_MODEL
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_context: int = Field(default=0, ge=0)  # 0: the model's own
    kv_cache_gb: float | None = Field(default=None, ge=0)  # kept conversations; unset/auto: what is left
    compile: Literal["auto", "on", "off"] = "auto"  # compiled decode (engine/compiled.py); auto: on with CUDA
    max_batch: int | None = Field(default=None, ge=1, le=64)  # answered at once; unset/auto: the engine's
    lora: str = ""  # a PEFT LoRA adapter folder merged into a 16-bit ChatGLM3 model at load; empty: none
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str = "chatglm3-6b-32k"
    openai_api_key: SecretStr | None = None
    openai_timeout: float = Field(default=120.0, gt=0)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    max_new_tokens: int = Field(default=1024, ge=1, le=32768)
    system_prompt: str = Field(
        default=DEFAULT_SYSTEM_PROMPT, min_length=1, max_length=MAX_SYSTEM_PROMPT_CHARS
    )

    # -- tools and the request queue ----------------------------------------------------
    tools: CommaList = Field(default_factory=lambda: ["calculate"])
    tool_rounds: int = Field(default=4, ge=0, le=16)
    searxng_url: str = ""  # the `search` tool's SearxNG; empty: no search tool
    timezone: str = "UTC"  # the `time` tool's zone when the model names none (IANA name)
    fetch_ports: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [80, 443])
    fetch_allow: CommaList = Field(default_factory=list)  # tests only: networks fetch may reach anyway
    request_timeout: float = Field(default=300.0, gt=0)
    queue_max: int = Field(default=200, ge=1)
    queue_per_conversation: int = Field(default=5, ge=1)
    #: seconds a process's claim on its requests holds unless renewed (PostgreSQL, several
    #: processes): a process that dies leaves its requests to the others after this long
    claim_lease: float = Field(default=30.0, ge=1)

    # -- access ------------------------------------------------------------------------
    allowed_users: CommaList = Field(default_factory=list)  # "telegram:123", "discord:456"; empty = all
    admins: CommaList = Field(default_factory=list)
    rate_limit_per_minute: int = Field(default=20, ge=0)  # 0: no limit
    #: Yanray's own texts: "auto" follows /lang, then the platform's hint; "en"/"zh" for everyone
    language: Literal["auto", "en", "zh"] = "auto"

    # -- telegram ----------------------------------------------------------------------
    telegram_token: SecretStr | None = None
    telegram_base_url: str = "https://api.telegram.org/bot"
    telegram_webhook_url: str = ""
    telegram_webhook_listen: str = "127.0.0.1"
    telegram_webhook_port: int = Field(default=8443, ge=1, le=65535)
    telegram_webhook_secret: SecretStr | None = None
    telegram_group_mode: Literal["per_user", "shared"] = "per_user"
    telegram_edit_interval: float = Field(default=1.5, ge=0.0)

    # -- discord -----------------------------------------------------------------------
    discord_token: SecretStr | None = None
    discord_message_content: bool = False
    discord_api_base: str = "https://discord.com/api/v10"
    discord_gateway_url: str = "wss://gateway.discord.gg/"
    discord_channel_mode: Literal["per_user", "shared"] = "per_user"
    discord_guild_id: int | None = None
    discord_edit_interval: float = Field(default=1.0, ge=0.0)
    discord_allowed_guilds: CommaList = Field(default_factory=list)
    discord_allowed_channels: CommaList = Field(default_factory=list)
    discord_allowed_roles: CommaList = Field(default_factory=list)

    @field_validator(
        "tools",
        "fetch_ports",
        "fetch_allow",
        "allowed_users",
        "admins",
        "discord_allowed_guilds",
        "discord_allowed_channels",
        "discord_allowed_roles",
        mode="before",
    )
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("kv_cache_gb", "max_batch", mode="before")
    @classmethod
    def _auto_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in ("", "auto") else value

    @field_validator(
        "openai_api_key",
        "telegram_token",
        "telegram_webhook_secret",
        "discord_token",
        "discord_guild_id",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `YANRAY_DISCORD_TOKEN=` left empty in an env file means "none", not an empty token
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("telegram_base_url", "openai_base_url", "discord_api_base", "telegram_webhook_url")
    @classmethod
    def _http_url(cls, value: str, info: ValidationInfo) -> str:
        if value or info.field_name != "telegram_webhook_url":  # the webhook URL may be empty
            _check_url(value, ("http", "https"))
        return value

    @field_validator("searxng_url")
    @classmethod
    def _searxng_url(cls, value: str) -> str:
        if value:
            _check_url(value, ("http", "https"))
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from yanray.bot.tools.clock import ZoneError, zone

        try:
            zone(value)
        except ZoneError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("http_listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        value = value.strip()
        if value:
            listen_address(value)
        return value

    @field_validator("discord_gateway_url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        _check_url(value, ("ws", "wss"))
        return value

    @field_validator("allowed_users", "admins")
    @classmethod
    def _platform_ids(cls, value: list[str]) -> list[str]:
        for item in value:
            platform, _, ident = item.partition(":")
            if not platform.isalpha() or not ident:
                raise ValueError(f"{item!r} is not platform:id, e.g. telegram:123456 or discord:987654")
        return value

    @field_validator("tools")
    @classmethod
    def _known_tools(cls, value: list[str]) -> list[str]:
        from yanray.bot.tools import TOOL_NAMES  # the registry lives with the tools

        unknown = [name for name in value if name not in TOOL_NAMES]
        if unknown:
            raise ValueError(f"unknown tool {unknown[0]!r}; known: {', '.join(sorted(TOOL_NAMES))}")
        return value

    @field_validator("fetch_ports")
    @classmethod
    def _ports(cls, value: list[int]) -> list[int]:
        bad = [port for port in value if not 1 <= port <= 65535]
        if bad or not value:
            raise ValueError(
                f"{bad[0] if bad else 'an empty list'} is not a list of ports 1-65535, e.g. 80,443"
            )
        return value

    @field_validator("fetch_allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an address or network, e.g. 127.0.0.1 or 10.0.0.0/8"
                ) from None
        return value

    @model_validator(mode="after")
    def _context_has_room(self) -> Settings:
        # the rest (the prompt's own tokens) is checked against the model once it is loaded
        if self.max_context and self.max_context <= self.max_new_tokens:
            raise ValueError(
                f"YANRAY_MAX_CONTEXT={self.max_context} leaves no room for a question once "
                f"YANRAY_MAX_NEW_TOKENS={self.max_new_tokens} is reserved for the reply; raise "
                "YANRAY_MAX_CONTEXT (0 is the model's own) or lower YANRAY_MAX_NEW_TOKENS"
            )
        return self

    @model_validator(mode="after")
    def _lora_needs_the_local_engine(self) -> Settings:
        # merged only by the local engine; elsewhere it would be silently ignored
        if self.lora and self.engine != "local":
            raise ValueError(
                "YANRAY_LORA is merged by the local engine; with YANRAY_ENGINE=openai, serve the adapter there"
            )
        return self

    @model_validator(mode="after")
    def _webhook_needs_a_secret(self) -> Settings:
        # without the secret anyone who reaches the webhook could post forged updates
        if self.telegram_webhook_url and self.telegram_webhook_secret is None:
            raise ValueError(
                "YANRAY_TELEGRAM_WEBHOOK_URL needs YANRAY_TELEGRAM_WEBHOOK_SECRET (a random string, "
                "e.g. from `openssl rand -hex 32`), so forged updates are refused"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = _TOML_PATH.get()
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    def default_prompt(self, language: str) -> str:
        """The instructions of a conversation without its own: `YANRAY_SYSTEM_PROMPT` when the
        operator set it, else the built-in persona in `language`."""
        if "system_prompt" in self.model_fields_set:
            return self.system_prompt
        return translator(language).gettext(DEFAULT_SYSTEM_PROMPT)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'yanray.db').resolve()}"

    @property
    def http_address(self) -> tuple[str, int] | None:
        """(host, port) of the HTTP listener, or None when YANRAY_HTTP_LISTEN is empty."""
        return listen_address(self.http_listen) if self.http_listen else None

    def secret(self, name: str) -> str | None:
        value = getattr(self, name)
        return value.get_secret_value() if value is not None else None

    def secret_values(self) -> list[str]:
        """Every secret set: the tokens, the API key, and the database URL's password (for the
        log to mask)."""
        values = [value for name in sorted(SECRET_FIELDS) if (value := self.secret(name))]
        try:
            password = urlsplit(self.resolved_database_url).password
        except ValueError:  # not a URL Yanray can use: Database.open says so
            password = None
        if password:
            values += [password, unquote(password)]  # as written, and as the driver has it
        return values


def listen_address(value: str) -> tuple[str, int]:
    """ "host:port" ("[::1]:8089" for IPv6; port 0: any free one) as (host, port)."""
    host, colon, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port, e.g. 127.0.0.1:8089 or 0.0.0.0:8089 (empty: off)")
    return host, int(port)


def _check_toml(path: Path) -> None:
    import tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    for key in data:
        if key.lower() in SECRET_FIELDS:
            env = ENV_PREFIX + key.upper()
            raise ConfigError(f"config file {path}: {key} is a secret; set {env} in the environment instead")


def _describe(error: Mapping[str, Any], toml: Path | None, environ: Mapping[str, str]) -> str:
    if not error["loc"]:  # a rule across settings: its message names them
        return str(error["msg"]).removeprefix("Value error, ")
    field = str(error["loc"][0])
    env = ENV_PREFIX + field.upper()
    where = env if env in environ or toml is None else f"{env} (or {field} in {toml})"
    value = error.get("input")
    if field in SECRET_FIELDS:
        value = "<secret>"
    shown = repr(value)
    if len(shown) > MAX_SHOWN_VALUE:
        shown = f"{shown[: MAX_SHOWN_VALUE - 1]}…"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{field} in {toml}: not a Yanray setting"
    return f"{where}={shown}: {message}"


def load_settings(config: Path | None = None) -> Settings:
    """Build the settings from `config` (or `$YANRAY_CONFIG`, or `./yanray.toml` if present).

    Raises `ConfigError` with one line for the first bad setting.
    """
    environ = os.environ
    if config is None and environ.get("YANRAY_CONFIG"):
        config = Path(environ["YANRAY_CONFIG"])
    elif config is None and Path("yanray.toml").is_file():
        config = Path("yanray.toml")
    if config is not None:
        if not config.is_file():
            raise ConfigError(f"config file {config}: no such file")
        _check_toml(config)

    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {"YANRAY_CONFIG"}
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            logger.warning("%s is not a Yanray setting (a typo?); it is ignored", name)

    token = _TOML_PATH.set(config)
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], config, environ)) from None
    finally:
        _TOML_PATH.reset(token)
