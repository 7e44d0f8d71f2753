"""Gateway errors: each carries an HTTP status and a stable machine-readable code.

Every error response has the shape ``{"error": {"code": str, "message": str}}``.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base error; ``status`` is the HTTP status, ``code`` a stable identifier."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}


class BadImage(GatewayError):
    status, code = 400, "bad_image"


class FrameTooSmall(GatewayError):
    """A frame far smaller than the model input: blown up to it, it shows nothing of the part."""

    status, code = 422, "image_too_small"


class UnsupportedMediaType(GatewayError):
    status, code = 415, "unsupported_media_type"


class PayloadTooLarge(GatewayError):
    status, code = 413, "payload_too_large"


class ModelNotFound(GatewayError):
    status, code = 404, "model_not_found"


class ModelNotReady(GatewayError):
    status, code = 503, "model_not_ready"


class BackendUnavailable(GatewayError):
    """The inference backend cannot be reached or timed out; clients should retry later."""

    status, code = 503, "backend_unavailable"


class Overloaded(GatewayError):
    """The per-model queue is full; shed load instead of queueing without bound."""

    status, code = 429, "overloaded"


class LoadFailed(GatewayError):
    """A (re)load failed; the previously served version (if any) stays in service."""

    status, code = 422, "load_failed"


class Unauthorized(GatewayError):
    status, code = 401, "unauthorized"


class Forbidden(GatewayError):
    status, code = 403, "forbidden"
