"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from vbserve.metrics import CONTENT_TYPE_LATEST, Metrics

from ..body_limits import BodyLimitedRoute
from ..deps import MetricsAccess, ServicesDep
from ..schemas.ops import Health

router = APIRouter(tags=["operations"], route_class=BodyLimitedRoute)


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process answers. Says nothing about the model or the store: see /readyz."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health)
async def readyz(services: ServicesDep) -> Health:
    """Ready to serve: the engine is up (`services` exists only after it started) and the
    store answers; otherwise 503, from `get_services` or from the store's ping."""
    await run_in_threadpool(services.store.ping)
    return Health(status="ready", checks={"engine": "ok", "store": "ok"})


@router.get("/metrics", response_class=Response, dependencies=[MetricsAccess])
def metrics(request: Request) -> Response:
    """Prometheus metrics. No tenant or adapter names unless `VBSERVE_METRICS_ADAPTER_NAMES`;
    the admin key only, with `VBSERVE_METRICS_REQUIRE_ADMIN_KEY`."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
