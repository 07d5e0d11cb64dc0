"""The bodies of the admin API: tenants, their limits and their API keys."""

from __future__ import annotations

from pydantic import BaseModel, Field


class LimitsBody(BaseModel):
    """A tenant's own limits; null (or omitted) = the server's default."""

    max_adapters: int | None = Field(None, ge=0)
    max_adapter_bytes: int | None = Field(None, ge=0)
    requests_per_s: float | None = Field(None, gt=0, le=1e6)
    max_concurrent_generations: int | None = Field(None, ge=1, le=1_000_000)


class TenantCreate(BaseModel):
    name: str = Field(description="Letters, digits, '.', '_' and '-'; at most 128 characters")
    limits: LimitsBody = Field(default_factory=LimitsBody)


class TenantInfo(BaseModel):
    name: str
    created: float
    limits: LimitsBody
    effective_limits: LimitsBody = Field(description="The limits that apply: own, else the server's default")
    adapters: int
    stored_bytes: int
    active_jobs: int | None = Field(description="Fine-tuning jobs queued or running; null with fine-tuning off")


class TenantList(BaseModel):
    data: list[TenantInfo]


class KeyCreate(BaseModel):
    description: str = Field("", max_length=200)


class KeyInfo(BaseModel):
    key_id: str
    tenant: str
    created: float
    description: str
    revoked: float | None


class KeyCreated(KeyInfo):
    key: str = Field(description="The key itself. Shown only here: only its hash is stored")


class KeyList(BaseModel):
    data: list[KeyInfo]
