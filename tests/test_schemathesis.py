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

from adapter_store.store import SQLiteAdapterStore
from server.app import create_app
from server.tenancy import SQLiteTenantRegistry
from tests.conftest import serve_in_thread, tiny_llama
from tests.test_api import api_settings, chat_tokenizer

ADMIN_KEY = "schemathesis-admin-key-0123456789"
EXAMPLES = 15  # per operation and phase: enough to hit every field's bounds, quick on 2 CPUs
ST = shutil.which("st", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    store = SQLiteAdapterStore(folder / "adapters.db")
    registry = SQLiteTenantRegistry(folder / "tenants.db")
    registry.create_tenant("fuzz")
    _, key = registry.create_key("fuzz")
    # Jobs are queued but not run: the fuzzer exercises the upload checks, not training.
    settings = api_settings(
        admin_key=ADMIN_KEY,
        store_url=f"sqlite:///{folder / 'adapters.db'}",
        jobs_url=f"sqlite:///{folder / 'jobs.db'}",
        embedded_worker=False,
    )
    app = create_app(settings, model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store, tenants=registry)
    with serve_in_thread(app) as url:
        yield url, key
    registry.close()
    store.close()


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
