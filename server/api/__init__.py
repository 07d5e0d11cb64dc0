"""The HTTP API: OpenAI-compatible and LoRAX/TGI-compatible generation, adapter
management, and operations endpoints. Routes are thin: request and response bodies are
the pydantic models in `schemas`, generation runs through `generation`, errors are mapped
in `errors`, and the tenant comes from the `current_tenant` dependency."""

from fastapi import APIRouter

from . import adapters_api, admin_api, files_api, jobs_api, lorax_api, openai_api, ops_api
from .deps import DEFAULT_TENANT, Services, current_tenant
from .errors import APIError, install_error_handlers

router = APIRouter()
for _module in (openai_api, lorax_api, adapters_api, files_api, jobs_api, admin_api, ops_api):
    router.include_router(_module.router)

__all__ = ["DEFAULT_TENANT", "APIError", "Services", "current_tenant", "install_error_handlers", "router"]
