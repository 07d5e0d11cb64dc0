"""The web console (`/ui`) in a real headless Chromium (the system's, driven by Playwright)
against a real `vbserve serve` process on the tiny model with an admin key and the
embedded training worker: a tenant signs in, uploads an adapter (a blob, then a PEFT
checkpoint's files) and sees it listed, starts a short job and watches its loss chart gain
points until it succeeds, cancels one, sees a failed one's error, runs the playground on
the base model and the adapters at once; the operator creates and revokes a key, after
which the tenant's console refuses it. A single-tenant server opens without a key. Markup in an API value shows as text. Every page is
screenshotted at a phone width and a wide one into docs/screenshots (linked from the
README), and no page scrolls sideways on the phone.

The console's own API additions (residency, active jobs, the headers on /ui) are checked
with plain HTTP in the same server, so they run even where no Chromium is installed."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import serve_in_thread, tiny_llama
from tests.test_api import api_settings, chat_tokenizer, random_adapter
from tests.test_api import peft_dir as peft_dir  # the module-scoped fixture: a PEFT checkpoint folder
from tests.test_replicas import REPO, replica, wait_ready
from tests.test_training import TASK_FILE, jsonl, task_model
from vbserve.app import create_app
from vbserve_store import encode_adapter
from vbserve_store.store import SQLiteAdapterStore

ADMIN_KEY = "admin-key-for-the-console-tests-0123456789"
CHROMIUM = os.environ.get("VBSERVE_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = REPO / "docs" / "screenshots"
PHONE, WIDE = {"width": 390, "height": 844}, {"width": 1440, "height": 900}
MARKUP = "<img src=x onerror=window.__pwned=1>"
ADAPTER = "support"
BASE = "tiny-llama"
# Every step is an epoch (4 rows, batch 4) and validation runs each epoch, so each step
# reports an event with both losses: the chart gains points as the job runs. Measured on a
# shared 2-core machine: about 120 steps/s at load 5, 21 at load 11, so 600 steps span
# several of the event stream's half-second reads even when the machine is idle.
JOB_STEPS = "600"
TINY_JOB = {"max_steps": JOB_STEPS, "vector_length": "16", "num_vectors": "32", "max_seq_len": "32"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(URL, the key of tenant acme) of a live multi-tenant server."""
    path = tmp_path_factory.mktemp("console")
    task_model().save_pretrained(path / "model")
    chat_tokenizer().save_pretrained(path / "model")
    settings = {"VBSERVE_TRAINING_ENABLED": "true", "VBSERVE_ADMIN_KEY": ADMIN_KEY, "VBSERVE_SERVED_MODEL_NAME": BASE}
    with replica(path / "model", f"sqlite:///{path / 'adapters.db'}", "vbs", path / "server.log", settings) as proc:
        wait_ready(proc)
        with httpx.Client(base_url=proc.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            for name in ("acme", "globex"):
                admin.post("/v1/admin/tenants", json={"name": name}).raise_for_status()
            key = admin.post("/v1/admin/tenants/acme/keys", json={}).json()["key"]
        yield proc.url, key


@pytest.fixture(scope="module")
def blob_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("blob") / "support.safetensors"
    path.write_bytes(encode_adapter(random_adapter(task_model(), seed=1)))
    return path


# -- the API the console uses, over plain HTTP ---------------------------------------------


def test_ui_is_served_with_a_strict_policy_and_no_cached_html(server) -> None:
    url, _ = server
    assert httpx.get(f"{url}/ui").headers["location"].endswith("/ui/")
    page = httpx.get(f"{url}/ui/")
    assert page.status_code == 200 and 'src="app.js"' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"
    script = httpx.get(f"{url}/ui/app.js")
    assert (
        script.headers["content-type"].startswith("text/javascript") and script.headers["cache-control"] == "no-cache"
    )
    assert httpx.get(f"{url}/ui/vendor/uPlot.LICENSE").status_code == 200
    assert httpx.get(f"{url}/ui/../server/vbserve/app.py").status_code == 404


def test_resident_adapters_are_the_callers_own(server, blob_file: Path) -> None:
    url, key = server
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=60) as acme:
        r = acme.put(
            "/v1/adapters/resident-check",
            content=blob_file.read_bytes(),
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code == 201, r.text
        assert "resident-check" not in [a["name"] for a in acme.get("/v1/engine/adapters").json()["data"]]
        r = acme.post("/v1/completions", json={"model": "resident-check", "prompt": "key0:", "max_tokens": 2})
        assert r.status_code == 200, r.text
        resident = {a["name"]: a for a in acme.get("/v1/engine/adapters").json()["data"]}
        assert resident["resident-check"]["version"] == 1
        acme.delete("/v1/adapters/resident-check").raise_for_status()
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        other = admin.post("/v1/admin/tenants/globex/keys", json={}).json()["key"]
        assert admin.get("/v1/admin/tenants/acme").json()["active_jobs"] == 0
    r = httpx.get(f"{url}/v1/engine/adapters", headers={"authorization": f"Bearer {other}"})
    assert r.status_code == 200 and r.json()["data"] == []  # acme's adapter is not globex's business
    assert httpx.get(f"{url}/v1/engine/adapters").status_code == 401


# -- in the browser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no system Chromium (apt-get install chromium; or set VBSERVE_TEST_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport=WIDE)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" and "401" not in msg.text else None)
    page.set_default_timeout(30_000)
    yield page
    context.close()
    # A CSP violation or a script error shows up here: the console must run clean.
    assert not [e for e in errors if "Failed to load resource" not in e], errors


def sign_in(page, url: str, key: str) -> None:
    page.goto(f"{url}/ui/")
    page.fill("input[name=key]", key)
    page.click("button[type=submit]")


def shoot(page, name: str) -> None:
    """Screenshots at both widths; at the phone's, nothing may stick out sideways."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(150)  # the chart follows its container's width
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{name} scrolls sideways by {overflow} px at {PHONE['width']} px"
    page.screenshot(path=SCREENSHOTS / f"{name}-phone.png", full_page=True)
    page.set_viewport_size(WIDE)
    page.wait_for_timeout(150)
    page.screenshot(path=SCREENSHOTS / f"{name}-wide.png", full_page=True)


def start_job(page, adapter: str, training: Path, validation: Path | None = None, steps: str = JOB_STEPS) -> None:
    """Fill the job form with a small bank for the tiny model, and submit it."""
    page.click("nav a:text('Fine-tuning')")
    page.wait_for_selector("h2:text('New job')")
    page.fill("input[name=adapter]", adapter)
    page.set_input_files("input[name=training_file]", str(training))
    if validation is not None:
        page.set_input_files("input[name=validation_file]", str(validation))
    for name, value in {**TINY_JOB, "max_steps": steps}.items():
        page.fill(f"input[name={name}]", value)
    page.click("button:text('Start job')")


def test_tenant_uploads_trains_and_compares(page, server, blob_file: Path, peft_dir: Path, tmp_path: Path) -> None:
    url, key = server
    page.goto(f"{url}/ui/")
    shoot(page, "signin")
    sign_in(page, url, key)

    # Adapters: upload one, see it listed
    page.wait_for_selector("h1:text('Adapters')")
    page.fill("input[name=name]", ADAPTER)
    page.set_input_files("input[name=files]", str(blob_file))
    page.click("form button[type=submit]")
    row = page.locator("tr", has=page.locator(f"td .name:text-is('{ADAPTER}')"))
    row.wait_for()
    assert row.locator("td").nth(1).inner_text() == "1"  # version
    assert row.locator("td").nth(6).inner_text() == "no"  # not resident before any request
    page.fill("input[name=name]", "from-peft")  # a PEFT checkpoint: its folder's two files
    page.set_input_files(
        "input[name=files]", [str(peft_dir / "adapter_config.json"), str(peft_dir / "adapter_model.safetensors")]
    )
    page.click("form button[type=submit]")
    page.locator("td .name:text-is('from-peft')").wait_for()
    with page.expect_download() as native:
        row.locator("button:text('native')").click()
    assert native.value.suggested_filename == f"{ADAPTER}.safetensors"
    assert Path(native.value.path()).read_bytes() == blob_file.read_bytes()  # the canonical blob, round trip
    with page.expect_download() as peft:
        row.locator("button:text('peft')").click()
    assert peft.value.suggested_filename == f"{ADAPTER}-peft.zip"

    # Fine-tuning: start a short job with validation, watch its chart grow until it succeeds
    train = tmp_path / "train.jsonl"
    train.write_bytes(TASK_FILE)
    start_job(page, "console-ft", train, validation=train)
    page.wait_for_selector(".job-head h1 code")
    seen = []  # chart points, sampled while the job runs
    deadline = time.monotonic() + 180
    while (status := page.inner_text(".job-head .badge")) != "succeeded":
        assert status in ("queued", "running"), page.inner_text("main")
        assert time.monotonic() < deadline, "the job did not finish"
        seen.append(int(page.get_attribute(".chart", "data-points")))
        page.wait_for_timeout(100)
    final = int(page.get_attribute(".chart", "data-points"))
    growth = sorted({n for n in seen if n > 0})
    assert len(growth) >= 2 and final > growth[0], f"the chart did not grow while the job ran: {growth} -> {final}"
    assert final == int(JOB_STEPS)
    assert page.locator(".chart canvas").count() == 1
    legend = page.inner_text(".chart .u-legend")
    assert "train_loss" in legend and "valid_loss" in legend
    assert page.inner_text("dd >> nth=2") == f"{JOB_STEPS} / {JOB_STEPS}"
    shoot(page, "job")

    # A job cancelled while it runs; behind it, one that fails at publishing (the tenant's
    # quota was lowered while it waited) and shows the API's error
    start_job(page, "console-cancelled", train, steps="100000")
    page.locator(".chart[data-points='0']").wait_for(state="detached")  # it reported a step
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        failing = httpx.post(
            f"{url}/v1/fine_tuning/jobs",
            headers={"authorization": f"Bearer {key}"},
            files={"training_file": ("train.jsonl", TASK_FILE)},
            data={"adapter": "console-over-quota", **TINY_JOB, "max_steps": "2"},
        )
        assert failing.status_code == 201, failing.text
        stored = admin.get("/v1/admin/tenants/acme").json()["adapters"]
        admin.put("/v1/admin/tenants/acme/limits", json={"max_adapters": stored}).raise_for_status()
        page.click("button:text('Cancel job')")
        page.locator(".job-head .badge:text-is('cancelled')").wait_for()
        assert page.locator("button:text('Cancel job')").count() == 0
        page.goto(f"{url}/ui/#/jobs/{failing.json()['id']}")
        page.locator(".job-head .badge:text-is('failed')").wait_for()
        admin.put("/v1/admin/tenants/acme/limits", json={}).raise_for_status()
    assert page.inner_text("#job-error").startswith("quota: ")

    # A refused job: the API's error, markup included, is shown as text
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl([{"messages": [{"role": "user", "content": "x"}, {"role": MARKUP, "content": "y"}]}]))
    start_job(page, "console-bad", bad)
    error = page.locator(".notice.error")
    error.wait_for()
    assert error.inner_text().startswith("training_file line 1.messages[1].role: ")
    assert MARKUP in error.inner_text()
    assert page.locator("main img").count() == 0 and page.evaluate("window.__pwned") is None
    shoot(page, "jobs")

    # Playground: the base model and the adapter stream side by side
    page.click("nav a:text('Playground')")
    page.wait_for_selector("h1:text('Playground')")
    page.select_option("select[name=mode]", "completion")
    page.fill("textarea[name=prompt]", "key0:")
    page.fill("input[name=temperature]", "0")
    page.fill("input[name=max_tokens]", "12")
    page.check(f"input[name=target][value={ADAPTER}]")  # the first three are checked already
    page.click("button:text('Run')")
    panes = page.locator(".pane")
    # (wait_for_function would evaluate a string in the page, which the console's CSP forbids)
    page.locator(".pane[data-done]").nth(3).wait_for()
    models = [BASE, "console-ft", "from-peft", ADAPTER]
    assert [panes.nth(i).get_attribute("data-model") for i in range(4)] == models
    outputs = [panes.nth(i).locator("pre.output").inner_text() for i in range(4)]
    assert all(outputs) and outputs[0] != outputs[1], outputs  # greedy: the trained adapter changes the answer
    for i in range(4):
        assert "12 tokens" in panes.nth(i).locator(".timing").inner_text()
    shoot(page, "playground")

    # The adapters the playground used are now resident in the engine
    page.click("nav a:text('Adapters')")
    row.wait_for()
    assert row.locator("td").nth(6).inner_text() in ("composed", "in a slot")
    shoot(page, "adapters")

    # Delete takes a second click
    from_peft = page.locator("tr", has=page.locator("td .name:text-is('from-peft')"))
    stored = httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"})
    from_peft.locator("button:text('Delete')").click()
    from_peft.locator("button:text('Delete from-peft?')").wait_for()  # armed, not sent
    assert stored.get("/v1/adapters/from-peft").status_code == 200
    from_peft.locator("button:text('Delete from-peft?')").click()
    from_peft.wait_for(state="detached")
    assert stored.get("/v1/adapters/from-peft").status_code == 404
    stored.close()
    assert page.locator("td .name:text-is('support')").count() == 1


def test_operator_revokes_a_key_and_the_tenants_console_refuses_it(browser, page, server, blob_file: Path) -> None:
    url, _ = server
    sign_in(page, url, ADMIN_KEY)
    page.wait_for_selector("h1:text('Operator')")
    globex = page.locator("tr", has=page.locator("td .name:text-is('globex')"))
    globex.locator("summary:text('Keys')").click()
    globex.locator("input[name=description]").fill(MARKUP)
    globex.locator("button:text('New key')").click()
    key = globex.locator(".new-key code").inner_text()
    assert key.startswith("vbs.")
    assert globex.locator(f"td:text-is('{MARKUP}')").count() == 1  # the description, as text
    assert page.locator("main img").count() == 0
    page.wait_for_selector("[data-metric='Adapter cache']")
    shoot(page, "operator")

    # The tenant's console, with one adapter more than its first page shows
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}) as globex_api:
        for i in range(101):
            globex_api.put(
                f"/v1/adapters/a{i:03d}",
                content=blob_file.read_bytes(),
                headers={"content-type": "application/octet-stream"},
            ).raise_for_status()
    tenant = browser.new_context(viewport=WIDE).new_page()
    sign_in(tenant, url, key)
    tenant.wait_for_selector("h2:text('Your adapters (100+)')")
    tenant.click("button:text('More')")
    tenant.wait_for_selector("h2:text('Your adapters (101)')")
    assert tenant.locator("td .name").all_inner_texts()[-1] == "a100"

    row = globex.locator("tr", has=page.locator(f"td:text-is('{MARKUP}')"))
    row.locator("button:text('Revoke')").click()
    row.locator("td:has-text('revoked')").wait_for()

    tenant.click("nav a:text('Playground')")  # the next request with the revoked key
    tenant.wait_for_selector("h1:text('Sign in')")
    assert "The server refused this key" in tenant.inner_text(".notice.error")
    assert tenant.evaluate("sessionStorage.getItem('vbserve.key')") is None
    tenant.context.close()


def test_a_single_tenant_server_opens_without_a_key(browser, tmp_path: Path) -> None:
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    app = create_app(api_settings(), model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store)
    try:
        with serve_in_thread(app) as url:
            page = browser.new_page(viewport=PHONE)
            page.goto(f"{url}/ui/")
            page.wait_for_selector("h1:text('Adapters')")
            assert "single-tenant" in page.inner_text("#who")
            assert page.locator("nav a").all_inner_texts() == ["Adapters", "Fine-tuning", "Playground"]
            page.close()
    finally:
        store.close()
