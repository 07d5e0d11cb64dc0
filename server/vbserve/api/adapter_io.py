"""Adapters over HTTP: bounded upload reading, the two upload formats, the three
download formats, and which banks a tenant may see. An adapter is VB-LoRA or plain LoRA;
both come in and go out in every format that can hold them.

Store calls are synchronous (SQLite, Redis); the async helpers here run them in worker
threads so a slow store never stalls the event loop that streams tokens.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zipfile
from collections.abc import AsyncIterator, Iterator
from typing import Literal

import torch
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from vbserve.vblora.lora_export import export_lora
from vbserve_store import (
    AdapterRecord,
    LoRAAdapter,
    VBLoRAAdapter,
    decode_adapter,
    decode_bank,
    decode_lora,
    read_metadata,
)
from vbserve_store.codec import save_safetensors
from vbserve_store.lora import LORA_FORMAT
from vbserve_store.peft_io import (
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    WEIGHTS_NAME,
    export_peft,
    export_peft_lora,
    read_peft_files,
)
from vbserve_store.store import AdapterStore

from .deps import Services
from .errors import APIError
from .schemas.adapters import AdapterInfo

ExportFormat = Literal["native", "peft", "lora"]
CheckpointFormat = Literal["peft", "lora"]
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry
PAGE = 1000  # the store's largest page


async def parse_upload(request: Request, body: bytes, services: Services, tenant: str) -> VBLoRAAdapter | LoRAAdapter:
    """Our safetensors blob (application/octet-stream; VB-LoRA or LoRA), or a PEFT VB-LoRA
    or LoRA checkpoint as multipart/form-data with the files `adapter_config.json` and
    `adapter_model.safetensors`."""
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    limit = services.settings.max_adapter_bytes
    if content_type == "multipart/form-data":
        files = await _multipart_files(request, body)
        return await run_in_threadpool(read_peft_files, files[CONFIG_NAME], files[WEIGHTS_NAME], max_bytes=limit)
    if content_type == "application/octet-stream":
        return await run_in_threadpool(_decode_native, services.store, tenant, body, limit)
    raise APIError(
        "unsupported_media_type",
        f"send application/octet-stream (an adapter blob) or multipart/form-data (a PEFT checkpoint), not {content_type}",
        "content-type",
    )


def check_servable(adapter: VBLoRAAdapter | LoRAAdapter, services: Services) -> None:
    """Refuse at upload what the engine would refuse at every request."""
    adapter.config.check_compatible(services.base_model.module_shapes)
    services.base_model.check_rank(adapter.config.r, "r")


def export_checkpoint(adapter: VBLoRAAdapter | LoRAAdapter, fmt: CheckpointFormat) -> bytes:
    """peft: the PEFT VB-LoRA checkpoint; lora: the equivalent plain LoRA. Both are zips
    of `adapter_config.json` + `adapter_model.safetensors`, the same bytes on every call
    (`save_safetensors`, and a fixed time in the zip). A LoRA adapter has no VB-LoRA form:
    peft and lora are both its PEFT LoRA checkpoint. (The native format needs no export:
    the store hands out its canonical bytes, `AdapterStore.get_blob`.)"""
    if isinstance(adapter, LoRAAdapter):
        config, tensors = export_peft_lora(adapter)
    else:
        config, tensors = export_peft(adapter) if fmt == "peft" else export_lora(adapter)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in (
            (CONFIG_NAME, json.dumps(config, indent=2).encode()),
            (WEIGHTS_NAME, save_safetensors(tensors)),
        ):
            entry = zipfile.ZipInfo(name, date_time=ZIP_TIME)  # not the time of the download
            entry.external_attr = 0o600 << 16  # rw-------, what writestr gives a plain name
            zf.writestr(entry, data, compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def info(record: AdapterRecord) -> AdapterInfo:
    return AdapterInfo(
        name=record.name,
        version=record.version,
        bank_id=record.bank_id,
        config=record.config,
        body_bytes=record.body_bytes,
        bank_bytes=record.bank_bytes,
        stored_bytes=record.stored_bytes,
        created=record.created,
        updated=record.updated,
    )


def iter_records(store: AdapterStore, tenant: str) -> Iterator[AdapterRecord]:
    """Every adapter of the tenant, page by page."""
    after = None
    while True:
        page = store.list(tenant, after=after, limit=PAGE)
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1].name


def repr_digest(content: bytes) -> str:
    """The `Repr-Digest` header's value (RFC 9530) for `content`: its SHA-256."""
    return f"sha-256=:{base64.b64encode(hashlib.sha256(content).digest()).decode()}:"


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or etag in tags


def _decode_native(store: AdapterStore, tenant: str, blob: bytes, limit: int) -> VBLoRAAdapter | LoRAAdapter:
    if read_metadata(blob, limit).get("format") == LORA_FORMAT:
        return decode_lora(blob, max_bytes=limit)

    def resolve_bank(bank_id: str) -> torch.Tensor | None:
        if not store.tenant_uses_bank(tenant, bank_id):
            return None
        # decode_adapter hashes the resolved bank (once) and refuses a mismatch.
        return decode_bank(store.get_bank(bank_id), verify=False)

    return decode_adapter(blob, bank_resolver=resolve_bank, max_bytes=limit)


async def _multipart_files(request: Request, body: bytes) -> dict[str, bytes]:
    async def replay() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=2, max_fields=2, max_part_size=MAX_CONFIG_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise APIError("invalid_request", f"malformed multipart body: {exc.message}", "body") from None
    files: dict[str, bytes] = {}
    try:
        for key, value in form.multi_items():
            # Accept the file name as the form field's name or as the uploaded file's name.
            name = key if key in (CONFIG_NAME, WEIGHTS_NAME) else getattr(value, "filename", None)
            if name in (CONFIG_NAME, WEIGHTS_NAME):
                files[name] = await value.read() if isinstance(value, UploadFile) else value.encode()
    finally:
        await form.close()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if name not in files:
            raise APIError("invalid_request", f"multipart body lacks the file {name}", name)
    return files
