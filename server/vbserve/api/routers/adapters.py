"""Adapter management: upload, list, inspect, download, delete; and the banks they use.

Every route acts on the caller's tenant only. Errors from the store (unknown name,
invalid blob, conflict, store down) propagate and are mapped in `errors`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from vbserve.backends import validate_key
from vbserve.tenancy import withdraw_adapter
from vbserve_store import AdapterNotFoundError

from ..adapter_io import (
    ExportFormat,
    check_servable,
    etag_matches,
    export_checkpoint,
    info,
    parse_upload,
    repr_digest,
)
from ..body_limits import BodyLimitedRoute, adapter_upload_limit, body_limit, read_body
from ..deps import CallerDep, ServicesDep, TenantDep, still_current, tenant_deleted
from ..errors import APIError
from ..schemas.adapters import AdapterInfo, AdapterList, ResidentAdapter, ResidentAdapterList

router = APIRouter(tags=["adapters"], route_class=BodyLimitedRoute)

_MEDIA = {"native": "application/octet-stream", "peft": "application/zip", "lora": "application/zip"}
_SUFFIX = {"native": ".safetensors", "peft": "-peft.zip", "lora": "-lora.zip"}
IfNoneMatch = Annotated[str | None, Header()]


@router.put(
    "/v1/adapters/{name}",
    response_model=AdapterInfo,
    responses={201: {"model": AdapterInfo, "description": "Created"}, 200: {"description": "Replaced"}},
)
@body_limit(adapter_upload_limit)
async def put_adapter(
    name: str,
    request: Request,
    response: Response,
    services: ServicesDep,
    caller: CallerDep,
    expected_version: Annotated[
        int | None, Query(ge=0, description="Write only if the stored version is this (0: only if absent)")
    ] = None,
) -> AdapterInfo:
    """Publish a new version of the adapter `name`, checked against the base model first."""
    validate_key("name", name)
    if name == services.model_name:
        raise APIError("conflict", f"{name!r} is the base model's name", "name")
    body = await read_body(request, services.settings.max_adapter_bytes)
    adapter = await parse_upload(request, body, services, caller.tenant)
    check_servable(adapter, services)
    record = await run_in_threadpool(
        services.store.put, caller.tenant, name, adapter, expected_version=expected_version, quota=caller.quota
    )
    if not await run_in_threadpool(still_current, services, caller):  # deleted while the body streamed in
        await run_in_threadpool(withdraw_adapter, services.store, caller.tenant, name, record)
        raise tenant_deleted()
    response.status_code = 201 if record.created == record.updated else 200
    return info(record)


@router.get("/v1/adapters", response_model=AdapterList)
def list_adapters(
    services: ServicesDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(description="Last name of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AdapterList:
    page = services.store.list(tenant, after=after, limit=limit)
    has_more = len(page) == limit and bool(services.store.list(tenant, after=page[-1].name, limit=1))
    return AdapterList(data=[info(r) for r in page], has_more=has_more, next_after=page[-1].name if has_more else None)


@router.get("/v1/adapters/{name}", response_model=AdapterInfo)
def get_adapter(name: str, services: ServicesDep, tenant: TenantDep) -> AdapterInfo:
    return info(services.store.get_record(tenant, name))


@router.get(
    "/v1/adapters/{name}/content",
    response_class=Response,
    responses={200: {"content": {m: {} for m in set(_MEDIA.values())}}, 304: {"description": "Not modified"}},
)
def get_adapter_content(
    name: str,
    services: ServicesDep,
    tenant: TenantDep,
    fmt: Annotated[ExportFormat, Query(alias="format")] = "native",
    omit_bank: bool = False,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """The adapter as our blob, a PEFT VB-LoRA checkpoint or a plain LoRA checkpoint.
    The ETag is the version, so a client that holds the current one gets a 304. The bytes
    are canonical (one adapter, one file): `Repr-Digest` (RFC 9530) is their SHA-256, the
    same on every download and from every replica."""
    version = services.store.get_version(tenant, name)
    if version is None:
        raise AdapterNotFoundError("name", f"no adapter {name!r}")
    if etag_matches(if_none_match, _etag(version)):
        return Response(status_code=304, headers={"ETag": _etag(version)})
    if fmt == "native":  # the stored bytes are canonical already: nothing to decode
        record, content = services.store.get_blob(tenant, name, include_bank=not omit_bank)
    else:
        record, adapter = services.store.get(tenant, name)
        content = export_checkpoint(adapter, fmt)
    return Response(
        content,
        media_type=_MEDIA[fmt],
        headers={
            "ETag": _etag(record.version),
            "Repr-Digest": repr_digest(content),
            "Cache-Control": "no-cache",  # names are mutable: revalidate, a 304 is cheap
            "Content-Disposition": f'attachment; filename="{name}{_SUFFIX[fmt]}"',
        },
    )


@router.delete("/v1/adapters/{name}", status_code=204, response_class=Response)
def delete_adapter(name: str, services: ServicesDep, tenant: TenantDep) -> Response:
    services.store.delete(tenant, name)
    return Response(status_code=204)


@router.get("/v1/banks/{bank_id}", response_class=Response)
def get_bank(bank_id: str, services: ServicesDep, tenant: TenantDep, if_none_match: IfNoneMatch = None) -> Response:
    """A vector bank, for a client that pulls adapters with `omit_bank=true`. Only banks
    that one of the caller's adapters uses are visible."""
    if not services.store.tenant_uses_bank(tenant, bank_id):
        raise APIError("not_found", f"none of your adapters uses bank {bank_id!r}", "bank_id")
    etag = f'"{bank_id}"'
    # Content addressed: the bytes behind an id never change.
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(services.store.get_bank(bank_id), media_type="application/octet-stream", headers=headers)


@router.get("/v1/engine/adapters", response_model=ResidentAdapterList)
def resident_adapters(services: ServicesDep, tenant: TenantDep) -> ResidentAdapterList:
    """Which of the caller's adapters this replica's engine holds composed, ready to serve."""
    resident = services.engine.resident_adapters(tenant)
    return ResidentAdapterList(data=[ResidentAdapter(name=n, version=v, in_slot=s) for n, v, s in resident])


def _etag(version: int) -> str:
    return f'"v{version}"'
