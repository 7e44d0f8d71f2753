"""The backend interface the API and the batcher talk to."""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field

import numpy as np

from slsg.contract import OUTPUT_ANOMALY_MAP, OUTPUT_PART_COUNTS, OUTPUT_SCORE, ModelCard


@dataclass(frozen=True)
class ServedModel:
    """What the gateway knows about one model; read from the model itself, never hard-coded."""

    name: str
    versions: tuple[int, ...]
    served_version: int | None
    ready: bool
    card: ModelCard | None = None
    input_height: int | None = None
    input_width: int | None = None
    max_batch_size: int = 0  # 0: the backend imposes no limit
    pinned_version: int | None = None  # set by a rollback (load of a given version); None: newest serves

    def card_dict(self) -> dict | None:
        """The card as stored, plus what its calibration implies: the share of normal images a line
        should expect flagged at the threshold, on average and for nine calibration sets in ten (null when
        uncalibrated)."""
        if self.card is None:
            return None
        card = asdict(self.card)
        card["calibration"]["expected_fpr"] = self.card.calibration.expected_fpr()
        card["calibration"]["fpr_upper_90"] = self.card.calibration.fpr_upper(0.9)
        return card


@dataclass
class InferenceOutput:
    """One batch's outputs: ``anomaly_map`` [N, H, W] float32, ``score`` [N] float32 and, for a model whose
    card lists part kinds, ``part_counts`` [N, K] float32."""

    version: int
    anomaly_map: np.ndarray
    score: np.ndarray
    extra: dict = field(default_factory=dict)
    part_counts: np.ndarray | None = None
    card: ModelCard | None = None  # the card of ``version``, the version that answered, where the backend knows it


def requested_outputs(card: ModelCard | None) -> list[str]:
    """The graph outputs to ask for: the map and score, and the part counts when the card lists part kinds."""
    counts = [OUTPUT_PART_COUNTS] if card is not None and card.part_kinds else []
    return [OUTPUT_ANOMALY_MAP, OUTPUT_SCORE, *counts]


class Backend(abc.ABC):
    """Serves contract models; all methods are coroutines safe to call from the event loop."""

    name: str = "backend"

    @abc.abstractmethod
    async def start(self) -> None:
        """Discover and load models. Must not fail if the backend is unreachable (readiness says so)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def list_models(self) -> list[ServedModel]: ...

    @abc.abstractmethod
    async def get_model(self, name: str) -> ServedModel:
        """The served model ``name``; raises ModelNotFound / ModelNotReady / BackendUnavailable."""

    @abc.abstractmethod
    async def infer(self, name: str, images: np.ndarray) -> InferenceOutput:
        """Run ``images`` (uint8 [N, H, W, 3] at the model's input size) through the served version."""

    @abc.abstractmethod
    async def load(self, name: str, version: int | None = None) -> ServedModel:
        """(Re)load ``name`` from the repository; on failure the old version stays.

        ``version=None`` serves the newest version (and ends a pin); a number pins that version
        (a rollback) until the next load without one.
        """

    @abc.abstractmethod
    async def unload(self, name: str) -> None: ...

    def known_models(self) -> set[str]:
        """Names this backend has seen (cheap, synchronous; used to bound metric labels)."""
        return set()

    @abc.abstractmethod
    async def reachable(self) -> bool:
        """Whether the backend answers (always true in-process)."""
