"""The gateway's side of recording: turn an inspection into a ``NewRecord`` and hand it to the writer.

Costs the request path a record id, a dict of fields and a queue put; frames are kept for every anomalous
verdict and for a random ``normal_sample`` share of normal ones.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from slsg_gateway.records.model import NewRecord, new_record_id, record_time
from slsg_gateway.records.writer import RecordWriter


class Recorder:
    def __init__(self, writer: RecordWriter, normal_sample: float = 0.01) -> None:
        self.writer = writer
        self.normal_sample = normal_sample
        self._random = random.Random()

    def new_id(self) -> str:
        return new_record_id()

    def keep_frame(self, is_anomalous: bool) -> bool:
        return is_anomalous or self._random.random() < self.normal_sample

    def record(self, record_id: str, result: Any, frame: bytes, anomaly_map: np.ndarray) -> None:
        """Queue the record of ``result`` (an InspectionResult); never raises for storage reasons."""
        keep = self.keep_frame(result.is_anomalous)
        self.writer.submit(NewRecord(
            id=record_id, ts=record_time(record_id), model=result.model, version=result.version, line_id=result.line_id,
            camera_id=result.camera_id, score=result.score, threshold=result.threshold,
            is_anomalous=result.is_anomalous, regions=[r.model_dump() for r in result.regions],
            image_width=result.image_width, image_height=result.image_height,
            timings=result.timings.model_dump(), frame=frame, anomaly_map=anomaly_map if keep else None))

    def close(self) -> None:
        self.writer.close()
