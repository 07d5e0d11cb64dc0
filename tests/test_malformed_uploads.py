"""Malformed uploads (issue #12, finding 8): JSON that Python's own parser chokes on, sent
to every place the server parses a client's JSON itself (not through FastAPI's body
parsing): a native blob's safetensors header and its packed adapter config, a PEFT
`adapter_config.json`, a training row, and the `hyperparameters` form field of a job.

Each payload class (nesting 30,000 deep, an integer of 5,000 digits, the non-JSON
constants NaN and Infinity, a float literal that overflows to infinity, and the config
inconsistencies a parser cannot see) must be a 400 naming the field, leave every
database byte for byte as it was, and leave the keep-alive connection serving: the next
request goes over the same socket.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import random_peft_vblora, tiny_llama
from tests.test_hostile import (
    BOUNDARY,
    GOOD,
    GOOD_BLOB,
    JOB_FIELDS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    ROW,
    multipart_body,
    snapshot,
    split_blob,
    sqlite_server,
)
from vbserve_store.codec import read_metadata
from vbserve_store.untrusted_json import MAX_DEPTH, load_untrusted_json

DEPTH = 30_000  # fits every entry point's size limit (the smallest is 64 KiB)
MARK = "@@PAYLOAD@@"

# Payload classes: raw JSON text put where the entry point expects a number.
PAYLOADS = {
    "nesting 30000 deep": "[" * DEPTH + "]" * DEPTH,
    "integer of 5000 digits": "1" * 5000,  # past Python's int-from-str limit (4300 digits)
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
    "1e999": "1e999",  # valid JSON, but float() makes it inf
}


def with_raw(doc: object, path: tuple, raw: str) -> str:
    """`doc` as JSON text with the value at `path` (keys and indices) replaced by `raw`,
    written as it is, so it can be what `json.dumps` would never write."""
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = MARK
    return json.dumps(doc).replace(json.dumps(MARK), raw)


# -- the four entry points, each taking the raw JSON text of what it parses --------------------


@dataclass(frozen=True)
class Upload:
    method: str
    path: str
    body: bytes
    content_type: str


def native_blob_header(raw_header: str) -> Upload:
    """GOOD's blob with its safetensors header replaced by `raw_header` (padded like safetensors)."""
    _, data = split_blob(GOOD_BLOB)
    raw = raw_header.encode()
    raw += b" " * (-len(raw) % 8)
    blob = struct.pack("<Q", len(raw)) + raw + data
    return Upload("PUT", "/v1/adapters/target", blob, "application/octet-stream")


def native_blob_config(raw_config: str) -> Upload:
    """GOOD's blob with its packed config replaced by `raw_config` (zlib + base64, as stored)."""
    header, _ = split_blob(GOOD_BLOB)
    packed = base64.b64encode(zlib.compress(raw_config.encode(), 9)).decode()
    header["__metadata__"]["config"] = packed
    return native_blob_header(json.dumps(header))


def peft_upload(raw_config: str, weights: bytes = PEFT_WEIGHTS) -> Upload:
    body = multipart_body(
        [
            ("adapter_config.json", "adapter_config.json", raw_config.encode()),
            ("adapter_model.safetensors", "adapter_model.safetensors", weights),
        ]
    )
    return Upload("PUT", "/v1/adapters/target", body, f"multipart/form-data; boundary={BOUNDARY}")


def job_upload(training: bytes = ROW * 2, hyperparameters: str | None = None) -> Upload:
    fields = dict(JOB_FIELDS)
    if hyperparameters is not None:
        fields["hyperparameters"] = hyperparameters
    form = [(k, None, v.encode()) for k, v in fields.items()]
    body = multipart_body([*form, ("training_file", "train.jsonl", training)])
    return Upload("POST", "/v1/fine_tuning/jobs", body, f"multipart/form-data; boundary={BOUNDARY}")


GOOD_HEADER, _ = split_blob(GOOD_BLOB)
GOOD_CONFIG = json.loads(zlib.decompress(base64.b64decode(read_metadata(GOOD_BLOB)["config"])))
GOOD_PEFT_CONFIG = json.loads(PEFT_CONFIG)
GOOD_ROW = {"prompt": "a", "completion": "b"}

# entry point -> (how to build the upload from one payload, the field the error must name)
ENTRY_POINTS: dict[str, tuple[Callable[[str], Upload], str]] = {
    "blob header": (lambda raw: native_blob_header(with_raw(GOOD_HEADER, ("bank", "shape", 0), raw)), "blob"),
    "blob config": (lambda raw: native_blob_config(with_raw(GOOD_CONFIG, ("modules", 0, 1), raw)), "config"),
    "peft config": (lambda raw: peft_upload(with_raw(GOOD_PEFT_CONFIG, ("r",), raw)), "adapter_config.json"),
    "training row": (
        lambda raw: job_upload(training=ROW + (with_raw({**GOOD_ROW, "weight": 0}, ("weight",), raw) + "\n").encode()),
        "training_file line 2",
    ),
    "hyperparameters": (
        lambda raw: job_upload(hyperparameters=with_raw({"seed": 0}, ("seed",), raw)),
        "hyperparameters",
    ),
}


