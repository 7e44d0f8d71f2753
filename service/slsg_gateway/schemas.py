"""Pydantic response models: the OpenAPI document is generated from these."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable error code, e.g. 'bad_image'")
    message: str = Field(description="human-readable explanation")


class ErrorResponse(BaseModel):
    error: ErrorBody


class Box(BaseModel):
    """Axis-aligned box in original-image pixels; ``x1``/``y1`` are exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int


class Region(BaseModel):
    box: Box
    peak: float = Field(description="highest anomaly-map value inside the region: on the score's scale (0.5 = "
                                     "threshold, never 1) where the model card's anomaly_map_scale is 'calibrated', "
                                     "the anomaly probability on older models")
    area: int = Field(description="region area in original-image pixels")


class Timings(BaseModel):
    decode_ms: float
    preprocess_ms: float
    infer_ms: float
    postprocess_ms: float
    total_ms: float


class Heatmap(BaseModel):
    mode: Literal["overlay", "map"]
    width: int = Field(description="the PNG's width: the frame's, scaled down to at most heatmap_max_side "
                                   "(default 1024) on the long side")
    height: int
    png_base64: str


class Explanation(BaseModel):
    part: str = Field(description="the part kind, as the model card's part_kinds name it")
    found: int = Field(description="how many parts of this kind the image holds")
    expected: int = Field(description="how many a normal image holds (the training images' mean, rounded)")


class InspectionResult(BaseModel):
    id: str | None = Field(default=None, description="the inspection record's id (GET /v1/inspections/{id}); "
                                                     "null when the gateway records nothing (SLSG_RECORDS=off)")
    model: str
    version: int
    score: float = Field(description="calibrated anomaly score; 0.5 is the calibrated threshold, and above it "
                                      "the score keeps rising with the evidence without reaching 1")
    threshold: float = Field(description="decision threshold used for this model")
    is_anomalous: bool
    image_width: int
    image_height: int
    regions: list[Region]
    timings: Timings
    camera_id: str | None = None
    line_id: str | None = None
    warnings: list[str] = Field(default_factory=list, description="what may make this answer less reliable, "
                                "e.g. a greyscale frame sent to a model trained on colour images")
    heatmap: Heatmap | None = None
    explanations: list[Explanation] = Field(
        default_factory=list, description="the part kinds whose count is off by more than the card's tolerance "
        "(models with a component check); empty when every count fits or the model counts no parts")


class BatchItemError(BaseModel):
    filename: str | None
    error: ErrorBody


class BatchResult(BaseModel):
    model: str
    results: list[InspectionResult | BatchItemError]


class ModelVersionInfo(BaseModel):
    name: str
    versions: list[int] = Field(description="versions present in the repository")
    served_version: int | None = Field(description="version answering requests, if loaded")
    pinned_version: int | None = Field(
        default=None, description="version pinned by a rollback (load with a version); null: the newest serves")
    desired_version: int | None = Field(
        default=None, description="version the model's serving.json (written by `slsg deploy`) asks for; "
                                  "null: no desired state, the served version is managed by load calls")
    ready: bool
    input_height: int | None = None
    input_width: int | None = None
    max_batch_size: int | None = None
    card: dict[str, Any] | None = Field(
        default=None, description="the model card; calibration.expected_fpr is the share of normal frames "
                                  "expected at or above the threshold on average, calibration.fpr_upper_90 the "
                                  "share it stays under for nine calibration sets in ten (null when uncalibrated)")


class LoadRequest(BaseModel):
    """Body of ``POST /v1/models/{name}/load``; without a body the newest version serves."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field must not silently unpin

    version: int = Field(ge=1, description="serve exactly this version (a rollback) until the next load "
                                           "without a version")


class ModelList(BaseModel):
    backend: str
    models: list[ModelVersionInfo]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    backend: str
    backend_reachable: bool
    ready_models: list[str]


class ReviewInfo(BaseModel):
    verdict: Literal["defect", "false_alarm"]
    note: str
    reviewer: str = Field(description="who reviewed: the name given, else the operator key's fingerprint")
    time: datetime


class InspectionRecordOut(BaseModel):
    """One recorded inspection."""

    id: str = Field(description="32 hex characters; the first 12 are the time in ms, so ids sort by time")
    time: datetime
    model: str
    version: int
    line_id: str | None
    camera_id: str | None
    score: float
    threshold: float
    decision: Literal["anomalous", "normal"]
    regions: list[Region]
    frame_sha256: str = Field(description="SHA-256 of the frame's bytes as received")
    image_width: int
    image_height: int
    timings: dict[str, float]
    frame_stored: bool = Field(description="the frame is kept: GET .../frame")
    frame_media_type: str | None
    heatmap_stored: bool = Field(description="the heat map is kept: GET .../heatmap (PNG, model resolution)")
    review: ReviewInfo | None


class InspectionPage(BaseModel):
    records: list[InspectionRecordOut] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page; null on the last")


class ReviewRequest(BaseModel):
    """Body of ``POST /v1/inspections/{id}/review``."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["defect", "false_alarm"] = Field(description="'defect': the flag was right; 'false_alarm': "
                                                                  "the part is good")
    note: str = Field(default="", max_length=2000)
    reviewer: str | None = Field(default=None, max_length=128,
                                 description="who reviews; default: the presented API key's fingerprint")
