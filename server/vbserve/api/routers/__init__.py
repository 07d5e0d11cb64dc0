"""The API's routers, one module per API: `openai` (OpenAI-compatible generation),
`lorax` (LoRAX/TGI-compatible generation), `adapters`, `files` and `jobs` (fine-tuning),
`admin` (tenants and keys) and `ops` (health and metrics). Routes are thin: bodies are the
models in `vbserve.api.schemas` (one module per router), auth and tenancy come from
`vbserve.api.deps`, and each route declares its body limit (`vbserve.api.body_limits`)."""

from fastapi import APIRouter

from . import adapters, admin, files, jobs, lorax, openai, ops

ROUTERS = (openai.router, lorax.router, adapters.router, files.router, jobs.router, admin.router, ops.router)

router = APIRouter()
for _router in ROUTERS:
    router.include_router(_router)
