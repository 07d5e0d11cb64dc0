"""The client distribution installs alone. A fresh virtualenv gets `pip install clients/`
and nothing else (its dependencies come from the package registry, through pip's cache);
there `import torch` fails, `vbctl --help` runs, and the README's client example runs
against a real `vbserve serve` process on the tiny model (the server runs on this venv)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.test_api import peft_dir as peft_dir  # the module-scoped fixture
from tests.test_readme import ADDRESS, readme_blocks
from tests.test_readme import workdir as workdir  # holds the README's ./my-peft-checkpoint
from tests.test_replicas import model_dir as model_dir  # the tiny model, saved for a server process
from tests.test_replicas import replica, wait_ready

REPO = Path(__file__).resolve().parents[1]
PIP_TIMEOUT_S = 300  # 7 s with a warm pip cache; a cold one downloads about 1 MB
# The fresh venv sees neither this repository nor the test run's venv.
ALONE = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def pip(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(command, env=ALONE, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)


def install_client_alone(venv: Path, scratch: Path) -> Path:
    """A new virtualenv at `venv` with only the client distribution installed; its bin/.
    This run's pip installs into it (`--python`), so the venv needs no pip of its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=ALONE)
    # setuptools builds a local project in its folder (build/): build a copy, not the checkout.
    source = shutil.copytree(
        REPO / "clients", scratch / "clients", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    installed = pip("--python", str(venv / "bin" / "python"), "install", str(source))
    if installed.returncode != 0:
        # Tell "no registry" from a broken distribution: the probe bypasses the cache.
        probe = pip("download", "--no-deps", "--no-cache-dir", "--dest", str(scratch / "probe"), "httpx")
        if probe.returncode != 0:
            pytest.skip(f"pip cannot reach a package registry:\n{probe.stderr[-2000:]}")
        pytest.fail(f"pip install clients/ failed:\n{installed.stdout[-3000:]}\n{installed.stderr[-3000:]}")
    return venv / "bin"


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=ALONE, capture_output=True, text=True, timeout=120)


def readme_client_example() -> str:
    """The part of the README's Usage example that uses our client: from its import to the
    next client's import."""
    [python] = [code for language, code in readme_blocks("Usage") if language == "python"]
    return re.search(r"^from vbserve_client import .*?(?=^from |\Z)", python, flags=re.S | re.M).group()


def test_the_client_installs_alone_and_runs_the_readme_example(model_dir, workdir, tmp_path) -> None:
    store_url = f"sqlite:///{tmp_path / 'adapters.db'}"
    with replica(model_dir, store_url, "client-install", tmp_path / "server.log") as server:
        bin_dir = install_client_alone(tmp_path / "venv", tmp_path / "install")  # while the server loads
        python, vbctl = str(bin_dir / "python"), str(bin_dir / "vbctl")

        for absent in ("torch", "vbserve", "vbserve_store"):
            imported = run([python, "-c", f"import {absent}"], cwd=workdir)
            assert imported.returncode != 0 and "ModuleNotFoundError" in imported.stderr, absent
        helped = run([vbctl, "--help"], cwd=workdir)
        assert helped.returncode == 0 and helped.stdout.startswith("usage: vbctl"), helped.stderr

        wait_ready(server)
        example = run([python, "-c", readme_client_example().replace(ADDRESS, server.url)], cwd=workdir)
        assert example.returncode == 0, example.stderr
        pushed = httpx.get(f"{server.url}/v1/adapters/support", timeout=10)
        assert pushed.status_code == 200 and pushed.json()["version"] == 1  # the example's push
        listing = run([vbctl, "--url", server.url, "adapters", "ls"], cwd=workdir)
        assert listing.returncode == 0 and "support" in listing.stdout, listing.stderr
