"""Browser sessions for the review page: a signed, HTTP-only cookie instead of an API key per request.

The cookie holds the key's fingerprint (never the key), the operator's name and an expiry, signed
with HMAC under a secret derived from the configured keys: every replica with the same keys accepts
it, and changing the keys ends every session. Without configured keys the page is open, like inspection.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from slsg_gateway.api.routes.inspections import key_fingerprint as fingerprint
from slsg_gateway.settings import Settings

COOKIE = "slsg_ui"
SESSION_S = 12 * 3600  # one shift


@dataclass(frozen=True)
class Operator:
    key_fingerprint: str  # "anonymous" when the gateway has no keys
    name: str

    @property
    def reviewer(self) -> str:
        return self.name or self.key_fingerprint


def _keys(settings: Settings) -> list[str]:
    return list(settings.api_keys) + list(settings.admin_keys) if settings.api_keys else []


def _secret(settings: Settings) -> bytes:
    return hashlib.sha256(("slsg-ui\0" + "\0".join(sorted(_keys(settings)))).encode()).digest()


def _sign(settings: Settings, payload: bytes) -> str:
    return hmac.new(_secret(settings), payload, hashlib.sha256).hexdigest()


def keys_required(settings: Settings) -> bool:
    return bool(settings.api_keys)


def login(settings: Settings, key: str, name: str) -> Operator | None:
    """The operator for ``key``, or None when the key is not one of the configured keys."""
    if not keys_required(settings):
        return Operator("anonymous", name.strip())
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in _keys(settings)):
        return None
    return Operator(fingerprint(key), name.strip())


def cookie_value(settings: Settings, operator: Operator, now: float | None = None) -> str:
    payload = json.dumps({"k": operator.key_fingerprint, "n": operator.name[:64],
                          "e": int((time.time() if now is None else now) + SESSION_S)}).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=") + "." + _sign(settings, payload)


def operator_from_cookie(settings: Settings, value: str | None, now: float | None = None) -> Operator | None:
    """The signed-in operator, or None (no cookie, bad signature, expired, or the key was removed)."""
    if not value or "." not in value:
        return None
    encoded, signature = value.rsplit(".", 1)
    try:
        payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        data = json.loads(payload)
    except ValueError:
        return None
    if not hmac.compare_digest(signature, _sign(settings, payload)):
        return None
    if data.get("e", 0) < (time.time() if now is None else now):
        return None
    if keys_required(settings) and data.get("k") not in {fingerprint(k) for k in _keys(settings)}:
        return None
    return Operator(str(data.get("k", "")), str(data.get("n", "")))
