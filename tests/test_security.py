"""Security properties (issue #7) that tests/test_tenancy.py does not already show (it
covers isolation on every route, 401/403, hashed keys on both registry backends):

- keys and the admin key are compared with `hmac.compare_digest` only, and the stored
  hash depends on the pepper;
- no secret and no prompt in any log line, the uvicorn access log included, at DEBUG;
- CORS is off: no `Access-Control-Allow-Origin` on a preflight or a simple request;
- every route refuses a body over its limit with 413, whether it takes a body or not;
- no pickle anywhere: a scan of our sources for pickle and other code-executing loaders.
"""

from __future__ import annotations

import ast
import hmac
import inspect
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from tests.conftest import tiny_llama
from tests.test_api import api_settings, chat_tokenizer, error_of, live_multi_tenant, random_adapter
from vbserve.api import deps, routers
from vbserve.api.body_limits import MULTIPART_SLACK, BodyLimitedRoute, json_body_limit
from vbserve.app import create_app
from vbserve.tenancy import SQLiteTenantRegistry, keys, registry
from vbserve_store import encode_adapter
from vbserve_store.store import SQLiteAdapterStore

ADMIN_KEY = "security-admin-key-do-not-log-0123456789"
ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("server", "adapter_store", "clients", "benchmarks")


# -- keys: HMAC with a pepper, compared in constant time ----------------------------------------


def test_keys_are_compared_with_compare_digest_only(tmp_path, monkeypatch) -> None:
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    reg = SQLiteTenantRegistry(tmp_path / "tenants.db")
    reg.create_tenant("acme")
    _, key = reg.create_key("acme")
    assert reg.authenticate(key).name == "acme" and len(calls) == 1
    assert reg.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None and len(calls) == 2
    settings = api_settings(admin_key=ADMIN_KEY)
    assert deps.is_admin_key(ADMIN_KEY, settings) and len(calls) == 3
    assert not deps.is_admin_key(ADMIN_KEY[:-1], settings) and len(calls) == 4
    reg.close()
    # And the source agrees: the functions that compare secrets use compare_digest, and no
    # `==`/`!=` anywhere in the key and auth code has a key, secret, token or hash on a side.
    for fn in (keys.key_matches, keys.secret_matches):
        assert "hmac.compare_digest(" in inspect.getsource(fn)
    assert "secret_matches(" in inspect.getsource(deps.is_admin_key)
    assert "key_matches(" in inspect.getsource(registry.TenantRegistry._lookup)
    # the last name of each side: `record.key_hash` -> key_hash, `key.tenant` -> tenant
    secretish = re.compile(r"^(key|token|given|expected|api_key|admin_key)$|secret|hash|digest|pepper", re.I)
    for module in (keys, deps, registry):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                sides = [ast.unparse(n).rsplit(".", 1)[-1] for n in (node.left, *node.comparators)]
                # comparing with a constant (`scheme.lower() != "bearer"`) compares no secret
                if not any(isinstance(n, ast.Constant) for n in (node.left, *node.comparators)):
                    assert not any(secretish.search(s) for s in sides), (module.__name__, ast.unparse(node))


def test_stored_hash_depends_on_the_pepper_and_the_outage_cache_holds_no_key(tmp_path) -> None:
    plain = SQLiteTenantRegistry(tmp_path / "a.db")
    peppered = SQLiteTenantRegistry(tmp_path / "b.db", pepper=b"operator-secret")
    for reg in (plain, peppered):
        reg.create_tenant("acme")
    record, key = peppered.create_key("acme")
    assert record.key_hash != keys.hash_key(key, keys.DEFAULT_PEPPER)  # a leaked DB alone cannot test it
    assert peppered.authenticate(key) is not None
    remembered = repr(peppered._confirmed)
    assert key not in remembered and key.rsplit(".", 1)[1] not in remembered
    plain.close()
    peppered.close()


# -- no secrets or prompts in logs ------------------------------------------------------------


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("httpx", "httpcore")):  # the test's own client
            return
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.name}: {text}")


@contextmanager
def serve_with_logs(app) -> Iterator[tuple[str, Collect]]:
    """A real uvicorn server with its access log on and every logger at DEBUG, all
    collected (uvicorn's own logging config left out, so its loggers propagate)."""
    handler = Collect()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    # Earlier tests in this process (uvicorn servers, CLIs) may have reconfigured these
    # loggers; each gets the collector itself, so what reaches the root does not matter.
    own_loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "uvicorn.access", "vbserve.access")]
    saved = [(lg, lg.level, lg.propagate, lg.disabled) for lg in own_loggers]
    for lg in own_loggers:
        lg.setLevel(logging.DEBUG)
        lg.propagate, lg.disabled = False, False
        lg.addHandler(handler)
    disabled_below = logging.root.manager.disable
    logging.disable(logging.NOTSET)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="debug", access_log=True))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", handler
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        root.removeHandler(handler)
        root.setLevel(old_level)
        for lg, level, propagate, disabled in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled
        logging.disable(disabled_below)


