"""HTML of the review page: the grid of flagged frames per line, one inspection, the login form.

Plain functions returning strings; every value from a record or request is escaped.
"""

from __future__ import annotations

from datetime import datetime
from html import escape
from urllib.parse import urlencode

from slsg_gateway.records import InspectionRecord

_CSS = """
body{font-family:system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2129}
header{background:#1d2b3a;color:#fff;padding:10px 18px;display:flex;gap:18px;align-items:center}
header a{color:#cfe3ff} header h1{font-size:18px;margin:0;flex:1}
main{padding:14px 18px} h2{font-size:16px;margin:18px 0 8px}
form.filters{display:flex;gap:10px;flex-wrap:wrap;align-items:end;background:#fff;padding:10px;border-radius:6px}
form.filters label{display:flex;flex-direction:column;font-size:12px;color:#555}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}
.card{background:#fff;border-radius:6px;overflow:hidden;text-decoration:none;color:inherit;
box-shadow:0 1px 2px #0002} .card:hover{box-shadow:0 0 0 2px #2f7de1}
.ov{position:relative;aspect-ratio:4/3;background:#222}
.ov img{position:absolute;inset:0;width:100%;height:100%;object-fit:fill}
.ov img.heat{opacity:.5} .ov svg{position:absolute;inset:0;width:100%;height:100%}
.meta{padding:6px 8px;font-size:12px;line-height:1.5} .score{font-weight:600;font-size:14px}
.badge{display:inline-block;padding:1px 6px;border-radius:9px;font-size:11px;background:#ddd}
.badge.pending{background:#ffe2a8} .badge.defect{background:#f7b4b4} .badge.false_alarm{background:#b9e6c3}
.panels{display:grid;grid-template-columns:repeat(3,1fr);gap:12px} .panel{background:#fff;border-radius:6px;padding:8px}
.panel h3{font-size:13px;margin:0 0 6px} table{border-collapse:collapse;font-size:13px;background:#fff}
td,th{padding:4px 10px;border-bottom:1px solid #eee;text-align:left} table{align-self:flex-start}
.review{background:#fff;border-radius:6px;padding:12px;margin-top:12px;max-width:640px}
button{padding:8px 14px;border-radius:5px;border:0;font-size:14px;cursor:pointer}
button.defect{background:#c62828;color:#fff} button.false_alarm{background:#2e7d32;color:#fff}
textarea{width:100%;min-height:50px} .empty{color:#777;padding:20px}
.nothumb{position:absolute;inset:0;display:flex;align-items:center;justify-content:center;color:#aaa}
"""
REVIEW_LABELS = {"pending": "to review", "defect": "defect confirmed", "false_alarm": "false alarm"}


def page(title: str, body: str, operator: str | None = None) -> str:
    who = (f'<span>{escape(operator)}</span><form method="post" action="/ui/logout" style="margin:0">'
           f'<button style="padding:3px 8px">Sign out</button></form>') if operator else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width"><style>{_CSS}</style></head><body>'
            f'<header><h1><a href="/ui/" style="color:#fff;text-decoration:none">SLSG review</a> · '
            f'{escape(title)}</h1>{who}</header><main>{body}</main></body></html>')


