"""Triton backend: tritonclient (gRPC aio by default, or HTTP aio) against a Triton server.

Input size, batching limit and the model card come from Triton's model configuration (the card
JSON is the string parameter ``slsg.model_card``). Load/unload use Triton's repository API
(explicit model control); Triton itself keeps the old version serving while a new one loads
and when a load fails. A rollback pins one version by loading the served configuration with
``version_policy { specific { versions: [N] } }`` as a config override; unpinning loads it with
the repository's policy again (a plain load would not: Triton keeps an override until the model's
folder changes). Connection trouble and timeouts become 503 + Retry-After; the gRPC
channel reconnects on its own (short backoff), so the gateway recovers when Triton returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any
from collections.abc import Awaitable

import numpy as np

from slsg.contract import INPUT_IMAGE, MODEL_CARD_KEY, OUTPUT_ANOMALY_MAP, OUTPUT_PART_COUNTS, OUTPUT_SCORE, ModelCard
from slsg_gateway.backends.base import Backend, InferenceOutput, ServedModel, requested_outputs
from slsg_gateway.errors import BackendUnavailable, GatewayError, LoadFailed, ModelNotFound, ModelNotReady
from slsg_gateway.logs import BackendHealth
from slsg_gateway.settings import Settings

log = logging.getLogger(__name__)
_UNAVAILABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED")
_REFRESH_MIN_INTERVAL_S = 0.5  # unknown-model lookups must not hammer Triton's repository index
# `slsg export` writes this policy; restored on unpin when the gateway never saw the model's own one
_REPOSITORY_POLICY = {"latest": {"num_versions": 2}}


def _int(value: Any) -> int:
    return int(value)  # protobuf JSON renders int64 fields as strings


def parse_model_config(name: str, config: dict, versions: tuple[int, ...], ready: tuple[int, ...]) -> ServedModel:
    """A ServedModel from Triton's JSON model configuration (gRPC or HTTP flavour)."""
    config = config.get("config", config)
    params = config.get("parameters", {})
    card_json = params.get(MODEL_CARD_KEY, {}).get("string_value")
    card = ModelCard.from_json(card_json) if card_json else None
    height = width = None
    for tensor in config.get("input", []):
        if tensor.get("name") == INPUT_IMAGE:
            dims = [_int(d) for d in tensor.get("dims", [])]
            if config.get("max_batch_size", 0) == 0 and len(dims) == 4:
                dims = dims[1:]  # batch dimension explicit in the config
            if len(dims) == 3 and dims[0] > 0 and dims[1] > 0:
                height, width = dims[0], dims[1]
    if height is None and card is not None:
        height, width = card.input_height, card.input_width
    served = max(ready) if ready else None
    specific = config.get("version_policy", {}).get("specific", {}).get("versions", [])
    pinned = max(_int(v) for v in specific) if specific else None
    return ServedModel(name, versions, served, served is not None and height is not None, card, height, width,
                       _int(config.get("max_batch_size", 0)), pinned)


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.timeout_s = settings.triton_timeout_s
        self._grpc = settings.triton_protocol == "grpc"
        self._client: Any = None
        self._models: dict[str, ServedModel] = {}
        self._last_refresh = 0.0
        self._pinned: dict[str, int] = {}  # rollbacks this gateway made: name -> pinned version
        # the version requests name explicitly once a load by this gateway has returned: from then on
        # traffic is on the loaded version, not on whichever version Triton still holds (cleared while
        # a load runs, so requests never name a version that load may drop)
        self._route: dict[str, int] = {}
        self._policies: dict[str, dict] = {}  # version policy seen before a pin, restored on unpin
        self.health = BackendHealth("Triton", settings.triton_url, log)

    # -- plumbing -------------------------------------------------------------------------------
    def _make_client(self) -> Any:
        if self._grpc:
            import tritonclient.grpc.aio as grpcclient

            return grpcclient.InferenceServerClient(self.settings.triton_url, channel_args=[
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                # reconnect quickly after a Triton restart instead of gRPC's default backoff of up to 2 min
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ])
        import tritonclient.http.aio as httpclient

        return httpclient.InferenceServerClient(self.settings.triton_url, conn_timeout=self.timeout_s)

    def _modules(self) -> Any:
        if self._grpc:
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.http.aio as module
        return module

    def _translate(self, exc: BaseException, what: str, timeout_s: float | None = None) -> GatewayError:
        from tritonclient.utils import InferenceServerException

        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, TimeoutError):  # str() of a timeout is empty: say what timed out and after how long
            return BackendUnavailable(f"Triton at {self.settings.triton_url} did not answer during {what}: timed "
                                      f"out after {timeout_s or self.timeout_s:g} s", headers=retry)
        if isinstance(exc, InferenceServerException):
            status, message = str(exc.status()), exc.message() or str(exc)
            if status in _UNAVAILABLE:
                return BackendUnavailable(f"Triton at {self.settings.triton_url} unavailable during {what}: "
                                          f"{message}", headers=retry)
            if "unknown model" in message.lower() or "no available versions" in message.lower():
                return ModelNotReady(f"Triton: {message}", headers=retry)
            return GatewayError(f"Triton error during {what}: {message}", code="backend_error", status=502)
        # timeouts, refused connections (aiohttp/OS errors) and anything transport-level
        return BackendUnavailable(f"Triton at {self.settings.triton_url} unavailable during {what}: "
                                  f"{type(exc).__name__}: {exc}", headers=retry)

    async def _call(self, what: str, call: Awaitable[Any], timeout_s: float | None = None) -> Any:
        """``call`` within the timeout; trouble becomes a GatewayError, and the backend's state is logged."""
        try:
            result = await asyncio.wait_for(call, timeout_s or self.timeout_s)
        except Exception as exc:
            error = self._translate(exc, what, timeout_s)
            if isinstance(error, BackendUnavailable):
                self.health.failed(error.message)
            else:
                self.health.answered()  # an error answer still came from Triton
            raise error from exc
        self.health.answered()
        return result

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._client = self._make_client()
        try:
            await self.refresh()
        except GatewayError:  # not fatal: readiness reports it, lookups retry, the health log said why
            pass

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def refresh(self) -> dict[str, ServedModel]:
        """Re-read the repository index and the configuration of every model with a ready version."""
        self._last_refresh = time.monotonic()
        index = await self._call("repository index", self._repository_index())
        by_name: dict[str, tuple[list[int], list[int]]] = {}
        for entry in index:
            versions, ready = by_name.setdefault(entry["name"], ([], []))
            if str(entry.get("version", "")).isdigit():
                versions.append(int(entry["version"]))
                if entry.get("state") == "READY":
                    ready.append(int(entry["version"]))
        models = {}
        for name, (versions, ready) in sorted(by_name.items()):
            if ready:
                config = await self._call(f"config of {name}", self._config(name))
                models[name] = parse_model_config(name, config, tuple(sorted(versions)), tuple(ready))
                if name in self._pinned:  # Triton may report the policy of the version it kept, not the pin
                    models[name] = dataclasses.replace(models[name], pinned_version=self._pinned[name])
            else:
                models[name] = ServedModel(name, tuple(sorted(versions)), None, False)
        self._models = models
        return models

    async def _repository_index(self) -> list[dict]:
        if self._grpc:
            index = await self._client.get_model_repository_index(as_json=True)
            return index.get("models", [])
        return await self._client.get_model_repository_index()

    async def _config(self, name: str) -> dict:
        if self._grpc:
            return await self._client.get_model_config(name, as_json=True)
        return await self._client.get_model_config(name)

    # -- Backend API ----------------------------------------------------------------------------
    def known_models(self) -> set[str]:
        return set(self._models)

    async def list_models(self) -> list[ServedModel]:
        return list((await self.refresh()).values())

    async def get_model(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if (model is None or not model.ready) and time.monotonic() - self._last_refresh > _REFRESH_MIN_INTERVAL_S:
            model = (await self.refresh()).get(name)
        if model is None:
            raise ModelNotFound(f"unknown model {name!r} (not in Triton's repository index)")
        if not model.ready:
            raise ModelNotReady(f"model {name!r} has no ready version in Triton",
                                headers={"Retry-After": str(self.settings.retry_after_s)})
        return model

    async def infer(self, name: str, images: np.ndarray) -> InferenceOutput:
        module = self._modules()
        tensor = module.InferInput(INPUT_IMAGE, list(images.shape), "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(images))
        model = self._models.get(name)
        names = requested_outputs(model.card if model else None)
        outputs = [module.InferRequestedOutput(output) for output in names]
        route = self._route.get(name)
        try:
            result = await self._call(f"inference of {name}", self._client.infer(
                name, [tensor], model_version=str(route or ""), outputs=outputs))
        except GatewayError:
            if route is None or self._route.get(name) != route:
                raise
            self._route.pop(name, None)  # the version went away (loaded elsewhere): let Triton choose
            result = await self._call(f"inference of {name}", self._client.infer(name, [tensor], outputs=outputs))
        response = result.get_response()
        version = response.model_version if self._grpc else response.get("model_version", "0")
        maps = result.as_numpy(OUTPUT_ANOMALY_MAP)
        counts = result.as_numpy(OUTPUT_PART_COUNTS) if OUTPUT_PART_COUNTS in names else None
        answered = int(version or 0)
        # the card read with the index describes the served version; another version's answer (a load in
        # between) is left without a card rather than paired with the wrong one
        card = model.card if model is not None and model.served_version == answered else None
        return InferenceOutput(answered, maps[:, 0].astype(np.float32),
                               result.as_numpy(OUTPUT_SCORE).reshape(-1).astype(np.float32),
                               part_counts=None if counts is None else counts.astype(np.float32), card=card)

    async def load(self, name: str, version: int | None = None) -> ServedModel:
        self._route.pop(name, None)
        if version is not None:
            await self._load_with_policy(name, {"specific": {"versions": [version]}})
            self._pinned[name] = version
        else:
            await self._load_newest(name)
        model = (await self.refresh()).get(name)
        if model is None:
            raise LoadFailed(f"Triton reports {name!r} loaded but it is not in the repository index")
        if version is not None and model.served_version != version:
            raise LoadFailed(f"Triton loaded {name!r} but serves version {model.served_version}, not {version}")
        if model.served_version is not None:
            self._route[name] = model.served_version
        return model

    async def _load_newest(self, name: str) -> None:
        """Serve the newest version: a plain repository load, unless a pin (config override) must be lifted.

        A plain load would keep a pin: Triton re-reads config.pbtxt only when the model's folder changed.
        """
        if name not in self._pinned and not await self._pinned_in_triton(name):
            await self._load_call(name)
            model = (await self.refresh()).get(name)
            if model is None or not model.ready or model.served_version >= max(model.versions):
                return
            # a newer version Triton knows is not served: a pin made by an earlier gateway process
        await self._load_with_policy(name, self._policies.get(name, _REPOSITORY_POLICY))
        self._pinned.pop(name, None)

    async def _load_call(self, name: str, config: str | None = None) -> None:
        """Triton's repository ``load`` (optionally with a JSON config override); LoadFailed keeps the old version."""
        try:
            await self._call(f"load of {name}", self._client.load_model(name, config=config),
                             max(self.timeout_s, 60.0))
        except GatewayError as error:
            if isinstance(error, BackendUnavailable):
                raise
            kept = self._models.get(name)
            keep = f"; still serving version {kept.served_version}" if kept and kept.ready else ""
            raise LoadFailed(f"Triton could not load {name!r}: {error.message}{keep}") from error

    async def _current_config(self, name: str) -> dict | None:
        """The configuration Triton serves ``name`` with, or None when no version is loaded."""
        try:
            config = await self._call(f"config of {name}", self._config(name))
        except (ModelNotReady, ModelNotFound):
            return None
        except GatewayError as exc:
            if exc.code == "backend_error":  # Triton's answer for a model it does not serve
                return None
            raise
        return dict(config.get("config", config))

    async def _pinned_in_triton(self, name: str) -> bool:
        config = await self._current_config(name)
        return config is not None and "specific" in config.get("version_policy", {})

    async def _load_with_policy(self, name: str, policy: dict) -> None:
        """Reload ``name`` with its served configuration and another version policy (a config override)."""
        config = await self._current_config(name)
        if config is None:
            raise LoadFailed(f"{name!r} has no loaded version in Triton to take its configuration from; "
                             f"load it without a version first")
        current = config.get("version_policy") or {}
        if current and "specific" not in current:
            self._policies[name] = current  # the repository's policy, restored on unpin
        config["version_policy"] = policy
        await self._load_call(name, json.dumps(config))

    async def unload(self, name: str) -> None:
        if name not in self._models:
            await self.refresh()
            if name not in self._models:
                raise ModelNotFound(f"unknown model {name!r}")
        await self._call(f"unload of {name}", self._client.unload_model(name))
        self._pinned.pop(name, None)
        self._route.pop(name, None)
        await self.refresh()

    async def reachable(self) -> bool:
        try:
            live = await self._call("liveness check", self._client.is_server_live())
        except GatewayError:
            return False
        return bool(live)
