"""In-process ONNX Runtime backend over a Triton-layout model repository.

Serves the newest version of every model found, or the version a rollback pinned (kept in
memory: a restarted gateway serves the newest again). A reload builds the new session off the event
loop and swaps it in atomically: requests already running keep their reference to the old
session, so nothing in flight is dropped, and a failed load leaves the old version serving.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from slsg.contract import (
    INPUT_IMAGE, MODEL_CARD_KEY, OUTPUT_PART_COUNTS, ModelCard, list_models, list_versions, model_path,
    validate_model_name,
)
from slsg_gateway.backends.base import Backend, InferenceOutput, ServedModel, requested_outputs
from slsg_gateway.errors import LoadFailed, ModelNotFound, ModelNotReady
from slsg_gateway.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Session:
    version: int
    session: ort.InferenceSession
    card: ModelCard
    input_height: int
    input_width: int


def open_contract_session(path: Path, version: int, threads: int = 0) -> _Session:
    """Open ``path`` with ONNX Runtime and check it against the repository contract."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if INPUT_IMAGE not in inputs or inputs[INPUT_IMAGE].type != "tensor(uint8)":
        raise ValueError(f"{path}: no uint8 input {INPUT_IMAGE!r} (found {sorted(inputs)})")
    meta = session.get_modelmeta().custom_metadata_map
    if MODEL_CARD_KEY not in meta:
        raise ValueError(f"{path}: no {MODEL_CARD_KEY!r} metadata entry")
    card = ModelCard.from_json(meta[MODEL_CARD_KEY])
    missing = set(requested_outputs(card)) - outputs
    if missing:
        raise ValueError(f"{path}: missing outputs {sorted(missing)} (found {sorted(outputs)})")
    shape = inputs[INPUT_IMAGE].shape  # [batch, H, W, 3]; H, W may be symbolic in a dynamic export
    height = shape[1] if isinstance(shape[1], int) else card.input_height
    width = shape[2] if isinstance(shape[2], int) else card.input_width
    return _Session(version, session, card, int(height), int(width))


def _is_model_name(name: str) -> bool:
    try:
        validate_model_name(name)
    except ValueError:
        return False
    return True


class EmbeddedBackend(Backend):
    name = "embedded"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = Path(settings.repository)
        self._sessions: dict[str, _Session] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._pinned: dict[str, int] = {}  # rollbacks: name -> version served instead of the newest
        self._pool = ThreadPoolExecutor(settings.concurrent_batches(), thread_name_prefix="ort")

    async def start(self) -> None:
        if not self.root.is_dir():
            log.warning("model repository %s does not exist; serving no models", self.root)
            return
        for name in list_models(self.root):
            try:
                await self.load(name)
            except LoadFailed as exc:
                log.error("%s", exc.message)

    async def close(self) -> None:
        self._sessions.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _describe(self, name: str) -> ServedModel:
        current = self._sessions.get(name)
        versions = tuple(list_versions(self.root, name))
        if current is None:
            return ServedModel(name, versions, None, False)
        return ServedModel(name, versions, current.version, True, current.card, current.input_height,
                           current.input_width, self.settings.max_batch_size, self._pinned.get(name))

    async def list_models(self) -> list[ServedModel]:
        names = set(list_models(self.root)) | set(self._sessions)
        return [self._describe(n) for n in sorted(names)]

    async def get_model(self, name: str) -> ServedModel:
        if name not in self._sessions:
            # validate before touching the file system: a request path may name anything ('..', 300 chars)
            if _is_model_name(name) and list_versions(self.root, name):
                raise ModelNotReady(f"model {name!r} is in the repository but not loaded")
            raise ModelNotFound(f"unknown model {name!r}")
        return self._describe(name)

    async def infer(self, name: str, images: np.ndarray) -> InferenceOutput:
        current = self._sessions.get(name)
        if current is None:
            raise ModelNotReady(f"model {name!r} is not loaded")
        if images.shape[1:3] != (current.input_height, current.input_width):
            raise ModelNotReady(f"model {name!r} changed its input size during the request; retry")
        loop = asyncio.get_running_loop()
        names = requested_outputs(current.card)
        out = await loop.run_in_executor(self._pool, lambda: current.session.run(names, {INPUT_IMAGE: images}))
        counts = dict(zip(names, out)).get(OUTPUT_PART_COUNTS)
        return InferenceOutput(current.version, out[0][:, 0].astype(np.float32), out[1].reshape(-1),
                               part_counts=None if counts is None else counts.astype(np.float32), card=current.card)

    async def load(self, name: str, version: int | None = None) -> ServedModel:
        try:
            validate_model_name(name)
        except ValueError as exc:
            raise ModelNotFound(str(exc)) from None
        versions = list_versions(self.root, name)
        if not versions:
            raise ModelNotFound(f"no servable version of {name!r} under {self.root}")
        if version is not None and version not in versions:
            raise ModelNotFound(f"version {version} of {name!r} is not under {self.root / name} "
                                f"(servable versions: {versions})")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            wanted = versions[-1] if version is None else version
            self._sessions[name] = await self._open(name, wanted)
            if version is None:
                self._pinned.pop(name, None)
            else:
                self._pinned[name] = version
            log.info("serving %s version %d%s", name, wanted, " (pinned)" if version is not None else "")
            return self._describe(name)

    async def _open(self, name: str, version: int) -> _Session:
        """A warmed-up session for ``version``; LoadFailed (old version kept) on any failure."""
        path = model_path(self.root, name, version)
        loop = asyncio.get_running_loop()
        try:
            fresh = await loop.run_in_executor(None, open_contract_session, path, version, self.settings.ort_threads)
            # one warm-up run so the first real request does not pay for allocation
            probe = np.zeros((1, fresh.input_height, fresh.input_width, 3), np.uint8)
            await loop.run_in_executor(None, fresh.session.run, None, {INPUT_IMAGE: probe})
        except Exception as exc:  # any failure: keep serving what we had
            kept = self._sessions.get(name)
            keep = f"; still serving version {kept.version}" if kept else ""
            raise LoadFailed(f"loading {name!r} version {version} from {path} failed: {exc}{keep}") from exc
        return fresh

    async def unload(self, name: str) -> None:
        self._pinned.pop(name, None)
        if self._sessions.pop(name, None) is None:
            raise ModelNotFound(f"model {name!r} is not loaded")

    def known_models(self) -> set[str]:
        return set(self._sessions)

    async def reachable(self) -> bool:
        return True
