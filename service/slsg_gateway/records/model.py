"""What a record is: the stored inspection (``InspectionRecord``), its review, and what the gateway hands
the writer (``NewRecord``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, UTC
from typing import Any, Literal

import numpy as np

Verdict = Literal["defect", "false_alarm"]
VERDICTS: tuple[str, ...] = ("defect", "false_alarm")
DECISIONS: tuple[str, ...] = ("anomalous", "normal")
# review filter values: "pending" = an anomalous verdict nobody reviewed yet; "reviewed" = any review
REVIEW_STATES: tuple[str, ...] = ("pending", "reviewed", "defect", "false_alarm")


class RecordNotFound(KeyError):
    """No record with this id (never written, or removed by retention)."""


def new_record_id(now: float | None = None) -> str:
    """32 hex characters: 12 of creation time in ms (ids sort by time), 20 random."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{os.urandom(10).hex()}"


def record_time(record_id: str) -> float:
    """The creation time (epoch seconds) encoded in a record id."""
    return int(record_id[:12], 16) / 1000.0


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


@dataclass(frozen=True)
class Review:
    verdict: str  # one of VERDICTS
    note: str
    reviewer: str
    time: datetime


@dataclass(frozen=True)
class InspectionRecord:
    """One inspection as stored; ``regions`` are dicts ``{"box": {x0, y0, x1, y1}, "peak", "area"}`` in
    original-image pixels, ``timings`` stage -> milliseconds."""

    id: str
    time: datetime
    model: str
    version: int
    line_id: str | None
    camera_id: str | None
    score: float
    threshold: float
    decision: str  # one of DECISIONS
    regions: list[dict[str, Any]]
    frame_sha256: str
    image_width: int
    image_height: int
    timings: dict[str, float]
    frame_media_type: str | None  # media type of the stored frame; None: the frame was not kept
    has_heatmap: bool
    review: Review | None = None

    @property
    def has_frame(self) -> bool:
        return self.frame_media_type is not None

    @property
    def is_anomalous(self) -> bool:
        return self.decision == "anomalous"


@dataclass(frozen=True)
class Page:
    records: list[InspectionRecord]
    next_cursor: str | None  # pass as ``cursor`` for the next (older) page; None: this was the last


@dataclass
class NewRecord:
    """What the gateway hands the writer; hashing, heat-map encoding and storage happen off the request path.

    ``anomaly_map`` (model resolution, values in [0, 1]) is set only when frame and heat map are to be kept.
    """

    id: str
    ts: float
    model: str
    version: int
    line_id: str | None
    camera_id: str | None
    score: float
    threshold: float
    is_anomalous: bool
    regions: list[dict[str, Any]]
    image_width: int
    image_height: int
    timings: dict[str, float]
    frame: bytes
    anomaly_map: np.ndarray | None = None
    gateway: str = field(default_factory=lambda: f"{os.uname().nodename}:{os.getpid()}")

    @property
    def keep_files(self) -> bool:
        return self.anomaly_map is not None
