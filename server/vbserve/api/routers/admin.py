"""The admin API: tenants, their limits and their API keys. Every route needs the admin
key (`VBSERVE_ADMIN_KEY`); with none configured the server is single-tenant and these
routes answer 403."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Response
from starlette.concurrency import run_in_threadpool

from vbserve.tenancy import ApiKey, Tenant, TenantLimits, deletion, effective_limits

from ..body_limits import BodyLimitedRoute
from ..deps import AdminDep, ServicesDep
from ..schemas.admin import KeyCreate, KeyCreated, KeyInfo, KeyList, LimitsBody, TenantCreate, TenantInfo, TenantList

router = APIRouter(prefix="/v1/admin", tags=["admin"], route_class=BodyLimitedRoute)


@router.post("/tenants", status_code=201, response_model=TenantInfo)
async def create_tenant(body: TenantCreate, registry: AdminDep, services: ServicesDep) -> TenantInfo:
    tenant = await run_in_threadpool(registry.create_tenant, body.name, TenantLimits(**body.limits.model_dump()))
    return await _tenant_info(tenant, services)


@router.get("/tenants", response_model=TenantList)
async def list_tenants(registry: AdminDep, services: ServicesDep) -> TenantList:
    tenants = await run_in_threadpool(registry.list_tenants)
    return TenantList(data=[await _tenant_info(t, services) for t in tenants])


@router.get("/tenants/{name}", response_model=TenantInfo)
async def get_tenant(name: str, registry: AdminDep, services: ServicesDep) -> TenantInfo:
    return await _tenant_info(await run_in_threadpool(registry.get_tenant, name), services)


@router.put("/tenants/{name}/limits", response_model=TenantInfo)
async def set_limits(name: str, limits: LimitsBody, registry: AdminDep, services: ServicesDep) -> TenantInfo:
    tenant = await run_in_threadpool(registry.set_limits, name, TenantLimits(**limits.model_dump()))
    return await _tenant_info(tenant, services)


@router.delete("/tenants/{name}", status_code=204, response_class=Response)
async def delete_tenant(name: str, registry: AdminDep, services: ServicesDep) -> Response:
    """Delete the tenant with its keys, adapters and jobs (a running job stops and publishes
    nothing); a tenant created again under the name starts empty."""
    await run_in_threadpool(deletion.delete_tenant, registry, services.store, services.jobs, services.files, name)
    return Response(status_code=204)


@router.post("/tenants/{name}/keys", status_code=201, response_model=KeyCreated)
async def create_key(name: str, registry: AdminDep, body: Annotated[KeyCreate | None, Body()] = None) -> KeyCreated:
    """A new key for the tenant. The response is the only time the key itself is shown."""
    description = body.description if body else ""
    record, key = await run_in_threadpool(registry.create_key, name, description)
    return KeyCreated(**_key_info(record).model_dump(), key=key)


@router.get("/tenants/{name}/keys", response_model=KeyList)
async def list_keys(name: str, registry: AdminDep) -> KeyList:
    await run_in_threadpool(registry.get_tenant, name)
    return KeyList(data=[_key_info(k) for k in await run_in_threadpool(registry.list_keys, name)])


@router.delete("/tenants/{name}/keys/{key_id}", response_model=KeyInfo)
async def revoke_key(name: str, key_id: str, registry: AdminDep) -> KeyInfo:
    """Revoke the key: from the next request on, it gets 401 on every replica."""
    return _key_info(await run_in_threadpool(registry.revoke_key, name, key_id))


async def _tenant_info(tenant: Tenant, services: ServicesDep) -> TenantInfo:
    adapters, stored_bytes = await run_in_threadpool(services.store.count, tenant.name)
    jobs = services.jobs
    active_jobs = None if jobs is None else await run_in_threadpool(jobs.active_count, tenant.name)
    return TenantInfo(
        name=tenant.name,
        created=tenant.created,
        limits=LimitsBody(**vars(tenant.limits)),
        effective_limits=LimitsBody(**vars(effective_limits(tenant.limits, services.settings))),
        adapters=adapters,
        stored_bytes=stored_bytes,
        active_jobs=active_jobs,
    )


def _key_info(key: ApiKey) -> KeyInfo:
    return KeyInfo(
        key_id=key.key_id, tenant=key.tenant, created=key.created, description=key.description, revoked=key.revoked
    )