PROMPT = "my-private-prompt-7f3a9c"
CHAT = "my-private-chat-message-b41e"


def test_no_secret_or_prompt_in_any_log(tmp_path) -> None:
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    reg = SQLiteTenantRegistry(tmp_path / "tenants.db")
    app = create_app(
        api_settings(admin_key=ADMIN_KEY, store_url=f"sqlite:///{tmp_path / 'adapters.db'}"),
        model=tiny_llama(seed=7),
        tokenizer=chat_tokenizer(),
        store=store,
        tenants=reg,
    )
    blob = encode_adapter(random_adapter(tiny_llama(seed=7), 1))
    with serve_with_logs(app) as (url, logs), httpx.Client(base_url=url, timeout=30) as c:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert c.post("/v1/admin/tenants", json={"name": "acme"}, headers=admin).status_code == 201
        key = c.post("/v1/admin/tenants/acme/keys", headers=admin).json()["key"]
        tenant = {"Authorization": f"Bearer {key}"}
        r = c.put("/v1/adapters/mine", content=blob, headers={**tenant, "content-type": "application/octet-stream"})
        assert r.status_code == 201
        assert (
            c.post(
                "/v1/completions", json={"model": "mine", "prompt": PROMPT, "max_tokens": 3}, headers=tenant
            ).status_code
            == 200
        )
        chat = {"messages": [{"role": "user", "content": CHAT}], "max_tokens": 3, "stream": True}
        assert c.post("/v1/chat/completions", json=chat, headers=tenant).status_code == 200
        assert (
            c.post(
                "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}, headers=tenant
            ).status_code
            == 200
        )
        # failures log too: a wrong key, the admin key on a tenant route, a bad body, a 404
        assert c.get("/v1/adapters", headers={"Authorization": f"Bearer {key}x"}).status_code == 401
        assert c.get("/v1/adapters", headers=admin).status_code == 403
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": "x"}, headers=tenant).status_code == 422
        assert (
            c.post(
                "/v1/completions", content=PROMPT.encode(), headers={**tenant, "content-type": "application/json"}
            ).status_code
            == 400
        )
        assert c.post("/v1/completions", json={"model": "nope", "prompt": PROMPT}, headers=tenant).status_code == 404
        assert c.get(f"/v1/adapters/{PROMPT}", headers=tenant).status_code == 404  # a path is logged, by design
        assert c.delete("/v1/admin/tenants/acme/keys/" + key.split(".")[1], headers=admin).status_code in (200, 204)
    store.close()
    reg.close()
    text = "\n".join(logs.lines)
    assert any(line.startswith("uvicorn.access") for line in logs.lines), "the access log was not captured"
    assert any(line.startswith("vbserve.access") for line in logs.lines)
    secret = key.rsplit(".", 1)[1]
    for needle in (key, secret, ADMIN_KEY, "Bearer", CHAT):
        assert needle not in text, needle
    # The prompt appears only where the client put it in the URL path, never from a body.
    assert [line for line in logs.lines if PROMPT in line and f"/v1/adapters/{PROMPT}" not in line] == []
    print(
        f"\n{len(logs.lines)} log lines checked ({sum(1 for x in logs.lines if x.startswith('uvicorn.access'))} uvicorn access lines)"
    )


