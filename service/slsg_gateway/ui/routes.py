"""Routes of the review page. Images are served under ``/ui/`` too, so the session cookie authorises them."""

from __future__ import annotations

import io
import time
from datetime import datetime, UTC
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse

from slsg_gateway.api.deps import GatewayState, get_state
from slsg_gateway.api.routes.inspections import InspectionNotFound, apply_review, get_store
from slsg_gateway.errors import BadImage
from slsg_gateway.records import InspectionRecord, RecordStore
from slsg_gateway.ui import pages
from slsg_gateway.ui.session import COOKIE, SESSION_S, Operator, cookie_value, keys_required, login, \
    operator_from_cookie

router = APIRouter(prefix="/ui", include_in_schema=False)
PER_LINE = 24
_REVIEW_FILTERS = ("pending", "reviewed", "defect", "false_alarm")


class NotSignedIn(Exception):
    """Raised by ``require_operator``; the app turns it into a redirect to the login form."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


def _next_url(request: Request) -> str:
    query = [(k, v) for k, v in request.query_params.multi_items() if k != "api_key"]
    return request.url.path + (f"?{urlencode(query)}" if query else "")


def require_operator(request: Request, state: GatewayState = Depends(get_state)) -> Operator:
    operator = operator_from_cookie(state.settings, request.cookies.get(COOKIE))
    if operator is None and not keys_required(state.settings):
        return Operator("anonymous", "")
    if operator is None:
        raise NotSignedIn(_next_url(request))
    return operator


def _signed_in(response: Response, state: GatewayState, operator: Operator) -> Response:
    response.set_cookie(COOKIE, cookie_value(state.settings, operator), max_age=SESSION_S, path="/ui",
                        httponly=True, samesite="strict")
    return response


def _safe_next(url: str) -> str:
    return url if url.startswith("/ui/") and not url.startswith("//") else "/ui/"


def parse_time(value: str | None, now: float | None = None) -> float | None:
    """``1h``/``7d`` (that long ago), epoch milliseconds (Grafana's ``${__from}``) or ISO 8601 (UTC if no zone)."""
    if not value:
        return None
    now = time.time() if now is None else now
    text = value.strip()
    if text[:-1].isdigit() and text[-1] in "hd":
        return now - int(text[:-1]) * (3600 if text[-1] == "h" else 86400)
    if text.isdigit():
        return int(text) / 1000.0
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise BadImage(f"time {value!r} is not 1h/7d, epoch milliseconds or ISO 8601", code="invalid_request") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


@router.get("", include_in_schema=False)
async def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/", response_class=HTMLResponse)
async def review_grid(request: Request, line: str = "", model: str = "", review: str = "pending", since: str = "",
                      until: str = "", api_key: Annotated[str | None, Query()] = None,
                      state: GatewayState = Depends(get_state)) -> Response:
    if api_key is not None:  # `/ui/?api_key=KEY` once: a session cookie, and the key leaves the address bar
        operator = login(state.settings, api_key, "")
        if operator is None:
            return HTMLResponse(pages.page("Sign in", pages.login_form(_next_url(request), "That key is not valid.")),
                                status_code=403)
        return _signed_in(RedirectResponse(_next_url(request), status_code=303), state, operator)
    operator = require_operator(request, state)
    store = get_store(state)
    filters = {"line": line, "model": model, "review": review, "since": since, "until": until}
    by_line = await run_in_threadpool(_flagged_by_line, store, filters)
    lines, models = await run_in_threadpool(_choices, store)
    back = _next_url(request)
    body = pages.filters_form(filters, lines, models) + pages.grid(by_line, back)
    return HTMLResponse(pages.page("Flagged frames", body, operator.reviewer))


def _flagged_by_line(store: RecordStore, filters: dict[str, str]) -> dict[str, list[InspectionRecord]]:
    """The latest flagged (anomalous) records matching the filters, grouped by line, newest first."""
    review = filters["review"] if filters["review"] in _REVIEW_FILTERS else None
    page = store.query(decision="anomalous", line=filters["line"] or None, model=filters["model"] or None,
                       review=review, since=parse_time(filters["since"]), until=parse_time(filters["until"]),
                       limit=500)
    grouped: dict[str, list[InspectionRecord]] = {}
    for record in page.records:
        group = grouped.setdefault(record.line_id or "(none)", [])
        if len(group) < PER_LINE:
            group.append(record)
    return dict(sorted(grouped.items()))


def _choices(store: RecordStore) -> tuple[list[str], list[str]]:
    """Lines and models seen among the latest records (the filter menus)."""
    recent = store.query(limit=500).records
    return (sorted({r.line_id for r in recent if r.line_id}), sorted({r.model for r in recent}))


@router.get("/inspections/{record_id}", response_class=HTMLResponse)
async def inspection_page(record_id: str, request: Request, back: str = "/ui/",
                          state: GatewayState = Depends(get_state)) -> Response:
    operator = require_operator(request, state)
    record = await _record(get_store(state), record_id)
    body = pages.detail(record, _safe_next(back), operator.reviewer)
    return HTMLResponse(pages.page(f"Inspection {record.id[:12]}…", body, operator.reviewer))


@router.post("/inspections/{record_id}/review")
async def review_form(record_id: str, request: Request, verdict: Annotated[str, Form()],
                      note: Annotated[str, Form(max_length=2000)] = "",
                      reviewer: Annotated[str, Form(max_length=128)] = "", back: Annotated[str, Form()] = "/ui/",
                      state: GatewayState = Depends(get_state)) -> Response:
    operator = require_operator(request, state)
    if verdict not in ("defect", "false_alarm"):
        raise BadImage(f"verdict {verdict!r} is not 'defect' or 'false_alarm'", code="invalid_request")
    await apply_review(state, get_store(state), record_id, verdict, note, reviewer.strip() or operator.reviewer)
    target = f"/ui/inspections/{record_id}?{urlencode({'back': _safe_next(back)})}"
    return RedirectResponse(target, status_code=303)


@router.get("/inspections/{record_id}/frame")
async def frame_image(record_id: str, request: Request, state: GatewayState = Depends(get_state)) -> Response:
    require_operator(request, state)
    store = get_store(state)
    record = await _record(store, record_id)
    data = await run_in_threadpool(store.frame, record_id)
    if data is None:
        raise InspectionNotFound(f"the frame of inspection {record_id} was not kept", code="frame_not_stored")
    if record.frame_media_type in ("image/png", "image/jpeg"):
        return Response(data, media_type=record.frame_media_type, headers={"Cache-Control": "private, max-age=3600"})
    return Response(await run_in_threadpool(_as_png, data), media_type="image/png")  # TIFF/BMP: not every browser


@router.get("/inspections/{record_id}/heatmap")
async def heatmap_image(record_id: str, request: Request, state: GatewayState = Depends(get_state)) -> Response:
    require_operator(request, state)
    data = await run_in_threadpool(get_store(state).heatmap, record_id)
    if data is None:
        raise InspectionNotFound(f"the heat map of inspection {record_id} was not kept", code="heatmap_not_stored")
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/login", response_class=HTMLResponse)
async def login_page(next: str = "/ui/") -> HTMLResponse:
    return HTMLResponse(pages.page("Sign in", pages.login_form(_safe_next(next))))


@router.post("/login")
async def login_submit(api_key: Annotated[str, Form()], name: Annotated[str, Form(max_length=64)] = "",
                       next: Annotated[str, Form()] = "/ui/", state: GatewayState = Depends(get_state)) -> Response:
    operator = login(state.settings, api_key, name)
    if operator is None:
        return HTMLResponse(pages.page("Sign in", pages.login_form(_safe_next(next), "That key is not valid.")),
                            status_code=403)
    return _signed_in(RedirectResponse(_safe_next(next), status_code=303), state, operator)


@router.post("/logout")
async def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


async def _record(store: RecordStore, record_id: str) -> InspectionRecord:
    record = await run_in_threadpool(store.get, record_id)
    if record is None:
        raise InspectionNotFound(f"no inspection record {record_id!r}")
    return record


def _as_png(data: bytes) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, format="PNG", compress_level=1)
    return out.getvalue()
