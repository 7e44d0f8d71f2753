"""Inspection endpoints: one frame (raw body or multipart ``file``) or several (multipart ``files``)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from starlette.datastructures import UploadFile

from slsg_gateway.api.deps import GatewayState, get_state, read_body, require_inspect_key
from slsg_gateway.errors import BadImage, GatewayError, UnsupportedMediaType
from slsg_gateway.imaging import IMAGE_MEDIA_TYPES, check_media_type
from slsg_gateway.schemas import BatchItemError, BatchResult, ErrorBody, ErrorResponse, InspectionResult

router = APIRouter(prefix="/v1/models", tags=["inspection"], dependencies=[Depends(require_inspect_key)])

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_SINGLE_BODY = {"requestBody": {"required": True, "content": {
    **{t: _BINARY for t in ("image/png", "image/jpeg", "image/bmp", "image/tiff")},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
}}}
_BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
}}}
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 429, 503)}

HeatmapQuery = Annotated[Literal["overlay", "map"] | None, Query(
    description="also return the anomaly map as a PNG over the frame or alone, at the frame's size scaled to at most "
                "SLSG_HEATMAP_MAX_SIDE (1024) px on the long side; coloured blue (0) -> green (0.5, the threshold "
                "on a calibrated map) -> red (1)")]
CameraHeader = Annotated[str | None, Header(alias="X-Camera-Id", max_length=128)]
LineHeader = Annotated[str | None, Header(alias="X-Line-Id", max_length=128)]


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def _part_bytes(part: object, field: str) -> tuple[str | None, bytes]:
    if not isinstance(part, UploadFile):
        raise BadImage(f"multipart field {field!r} must be a file upload", code="bad_request")
    media = (part.content_type or "").split(";")[0].strip().lower()
    # a part without a specific type (curl -F on an unknown extension) is sniffed instead
    if media not in IMAGE_MEDIA_TYPES and media not in ("", "application/octet-stream"):
        check_media_type(media)
    return part.filename, await part.read()


async def _form(request: Request, state: GatewayState):
    await read_body(request, state.settings.max_body_bytes)
    try:
        return await request.form(max_files=state.settings.max_batch_files, max_fields=16)
    except Exception as exc:  # malformed multipart or too many files
        raise BadImage(f"cannot parse the multipart body: {exc}", code="bad_multipart") from None


def _wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "image/png" in accept and "application/json" not in accept


@router.post("/{name}/inspect", response_model=InspectionResult, openapi_extra=_SINGLE_BODY,
             responses={200: {"content": {"image/png": {}},
                              "description": "the result as JSON, or the heat-map PNG with Accept: image/png"},
                        **_ERRORS},
             summary="Inspect one frame")
async def inspect(name: str, request: Request, heatmap: HeatmapQuery = None, camera_id: CameraHeader = None,
                  line_id: LineHeader = None, state: GatewayState = Depends(get_state)):
    model = await state.inspector.served_model(name)
    if _is_multipart(request):
        form = await _form(request, state)
        if "file" not in form:
            raise BadImage("multipart body has no 'file' field", code="bad_multipart")
        _, data = await _part_bytes(form["file"], "file")
    else:
        check_media_type(request.headers.get("content-type"))
        data = await read_body(request, state.settings.max_body_bytes)
    state.metrics.in_flight.inc()
    try:
        done = await state.inspector.inspect(name, data, heatmap=heatmap, camera_id=camera_id, line_id=line_id,
                                             model=model)
    finally:
        state.metrics.in_flight.dec()
    if done.heatmap_png is not None and _wants_png(request):
        r = done.result
        return Response(done.heatmap_png, media_type="image/png", headers={
            "X-SLSG-Model-Version": str(r.version), "X-SLSG-Score": f"{r.score:.6f}",
            "X-SLSG-Anomalous": str(r.is_anomalous).lower()})
    return done.result


@router.post("/{name}/inspect:batch", response_model=BatchResult, openapi_extra=_BATCH_BODY, responses=_ERRORS,
             summary="Inspect several frames in one request")
async def inspect_batch(name: str, request: Request, heatmap: HeatmapQuery = None, camera_id: CameraHeader = None,
                        line_id: LineHeader = None, state: GatewayState = Depends(get_state)) -> BatchResult:
    model = await state.inspector.served_model(name)
    if not _is_multipart(request):
        raise UnsupportedMediaType("inspect:batch takes multipart/form-data with one or more 'files' fields")
    form = await _form(request, state)
    parts = form.getlist("files")
    if not parts:
        raise BadImage("multipart body has no 'files' field", code="bad_multipart")
    uploads = [await _part_bytes(p, "files") for p in parts]

    async def one(data: bytes) -> InspectionResult:
        done = await state.inspector.inspect(name, data, heatmap=heatmap, camera_id=camera_id, line_id=line_id,
                                             model=model)
        return done.result

    state.metrics.in_flight.inc()
    try:
        outcomes = await asyncio.gather(*(one(data) for _, data in uploads), return_exceptions=True)
    finally:
        state.metrics.in_flight.dec()
    results: list[InspectionResult | BatchItemError] = []
    for (filename, _), outcome in zip(uploads, outcomes):
        if isinstance(outcome, GatewayError) and outcome.status < 500 and outcome.status != 429:
            results.append(BatchItemError(filename=filename, error=ErrorBody(code=outcome.code,
                                                                             message=outcome.message)))
        elif isinstance(outcome, BaseException):
            raise outcome  # backend trouble fails the whole request with its 5xx/429
        else:
            results.append(outcome)
    return BatchResult(model=name, results=results)
