"""`/metrics` tells nobody which tenants and adapters exist (issue #12, finding 7): no
tenant or adapter name in any metric unless the operator opts in, and the scrape can
require the admin key."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from tests.conftest import tiny_llama
from tests.test_api import api, error_of, live_multi_tenant, random_adapter  # noqa: F401  (api: a fixture)
from vbserve.metrics import Metrics
from vbserve.settings import Settings
from vbserve_store import encode_adapter

ADMIN_KEY = "metrics-admin-key-0123456789abcdef"
TENANT = "alice"
ADAPTER = "secret1"


def scrapes_during_a_generation(url: str, key: str, **metrics_auth: str) -> list[str]:
    """The tenant stores ADAPTER, reads it and an unknown adapter by name, then streams a
    generation with it; /metrics is scraped after each of the first three streamed events
    (200 tokens take the tiny model 1.5 s: the adapter is still running) and once after
    the stream. Returns every scrape's text."""
    tenant = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, timeout=30) as client:
        blob = encode_adapter(random_adapter(tiny_llama(seed=7), 1))
        put = client.put(
            f"/v1/adapters/{ADAPTER}", content=blob, headers={**tenant, "content-type": "application/octet-stream"}
        )
        assert put.status_code == 201, put.text
        assert client.get(f"/v1/adapters/{ADAPTER}", headers=tenant).status_code == 200
        assert client.get(f"/v1/adapters/{ADAPTER}-missing", headers=tenant).status_code == 404
        scrapes = []
        body = {"prompt": "hello", "model": ADAPTER, "max_tokens": 200, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body, headers=tenant) as stream:
            assert stream.status_code == 200
            for _ in stream.iter_lines():
                if len(scrapes) < 3:
                    scrapes.append(client.get("/metrics", headers=metrics_auth).text)
        scrapes.append(client.get("/metrics", headers=metrics_auth).text)
    return scrapes


def test_an_anonymous_scrape_names_no_tenant_or_adapter(tmp_path) -> None:
    with live_multi_tenant(tmp_path, ADMIN_KEY, TENANT) as (_, url, key):
        scrapes = scrapes_during_a_generation(url, key)
    assert all(TENANT not in text and ADAPTER not in text for text in scrapes)
    # The shape stays vLLM's, without the names; how many adapters are in use still shows.
    running = [
        (s.labels, s.value)
        for text in scrapes
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name in ("vbserve_lora_requests_info", "vbserve_lora_adapters")
    ]
    assert ({"state": "running"}, 1.0) in running
    assert all(labels.get("running_lora_adapters", "") == "" for labels, _ in running)
    assert 'route="/v1/adapters/{name}"' in scrapes[-1]  # the route template, not the path


def test_adapter_names_appear_when_the_operator_opts_in(tmp_path) -> None:
    with live_multi_tenant(tmp_path, ADMIN_KEY, TENANT, metrics_adapter_names=True) as (_, url, key):
        scrapes = scrapes_during_a_generation(url, key)
    assert any(f'running_lora_adapters="{TENANT}/{ADAPTER}"' in text for text in scrapes)


def test_metrics_can_require_the_admin_key(tmp_path) -> None:
    with live_multi_tenant(tmp_path, ADMIN_KEY, TENANT, metrics_require_admin_key=True) as (_, url, key):
        with httpx.Client(base_url=url, timeout=30) as client:
            anonymous = client.get("/metrics")
            wrong = client.get("/metrics", headers={"Authorization": "Bearer not-a-key"})
            tenant = client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
        scrapes = scrapes_during_a_generation(url, key, Authorization=f"Bearer {ADMIN_KEY}")
    assert anonymous.status_code == 401 and error_of(anonymous)["field"] == "Authorization"
    assert wrong.status_code == 401 and error_of(wrong)["type"] == "unauthorized"
    assert tenant.status_code == 403 and error_of(tenant)["type"] == "forbidden"
    assert all(text.startswith("# HELP") for text in scrapes)  # the admin key scrapes


def test_requiring_the_admin_key_needs_one() -> None:
    with pytest.raises(ValidationError, match="VBSERVE_ADMIN_KEY"):
        Settings(metrics_require_admin_key=True, admin_key=None)


async def test_request_metrics_carry_templates_and_known_methods_only(api) -> None:  # noqa: F811
    # Paths and methods are the client's to choose: as labels they would name adapters,
    # and grow one series per made-up value.
    await api.get("/v1/adapters/private-adapter-name")
    await api.request("PRIVATEMETHOD", "/v1/adapters/private-adapter-name")
    await api.get("/no/such/private-route")
    text = (await api.get("/metrics")).text
    assert "private" not in text.lower()
    assert 'method="other",route="/v1/adapters/{name}"' in text
    assert 'route="unmatched"' in text


def test_lora_requests_info_lists_names_only_when_asked() -> None:
    step = {"running": 2, "waiting": 1, "running_adapters": ["acme/a", "acme/b"], "waiting_adapters": ["globex/c"]}

    def samples(metrics: Metrics) -> dict[str, list]:
        metrics.on_step(step)
        families = text_string_to_metric_families(metrics.render().decode())
        return {f.name: [(s.labels, s.value) for s in f.samples] for f in families}

    hidden = samples(Metrics(max_lora=4))
    assert [labels for labels, _ in hidden["vbserve_lora_requests_info"]] == [
        {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "4"}
    ]
    counts = {labels["state"]: value for labels, value in hidden["vbserve_lora_adapters"]}
    assert counts == {"running": 2, "waiting": 1}
    shown = samples(Metrics(max_lora=4, adapter_names=True))
    assert [labels for labels, _ in shown["vbserve_lora_requests_info"]] == [
        {"running_lora_adapters": "acme/a,acme/b", "waiting_lora_adapters": "globex/c", "max_lora": "4"}
    ]
