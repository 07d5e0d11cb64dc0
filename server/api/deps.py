"""What routes receive through FastAPI dependencies: the running services and the tenant.

Routes never reach for globals; the app's lifespan puts one `Services` on `app.state`,
and tests build apps with their own model, tokenizer and store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from transformers import PreTrainedTokenizerBase

from adapter_store.store import AdapterStore
from server.engine import Engine
from server.metrics import Metrics
from server.settings import Settings
from server.training.jobs import JobQueue

from .errors import APIError

DEFAULT_TENANT = "default"


@dataclass
class Services:
    settings: Settings
    engine: Engine
    store: AdapterStore
    tokenizer: PreTrainedTokenizerBase
    model_name: str  # what clients pass as `model` for the base model without an adapter
    metrics: Metrics
    jobs: JobQueue | None = None  # None: fine-tuning disabled
    started: float = field(default_factory=time.time)


def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:  # only reachable before the lifespan finished starting
        raise APIError("unavailable", "the server is still starting")
    return services


def current_tenant() -> str:
    """The tenant a request acts for. There is no authentication yet, so every request is
    the one tenant "default"; authentication replaces this one dependency."""
    return DEFAULT_TENANT


ServicesDep = Annotated[Services, Depends(get_services)]
TenantDep = Annotated[str, Depends(current_tenant)]
