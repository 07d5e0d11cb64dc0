"""The README's examples run verbatim against a live server (tiny model): the `curl`,
`vbctl` and `openai`/client blocks of "Usage" on a single-tenant server, the admin `curl`
block of "Tenants and API keys" on a multi-tenant one. The only change made to them is the
server's address (`http://127.0.0.1:8000` becomes the test server's)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import serve_in_thread, tiny_llama
from tests.test_api import api_settings, chat_tokenizer
from tests.test_api import peft_dir as peft_dir  # the module-scoped fixture
from vbserve.app import create_app
from vbserve.tenancy import SQLiteTenantRegistry
from vbserve_store.store import SQLiteAdapterStore

README = Path(__file__).parents[1] / "README.md"
ADDRESS = "http://127.0.0.1:8000"
ADMIN_KEY = "readme-admin-key-0123456789abcdef"


def readme_blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of each ```sh / ```python block under the `## section` heading."""
    text = README.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(sh|python)\n(.*?)```", body, flags=re.S)


def run_block(language: str, code: str, url: str, cwd: Path) -> str:
    code = code.replace(ADDRESS, url)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # vbctl of this venv
        "VBCTL_URL": url,  # vbctl's documented default address is the README's
        "VBSERVE_ADMIN_KEY": ADMIN_KEY,
    }
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "sh" else [sys.executable, "-c", code]
    run = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{language} block failed:\n{code}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
    # curl -s exits 0 on an HTTP error too: no JSON it printed may be an error body.
    for value in json_objects(run.stdout):
        assert "error" not in value, value
    return run.stdout


def json_objects(text: str) -> list[dict]:
    """The JSON objects in `text`, in order (curl prints them with no newline after)."""
    decoder, found, at = json.JSONDecoder(), [], text.find("{")
    while at != -1:
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            end = at + 1
        else:
            found.append(value)
        at = text.find("{", end)
    return found


@pytest.fixture
def workdir(tmp_path, peft_dir):
    """A working directory holding the README's `./my-peft-checkpoint`."""
    (tmp_path / "my-peft-checkpoint").mkdir()
    for file in peft_dir.iterdir():
        (tmp_path / "my-peft-checkpoint" / file.name).write_bytes(file.read_bytes())
    return tmp_path


def test_usage_examples(workdir):
    store = SQLiteAdapterStore(workdir / "adapters.db")
    app = create_app(api_settings(), model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store)
    blocks = readme_blocks("Usage")
    assert [language for language, _ in blocks] == ["sh", "python"]
    with serve_in_thread(app) as url:
        outputs = [run_block(language, code, url, workdir) for language, code in blocks]
    store.close()
    chat, *_, generated = json_objects(outputs[0])
    assert chat["object"] == "chat.completion"
    assert generated["generated_text"]  # LoRAX /generate with the adapter


def test_tenant_examples(workdir):
    store = SQLiteAdapterStore(workdir / "adapters.db")
    registry = SQLiteTenantRegistry(workdir / "tenants.db")
    settings = api_settings(admin_key=ADMIN_KEY)
    app = create_app(settings, model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store, tenants=registry)
    (language, code), *rest = readme_blocks("Tenants and API keys")
    assert language == "sh" and not rest
    with serve_in_thread(app) as url:
        tenant, key = json_objects(run_block(language, code, url, workdir))
    assert tenant["name"] == "acme" and tenant["limits"]["max_adapters"] == 100
    assert registry.authenticate(key["key"]).name == "acme"
    registry.close()
    store.close()
