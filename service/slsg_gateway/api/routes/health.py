"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from slsg_gateway.api.deps import GatewayState, get_state, require_metrics_access
from slsg_gateway.schemas import ErrorResponse, Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}},
            summary="Backend reachable and at least one model ready")
async def readyz(state: GatewayState = Depends(get_state)):
    reachable = await state.backend.reachable()
    ready_models = []
    if reachable:
        try:
            ready_models = [m.name for m in await state.backend.list_models() if m.ready]
        except Exception:  # the backend went away between the two calls
            reachable = False
    body = Readiness(ready=reachable and bool(ready_models), backend=state.backend.name,
                     backend_reachable=reachable, ready_models=ready_models)
    if not body.ready:
        return JSONResponse(body.model_dump(), status_code=503,
                            headers={"Retry-After": str(state.settings.retry_after_s)})
    return body


@router.get("/metrics", response_class=Response, dependencies=[Depends(require_metrics_access)],
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: {"model": ErrorResponse},
                       403: {"model": ErrorResponse}},
            summary="Prometheus metrics (a metrics key or a listed network once keys are configured)")
async def metrics(state: GatewayState = Depends(get_state)) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
