"""Inference backends: embedded ONNX Runtime and remote Triton, behind one interface."""

from __future__ import annotations

from slsg_gateway.backends.base import Backend, InferenceOutput, ServedModel
from slsg_gateway.settings import Settings


def create_backend(settings: Settings) -> Backend:
    """The backend named by ``settings.backend`` (imports only the one in use)."""
    if settings.backend == "triton":
        from slsg_gateway.backends.triton import TritonBackend

        return TritonBackend(settings)
    from slsg_gateway.backends.embedded import EmbeddedBackend

    return EmbeddedBackend(settings)


__all__ = ["Backend", "InferenceOutput", "ServedModel", "create_backend"]
