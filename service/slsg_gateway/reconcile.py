"""Desired state: every gateway serves the version ``<root>/NAME/serving.json`` names, by itself.

``slsg deploy NAME --version N`` writes that file (the same command with an older version is a
rollback). Every ``SLSG_RECONCILE_INTERVAL_S`` the gateway reads it for every model that has one and,
where its backend serves another version, loads the desired one (embedded: a new ONNX Runtime
session swapped in; Triton: a load with that version pinned), so any number of replicas converge
without anyone calling them by address. The first pass runs before the gateway accepts requests, so a
restarted gateway never answers with a version that is not the desired one.

A file that cannot be used (bad JSON, no version) or a version that does not load changes nothing:
the gateway keeps serving what it had, logs the problem once, and says so in its metrics
(``slsg_desired_state_invalid``, ``slsg_model_version_mismatch``, ``slsg_reconcile_errors_total``).
The desired state wins: a one-off admin ``load`` of another version lasts until the next pass.
Models without a serving.json are left alone (served as before: the newest at start, admin loads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from slsg.contract import ServingStateError, models_with_serving_state, read_serving_state
from slsg_gateway.backends.base import Backend, ServedModel
from slsg_gateway.errors import GatewayError
from slsg_gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)


class Reconciler:
    """Polls the desired state and loads it on the backend; ``start()`` / ``close()`` in the app lifespan."""

    def __init__(self, root: Path, interval_s: float, backend: Backend, metrics: GatewayMetrics) -> None:
        self.root = Path(root)
        self.interval_s = interval_s
        self.backend = backend
        self.metrics = metrics
        self._desired: dict[str, int] = {}
        self._problems: dict[str, str] = {}  # last problem logged per model: each is logged once
        self._task: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def desired_version(self, name: str) -> int | None:
        """The version ``name``'s serving.json asked for when last usable (None: none read, or it was removed)."""
        return self._desired.get(name)

    async def start(self) -> None:
        """One pass now (before requests are accepted), then one every interval in the background."""
        if not self.enabled:
            return
        await self._guarded_pass()
        self._task = asyncio.create_task(self._loop(), name="reconcile")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._guarded_pass()

    async def _guarded_pass(self) -> None:
        try:
            await self.reconcile_once()
        except Exception:  # an unreadable folder, say: serving goes on, and so does the loop
            log.exception("desired-state pass over %s failed; retrying in %.1f s", self.root, self.interval_s)

    async def reconcile_once(self) -> None:
        """Read every serving.json and load the desired versions the backend does not serve."""
        names = await asyncio.to_thread(models_with_serving_state, self.root)
        for gone in set(self._desired) | set(self._problems):
            if gone not in names:
                self._forget(gone)
        if not names:
            return
        try:
            served = {m.name: m for m in await self.backend.list_models()}
        except GatewayError as exc:
            for name in names:
                self.metrics.reconcile_errors.labels(name, exc.code).inc()
                self._report(name, f"cannot ask the backend what it serves: {exc.message}")
            return
        for name in names:
            await self._reconcile(name, served.get(name))

    async def _reconcile(self, name: str, model: ServedModel | None) -> None:
        served = model.served_version if model else None
        try:
            state = await asyncio.to_thread(read_serving_state, self.root, name)
        except ServingStateError as exc:
            self.metrics.desired_state_invalid.labels(name).set(1)
            self.metrics.reconcile_errors.labels(name, "invalid_state").inc()
            self._report(name, f"desired state unusable, still serving version {served}: {exc}")
            return
        if state is None:  # removed since the listing
            return
        self.metrics.desired_state_invalid.labels(name).set(0)
        self.metrics.desired_version.labels(name).set(state.version)
        self._desired[name] = state.version
        if served != state.version:
            served = await self._load(name, state.version, served)
        self.metrics.version_mismatch.labels(name).set(int(served != state.version))
        if served == state.version and self._problems.pop(name, None) is not None:
            log.info("%s: serving the desired version %d again", name, served)

    async def _load(self, name: str, version: int, served: int | None) -> int | None:
        """Load ``version``; the version served afterwards (the old one when the load failed)."""
        try:
            model = await self.backend.load(name, version)
        except GatewayError as exc:
            self.metrics.reconcile_errors.labels(name, exc.code).inc()
            self._report(name, f"desired version {version} did not load, still serving version {served}: "
                               f"{exc.message}")
            return served
        self.metrics.set_served_version(name, model.served_version)
        log.info("%s: now serving version %s (desired state; was %s)", name, model.served_version, served)
        return model.served_version

    def _report(self, name: str, problem: str) -> None:
        if self._problems.get(name) != problem:
            log.error("%s: %s", name, problem)
        self._problems[name] = problem

    def _forget(self, name: str) -> None:
        self._desired.pop(name, None)
        self._problems.pop(name, None)
        self.metrics.forget_desired_state(name)
        log.info("%s: serving.json removed; the served version stays as it is", name)
