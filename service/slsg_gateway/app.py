"""The FastAPI application: ``create_app(settings)`` wires backend, batcher, metrics and routes."""

from __future__ import annotations

import logging
from urllib.parse import urlencode
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slsg import __version__
from slsg_gateway.api.deps import GatewayState
from slsg_gateway.api.routes import health, inspect, inspections, models
from slsg_gateway.backends import create_backend
from slsg_gateway.batching import MicroBatcher
from slsg_gateway.errors import GatewayError
from slsg_gateway.inspection import Inspector
from slsg_gateway.logs import configure_logging
from slsg_gateway.metrics import GatewayMetrics
from slsg_gateway.records import RecordStore, RecordWriter, open_store
from slsg_gateway.records.recorder import Recorder
from slsg_gateway.records.writer import RetentionPolicy
from slsg_gateway.reconcile import Reconciler
from slsg_gateway.settings import Settings
from slsg_gateway.ui import routes as ui_routes
from slsg_gateway.ui.routes import NotSignedIn

log = logging.getLogger(__name__)  # "slsg_gateway.app": configure_logging gives it its handler


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        headers = dict(exc.headers)
        if exc.status == 503 and "Retry-After" not in headers:
            headers["Retry-After"] = str(request.app.state.gateway.settings.retry_after_s)
        return error_response(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error_response(422, "invalid_request", detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(NotSignedIn)
    async def not_signed_in(request: Request, exc: NotSignedIn) -> RedirectResponse:
        return RedirectResponse("/ui/login?" + urlencode({"next": exc.next_url}), status_code=303)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


def _install_request_metrics(app: FastAPI) -> None:
    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        if path != "/metrics":
            state: GatewayState = request.app.state.gateway
            name = request.path_params.get("name")
            # only models the backend knows become label values (bounded cardinality)
            model = name if name and name in state.backend.known_models() else ("unknown" if name else "")
            state.metrics.requests.labels(path, model, str(response.status_code)).inc()
        return response


def _open_records(settings: Settings, inspector: Inspector, metrics: GatewayMetrics) -> RecordStore | None:
    """The record store named by the settings, with its writer attached to the inspector (None when off)."""
    spec = settings.records_spec()
    if spec is None:
        return None
    try:
        store = open_store(spec)
    except (OSError, RuntimeError, ValueError) as exc:
        raise RuntimeError(f"cannot open the inspection record store {spec!r}: {exc} (set SLSG_RECORDS to a "
                           "writable folder or a postgresql:// URL, or SLSG_RECORDS=off)") from exc
    days = settings.records_max_age_days
    writer = RecordWriter(
        store, max_queue=settings.records_queue, max_queue_bytes=settings.records_queue_bytes,
        retention=RetentionPolicy(max_age_s=days * 86400 if days else None, max_bytes=settings.records_max_bytes),
        on_drop=lambda reason: metrics.records_dropped.labels(reason).inc(),
        on_written=metrics.records_written.inc)
    inspector.recorder = Recorder(writer, settings.records_normal_sample)
    metrics.watch_records(store)
    log.info("inspection records: %s", store.description)
    return store


def _close_records(state: GatewayState) -> None:
    """Flush queued records, then close the store (a clean shutdown loses nothing)."""
    if state.inspector.recorder is not None:
        state.inspector.recorder.close()
    if state.records is not None:
        state.records.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway app; the backend starts (and loads models) in the app's lifespan."""
    settings = settings or Settings()
    configure_logging(settings.log_format)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: GatewayState = app.state.gateway
        await state.backend.start()
        try:
            for model in await state.backend.list_models():
                state.metrics.set_served_version(model.name, model.served_version)
        except GatewayError:  # backend unreachable at start: the gateway still starts, readiness says so
            pass
        await state.reconciler.start()  # the desired versions, before the first request
        yield
        await state.reconciler.close()
        await state.batcher.close()
        _close_records(state)
        await state.backend.close()
        state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="SLSG inspection gateway", version=__version__, lifespan=lifespan,
                  description="Visual inspection with SLSG models served by ONNX Runtime or Triton.")
    backend = create_backend(settings)
    metrics = GatewayMetrics(settings.lines)
    batcher = MicroBatcher(backend, metrics, window_ms=settings.batch_window_ms, max_batch=settings.max_batch_size,
                           max_queue=settings.max_queue, max_concurrent=settings.concurrent_batches(),
                           retry_after_s=settings.retry_after_s)
    pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
    inspector = Inspector(settings, backend, batcher, metrics, pool)
    reconciler = Reconciler(settings.desired_state_root(), settings.reconcile_interval_s, backend, metrics)
    app.state.gateway = GatewayState(settings, backend, metrics, batcher, inspector, pool, reconciler,
                                     records=_open_records(settings, inspector, metrics))
    _install_error_handlers(app)
    _install_request_metrics(app)
    for module in (inspect, inspections, models, health, ui_routes):
        app.include_router(module.router)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (several workers): settings from SLSG_* variables."""
    return create_app(Settings())