def full_logits_peft(topk: int) -> Upload:
    """A real PEFT checkpoint saved with full logits (h=32), its config claiming `topk`."""
    model = random_peft_vblora(tiny_llama(seed=7), r=4, b=16, h=32, k=2, targets=["q_proj", "v_proj"], seed=1)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        weights = (Path(folder) / "adapter_model.safetensors").read_bytes()
    return peft_upload(json.dumps({**config, "topk": topk}), weights)


@dataclass(frozen=True)
class Case:
    id: str
    upload: Upload
    field: str


CASES = [
    Case(f"{entry} / {payload}", build(PAYLOADS[payload]), field)
    for entry, (build, field) in ENTRY_POINTS.items()
    for payload in PAYLOADS
] + [
    # what a parser cannot see: config values that are JSON but inconsistent
    Case("peft config / full logits, topk > num_vectors", full_logits_peft(topk=33), "adapter_config.json.topk"),
    Case("peft config / topk of 4000 digits", peft_upload(with_raw(GOOD_PEFT_CONFIG, ("topk",), "9" * 4000)),
         "adapter_config.json.topk"),
    Case("peft config / dropout Infinity", peft_upload(with_raw(GOOD_PEFT_CONFIG, ("vblora_dropout",), "Infinity")),
         "adapter_config.json"),
    Case("blob config / dimension 64.0", native_blob_config(with_raw(GOOD_CONFIG, ("modules", 0, 1), "64.0")),
         "modules"),
    Case("blob config / dimension 64.5", native_blob_config(with_raw(GOOD_CONFIG, ("modules", 0, 2), "64.5")),
         "modules"),
    # finding 9: a config that targets none of its tensors' modules (PEFT refuses to load it)
    Case("peft config / target_modules nonexistent_proj",
         peft_upload(json.dumps({**GOOD_PEFT_CONFIG, "target_modules": ["nonexistent_proj"]})),
         "adapter_config.json.target_modules"),
    Case("blob config / dimension as a string", native_blob_config(with_raw(GOOD_CONFIG, ("modules", 0, 1), '"64"')),
         "modules"),
]  # fmt: skip


# -- the server and the table run ---------------------------------------------------------------


@dataclass
class Live:
    url: str
    key: str
    folder: Path


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("malformed")
    with sqlite_server(folder, {("acme", "good"): GOOD}) as (url, key):
        yield Live(url, key, folder)


def test_every_entry_point_meets_every_payload_class() -> None:
    assert len(CASES) == len(ENTRY_POINTS) * len(PAYLOADS) + 7
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_malformed_upload_is_400_and_the_connection_serves_on(live: Live, case: Case) -> None:
    before = snapshot(live.folder)
    parts = urlsplit(live.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    auth = {"Authorization": f"Bearer {live.key}"}
    try:
        started = time.perf_counter()
        conn.request(case.upload.method, case.upload.path, case.upload.body,
                     {**auth, "Content-Type": case.upload.content_type})  # fmt: skip
        reply = conn.getresponse()
        body = reply.read()
        refused_ms = (time.perf_counter() - started) * 1000
        assert reply.status == 400, (reply.status, body[:500])
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request" and error["field"] == case.field, error
        # keep-alive: the next request travels over the same socket
        sock = conn.sock
        assert sock is not None, "the server closed the connection"
        conn.request("GET", "/v1/adapters/good", headers=auth)
        follow = conn.getresponse()
        assert follow.status == 200, follow.read()[:500]
        follow.read()
        assert conn.sock is sock
        print(f"{case.id}: {reply.status} {error['field']} in {refused_ms:.1f} ms, connection kept")
    finally:
        conn.close()
    assert snapshot(live.folder) == before, "the upload changed stored state"


def test_the_loader_bounds_depth_itself() -> None:
    """Below the parser's recursion limit the depth bound is the loader's own: 32 levels
    parse, 33 are refused, with the caller's error type and field."""
    from vbserve.training import DatasetError

    assert load_untrusted_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, "f") == _nested(MAX_DEPTH)
    with pytest.raises(DatasetError) as refused:
        load_untrusted_json('{"a": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}", "row", error=DatasetError)
    assert refused.value.field == "row" and "deeper than 32" in refused.value.reason


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value
