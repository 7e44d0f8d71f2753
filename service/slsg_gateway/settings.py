"""Gateway settings: one typed object, read from ``SLSG_*`` environment variables.

List settings (API keys, line ids) accept JSON or a comma-separated string; ``SLSG_THRESHOLDS``
is JSON, e.g. ``'{"tray": 0.6}'`` (a per-model decision threshold on the calibrated score; above 0.5
that score is 1 - 0.5 / (1 + m), so 0.6 asks for m = 0.25 units of evidence beyond the calibrated
threshold, 0.75 for one unit: the distance of a typical normal image below it).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from slsg.contract import DECISION_THRESHOLD


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything the gateway can be told; defaults serve ``./model_repository`` in-process."""

    model_config = SettingsConfigDict(env_prefix="SLSG_", extra="ignore", env_ignore_empty=True)

    # where and how to serve
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    backend: Literal["embedded", "triton"] = "embedded"
    repository: Path = Path("model_repository")
    # triton backend
    triton_url: str = "127.0.0.1:8001"
    triton_protocol: Literal["grpc", "http"] = "grpc"
    triton_timeout_s: float = 5.0
    # desired state: every reconcile_interval_s (0: never) load the version NAME/serving.json names
    # (written by `slsg deploy`) under serving_root (None: the repository; on Triton, a mount of it)
    reconcile_interval_s: float = Field(default=5.0, ge=0)
    serving_root: Path | None = None
    # embedded backend: ONNX Runtime threads per session (0 = ORT default)
    ort_threads: int = 0
    # decisions
    thresholds: dict[str, float] = Field(default_factory=dict)
    default_threshold: float = DECISION_THRESHOLD
    max_regions: int = 32
    # security (no API key configured = open inspect; admin is closed without admin keys)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    admin_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # GET /v1/models (model cards: calibration, training-data hash) and /metrics are closed when API keys
    # are configured; these open them to anyone. /metrics also takes a metrics key, an admin key, or a
    # request from one of the metrics networks (CIDR, e.g. the scraping Prometheus's subnet)
    open_models: bool = False
    open_metrics: bool = False
    metrics_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    metrics_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # input limits
    max_body_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_batch_files: int = 32
    # frames with a side under this share of the model input's side are refused (422): a 1x1 frame
    # blown up to the input size says nothing about the part; 0 accepts any size
    min_frame_fraction: float = Field(default=0.25, ge=0.0, le=1.0)
    # heat maps are drawn at most this many pixels on the long side (regions stay in frame pixels)
    heatmap_max_side: int = Field(default=1024, ge=16)
    # memory all frame decodes of this process may hold at once; a frame is decoded when its share is
    # free (one larger than the whole budget waits until it is alone)
    decode_budget_mb: int = Field(default=512, ge=16)
    # fast path
    decode_threads: int = 4
    draft_min_ratio: float = 2.0  # JPEG draft decode when the frame is >= this many times the input size
    batch_window_ms: float = 3.0
    max_batch_size: int = 8
    max_queue: int = 64
    # batches in flight per gateway: None = 1 on the embedded backend (ONNX Runtime already uses every
    # core for one batch, two at once oversubscribe them), 2 on Triton (its dynamic batcher and
    # instances overlap them); measured in docs/results.md
    max_concurrent_batches: int | None = None
    retry_after_s: int = 2
    # the gateway's own log lines (backend state changes, errors): plain text or one JSON object a line
    log_format: Literal["text", "json"] = "text"
    # metrics: production-line label values are limited to these; others are reported as "other"
    lines: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # inspection records: a folder (embedded SQLite store) or a postgresql:// URL; "off" records nothing;
    # unset: <data_dir>/records
    data_dir: Path = Path("gateway-data")
    records: str | None = None
    records_normal_sample: float = Field(0.01, ge=0.0, le=1.0)  # share of normal frames kept with heat map
    records_max_age_days: float | None = Field(30.0, gt=0)
    records_max_bytes: int | None = Field(10 * 1024**3, gt=0)  # frames and heat maps kept, in total
    records_queue: int = Field(1000, ge=1)  # records waiting for the writer; beyond this they are dropped
    records_queue_bytes: int = Field(256 * 1024**2, ge=1)  # frame bytes waiting for the writer

    _split = field_validator("api_keys", "admin_keys", "metrics_keys", "metrics_networks", "lines",
                             mode="before")(_split_list)

    @field_validator("metrics_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"metrics_networks: {network!r} is not a network (CIDR like 10.0.0.0/8): {exc}") from None
        return value

    def concurrent_batches(self) -> int:
        if self.max_concurrent_batches is not None:
            return max(1, self.max_concurrent_batches)
        return 1 if self.backend == "embedded" else 2

    def records_spec(self) -> str | None:
        """Where inspection records go, or None when recording is off."""
        if self.records is None or not self.records.strip():
            return str(self.data_dir / "records")
        return None if self.records.strip().lower() == "off" else self.records.strip()
    def desired_state_root(self) -> Path:
        return self.serving_root if self.serving_root is not None else self.repository

    def threshold_for(self, model: str) -> float:
        return float(self.thresholds.get(model, self.default_threshold))
