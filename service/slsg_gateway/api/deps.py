"""Shared route dependencies: gateway state, API-key checks, size-limited body reading."""

from __future__ import annotations

import hmac
import ipaddress
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from slsg_gateway.backends.base import Backend
from slsg_gateway.batching import MicroBatcher
from slsg_gateway.errors import Forbidden, PayloadTooLarge, Unauthorized
from slsg_gateway.inspection import Inspector
from slsg_gateway.metrics import GatewayMetrics
from slsg_gateway.records.store import RecordStore
from slsg_gateway.reconcile import Reconciler
from slsg_gateway.settings import Settings


@dataclass
class GatewayState:
    settings: Settings
    backend: Backend
    metrics: GatewayMetrics
    batcher: MicroBatcher
    inspector: Inspector
    pool: ThreadPoolExecutor
    reconciler: Reconciler
    records: RecordStore | None = None  # None: SLSG_RECORDS=off


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway


_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")
_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")


def _presented_key(header_key: str | None, bearer: HTTPAuthorizationCredentials | None) -> str | None:
    return header_key or (bearer.credentials if bearer else None)


def _check(key: str | None, allowed: list[str], what: str) -> None:
    if key is None:
        raise Unauthorized(f"{what} requires an API key: send 'X-API-Key' or 'Authorization: Bearer'")
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in allowed):
        raise Forbidden(f"the API key is not valid for {what}")


def require_inspect_key(state: GatewayState = Depends(get_state), header_key: str | None = Depends(_api_key_header),
                        bearer: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """Open when no SLSG_API_KEYS are configured; admin keys are accepted too."""
    allowed = state.settings.api_keys
    if allowed:
        _check(_presented_key(header_key, bearer), allowed + state.settings.admin_keys, "inspection")


def require_admin_key(state: GatewayState = Depends(get_state), header_key: str | None = Depends(_api_key_header),
                      bearer: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """Closed (403) unless SLSG_ADMIN_KEYS is configured and the key is one of them."""
    if not state.settings.admin_keys:
        raise Forbidden("model administration is disabled: no SLSG_ADMIN_KEYS configured")
    _check(_presented_key(header_key, bearer), state.settings.admin_keys, "model administration")


def require_models_key(state: GatewayState = Depends(get_state), header_key: str | None = Depends(_api_key_header),
                       bearer: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """The model list (cards: calibration, training-data hash) takes an inspection key once keys are
    configured, unless SLSG_OPEN_MODELS opens it."""
    settings = state.settings
    if settings.api_keys and not settings.open_models:
        _check(_presented_key(header_key, bearer), settings.api_keys + settings.admin_keys, "the model list")


def require_metrics_access(request: Request, state: GatewayState = Depends(get_state),
                           header_key: str | None = Depends(_api_key_header),
                           bearer: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """Metrics are closed once API or metrics keys are configured, unless SLSG_OPEN_METRICS opens them.

    A scraper gets in with a metrics key (or an admin key) or from one of SLSG_METRICS_NETWORKS; the
    address checked is the TCP peer's, so a proxy in front makes the proxy's address the one to list.
    """
    settings = state.settings
    if settings.open_metrics or not (settings.api_keys or settings.metrics_keys):
        return
    if _peer_in(request, settings.metrics_networks):
        return
    allowed = settings.metrics_keys + settings.admin_keys
    key = _presented_key(header_key, bearer)
    if key is None:
        raise Unauthorized("metrics require a metrics key ('X-API-Key' or 'Authorization: Bearer') or a request "
                           "from one of SLSG_METRICS_NETWORKS")
    if not allowed or not any(hmac.compare_digest(key.encode(), k.encode()) for k in allowed):
        raise Forbidden("the API key is not valid for metrics (SLSG_METRICS_KEYS or SLSG_ADMIN_KEYS)")


def _peer_in(request: Request, networks: list[str]) -> bool:
    if not networks or request.client is None:
        return False
    try:
        peer = ipaddress.ip_address(request.client.host)
    except ValueError:  # not an IP address (a Unix socket, a test client's name)
        return False
    return any(peer in ipaddress.ip_network(n, strict=False) for n in networks)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) beyond ``limit`` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette replays a cached body, so request.form() can parse it afterwards
    return body
