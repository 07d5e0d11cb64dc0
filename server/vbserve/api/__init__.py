"""The HTTP API: OpenAI-compatible and LoRAX/TGI-compatible generation, adapter
management, fine-tuning, and operations endpoints. The routers are in `routers`, their
request and response bodies in `schemas`; beside them the helpers they share: generation
and SSE (`generation`), adapter uploads and downloads (`adapter_io`), multipart forms
(`multipart`), the dependencies (`deps`: services, tenant, limits), errors (`errors`) and
the middleware around every route (`middleware`)."""

from .deps import DEFAULT_TENANT, Services, current_tenant
from .errors import APIError
from .routers import router

__all__ = ["DEFAULT_TENANT", "APIError", "Services", "current_tenant", "router"]
