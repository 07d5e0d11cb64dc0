"""Schemathesis over the whole OpenAPI spec against a live server (tiny model,
multi-tenant): whatever it generates, in every phase it runs (explicit examples, boundary
coverage, random fuzzing, stateful sequences where the spec links operations), the server
answers with no 5xx. Tenant routes are driven with a tenant's key, `/v1/admin` with the
admin key. The CLI is used as shipped (`st run`), in a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_api import live_multi_tenant

ADMIN_KEY = "schemathesis-admin-key-0123456789"
EXAMPLES = 15  # per operation and phase: enough to hit every field's bounds, quick on 2 CPUs
ST = shutil.which("st", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # Jobs are queued but not run: the fuzzer exercises the upload checks, not training.
    with live_multi_tenant(tmp_path_factory.mktemp("fuzz"), ADMIN_KEY, "fuzz") as (_, url, key):
        yield url, key


@pytest.mark.skipif(ST is None, reason="schemathesis is not installed (pip install -e .[dev])")
@pytest.mark.parametrize("routes", ["tenant", "admin"])
def test_no_server_errors(live, routes, tmp_path):
    url, tenant_key = live
    key, select = (ADMIN_KEY, "--include-path-regex") if routes == "admin" else (tenant_key, "--exclude-path-regex")
    command = [
        ST, "run", f"{url}/openapi.json",
        select, "^/v1/admin",
        "--checks", "not_a_server_error",
        "--header", f"Authorization: Bearer {key}",
        "--max-examples", str(EXAMPLES),
        "--seed", "1",
        "--request-timeout", "60",
        "--report-dir", str(tmp_path),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or "passed" in run.stdout, run.stdout[-3000:]