# -- CORS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_and_client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("security")
    limits = {"max_request_bytes": 4096, "training_max_file_bytes": 32 << 10}
    with (
        live_multi_tenant(folder, ADMIN_KEY, "acme", **limits) as (app, url, key),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        yield app, app.state.services.settings, client, key


def test_cors_is_off_by_default(app_and_client) -> None:
    _, _, client, key = app_and_client
    origin = {"Origin": "https://evil.example"}
    preflight = client.options(
        "/v1/completions",
        headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"},
    )
    assert preflight.status_code in (400, 401, 404, 405)
    simple = client.get("/v1/models", headers={**origin, "Authorization": f"Bearer {key}"})
    assert simple.status_code == 200
    for r in (preflight, simple, client.get("/healthz", headers=origin)):
        assert not any(h.lower().startswith("access-control-") for h in r.headers), dict(r.headers)


# -- body limits on every route -------------------------------------------------------------------


def concrete(template: str) -> str:
    return re.sub(r"\{[a-z_]+\}", "x", template)


def declared_body_limits(settings) -> dict[tuple[str, str], int]:
    """(method, path template) -> the body limit its route declares, for every route of
    every router (each must be a `BodyLimitedRoute`)."""
    limits = {}
    for router in routers.ROUTERS:
        for route in router.routes:
            assert isinstance(route, BodyLimitedRoute), route
            for method in route.methods:
                limits[method, route.path] = route.body_limit(settings)
    return limits


def test_every_route_refuses_a_body_over_its_limit(app_and_client) -> None:
    """Enumerates the OpenAPI spec: every operation, with a body or not, gets one byte more
    than its route's limit (Content-Length declared) and answers 413 without reading it;
    the routes that take a body also get it chunked (no Content-Length). Only the three
    upload routes declare a limit above the JSON limit."""
    app, settings, client, key = app_and_client
    limits = declared_body_limits(settings)
    larger = {route: limit for route, limit in limits.items() if limit != json_body_limit(settings)}
    assert larger == {
        ("PUT", "/v1/adapters/{name}"): settings.max_adapter_bytes + MULTIPART_SLACK,
        ("POST", "/v1/fine_tuning/jobs"): 2 * settings.training_max_file_bytes + MULTIPART_SLACK,
        ("POST", "/v1/files"): settings.training_max_file_bytes + MULTIPART_SLACK,
    }
    checked, with_body = 0, 0
    for template, operations in app.openapi()["paths"].items():
        path = concrete(template)
        token = ADMIN_KEY if template.startswith("/v1/admin") else key
        for method, op in operations.items():
            limit = limits[method.upper(), template]
            headers = {"Authorization": f"Bearer {token}", "content-type": "application/octet-stream"}
            r = client.request(method, path, content=b"\0" * (limit + 1), headers=headers)
            assert r.status_code == 413, (method, template, r.status_code, r.text[:200])
            assert error_of(r)["type"] == "too_large" and error_of(r)["field"] == "body"
            checked += 1
            if "requestBody" in op:
                with_body += 1
                media = next(iter(op["requestBody"]["content"]))
                multipart = media.startswith("multipart/")
                headers["content-type"] = media + ("; boundary=xyz" if multipart else "")
                # A multipart body opens like a real file part, so a parser that stops at
                # malformed input early (400) still has to meet the limit.
                head = (
                    b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n' if multipart else b""
                )

                def chunks(n=limit + 1, step=16 << 10, head=head):
                    yield head
                    n -= len(head)
                    while n > 0:
                        yield b" " * min(step, n)
                        n -= step

                r = client.request(method, path, content=chunks(), headers=headers)
                assert r.status_code == 413, ("chunked", method, template, r.status_code, r.text[:200])
    assert checked >= 20 and with_body >= 8, (checked, with_body)
    print(f"\nbody limits: {checked} operations refused a body over their limit ({with_body} take a body)")


# -- no pickle, no code-executing loaders ---------------------------------------------------------


def unsafe_calls(source: str) -> list[str]:
    """What in `source` can execute code from data: pickle and friends, torch.load
    without weights_only=True, numpy loads with allow_pickle, eval/exec, yaml.load without
    a safe loader, remote code in transformers."""
    found = []
    tree = ast.parse(source)
    banned_modules = {
        "pickle",
        "cPickle",
        "_pickle",
        "dill",
        "cloudpickle",
        "joblib",
        "shelve",
        "marshal",
        "jsonpickle",
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in banned_modules]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in banned_modules:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            kw = {k.arg: k.value for k in node.keywords}

            def true(arg: str, kw: dict = kw) -> bool:
                return arg in kw and isinstance(kw[arg], ast.Constant) and kw[arg].value is True

            if name in ("eval", "exec", "builtins.eval", "builtins.exec", "compile", "__import__"):
                found.append(f"{name}(")
            elif name.endswith("torch.load") or (name == "load" and "weights_only" in kw):
                if not true("weights_only"):
                    found.append("torch.load( without weights_only=True")
            elif name.endswith(("jit.load", "read_pickle", "unsafe_load", "full_load")):
                found.append(f"{name}(")
            elif name.endswith(("np.load", "numpy.load")) and true("allow_pickle"):
                found.append(f"{name}(allow_pickle=True)")
            elif name.endswith("yaml.load"):
                loader = ast.unparse(kw["Loader"]) if "Loader" in kw else ""
                if not loader.endswith(("SafeLoader", "CSafeLoader")):
                    found.append("yaml.load( without SafeLoader")
            elif true("trust_remote_code"):
                found.append(f"{name}(trust_remote_code=True)")
    return found


def test_the_scanner_catches_what_it_looks_for() -> None:
    bad = """
import pickle
from dill import loads
import torch, yaml, numpy as np
torch.load(path)
torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
eval(data)
exec(data)
AutoModel.from_pretrained(x, trust_remote_code=True)
"""
    assert len(unsafe_calls(bad)) == 10, unsafe_calls(bad)
    good = "import torch, yaml\ntorch.load(p, weights_only=True)\nyaml.load(t, Loader=yaml.SafeLoader)\nyaml.safe_load(t)\n"
    assert unsafe_calls(good) == []


def test_no_pickle_or_code_loading_in_our_sources() -> None:
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 30
    problems = {str(p.relative_to(ROOT)): found for p in files if (found := unsafe_calls(p.read_text()))}
    assert problems == {}
    # the same for the text of every source (strings a scanner of calls could miss: a
    # `getattr(pickle, "loads")`, a `importlib.import_module("pickle")`)
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in files}
    assert [f for f, t in texts.items() if re.search(r"""import_module\(\s*["'](c?pickle|dill|marshal)""", t)] == []
