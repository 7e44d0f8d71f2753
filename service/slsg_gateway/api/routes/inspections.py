"""Inspection records: list, read, frames and heat maps, and operators' reviews (``/v1/inspections``)."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials

from slsg_gateway.api.deps import GatewayState, _api_key_header, _bearer, _presented_key, get_state, \
    require_inspect_key
from slsg_gateway.errors import BadImage, GatewayError
from slsg_gateway.records import InspectionRecord, RecordNotFound, RecordStore
from slsg_gateway.schemas import ErrorResponse, InspectionPage, InspectionRecordOut, ReviewRequest

router = APIRouter(prefix="/v1/inspections", tags=["records"], dependencies=[Depends(require_inspect_key)])
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 422)}


class RecordsOff(GatewayError):
    status, code = 404, "records_off"


class InspectionNotFound(GatewayError):
    status, code = 404, "inspection_not_found"


def get_store(state: GatewayState = Depends(get_state)) -> RecordStore:
    if state.records is None:
        raise RecordsOff("this gateway keeps no inspection records (SLSG_RECORDS=off)")
    return state.records


def key_fingerprint(key: str | None) -> str:
    """A stable, non-secret name for an API key (reviews say who without storing the key)."""
    return f"key-{hashlib.sha256(key.encode()).hexdigest()[:8]}" if key else "anonymous"


# the stored record's fields the answer names differently
RENAMED_FIELDS = {"has_heatmap": "heatmap_stored"}


def record_out(record: InspectionRecord) -> InspectionRecordOut:
    """The API's view of a stored record: its fields (the review as a dict) under the answer's names."""
    fields = {RENAMED_FIELDS.get(k, k): v for k, v in dataclasses.asdict(record).items()}
    return InspectionRecordOut(**fields, frame_stored=record.has_frame)


async def _get(store: RecordStore, record_id: str) -> InspectionRecord:
    record = await run_in_threadpool(store.get, record_id)
    if record is None:
        raise InspectionNotFound(f"no inspection record {record_id!r} (never recorded, or removed by retention)")
    return record


@router.get("", response_model=InspectionPage, responses=_ERRORS, summary="Recorded inspections, newest first")
async def list_inspections(
        model: str | None = None, line: str | None = None, camera: str | None = None,
        decision: Literal["anomalous", "normal"] | None = None,
        review: Annotated[Literal["pending", "reviewed", "defect", "false_alarm"] | None, Query(
            description="pending: anomalous and not reviewed; reviewed: any review; defect / false_alarm: that "
                        "verdict")] = None,
        since: Annotated[datetime | None, Query(description="from this time (ISO 8601 with zone), inclusive")] = None,
        until: Annotated[datetime | None, Query(description="before this time, exclusive")] = None,
        stored: Annotated[bool | None, Query(description="only records whose frame is (true) or is not kept")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(description="the previous page's next_cursor")] = None,
        store: RecordStore = Depends(get_store)) -> InspectionPage:
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise BadImage(f"{name} {value.isoformat()} has no time zone: add Z or +hh:mm", code="invalid_request")
    page = await run_in_threadpool(lambda: store.query(
        model=model, line=line, camera=camera, decision=decision, review=review, since=since, until=until,
        stored=stored, limit=limit, cursor=cursor))
    return InspectionPage(records=[record_out(r) for r in page.records], next_cursor=page.next_cursor)


@router.get("/{record_id}", response_model=InspectionRecordOut, responses=_ERRORS, summary="One inspection record")
async def get_inspection(record_id: str, store: RecordStore = Depends(get_store)) -> InspectionRecordOut:
    return record_out(await _get(store, record_id))


@router.get("/{record_id}/frame", response_class=Response, summary="The frame as received, when kept",
            responses={200: {"content": {t: {} for t in ("image/png", "image/jpeg", "image/bmp", "image/tiff")}},
                       **_ERRORS})
async def get_frame(record_id: str, store: RecordStore = Depends(get_store)) -> Response:
    record = await _get(store, record_id)
    data = await run_in_threadpool(store.frame, record_id)
    if data is None:
        raise InspectionNotFound(f"the frame of inspection {record_id} was not kept (normal verdicts are sampled; "
                                 "retention removes the oldest)", code="frame_not_stored")
    return Response(data, media_type=record.frame_media_type or "application/octet-stream")


@router.get("/{record_id}/heatmap", response_class=Response, summary="The heat map (PNG, model resolution)",
            responses={200: {"content": {"image/png": {}}}, **_ERRORS})
async def get_heatmap(record_id: str, store: RecordStore = Depends(get_store)) -> Response:
    await _get(store, record_id)
    data = await run_in_threadpool(store.heatmap, record_id)
    if data is None:
        raise InspectionNotFound(f"the heat map of inspection {record_id} was not kept", code="heatmap_not_stored")
    return Response(data, media_type="image/png")


@router.post("/{record_id}/review", response_model=InspectionRecordOut, responses=_ERRORS,
             summary="An operator's verdict on an inspection")
async def review_inspection(record_id: str, body: ReviewRequest, state: GatewayState = Depends(get_state),
                            store: RecordStore = Depends(get_store),
                            header_key: str | None = Depends(_api_key_header),
                            bearer: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> InspectionRecordOut:
    reviewer = body.reviewer or key_fingerprint(_presented_key(header_key, bearer))
    record = await apply_review(state, store, record_id, body.verdict, body.note, reviewer)
    return record_out(record)


async def apply_review(state: GatewayState, store: RecordStore, record_id: str, verdict: str, note: str,
                       reviewer: str) -> InspectionRecord:
    """Store the review and count it (shared by the API and the review page)."""
    try:
        record = await run_in_threadpool(store.review, record_id, verdict, note, reviewer)
    except RecordNotFound:
        raise InspectionNotFound(f"no inspection record {record_id!r}") from None
    state.metrics.reviews.labels(record.model, str(record.version), state.metrics.line_label(record.line_id),
                                 verdict).inc()
    return record