def _time(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _badge(record: InspectionRecord) -> str:
    state = record.review.verdict if record.review else ("pending" if record.is_anomalous else "")
    return f'<span class="badge {state}">{REVIEW_LABELS[state]}</span>' if state else ""


def _overlay(record: InspectionRecord, boxes: bool = False, heat: bool = True) -> str:
    if not record.has_frame:
        return '<div class="ov"><div class="nothumb">frame not kept</div></div>'
    rid = escape(record.id)
    parts = [f'<img src="/ui/inspections/{rid}/frame" alt="frame">']
    if heat and record.has_heatmap:
        parts.append(f'<img class="heat" src="/ui/inspections/{rid}/heatmap" alt="heat map">')
    if boxes:
        rects = "".join(
            f'<rect x="{r["box"]["x0"]}" y="{r["box"]["y0"]}" width="{r["box"]["x1"] - r["box"]["x0"]}" '
            f'height="{r["box"]["y1"] - r["box"]["y0"]}" fill="none" stroke="#ff1744" '
            f'stroke-width="{max(2, record.image_width // 150)}"><title>peak {r["peak"]:.3f}, area {r["area"]} px'
            f'</title></rect>' for r in record.regions)
        parts.append(f'<svg viewBox="0 0 {record.image_width} {record.image_height}" '
                     f'preserveAspectRatio="none">{rects}</svg>')
    ratio = f"{record.image_width}/{record.image_height}"
    return f'<div class="ov" style="aspect-ratio:{ratio}">{"".join(parts)}</div>'


def _select(name: str, options: list[tuple[str, str]], current: str) -> str:
    opts = "".join(f'<option value="{escape(v)}"{" selected" if v == current else ""}>{escape(label)}</option>'
                   for v, label in options)
    return f'<select name="{name}">{opts}</select>'


def filters_form(filters: dict[str, str], lines: list[str], models: list[str]) -> str:
    review = _select("review", [("pending", "to review"), ("reviewed", "reviewed"), ("defect", "defect confirmed"),
                                ("false_alarm", "false alarm"), ("all", "all")], filters.get("review", "pending"))
    since = _select("since", [("", "any time"), ("1h", "last hour"), ("8h", "last 8 hours"), ("24h", "last 24 h"),
                              ("7d", "last 7 days")] + ([(filters["since"], "from " + filters["since"])]
                                                        if filters.get("since", "") not in ("", "1h", "8h", "24h", "7d")
                                                        else []), filters.get("since", ""))
    line = _select("line", [("", "all lines")] + [(x, x) for x in lines], filters.get("line", ""))
    model = _select("model", [("", "all models")] + [(x, x) for x in models], filters.get("model", ""))
    until = (f'<input type="hidden" name="until" value="{escape(filters["until"])}">'
             if filters.get("until") else "")
    return (f'<form class="filters" method="get" action="/ui/"><label>Line {line}</label><label>Model {model}'
            f'</label><label>Review {review}</label><label>Time {since}</label>{until}'
            f'<button type="submit">Filter</button></form>')


def grid(records_by_line: dict[str, list[InspectionRecord]], back: str) -> str:
    if not records_by_line:
        return '<p class="empty">No flagged frames match these filters.</p>'
    out = []
    for line, records in records_by_line.items():
        cards = "".join(
            f'<a class="card" href="/ui/inspections/{escape(r.id)}?{urlencode({"back": back})}" '
            f'data-record="{escape(r.id)}">{_overlay(r)}<div class="meta"><span class="score">{r.score:.3f}'
            f'</span> {_badge(r)}<br>{escape(_time(r.time))}<br>{escape(r.model)} v{r.version}'
            f'{" · " + escape(r.camera_id) if r.camera_id else ""}</div></a>' for r in records)
        out.append(f'<h2>Line {escape(line)} <small>({len(records)} latest)</small></h2><div class="grid">{cards}</div>')
    return "".join(out)


def detail(record: InspectionRecord, back: str, reviewer: str) -> str:
    regions = "".join(f'<tr><td>{i + 1}</td><td>({r["box"]["x0"]}, {r["box"]["y0"]}) – ({r["box"]["x1"]}, '
                      f'{r["box"]["y1"]})</td><td>{r["peak"]:.3f}</td><td>{r["area"]}</td></tr>'
                      for i, r in enumerate(record.regions)) or '<tr><td colspan="4">none</td></tr>'
    fields = [("Score", f"{record.score:.4f} (threshold {record.threshold:.3f})"),
              ("Decision", record.decision), ("Model", f"{record.model} v{record.version}"),
              ("Line / camera", f"{record.line_id or '–'} / {record.camera_id or '–'}"),
              ("Time", _time(record.time)), ("Frame", f"{record.image_width}×{record.image_height}, "
                                                       f"sha256 {record.frame_sha256[:16]}…"),
              ("Record", record.id)]
    table = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in fields)
    done = ""
    if record.review:
        rv = record.review
        done = (f'<p id="current-review">Reviewed: <span class="badge {rv.verdict}">{REVIEW_LABELS[rv.verdict]}'
                f'</span> by {escape(rv.reviewer)} at {escape(_time(rv.time))}'
                f'{": " + escape(rv.note) if rv.note else ""}</p>')
    rid = escape(record.id)
    form = (f'<form class="review" method="post" action="/ui/inspections/{rid}/review">{done}'
            f'<input type="hidden" name="back" value="{escape(back)}">'
            f'<label>Note (optional)<br><textarea name="note" maxlength="2000"></textarea></label><br>'
            f'<label>Reviewer <input name="reviewer" value="{escape(reviewer)}" maxlength="128"></label><br><br>'
            f'<button class="defect" name="verdict" value="defect">Defect confirmed</button> '
            f'<button class="false_alarm" name="verdict" value="false_alarm">False alarm</button></form>')
    panels = (f'<div class="panels"><div class="panel"><h3>Frame</h3>{_overlay(record, heat=False)}</div>'
              f'<div class="panel"><h3>Heat map</h3>{_overlay(record)}</div>'
              f'<div class="panel"><h3>Regions</h3>{_overlay(record, boxes=True, heat=False)}</div></div>')
    return (f'<p><a href="{escape(back)}">← back to the list</a> {_badge(record)}</p>{panels}'
            f'<div style="display:flex;gap:16px;flex-wrap:wrap;margin-top:12px"><table>{table}</table>'
            f'<table><tr><th>#</th><th>Box (x0, y0) – (x1, y1)</th><th>Peak</th><th>Area</th></tr>{regions}'
            f'</table></div>{form}')


def login_form(next_url: str, error: str = "") -> str:
    message = f'<p style="color:#c62828">{escape(error)}</p>' if error else ""
    return (f'<form class="review" method="post" action="/ui/login">{message}'
            f'<input type="hidden" name="next" value="{escape(next_url)}">'
            f'<label>API key<br><input type="password" name="api_key" required autofocus></label><br><br>'
            f'<label>Your name (shown on your reviews)<br><input name="name" maxlength="64"></label><br><br>'
            f'<button type="submit">Sign in</button></form>')
