"""The bodies of adapter management."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class AdapterInfo(BaseModel):
    name: str
    version: int
    bank_id: str = Field(description='The vector bank\'s id; "" for a plain LoRA adapter (no bank)')
    config: dict[str, Any] = Field(description='The adapter\'s shape; a plain LoRA adapter\'s has "kind": "lora"')
    body_bytes: int = Field(description="Stored indices + weights + metadata (a plain LoRA adapter: its whole blob)")
    bank_bytes: int = Field(description="Stored vector bank (shared by every adapter that uses it); 0 without one")
    stored_bytes: int
    created: float
    updated: float


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    has_more: bool
    next_after: str | None = Field(None, description="Pass as `after` to get the next page")


class ResidentAdapter(BaseModel):
    name: str
    version: int
    in_slot: bool = Field(description="A batch slot holds it now (it served a request recently)")


class ResidentAdapterList(BaseModel):
    """The caller's adapters composed in this replica's engine cache: a request for one of
    them starts without loading it. Each API replica has its own cache."""

    object: Literal["list"] = "list"
    data: list[ResidentAdapter]
