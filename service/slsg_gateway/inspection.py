"""One inspection, end to end: decode -> batch inference -> regions, decision, optional heat map.

CPU-heavy steps (decode, resize, PNG encoding) run in a thread pool so the event loop keeps
accepting requests while frames are being processed.
"""

from __future__ import annotations

import logging

import asyncio
import base64
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Literal

from slsg.contract import DECISION_THRESHOLD, RESIZE_BILINEAR, explain_counts
from slsg.image_modes import COLOUR
from slsg_gateway.backends.base import Backend, ServedModel
from slsg_gateway.batching import BatchItem, MicroBatcher
from slsg_gateway.errors import ModelNotReady
from slsg_gateway.imaging import (
    Frame, check_frame_size, decode_opened, heatmap_png, heatmap_size, open_frame, plan_draft,
)
from slsg_gateway.limits import DecodeBudget
from slsg_gateway.metrics import GatewayMetrics
from slsg_gateway.records.recorder import Recorder
from slsg_gateway.regions import find_regions
from slsg_gateway.schemas import Box, Explanation, Heatmap, InspectionResult, Region, Timings
from slsg_gateway.settings import Settings

log = logging.getLogger("slsg_gateway")
HeatmapMode = Literal["overlay", "map"]


@dataclass
class Inspection:
    result: InspectionResult
    heatmap_png: bytes | None = None


def explanations(model: ServedModel, item: BatchItem) -> list[Explanation]:
    """The part kinds whose count in ``item`` is off (none for a model that counts no parts). The counts
    are read with the card of the version that answered: during a redeploy that need not be the version
    ``model`` described when the request came in, and another version may count other part kinds."""
    card = item.card if item.card is not None else (model.card if item.version == model.served_version else None)
    if card is None or not card.part_kinds or item.part_counts is None:
        return []
    try:
        return [Explanation(**e) for e in explain_counts(card, item.part_counts)]
    except ValueError as exc:  # a card that is not this version's (Triton keeps one per model): no reasons
        log.warning("no part explanations for %s version %d: %s", model.name, item.version, exc)
        return []


def frame_warnings(model: ServedModel, frame: Frame) -> list[str]:
    """What the answer should tell the caller about this frame and model (the verdict stands)."""
    warnings = []
    if frame.greyscale and model.card is not None and model.card.image_colour == COLOUR:
        warnings.append(f"greyscale frame (mode {frame.source_mode}) sent to model {model.name!r}, which was "
                        f"trained on colour images: colour defects cannot show and the score may be off")
    return warnings


class Inspector:
    def __init__(self, settings: Settings, backend: Backend, batcher: MicroBatcher, metrics: GatewayMetrics,
                 pool: Executor) -> None:
        self.settings = settings
        self.backend = backend
        self.batcher = batcher
        self.metrics = metrics
        self.pool = pool
        self.budget = DecodeBudget(settings.decode_budget_mb * 1024 * 1024)
        self.recorder: Recorder | None = None  # set by the app when inspection records are on

    async def served_model(self, name: str) -> ServedModel:
        model = await self.backend.get_model(name)
        if not model.ready or model.input_height is None or model.input_width is None:
            raise ModelNotReady(f"model {name!r} is not ready")
        return model

    async def decode(self, model: ServedModel, data: bytes, heatmap: HeatmapMode | None) -> Frame:
        """Decode within the memory budget; 4xx for what is no image, too large or far too small."""
        settings, input_size = self.settings, (model.input_height, model.input_width)
        resize = model.card.resize if model.card else RESIZE_BILINEAR
        opened = open_frame(data, settings.max_pixels)  # the header only: cheap
        check_frame_size(opened.width, opened.height, input_size, settings.min_frame_fraction)
        preview = (heatmap_size(opened.width, opened.height, settings.heatmap_max_side)
                   if heatmap == "overlay" else None)
        plan_draft(opened, input_size, preview, settings.draft_min_ratio, resize)
        async with self.budget.reserve(opened.cost_bytes()):
            job = partial(decode_opened, opened, data, input_size, preview, resize)
            return await asyncio.get_running_loop().run_in_executor(self.pool, job)

    async def inspect(self, name: str, data: bytes, *, heatmap: HeatmapMode | None = None,
                      camera_id: str | None = None, line_id: str | None = None,
                      model: ServedModel | None = None) -> Inspection:
        t0 = time.perf_counter()
        model = model or await self.served_model(name)
        frame = await self.decode(model, data, heatmap)
        t1 = time.perf_counter()
        item = await self.batcher.submit(name, frame.pixels, model.max_batch_size)
        t2 = time.perf_counter()
        if heatmap:  # resizing and PNG-encoding a frame-sized map: off the event loop
            regions, png = await asyncio.get_running_loop().run_in_executor(
                self.pool, self._postprocess, model, frame, item, heatmap)
        else:  # regions alone take ~0.3 ms, less than a hop to the thread pool and back
            regions, png = self._postprocess(model, frame, item, None)
        t3 = time.perf_counter()
        timings = {"decode": frame.decode_ms, "preprocess": frame.preprocess_ms, "infer": (t2 - t1) * 1e3,
                   "postprocess": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}
        threshold = self.settings.threshold_for(name)
        png_size = heatmap_size(frame.width, frame.height, self.settings.heatmap_max_side)
        record_id = self.recorder.new_id() if self.recorder else None
        result = InspectionResult(
            id=record_id, model=name, version=item.version, score=item.score, threshold=threshold,
            is_anomalous=item.score >= threshold, image_width=frame.width, image_height=frame.height,
            regions=regions, timings=Timings(**{f"{k}_ms": round(v, 3) for k, v in timings.items()}),
            camera_id=camera_id, line_id=line_id, warnings=frame_warnings(model, frame),
            explanations=explanations(model, item),
            heatmap=Heatmap(mode=heatmap, width=png_size[0], height=png_size[1],
                            png_base64=base64.b64encode(png).decode()) if png else None,
        )
        self._record(name, result, timings, line_id)
        if self.recorder and record_id:
            self.recorder.record(record_id, result, data, item.anomaly_map)
        return Inspection(result, png)

    def _postprocess(self, model: ServedModel, frame: Frame, item: BatchItem,
                     heatmap: HeatmapMode | None) -> tuple[list[Region], bytes | None]:
        """Regions in original-image pixels and, when asked, the heat-map PNG (both CPU-bound)."""
        pixel_threshold = model.card.calibration.pixel_threshold if model.card else DECISION_THRESHOLD
        size = (frame.width, frame.height)
        regions = [Region(box=Box(x0=r.x0, y0=r.y0, x1=r.x1, y1=r.y1), peak=r.peak, area=r.area)
                   for r in find_regions(item.anomaly_map, pixel_threshold, size, self.settings.max_regions)]
        if not heatmap:
            return regions, None
        png_size = heatmap_size(frame.width, frame.height, self.settings.heatmap_max_side)
        return regions, heatmap_png(item.anomaly_map, png_size, frame.preview)

    def _record(self, name: str, result: InspectionResult, timings: dict[str, float], line_id: str | None) -> None:
        self.metrics.observe_stages(name, timings)
        self.metrics.scores.labels(name).observe(result.score)
        decision = "anomalous" if result.is_anomalous else "normal"
        self.metrics.decisions.labels(name, self.metrics.line_label(line_id), decision).inc()
